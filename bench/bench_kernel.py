"""The eNTK during training: repeated ``tk.Kernel.gram`` on a fixed probe set after SGD
steps, against a one-shot ``tk.gram`` per step and the training step itself over the same
samples, in one run (issue #22: target <= 2x a training step).

Every step: one SGD step (cross-entropy, forward + backward + update over the probe
samples: the floor), then K by the Kernel and K by tk.gram at the same weights (checked
equal before any time is reported). Medians over the steps after a warm-up.

    python bench/bench_kernel.py [--n 128] [--steps 20] [--threads 1] [--batch-size 0] [--test 64]
                                 [--no-bert] [--only NAME] [--split] [--profile] [--json out.json]

``--test 64``: also ``.cross(test, train)`` right after ``.gram(train)`` (train: the probe
set, kept by the Kernel) against ``.gram(test)`` alone and against the cross kernel with
nothing kept (a Kernel(keep=False)), at the same weights (target <= 1.5x ``.gram(test)``).

``--batch-size 0``: the probe set as one batch. ``--split``: also Kernel.gram with the
per-batch check replaced by a no-op (as bench/bench_verify.py does), a diagnostic of what
the check costs per call, never a mode: a run without the check is not trusted. ``--profile``: cProfile of the Kernel's
calls on the first model, the top entries by own time and by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import time

import torch
from torch import nn

import tangent_kernels as tk
from _common import commit
from tangent_kernels.persample.extractor import FeatureExtractor


def _bert():
    import transformers

    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64, num_labels=10,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def models(bert: bool = True):
    """(name, model, data(n, generator) -> a tensor or a dict of batched tensors, idx)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    yield "MLP 64-256-256-10, all parameters, pNTK", mlp, lambda n, g: torch.randn(n, 64, generator=g), None
    yield ("MLP, 5,000 sampled, pNTK", mlp, lambda n, g: torch.randn(n, 64, generator=g),
           tk.subsample(mlp, 5_000, seed=0))
    yield ("CNN 2 convs + linear, 8x8, all parameters, pNTK", cnn, lambda n, g: torch.randn(n, 1, 8, 8, generator=g),
           None)
    yield ("CNN, 5,000 sampled, pNTK", cnn, lambda n, g: torch.randn(n, 1, 8, 8, generator=g),
           tk.subsample(cnn, 5_000, seed=0))
    if bert:
        yield ("BERT 2x64, 16 tokens, all parameters, pNTK", _bert(),
               lambda n, g: {"input_ids": torch.randint(0, 1000, (n, 16), generator=g)}, None)


# --clock cpu: the process's CPU time (time.process_time) instead of wall time: on a shared
# machine under load, one thread's CPU time is what the work costs, the wall time is not.
NOW = time.perf_counter


def clock(fn):
    start = NOW()
    result = fn()
    return NOW() - start, result


def without_check(fn):
    original = FeatureExtractor._verify
    FeatureExtractor._verify = lambda self, batch, block, factors: True
    try:
        return fn()
    finally:
        FeatureExtractor._verify = original


def split(x, size: int) -> list:
    """Batches of ``size`` (0: one batch) of a tensor or a dict of batched tensors."""
    n = x["input_ids"].shape[0] if isinstance(x, dict) else x.shape[0]
    size = n if size <= 0 else size
    return [{k: v[i:i + size] for k, v in x.items()} if isinstance(x, dict) else x[i:i + size]
            for i in range(0, n, size)]


def logits(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.logits if hasattr(out, "logits") else out


def close_to(k, reference, what, step):
    if not (k - reference).abs().max() <= 1e-4 * reference.abs().max():
        raise AssertionError(f"{what} differs from tk.gram at step {step}")


def measure(model, data, idx, n: int, steps: int, batch_size: int, split_check: bool, test_n: int):
    """Per step: one SGD step over the probe set, then the Kernel's repeated .gram and a
    one-shot tk.gram at the same weights; with test_n, also .gram(test) alone (a Kernel that
    keeps nothing) and .cross(test, train) right after .gram(train) (train = the probe set)."""
    g = torch.Generator().manual_seed(1)
    x, y = data(n, g), torch.randint(0, 10, (n,), generator=g)
    loader = split(x, batch_size)
    labels = y.split(n if batch_size <= 0 else batch_size)
    test = split(data(test_n, g), batch_size) if test_n else None
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    kernel = tk.Kernel(model, idx, output="sum")
    alone = tk.Kernel(model, idx, output="sum", keep=False) if test is not None else None

    def train_step():
        model.train()
        for xb, yb in zip(loader, labels):
            loss = nn.functional.cross_entropy(logits(model, xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()

    names = ["train step", "Kernel.gram", "tk.gram"] + (["Kernel.gram without check"] if split_check else []) + \
        (["gram(test) alone", "cross after gram", "cross, nothing kept"] if test is not None else [])
    times = {name: [] for name in names}
    for step in range(steps + 2):  # the first two: warm-up (first-call setup, allocator)
        t = {"train step": clock(train_step)[0]}
        t["Kernel.gram"], k = clock(lambda: kernel.gram(loader, progress=False))
        t["tk.gram"], reference = clock(lambda: tk.gram(model, loader, idx, output="sum", progress=False))
        close_to(k, reference, "Kernel.gram", step)
        if split_check:
            if hasattr(kernel, "kept"):
                kernel.kept.clear()  # at the same weights the kept features would be reused
            t["Kernel.gram without check"] = clock(lambda: without_check(lambda: kernel.gram(loader,
                                                                                              progress=False)))[0]
        if test is not None:
            t["gram(test) alone"] = clock(lambda: alone.gram(test, progress=False))[0]
            hits = kernel.kept.hits
            t["cross after gram"], cross = clock(lambda: kernel.cross(test, loader, progress=False))
            assert kernel.kept.hits == hits + 1, "the train side was not reused"
            t["cross, nothing kept"], again = clock(lambda: alone.cross(test, loader, progress=False))
            close_to(cross, again, "Kernel.cross", step)
        if step >= 2:
            for name in names:
                times[name].append(t[name])
    assert kernel.rebuilds == 0
    return times, kernel, loader


def summary(ts):
    return statistics.median(ts), min(ts), max(ts)


def profile(kernel, loader, calls: int = 30) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        kernel.gram(loader, progress=False)
    profiler.disable()
    stats = pstats.Stats(profiler)
    print(f"\ncProfile of {calls} Kernel.gram calls (no weight change between them):")
    stats.sort_stats("tottime").print_stats(18)
    stats.sort_stats("cumulative").print_stats(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--test", type=int, default=0, help="also .cross(test, train) with this many test samples")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--split", action="store_true")
    parser.add_argument("--no-bert", action="store_true")
    parser.add_argument("--only", default=None, help="run the models whose name contains this")
    parser.add_argument("--json", default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global NOW
    NOW = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"commit {commit()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), load {os.getloadavg()[0]:.2f}, n = {args.n}, "
          f"{'one batch' if args.batch_size <= 0 else f'batches of {args.batch_size}'}, {args.steps} steps, "
          f"{args.clock} clock; "
          "median [min - max] ms, ratios of medians")
    rows = []
    for name, model, data, idx in models(bert=not args.no_bert):
        if args.only and args.only not in name:
            continue
        times, kernel, loader = measure(model, data, idx, args.n, args.steps, args.batch_size, args.split, args.test)
        t = {k: summary(v) for k, v in times.items()}
        step = t["train step"][0]
        row = dict(model=name, n=args.n, batch_size=args.batch_size, test=args.test, clock=args.clock,
                   **{k + " (s)": v for k, v in t.items()},
                   kernel_over_step=t["Kernel.gram"][0] / step, gram_over_step=t["tk.gram"][0] / step)
        print(f"{name}")
        for what, (median, low, high) in t.items():
            print(f"   {what:<26} {median * 1e3:8.2f} [{low * 1e3:.2f} - {high * 1e3:.2f}] ms"
                  + (f"  {median / step:5.2f}x step" if what != "train step" else ""))
        if args.test:
            row["cross_over_test"] = t["cross after gram"][0] / t["gram(test) alone"][0]
            row["nothing_kept_over_test"] = t["cross, nothing kept"][0] / t["gram(test) alone"][0]
            print(f"   cross after gram / gram(test) alone: {row['cross_over_test']:.2f}x "
                  f"(nothing kept: {row['nothing_kept_over_test']:.2f}x)")
        rows.append(row)
        if args.profile and len(rows) == 1:
            profile(kernel, loader)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(commit=commit(), torch=torch.__version__, threads=args.threads, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
