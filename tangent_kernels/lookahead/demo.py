"""`tangent-kernels demo lookahead`: look-ahead active learning on scikit-learn's digits.

The demo CNN (tangent_kernels.demo.digits_cnn) is trained with square loss on a few
random labelled digits of the training split (70/30 split); then each strategy runs
rounds of acquisitions from the rest of the training split with
``tk.lookahead.run_rounds``: look-ahead (MLMOC over the pNTK, E = the pool), margin
sampling of the kernel model, and random. The network is not retrained between rounds
(the paper's "sequential" mode): every strategy updates the same kernel model with
``LookAhead.add``, and the curve is that kernel model's test accuracy.

Prints the accuracy table (mean over --seed values) and writes under --out:
lookahead.json (curves per seed, picks, sizes, timings, versions) and lookahead.png
(test accuracy vs number of labels).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from ..demo import check_demo_arguments, digits_cnn, load_digits_split
from ..params import subsample
from .loop import run_rounds

STRATEGIES = ("look-ahead", "margin", "random")


def train_initial(X: torch.Tensor, y: torch.Tensor, seed: int, steps: int) -> nn.Module:
    """The demo CNN trained with square loss on one-hot targets (the loss whose
    linearization is the kernel regression the look-ahead uses)."""
    torch.manual_seed(seed)
    model = digits_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    target = nn.functional.one_hot(y, 10).float()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), target).backward()
        opt.step()
    return model.eval()


def run(seed: int, *, start: int, rounds: int, per_round: int, params: int, steps: int, device: str,
        pool_size: Optional[int] = None) -> Dict:
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    order = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(seed))
    L0, pool = order[:start], order[start:][:pool_size]
    model = train_initial(x_tr[L0], y_tr[L0], seed, steps).to(device)
    total = sum(p.numel() for p in model.parameters())
    idx = subsample(model, params, seed=seed) if params < total else None
    result = {"seed": seed, "params_total": total, "params_sampled": min(params, total),
              "sizes": {"initial": start, "pool": len(pool), "test": len(y_te)}, "curves": {}, "picked": {},
              "network_accuracy": None, "seconds": {}}
    for strategy in STRATEGIES:
        t = time.perf_counter()
        h = run_rounds(model, (x_tr[L0], y_tr[L0]), (x_tr[pool], y_tr[pool]), test=(x_te, y_te),
                       strategy=strategy, rounds=rounds, per_round=per_round, idx=idx, output="sum",
                       precision="fp32", beta=1e-3, device=device, seed=seed)
        result["seconds"][strategy] = round(time.perf_counter() - t, 2)
        result["curves"][strategy] = h.accuracy
        result["picked"][strategy] = [pool[p].tolist() for p in h.picked]  # indices into the training split
        result["labels"] = h.labelled
        result["network_accuracy"] = h.network_accuracy[0]
    return result


def table(runs: List[Dict]) -> str:
    labels = runs[0]["labels"]
    lines = [f"{'labels':<12}" + "".join(f"{n:>7d}" for n in labels)]
    for s in STRATEGIES:
        mean = [statistics.mean(r["curves"][s][i] for r in runs) for i in range(len(labels))]
        lines.append(f"{s:<12}" + "".join(f"{a:7.3f}" for a in mean))
    return "\n".join(lines)


def plot(runs: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = runs[0]["labels"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for s, style in zip(STRATEGIES, ("o-", "s--", "^:")):
        curves = torch.tensor([r["curves"][s] for r in runs])
        mean = curves.mean(0)
        line, = ax.plot(labels, mean, style, label=s)
        if len(runs) > 1:
            ax.fill_between(labels, curves.min(0).values, curves.max(0).values, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("labelled digits")
    ax.set_ylabel("test accuracy (kernel model)")
    seeds = ", ".join(str(r["seed"]) for r in runs)
    ax.set_title(f"digits, pNTK look-ahead (seed{'s' if len(runs) > 1 else ''} {seeds}"
                 f"{'; band: min-max' if len(runs) > 1 else ''})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    from ..version import __version__

    start = time.perf_counter()
    check_demo_arguments(args)
    # --quick: sizes for tests (seconds); otherwise the docs' run (docs/lookahead.md).
    cfg = (dict(start=20, rounds=2, per_round=10, steps=50, pool_size=300) if args.quick
           else dict(start=40, rounds=6, per_round=20, steps=300, pool_size=None))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seed:
        print(f"seed {seed}: look-ahead active learning on {args.device} ...", flush=True)
        runs.append(run(seed, params=args.params, device=args.device, **cfg))
    wall = time.perf_counter() - start
    plot(runs, out / "lookahead.png")
    report = {"config": {**cfg, "params": args.params, "quick": bool(args.quick), "seeds": list(args.seed)},
              "device": args.device,
              "versions": {"tangent_kernels": __version__, "torch": torch.__version__,
                           "python": platform.python_version()},
              "runs": runs, "figures": ["lookahead.png"], "wall_time_s": round(wall, 1)}
    (out / "lookahead.json").write_text(json.dumps(report, indent=1))
    first = runs[0]
    print(f"digits: {first['sizes']['initial']} initial labels, {cfg['rounds']} rounds of {cfg['per_round']} from a "
          f"pool of {first['sizes']['pool']}, {first['sizes']['test']} test images; pNTK with "
          f"p = {first['params_sampled']:,} of {first['params_total']:,} parameters")
    print(f"test accuracy of the kernel model{'' if len(runs) == 1 else f', mean over seeds {list(args.seed)}'}:")
    print(table(runs))
    print(f"wrote {out / 'lookahead.json'} and lookahead.png; total time {wall:.1f} s")
    return 0
