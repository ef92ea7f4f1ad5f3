"""`tangent-kernels demo tracking`: the eNTK of the demo CNN during fine-tuning.

The demo CNN (tangent_kernels.demo.digits_cnn) is pretrained without labels by rotation
prediction on all of scikit-learn's digits (tangent_kernels.demo.pretrain_rotation), given
a fresh 10-class head, and fine-tuned end to end with Adam and cross-entropy on the
training split (70/30 split). Every --every steps, ``tk.tracking.KernelTracker`` takes the
pNTK (``output="sum"``, a --params subsample) of a fixed probe set of training images and
records its kernel distance to the first K, its centered alignment with the probe's
labels and its top eigenvalues; the network's test accuracy is recorded beside them.

Prints the table (one row per record) and writes under --out: tracking.json (the
records per seed, sizes, timings, versions) and tracking.png (the statistics vs step).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from .demo import accuracy, check_demo_arguments, digits_cnn, load_digits_split, pretrain_rotation
from .params import subsample
from .tracking import KernelTracker

TOP = 3  # eigenvalues shown per record


def run(seed: int, *, pretrain_epochs: int, steps: int, every: int, probe_size: int, params: int, device: str,
        show: bool) -> Dict:
    """One seed: pretraining, then fine-tuning with the tracker; returns its records."""
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    times: Dict[str, float] = {}
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = digits_cnn().to(device)
    pretrain_rotation(model[:-1], torch.cat([x_tr, x_te]), pretrain_epochs, seed, device, show)
    torch.manual_seed(seed + 1000)
    model[-1] = nn.Linear(64, 10).to(device)  # the fresh head fine-tuning starts from
    times["pretraining"] = round(time.perf_counter() - start, 3)

    total = sum(p.numel() for p in model.parameters())
    idx = subsample(model, params, seed=seed) if params < total else None
    probe_x, probe_y = x_tr[:probe_size].to(device), y_tr[:probe_size]
    # Centered: the uncentered alignment of any PSD kernel with one-hot labels is inflated
    # by K's constant component (tk.analysis.alignment).
    tracker = KernelTracker(model, [probe_x], idx, every=every, targets=probe_y, top=TOP, centered=True,
                            output="sum")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    x, y = x_tr.to(device), y_tr.to(device)
    batches: List[torch.Tensor] = []
    test_accuracy, kernel_seconds = [], 0.0
    start = time.perf_counter()
    for t in range(steps + 1):
        # K is taken before step t's update: the record labelled 0 is the pretrained network's kernel.
        tick = time.perf_counter()
        record = tracker.step()
        kernel_seconds += time.perf_counter() - tick
        if record is not None:
            test_accuracy.append(accuracy(model, (x_te, y_te), device))
        if t == steps:
            break
        if not batches:
            batches = list(torch.randperm(len(y), generator=g).split(32))
        batch = batches.pop().to(device)
        model.train()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    times["fine-tuning with tracking"] = round(time.perf_counter() - start, 3)
    times["kernel records"] = round(kernel_seconds, 3)
    history = tracker.history()
    return {"seed": seed, "params_total": total, "params_sampled": total if idx is None else len(idx),
            "sizes": {"train": len(y_tr), "test": len(y_te), "probe": len(probe_y)},
            "step": history["step"], "distance": history["distance"], "alignment_centered": history["alignment"],
            "top_eigenvalues": history["top_eigenvalues"].tolist(),
            "effective_dimension": history["effective_dimension"], "trace": history["trace"],
            "test_accuracy": test_accuracy, "times_s": times}


def table(result: Dict) -> str:
    head = (f"{'step':>6}{'distance':>10}{'alignment':>11}" + "".join(f"{f'lambda_{i + 1}':>11}" for i in range(TOP))
            + f"{'eff. dim':>10}{'test acc':>10}")
    lines = [head]
    for i, step in enumerate(result["step"]):
        lines.append(f"{step:>6d}{result['distance'][i]:>10.4f}{result['alignment_centered'][i]:>11.4f}"
                     + "".join(f"{v:>11.4g}" for v in result["top_eigenvalues"][i])
                     + f"{result['effective_dimension'][i]:>10.2f}{result['test_accuracy'][i]:>10.3f}")
    return "\n".join(lines)


def plot(runs: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
    for r in runs:
        label = f"seed {r['seed']}"
        axes[0].plot(r["step"], r["distance"], ".-", label=label)
        axes[1].plot(r["step"], r["alignment_centered"], ".-", label=label)
        eig = torch.tensor(r["top_eigenvalues"])
        for i in range(eig.shape[1]):
            axes[2].semilogy(r["step"], eig[:, i], ".-", color=f"C{i}", alpha=1.0 if r is runs[0] else 0.4,
                             label=f"lambda_{i + 1}" if r is runs[0] else None)
        axes[3].plot(r["step"], r["test_accuracy"], ".-", label=label)
    titles = ("kernel distance to K at step 0", "centered alignment with labels", f"top {TOP} eigenvalues of K",
              "network test accuracy")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    if len(runs) > 1:
        axes[0].legend(fontsize=8)
    first = runs[0]
    fig.suptitle(f"pNTK of the digits CNN on {first['sizes']['probe']} training images during fine-tuning "
                 f"(p = {first['params_sampled']:,} of {first['params_total']:,} parameters)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    from .version import __version__

    start = time.perf_counter()
    check_demo_arguments(args)
    # --quick: sizes for tests (seconds); otherwise the docs' run (docs/kernel.md).
    cfg = (dict(pretrain_epochs=1, steps=20, every=10, probe_size=32) if args.quick
           else dict(pretrain_epochs=10, steps=300, every=20, probe_size=128))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seed:
        print(f"seed {seed}: fine-tuning with the eNTK tracked on {args.device} ...", flush=True)
        runs.append(run(seed, params=args.params, device=args.device, show=not args.no_progress, **cfg))
    wall = time.perf_counter() - start
    plot(runs, out / "tracking.png")
    report = {"config": {**cfg, "params": args.params, "quick": bool(args.quick), "seeds": list(args.seed)},
              "device": args.device,
              "versions": {"tangent_kernels": __version__, "torch": torch.__version__,
                           "python": platform.python_version()},
              "runs": runs, "figures": ["tracking.png"], "wall_time_s": round(wall, 1)}
    (out / "tracking.json").write_text(json.dumps(report, indent=1))
    for r in runs:
        records = len(r["step"])
        print(f"seed {r['seed']}: pNTK (output='sum', p = {r['params_sampled']:,} of {r['params_total']:,} parameters) "
              f"of {r['sizes']['probe']} training images, every {cfg['every']} of {cfg['steps']} Adam steps; "
              f"{records} records in {r['times_s']['kernel records']:.1f} s")
        print(table(r))
    print(f"wrote {out / 'tracking.json'} and tracking.png; total time {wall:.1f} s")
    return 0
