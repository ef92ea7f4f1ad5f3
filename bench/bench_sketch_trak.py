"""TRAK's projectors on CPU: its BasicProjector against compat.trak.SketchProjector
(tk.Projection behind TRAK's interface), on resnet18-sized gradients, in one run.

    python bench/bench_sketch_trak.py [--proj-dim 4096] [--batch 4] [--threads N] [--json out.json]

The gradients are TRAK's dict {name: [B, *shape]} over torchvision resnet18's 62
parameter tensors (P = 11,181,642 for 10 classes), random normal. Each projector runs in
its own process (so that its peak memory is its own): it is built, projects the batch once
(the per-batch cost of a TRAKer featurize: both regenerate R on every call), and reports
the time of that call and its peak resident memory above the gradients'. Both costs are
linear in proj_dim (BasicProjector generates a [P, 100] block per 100 columns; tk.Projection
P x proj_dim hashes), so a run at a smaller proj_dim gives the per-column cost; the
memory does not depend on proj_dim above 100 (BasicProjector holds one [P, 100] block,
tk.Projection slices of 2**21 entries). Asserts that each projection keeps the squared
norms at TRAK's scale (|phi|^2 / (proj_dim |g|^2) within 5 / sqrt(proj_dim) of 1).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import commit

PROJECTORS = {
    "trak BasicProjector normal (TRAK's CPU default)": ("basic", "normal"),
    "trak BasicProjector rademacher": ("basic", "rademacher"),
    "tk SketchProjector rademacher": ("sketch", "rademacher"),
    "tk SketchProjector normal": ("sketch", "normal"),
}


def resnet18_gradients(batch: int):
    from torchvision.models import resnet18

    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(batch, *p.shape, generator=g) for name, p in resnet18(num_classes=10).named_parameters()}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def one(which: str, proj_type: str, proj_dim: int, batch: int) -> dict:
    from trak.projectors import BasicProjector

    from tangent_kernels.compat.trak import SketchProjector

    grads = resnet18_gradients(batch)
    P = sum(g[0].numel() for g in grads.values())
    before = peak_mib()  # after the imports and the gradients: what the projector adds
    start = time.perf_counter()
    cls = BasicProjector if which == "basic" else SketchProjector
    projector = cls(grad_dim=P, proj_dim=proj_dim, seed=0, proj_type=proj_type, device="cpu")
    built = time.perf_counter() - start
    start = time.perf_counter()
    phi = projector.project(grads, model_id=0)
    seconds = time.perf_counter() - start
    peak = peak_mib() - before
    norms = sum(g.flatten(1).double().pow(2).sum(1) for g in grads.values())
    scale = (phi.double().pow(2).sum(1) / (proj_dim * norms)).tolist()
    return {"P": P, "build_s": built, "project_s": seconds, "peak_above_gradients_mib": peak,
            "norm_ratio": scale}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proj-dim", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", nargs=2, metavar=("WHICH", "TYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one(*args.one, args.proj_dim, args.batch)))
        return 0
    rows = {}
    for label, (which, proj_type) in PROJECTORS.items():
        command = [sys.executable, __file__, "--one", which, proj_type, "--proj-dim", str(args.proj_dim),
                   "--batch", str(args.batch)] + (["--threads", str(args.threads)] if args.threads else [])
        rows[label] = json.loads(subprocess.check_output(command, text=True).strip().splitlines()[-1])
        print(label, rows[label], flush=True)
    P = next(iter(rows.values()))["P"]
    base = rows[next(iter(PROJECTORS))]
    print(f"\nP = {P:,}, B = {args.batch}, proj_dim = {args.proj_dim}, threads = {torch.get_num_threads()}, "
          f"torch {torch.__version__}, commit {commit()}, {platform.processor() or platform.machine()}")
    print("| projector | project (s) | s per 1,000 columns | x TRAK's default | peak memory above the gradients (MiB) |")
    print("|---|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['project_s']:.2f} | {row['project_s'] / args.proj_dim * 1000:.2f} | "
              f"{base['project_s'] / row['project_s']:.2f}x | {row['peak_above_gradients_mib']:.0f} |")
        for ratio in row["norm_ratio"]:
            assert abs(ratio - 1) <= 5 / args.proj_dim ** 0.5, (label, ratio)
    if args.json:
        Path(args.json).write_text(json.dumps({"proj_dim": args.proj_dim, "batch": args.batch, "rows": rows,
                                               "torch": torch.__version__, "commit": commit()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
