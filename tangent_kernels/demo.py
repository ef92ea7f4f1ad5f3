"""The demo: eNTK kernel regression on scikit-learn's digits, end to end.

A small CNN is trained for a few seconds on the training digits; its eNTK (one
output, a parameter subsample, as in the seed's method) is computed over the train
and test sets, and kernel ridge regression on one-hot labels is solved exactly with
``torch.linalg.solve``. Prints the test accuracy of the eNTK predictor next to the
network's own, and the time of every phase.

The full linearization-for-OOD experiment (subpopulation shift, LP/FT/LP-FT, the
Nesterov solver) is planned on top of this; this module is its foundation.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from typing import Dict

import torch
from torch import nn

from .engine import gram
from .params import subsample


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """A small CNN for 1 x 8 x 8 digit images (22,954 parameters)."""
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
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def train_briefly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seconds: float, seed: int) -> int:
    """Adam on cross-entropy for about ``seconds``; returns the number of epochs run."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    start, epochs = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for batch in torch.randperm(len(y), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        epochs += 1
    model.eval()
    return epochs


def kernel_ridge_predict(k_train: torch.Tensor, y: torch.Tensor, k_test: torch.Tensor, beta: float) -> torch.Tensor:
    """Exact kernel ridge regression on one-hot targets; beta is relative to mean(diag K)."""
    targets = nn.functional.one_hot(y).to(torch.float64)
    k = k_train.double()
    scale = k.diagonal().mean()
    alpha = torch.linalg.solve(k + beta * scale * torch.eye(len(k), dtype=k.dtype, device=k.device), targets)
    return k_test.double() @ alpha


@contextmanager
def _timed(times: Dict[str, float], phase: str):
    start = time.perf_counter()
    yield
    times[phase] = time.perf_counter() - start


def run(params: int, seed: int, train_seconds: float, beta: float, device: str, progress: bool = True) -> Dict:
    torch.manual_seed(seed)
    times: Dict[str, float] = {}
    with _timed(times, "data"):
        x_train, y_train, x_test, y_test = load_digits_split(seed)
    model = digits_cnn().to(device)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    with _timed(times, "train network"):
        epochs = train_briefly(model, x_train, y_train, train_seconds, seed)
    with torch.no_grad():
        net_accuracy = float((model(x_test).argmax(1) == y_test).float().mean())

    total = sum(p.numel() for p in model.parameters())
    idx = subsample(model, min(params, total), seed=seed)
    train_batches, test_batches = x_train.split(256), x_test.split(256)
    with _timed(times, "eNTK gram K(train, train)"):
        k_train = gram(model, train_batches, idx, progress=progress)
    with _timed(times, "eNTK gram K(test, train)"):
        k_test = gram(model, test_batches, idx, train_batches, progress=progress)
    with _timed(times, "kernel ridge solve"):
        scores = kernel_ridge_predict(k_train, y_train, k_test, beta)
    entk_accuracy = float((scores.argmax(1) == y_test).float().mean())
    return {
        "n_train": len(y_train),
        "n_test": len(y_test),
        "params_sampled": len(idx),
        "params_total": total,
        "epochs": epochs,
        "network_test_accuracy": net_accuracy,
        "entk_test_accuracy": entk_accuracy,
        "times_s": times,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=int, default=10_000, help="parameter subsample size p (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, the network and the subsample")
    parser.add_argument("--train-seconds", type=float, default=5.0, help="how long to train the CNN (default 5)")
    parser.add_argument("--beta", type=float, default=1e-3, help="ridge, relative to mean(diag K) (default 1e-3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    result = run(args.params, args.seed, args.train_seconds, args.beta, args.device, not args.no_progress)
    print(f"digits: {result['n_train']} train / {result['n_test']} test images, device {args.device}")
    print(
        f"eNTK of a {result['params_total']}-parameter CNN trained for {result['epochs']} epochs; "
        f"one output (logit 0), p = {result['params_sampled']} sampled parameters"
    )
    for phase, seconds in result["times_s"].items():
        print(f"  {phase:<28s} {seconds:8.2f} s")
    print(f"network test accuracy:           {result['network_test_accuracy']:.4f}")
    print(f"eNTK kernel regression accuracy: {result['entk_test_accuracy']:.4f}")
    print(f"total time: {time.perf_counter() - start:.1f} s")
    return 0
