"""Jacobian backends for laplace-torch (``laplace``) on tangent_kernels' fused per-sample path.

Before::

    from laplace import Laplace
    la = Laplace(model, "classification", subset_of_weights="subnetwork", hessian_structure="full",
                 subnetwork_indices=indices)

After::

    from laplace import Laplace
    from tangent_kernels.compat.laplace import TangentKernelsGGN
    la = Laplace(model, "classification", subset_of_weights="subnetwork", hessian_structure="full",
                 subnetwork_indices=indices, backend=TangentKernelsGGN)

``TangentKernelsGGN`` is a laplace-torch ``GGNInterface`` whose ``jacobians(x)`` returns
``(Js [B, O, P], f [B, O])`` from one batched forward and O batched backward passes
(tk.features with ``output="full"``; f from one more forward, without gradients),
restricted to ``subnetwork_indices`` *before* any Jacobian is formed: only the P_subnet
sampled columns are ever computed, where laplace-torch's own ``jacobians`` forms all P
columns and then indexes them. Everything laplace-torch builds on ``jacobians`` uses it:
the full and diagonal GGN (``fit`` of FullLaplace, DiagLaplace, FullSubnetLaplace,
DiagSubnetLaplace) and the linearized (GLM) predictive of every Laplace class.
``TangentKernelsEF`` does the same for the empirical Fisher (``gradients(x, y)``:
per-sample loss gradients as J^T dL/df from one backward).

Not covered: Kronecker-factored curvature (``kron`` raises NotImplementedError naming
laplace-torch's BackPACK/ASDL/curvlinops backends). Left to laplace-torch's own code:
last-layer Jacobians (already closed form there) and ``enable_backprop=True`` (Jacobians
differentiable with respect to the input), for which ``jacobians`` calls laplace-torch's
torch.func implementation.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Optional, Tuple

import torch
from torch import nn

from .._model import eval_mode
from ..outputs import logits_of
from ._extract import BatchFeatures, DictArgument, WeightedLogits, index_on

try:
    from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
except ImportError as missing:  # pragma: no cover - laplace-torch is in the project's test tools
    raise ImportError(
        "tangent_kernels.compat.laplace adapts laplace-torch, which is not installed: pip install laplace-torch"
    ) from missing

__all__ = ["TangentKernelsEF", "TangentKernelsGGN"]


class _Jacobians:
    """The per-sample computation both backends share. ``tk_backend`` is tk.features'
    ``backend=`` (pass it through Laplace's ``backend_kwargs``)."""

    tk_backend = "auto"

    def jacobians(self, x, enable_backprop: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Js [B, O, P] (P: the subnetwork's indices, or every trainable parameter) and
        f [B, O] at the current parameters, detached."""
        if enable_backprop:  # differentiable in x: laplace-torch's own torch.func path
            return CurvatureInterface.jacobians(self, x, enable_backprop=True)
        args, kwargs = self._arguments(x)
        js = self._extractor("jacobians", x)(args=args, kwargs=kwargs)
        return js, self._logits(x).to(js.dtype)

    functorch_jacobians = CurvatureInterface.jacobians

    def selected_output_jacobians(self, x, outputs: torch.Tensor, enable_backprop: bool = False):
        """laplace-torch's selected-output Jacobians [B, S, P], gathered from ours."""
        js, f = self.jacobians(x, enable_backprop=enable_backprop)
        outputs = outputs[:, None] if outputs.ndim == 1 else outputs
        if outputs.shape[0] != js.shape[0]:
            raise ValueError(f"outputs has {outputs.shape[0]} rows for a batch of {js.shape[0]}: one row of output "
                             "indices per input")
        index = outputs.to(js.device, torch.long).unsqueeze(-1).expand(-1, -1, js.shape[-1])
        return torch.gather(js, 1, index), f

    def kron(self, x, y, N: int, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} has no Kronecker-factored curvature (hessian_structure='kron'): it supplies "
            "Jacobians and per-sample gradients, which 'full' and 'diag' (and subnetwork Laplace) use. For KFAC use "
            "laplace-torch's BackPackGGN, AsdlGGN or CurvlinopsGGN backend"
        )

    @staticmethod
    def _arguments(x) -> Tuple[tuple, dict]:
        return ((), dict(x)) if isinstance(x, MutableMapping) else ((x,), {})

    def _extractor(self, kind: str, x) -> BatchFeatures:
        """The features of the model call ``self.model(x)``: every output ("jacobians") or
        the weighted sum of outputs whose gradient is J^T w ("weighted")."""
        # Rebuilt when the subnetwork or the parameters change (SubnetLaplace sets the
        # indices after construction; marglik training steps the parameters): the
        # first-batch decisions and the spot check hold for one model state.
        indices, takes_dict = self.subnetwork_indices, isinstance(x, MutableMapping)
        key = (kind, takes_dict, None if indices is None else (indices.data_ptr(), indices.numel(), indices._version),
               tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.model.parameters()))
        cache = self.__dict__.setdefault("_tk_extractors", {})
        if key not in cache:
            for stale in [k for k in cache if k[:2] == key[:2]]:
                del cache[stale]
            module = DictArgument(self.model) if takes_dict else self.model
            if kind == "weighted":
                module = WeightedLogits(module)
            positions = None if indices is None else indices.detach().cpu()
            output = "full" if kind == "jacobians" else "first"
            cache[key] = BatchFeatures(module, index_on(module, positions), output, backend=self.tk_backend)
        return cache[key]

    def _logits(self, x) -> torch.Tensor:
        with torch.no_grad(), eval_mode(self.model):  # as the Jacobians see it
            out = self.model(x)
        return logits_of(out, _batch_size(x), "laplace-torch's model must return [B, O] outputs")


def _batch_size(x) -> int:
    if isinstance(x, MutableMapping):
        for value in x.values():
            if isinstance(value, torch.Tensor) and value.dim():
                return int(value.shape[0])
        raise ValueError("the input dict holds no batched tensor (one whose first dimension is the batch)")
    return int(x.shape[0])


class TangentKernelsGGN(_Jacobians, GGNInterface):
    """laplace-torch's GGN curvature with Jacobians from tangent_kernels."""

    def __init__(self, model: nn.Module, likelihood, last_layer: bool = False, subnetwork_indices=None,
                 dict_key_x: str = "input_ids", dict_key_y: str = "labels", stochastic: bool = False,
                 num_samples: int = 1, tk_backend: str = "auto") -> None:
        self.tk_backend = tk_backend
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y,
                         stochastic, num_samples)


class TangentKernelsEF(_Jacobians, EFInterface):
    """laplace-torch's empirical Fisher with per-sample loss gradients from
    tangent_kernels (and Jacobians for the linearized predictive)."""

    def __init__(self, model: nn.Module, likelihood, last_layer: bool = False, subnetwork_indices=None,
                 dict_key_x: str = "input_ids", dict_key_y: str = "labels", tk_backend: str = "auto") -> None:
        self.tk_backend = tk_backend
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)

    def gradients(self, x, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gs [B, P]: per-sample gradients of laplace-torch's loss (summed cross-entropy or
        squared error), and the batch's loss. The loss's derivative with respect to the
        outputs, w, is taken from the logits, and Gs = J^T w comes from one backward."""
        f = self._logits(x).detach().requires_grad_(True)
        loss = self.lossfunc(f, y.to(f.device))
        (weights,) = torch.autograd.grad(loss, f)  # per sample: rows of a summed loss do not mix
        args, kwargs = self._arguments(x)
        gs = self._extractor("weighted", x)(args=args, kwargs={**kwargs, "weights": weights})
        return gs, loss.detach()
