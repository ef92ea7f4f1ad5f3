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
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, List, Optional

# What a user can get wrong on the command line: reported in one line, no traceback.
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError, AttributeError, KeyError, OSError, MemoryError)


class CommandError(Exception):
    """A problem with the command's arguments or files, reported in one line."""


def _info(_: argparse.Namespace) -> int:
    from ._ext import info

    print(info())
    return 0


# ----------------------------------------------------------------------------- inputs


def load_model(spec: str, weights: Optional[str] = None):
    """``module:attr`` or ``path/to/file.py:attr``; attr is an nn.Module or a factory
    called with no arguments. ``weights``: a state_dict file (torch.save) to load."""
    import torch
    from torch import nn

    if ":" not in spec:
        raise CommandError(f"--model must be 'module:factory' or 'file.py:factory'; got {spec!r}")
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise CommandError(f"--model: no file {where}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:  # a SyntaxError, an import or any error of the file's own code
            raise CommandError(f"--model: running {where} failed: {type(error).__name__}: {_one_line(error)}") from error
        finally:
            sys.path.pop(0)
    else:
        sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as error:
            raise CommandError(f"--model: cannot import module {where!r} ({error}); is it on PYTHONPATH?") from None
        except Exception as error:
            raise CommandError(f"--model: importing {where!r} failed: {type(error).__name__}: {_one_line(error)}") from error
        finally:
            sys.path.pop(0)
    if not hasattr(module, attr):
        raise CommandError(f"--model: module {where!r} has no attribute {attr!r}")
    obj = getattr(module, attr)
    if isinstance(obj, nn.Module):
        model = obj
    elif callable(obj):
        try:
            model = obj()
        except Exception as error:
            raise CommandError(f"--model: calling {spec}() failed: {type(error).__name__}: {_one_line(error)}") from error
        if not isinstance(model, nn.Module):
            raise CommandError(f"--model: {spec}() returned a {type(model).__name__}, not an nn.Module")
    else:
        raise CommandError(f"--model: {spec} is a {type(obj).__name__}, not an nn.Module or a function "
                           "returning one")
    if weights is not None:
        if not Path(weights).is_file():
            raise CommandError(f"--weights: no file {weights}")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle, zip and weights_only refusals all mean "not a state_dict file"
            raise CommandError(f"--weights: {weights} is not a state_dict saved with torch.save "
                               f"({_one_line(error)})") from error
        if not isinstance(state, dict):
            raise CommandError(f"--weights: {weights} must hold a state_dict (a dict of tensors); "
                               f"got {type(state).__name__}")
        try:
            model.load_state_dict(state)
        except RuntimeError as error:  # missing / unexpected keys, shape mismatches: all listed
            raise CommandError(f"--weights: {weights} does not fit the model {spec}: {_one_line(error)}") from error
    return model.eval()


def _one_line(error: BaseException) -> str:
    """A multi-line exception message (torch's usually are) joined into one line."""
    return " ".join(str(error).split()) or type(error).__name__


def check_model_runs(model, x, what: str) -> None:
    """One forward pass on the first sample, so that inputs the model cannot take are
    reported as a problem with the data (one line) rather than deep inside gram()."""
    import torch

    probe = x[:1]
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if probe.is_floating_point() and len(dtypes) == 1:
        # Only shapes are in question: precision='fp64' runs a float32 model in float64.
        probe = probe.to(dtypes.pop())
    try:
        with torch.no_grad():
            model(probe)
    except Exception as error:  # whatever the model raises; --debug shows its traceback as the cause
        raise CommandError(f"{what}: the model cannot run on samples of shape {tuple(x.shape[1:])} and "
                           f"dtype {str(x.dtype).replace('torch.', '')}: {_one_line(error)}") from error


def load_array(path: str, what: str):
    """A tensor from .npy (no pickles) or .pt (a tensor saved with torch.save)."""
    import numpy as np
    import torch

    file = Path(path)
    if not file.is_file():
        raise CommandError(f"{what}: no file {path}")
    if file.suffix == ".npy":
        try:
            tensor = torch.from_numpy(np.load(file, allow_pickle=False))
        except (ValueError, TypeError, OSError) as error:  # corrupt, pickled objects, or a dtype torch lacks
            raise CommandError(f"{what}: cannot read {path} as a numeric .npy array ({_one_line(error)})") from error
    elif file.suffix == ".pt":
        try:
            tensor = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle, zip and weights_only refusals all mean "not a saved tensor"
            raise CommandError(f"{what}: {path} is not a tensor saved with torch.save ({_one_line(error)})") from error
        if not isinstance(tensor, torch.Tensor):
            raise CommandError(f"{what}: {path} must hold a single tensor; got {type(tensor).__name__}")
    else:
        raise CommandError(f"{what}: {path} must be a .npy or .pt file")
    return tensor  # as stored: a float64 K or target is not rounded to float32 on its way in


def model_inputs(x, precision: str):
    """Data for the model under ``precision``: floating-point data in the dtype the engine
    computes in, float64 for 'fp64' (rounding float64 data to float32 first would lose what
    fp64 is for) and float32 for the others, whose models and gradients are float32. Both
    loaders of a cross kernel thus agree in dtype; integer data (token ids) is left alone."""
    from .precisions import PRECISIONS

    if x.is_floating_point() and precision in PRECISIONS:
        return x.to(PRECISIONS[precision].compute)
    return x


def load_kernel(path: str, what: str):
    from .io import load_gram

    if path.endswith(".safetensors"):
        return load_gram(path)[0]
    if path.endswith(".shards.json"):  # the row shards of a torchrun `gram --shards`
        from .distributed.shard import load_shards

        return load_shards(path)[0]
    return load_array(path, what)


def check_device(text: Optional[str]) -> None:
    """--device names a device this machine has, checked before any work."""
    from ._model import check_device as check

    try:
        check(text, "--device")
    except ValueError as error:
        raise CommandError(str(error)) from None


def _environment() -> dict:
    import torch

    from . import __version__

    return {"tangent_kernels": __version__, "torch": torch.__version__, "python": platform.python_version()}


# ----------------------------------------------------------------------------- gram


def _parse_output(text: str):
    from .outputs import MULTI_OUTPUTS

    if text in ("first", "sum") + MULTI_OUTPUTS:
        return text
    try:
        return int(text)
    except ValueError:
        raise CommandError(f"--output must be 'first', 'sum', an integer logit index, or every logit: 'full' "
                           f"([n1, n2, k, k]), 'trace' ([n1, n2]) or 'diagonal' ([n1, n2, k]); got {text!r}") from None


def _model_data_idx(args: argparse.Namespace):
    """(model, X, X2 or None, idx, trainable parameter count) from gram/coverage's options."""
    from .params import subsample

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1; got {args.batch_size}")
    model = load_model(args.model, args.weights)
    x = model_inputs(load_array(args.data, "--data"), args.precision)
    x2 = model_inputs(load_array(args.data2, "--data2"), args.precision) if getattr(args, "data2", None) else None
    check_model_runs(model, x, "--data")
    if x2 is not None:
        check_model_runs(model, x2, "--data2")
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.idx and args.params is not None:
        raise CommandError("--idx and --params both choose the parameters: give one of them")
    if args.params is not None and not 1 <= args.params <= total:
        raise CommandError(f"--params {args.params}: the model has {total:,} trainable parameters; give 1 .. {total} "
                           "(or leave it out for all)")
    if args.idx:
        idx = load_array(args.idx, "--idx")
    elif args.params is not None and args.params < total:
        idx = subsample(model, args.params, seed=args.seed)
    else:
        idx = None
    return model, x, x2, idx, total


_K_SUFFIXES = (".safetensors", ".npy", ".pt")


def _check_writable(path: str, what: str, suffixes=None) -> None:
    """Fail before the computation on an output path that cannot be written."""
    target = Path(path)
    if suffixes is not None and target.suffix not in suffixes:
        raise CommandError(f"{what} {path}: write K as {', '.join(suffixes)} (the suffix says the format)")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise CommandError(f"{what} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise CommandError(f"{what} {path}: not writable")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)  # links (symbolic or hard) and relative paths alike
    except OSError:  # one of them does not exist (yet): compare where they resolve to
        return os.path.realpath(a) == os.path.realpath(b)


def _refuse_overwrites(outputs, inputs) -> None:
    """Before any work: no output (option, path) names an input's file or another output's,
    so that neither the user's data nor one result is overwritten by another."""
    outputs = [(what, path) for what, path in outputs if path]
    for i, (what, path) in enumerate(outputs):
        others = [(other, other_path, "that input") for other, other_path in inputs if other_path]
        others += [(other, other_path, "the other output") for other, other_path in outputs[i + 1:]]
        for other, other_path, role in others:
            if _same_file(path, other_path):
                raise CommandError(f"{what} {path} is the same file as {other} {other_path}: writing there would "
                                   f"overwrite {role}; give {what} another path")


def _coverage(args: argparse.Namespace) -> int:
    from .persample.coverage import coverage

    model, x, _, idx, _ = _model_data_idx(args)
    report = coverage(model, x[: args.batch_size], idx, output=_parse_output(args.output),
                      precision=args.precision, device=args.device)
    print(report)
    return 0


def _gram(args: argparse.Namespace) -> int:
    from .engine import gram
    from .io import save_gram

    from .distributed.launch import torchrun_session

    _refuse_overwrites([("--out", args.out)], [("--data", args.data), ("--data2", args.data2),
                                                ("--weights", args.weights), ("--idx", args.idx)])
    _check_writable(args.out, "--out", _K_SUFFIXES)
    session = torchrun_session(args.device)  # None unless torchrun started several ranks
    if args.shards and (session is None or not args.out.endswith(".safetensors")):
        raise CommandError("--shards writes one file per rank: run under torchrun with several ranks, --out *.safetensors")
    model, x, x2, idx, total = _model_data_idx(args)
    start = time.perf_counter()
    K = gram(
        model, x.split(args.batch_size), idx, x2.split(args.batch_size) if x2 is not None else None,
        output=_parse_output(args.output), precision=args.precision,
        device=args.device if session is None else session.device,
        progress=not args.no_progress, checkpoint=args.checkpoint, max_memory=args.max_memory,
        **({} if session is None else {"gather": "rows" if args.shards else "rank0"}),
    )
    seconds = time.perf_counter() - start
    if args.shards:
        from .distributed.shard import save_shards

        manifest = save_shards(K, args.out, {"model": args.model, "data": args.data, "precision": args.precision})
        print(f"rank {K.rank}: rows {K.row_start}..{K.row_stop - 1} of K {tuple(K.shape)} -> {manifest}")
        return 0
    if K is None:  # a rank of a torchrun job other than 0, which writes K
        return 0
    p = total if idx is None else len(idx)
    meta = {
        "model": args.model, "weights": args.weights, "data": args.data, "data2": args.data2,
        "params": p, "params_total": total, "seed": args.seed, "idx": args.idx, "output": args.output,
        "precision": args.precision, "device": str(K.device), "seconds": round(seconds, 3), **_environment(),
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
          f"{seconds:.1f} s -> {args.out}")
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

    _refuse_overwrites([("--coef", args.coef), ("--json", args.json)],
                       [("--gram", args.gram), ("--labels", args.labels), ("--val-gram", args.val_gram),
                        ("--val-labels", args.val_labels), ("--test-gram", args.test_gram),
                        ("--test-labels", args.test_labels)])
    for path, what in ((args.coef, "--coef"), (args.json, "--json")):
        if path:
            _check_writable(path, what)
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
              "fit_seconds": round(kr.fit_time_, 3), "validation": kr.scores_, **_environment()}
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
    from . import __version__, cli_features, demo
    from .engine import PRECISIONS
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
        check_device(getattr(args, "device", None))
        return args.run(args)
    except (CommandError,) + _USER_ERRORS as error:
        if debug:
            raise
        print(f"tangent-kernels {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tangent-kernels {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
