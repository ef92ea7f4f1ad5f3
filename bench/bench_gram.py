"""gram() against the naive per-sample autograd loop, measured side by side in one run.

Default (CPU, about a minute here): torchvision resnet18 (random weights, eval) on
32x32 inputs, p = 100,000 sampled parameters, n = 64. The baseline is the naive loop
at the same precision (fp32): one forward and one ``torch.autograd.grad`` per sample
over every parameter, gather at idx, then G G^T. Both results are checked against
each other before any time is reported.

    python bench/bench_gram.py [--n 64] [--params 100000] [--device cpu] [--json out.json]

Asserts that gram() is at least ``--margin`` times faster than the naive loop
(default 1.5x: the torch.func path of this version; the fused kernels of the next
issue target >= 10x).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import tangent_kernels as tk


def naive_gram(model, x, idx, batch_size):
    """The textbook eNTK: a backward pass per sample, full gradient, then the gather."""
    params = [p for p in model.parameters() if p.requires_grad]
    positions = idx.positions.to(x.device)
    rows = []
    model.eval()
    for batch in x.split(batch_size):
        for b in range(batch.shape[0]):
            s = model(batch[b : b + 1])[0, 0]
            grads = torch.autograd.grad(s, params)
            rows.append(torch.cat([g.reshape(-1) for g in grads])[positions])
    g = torch.stack(rows)
    return g @ g.T


def timed(fn, repeats, device):
    fn()  # warm-up (allocator, vmap tracing, thread pools)
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.check_output(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--margin", type=float, default=1.5, help="required speedup of gram() over the naive loop")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torchvision

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(device).eval()
    x = torch.randn(args.n, 3, args.size, args.size, device=device)
    idx = tk.subsample(model, args.params, seed=0)
    loader = list(x.split(args.batch_size))

    t_naive, k_naive = timed(lambda: naive_gram(model, x, idx, args.batch_size), args.repeats, device)
    t_gram, k_gram = timed(lambda: tk.gram(model, loader, idx, progress=False), args.repeats, device)
    error = float((k_gram.double() - k_naive.double()).norm() / k_naive.double().norm())
    assert error < 1e-4, f"gram() disagrees with the naive loop: relative error {error:.2e}"

    speedup = t_naive / t_gram
    result = {
        "benchmark": "gram vs naive per-sample autograd loop",
        "model": "torchvision resnet18 (random weights, eval)",
        "n": args.n, "params": args.params, "input": [3, args.size, args.size], "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit(),
        "seconds": {"naive_loop_fp32": t_naive, "tk.gram_fp32": t_gram},
        "speedup": speedup, "relative_difference": error, "margin": args.margin,
    }
    print(f"resnet18 {args.size}x{args.size}, n={args.n}, p={args.params}, device={args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, commit {result['commit']}")
    print(f"  naive per-sample autograd loop  {t_naive:8.3f} s")
    print(f"  tk.gram                         {t_gram:8.3f} s   ({speedup:.1f}x)")
    print(f"  relative difference of K        {error:.1e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    assert speedup >= args.margin, f"gram() is only {speedup:.2f}x faster than the naive loop (< {args.margin}x)"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
