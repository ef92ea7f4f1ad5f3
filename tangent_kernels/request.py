"""The request: a run's arguments, checked once, before any work.

Every entry that computes features (``tk.gram``, ``tk.features``, ``tk.coverage``,
``tk.Kernel``, the compat adapters and the distributed driver) makes one ``Request``
(``Request.of``) and hands it on: the model, idx, output, precision, device, backend and
``inputs=`` are validated here and nowhere else, and what a checkpoint must agree on
(``Request.identity``) is derived from it. The pipeline (docs/pipeline.md) is
request -> feature phase (``feature_phase``) -> Gram phase (``tiles``) -> solve.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union

import torch
from torch import nn

from ._model import check_device, check_parameter_aliases, eval_mode, model_device
from .checkpoint import model_fingerprint, tensor_fingerprint
from .identity import computation_fingerprint
from .outputs import PER_SAMPLE_ROWS, OutputProbes, OutputSpec, check_output_spec
from .params import ParamIndex, resolve_idx
from .persample import resolve_backend
from .precisions import Precision, check_precision
from .progress import check_progress
from .store import check_max_memory, check_store

__all__ = ["FEATURES_LAYOUT", "Request", "check_callback", "check_checkpoint_key", "check_inputs_callable",
           "check_model"]


def check_model(model) -> None:
    """What no per-sample eNTK can be computed of, said before any work."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"model is a TorchScript module ({type(model).__name__}): its parameters cannot be swapped for the "
            "per-sample computation. Pass the nn.Module it was made from (before torch.jit.script/trace)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(
            f"the model has tensors on the meta device (no values), e.g. {meta[0]!r}: materialize and load its "
            "weights first (model.to_empty(device='cpu') then load_state_dict)"
        )
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.running_mean is None
                                                                    or module.running_var is None):
            raise ValueError(
                f"{type(module).__name__} {name or '(the model)'!r} has no running statistics "
                "(track_running_stats=False): even in eval mode it normalizes with the statistics of the batch, "
                "so one sample's output depends on the others and its per-sample eNTK is not defined. Use "
                "track_running_stats=True (with running statistics from training), or GroupNorm/LayerNorm"
            )
    check_parameter_aliases(model)  # a view of a parameter kept in a plain attribute


def check_inputs_callable(inputs) -> None:
    if inputs is not None and not callable(inputs):
        raise TypeError(f"inputs must be a callable batch -> model input (tensor, tuple of arguments or dict), "
                        f"or None; got {type(inputs).__name__}")


def check_callback(callback) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it receives a ProgressEvent); got {type(callback).__name__}")


def check_checkpoint_key(checkpoint_key) -> None:
    if checkpoint_key is not None and not isinstance(checkpoint_key, str):
        raise TypeError(f"checkpoint_key must be a str naming the run, got {type(checkpoint_key).__name__}")


# Checkpoints of the outputs stored one row per sample (feature_phase.PER_SAMPLE_ROWS)
# record this layout. Folders written before trace/diagonal took it (a row per (sample,
# logit)) have no such key: they are refused, never read with the wrong shape.
FEATURES_LAYOUT = "one row per sample: the k logits' features side by side"


@dataclass(frozen=True)
class Request:
    """One run's checked arguments. ``store`` and ``budget`` (bytes of features allowed on
    the device) are those of a Gram; a features-only request has ``store=None``."""

    model: nn.Module
    index: ParamIndex
    output: OutputSpec
    precision: Precision
    device: torch.device
    backend: str
    inputs: Optional[Callable[[Any], Any]] = None
    progress: Union[bool, str] = True
    store: Optional[str] = None
    budget: Optional[int] = None
    callback: Optional[Callable] = None
    checkpoint_key: Optional[str] = None

    @classmethod
    def of(cls, model, idx=None, *, output: OutputSpec = "first", precision="fp32", device=None,
           backend: str = "auto", inputs=None, progress: Union[bool, str] = True, store: Optional[str] = None,
           max_memory=None, callback=None, checkpoint_key=None) -> "Request":
        """Every argument checked, in the order a user reads them; errors name the argument
        and the fix. ``store=None``: no feature store (features, coverage)."""
        if isinstance(output, OutputProbes):  # gram and features evaluate them before they get here
            raise ValueError("output=OutputProbes is taken by tk.gram and tk.features (and the reference) only; for "
                             "the paths its probe outputs take, use output='full' (they take the same ones)")
        check_model(model)
        index = resolve_idx(model, idx)
        output = check_output_spec(output)
        precision = check_precision(precision)
        device = model_device(model) if device is None else check_device(device)
        backend = resolve_backend(backend, device)
        check_inputs_callable(inputs)
        progress = check_progress(progress)
        check_callback(callback)
        check_checkpoint_key(checkpoint_key)
        budget = None
        if store is not None:
            store = check_store(store)
            budget = check_max_memory(max_memory, device)
        return cls(model, index, output, precision, device, backend, inputs, progress, store, budget, callback,
                   checkpoint_key)

    @contextmanager
    def evaluation(self):
        """The model in eval mode under the precision's math for the duration (both restored)."""
        with eval_mode(self.model), self.precision.math():
            yield

    def identity(self, cross: bool, projection=None) -> Tuple[dict, bool]:
        """What a checkpoint must agree on to be resumed by this run (with ``parts``: the
        itemized fingerprints, to name what differs); and whether some of it could not be
        fingerprinted (then the Checkpoint asks for ``checkpoint_key``)."""
        model, output = self.model, self.output
        structure = computation_fingerprint(model)
        parts = {"model_structure": structure.parts}
        undecidable = list(structure.undecidable)
        if callable(output) and not isinstance(output, str):
            name = f"{getattr(output, '__module__', '?')}.{getattr(output, '__qualname__', type(output).__name__)}"
            fingerprint = computation_fingerprint(None, output)
            parts["output"] = fingerprint.parts
            undecidable += [f"output= {item}" for item in fingerprint.undecidable]
            output = f"callable {name} ({'code not decidable' if fingerprint.undecidable else fingerprint.digest})"
        return {
            "model_weights": model_fingerprint(model),
            "model_structure": structure.digest,
            "checkpoint_key": self.checkpoint_key,
            "idx": tensor_fingerprint(self.index.positions),
            "p": len(self.index),
            "output": output,
            "precision": self.precision.name,
            "backend": self.backend,
            "kernel": "cross K(X1, X2)" if cross else "symmetric K(X, X)",
            "undecidable": undecidable,
            "parts": parts,
            **({"features_layout": FEATURES_LAYOUT} if output in PER_SAMPLE_ROWS else {}),
            # Only with one, so that folders written before projections existed still resume.
            **({"projection": projection.identity} if projection is not None else {}),
        }, bool(undecidable)
