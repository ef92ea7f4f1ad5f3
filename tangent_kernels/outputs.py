"""Scalarizing model outputs: which scalar s(x) the eNTK differentiates.

``output`` is one of
- ``"first"``: logit 0, the seed's one-output reduction;
- ``"sum"``: the sum of the k logits divided by sqrt(k), the pseudo-NTK (pNTK);
- an int j: logit j;
- a callable mapping the model's (unwrapped) output to a [B] tensor;
- ``"full"``, ``"trace"``, ``"diagonal"``: every logit, for the k x k eNTK
  ([n1, n2, k, k]), its trace over outputs ([n1, n2]) or its diagonal ([n1, n2, k]).

Model outputs may be a tensor [B, k] or [B], or an object / dict holding ``logits``
(Hugging Face ``ModelOutput`` and the like).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Union

import numpy as np
import torch

__all__ = ["MULTI_OUTPUTS", "OutputError", "OutputSpec", "check_output_spec", "is_multi", "logits_of", "scalarize"]

# The outputs that keep every logit: the kernel gets an output axis (engine.gram).
MULTI_OUTPUTS = ("full", "trace", "diagonal")


def is_multi(output) -> bool:
    return isinstance(output, str) and output in MULTI_OUTPUTS

OutputSpec = Union[str, int, Callable[[Any], torch.Tensor]]


class OutputError(Exception):
    """Marks an unusable model output, so no fallback path retries the evaluation."""


class OutputValueError(OutputError, ValueError):
    pass


class OutputTypeError(OutputError, TypeError):
    pass


def check_output_spec(output: OutputSpec) -> OutputSpec:
    """Fail early, before any model evaluation, on an output argument we cannot use."""
    if callable(output) and not isinstance(output, str):
        return output
    if isinstance(output, np.integer):  # a logit index taken from a NumPy array
        output = int(output)
    if isinstance(output, bool) or not isinstance(output, (str, int)):
        raise TypeError(
            f"output must be 'first', 'sum', an int logit index or a callable, got {output!r}"
        )
    if isinstance(output, str) and output not in ("first", "sum") + MULTI_OUTPUTS:
        raise ValueError(
            f"unknown output {output!r}: use 'first' (logit 0), 'sum' (pNTK: sum of logits / "
            "sqrt(k)), an int logit index, a callable returning a [B] tensor, or 'full' / 'trace' / "
            "'diagonal' for every logit (the k x k eNTK, its trace, its diagonal)"
        )
    return output


def _unwrap(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise OutputTypeError(
        f"the model returned a {type(out).__name__}, which tangent_kernels cannot scalarize: "
        "return a tensor [B, k] or [B], or an object/dict with a 'logits' tensor, or pass "
        "output=callable mapping the model's output to a [B] tensor"
    )


_SHAPE_HINT = ("For sequence outputs or other shapes, pass output=callable that maps the output to one "
               "scalar per sample (e.g. lambda out: out[:, -1, 0])")


def logits_of(out: Any, batch_size: int, hint: str = "output='full', 'trace' and 'diagonal' read every logit") -> torch.Tensor:
    """The model's logits for a batch, [batch_size, k] (a [B] output is k = 1)."""
    logits = returned = _unwrap(out)
    if logits.dim() == 1:
        logits = logits.unsqueeze(1)
    if logits.dim() != 2 or logits.shape[0] != batch_size:
        raise OutputValueError(
            f"model output has shape {tuple(returned.shape)} for a batch of {batch_size}; expected "
            f"[B, k] or [B] with B = {batch_size}. {hint}"
        )
    return logits


def scalarize(out: Any, output: OutputSpec, batch_size: int) -> torch.Tensor:
    """Reduce a model's output for a batch of ``batch_size`` samples to s: [batch_size]."""
    if callable(output) and not isinstance(output, str):
        s = output(out)
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (batch_size,):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise OutputValueError(
                "the output callable must return one scalar per sample, a tensor of shape [B] "
                f"(here B = {batch_size}), but returned {got}"
            )
        return s
    logits = logits_of(out, batch_size, _SHAPE_HINT)
    k = logits.shape[1]
    if output == "first":
        return logits[:, 0]
    if output == "sum":
        return logits.sum(dim=1) / math.sqrt(k)
    if not -k <= output < k:
        raise OutputValueError(f"output={output} is out of range for a model with k={k} outputs (valid: 0 .. {k - 1})")
    return logits[:, output]
