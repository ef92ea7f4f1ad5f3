"""Per layer, the sparse sampled-dot kernels against the dense GEMM-with-sampled-epilogue
Triton kernel, as taps' "auto" strategy measures them on the first CUDA batch.

    python bench/bench_dense.py [--model resnet50] [--size 224] [--params 500000] [--batch 64]
        [--backend cuda] [--tf32]

Prints each weight's decision ("sparse 0.123 ms, dense 0.045 ms; dense", or why dense
was not tried) and the totals. The H100 numbers in bench/RESULTS.md were taken before
"auto" skipped layers whose tiles hold > 8 entries per sampled one: to time every layer
again, run with `--all-layers`.
Needs a GPU (the dense kernel is Triton); asserts nothing.
"""

from __future__ import annotations

import argparse
import re

import torch
import torchvision

import tangent_kernels as tk
from tangent_kernels._model import eval_mode
from tangent_kernels.precisions import fp32_math
from tangent_kernels.persample import dense, extractor as persample_extractor
from tangent_kernels.data import to_inputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=["resnet18", "resnet50"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--params", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--tf32", action="store_true")
    parser.add_argument("--all-layers", action="store_true", help="time dense on every candidate layer")
    args = parser.parse_args()
    if args.all_layers:
        dense._DENSE_MAX_WORK_RATIO = float("inf")
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().cuda().eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device="cuda")
    index = tk.params.resolve_idx(model, tk.subsample(model, args.params, seed=0))
    extractor = persample_extractor.FeatureExtractor(model, index, "first", torch.float32, x.device, args.backend)
    with eval_mode(model), fp32_math(args.tf32):
        extractor(to_inputs(x))
    totals = {"sparse": 0.0, "best": 0.0}
    for name, why in extractor.dense.measured.items():
        print(f"  {name:28s} {why}")
        times = re.findall(r"(sparse|dense) ([0-9.]+) ms", why)
        if times:
            totals["sparse"] += float(times[0][1])
            totals["best"] += min(float(t) for _, t in times)
    print(f"{args.model} {args.size}x{args.size} p={args.params} batch {args.batch} tf32={args.tf32}: weights' "
          f"sampled gradients {totals['sparse']:.2f} ms sparse only, {totals['best']:.2f} ms with the faster per layer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
