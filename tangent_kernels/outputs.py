"""Scalarizing model outputs: which scalar s(x) the eNTK differentiates.

``output`` is one of
- ``"first"``: logit 0, the seed's one-output reduction;
- ``"sum"``: the sum of the k logits divided by sqrt(k), the pseudo-NTK (pNTK);
- an int j: logit j;
- a callable mapping the model's (unwrapped) output to a [B] tensor;
- ``"full"``, ``"trace"``, ``"diagonal"``: every logit, for the k x k eNTK
  ([n1, n2, k, k]), its trace over outputs ([n1, n2]) or its diagonal ([n1, n2, k]);
- ``OutputProbes(m, kind, seed)``: m random probes over the logits, an unbiased
  estimate of the trace (below).

Model outputs may be a tensor [B, k] or [B], or an object / dict holding ``logits``
(Hugging Face ``ModelOutput`` and the like).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

__all__ = ["MULTI_OUTPUTS", "PER_SAMPLE_ROWS", "OutputError", "OutputProbes", "OutputSpec", "check_output_spec", "is_multi", "logits_of",
           "probe_error", "probed", "scalarize"]

# The outputs that keep every logit: the kernel gets an output axis (tiles.blocked_gram).
MULTI_OUTPUTS = ("full", "trace", "diagonal")
# The outputs whose features are stored one row per sample, the k logits side by side
# [k * p]: the trace is the Gram of those rows, the diagonal k Grams of their column
# blocks (tiles), never the k^2 cross products; output="full" needs them all and stores a
# row per (sample, logit). Checkpoints record the layout (request.FEATURES_LAYOUT).
PER_SAMPLE_ROWS = ("trace", "diagonal")


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
    if isinstance(output, OutputProbes):
        return output
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


def logits_of(out: Any, batch_size: Optional[int],
              hint: str = "output='full', 'trace' and 'diagonal' read every logit") -> torch.Tensor:
    """The model's logits for a batch, [batch_size, k] (a [B] output is k = 1);
    ``batch_size`` None: any B."""
    logits = returned = _unwrap(out)
    if logits.dim() == 1:
        logits = logits.unsqueeze(1)
    if logits.dim() != 2 or (batch_size is not None and logits.shape[0] != batch_size):
        size = "B" if batch_size is None else batch_size
        raise OutputValueError(
            f"model output has shape {tuple(returned.shape)} for a batch of {size}; expected "
            f"[B, k] or [B] with B = {size}. {hint}"
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


# Random output probes ----------------------------------------------------------------
# Random output probes: the trace kernel of a model with many logits, estimated.
#
# For probe vectors v_1 .. v_m in R^k with E[v v^T] = I (Rademacher: entries +-1; Gaussian:
# N(0, 1)), the scalar outputs s_r(x) = v_r . f(x) have kernels
#
#    K_r(x, x') = v_r^T J(x) J(x')^T v_r,   E[K_r] = tr(J(x) J(x')^T) = sum_a K_aa(x, x'),
#
# so the mean of the m probe kernels is an unbiased estimate of ``output="trace"`` at the
# cost of m logits instead of k (one forward, m backward passes; m Grams of one logit's
# size). Per entry, with A = J(x) J(x')^T (k x k, not symmetric for x != x'):
#
#    Var[K_r] = sum_{a != b} A_ab (A_ab + A_ba)           (Rademacher)
#    Var[K_r] = sum_{a, b} A_ab (A_ab + A_ba)             (Gaussian: + 2 sum_a A_aa^2)
#
# and the mean of m probes has 1/m of it: Rademacher has the smaller variance, and none
# at all when the cross-logit blocks vanish. ``probe_error`` estimates the standard error
# of each entry from the m probe kernels themselves (``reduce=False``). docs/outputs.md has
# the measured accuracy against the pNTK and the exact trace.
#
# The probes are evaluated through a forward hook on the model that maps its logits f(x)
# [B, k] to V f(x) [B, m] for the duration of the call (removed after it, also on error):
# the engine then computes the m probe outputs as it computes k logits, with every path
# (structured, stores, checkpoints, the per-batch check) unchanged.

PROBE_KINDS = ("rademacher", "gaussian")


@dataclass(frozen=True)
class OutputProbes:
    """``output=tk.OutputProbes(m, kind, seed)``: m random probes over the logits.

    tk.gram returns the estimate of the trace kernel, the mean of the m probe kernels
    [n1, n2] (``reduce=True``), or the m probe kernels themselves [n1, n2, m]
    (``reduce=False``; their mean is the estimate, ``probe_error`` its standard error).
    tk.features returns the probe outputs' gradients [n, m, p]. The probe vectors are
    drawn from torch's CPU generator seeded with ``seed``: the same for the same
    (m, kind, seed, k) everywhere.
    """

    m: int
    kind: str = "rademacher"
    seed: int = 0
    reduce: bool = True

    def __post_init__(self):
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise ValueError(f"OutputProbes: m must be an int >= 1 (the number of probes); got {self.m!r}")
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"OutputProbes: kind must be one of {PROBE_KINDS}; got {self.kind!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"OutputProbes: seed must be an int; got {self.seed!r}")
        if not isinstance(self.reduce, bool):
            raise TypeError(f"OutputProbes: reduce must be True or False; got {self.reduce!r}")

    def vectors(self, k: int) -> torch.Tensor:
        """V [m, k] in float64 on the CPU: row r is probe v_r (E[v v^T] = I)."""
        return _probe_vectors(self.m, self.kind, self.seed, k)


def _probe_vectors(m: int, kind: str, seed: int, k: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "rademacher":
        return torch.randint(0, 2, (m, k), generator=generator).double().mul_(2).sub_(1)
    return torch.randn(m, k, generator=generator, dtype=torch.float64)


def probe_error(per_probe: torch.Tensor) -> torch.Tensor:
    """Standard error of the probe estimate, per entry: the sample standard deviation of
    the m probe kernels (``OutputProbes(..., reduce=False)``, [..., m]) over sqrt(m)."""
    m = per_probe.shape[-1]
    if m < 2:
        raise ValueError("probe_error needs at least 2 probes (m >= 2) to estimate a variance")
    return per_probe.std(dim=-1) / math.sqrt(m)


@contextlib.contextmanager
def probed(model: nn.Module, probes: OutputProbes):
    """The model's logits replaced by the m probe outputs V f(x) [B, m] inside the block.
    The hook holds plain values (m, kind, seed), which a checkpoint's fingerprint of the
    model's hooks reads: a resume with other probes is refused."""
    m, kind, seed, cache = probes.m, probes.kind, probes.seed, {}

    def hook(module, args, out):
        logits = logits_of(out, None, "OutputProbes reads every logit")
        k = logits.shape[1]
        if k not in cache:
            cache[k] = _probe_vectors(m, kind, seed, k)
        return logits @ cache[k].to(logits.device, logits.dtype).T

    handle = model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
