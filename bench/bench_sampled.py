"""Per-op speed of the sampled-gradient contractions: the C++ kernels ("cpp") against
the plain-torch path ("torch", tangent_kernels.sampled), and the Triton kernels when a
GPU runs them, on resnet18-like layer shapes (CPU) measured side by side in one run.

    python bench/bench_sampled.py [--batch 32] [--entries 8000] [--repeats 3] [--json out.json]

Each op's results are compared with the torch path before any time is reported. Times
are medians of --repeats runs after a warm-up; ratios on a shared machine are rough:
anything within ~20% of 1.0 should be read as "no difference". Asserts nothing about
speed (the numbers go to docs/kernels.md); exits non-zero only on a wrong result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import timed
from tangent_kernels import ops, sampled

# (name, in_channels, out_channels, kernel, stride, padding, input size): resnet18 at 32x32.
CONVS = [
    ("conv 3->64 3x3 s1 @32", 3, 64, 3, 1, 1, 32),
    ("conv 64->64 3x3 s1 @32", 64, 64, 3, 1, 1, 32),
    ("conv 64->128 3x3 s2 @32", 64, 128, 3, 2, 1, 32),
    ("conv 128->128 3x3 s1 @16", 128, 128, 3, 1, 1, 16),
    ("conv 128->256 1x1 s2 @16", 128, 256, 1, 2, 0, 16),
    ("conv 256->256 3x3 s1 @8", 256, 256, 3, 1, 1, 8),
    ("conv 512->512 3x3 s1 @4", 512, 512, 3, 1, 1, 4),
]
# (name, tokens, in, out): resnet18's head, and a transformer block's projection.
LINEARS = [("linear 512->10 T=1", 1, 512, 10), ("linear 768->768 T=128", 128, 768, 768)]


def conv_case(g, batch, entries, c_in, c_out, k, stride, padding, size):
    a = torch.randn(batch, c_in, size, size, generator=g)
    a_pad = F.pad(a, (padding,) * 4)
    out_size = (size + 2 * padding - k) // stride + 1
    d = torch.randn(batch, c_out, out_size, out_size, generator=g)
    m = min(entries, c_out * c_in * k * k)
    local = torch.randperm(c_out * c_in * k * k, generator=g)[:m]
    oc, ic, flat = local // (c_in * k * k), (local // (k * k)) % c_in, local % (k * k)
    offsets = torch.stack(torch.unravel_index(flat, (k, k)), dim=1)
    plan, order = sampled.conv_plan(oc, ic, flat, (k, k))
    patches = sampled.conv_patches(a_pad, (k, k), (stride, stride), (1, 1), d.shape[2:])
    torch_fn = lambda: sampled.sampled_conv_grad_planned(patches, d, plan)
    cpp_fn = lambda: ops.sampled_conv_grad(a_pad, d, oc[order], ic[order], offsets[order], (stride,) * 2, (1, 1))
    return torch_fn, cpp_fn, m


def linear_case(g, batch, entries, tokens, n_in, n_out):
    a = torch.randn(batch, tokens, n_in, generator=g)
    d = torch.randn(batch, tokens, n_out, generator=g)
    m = min(entries, n_in * n_out)
    local = torch.randperm(n_in * n_out, generator=g)[:m]
    rows, cols = local // n_in, local % n_in
    return (lambda: sampled.sampled_linear_grad(a, d, rows, cols)), (lambda: ops.sampled_linear_grad(a, d, rows, cols)), m


def embedding_case(g, batch, entries, tokens=128, vocab=30_000, dim=768):
    ids = torch.randint(0, vocab, (batch, tokens), generator=g)
    d = torch.randn(batch, tokens, dim, generator=g)
    local = torch.randperm(vocab * dim, generator=g)[:entries]
    rows, cols = local // dim, local % dim
    return (lambda: sampled.sampled_embedding_grad(ids, d, rows, cols)), \
        (lambda: ops.sampled_embedding_grad(ids, d, rows, cols)), entries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--entries", type=int, default=8000, help="sampled entries per layer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not ops.has_sampled_kernels("cpu"):
        raise SystemExit("the C++ sampled-gradient kernels are not built: pip install --no-build-isolation -e .")
    g = torch.Generator().manual_seed(0)
    cases = [(name, conv_case(g, args.batch, args.entries, *shape)) for name, *shape in CONVS]
    cases += [(name, linear_case(g, args.batch, args.entries, *shape)) for name, *shape in LINEARS]
    cases.append(("embedding 30000x768 T=128", embedding_case(g, args.batch, args.entries)))
    print(f"B={args.batch}, up to {args.entries} entries per layer, fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"  {'op':30s} {'m':>6s} {'torch s':>9s} {'cpp s':>9s} {'torch/cpp':>9s}")
    rows, total = [], {"torch": 0.0, "cpp": 0.0}
    for name, (torch_fn, cpp_fn, m) in cases:
        expected, got = torch_fn(), cpp_fn()
        error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
        if error > 1e-4:  # fp32 sums of <= ~1e5 terms in different orders
            raise SystemExit(f"{name}: cpp and torch differ by {error:.1e} (relative to the largest entry)")
        t_torch, t_cpp = timed(torch_fn, args.repeats)[0], timed(cpp_fn, args.repeats)[0]
        total["torch"] += t_torch
        total["cpp"] += t_cpp
        rows.append({"op": name, "m": m, "torch_s": t_torch, "cpp_s": t_cpp, "ratio": t_torch / t_cpp})
        print(f"  {name:30s} {m:6d} {t_torch:9.4f} {t_cpp:9.4f} {t_torch / t_cpp:8.1f}x")
    print(f"  {'all of the above':30s} {'':6s} {total['torch']:9.4f} {total['cpp']:9.4f} "
          f"{total['torch'] / total['cpp']:8.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"batch": args.batch, "entries": args.entries, "rows": rows,
                                         "threads": torch.get_num_threads(), "torch": torch.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
