"""The command line: ``tangent-kernels <command>`` or ``python -m tangent_kernels <command>``.

    tangent-kernels gram --model my_models:resnet --data X.npy --params 500000 --out K.safetensors
    tangent-kernels solve --gram K.safetensors --labels y.npy --val-gram Kv.safetensors --val-labels yv.npy
    tangent-kernels features --model my_models:resnet --data X.npy --params 500000 --out F.safetensors
    tangent-kernels coverage --model my_models:resnet --data X.npy --params 500000
    tangent-kernels demo
    tangent-kernels info

Errors are one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, List, Optional

# What a user can get wrong on the command line: reported in one line, no traceback.
from .cli_common import (K_SUFFIXES, USER_ERRORS, CommandError, check_device_option, check_writable, environment,
                         load_array, load_kernel, model_data_idx, one_line, parse_output, parse_projection,
                         refuse_overwrites)
from .cli_common import load_model  # noqa: F401 - tk.cli.load_model, the model loader of every command


def _info(_: argparse.Namespace) -> int:
    from ._ext import info

    print(info())
    return 0


# ----------------------------------------------------------------------------- inputs


def _coverage(args: argparse.Namespace) -> int:
    from .coverage import coverage

    model, x, _, idx, _ = model_data_idx(args)
    report = coverage(model, x[: args.batch_size], idx, output=parse_output(args.output),
                      precision=args.precision, device=args.device)
    print(report)
    return 0


def _gram(args: argparse.Namespace) -> int:
    from .pipeline import gram
    from .io import save_gram

    from .distributed.launch import torchrun_session

    refuse_overwrites([("--out", args.out)], [("--data", args.data), ("--data2", args.data2),
                                                ("--weights", args.weights), ("--idx", args.idx)])
    check_writable(args.out, "--out", K_SUFFIXES)
    session = torchrun_session(args.device)  # None unless torchrun started several ranks
    if args.shards and (session is None or not args.out.endswith(".safetensors")):
        raise CommandError("--shards writes one file per rank: run under torchrun with several ranks, --out *.safetensors")
    projection = parse_projection(args.projection)
    model, x, x2, idx, total = model_data_idx(args)
    start = time.perf_counter()
    K = gram(
        model, x.split(args.batch_size), idx, x2.split(args.batch_size) if x2 is not None else None,
        output=parse_output(args.output), precision=args.precision,
        device=args.device if session is None else session.device,
        progress=not args.no_progress, checkpoint=args.checkpoint, max_memory=args.max_memory, projection=projection,
        **({} if session is None else {"gather": "rows" if args.shards else "rank0"}),
    )
    seconds = time.perf_counter() - start
    if args.shards:
        from .distributed.shard import save_shards

        manifest = save_shards(K, args.out, {"model": args.model, "data": args.data, "precision": args.precision,
                                             **({"projection": projection.identity} if projection else {})})
        print(f"rank {K.rank}: rows {K.row_start}..{K.row_stop - 1} of K {tuple(K.shape)} -> {manifest}")
        return 0
    if K is None:  # a rank of a torchrun job other than 0, which writes K
        return 0
    p = total if idx is None else len(idx)
    meta = {
        "model": args.model, "weights": args.weights, "data": args.data, "data2": args.data2,
        "params": p, "params_total": total, "seed": args.seed, "idx": args.idx, "output": args.output,
        "precision": args.precision, "device": str(K.device), "seconds": round(seconds, 3), **environment(),
        **({"projection": projection.identity} if projection is not None else {}),
    }
    if args.out.endswith(".safetensors"):
        save_gram(args.out, K, meta)
    elif args.out.endswith(".npy"):
        import numpy as np

        np.save(args.out, K.cpu().numpy())
    else:
        import torch

        torch.save(K.cpu(), args.out)
    kind = "K(X, X)" if x2 is None else "K(X1, X2)"
    print(f"{kind} {tuple(K.shape)} {str(K.dtype).replace('torch.', '')}, p = {p:,} of {total:,} parameters, "
          f"{seconds:.1f} s" + (f", sketched: {projection.identity}" if projection is not None else "")
          + f" -> {args.out}")
    return 0


# ----------------------------------------------------------------------------- solve


def _parse_betas(values: List[str]) -> Any:
    if values == ["auto"]:
        return "auto"
    try:
        return [float(b) for b in values]
    except ValueError:
        raise CommandError(f"--betas must be 'auto' or numbers such as 1e-3 0.1; got {' '.join(values)!r}") from None


def _solve(args: argparse.Namespace) -> int:
    import torch

    from .solvers import ConvergenceWarning, KernelRidge

    refuse_overwrites([("--coef", args.coef), ("--json", args.json)],
                       [("--gram", args.gram), ("--labels", args.labels), ("--val-gram", args.val_gram),
                        ("--val-labels", args.val_labels), ("--test-gram", args.test_gram),
                        ("--test-labels", args.test_labels)])
    for path, what in ((args.coef, "--coef"), (args.json, "--json")):
        if path:
            check_writable(path, what)
    K = load_kernel(args.gram, "--gram")
    y = load_array(args.labels, "--labels")
    if (args.val_gram is None) != (args.val_labels is None):
        raise CommandError("--val-gram and --val-labels go together")
    if (args.test_gram is None) != (args.test_labels is None):
        raise CommandError("--test-gram and --test-labels go together")
    kr = KernelRidge(betas=_parse_betas(args.betas), solver=args.solver, max_iter=args.max_iter, tol=args.tol,
                     device=args.device, beta_scale=args.beta_scale,
                     progress=False if args.no_progress else None)  # None: a bar on a terminal only
    K_val = load_kernel(args.val_gram, "--val-gram") if args.val_gram else None
    y_val = load_array(args.val_labels, "--val-labels") if args.val_labels else None
    with warnings.catch_warnings():  # the report below says it for the chosen beta, in one line
        warnings.simplefilter("ignore", ConvergenceWarning)
        kr.fit(K, y, K_val=K_val, Y_val=y_val)
    metric = "accuracy" if kr.n_classes_ else "r2"
    report = {"solver": kr.solver_, "solver_reason": kr.solver_reason_, "best_beta": kr.best_beta_, "betas": kr.betas_, "n_train": kr.n_train_,
              "fit_seconds": round(kr.fit_time_, 3), "validation": kr.scores_, **environment()}
    lines = [f"{kr.solver_}: best beta {kr.best_beta_:.4g} of {len(kr.betas_)} tried, fit {kr.fit_time_:.2f} s"]
    chosen = kr.scores_[kr.best_index_]
    if chosen.get("source") is not None:  # how beta was chosen: validation set or leave-one-out
        source = {"val": "validation", "loo": "leave-one-out", "gcv": "generalized cross-validation"}.get(
            chosen["source"], chosen["source"])
        lines.append(f"{source} " + ", ".join(f"{k} {v:.4f}" for k, v in chosen.items() if k != "source"))
    if not kr.converged_[kr.best_index_]:
        lines.append(f"not converged to --tol {kr.tol_:g} in {kr.n_iter_[kr.best_index_]} iterations "
                     f"(final relative residual {kr.residual_[kr.best_index_]:.2g}); raise --max-iter to go further")
    if args.test_gram:
        test_score = kr.score(load_kernel(args.test_gram, "--test-gram"), load_array(args.test_labels, "--test-labels"))
        report[f"test_{metric}"] = test_score
        lines.append(f"test {metric}: {test_score:.4f}")
    if args.coef:
        torch.save(kr.dual_coef_.cpu(), args.coef)
        lines.append(f"dual coefficients {tuple(kr.dual_coef_.shape)} -> {args.coef}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        lines.append(f"report -> {args.json}")
    print("\n".join(lines))
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from . import cli_features, demo
    from .version import __version__
    from .precisions import PRECISIONS
    from .solvers import SOLVERS

    parser = argparse.ArgumentParser(
        prog="tangent-kernels", description="Empirical neural tangent kernels for PyTorch models.",
        epilog="Errors are one line and exit code 2; add --debug for the traceback.",
    )
    parser.add_argument("--version", action="version", version=f"tangent_kernels {__version__}")
    # --debug is read from argv directly (main), so it works before or after the command.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    parser._add_container_actions(debug)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    g = commands.add_parser("gram", parents=[debug], help="compute and save an eNTK Gram matrix",
                            description="Compute the eNTK Gram of a model over data and save it (safetensors + metadata).")
    g.add_argument("--model", required=True, help="module:factory or path/file.py:factory (a function returning an nn.Module, or a module instance)")
    g.add_argument("--weights", help="state_dict file (torch.save) to load into the model")
    g.add_argument("--data", required=True, help="inputs X as .npy or .pt, samples along the first axis")
    g.add_argument("--data2", help="second inputs X2 for the cross kernel K(X, X2)")
    g.add_argument("--params", type=int, help="number of parameters to subsample (default: all)")
    g.add_argument("--idx", help="explicit global parameter positions (.npy/.pt, 1-D integers) instead of --params")
    g.add_argument("--seed", type=int, default=0, help="subsample seed (default 0)")
    g.add_argument("--output", default="first",
                   help="'first' (logit 0), 'sum' (pNTK), an integer logit index, or every logit: 'full' (K "
                        "[n1, n2, k, k]), 'trace' ([n1, n2]), 'diagonal' ([n1, n2, k]); docs/outputs.md")
    g.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="arithmetic of the features and products (default fp32; docs/precision.md)")
    g.add_argument("--projection", metavar="DIM[:KIND[:SEED]]",
                   help="sketch the features to DIM random columns (tk.Projection; KIND gaussian (default), "
                        "rademacher or kronecker, SEED default 0): K is then the sketched, unbiased estimate; "
                        "docs/sketch.md")
    g.add_argument("--batch-size", type=int, default=256, help="samples per forward/backward batch (default 256)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the model's)")
    g.add_argument("--checkpoint", help="folder to checkpoint into and resume from")
    g.add_argument("--max-memory", type=int, help="bytes of features allowed on the device")
    g.add_argument("--out", required=True, help="where to save K: .safetensors (with metadata, for `solve`), .npy or .pt")
    g.add_argument("--shards", action="store_true", help="under torchrun: each rank writes its rows of K beside --out, "
                   "plus OUT.shards.json, which `solve --gram` reads")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (it only shows on a terminal anyway)")
    g.set_defaults(run=_gram)

    s = commands.add_parser("solve", parents=[debug], help="kernel ridge regression on saved Gram matrices",
                            description="Fit kernel ridge regression on a saved Gram and report validation/test scores.")
    s.add_argument("--gram", required=True, help="K(X_train, X_train): .safetensors from `gram`, or .npy/.pt")
    s.add_argument("--labels", required=True, help="integer labels [n] or float targets [n] / [n, m] (.npy/.pt)")
    s.add_argument("--val-gram", help="K(X_val, X_train)")
    s.add_argument("--val-labels", help="labels/targets of the validation samples, to choose beta (and early stopping)")
    s.add_argument("--test-gram", help="K(X_test, X_train)")
    s.add_argument("--test-labels", help="labels/targets of the test samples, scored once with the chosen beta")
    s.add_argument("--betas", nargs="+", default=["auto"], help="'auto' (telescopic search) or numbers")
    s.add_argument("--beta-scale", choices=["trace"], help="betas relative to mean(diag K)")
    s.add_argument("--solver", default="auto", choices=list(SOLVERS),
                   help="auto (default): eigh without validation data (leave-one-out), else krylov (one Cholesky "
                        "factor for every beta); cg, nesterov: iterative; cholesky: one factor per beta "
                        "(docs/solvers.md)")
    s.add_argument("--max-iter", type=int, default=1000, help="iteration cap of krylov / cg / nesterov (default 1000)")
    s.add_argument("--tol", type=float, default=None,
                   help="relative residual at which krylov / cg / nesterov stop (default 1e-6 for a float64 K, "
                        "1e-3 for float32: float32 coefficients cannot hold much less)")
    s.add_argument("--device", help="where to solve: cpu, cuda, cuda:1, ... (default: where K is, i.e. cpu)")
    s.add_argument("--coef", help="save the dual coefficients (torch.save) here")
    s.add_argument("--json", help="write a JSON report here")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (it only shows on a terminal anyway)")
    s.set_defaults(run=_solve)

    c = commands.add_parser("coverage", parents=[debug], help="which path each sampled parameter tensor takes",
                            description="Run one batch of --data through the per-sample gradient machinery (no Gram) "
                                        "and print, for every parameter tensor with sampled entries, the rules of its "
                                        "uses or why it takes the generic per-sample path (tk.coverage).")
    for action in g._actions:  # the model, data and sampling options of `gram`
        if action.dest in ("model", "weights", "data", "params", "idx", "seed", "output", "precision", "device"):
            c._add_action(action)
    c.add_argument("--batch-size", type=int, default=16, help="samples in the batch examined (default 16)")
    c.set_defaults(run=_coverage)

    cli_features.add_command(commands, g, debug)

    demo_parser = commands.add_parser(
        "demo", parents=[debug], help="eNTK kernel regression on scikit-learn's digits", description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo_parser.add_argument("experiment", nargs="?", choices=["shift", "lookahead", "tracking"], default="shift",
                             help="shift (default): the linearized network out of distribution, as above; "
                                  "lookahead: look-ahead active learning (docs/lookahead.md); "
                                  "tracking: the eNTK during fine-tuning (docs/kernel.md)")
    demo.add_arguments(demo_parser)

    def run_demo(args: argparse.Namespace) -> int:
        from . import tracking_demo
        from .lookahead import demo as lookahead_demo

        experiments = {"shift": demo.main, "lookahead": lookahead_demo.main, "tracking": tracking_demo.main}
        return experiments[args.experiment](args)

    demo_parser.set_defaults(run=run_demo)
    info_parser = commands.add_parser("info", parents=[debug], help="which backends (C++, CUDA, Triton) are active, and why not")
    info_parser.set_defaults(run=_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    args = build_parser().parse_args(argv)
    try:
        check_device_option(getattr(args, "device", None))
        return args.run(args)
    except (CommandError,) + USER_ERRORS as error:
        if debug:
            raise
        print(f"tangent-kernels {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tangent-kernels {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
