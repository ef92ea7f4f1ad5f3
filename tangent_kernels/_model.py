"""Evaluating a model without disturbing it.

Every gradient tangent_kernels takes goes through ``torch.func.functional_call`` on
detached copies of the parameters and buffers, in eval mode: the user's module keeps
its mode, its parameters, its buffers and its ``.grad`` exactly as they were.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .params import ParamLayout

__all__ = ["eval_mode", "exact_fp32_math", "functional_state", "model_device"]


@contextmanager
def eval_mode(model: nn.Module):
    """eval() for the duration, then every submodule's own training flag restored."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def exact_fp32_math():
    """Disable TF32 in matmuls and cuDNN convolutions: "fp32" must mean fp32."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def functional_state(
    model: nn.Module, layout: ParamLayout, dtype: torch.dtype, device: Optional[torch.device]
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(trainable, rest): detached copies for ``functional_call``, floats cast to ``dtype``.

    ``trainable`` is keyed by the layout's names (tied parameters once, which
    functional_call's weight tying propagates to every alias); ``rest`` holds the
    frozen parameters and the buffers.
    """

    def copy(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)

    trainable_names = set(layout.names)
    trainable, rest = {}, {}
    for name, p in model.named_parameters():
        (trainable if name in trainable_names else rest)[name] = copy(p)
    for name, b in model.named_buffers():
        rest[name] = copy(b)
    return trainable, rest
