"""LM-Kernel-FT's (princeton-nlp/LM-Kernel-FT) kernel computation on tangent_kernels.

LM-Kernel-FT is a research repository, not a package: its ``KernelTrainerFunc`` computes
the eNTK of a prompt-based masked LM with torch.func (``jacrev`` over each outer batch,
``vmap(vmap(jvp))`` over each inner batch) in ``compute_kernel_sharded``, returning a
float64 kernel laid out ``[N_outer, C, N_inner, C]`` and the inner targets, which
``reshape_kernel_and_targets`` and its kernel solvers then read.

Before (src/kernel_trainer.py)::

    trainer = KernelTrainerFunc(model=model, args=training_args, ...)

After (the same trainer, its kernel computed here)::

    from tangent_kernels.compat import lm_kernel_ft
    KernelTrainerFunc.compute_kernel_sharded = lm_kernel_ft.compute_kernel_sharded
    trainer = KernelTrainerFunc(model=model, args=training_args, ...)

or, outside the trainer, ``lm_kernel_ft.compute_kernel(model, outer_loader, inner_loader)``.
Same layout, dtype (float64, on the CPU) and meaning as LM-Kernel-FT's:
``K[i, a, j, b] = <d f_a(x_i) / d theta, d f_b(x_j) / d theta>`` over the trainable
parameters, where f is LM-Kernel-FT's ``LogitModelWrapper`` output (the label-word logits,
or logit 1 - logit 0 under ``binary_classification``, C = 1); ``kernel_formula`` "sgd"
(that inner product), "signgd" (of the gradients' signs) or "asymmetric_signgd" (sign of
the outer gradient against the inner one). Gradients are computed in float32 and K
returned in float64, as LM-Kernel-FT does; ``precision="fp64"`` computes in float64
throughout (a float64 copy of the model's state). ``idx`` restricts the kernel to a
parameter subsample (tk.subsample). For "sgd" and K(X, X) only the lower triangle of
sample tiles is computed. Under torch.distributed (``args.local_rank != -1``) every rank
computes the whole kernel (the same result as LM-Kernel-FT's gather, with no sharding).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional, Tuple

import torch
from torch import nn

from ..outputs import logits_of
from ._extract import compute_dtype, index_on

__all__ = ["FORMULAS", "LogitModel", "compute_kernel", "compute_kernel_sharded"]

FORMULAS = ("sgd", "signgd", "asymmetric_signgd")
# The model arguments LM-Kernel-FT's LogitModelWrapper passes on; labels stay out.
_MODEL_KEYS = ("input_ids", "attention_mask", "mask_pos")


class LogitModel(nn.Module):
    """LM-Kernel-FT's ``LogitModelWrapper``: ``model(input_ids, attention_mask,
    mask_pos=mask_pos)[0]`` ([B, C]), or its logit 1 - logit 0 ([B, 1]) for binary
    classification."""

    def __init__(self, model: nn.Module, binary_classification: bool = False):
        super().__init__()
        self.model, self.binary_classification = model, binary_classification

    def forward(self, input_ids, attention_mask=None, mask_pos=None):
        out = self.model(input_ids, attention_mask, mask_pos=mask_pos)
        logits = out[0] if isinstance(out, (tuple, list)) else logits_of(out, input_ids.shape[0])
        if self.binary_classification:
            if logits.shape[1] != 2:
                raise ValueError(f"binary_classification needs 2 logits, the model gave {logits.shape[1]}")
            logits = (logits[:, 1] - logits[:, 0]).unsqueeze(-1)
        return logits


def _model_inputs(batch: Any) -> dict:
    if not isinstance(batch, dict):
        raise TypeError(f"LM-Kernel-FT's loaders yield dicts (input_ids, attention_mask, mask_pos, labels); got a "
                        f"{type(batch).__name__}")
    return {key: batch[key] for key in _MODEL_KEYS if batch.get(key) is not None}


def _check_formula(kernel_formula: str) -> None:
    if kernel_formula not in FORMULAS:
        raise ValueError(f"kernel_formula={kernel_formula!r}: LM-Kernel-FT's torch.func kernels are {FORMULAS}")


def compute_kernel(model: nn.Module, loader_outer: Iterable, loader_inner: Optional[Iterable] = None, *,
                   kernel_formula: str = "sgd", binary_classification: bool = False, idx=None,
                   precision: str = "fp32", backend: str = "auto", progress=False) -> torch.Tensor:
    """The kernel [N_outer, C, N_inner, C], float64 on the CPU, between two loaders of
    LM-Kernel-FT batches (dicts); ``loader_inner=None`` means ``loader_outer``."""
    from .. import pipeline

    _check_formula(kernel_formula)
    if precision not in ("fp32", "fp64"):
        raise ValueError(f"precision={precision!r}: 'fp32' (LM-Kernel-FT's: float32 gradients, float64 K) or 'fp64'")
    if compute_dtype(model) == torch.float64:
        precision = "fp64"
    wrapped = LogitModel(model, binary_classification)
    idx = index_on(wrapped, idx, like=model)
    common = dict(precision=precision, backend=backend, progress=progress, inputs=_model_inputs)
    if kernel_formula == "sgd":
        k = pipeline.gram(wrapped, loader_outer, idx, loader_inner, output="full", **common)
        return k.permute(0, 2, 1, 3).to("cpu", torch.float64).contiguous()
    # The sign kernels need the gradients themselves (a sign is not a Gram of features):
    # [N, C, p] per side in memory (pass idx for a large model), one float64 contraction.
    outer = pipeline.features(wrapped, loader_outer, idx, output="full", **common)
    inner = outer if loader_inner is None else pipeline.features(wrapped, loader_inner, idx, output="full", **common)
    outer = outer.sign().double()
    inner = (inner.sign() if kernel_formula == "signgd" else inner).double()
    return torch.einsum("ocp,idp->ocid", outer, inner).cpu()


def _targets(loader: Iterable, binary_classification: bool) -> torch.Tensor:
    labels = []
    for batch in loader:
        label = batch.get("labels")
        if binary_classification:
            label = (label * 2 - 1).float()  # LM-Kernel-FT's {0, 1} -> {-1, 1}
        labels.append(label)
    return torch.cat(labels, dim=0) if labels else torch.tensor([])


def compute_kernel_sharded(self, dataset_outer, dataset_inner, *, idx=None, precision: str = "fp32",
                           backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """LM-Kernel-FT's ``KernelTrainerFunc.compute_kernel_sharded``: (kernel
    [N_outer, C, N_inner, C] float64 on the CPU, inner targets), read from the trainer as
    LM-Kernel-FT reads it (``self.model``, ``self.args``, ``self.get_unshuffled_dataloader``).
    Assign it to the class (module docstring); the keywords are tangent_kernels' own."""
    args = self.args
    _check_formula(args.kernel_formula)
    frozen = [name for name, p in self.model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"{len(frozen)} parameter tensor(s) are frozen (requires_grad=False), e.g. {frozen[0]!r}: LM-Kernel-FT "
            "differentiates every parameter it leaves in the model (it excludes parameters by turning them into "
            "buffers, param_to_buffer), and tangent_kernels never changes the model's flags. Unfreeze them, or "
            "turn them into buffers as LM-Kernel-FT does"
        )
    if getattr(args, "local_rank", -1) != -1:
        warnings.warn("compute_kernel_sharded: every rank computes the whole kernel (tangent_kernels does not shard "
                      "LM-Kernel-FT's outer loop); the result is the gathered kernel LM-Kernel-FT returns",
                      RuntimeWarning, stacklevel=2)
    outer = self.get_unshuffled_dataloader(dataset_outer, sharded=False, batch_size=args.per_device_train_batch_size)
    inner = (None if dataset_inner is dataset_outer else
             self.get_unshuffled_dataloader(dataset_inner, sharded=False, batch_size=args.per_device_eval_batch_size))
    kernel = compute_kernel(self.model, outer, inner, kernel_formula=args.kernel_formula,
                            binary_classification=args.binary_classification, idx=idx, precision=precision,
                            backend=backend)
    targets = _targets(outer if inner is None else inner, args.binary_classification)
    if getattr(self, "grad_dim", None) is None:
        from ..params import resolve_idx

        self.grad_dim = len(resolve_idx(self.model, idx))
    return kernel, targets
