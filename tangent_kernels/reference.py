"""The naive eNTK: ground truth and baseline.

One ``torch.autograd.grad`` per sample (per sample and logit for the every-logit
outputs, over one forward), in float64, no batching, every trainable parameter's full
gradient, then the sampled positions. Each sample is evaluated alone
(as a batch of two copies of itself, ``ModelInputs.alone``: batches of one take other
kernels, where torch has had bugs). Deliberately simple: every
fast path in the package is tested against this.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn


from ._model import eval_mode, functional_state, gradients_on, model_device, substituted
from .data import iterate_inputs
from .outputs import OutputProbes, OutputSpec, check_output_spec, is_multi, logits_of, probed, scalarize
from .params import resolve_idx

__all__ = ["features_autograd", "gram_autograd"]


def features_autograd(
    model: nn.Module,
    loader: Iterable,
    idx=None,
    *,
    output: OutputSpec = "first",
    inputs: Optional[Callable[[Any], Any]] = None,
) -> torch.Tensor:
    """Per-sample gradients at ``idx`` in float64: [n, p] on the model's device; for
    output="full", "trace" or "diagonal" every logit's, [n, k, p] (as ``tk.features``);
    for ``OutputProbes`` the m probe outputs', [n, m, p]."""
    if isinstance(output, OutputProbes):
        with probed(model, output):
            return features_autograd(model, loader, idx, output="full", inputs=inputs)
    index = resolve_idx(model, idx)
    output = check_output_spec(output)
    multi = is_multi(output)
    device = model_device(model)
    positions = index.positions.to(device)
    rows = []
    with eval_mode(model), gradients_on():
        trainable, rest = functional_state(model, index.layout, torch.float64, device)
        leaves = [trainable[name].requires_grad_(True) for name in index.layout.names]
        for batch in iterate_inputs(loader, inputs):
            batch = batch.to(device, torch.float64)
            for b in range(batch.size):
                sample = batch.alone(b)  # sample b alone, as two copies: never a batch of one

                def gradients():  # inside the swap: a forward recomputed in the backward sees it too
                    out = model(*sample.args, **sample.kwargs)
                    scalars = logits_of(out, sample.size)[0] if multi else \
                        scalarize(out, output, sample.size)[:1]
                    # One backward per logit over the one forward; an output that no
                    # parameter reaches has zero gradient (autograd would refuse it).
                    return [torch.autograd.grad(s, leaves, allow_unused=True, retain_graph=a + 1 < len(scalars))
                            if s.requires_grad else [None] * len(leaves) for a, s in enumerate(scalars)]

                per_output = substituted(model, (trainable, rest), gradients,
                                         [*sample.args, *sample.kwargs.values()])
                flat = torch.stack([
                    torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(leaves, grads)])
                    for grads in per_output])
                rows.append(flat[:, positions] if multi else flat[0, positions])
    return torch.stack(rows)


def gram_autograd(
    model: nn.Module,
    loader: Iterable,
    idx=None,
    loader2: Optional[Iterable] = None,
    *,
    output: OutputSpec = "first",
    inputs: Optional[Callable[[Any], Any]] = None,
) -> torch.Tensor:
    """K[i, j] = <g(x_i), g(x_j)> in float64, [n1, n2]; ``loader2=None`` means K(X, X).
    Every logit (docs/outputs.md): output="full" gives K[i, j, a, b] [n1, n2, k, k],
    "trace" sum_a K[i, j, a, a] [n1, n2], "diagonal" K[i, j, a, a] [n1, n2, k];
    ``OutputProbes``: the mean of the m probe kernels [n1, n2] (or each, [n1, n2, m])."""
    if isinstance(output, OutputProbes):
        g1 = features_autograd(model, loader, idx, output=output, inputs=inputs)
        g2 = g1 if loader2 is None else features_autograd(model, loader2, idx, output=output, inputs=inputs)
        per_probe = torch.einsum("iap,jap->ija", g1, g2)
        return per_probe.mean(dim=-1) if output.reduce else per_probe
    g1 = features_autograd(model, loader, idx, output=output, inputs=inputs)
    g2 = g1 if loader2 is None else features_autograd(model, loader2, idx, output=output, inputs=inputs)
    if not is_multi(output):
        return g1 @ g2.T
    contraction = {"full": "iap,jbp->ijab", "trace": "iap,jap->ij", "diagonal": "iap,jap->ija"}[output]
    return torch.einsum(contraction, g1, g2)
