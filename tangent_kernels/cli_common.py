"""What the command line's commands share: loading models, arrays and kernels, the checks
of their arguments (devices, writable outputs, outputs that would overwrite inputs), the
``--output`` parser, the run's environment record, and the one-line error form.

cli.py (gram, solve, coverage, demo, info) and cli_features.py (features) both import it,
so neither imports the other's helpers.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Optional

# What a user can get wrong on the command line: reported in one line, no traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError, AttributeError, KeyError, OSError, MemoryError)


class CommandError(Exception):
    """A problem with the command's arguments or files, reported in one line."""


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
            raise CommandError(f"--model: running {where} failed: {type(error).__name__}: {one_line(error)}") from error
        finally:
            sys.path.pop(0)
    else:
        sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as error:
            raise CommandError(f"--model: cannot import module {where!r} ({error}); is it on PYTHONPATH?") from None
        except Exception as error:
            raise CommandError(f"--model: importing {where!r} failed: {type(error).__name__}: {one_line(error)}") from error
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
            raise CommandError(f"--model: calling {spec}() failed: {type(error).__name__}: {one_line(error)}") from error
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
                               f"({one_line(error)})") from error
        if not isinstance(state, dict):
            raise CommandError(f"--weights: {weights} must hold a state_dict (a dict of tensors); "
                               f"got {type(state).__name__}")
        try:
            model.load_state_dict(state)
        except RuntimeError as error:  # missing / unexpected keys, shape mismatches: all listed
            raise CommandError(f"--weights: {weights} does not fit the model {spec}: {one_line(error)}") from error
    return model.eval()


def one_line(error: BaseException) -> str:
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
                           f"dtype {str(x.dtype).replace('torch.', '')}: {one_line(error)}") from error


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
            raise CommandError(f"{what}: cannot read {path} as a numeric .npy array ({one_line(error)})") from error
    elif file.suffix == ".pt":
        try:
            tensor = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle, zip and weights_only refusals all mean "not a saved tensor"
            raise CommandError(f"{what}: {path} is not a tensor saved with torch.save ({one_line(error)})") from error
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


def check_device_option(text: Optional[str]) -> None:
    """--device names a device this machine has, checked before any work."""
    from ._model import check_device as check

    try:
        check(text, "--device")
    except ValueError as error:
        raise CommandError(str(error)) from None


def environment() -> dict:
    import torch

    from .version import __version__

    return {"tangent_kernels": __version__, "torch": torch.__version__, "python": platform.python_version()}


# ----------------------------------------------------------------------------- gram


def parse_output(text: str):
    from .outputs import MULTI_OUTPUTS

    if text in ("first", "sum") + MULTI_OUTPUTS:
        return text
    try:
        return int(text)
    except ValueError:
        raise CommandError(f"--output must be 'first', 'sum', an integer logit index, or every logit: 'full' "
                           f"([n1, n2, k, k]), 'trace' ([n1, n2]) or 'diagonal' ([n1, n2, k]); got {text!r}") from None


def parse_projection(text: Optional[str]):
    """--projection DIM[:KIND[:SEED]] -> a tk.Projection (None without the option)."""
    if text is None:
        return None
    from .sketch import KINDS, Projection

    parts = text.split(":")
    usage = (f"--projection must be DIM[:KIND[:SEED]], DIM and SEED integers, KIND one of {', '.join(KINDS)} "
             f"(e.g. 4096, 4096:rademacher, 4096:kronecker:1); got {text!r}")
    if not 1 <= len(parts) <= 3 or (len(parts) > 1 and parts[1] not in KINDS):
        raise CommandError(usage)
    try:
        dim, seed = int(parts[0]), int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise CommandError(usage) from None
    try:
        return Projection(dim, parts[1] if len(parts) > 1 else "gaussian", seed)
    except ValueError as error:
        raise CommandError(f"--projection {text}: {error}") from None


def model_data_idx(args: argparse.Namespace):
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


K_SUFFIXES = (".safetensors", ".npy", ".pt")


def check_writable(path: str, what: str, suffixes=None) -> None:
    """Fail before the computation on an output path that cannot be written."""
    target = Path(path)
    if suffixes is not None and target.suffix not in suffixes:
        raise CommandError(f"{what} {path}: write K as {', '.join(suffixes)} (the suffix says the format)")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise CommandError(f"{what} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise CommandError(f"{what} {path}: not writable")


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)  # links (symbolic or hard) and relative paths alike
    except OSError:  # one of them does not exist (yet): compare where they resolve to
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwrites(outputs, inputs) -> None:
    """Before any work: no output (option, path) names an input's file or another output's,
    so that neither the user's data nor one result is overwritten by another."""
    outputs = [(what, path) for what, path in outputs if path]
    for i, (what, path) in enumerate(outputs):
        others = [(other, other_path, "that input") for other, other_path in inputs if other_path]
        others += [(other, other_path, "the other output") for other, other_path in outputs[i + 1:]]
        for other, other_path, role in others:
            if same_file(path, other_path):
                raise CommandError(f"{what} {path} is the same file as {other} {other_path}: writing there would "
                                   f"overwrite {role}; give {what} another path")
