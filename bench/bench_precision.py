"""Each precision= mode against fp64 on the demo data (scikit-learn digits, the demo's CNN).

For every mode: the time of the Gram phase (K(train, train) and K(test, train)), the
relative Frobenius error of K(train, train), and, for kernel ridge regression solved
exactly in fp64 on that mode's K (so only K's error counts), the relative error of the
test scores and the agreement of their argmax with fp64's. The table goes to
docs/precision.md. Asserts that the default ("fp32") agrees with fp64 on >= 99.9% of
the test predictions, the issue's criterion for a default.

    python bench/bench_precision.py [--params 10000] [--epochs 15] [--device cpu]
"""

import argparse
import platform
import time

import torch
from torch import nn

import tangent_kernels as tk
from _common import commit
from tangent_kernels.demo import digits_cnn, load_digits_split

MODES = ("fp64", "fp32", "tf32", "bf16", "fp16")
AGREEMENT_REQUIRED = 0.999


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    """A fixed number of Adam epochs (not a time budget): the same network on any machine."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()


def ridge_scores(k_train: torch.Tensor, y: torch.Tensor, k_test: torch.Tensor, beta: float) -> torch.Tensor:
    """Exact fp64 kernel ridge regression on one-hot targets; beta relative to mean(diag K)."""
    k = k_train.double()
    shift = beta * k.diagonal().mean() * torch.eye(len(k), dtype=k.dtype, device=k.device)
    alpha = torch.linalg.solve(k + shift, nn.functional.one_hot(y).double())
    return k_test.double() @ alpha


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--betas", type=float, nargs="+", default=[1e-2, 1e-4])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = (t.to(args.device) for t in load_digits_split(args.seed))
    model = digits_cnn().to(args.device)
    train(model, x_train, y_train, args.epochs, args.seed)
    idx = tk.subsample(model, args.params, seed=args.seed)
    train_batches, test_batches = x_train.split(256), x_test.split(256)

    kernels, seconds = {}, {}
    for mode in MODES:  # warm-up: one-time costs (allocator, kernel selection) out of the timings
        tk.gram(model, train_batches[:1], idx, precision=mode, progress=False)
    for mode in MODES:
        start = time.perf_counter()
        k_train = tk.gram(model, train_batches, idx, precision=mode, progress=False)
        k_test = tk.gram(model, test_batches, idx, train_batches, precision=mode, progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds[mode] = time.perf_counter() - start
        kernels[mode] = (k_train, k_test)

    print(f"# digits (n_train={len(y_train)}, n_test={len(y_test)}), digits CNN trained {args.epochs} epochs, "
          f"p={len(idx)}, device={args.device} ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, commit {commit()}")
    header = "| mode | Gram time (s) | rel. Frobenius error of K |"
    header += "".join(f" beta={b:g}: rel. error of scores | argmax agreement |" for b in args.betas)
    print(header)
    print("|" + "---|" * (3 + 2 * len(args.betas)))
    k64_train, k64_test = kernels["fp64"]
    reference = {beta: ridge_scores(k64_train, y_train, k64_test, beta) for beta in args.betas}
    agreement_of = {}
    for mode in MODES:
        k_train, k_test = kernels[mode]
        k_error = float((k_train.double() - k64_train).norm() / k64_train.norm())
        row = f"| {mode} | {seconds[mode]:.2f} | {k_error:.1e} |"
        for beta in args.betas:
            scores = ridge_scores(k_train, y_train, k_test, beta)
            score_error = float((scores - reference[beta]).norm() / reference[beta].norm())
            agreement = float((scores.argmax(1) == reference[beta].argmax(1)).double().mean())
            agreement_of[mode, beta] = agreement
            row += f" {score_error:.1e} | {agreement:.4f} |"
        print(row)
    worst = min(agreement_of["fp32", beta] for beta in args.betas)
    assert worst >= AGREEMENT_REQUIRED, f"fp32 argmax agreement {worst:.4f} < {AGREEMENT_REQUIRED}"
    print(f"OK: the default fp32 agrees with fp64 on >= {AGREEMENT_REQUIRED:.1%} of test predictions ({worst:.4f})")


if __name__ == "__main__":
    main()
