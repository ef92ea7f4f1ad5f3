"""A call's slices of R kept across its batches (sketch.KeptRows, docs/sketch.md) against
R generated for every batch (a budget of 0: what the feature phase did before), in one run.

tk.features(model, loader of --batches batches of --batch samples, projection=...) with the
Gaussian and Rademacher kinds, dim --dim, CPU, one thread:
- mlp: 256-96-64-10 (31,530 parameters): R [p, 2048] is 246 MiB, all of it kept (the
  default budget is 256 MiB);
- cnn: bench_sketch's 0.42M-parameter CNN, dim 256: R is 414 MiB, its first 256 MiB kept,
  the rest generated per batch.
Each (kind, budget) is timed --repeats times after a warm-up, round-robin; the speed-up is
per repeat (the machine is shared: a ratio from the same round counts). The two results
are compared bit for bit.

    python bench/bench_sketch_reuse.py [--part mlp|cnn|all] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from _common import commit
from bench_sketch import cnn, inputs
import tangent_kernels as tk
import tangent_kernels.feature_phase as feature_phase
import tangent_kernels.sketch as sketch

KEPT = []  # bytes each call's KeptRows held at its end


class Recorded(sketch.KeptRows):
    """KeptRows that reports what it held (instrumentation of the bench only)."""

    def __del__(self):
        KEPT.append(self.held)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def setup(part: str, batches: int, batch: int):
    if part == "mlp":
        x = torch.randn(batches * batch, 256, generator=torch.Generator().manual_seed(1))
        return mlp(), list(x.split(batch)), 2048
    return cnn(), list(inputs(batches * batch).split(batch)), 256


def run_part(part: str, batches: int, batch: int, repeats: int) -> dict:
    model, loader, dim = setup(part, batches, batch)
    p = sum(t.numel() for t in model.parameters())
    default = sketch.KEPT_ROWS_BYTES
    cases = {(kind, budget): tk.Projection(dim, kind=kind, seed=0)
             for kind in ("gaussian", "rademacher") for budget in (0, default)}

    def call(kind, budget):
        sketch.KEPT_ROWS_BYTES = budget
        try:
            return tk.features(model, loader, projection=cases[(kind, budget)], progress=False)
        finally:
            sketch.KEPT_ROWS_BYTES = default

    results, kept = {}, {}
    for case in cases:
        KEPT.clear()
        results[case] = call(*case)  # warm-up
        kept[case] = KEPT[-1] if KEPT else None
    times = {case: [] for case in cases}
    for _ in range(repeats):
        for case in cases:
            start = time.perf_counter()
            call(*case)
            times[case].append(time.perf_counter() - start)
    report = {"part": part, "p": p, "dim": dim, "batches": batches, "batch": batch, "repeats": repeats,
              "r_bytes": p * dim * 4, "budget": default, "kinds": {}}
    for kind in ("gaussian", "rademacher"):
        before, after = times[(kind, 0)], times[(kind, default)]
        report["kinds"][kind] = {
            "per_batch_seconds": before, "kept_seconds": after, "kept_bytes": kept[(kind, default)],
            "speedup": [b / a for b, a in zip(before, after)],
            "bit_identical": bool(torch.equal(results[(kind, 0)], results[(kind, default)])),
        }
    return report


def show(report: dict) -> None:
    print(f"\n{report['part']}: p = {report['p']:,}, dim = {report['dim']}, {report['batches']} batches of "
          f"{report['batch']}, R {report['r_bytes'] / 2 ** 20:.0f} MiB, budget {report['budget'] / 2 ** 20:.0f} MiB, "
          f"{report['repeats']} repeats (seconds: median [range])")
    for kind, e in report["kinds"].items():
        b, a, s = e["per_batch_seconds"], e["kept_seconds"], e["speedup"]
        print(f"  {kind:10s} R per batch {statistics.median(b):7.3f} [{min(b):.3f}, {max(b):.3f}]   kept "
              f"{statistics.median(a):7.3f} [{min(a):.3f}, {max(a):.3f}] ({e['kept_bytes'] / 2 ** 20:.0f} MiB kept)"
              f"   x{statistics.median(s):.2f} [{min(s):.2f}, {max(s):.2f}]   bit-identical: {e['bit_identical']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["mlp", "cnn", "all"], default="all")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batch-cnn", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    feature_phase.KeptRows = Recorded
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"{cpu}, torch {torch.__version__}, commit {commit()}, {time.strftime('%Y-%m-%d')}, one thread")
    reports = [run_part(part, args.batches, args.batch if part == "mlp" else args.batch_cnn, args.repeats)
               for part in (["mlp", "cnn"] if args.part == "all" else [args.part])]
    for report in reports:
        show(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "torch": torch.__version__, "commit": commit(), "parts": reports}, f, indent=1)


if __name__ == "__main__":
    main()
