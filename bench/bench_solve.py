"""Kernel ridge solvers: time to reach a relative residual on one kernel, every beta at once.

For a synthetic PSD kernel with an eNTK-like power-law spectrum (K = Q diag(lam) Q^T,
lam_i ~ i^-decay, mean diagonal 1) and one-hot labels from a teacher on its top
eigenvectors, each solver in ``tangent_kernels.solve`` solves (K + beta I) alpha = Y for
all betas, and the table reports wall time (median of repeats), iterations, and the worst
relative residual ||(K + beta I) alpha - Y||_F / ||Y||_F over the betas, measured
independently in fp64. A baseline row times one plain fp32 Cholesky solve of one beta
(torch.linalg.cholesky + cholesky_solve): the yardstick of the issue's goals.

    python bench/bench_solve.py                       # CPU: n = 8192, 10 classes, 10 betas, fp32 K, 1e-3
    python bench/bench_solve.py --decay 1.9           # the decay measured on a real tk.gram (docs/solvers.md)
    python bench/bench_solve.py --device cuda --n 50000   # the GPU configuration
    python bench/bench_solve.py --json results.json

Spectra: decay 1.3 (the earlier benchmark's) and 1.9 (fitted on eigenvalues 10..500 of
the demo CNN's pNTK on digits, n = 1024: ``tk.gram(..., output="sum", precision="fp64")``).

Asserted (the default configuration, CPU or CUDA, unless --no-assert): the default solver
(``solver="auto"``) reaches the target on every beta within ``AUTO_MARGIN`` (3x) of the
one-beta fp32 Cholesky baseline (the issue's target is 2x on CPU; on a GPU the target,
faster than the baseline, is reported, not asserted), and the fastest solver that
reaches the target is at least 2x faster than nesterov's capped iterations.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle threads sleep instead of spinning. On this project's
# shared 2-core machines, spinning threads turned 1000 small GEMMs from 0.14 s into 15 s
# (measured). Set the variable yourself (e.g. OMP_WAIT_POLICY=ACTIVE) to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Dict, List  # noqa: E402

import torch  # noqa: E402

from tangent_kernels.solve import ConvergenceWarning, solve  # noqa: E402

MARGIN = 2.0
AUTO_MARGIN = 3.0


def synthetic_problem(n: int, classes: int, decay: float, dtype: torch.dtype, device: str, seed: int = 0):
    """K = Q diag(lam) Q^T [n, n] with lam_i ~ i^-decay (mean diag(K) = 1), and labels [n].

    Q is Haar-random (QR of a Gaussian matrix, built on ``device`` in ``dtype``): CG's and
    Nesterov's convergence depend only on the spectrum and on how the targets spread over
    the eigenvectors, and the dense solvers' cost not at all on the basis. Labels: argmax
    of a teacher on the top 50 eigenvectors plus noise (a learnable, eNTK-like task).
    """
    # Built in float64 and rounded once: a float32 Q diag(lam) Q^T moves eigenvalues by
    # ~ eps32 sqrt(n) lambda_max (0.03 at n = 8192, decay 1.9), which makes K + 1e-3 I
    # indefinite; a Gram from tk.gram rounds each entry once (fp64-summed fp32 chunks).
    g = torch.Generator(device=device).manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, device=device, dtype=torch.float64)).Q
    lam = torch.arange(1, n + 1, dtype=torch.float64, device=device).pow(-decay)
    lam = lam * (n / lam.sum())
    W = torch.randn(50, classes, generator=g, device=device, dtype=torch.float64)
    W /= torch.arange(1, 51, device=device, dtype=torch.float64)[:, None]
    scores = Q[:, :50] @ W * math.sqrt(n)
    scores += 0.3 * torch.randn(n, classes, generator=g, device=device, dtype=torch.float64)
    K = (Q * lam) @ Q.T
    del Q  # peak memory ~ 4 n^2 doubles (80 GB at n = 50,000)
    K = ((K + K.T) / 2).to(dtype)
    return K, scores.argmax(dim=1), float(lam[0])


def relative_residuals(K: torch.Tensor, Y: torch.Tensor, betas: List[float], alpha: torch.Tensor) -> List[float]:
    """fp64 ||(K + beta I) alpha_beta - Y|| / ||Y|| per beta; K converted block by block."""
    n = K.shape[0]
    A = alpha.to(torch.float64)
    Y64 = Y.to(torch.float64)
    out = []
    for j, b in enumerate(betas):
        R = -Y64 + b * A[j]
        for i in range(0, n, 4096):
            R[i : i + 4096] += K[i : i + 4096].double() @ A[j]
        out.append(float(R.norm() / Y64.norm()))
    return out


def timed(fn: Callable[[], Any], device: str) -> tuple:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--betas", type=int, default=10, help="number of betas, log-spaced over --beta-range")
    p.add_argument("--beta-range", type=float, nargs=2, default=(1e-3, 1.0),
                   help="smallest and largest beta (absolute; mean diag(K) = 1)")
    p.add_argument("--decay", type=float, default=1.3, help="eigenvalue power-law exponent")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="dtype of K (default: float32, as tk.gram returns it)")
    p.add_argument("--tol", type=float, default=None,
                   help="target relative residual (default 1e-3; float32 results cannot go much below 1e-5)")
    p.add_argument("--max-iter", type=int, default=None, help="iteration cap of nesterov and cg (default 200 CPU / 2000 CUDA)")
    p.add_argument("--precond-rank", type=int, nargs="+", default=None,
                   help="Nystrom ranks for cg (default 512 CPU / 2000 CUDA)")
    p.add_argument("--solvers", nargs="+",
                   default=["auto", "krylov", "multi-shift", "cg+nystrom", "cg+nystrom+path", "nesterov",
                            "nesterov+nystrom", "cholesky"],
                   help="also: cg (no preconditioner), eigh (~28 Cholesky solves of time at n = 4096)")
    p.add_argument("--repeats", type=int, default=3, help="median of up to this many runs ...")
    p.add_argument("--repeat-budget", type=float, default=10.0,
                   help="... repeating only while a solver's runs so far took less than this many seconds")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-assert", action="store_true")
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or "float32")
    args.tol = args.tol or 1e-3
    max_iter = args.max_iter or (2000 if cuda else 200)
    ranks = args.precond_rank or ([2000] if cuda else [512])
    lo, hi = args.beta_range
    betas = [lo * (hi / lo) ** (i / max(1, args.betas - 1)) for i in range(args.betas)]

    t0 = time.perf_counter()
    K, labels, lam1 = synthetic_problem(args.n, args.classes, args.decay, dtype, args.device)
    Y = torch.nn.functional.one_hot(labels, args.classes).to(dtype)
    print(f"problem: n={args.n}, {args.classes} classes, {len(betas)} betas {betas[0]:.0e}..{betas[-1]:.0e}, "
          f"K {str(dtype).replace('torch.', '')} on {args.device}, mean diag 1, lambda_max = {lam1:.0f}, "
          f"cond(K + beta_min I) = {lam1 / betas[0]:.1e}; built in {time.perf_counter() - t0:.1f} s", flush=True)

    configs: Dict[str, Callable[[], Any]] = {}
    common = dict(tol=args.tol, max_iter=max_iter, return_info=True)
    for name in args.solvers:
        if name in ("cg+nystrom", "nesterov+nystrom"):
            base = name.split("+")[0]
            for r in ranks:
                configs[f"{name}(r={r})"] = (lambda r=r, base=base: solve(K, Y, betas, base, precond_rank=r,
                                                                         eval_every=1, **common))
        elif name == "cg+nystrom+path":
            for r in ranks:
                configs[f"{name}(r={r})"] = (lambda r=r: solve(K, Y, betas, "cg", precond_rank=r, warm_start=True,
                                                              **common))
        elif name in ("auto", "krylov"):
            configs[name] = (lambda name=name: solve(K, Y, betas, name, **common))
        elif name == "multi-shift":
            configs[name] = (lambda: solve(K, Y, betas, "krylov", precond=None, **common))
        elif name in ("nesterov", "cg"):
            configs[name] = (lambda name=name: solve(K, Y, betas, name, eval_every=1, **common))
        elif name in ("eigh", "cholesky"):
            # eigh/cholesky are exact: they return the working precision; tol does not apply.
            configs[name] = (lambda name=name: solve(K, Y, betas, name, return_info=True))
        else:
            raise SystemExit(f"unknown solver {name!r}")

    def baseline():
        A = K.to(torch.float32, copy=True)  # never add beta to K itself
        A.diagonal().add_(betas[0])
        L = torch.linalg.cholesky(A)
        return torch.cholesky_solve(Y.to(torch.float32), L)

    # Warm-up on a small problem: library loading and kernel selection are not the solver's cost.
    Ks, Ys = K[:256, :256].contiguous(), Y[:256]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name in ("nesterov", "cg", "eigh", "cholesky", "krylov"):
            solve(Ks, Ys, betas[:2], name, max_iter=5, precond_rank=8 if name in ("cg", "nesterov") else None)

    # Round-robin repeats: on a shared machine, load changes over minutes; interleaving
    # spreads it over all solvers instead of penalizing whichever ran during a burst.
    entries = list(configs.items()) + [("baseline: fp32 cholesky, 1 beta", None)]
    times: Dict[str, List[float]] = {name: [] for name, _ in entries}
    outputs: Dict[str, Any] = {}
    for rep in range(args.repeats):
        for name, fn in entries:
            if rep and sum(times[name]) >= args.repeat_budget:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                if fn is None:
                    t, alpha = timed(baseline, args.device)
                    outputs[name] = (alpha[None], {"n_iter": [0]})
                else:
                    t, outputs[name] = timed(fn, args.device)
            times[name].append(t)
            if rep == 0:
                print(f"  {name:<34} {t:8.2f} s", flush=True)
    rows = []
    for name, fn in entries:
        alpha, info = outputs[name]
        bs = betas[:1] if fn is None else betas
        res = relative_residuals(K, Y, bs, alpha)
        row = {
            "solver": name,
            "seconds": statistics.median(times[name]),
            "all_seconds": times[name],
            "repeats": len(times[name]),
            "iterations": max(info["n_iter"]),
            "max_residual": max(res),
            "reached": all(r <= args.tol for r in res),
            "betas": len(bs),
        }
        if "precond_time" in info:
            row["precond_seconds"] = info["precond_time"]
        if "solver" in info:
            row["ran"] = info["solver"]
        rows.append(row)

    device_name = (torch.cuda.get_device_name() if cuda else
                   f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, "
                   f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"\n{device_name}, torch {torch.__version__}, n={args.n}, {args.classes} classes, {len(betas)} betas, "
          f"K {str(dtype).replace('torch.', '')}, target relative residual {args.tol:g}\n")
    print("| solver | time (s), median | runs | iterations | max relative residual | reached |")
    print("|---|---:|---:|---:|---:|:---:|")
    for r in rows:
        print(f"| {r['solver']} | {r['seconds']:.2f} | {r['repeats']} | {r['iterations']} | "
              f"{r['max_residual']:.1e} | {'yes' if r['reached'] else 'no'} |")

    solvers = [r for r in rows if not r["solver"].startswith("baseline")]
    reached = [r for r in solvers if r["reached"]]
    best = min(reached, key=lambda r: r["seconds"]) if reached else None
    base = rows[-1]
    nesterov = next((r for r in rows if r["solver"] == "nesterov"), None)
    summary = {"best": best["solver"] if best else None}
    if best:
        print(f"\nbest: {best['solver']} ({best['seconds']:.2f} s for {len(betas)} betas); "
              f"one fp32 Cholesky of one beta: {base['seconds']:.2f} s")
        summary["best_vs_one_fp32_cholesky"] = base["seconds"] / best["seconds"]
        summary["gpu_goal_met"] = best["seconds"] < base["seconds"]
        print(f"goal (best solver, all {len(betas)} betas, faster than one fp32 Cholesky of one beta): "
              f"{'met' if summary['gpu_goal_met'] else 'not met'}")
        if nesterov:
            summary["best_vs_nesterov"] = nesterov["seconds"] / best["seconds"]
            print(f"best is {summary['best_vs_nesterov']:.1f}x faster than nesterov "
                  f"(which {'reached' if nesterov['reached'] else 'did not reach'} the target)")
    auto = next((r for r in rows if r["solver"] == "auto"), None)
    if auto is not None:
        summary["auto_ran"] = auto.get("ran")
        summary["auto_vs_one_fp32_cholesky"] = auto["seconds"] / base["seconds"]
        print(f"default solver (auto -> {auto.get('ran')}): {summary['auto_vs_one_fp32_cholesky']:.2f}x the time "
              f"of one fp32 Cholesky of one beta, for all {len(betas)} betas "
              f"({'reached' if auto['reached'] else 'did not reach'} {args.tol:g})")
    if args.json:
        args.json.write_text(json.dumps({
            "device": device_name, "torch": torch.__version__, "n": args.n, "classes": args.classes,
            "betas": betas, "dtype": str(dtype), "tol": args.tol, "max_iter": max_iter, "decay": args.decay,
            "lambda_max": lam1, "cond_beta_min": lam1 / betas[0], "rows": rows, "summary": summary,
        }, indent=2))
    default = (args.n == (50000 if cuda else 8192) and len(betas) == 10 and args.tol == 1e-3
               and dtype == torch.float32)
    if default and not args.no_assert:
        assert best is not None, "no solver reached the target residual"
        if nesterov is not None:
            assert nesterov["seconds"] >= MARGIN * best["seconds"], (
                f"expected the best solver >= {MARGIN}x faster than nesterov: {summary}")
        if auto is not None and not cuda:
            assert auto["reached"], f"the default solver did not reach {args.tol:g}: {summary}"
            assert auto["seconds"] <= AUTO_MARGIN * base["seconds"], (
                f"expected the default solver within {AUTO_MARGIN}x of one fp32 Cholesky: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
