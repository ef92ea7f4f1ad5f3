"""What the per-batch check costs: tk.gram with the check against tk.gram without it, in
one run, on the bench models (issue #20: under 10% of gram at n = 1,024).

Every batch of the batched pass is checked on one sample (drawn per batch) evaluated
alone, as two copies of itself (persample/extractor.py). "Without" replaces the check by
a no-op, which only a benchmark may do: a run without the check is not trusted.

    python bench/bench_verify.py [--n 1024] [--batch-size 64] [--repeats 5] [--threads 1] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    yield "MLP 64-256-256-10, all parameters", mlp, (64,), None
    yield "CNN 2 convs + linear, 8x8, all parameters", cnn, (1, 8, 8), None
    yield "CNN, 5,000 sampled", cnn, (1, 8, 8), tk.subsample(cnn, 5_000, seed=0)
    try:
        import torchvision
    except ImportError:
        return
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    yield "resnet18 32x32, 100,000 sampled", resnet, (3, 32, 32), tk.subsample(resnet, 100_000, seed=0)


def run_once(model, loader, idx, check: bool, device) -> float:
    original = FeatureExtractor._verify
    if not check:
        FeatureExtractor._verify = lambda self, batch, block, factors: True
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tk.gram(model, loader, idx, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    finally:
        FeatureExtractor._verify = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"commit {commit()}, torch {torch.__version__}, {where}, "
          f"{args.threads} thread(s), load {os.getloadavg()[0]:.2f}")
    for name, model, shape, idx in models():
        if args.skip_resnet and "resnet" in name:
            continue
        model = model.to(device)
        x = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(1)).to(device)
        loader = [x[i:i + args.batch_size] for i in range(0, args.n, args.batch_size)]
        run_once(model, loader, idx, True, device)  # warm-up: plans, rates, allocator
        with_check, without = [], []
        for _ in range(args.repeats):  # interleaved: the machine's load hits both alike
            with_check.append(run_once(model, loader, idx, True, device))
            without.append(run_once(model, loader, idx, False, device))
        ratios = sorted(a / b for a, b in zip(with_check, without))
        row = dict(model=name, n=args.n, batch=args.batch_size, with_check_s=statistics.median(with_check),
                   without_s=statistics.median(without), ratio_median=statistics.median(ratios),
                   ratio_min=ratios[0], ratio_max=ratios[-1])
        rows.append(row)
        print(f"{name:45s} with {row['with_check_s'] * 1e3:8.1f} ms  without {row['without_s'] * 1e3:8.1f} ms  "
              f"overhead {100 * (row['ratio_median'] - 1):5.1f}% (range {100 * (ratios[0] - 1):.1f}% .. "
              f"{100 * (ratios[-1] - 1):.1f}%)")
    print(f"load at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(commit=commit(), torch=torch.__version__, device=where, threads=args.threads, rows=rows), handle, indent=1)


if __name__ == "__main__":
    main()
