"""Per-sample gradient features one batch at a time, for the adapters whose host library
hands them batches (TRAK's featurize, laplace-torch's jacobians): one FeatureExtractor
kept across calls, so the first-batch decisions (which rule serves each tensor, the spot
check against a per-sample evaluation) are made once, not on every batch as one
``tk.features`` call per batch would."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .._model import eval_mode, model_device
from ..outputs import logits_of
from ..data import ModelInputs
from ..params import ParamIndex, resolve_idx
from ..persample import FeatureExtractor, resolve_backend
from ..precisions import fp32_math
from ..request import check_model

__all__ = ["BatchFeatures", "DictArgument", "WeightedLogits", "compute_dtype", "index_on"]


class WeightedLogits(nn.Module):
    """model -> <w_b, f(x_b)> per sample. For w held fixed its gradient is J(x_b)^T w_b:
    the gradient of any function of the logits (a margin, a loss) at one backward pass,
    with w its derivative with respect to the logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, weights: torch.Tensor, **kwargs) -> torch.Tensor:
        logits = logits_of(self.model(*args, **kwargs), weights.shape[0])
        return (logits * weights).sum(dim=1)


class DictArgument(nn.Module):
    """model(x) for a model that takes one dict of tensors, called with x's items as
    keyword arguments, so that the batch's tensors can be sliced per sample."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **items):
        return self.model(items)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """float64 when the model holds float64 parameters (the reference precision the
    adapted libraries' tests use), else float32."""
    return torch.float64 if any(p.dtype == torch.float64 for p in model.parameters()) else torch.float32


def index_on(model: nn.Module, idx, like: Optional[nn.Module] = None) -> ParamIndex:
    """``idx`` (None, positions or a ParamIndex of ``like``) as a ParamIndex of ``model``,
    which must have ``like``'s parameters in the same order (a wrapper around it)."""
    if like is not None and isinstance(idx, ParamIndex):
        idx = resolve_idx(like, idx).positions
    return resolve_idx(model, idx)


class BatchFeatures:
    """``self(args=, kwargs=)``: F [B, p] (or [B, k, p] for ``output="full"``) of one batch, in
    the model's compute dtype, on the model's device; the model is left as it was."""

    def __init__(self, model: nn.Module, index: ParamIndex, output, *, backend: str = "auto",
                 dtype: Optional[torch.dtype] = None):
        check_model(model)
        self.model, self.index = model, index
        self.dtype = compute_dtype(model) if dtype is None else dtype
        self.device = model_device(model)
        self.extractor = FeatureExtractor(model, index, output, self.dtype, self.device,
                                          resolve_backend(backend, self.device))

    def __call__(self, *, args: Tuple = (), kwargs: Optional[Dict[str, Any]] = None) -> torch.Tensor:
        """Features of the model call ``model(*args, **kwargs)`` on one batch."""
        from ..feature_phase import check_finite

        kwargs = dict(kwargs or {})
        inputs = ModelInputs.of(tuple(args), kwargs)
        inputs = inputs.to(self.device, self.dtype)
        with eval_mode(self.model), fp32_math(False):
            block = self.extractor(inputs)
        check_finite(block, 0, "the batch")
        return block
