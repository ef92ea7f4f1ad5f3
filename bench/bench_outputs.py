"""Every logit at its true cost (issue 23): one logit vs trace vs diagonal vs full.

tk.gram on bench_structured's CNN (two convolutions and a dense head on 3x16x16, k = 10
logits) at n = 256 (two loader batches of 128), one thread by default, fp32, the default
structured="auto":
- one logit: output=0, K [n, n];
- trace: output="trace", K [n, n] = sum over the logits of their Grams;
- diagonal: output="diagonal", K [n, n, k];
- full: output="full", K [n, n, k, k] (every cross product).
Each after a warm-up, --repeats calls round-robin over the outputs (bench_structured's
measure_all: a change of the machine's load falls on all alike). Printed: median [min,
max] per output and its ratio to k x one logit's median; the target (issue 23) is
trace and diagonal <= 1.3x k x one logit, asserted unless --no-assert. Also checked: trace
and diagonal equal the trace / diagonal of full (relative Frobenius <= 1e-5, fp32).

    python bench/bench_outputs.py [--n 256] [--repeats 5] [--threads 1] [--model cnn|mlp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from _common import commit
from bench_structured import MODELS, OUTPUTS, measure_all
import tangent_kernels as tk

TARGET = 1.3
FORMS = {"one logit": 0, "trace": "trace", "diagonal": "diagonal", "full": "full"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-assert", action="store_true")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    make, shape = MODELS[args.model]
    model = make().to(device)
    x = torch.randn(args.n, *shape, device=device)
    loader = [x[i:i + args.batch] for i in range(0, args.n, args.batch)]

    fns = {name: (lambda output=output: tk.gram(model, loader, output=output, progress=False))
           for name, output in FORMS.items()}
    runs = measure_all(fns, args.repeats, device)
    for name, (times, result) in runs.items():
        if times is None:
            raise SystemExit(f"{name} failed: {result!r}")
    medians = {name: statistics.median(times) for name, (times, _) in runs.items()}
    unit = OUTPUTS * medians["one logit"]
    full = runs["full"][1].double()
    diagonal = full.diagonal(dim1=2, dim2=3)
    errors = {"trace": float((runs["trace"][1].double() - diagonal.sum(-1)).norm() / diagonal.sum(-1).norm()),
              "diagonal": float((runs["diagonal"][1].double() - diagonal).norm() / diagonal.norm())}

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"tk {args.model}, k = {OUTPUTS}, n = {args.n}, {args.threads} thread(s), {where}, commit {commit()}")
    print(f"| output | K | median ms [min, max] | vs {OUTPUTS} x one logit |")
    print("|---|---|---|---|")
    rows = []
    for name, (times, result) in runs.items():
        ratio = medians[name] / unit
        rows.append({"output": name, "shape": list(result.shape), "median_s": medians[name], "min_s": min(times),
                     "max_s": max(times), "vs_k_one_logit": ratio})
        print(f"| {name} | {list(result.shape)} | {1e3 * medians[name]:.0f} [{1e3 * min(times):.0f}, "
              f"{1e3 * max(times):.0f}] | {ratio:.2f}x |")
    print(f"trace / diagonal vs full's: {errors['trace']:.1e} / {errors['diagonal']:.1e} (relative Frobenius)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "n": args.n, "k": OUTPUTS, "device": where,
                                               "threads": args.threads, "commit": commit(), "rows": rows,
                                               "errors": errors}, indent=2))
    assert max(errors.values()) <= 1e-5, errors
    if not args.no_assert:
        for name in ("trace", "diagonal"):
            assert medians[name] <= TARGET * unit, f"{name}: {medians[name] / unit:.2f}x k x one logit > {TARGET}x"


if __name__ == "__main__":
    main()
