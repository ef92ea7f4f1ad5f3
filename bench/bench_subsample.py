"""tk.subsample's wall time on torchvision ResNets (issue #22: resnet50 at n = 500,000
within 0.25 s on one thread).

    python bench/bench_subsample.py [--threads 1] [--repeats 5] [--target 0.25]

Median of --repeats calls after one untimed call, CPU. Each row is one
``tk.subsample(model, n, seed=0, structure=...)``, the ParamIndex included; the model is
built once per architecture (its construction is not timed). Exits non-zero when
resnet50 at n = 500,000 (uniform) takes longer than --target seconds.
"""

from __future__ import annotations

import argparse
import platform
import sys

import numpy as np
import torch
import torchvision

import tangent_kernels as tk
from _common import commit, timed

CASES = [  # (architecture, n, structure)
    ("resnet18", 1_000, "uniform"),
    ("resnet18", 100_000, "uniform"),
    ("resnet50", 1_000, "uniform"),
    ("resnet50", 500_000, "uniform"),
    ("resnet50", 5_000_000, "uniform"),
    ("resnet18", 100_000, "kronecker"),
    ("resnet50", 500_000, "kronecker"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target", type=float, default=0.25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"commit {commit()}, torch {torch.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    models = {name: getattr(torchvision.models, name)() for name in {c[0] for c in CASES}}
    print(f"| model (p) | n | structure | seconds |\n|---|---|---|---|")
    target_time = None
    for name, n, structure in CASES:
        model = models[name]
        seconds, idx = timed(lambda: tk.subsample(model, n, seed=0, structure=structure), repeats=args.repeats)
        print(f"| {name} ({idx.layout.total:,}) | {n:,} | {structure} | {seconds:.3f} |")
        if (name, n, structure) == ("resnet50", 500_000, "uniform"):
            target_time = seconds
    ok = target_time <= args.target
    print(f"resnet50 n=500,000: {target_time:.3f} s, target <= {args.target} s: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
