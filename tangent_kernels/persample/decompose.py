"""Fused operations rewritten as the primitive ones the mode has rules for.

A norm's affine parameters enter as ``normalized * weight + bias``: for a layer or RMS
norm over the last dims, one use at the norm's output reads their per-sample gradients
(``AffineUse``); otherwise the call is written that way, and the broadcast rule covers
them (and any other layout of the same op). Multi-head attention
(``F.multi_head_attention_forward``, which ``nn.MultiheadAttention`` calls with its
packed q/k/v projection and an ``out_proj`` whose module is never called) is a Python
function whose inner calls the mode cannot see: it is rewritten here as its linear
projections, scaled dot-product attention and the output projection, batch first, so
that every projection is a linear use. Each rewrite runs only when the call consumes a
parameter and mixes it with data; the spot check against a per-sample evaluation
guards them like every rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .rules import NotCovered, Use, bind, register
from .samples import Samples, by_sample

__all__ = []


def _channels_view(t, ndim: int):
    """A per-channel (dim 1) parameter [C] shaped to broadcast over [B, C, *spatial]."""
    return None if t is None else t.reshape(t.shape[0], *([1] * (ndim - 2)))


def _affine(y, weight, bias):
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _data_input(mode, x, op: str):
    if not mode.is_data(x):
        raise NotCovered(f"a parameter as the input of {op}")


class AffineUse(Use):
    """y = n * w + b after a norm over the last dims (n: the normalized data, w and b
    computed from parameters, of the normalized shape, either absent): the per-sample
    gradient of w is d * n and that of b is d, summed over the dims the norm does not
    normalize (tokens), from the gradient d at y alone. What the broadcast rule would give
    the decomposed ``n * w + b``, with one target instead of a leaf per operand."""

    label = "broadcast"

    def __init__(self, mode, y, normalized, weight, bias, samples: Samples, normalized_dims: int):
        super().__init__([st for d in (weight, bias) if d is not None for st in d.sampled],
                         torch.autograd.graph.get_gradient_edge(y))
        self.batch, self.normalized, self.weight, self.bias, self.samples = \
            mode.batch_size, normalized, weight, bias, samples
        self.normalized_dims = normalized_dims

    def path(self, st) -> str:
        kinds = [d for d in (self.weight, self.bias) if d is not None and st in d.sampled]
        return "broadcast" if all(d.pullback.label == "view" for d in kinds) else \
            f"broadcast ({kinds[0].pullback.label})"

    def contribute(self, d: torch.Tensor, sink) -> None:
        d = by_sample(d, self.samples, self.batch)  # [B, outer, inner, ..., *normalized shape]
        dims = tuple(range(1, d.dim() - self.normalized_dims))  # all but the samples and the normalized
        if self.weight is not None:
            n = by_sample(self.normalized, self.samples, self.batch)
            self.weight.pullback.contribute((d * n).sum(dim=dims), False, sink)
        if self.bias is not None:
            self.bias.pullback.contribute(d.sum(dim=dims), False, sink)


def _norm(mode, a, normalize, weight, bias):
    """A norm over the last dims with its affine parameters: one AffineUse where they are
    computed from parameters with the normalized shape and the samples lie outside the
    normalized dims; else None (the caller decomposes the call)."""
    x, shape = a["input"], a["normalized_shape"]
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    samples = mode.samples(x)
    given = [t for t in (weight, bias) if t is not None]
    derived = [mode.derived(t) for t in given]
    if samples is None or not samples.known() or not samples.fits(x.shape, mode.batch_size) \
            or samples.dim >= x.dim() - len(shape) or any(d is None for d in derived) \
            or any(tuple(t.shape) != shape for t in given):
        return None
    if len(derived) == 2 and set(derived[0].sampled) & set(derived[1].sampled):
        return None  # one tensor in both: the sink counts a use's tensors once
    normalized = normalize()
    y = normalized if weight is None else normalized * weight
    y = y if bias is None else y + bias
    mode.mark_data(y, samples)
    if y.requires_grad:
        mode.add_use(AffineUse(mode, y, normalized, None if weight is None else mode.derived(weight),
                               None if bias is None else mode.derived(bias), samples, len(shape)))
    return y


@register(F.layer_norm)
def layer_norm(mode, func, args, kwargs):
    a = bind(func, args, kwargs)
    _data_input(mode, a["input"], "layer_norm")
    y = _norm(mode, a, lambda: F.layer_norm(a["input"], a["normalized_shape"], None, None, a["eps"]),
              a["weight"], a["bias"])
    if y is not None:
        return y
    return mode.reenter(lambda: _affine(F.layer_norm(a["input"], a["normalized_shape"], None, None, a["eps"]),
                                        a["weight"], a["bias"]))


if hasattr(F, "rms_norm"):
    @register(F.rms_norm)
    def rms_norm(mode, func, args, kwargs):
        a = bind(func, args, kwargs)
        _data_input(mode, a["input"], "rms_norm")
        y = _norm(mode, a, lambda: F.rms_norm(a["input"], a["normalized_shape"], None, a["eps"]),
                  a["weight"], None)
        if y is not None:
            return y
        return mode.reenter(lambda: _affine(F.rms_norm(a["input"], a["normalized_shape"], None, a["eps"]),
                                            a["weight"], None))


@register(F.group_norm)
def group_norm(mode, func, args, kwargs):
    a = bind(func, args, kwargs)
    x = a["input"]
    _data_input(mode, x, "group_norm")
    return mode.reenter(lambda: _affine(F.group_norm(x, a["num_groups"], None, None, a["eps"]),
                                        _channels_view(a["weight"], x.dim()), _channels_view(a["bias"], x.dim())))


@register(F.batch_norm)
def batch_norm(mode, func, args, kwargs):
    a = bind(func, args, kwargs)
    x = a["input"]
    _data_input(mode, x, "batch_norm")
    if a["training"] or a["running_mean"] is None or a["running_var"] is None:
        raise NotCovered("batch statistics (training=True, or no running statistics): samples interact")
    if mode.derived(a["running_mean"]) is not None or mode.derived(a["running_var"]) is not None:
        raise NotCovered("running statistics computed from parameters")
    return mode.reenter(lambda: _affine(
        F.batch_norm(x, a["running_mean"], a["running_var"], None, None, False, a["momentum"], a["eps"]),
        _channels_view(a["weight"], x.dim()), _channels_view(a["bias"], x.dim())))


def _additive_mask(mask, dtype):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


@register(F.multi_head_attention_forward)
def multi_head_attention(mode, func, args, kwargs):
    a = bind(func, args, kwargs)
    query = a["query"]
    if query.dim() != 3:
        raise NotCovered("unbatched attention")
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
        raise NotCovered("bias_k / bias_v / add_zero_attn")
    if a["static_k"] is not None or a["static_v"] is not None:
        raise NotCovered("static keys or values")
    if a["training"] and a["dropout_p"] > 0:
        raise NotCovered("attention dropout in training mode")
    if a["is_causal"] and a["attn_mask"] is None:
        raise NotCovered("is_causal without attn_mask")
    samples = mode.samples_of(query, "the query")
    if samples.dim != 1:
        raise NotCovered(f"query of shape {list(query.shape)}: batch {mode.batch_size} is not its dim 1")
    return mode.reenter(_attention, a)


def _attention(a):
    """F.multi_head_attention_forward's result for the arguments ``a`` (seq-first [L, N, E])."""
    query, key, value, heads = a["query"], a["key"], a["value"], a["num_heads"]
    length, batch, embed = query.shape
    head_dim = embed // heads
    q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [N, L, E]: batch first
    bias = a["in_proj_bias"]
    biases = (None,) * 3 if bias is None else bias.chunk(3)
    if a["use_separate_proj_weight"]:
        q, k, v = (F.linear(t, w, b) for t, w, b in
                   zip((q, k, v), (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]), biases))
    elif query is key and key is value:
        q, k, v = F.linear(q, a["in_proj_weight"], bias).chunk(3, dim=-1)
    else:
        q, k, v = (F.linear(t, w, b) for t, w, b in zip((q, k, v), a["in_proj_weight"].chunk(3), biases))
    source = k.shape[1]
    q, k, v = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # [N, H, L, hd]
    mask = _additive_mask(a["attn_mask"], q.dtype)
    if mask is not None:
        mask = mask.reshape(1, 1, length, source) if mask.dim() == 2 else mask.reshape(batch, heads, length, source)
    padding = _additive_mask(a["key_padding_mask"], q.dtype)
    if padding is not None:
        padding = padding.reshape(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    weights = None
    if a["need_weights"]:
        scores = (q * (1.0 / math.sqrt(head_dim))) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        out = weights @ v
        if a["average_attn_weights"]:
            weights = weights.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = out.transpose(1, 2).reshape(batch, length, embed)
    out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"])
    return out.transpose(0, 1), weights
