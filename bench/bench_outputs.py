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

With --probes: random output probes against the pNTK and the exact trace, on an MLP
64-128-128-k with a 100-class and a 1,000-class head (n = 256, fp32): the time of each and
its relative Frobenius error against output="trace"; the pNTK's trace estimate is
k x output="sum" (= 1^T A 1: the all-ones probe, biased by the cross-logit sum); probes
of m = 1, 4, 16, 64 (Rademacher, seeds 0-2: the median error, and the error that
probe_error predicts from the m probe kernels themselves, ||stderr||_F / ||K||_F).

    python bench/bench_outputs.py --probes [--n 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
from pathlib import Path

import torch

from _common import commit, timed
from bench_structured import MODELS, OUTPUTS, measure_all
import tangent_kernels as tk

TARGET = 1.3
FORMS = {"one logit": 0, "trace": "trace", "diagonal": "diagonal", "full": "full"}


def probes(args) -> None:
    from torch import nn

    device = torch.device(args.device)
    print(f"| head k | method | time ms | rel. error vs trace | predicted (probe_error) |")
    print("|---|---|---:|---:|---:|")
    for k in (100, 1000):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, k)).to(device)
        x = torch.randn(args.n, 64, device=device)
        loader = [x[i:i + args.batch] for i in range(0, args.n, args.batch)]
        gram = functools.partial(tk.gram, model, loader, progress=False)
        times, exact = timed(lambda: gram(output="trace"), device=device)
        exact = exact.double()

        def error(K):
            return float((K.double() - exact).norm() / exact.norm())

        rows = [("exact trace", times, 0.0, None)]
        times, pntk = timed(lambda: gram(output="sum"), device=device)
        rows.append(("pNTK x k (all-ones probe)", times, error(k * pntk), None))
        for m in (1, 4, 16, 64):
            errors, predicted, spent = [], [], []
            for seed in range(3):
                t, per_probe = timed(lambda: gram(output=tk.OutputProbes(m, seed=seed, reduce=False)), device=device,
                                     warmup=seed == 0)
                estimate = per_probe.double().mean(-1)
                errors.append(error(estimate))
                spent.append(t)
                if m > 1:
                    predicted.append(float(tk.outputs.probe_error(per_probe.double()).norm() / estimate.norm()))
            rows.append((f"probes m = {m}", statistics.median(spent), statistics.median(errors),
                         statistics.median(predicted) if predicted else None))
        for name, t, err, pred in rows:
            print(f"| {k} | {name} | {1e3 * t:.0f} | {err:.3f} | {'' if pred is None else f'{pred:.3f}'} |")


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
    ap.add_argument("--probes", action="store_true", help="random output probes vs pNTK vs the exact trace")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.probes:
        return probes(args)
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
