"""The demo: is a linearized network (eNTK kernel regression) more robust out of
distribution than fine-tuning? A miniature of the seeds' experiment on scikit-learn's
digits, run end to end on a laptop CPU (or a GPU when there is one).

Data (documented in docs/demo.md): each digit class is split into two *style*
clusters by k-means on its pixels (fixed seed), as BREEDS builds subpopulation shifts.
In-distribution (ID) = one cluster per class (split into train / val / test); OOD =
the other cluster. A second OOD set corrupts the ID test images (a random rotation of
up to +-20 degrees and Gaussian pixel noise).

Network: a small CNN *pretrained without labels* on all images (both subpopulations)
by rotation prediction (0/90/180/270 degrees), like a self-supervised backbone that has
seen unlabeled data of both kinds; then a fresh random 10-class head.

Methods, all trained on ID train and selected on ID val:
- LP: linear probe (head only, backbone frozen);
- FT: fine-tuning of everything;
- LP-FT: fine-tuning started from the linear probe's head;
- eNTK: kernel ridge regression on the eNTK of the pretrained network with its fresh
  head (its linearization), with a parameter subsample, for the pNTK (output="sum")
  and the first logit (output="first"), solved by the seed's Nesterov iteration with
  betas="auto" and early stopping on ID val, and exactly by the default solver.

Prints a table (method, ID / OOD / OOD-corrupted accuracy) and writes under --out:
results.json (accuracies, seeds, versions, device, timings of every phase),
nesterov_accuracy.png (ID val and OOD accuracy along the Nesterov iterations per beta),
id_vs_ood.png (the methods' ID vs OOD accuracy) and spectrum.png (the eNTK's
eigenvalues). Several --seed values run the experiment for each and print the mean
and standard deviation.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import platform
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .analysis import alignment, spectrum
from .pipeline import gram
from .params import subsample
from .solvers import ConvergenceWarning, KernelRidge, solve

ROTATIONS = 4  # the pretext task: which of 0/90/180/270 degrees an image was turned


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """A small CNN for 1 x 8 x 8 digit images (22,954 parameters); ``[:-1]`` is its
    backbone (64 features), ``[-1]`` its head."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def load_digits_split(seed: int, test_fraction: float = 0.3):
    """Digits as float tensors [n, 1, 8, 8] in [0, 1] and int64 labels, shuffled and split."""
    x, y = _digits()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _digits() -> Tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(digits.target, dtype=torch.int64)


# ----------------------------------------------------------------------------- data


@dataclass
class Shift:
    """The subpopulation shift: ID train/val/test, OOD, OOD-corrupted (inputs, labels)."""

    train: Tuple[torch.Tensor, torch.Tensor]
    val: Tuple[torch.Tensor, torch.Tensor]
    test: Tuple[torch.Tensor, torch.Tensor]
    ood: Tuple[torch.Tensor, torch.Tensor]
    corrupted: Tuple[torch.Tensor, torch.Tensor]
    all_images: torch.Tensor

    def sizes(self) -> Dict[str, int]:
        return {name: len(getattr(self, name)[1]) for name in ("train", "val", "test", "ood", "corrupted")}


def corrupt(x: torch.Tensor, seed: int, max_degrees: float = 20.0, noise: float = 0.1) -> torch.Tensor:
    """Each image turned by a random angle in [-max_degrees, max_degrees], plus noise."""
    g = torch.Generator().manual_seed(seed)
    angles = (torch.rand(len(x), generator=g) * 2 - 1) * math.radians(max_degrees)
    cos, sin = torch.cos(angles), torch.sin(angles)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    turned = nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    return (turned + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)


def make_shift(seed: int, fractions=(0.6, 0.2, 0.2)) -> Shift:
    """Per class, k-means (k=2) on the pixels; the larger cluster is ID (enough to train
    on), the smaller OOD. ID is split into train/val/test by ``fractions``."""
    from sklearn.cluster import KMeans

    x, y = _digits()
    g = torch.Generator().manual_seed(seed)
    parts: Dict[str, List[torch.Tensor]] = {"train": [], "val": [], "test": [], "ood": []}
    for c in range(10):
        members = torch.nonzero(y == c).squeeze(1)
        clusters = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(x[members].reshape(len(members), -1).numpy())
        clusters = torch.from_numpy(clusters)
        id_cluster = int(clusters.float().mean() >= 0.5)  # the more populous one (ties: cluster 1)
        id_members = members[clusters == id_cluster]
        id_members = id_members[torch.randperm(len(id_members), generator=g)]
        n_train = int(round(fractions[0] * len(id_members)))
        n_val = int(round(fractions[1] * len(id_members)))
        parts["train"].append(id_members[:n_train])
        parts["val"].append(id_members[n_train : n_train + n_val])
        parts["test"].append(id_members[n_train + n_val :])
        parts["ood"].append(members[clusters != id_cluster])
    pick = {name: torch.cat(rows) for name, rows in parts.items()}
    split = {name: (x[rows], y[rows]) for name, rows in pick.items()}
    test_x, test_y = split["test"]
    return Shift(split["train"], split["val"], split["test"], split["ood"],
                 (corrupt(test_x, seed + 1), test_y), x)


# ----------------------------------------------------------------------------- training


def _progress(iterable, desc: str, enabled: bool, total: Optional[int] = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=None if enabled else True, leave=False)


def pretrain_rotation(backbone: nn.Module, images: torch.Tensor, epochs: int, seed: int, device, show: bool) -> float:
    """Self-supervised pretraining: predict which of 4 rotations was applied. Returns the
    final pretext accuracy (on the training images: a sanity check, not a result)."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(64, ROTATIONS).to(device)
    net = nn.Sequential(backbone, head)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)]).to(device)
    labels = torch.arange(ROTATIONS).repeat_interleave(len(images)).to(device)
    net.train()
    for _ in _progress(range(epochs), "pretraining (rotations)", show):
        for batch in torch.randperm(len(labels), generator=g).split(128):
            batch = batch.to(device)
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(rotated[batch]), labels[batch]).backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        return float((net(rotated).argmax(1) == labels).float().mean())


def accuracy(model: nn.Module, data: Tuple[torch.Tensor, torch.Tensor], device) -> float:
    x, y = data
    model.eval()
    with torch.no_grad():
        return float((model(x.to(device)).argmax(1).cpu() == y).float().mean())


def train_supervised(model: nn.Module, params, shift: Shift, epochs: int, lr: float, seed: int, device,
                     desc: str, show: bool) -> nn.Module:
    """Adam on ID train for ``epochs``; returns the model at the epoch with the best ID
    val accuracy (model selection on ID val, as for every method)."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(params, lr=lr)
    x, y = (t.to(device) for t in shift.train)
    best, best_state = -1.0, copy.deepcopy(model.state_dict())
    for _ in _progress(range(epochs), desc, show):
        model.train()
        for batch in torch.randperm(len(y), generator=g).split(32):
            batch = batch.to(device)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        val = accuracy(model, shift.val, device)
        if val > best:
            best, best_state = val, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval()


def linear_probe(pretrained: nn.Module, shift: Shift, cfg: "Config", seed: int, device, show: bool) -> nn.Module:
    model = copy.deepcopy(pretrained)
    for p in model[:-1].parameters():
        p.requires_grad_(False)
    model = train_supervised(model, model[-1].parameters(), shift, cfg.lp_epochs, 1e-2, seed, device, "LP", show)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def fine_tune(start: nn.Module, shift: Shift, cfg: "Config", seed: int, device, desc: str, show: bool) -> nn.Module:
    model = copy.deepcopy(start)
    return train_supervised(model, model.parameters(), shift, cfg.ft_epochs, 1e-3, seed, device, desc, show)


# ----------------------------------------------------------------------------- eNTK


def entk_kernels(model: nn.Module, shift: Shift, idx, output: str, device, show: bool) -> Dict[str, torch.Tensor]:
    """K(train, train) and K(set, train) for every evaluation set."""
    batches = lambda data: data[0].to(device).split(256)  # noqa: E731
    train = batches(shift.train)
    kernels = {"train": gram(model, train, idx, output=output, progress=show)}
    for name in ("val", "test", "ood", "corrupted"):
        kernels[name] = gram(model, batches(getattr(shift, name)), idx, train, output=output, progress=show)
    return kernels


def nesterov_trajectory(kernels, shift: Shift, betas: Sequence[float], scale: float,
                        checkpoints: Sequence[int]) -> Dict:
    """ID val and OOD accuracy of the Nesterov iterate after t steps, for each beta and
    t in ``checkpoints`` (each a fresh, deterministic run of t steps: the t-th iterate).
    ``betas`` are relative to ``scale`` (mean diag K), as KernelRidge's beta_scale="trace"
    reports them; the curves are keyed by the relative beta."""
    y = shift.train[1]
    keys = [f"{b:.3g}" for b in betas]
    curves = {key: {"iteration": list(checkpoints), "val": [], "ood": []} for key in keys}
    for t in checkpoints:
        with warnings.catch_warnings():  # stopping after t steps is the point here, not a failure
            warnings.simplefilter("ignore", ConvergenceWarning)
            alphas = solve(kernels["train"], y, [b * scale for b in betas], solver="nesterov", max_iter=t,
                           tol=0.0, n_classes=10)
        for key, alpha in zip(keys, alphas):
            for name in ("val", "ood"):
                pred = (kernels[name].to(alpha.dtype) @ alpha).argmax(1).cpu()
                curves[key][name].append(float((pred == getattr(shift, name)[1]).float().mean()))
    return curves


# ----------------------------------------------------------------------------- the experiment


@dataclass
class Config:
    pretrain_epochs: int = 30
    lp_epochs: int = 60
    ft_epochs: int = 40
    params: int = 10_000
    nesterov_iters: int = 1000

    @classmethod
    def quick(cls, params: int) -> "Config":
        return cls(pretrain_epochs=3, lp_epochs=10, ft_epochs=4, params=min(params, 2_000), nesterov_iters=100)


@contextmanager
def _timed(times: Dict[str, float], phase: str):
    start = time.perf_counter()
    yield
    times[phase] = round(time.perf_counter() - start, 3)


SETS = ("test", "ood", "corrupted")


def run(seed: int, cfg: Config, device: str, show: bool = True) -> Dict:
    """One seed of the experiment; returns everything results.json records for it."""
    torch.manual_seed(seed)
    times: Dict[str, float] = {}
    with _timed(times, "data"):
        shift = make_shift(seed)
    with _timed(times, "pretraining"):
        torch.manual_seed(seed)
        pretrained = digits_cnn().to(device)
        pretext_accuracy = pretrain_rotation(pretrained[:-1], shift.all_images, cfg.pretrain_epochs, seed, device, show)
        torch.manual_seed(seed + 1000)
        pretrained[-1] = nn.Linear(64, 10).to(device)  # the fresh random head
    results: Dict[str, Dict[str, float]] = {}

    def record(method: str, model: nn.Module) -> None:
        results[method] = {name: accuracy(model, getattr(shift, name), device) for name in SETS}

    with _timed(times, "LP"):
        lp = linear_probe(pretrained, shift, cfg, seed, device, show)
    record("LP", lp)
    with _timed(times, "FT"):
        record("FT", fine_tune(pretrained, shift, cfg, seed, device, "FT", show))
    with _timed(times, "LP-FT"):
        record("LP-FT", fine_tune(lp, shift, cfg, seed, device, "LP-FT", show))

    total = sum(p.numel() for p in pretrained.parameters())
    idx = subsample(pretrained, min(cfg.params, total), seed=seed)
    extra: Dict[str, Dict] = {}
    y = shift.train[1]
    for output in ("sum", "first"):
        label = "pNTK" if output == "sum" else "eNTK first logit"
        with _timed(times, f"{label}: Gram matrices"):
            kernels = entk_kernels(pretrained, shift, idx, output, device, show)
        for early in (True, False):
            # The seed's Nesterov with early stopping, and the converged kernel ridge solution
            # from the default solver (what Nesterov without early stopping approaches).
            method = f"{label} ({'Nesterov, early stopping' if early else 'kernel ridge, default solver'})"
            with _timed(times, f"{method}: solve"):
                options = dict(solver="nesterov", max_iter=cfg.nesterov_iters) if early else {}
                kr = KernelRidge(betas="auto", beta_scale="trace", progress=None if show else False,  # None: a terminal
                                 **options)
                kr.fit(kernels["train"], y, K_val=kernels["val"], Y_val=shift.val[1])
            results[method] = {name: kr.score(kernels[name], getattr(shift, name)[1]) for name in SETS}
            extra[method] = {"best_beta": kr.best_beta_, "n_iter": int(kr.n_iter_[kr.best_index_])}
        if output == "sum":
            spec = spectrum(kernels["train"])
            betas = [kr.best_beta_ * f for f in (0.01, 1.0, 100.0)]
            checkpoints = sorted({int(round(v)) for v in torch.logspace(0, math.log10(cfg.nesterov_iters), 12).tolist()})
            with _timed(times, "pNTK: Nesterov trajectories"):
                trajectory = nesterov_trajectory(kernels, shift, betas, kr.beta_scale_, checkpoints)
            kernel_stats = {
                "beta_scale": kr.beta_scale_,  # mean diag K: betas in results.json are relative to it
                "eigenvalues": spec.eigenvalues.tolist(),
                "effective_dimension": spec.effective_dimension,
                "alignment_centered": alignment(kernels["train"], y, centered=True),
            }
    return {
        "seed": seed,
        "sizes": shift.sizes(),
        "params_sampled": len(idx),
        "params_total": total,
        "pretext_accuracy": pretext_accuracy,
        "accuracy": results,
        "entk": extra,
        "pntk_kernel": kernel_stats,
        "nesterov_trajectory": trajectory,
        "times_s": times,
    }


# ----------------------------------------------------------------------------- output


def _table(rows: Dict[str, Dict[str, str]]) -> str:
    width = max(len(m) for m in rows) + 2
    lines = [f"{'method':<{width}}{'ID acc':>16}{'OOD acc':>16}{'OOD-corrupted':>16}"]
    for method, cells in rows.items():
        lines.append(f"{method:<{width}}" + "".join(f"{cells[name]:>16}" for name in SETS))
    return "\n".join(lines)


def summarize(runs: List[Dict]) -> Tuple[Dict[str, Dict[str, Dict[str, float]]], str]:
    """Mean and std over seeds of every method's accuracies, and the printed table."""
    methods = list(runs[0]["accuracy"])
    summary, rows = {}, {}
    for method in methods:
        summary[method], rows[method] = {}, {}
        for name in SETS:
            values = torch.tensor([r["accuracy"][method][name] for r in runs], dtype=torch.float64)
            mean, std = float(values.mean()), float(values.std()) if len(values) > 1 else 0.0
            summary[method][name] = {"mean": mean, "std": std}
            rows[method][name] = f"{mean:.3f}" + (f" ± {std:.3f}" if len(runs) > 1 else "")
    return summary, _table(rows)


def plot(first: Dict, out: Path) -> List[str]:
    """The three figures of one seed's run; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for beta, curve in first["nesterov_trajectory"].items():
        for ax, key, title in ((axes[0], "val", "ID validation"), (axes[1], "ood", "OOD")):
            ax.plot(curve["iteration"], curve[key], marker=".", label=f"beta = {beta} x mean diag K")
            ax.set_title(f"pNTK Nesterov iterations: {title}")
            ax.set_xscale("log")
            ax.set_xlabel("iteration")
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "nesterov_accuracy.png", dpi=110)
    plt.close(fig)
    written.append("nesterov_accuracy.png")

    fig, ax = plt.subplots(figsize=(7.5, 4))
    markers = "osD^v<>p*h"
    for k, (method, acc) in enumerate(first["accuracy"].items()):
        ax.scatter(acc["test"], acc["ood"], s=40, marker=markers[k % len(markers)], label=method, alpha=0.8)
    ax.set_xlabel("ID test accuracy")
    ax.set_ylabel("OOD accuracy")
    ax.set_title(f"ID vs OOD accuracy (seed {first['seed']})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(out / "id_vs_ood.png", dpi=110)
    plt.close(fig)
    written.append("id_vs_ood.png")

    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    eig = torch.tensor(first["pntk_kernel"]["eigenvalues"]).clamp_min(1e-12)
    ax.loglog(torch.arange(1, len(eig) + 1), eig)
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"pNTK spectrum (effective dim {first['pntk_kernel']['effective_dimension']:.1f})")
    fig.tight_layout()
    fig.savefig(out / "spectrum.png", dpi=110)
    plt.close(fig)
    written.append("spectrum.png")
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="tangent_kernels_demo", help="output folder (default ./tangent_kernels_demo/)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds (default 0)")
    parser.add_argument("--params", type=int, default=10_000, help="eNTK parameter subsample size (default 10000)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:1, ... (default: cuda when there is one, else cpu)")
    parser.add_argument("--quick", action="store_true", help="a small, fast run (for tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_demo_arguments(args: argparse.Namespace) -> None:
    """What every demo experiment needs (shift, lookahead, tracking), said before any work."""
    missing = [name for name in ("sklearn", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"the demo needs {' and '.join(missing)} (scikit-learn's digits, the figures): "
                          "pip install 'tangent-kernels[demo]'")
    if args.params < 1:
        raise ValueError(f"--params must be >= 1; got {args.params}")


def main(args: argparse.Namespace) -> int:
    from .version import __version__

    start = time.perf_counter()
    check_demo_arguments(args)
    cfg = Config.quick(args.params) if args.quick else Config(params=args.params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seed:
        print(f"seed {seed}: running on {args.device} ...", flush=True)
        runs.append(run(seed, cfg, args.device, show=not args.no_progress))
    summary, table = summarize(runs)
    figures = plot(runs[0], out)
    wall = time.perf_counter() - start
    report = {
        "config": {**cfg.__dict__, "quick": bool(args.quick), "seeds": list(args.seed)},
        "device": args.device,
        "versions": {"tangent_kernels": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "summary": summary,
        "runs": runs,
        "figures": figures,
        "wall_time_s": round(wall, 1),
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    first = runs[0]
    print(f"digits, subpopulation shift: {first['sizes']} (ID train/val/test, OOD, OOD-corrupted)")
    print(f"pretrained CNN ({first['params_total']:,} parameters, rotation pretext accuracy "
          f"{first['pretext_accuracy']:.3f}); eNTK with p = {first['params_sampled']:,} sampled parameters")
    print(table if len(runs) == 1 else f"mean ± std over seeds {list(args.seed)}:\n{table}")
    print(f"wrote {out / 'results.json'} and {', '.join(figures)}; total time {wall:.1f} s")
    return 0
