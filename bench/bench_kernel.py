"""The eNTK during training: repeated ``tk.Kernel.gram`` on a fixed probe set after SGD
steps, against a one-shot ``tk.gram`` per step and the training step itself over the same
samples, in one run (issue #22: target <= 2x a training step).

Every step: one SGD step (cross-entropy, forward + backward + update over the probe
samples: the floor), then K by the Kernel and K by tk.gram at the same weights (checked
equal before any time is reported). Medians over the steps after a warm-up.

    python bench/bench_kernel.py [--n 128] [--steps 20] [--threads 1] [--batch-size 0] [--profile] [--json out.json]

``--batch-size 0``: the probe set as one batch. ``--split``: also Kernel.gram with the
per-batch check replaced by a no-op (as bench/bench_verify.py does), a diagnostic of what
the check costs per call, never a mode: a run without the check is not trusted. ``--profile``: cProfile of the Kernel's
calls on the first model, the top entries by own time and by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import time

import torch
from torch import nn

import tangent_kernels as tk
from _common import commit
from tangent_kernels.persample.extractor import FeatureExtractor


def models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    yield "MLP 64-256-256-10, all parameters, pNTK", mlp, (64,), None
    yield "MLP, 5,000 sampled, pNTK", mlp, (64,), tk.subsample(mlp, 5_000, seed=0)
    yield "CNN 2 convs + linear, 8x8, all parameters, pNTK", cnn, (1, 8, 8), None
    yield "CNN, 5,000 sampled, pNTK", cnn, (1, 8, 8), tk.subsample(cnn, 5_000, seed=0)


def clock(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def without_check(fn):
    original = FeatureExtractor._verify
    FeatureExtractor._verify = lambda self, batch, block, factors: True
    try:
        return fn()
    finally:
        FeatureExtractor._verify = original


def measure(model, x, y, idx, steps: int, batch_size: int, split: bool):
    loader = [x] if batch_size <= 0 else list(x.split(batch_size))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    kernel = tk.Kernel(model, idx, output="sum")

    def train_step():
        model.train()
        for xb, yb in zip(loader, y.split(loader[0].shape[0])):
            loss = nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()

    times = {"train step": [], "Kernel.gram": [], "tk.gram": [], "Kernel.gram without check": []}
    for step in range(steps + 2):  # the first two: warm-up (first-call setup, allocator)
        t_train, _ = clock(train_step)
        t_kernel, k = clock(lambda: kernel.gram(loader, progress=False))
        t_gram, reference = clock(lambda: tk.gram(model, loader, idx, output="sum", progress=False))
        t_unchecked = clock(lambda: without_check(lambda: kernel.gram(loader, progress=False)))[0] if split else 0.0
        scale = reference.abs().max()
        if not (k - reference).abs().max() <= 1e-4 * scale:
            raise AssertionError(f"Kernel.gram differs from tk.gram at step {step}")
        if step >= 2:
            for name, t in zip(times, (t_train, t_kernel, t_gram, t_unchecked)):
                times[name].append(t)
    assert kernel.rebuilds == 0
    return {name: statistics.median(ts) for name, ts in times.items()}, kernel, loader


def profile(kernel, loader, calls: int = 30) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        kernel.gram(loader, progress=False)
    profiler.disable()
    stats = pstats.Stats(profiler)
    print(f"\ncProfile of {calls} Kernel.gram calls (no weight change between them):")
    stats.sort_stats("tottime").print_stats(18)
    stats.sort_stats("cumulative").print_stats(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--split", action="store_true")
    parser.add_argument("--only", default=None, help="run the models whose name contains this")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"commit {commit()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), load {os.getloadavg()[0]:.2f}, n = {args.n}, "
          f"{'one batch' if args.batch_size <= 0 else f'batches of {args.batch_size}'}")
    rows = []
    print(f"{'model':<50} {'train step':>11} {'Kernel.gram':>12} {'tk.gram':>9} {'Kernel/step':>12} "
          f"{'tk.gram/step':>13}" + (f" {'unchecked/step':>15}" if args.split else ""))
    for name, model, shape, idx in models():
        if args.only and args.only not in name:
            continue
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(args.n, *shape, generator=g), torch.randint(0, 10, (args.n,), generator=g)
        t, kernel, loader = measure(model, x, y, idx, args.steps, args.batch_size, args.split)
        row = dict(model=name, n=args.n, **{k + " (s)": v for k, v in t.items()},
                   kernel_over_step=t["Kernel.gram"] / t["train step"], gram_over_step=t["tk.gram"] / t["train step"])
        rows.append(row)
        print(f"{name:<50} {t['train step'] * 1e3:9.2f}ms {t['Kernel.gram'] * 1e3:10.2f}ms "
              f"{t['tk.gram'] * 1e3:7.2f}ms {row['kernel_over_step']:11.2f}x {row['gram_over_step']:12.2f}x"
              + (f" {t['Kernel.gram without check'] / t['train step']:14.2f}x" if args.split else ""))
        if args.profile and len(rows) == 1:
            profile(kernel, loader)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(commit=commit(), torch=torch.__version__, threads=args.threads, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
