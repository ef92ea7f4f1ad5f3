"""Every-logit outputs (output="full"): k backward passes over one forward, or one
backward with ``is_grads_batched=True``? Measured on the backward that the batched pass
runs: gradients of the k logits with respect to every layer output (the tensors the
rules read their per-sample gradients from), after one forward.

    python bench/bench_grads_batched.py [--n 64] [--repeats 5] [--threads N]

Both variants return the same gradients (checked, float32 tolerance); the table gives
the median time of each and the ratio. Nothing is asserted: this decides a design
choice (docs/persample.md records the result), it does not guard a speedup.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

from bench_compat import CNN as TutorialCNN  # the torch.func NTK tutorial's network


def layer_outputs(model: nn.Module, x: torch.Tensor):
    """(logits [B, k], outputs of every Linear / Conv2d) from one forward with grad."""
    outs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, outs


def looped(model, x):
    logits, outs = layer_outputs(model, x)
    k = logits.shape[1]
    return [torch.autograd.grad(logits[:, a].sum(), outs, retain_graph=a < k - 1) for a in range(k)]


def batched(model, x):
    logits, outs = layer_outputs(model, x)
    k = logits.shape[1]
    eye = torch.eye(k, dtype=logits.dtype)[:, None, :].expand(k, *logits.shape)
    grads = torch.autograd.grad(logits, outs, grad_outputs=eye, is_grads_batched=True)
    return [[g[a] for g in grads] for a in range(k)]


def timed(fn, *args, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {
        "tutorial CNN 32x32": (TutorialCNN().eval(), torch.randn(args.n, 3, 32, 32)),
        "resnet18 32x32": (torchvision.models.resnet18(num_classes=10).eval(), torch.randn(args.n, 3, 32, 32)),
        "MLP 784-512-512-10": (nn.Sequential(nn.Linear(784, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(),
                                             nn.Linear(512, 10)).eval(), torch.randn(args.n, 784)),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, n = {args.n}, k = 10, float32, CPU")
    print("| model | k backward passes (s) | one is_grads_batched backward (s) | looped / batched |")
    print("|---|---:|---:|---:|")
    for name, (model, x) in models.items():
        for fn in (looped, batched):  # warm-up
            fn(model, x)
        t_loop, lo_l, hi_l, g_loop = timed(looped, model, x, repeats=args.repeats)
        t_batch, lo_b, hi_b, g_batch = timed(batched, model, x, repeats=args.repeats)
        worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                    for ga, gb in zip(g_loop, g_batch) for a, b in zip(ga, gb))
        assert worst <= 1e-4, f"{name}: the two backward variants disagree ({worst:.1e})"
        print(f"| {name} | {t_loop:.3f} [{lo_l:.3f}-{hi_l:.3f}] | {t_batch:.3f} [{lo_b:.3f}-{hi_b:.3f}] | "
              f"{t_loop / t_batch:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
