"""How accurate is a sketched eNTK? The seed's ablation (issue 26): random projections
against the exact full-parameter kernel, and against a parameter subsample of the same
size on the demo's ID/OOD task.

    python bench/sketch_accuracy.py [--quick] [--seeds 5] [--resnet18-dims 256]
                                    [--figure docs/figures/sketch_accuracy.png] [--table out.md] [--json out.json]

1. Relative error ||K~ - K||_F / ||K||_F of the sketched K~ = (G R)(G R)^T against the
   exact K = G G^T (every trainable parameter, output "first", float32), over n samples,
   for dim in 256 .. 16,384 and each kind tk.Projection accepts (a kind that it refuses
   is skipped with a printed note), mean and standard deviation over seeds, on: the
   demo's digits CNN (random init, n digits), torchvision resnet18 (random init, 32x32
   normal inputs) and a small BERT (random init, random tokens). With it, the Gaussian
   sketch's expected error: E||K~ - K||_F^2 = ((tr K)^2 + ||K||_F^2) / dim, so
   sqrt((1 + (tr K / ||K||_F)^2) / dim).
2. Kernel ridge regression (the demo's: pNTK, output "sum", KernelRidge(betas="auto",
   beta_scale="trace") selected on ID val) on the demo's ID/OOD shift with its pretrained
   CNN (tangent_kernels.demo's make_shift, digits_cnn, pretrain_rotation), features of
   equal size p (so equal kernel cost n^2 p and storage n p): a uniform subsample of p
   parameters (tk.subsample) against each projection kind at dim = p, and the exact kernel.

The dense kinds' features at the largest dim are computed once per seed and the smaller
dims taken as their first columns (tk.Projection's first d columns of R for dim are
sqrt(dim / d) times R for d: each is an exact draw of Projection(d, kind, seed); the dims'
errors within a seed are therefore correlated, not independent). Their G R comes from
``Projection.project`` on the exact features G, which is what tk.features(projection=)
computes per batch (tests/test_sketch_accuracy.py checks both); any other kind goes
through tk.features(projection=) at each dim.

--quick (< 1 min: the CNN and the BERT at n = 16, dims 256 and 1,024, two seeds; the
demo with one pretraining epoch, p = 256, one seed) is run by tests/test_sketch_accuracy.py.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch import nn

import tangent_kernels as tk
from tangent_kernels import demo, sketch

DIMS = (256, 1024, 4096, 16384)
DENSE = ("gaussian", "rademacher")  # the kinds whose first columns are the smaller dims' R


def candidate_kinds() -> List[str]:
    """What tk.Projection is asked for: its own kinds and the ones issue 26 names."""
    return list(dict.fromkeys(list(getattr(sketch, "KINDS", ())) + ["gaussian", "rademacher", "kronecker"]))


def accepted_kinds() -> List[str]:
    kinds = []
    for kind in candidate_kinds():
        try:
            tk.Projection(256, kind, seed=0)
        except (ValueError, NotImplementedError) as error:
            print(f"note: kind {kind!r} skipped: tk.Projection refuses it ({type(error).__name__}: {error})")
            continue
        kinds.append(kind)
    return kinds


# ----------------------------------------------------------------------------- models


def small_cnn(n: int):
    torch.manual_seed(0)
    x = demo.load_digits_split(0)[0][:n]
    return "digits CNN", demo.digits_cnn(), x


def resnet18(n: int):
    from torchvision.models import resnet18 as build

    torch.manual_seed(0)
    return "resnet18 (32x32)", build(num_classes=10), torch.randn(n, 3, 32, 32)


def small_bert(n: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=16, num_labels=3)
    ids = torch.randint(0, 100, (n, 12))
    mask = torch.ones(n, 12, dtype=torch.int64)
    mask[: n // 2, 9:] = 0  # half the samples padded
    return "small BERT", transformers.BertForSequenceClassification(config), {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------- sketches


def sketched_features(model: nn.Module, batch, G: torch.Tensor, kind: str, dims: Sequence[int], seed: int,
                      output: str = "first", idx=None) -> Dict[int, torch.Tensor]:
    """{dim: the [n, dim] features of tk.Projection(dim, kind, seed)}."""
    if kind in DENSE:
        top = max(dims)
        index = tk.params.resolve_idx(model, idx)
        full = tk.Projection(top, kind, seed).project(G, index)
        return {d: full[:, :d] * math.sqrt(top / d) for d in dims}
    return {d: tk.features(model, [batch], idx, output=output, progress=False,
                           projection=tk.Projection(d, kind, seed)) for d in dims}


def kernel_error(model_setup, n: int, kinds: Sequence[str], dims: Sequence[int], seeds: int) -> List[dict]:
    name, model, batch = model_setup(n)
    model.eval()
    start = time.perf_counter()
    G = tk.features(model, [batch], progress=False)
    K = (G.double() @ G.double().T) if G.shape[1] < 1_000_000 else (G @ G.T).double()
    exact_s = time.perf_counter() - start
    norm, trace = float(K.norm()), float(K.diagonal().sum())
    rows = []
    for kind in kinds:
        start = time.perf_counter()
        errors: Dict[int, List[float]] = {d: [] for d in dims}
        for seed in range(seeds):
            for d, F in sketched_features(model, batch, G, kind, dims, seed).items():
                F = F.double()
                errors[d].append(float((F @ F.T - K).norm()) / norm)
        elapsed = time.perf_counter() - start
        for d in dims:
            rows.append({"model": name, "p": G.shape[1], "n": n, "kind": kind, "dim": d, "errors": errors[d],
                         "mean": statistics.fmean(errors[d]),
                         "std": statistics.stdev(errors[d]) if len(errors[d]) > 1 else 0.0,
                         "gaussian_prediction": math.sqrt((1 + (trace / norm) ** 2) / d),
                         "seconds_all_dims_seeds": elapsed, "exact_s": exact_s})
        print(f"{name}: {kind} done in {elapsed:.1f} s", flush=True)
    return rows


# ----------------------------------------------------------------------------- the demo's task


def ridge_accuracy(kinds: Sequence[str], sizes: Sequence[int], seeds: int, pretrain_epochs: int) -> List[dict]:
    shift = demo.make_shift(0)
    torch.manual_seed(0)
    model = demo.digits_cnn()
    demo.pretrain_rotation(model[:-1], shift.all_images, pretrain_epochs, 0, "cpu", False)
    torch.manual_seed(1000)
    model[-1] = nn.Linear(64, 10)  # the fresh random head, as demo.run
    model.eval()
    sets = ("train", "val", "test", "ood", "corrupted")
    x = torch.cat([getattr(shift, s)[0] for s in sets])
    bounds = torch.tensor([0] + [len(getattr(shift, s)[1]) for s in sets]).cumsum(0).tolist()
    total = sum(p.numel() for p in model.parameters())

    def score(F: torch.Tensor) -> Dict[str, float]:
        F = F.double()
        parts = {s: F[bounds[i]:bounds[i + 1]] for i, s in enumerate(sets)}
        kernels = {s: parts[s] @ parts["train"].T for s in sets}
        kr = tk.KernelRidge(betas="auto", beta_scale="trace", progress=False)
        kr.fit(kernels["train"], shift.train[1], K_val=kernels["val"], Y_val=shift.val[1])
        return {s: kr.score(kernels[s], getattr(shift, s)[1]) for s in ("test", "ood", "corrupted")}

    rows = []

    def record(method: str, p: int, seed: int, F: torch.Tensor, seconds: float) -> None:
        rows.append({"method": method, "p": p, "seed": seed, "seconds": seconds, **score(F)})

    start = time.perf_counter()
    G = tk.features(model, [x], output="sum", progress=False)
    exact_s = time.perf_counter() - start
    record("exact (every parameter)", total, 0, G, exact_s)
    for seed in range(seeds):
        for p in sizes:
            start = time.perf_counter()
            idx = tk.subsample(model, p, seed=seed)
            record("uniform subsample", p, seed, tk.features(model, [x], idx, output="sum", progress=False),
                   time.perf_counter() - start)
            for kind in kinds:
                start = time.perf_counter()
                F = sketched_features(model, x, G, kind, (p,), seed, output="sum")[p]
                # a dense kind projects the exact G here: its time is G's plus the projection's,
                # what tk.features(projection=) spends
                seconds = time.perf_counter() - start + (exact_s if kind in DENSE else 0.0)
                record(f"projection, {kind}", p, seed, F, seconds)
    print(f"kernel ridge: {len(rows)} fits", flush=True)
    return rows


# ----------------------------------------------------------------------------- output


def _mean_std(values: Sequence[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {spread:.3f}"


def tables(errors: List[dict], ridge: List[dict], seeds: int, ridge_seeds: int) -> str:
    lines = [f"Relative error ||K~ - K||_F / ||K||_F (mean ± std over {seeds} seeds); the Gaussian sketch's "
             "expected error sqrt((1 + (tr K / ||K||_F)^2) / dim)", "",
             "| model | p | n | kind | dim | relative error | Gaussian prediction |", "|---|---|---|---|---|---|---|"]
    for r in errors:
        lines.append(f"| {r['model']} | {r['p']:,} | {r['n']} | {r['kind']} | {r['dim']:,} | "
                     f"{r['mean']:.4f} ± {r['std']:.4f} | {r['gaussian_prediction']:.4f} |")
    lines += ["", f"Kernel ridge on the demo's shift (pNTK, accuracy mean ± std over {ridge_seeds} seeds of the "
              "subsample / projection)", "",
              "| features | p | ID test | OOD | OOD-corrupted | features time (s) |", "|---|---|---|---|---|---|"]
    groups: Dict[tuple, List[dict]] = {}
    for r in ridge:
        groups.setdefault((r["method"], r["p"]), []).append(r)
    for (method, p), rs in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        lines.append(f"| {method} | {p:,} | {_mean_std([r['test'] for r in rs])} | {_mean_std([r['ood'] for r in rs])} "
                     f"| {_mean_std([r['corrupted'] for r in rs])} | {statistics.fmean(r['seconds'] for r in rs):.2f} |")
    return "\n".join(lines)


def figure(errors: List[dict], ridge: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    models = list(dict.fromkeys(r["model"] for r in errors))
    markers = dict(zip(dict.fromkeys(r["kind"] for r in errors), "os^Dv"))
    for color, model in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], models):
        rows = [r for r in errors if r["model"] == model]
        for kind, marker in markers.items():
            rs = [r for r in rows if r["kind"] == kind]
            if rs:
                left.errorbar([r["dim"] for r in rs], [r["mean"] for r in rs], yerr=[r["std"] for r in rs],
                              marker=marker, color=color, linestyle="-", capsize=3, label=f"{model}, {kind}")
        gauss = [r for r in rows if r["kind"] == rows[0]["kind"]]
        left.plot([r["dim"] for r in gauss], [r["gaussian_prediction"] for r in gauss], color=color, linestyle=":",
                  marker="_", markersize=14)
    left.set(xscale="log", yscale="log", xlabel="dim", ylabel="||K~ - K||_F / ||K||_F",
             title="sketch error (dotted: Gaussian prediction ~ 1/sqrt(dim))")
    left.legend(fontsize=7)
    methods = list(dict.fromkeys(r["method"] for r in ridge if not r["method"].startswith("exact")))
    for method in methods:
        for key, style in (("test", "-"), ("ood", "--")):
            sizes = sorted({r["p"] for r in ridge if r["method"] == method})
            means = [statistics.fmean(r[key] for r in ridge if r["method"] == method and r["p"] == p) for p in sizes]
            right.plot(sizes, means, marker="o", linestyle=style, label=f"{method} ({'ID' if key == 'test' else 'OOD'})")
    exact = [r for r in ridge if r["method"].startswith("exact")][0]
    right.axhline(exact["test"], color="k", linestyle="-", linewidth=0.8, label="exact (ID)")
    right.axhline(exact["ood"], color="k", linestyle="--", linewidth=0.8, label="exact (OOD)")
    sizes = sorted({r["p"] for r in ridge if not r["method"].startswith("exact")})
    right.set(xscale="log", xlabel="p (features per sample)", ylabel="accuracy",
              title="kernel ridge on the demo's shift, equal p")
    right.set_xticks(sizes, [f"{p:,}" for p in sizes], minor=False)
    right.set_xticks([], minor=True)
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="< 1 min: small models, two dims, two seeds")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--resnet18-dims", default="256",
                        help="comma-separated; '' skips resnet18 (its 11.2M x dim hashes per seed dominate)")
    parser.add_argument("--ridge-seeds", type=int, default=3)
    parser.add_argument("--figure", default=str(Path(__file__).resolve().parents[1] / "docs/figures/sketch_accuracy.png"))
    parser.add_argument("--table", default=None, help="also write the markdown tables here")
    parser.add_argument("--json", default=None)
    parser.add_argument("--from-json", default=None, help="redraw the tables and figure of a previous --json run")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        seeds = len(saved["errors"][0]["errors"])
        print(tables(saved["errors"], saved["ridge"], seeds, len({r["seed"] for r in saved["ridge"]})))
        figure(saved["errors"], saved["ridge"], Path(args.figure))
        return 0
    kinds = accepted_kinds()
    started, cpu_started = time.perf_counter(), time.process_time()
    if args.quick:
        plan = [(small_cnn, (256, 1024)), (small_bert, (256, 1024))]
        n, seeds, ridge_sizes, ridge_seeds, epochs = 16, 2, (256,), 1, 1
        print("note: --quick skips resnet18")
    else:
        plan = [(small_cnn, DIMS), (small_bert, DIMS)]
        resnet_dims = tuple(int(d) for d in args.resnet18_dims.split(",") if d)
        if resnet_dims:
            plan.append((resnet18, resnet_dims))
        skipped = [d for d in DIMS if d not in resnet_dims]
        if skipped:
            print(f"note: resnet18 at dims {skipped} not run (--resnet18-dims): 11.2M x dim hashes per seed and kind")
        n, seeds, ridge_sizes, ridge_seeds = args.n, args.seeds, (256, 1024, 4096), args.ridge_seeds
        epochs = demo.Config().pretrain_epochs
    errors = [row for setup, dims in plan for row in kernel_error(setup, n, kinds, dims, seeds)]
    ridge = ridge_accuracy(kinds, ridge_sizes, ridge_seeds, epochs)
    text = tables(errors, ridge, seeds, ridge_seeds)
    elapsed = time.perf_counter() - started
    text += (f"\n\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}, {elapsed:.0f} s ({time.process_time() - cpu_started:.0f} s of CPU)"
             f"{' (--quick)' if args.quick else ''}")
    print(text)
    if args.table:
        Path(args.table).write_text(text + "\n")
    figure(errors, ridge, Path(args.figure))
    if args.json:
        Path(args.json).write_text(json.dumps({"errors": errors, "ridge": ridge, "seconds": elapsed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
