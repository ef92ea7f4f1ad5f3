"""Where tk.gram's time goes: torch.profiler's top operators by device (or CPU) time.

    python bench/profile_gram.py [--model resnet50] [--size 224] [--n 256] [--params 500000]
        [--precision bf16] [--backend auto] [--device cuda] [--top 25]

Not a benchmark (the profiler slows small launches down): it says which phase to
attack next; bench_gram.py measures the result.
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

import tangent_kernels as tk


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=["resnet18", "resnet50"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--params", type=int, default=500_000)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(num_classes=args.classes).to(device).eval()
    loader = list(torch.randn(args.n, 3, args.size, args.size, device=device).split(args.batch_size))
    idx = tk.subsample(model, args.params, seed=0)
    run = lambda data: tk.gram(model, data, idx, progress=False, backend=args.backend, precision=args.precision)
    run(loader[:1])  # warm-up: cuDNN plans, kernel compilation
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        run(loader)
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"{args.model} {args.size}x{args.size} n={args.n} p={args.params} {args.precision} backend={args.backend}")
    print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
