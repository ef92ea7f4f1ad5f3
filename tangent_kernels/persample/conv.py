"""Convolutions with a parameter weight or bias: ``F.conv1d``, ``F.conv2d``, ``F.conv3d``.

W[o, c, k...]'s per-sample gradient is sum_pos d[b, o, pos] a_pad[b, c', pos * stride +
k * dilation] (c' the input channel of c in o's group); only the sampled entries are
formed. The padded input is made when the gradient is read, not held from the forward.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from .. import sampled
from ..structured.plan import FactorForm
from .backends import conv_kernel, writes_in_place
from .linear import _view_of_parameter
from .rules import NotCovered, Sink, Use, register, whole_vector
from .views import is_the_leaf

__all__ = ["ConvUse"]

_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
# Sampled fraction of a convolution weight from which, on a CPU, the whole per-sample
# gradients (one convolution backward, batch as groups) are formed and gathered instead of
# the sampled dots: the backward costs ~the whole weight at oneDNN speed, the dots ~8 ns per
# sampled entry and position (docs/persample.md). resnet18 at 32x32, idx=None, k = 10:
# 48.5 s -> see bench/bench_compat.py.
_DENSE_CONV_FRACTION = 0.1
# Of the two ways to form whole per-sample gradients, the grouped convolution backward
# wins for many output positions T and narrow patches, F.unfold + one batched GEMM
# [O, T] x [T, C k] when the patch width C k is at least this many times T (2-core CPU,
# min of 5, ms, grouped / unfold+bmm: B 256 16->32 at 8x8 2.1 / 5.1; 64x64 at 16x16
# 26 / 51; 64x64 at 8x8 9.6 / 5.2; 128x128 at 4x4 47 / 17; 256x256 at 2x2 173 / 75:
# resnet18's layer2 at 32x32 inputs).
_UNFOLD_MIN_PATCH_PER_POSITION = 8
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _per_dim(value, ndim: int, what: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * ndim
    if len(value) != ndim:
        raise NotCovered(f"{what} {value} for {ndim} spatial dims")
    return value


def _pads(padding, kernel, dilation) -> Tuple[int, ...]:
    """F.pad's argument (last dim first) for the convolution's padding."""
    if padding == "valid":
        return (0, 0) * len(kernel)
    if padding == "same":
        # As torch does for 'same': the total is split, the odd element going to the end.
        pairs = [(dl * (k - 1) // 2, dl * (k - 1) - dl * (k - 1) // 2) for k, dl in zip(kernel, dilation)]
    else:
        pairs = [(p, p) for p in _per_dim(padding, len(kernel), "padding")]
    return tuple(v for pair in reversed(pairs) for v in pair)


class ConvUse(Use):
    label = "conv"

    def __init__(self, mode, a, z, weight, bias, stride, pads, dilation, groups):
        super().__init__([p.st for p in (weight, bias) if p is not None], torch.autograd.graph.get_gradient_edge(z),
                         guarded=[a])
        self.backend = mode.backend
        self.a, self.weight, self.bias = a, weight, bias
        self.stride, self.pads, self.dilation, self.groups = stride, pads, dilation, groups
        self.positions = math.prod(z.shape[2:])

    def factor_form(self, st):
        """The whole weight of an ungrouped 1-D/2-D convolution, as a linear map of the
        unfolded input: [O, C * prod(k)] over the output positions as tokens."""
        w = self.weight
        if w is None or w.st is not st or self.groups != 1 or st.leaf.dim() not in (3, 4):
            return None
        if not is_the_leaf(w.geometry, st.leaf):
            return None
        size = w.geometry[0]
        return FactorForm(1, math.prod(size[1:]), size[0], self.positions)

    def absorbable_bias(self, st):
        form = self.factor_form(st)
        return None if form is None or self.bias is None else whole_vector(self.bias, form.g_dim)

    def _factors(self, d: torch.Tensor, a_pad=None, rows: slice = slice(None)):
        """(x [B, L, C * prod(k)], g [B, L, O]): F.unfold's patch order (c, k...) is the
        weight's own, so the factors' outer products are its gradient in place. rows: of
        the samples (d holds them already)."""
        if a_pad is None:
            a = self.a[rows]
            a_pad = F.pad(a, self.pads) if any(self.pads) else a
        kernel = tuple(self.weight.geometry[0][2:])
        stride, dilation = self.stride, self.dilation
        if a_pad.dim() == 3:  # 1-D: a 2-D convolution of height 1
            a_pad, kernel, stride, dilation = a_pad.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation)
        patches = F.unfold(a_pad, kernel, dilation=dilation, stride=stride)
        return patches.transpose(1, 2), d.reshape(d.shape[0], d.shape[1], -1).transpose(1, 2)

    def contribute(self, d: torch.Tensor, sink: Sink) -> None:
        if (self.weight is not None and sink.factors is not None and self.weight.st.name in sink.factors.names):
            form = self.factor_form(self.weight.st)
            for s0, s1 in sink.factors.chunks(d.shape[0], form.tokens * (form.x_dim + form.g_dim)):
                sink.factors.add(self.weight.st.name, self.key, *self._factors(d[s0:s1], rows=slice(s0, s1)), start=s0)
            self._bias(d, sink)
            return
        self._bias(d, sink)
        if self.weight is not None:
            self._weight(d, sink)

    def _bias(self, d: torch.Tensor, sink: Sink) -> None:
        if self.bias is not None:
            elements, columns, unique = self.bias.st.hits(self.bias.geometry)
            if elements.numel():
                sink.add(self.bias.st, columns, d.reshape(d.shape[0], d.shape[1], -1).sum(dim=2)[:, elements], unique)

    def _plan(self, elements: torch.Tensor):
        size = self.weight.geometry[0]
        key = ("conv", self.weight.geometry, self.groups, self.backend)
        cache = self.weight.st.cache
        if key not in cache:
            kernel = tuple(size[2:])
            kernel_size = math.prod(kernel)
            per_out = size[1] * kernel_size
            out_channel = elements // per_out
            in_group = (elements % per_out) // kernel_size
            in_channel = (out_channel // (size[0] // self.groups)) * size[1] + in_group
            flat = elements % kernel_size
            if self.backend == "torch":
                cache[key] = sampled.conv_plan(out_channel, in_channel, flat, kernel)
            else:
                cache[key] = ((out_channel, in_channel, torch.stack(torch.unravel_index(flat, kernel), dim=1)), None)
        return cache[key]

    def _dense_per_sample(self, a_pad: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """[B, O * C/g * prod(k)]: every sample's whole weight gradient at once, by one
        convolution backward with the batch as groups (per sample a is convolved with its
        own d only), or, for wide patches over few positions, d^T unfold(a) per sample."""
        size = self.weight.geometry[0]
        batch, ndim = d.shape[0], d.dim() - 2
        if self.groups == 1 and ndim <= 2 and math.prod(size[1:]) >= _UNFOLD_MIN_PATCH_PER_POSITION * self.positions:
            x, g = self._factors(d, a_pad)
            return torch.bmm(g.transpose(1, 2), x).reshape(batch, -1)
        weight_grad = (torch.nn.grad.conv1d_weight, torch.nn.grad.conv2d_weight, torch.nn.grad.conv3d_weight)[ndim - 1]
        grads = weight_grad(a_pad.reshape(1, -1, *a_pad.shape[2:]), (batch * size[0], *size[1:]),
                            d.reshape(1, -1, *d.shape[2:]), stride=self.stride, padding=0, dilation=self.dilation,
                            groups=batch * self.groups)
        return grads.reshape(batch, -1)

    def _weight(self, d: torch.Tensor, sink: Sink) -> None:
        st = self.weight.st
        elements, columns, unique = st.hits(self.weight.geometry)
        if not elements.numel():
            return
        a_pad = F.pad(self.a, self.pads) if any(self.pads) else self.a
        numel = math.prod(self.weight.geometry[0])
        dense_strategy = (self.groups == 1 and self.backend != "torch" and sink.dense is not None
                          and sink.dense.applies(d))
        if d.device.type == "cpu" and elements.numel() >= _DENSE_CONV_FRACTION * numel and not dense_strategy:
            # Densely sampled on a CPU: the whole per-sample gradients by the convolution
            # backward (oneDNN) beat the sampled dots, then only the sampled entries are kept.
            dense = self._dense_per_sample(a_pad, d.contiguous())
            whole = st.whole(self.weight.geometry)
            sink.add(st, columns, dense if whole else dense.index_select(1, elements), unique)
            return
        plan, order = self._plan(elements)
        backend = self.backend
        if dense_strategy:
            values = sink.dense.values(self.key, (*plan, tuple(self.weight.geometry[0][2:])),
                                       lambda: (a_pad, d, self.stride, self.dilation),
                                       lambda: self._sparse(a_pad, d, plan))
            sink.add(st, columns, values, unique)
            return
        if backend == "torch":
            # The planned form of the torch op: the grouping by kernel offset is cached per
            # weight (_plan) instead of rebuilt every batch as sampled_conv_grad would.
            kernel = self.weight.geometry[0][2:]
            patches = sampled.conv_patches(a_pad, kernel, self.stride, self.dilation, d.shape[2:])
            values = sampled.sampled_conv_grad_planned(patches, d, plan)
            sink.add(st, columns if order is None else columns[order], values, unique)
            return
        if sink.overwrites(st, unique) and writes_in_place(backend, sink.out, d):
            conv_kernel(backend)(a_pad, d, *plan, self.stride, self.dilation, out=sink.out, out_columns=columns)
            return
        sink.add(st, columns, self._sparse(a_pad, d, plan), unique)

    def _sparse(self, a_pad, d, plan) -> torch.Tensor:
        if self.backend == "triton":
            return conv_kernel("triton")(a_pad.contiguous(), d.contiguous(), *plan, list(self.stride),
                                         list(self.dilation))
        return conv_kernel(self.backend)(a_pad, d, *plan, self.stride, self.dilation)


@register(F.conv1d, F.conv2d, F.conv3d)
def conv(mode, func, args, kwargs):
    given = dict(_DEFAULTS, **dict(zip(_NAMES, args)), **kwargs)
    x, weight = given["input"], given["weight"]
    if not mode.is_data(x):
        raise NotCovered("a parameter as the convolution's input")
    w = _view_of_parameter(mode, weight, "weight", weight.dim())
    b = _view_of_parameter(mode, given["bias"], "bias", 1)
    ndim = weight.dim() - 2
    samples = mode.samples_of(x, "the convolution's input")
    if x.dim() != weight.dim() or samples.dim != 0 or not samples.exact(x.shape, mode.batch_size):
        raise NotCovered(f"an input of shape {list(x.shape)} without a leading batch dimension of size {mode.batch_size}")
    kernel = tuple(weight.shape[2:])
    stride, dilation = _per_dim(given["stride"], ndim, "stride"), _per_dim(given["dilation"], ndim, "dilation")
    pads = _pads(given["padding"], kernel, dilation)
    z = func(*args, **kwargs)
    mode.mark_data(z)
    if z.requires_grad:
        mode.add_use(ConvUse(mode, x, z, w, b, stride, pads, dilation, int(given["groups"])))
    return z
