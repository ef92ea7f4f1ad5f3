"""Linear maps with a parameter operand: ``F.linear``, ``addmm``, ``mm``, ``matmul``, ``@``.

For y[b, t, o] = sum_i a[b, t, i] M[i, o] the per-sample gradient of M is
sum_t a[b, t, i] d[b, t, o] (d = ds/dy), of which only the sampled entries are formed,
by the backend's sampled-dot kernel. M may be any strided view of the parameter (the
transposed weight of ``F.linear``, the [in, out] weight of a Hugging Face ``Conv1D``
in ``addmm``, a third of a packed q/k/v projection). Rows of ``a`` may carry extra
leading dims ([B, T, I], [B, H, T, I]) or be flattened batch-major ([B * T, I]); a
parameter on the left (y = M x with x [B, ..., I, T]) is the transposed case.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import sampled
from ..structured.plan import FactorForm
from .backends import COMPILED, linear_kernel, writes_in_place
from .samples import FIRST, Samples, by_sample
from .rules import NotCovered, Sink, Use, ViewPullback, register, whole_vector
from .views import Geometry, SampledTensor

__all__ = ["LinearUse", "EinsumUse"]


class Operand(NamedTuple):
    st: SampledTensor
    geometry: Geometry


class ComputedWeight(NamedTuple):
    derived: object  # uses.Derived
    shape: tuple


def _rows(mode, a: torch.Tensor, what: str, features: int = 1) -> Samples:
    """Where ``a`` holds its samples (on a dim other than its last ``features``), or NotCovered."""
    samples = mode.samples_of(a, what)
    if samples.dim >= a.dim() - features:
        raise NotCovered(f"{what} of shape {list(a.shape)} holds the samples on dim {samples.dim}, "
                         "which the product contracts")
    return samples


def _view_of_parameter(mode, t, what: str, dims: int, batched: bool = False):
    """The (st, geometry) of a parameter view operand, None for a non-parameter operand.

    batched: also accept a [B, ...] view that repeats one matrix for every sample (an
    ``expand`` along the batch, as fed to ``bmm``), by its per-sample geometry.
    """
    derived = mode.derived(t)
    if derived is None:
        return None
    if not isinstance(derived.pullback, ViewPullback):
        # A weight computed from parameters (LoRA's B @ A, weight normalization): its
        # dense per-sample gradients go through its own pullback.
        if t.dim() == dims == 2 and derived.pullback.per_sample_ok() is None:
            return ComputedWeight(derived, tuple(t.shape))
        raise NotCovered(f"the {what} is computed from parameters, not a view of one")
    if batched and t.dim() == dims + 1 and t.stride(0) == 0:  # the same matrix in every row
        size, stride, offset = derived.pullback.geometry
        return Operand(derived.pullback.st, (size[1:], stride[1:], offset))
    if t.dim() != dims:
        raise NotCovered(f"a {t.dim()}-D {what}")
    return derived.pullback


def _bias(mode, bias):
    """(a view operand or the Derived of a bias computed from parameters, its shape)."""
    derived = mode.derived(bias)
    if derived is None:
        return None, None
    if bias.dim() != 1:
        raise NotCovered(f"a {bias.dim()}-D bias")
    if isinstance(derived.pullback, ViewPullback):
        return derived.pullback, None
    if derived.pullback.per_sample_ok() is not None:
        raise NotCovered("a bias whose pullback cannot take per-sample gradients")
    return derived, tuple(bias.shape)


class LinearUse(Use):
    """y = a @ M (+ bias): the sampled entries of M's and the bias' per-sample gradients.

    layout "oi": M's view is [O, I] (F.linear's weight); "io": [I, O] (addmm, matmul).
    transposed: the parameter was the left operand, so a and d are read transposed.
    """

    label = "linear"

    def __init__(self, mode, a, z, weight, layout, bias=None, scale=1.0, bias_scale=1.0, transposed=False,
                 samples=FIRST, bias_shape=None):
        sampled = ([] if weight is None else list(weight.derived.sampled) if isinstance(weight, ComputedWeight)
                   else [weight.st])
        if bias is not None:
            sampled += [bias.st] if isinstance(bias, (ViewPullback, Operand)) else list(bias.sampled)
        super().__init__(sampled, torch.autograd.graph.get_gradient_edge(z), guarded=[a])
        self.batch, self.backend = mode.batch_size, mode.backend
        self.a, self.weight, self.layout, self.bias = a, weight, layout, bias
        self.scale, self.bias_scale, self.transposed = scale, bias_scale, transposed
        self.samples = samples  # where a and the output gradient hold the samples
        self.bias_shape = bias_shape  # of a bias computed from parameters

    def contribute(self, d: torch.Tensor, sink: Sink) -> None:
        a, d = by_sample(self.a, self.samples, self.batch), by_sample(d, self.samples, self.batch)
        if self.transposed:
            a, d = a.transpose(-1, -2), d.transpose(-1, -2)
        n_in, n_out = a.shape[-1], d.shape[-1]
        a3, d3 = a.reshape(self.batch, -1, n_in), d.reshape(self.batch, -1, n_out)
        weight = self.weight
        if sink.factors is not None and self._structured_weight() in sink.factors.names:
            # Its Gram comes from the factors (structured/): no features. Every token is
            # kept, dead or not, so that the factors have the same width every batch.
            sink.factors.add(weight.st.name, self.key, a3, d3 * self.scale if self.scale != 1 else d3)
            weight = None
        if d3.shape[1] > 1 and sink.dead_tokens.get(self.key, True):
            # Tokens whose output gradient is zero for every sample contribute nothing: an
            # output head read at one token (a language model's last-token logit, a [CLS]
            # classifier) then contracts one token instead of all of them. The check is a
            # pass over d: a use whose first batch had no such token is not checked again.
            live = d3.ne(0).any(dim=2).any(dim=0)
            sink.dead_tokens[self.key] = not bool(live.all())
            if sink.dead_tokens[self.key]:
                a3, d3 = a3[:, live], d3[:, live]
        if weight is not None:
            self._weight(a3, d3, n_in, n_out, sink)
        if self.bias is not None and not isinstance(self.bias, (ViewPullback, Operand)):
            # A bias computed from parameters (BEiT's cat of q, zero and v biases): its
            # per-sample gradient [B, O] goes through its own pullback.
            per_sample = d3.sum(dim=1) * self.bias_scale
            self.bias.pullback.contribute(per_sample.reshape(self.batch, *self.bias_shape), False, sink)
        elif self.bias is not None:
            elements, columns, unique = self.bias.st.hits(self.bias.geometry)
            if elements.numel():
                key = ("bias", self.bias.geometry, n_out)
                at = self.bias.st.cache.get(key)
                if at is None:
                    at = self.bias.st.cache[key] = elements % n_out
                values = d3.sum(dim=1)[:, at]
                sink.add(self.bias.st, columns, values * self.bias_scale if self.bias_scale != 1 else values, unique)

    def _structured_weight(self):
        w = self.weight
        return None if w is None or isinstance(w, ComputedWeight) else w.st.name

    def factor_form(self, st: SampledTensor):
        """The weight, when it is the whole 2-D leaf or its transpose (any tokens)."""
        w = self.weight
        if w is None or isinstance(w, ComputedWeight) or w.st is not st or st.leaf.dim() != 2:
            return None
        if self.bias is not None and isinstance(self.bias, (ViewPullback, Operand)) and self.bias.st is st:
            return None
        size, stride, offset = w.geometry
        leaf = st.leaf
        same = tuple(size) == tuple(leaf.shape) and tuple(stride) == tuple(leaf.stride())
        flipped = tuple(size) == tuple(leaf.shape)[::-1] and tuple(stride) == tuple(leaf.stride())[::-1]
        if offset != 0 or not (same or flipped):
            return None
        input_axis = 1 if self.layout == "oi" else 0  # of the view: where the use's input sits
        n_in, n_out = size[input_axis], size[1 - input_axis]
        return FactorForm(input_axis if same else 1 - input_axis, n_in, n_out, self.a.numel() // (self.batch * n_in))

    def absorbable_bias(self, st: SampledTensor):
        form = self.factor_form(st)
        if form is None or self.transposed or self.bias_scale != self.scale:
            return None
        return whole_vector(self.bias, form.g_dim) if isinstance(self.bias, (ViewPullback, Operand)) else None

    def _weight(self, a3, d3, n_in, n_out, sink: Sink) -> None:
        if isinstance(self.weight, ComputedWeight):
            product = torch.bmm(d3.transpose(1, 2), a3) if self.layout == "oi" else torch.bmm(a3.transpose(1, 2), d3)
            self.weight.derived.pullback.contribute(product * self.scale if self.scale != 1 else product, False, sink)
            return
        st = self.weight.st
        elements, columns, unique = st.hits(self.weight.geometry)
        if not elements.numel():
            return
        span = st.span(columns)
        if (span is not None and self.scale == 1 and sink.overwrites(st, unique) and sink.out.dtype == d3.dtype
                and d3.device == sink.out.device and st.whole(self.weight.geometry)):
            # The whole weight sampled (idx=None): each sample's gradient, one batched
            # product, written straight into its columns of F; nothing to gather.
            block = sink.out[:, span].unflatten(1, (n_out, n_in) if self.layout == "oi" else (n_in, n_out))
            if self.layout == "oi":
                torch.bmm(d3.transpose(1, 2), a3, out=block) if block.is_contiguous() else \
                    block.copy_(torch.bmm(d3.transpose(1, 2), a3))
            else:
                torch.bmm(a3.transpose(1, 2), d3, out=block) if block.is_contiguous() else \
                    block.copy_(torch.bmm(a3.transpose(1, 2), d3))
            return
        key = ("linear", self.weight.geometry, self.layout)
        plan = st.cache.get(key)
        if plan is None:  # the view's rows and columns of its sampled entries: the same every batch
            if self.layout == "oi":
                plan = st.cache[key] = (elements // n_in, elements % n_in)
            else:
                plan = st.cache[key] = (elements % n_out, elements // n_out)
        rows, cols = plan
        backend = self.backend
        if backend == "cpp" and sampled.dense_linear_wins(a3.shape[1], rows.numel(), n_in, n_out):
            # Densely sampled with tokens: one batched matmul per chunk of samples beats the
            # sampled dots on a CPU (the cost model in sampled.py), whichever kernel is asked.
            backend = "torch"
        if backend == "triton" or (backend in COMPILED and self.transposed):
            a3, d3 = a3.contiguous(), d3.contiguous()
        if sink.dense is not None and sink.dense.applies(d3):
            # A linear map is a 1x1 convolution over its tokens: channels first, views only.
            values = sink.dense.values(
                self.key, (rows, cols, torch.zeros(rows.shape[0], 1, dtype=torch.int64, device=rows.device), (1,)),
                lambda: (a3.transpose(1, 2), d3.transpose(1, 2), (1,), (1,)),
                lambda: linear_kernel(backend)(a3, d3, rows, cols))
            sink.add(st, columns, values * self.scale if self.scale != 1 else values, unique)
            return
        if self.scale == 1 and sink.overwrites(st, unique) and writes_in_place(backend, sink.out, d3):
            linear_kernel(backend)(a3, d3, rows, cols, out=sink.out, out_columns=columns)
            return
        values = linear_kernel(backend)(a3, d3, rows, cols)
        sink.add(st, columns, values * self.scale if self.scale != 1 else values, unique)


def _record(mode, z, **use) -> torch.Tensor:
    samples = use.get("samples", FIRST)
    if z.dim() != use["a"].dim():  # [N, I] @ W.expand(k, I, O): the samples moved
        raise NotCovered(f"a product of {use['a'].dim()}-D data with a {z.dim()}-D result")
    mode.mark_data(z, samples)
    if z.requires_grad:
        mode.add_use(LinearUse(mode, z=z, **use))
    return z


@register(F.linear)
def linear(mode, func, args, kwargs):
    names = ("input", "weight", "bias")
    given = dict(zip(names, args), **kwargs)
    x, weight, bias = given.get("input"), given.get("weight"), given.get("bias")
    if not mode.is_data(x):
        raise NotCovered("a parameter as the input of F.linear")
    where = _rows(mode, x, "the input")
    w = _view_of_parameter(mode, weight, "weight", 2)
    b, bias_shape = _bias(mode, bias)
    return _record(mode, func(*args, **kwargs), a=x, weight=w, layout="oi", bias=b, samples=where,
                   bias_shape=bias_shape)


@register(torch.addmm, torch.Tensor.addmm)
def addmm(mode, func, args, kwargs):
    if "out" in kwargs or len(args) > 3:
        raise NotCovered("addmm with out= or positional beta/alpha")
    bias, mat1, mat2 = (list(args) + [kwargs.get(k) for k in ("input", "mat1", "mat2")[len(args):]])[:3]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if not mode.is_data(mat1) or mode.derived(bias) is not None and bias.dim() == 2 and bias.shape[0] != 1:
        raise NotCovered("a parameter as mat1, or a bias that is not broadcast over rows")
    where = _rows(mode, mat1, "mat1")
    w = _view_of_parameter(mode, mat2, "mat2", 2)
    b = _view_of_parameter(mode, bias, "bias", bias.dim() if isinstance(bias, torch.Tensor) else 1)
    return _record(mode, func(*args, **kwargs), a=mat1, weight=w, layout="io", bias=b, scale=alpha, bias_scale=beta,
                   samples=where)


@register(torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.matmul, torch.Tensor.matmul,
          torch.Tensor.__matmul__, torch.Tensor.__rmatmul__)
def matmul(mode, func, args, kwargs):
    if "out" in kwargs or len(args) != 2:
        raise NotCovered("matmul with out=")
    left, right = args if func is not torch.Tensor.__rmatmul__ else args[::-1]
    if mode.is_data(left) and mode.derived(right) is not None:
        where = _rows(mode, left, "the left operand")
        w = _view_of_parameter(mode, right, "right operand", 2, batched=True)
        return _record(mode, func(*args, **kwargs), a=left, weight=w, layout="io", samples=where)
    if mode.derived(left) is not None and mode.is_data(right):
        where = _rows(mode, right, "the right operand", features=2)
        w = _view_of_parameter(mode, left, "left operand", 2)
        return _record(mode, func(*args, **kwargs), a=right, weight=w, layout="oi", transposed=True, samples=where)
    raise NotCovered("both operands hold parameters, or neither is data")


class EinsumUse(Use):
    """z = einsum("<x>,<w>-><z>", x, W) with x's first index the batch: per-sample
    gradients of W by einsum("<x>,<z>->b<w>"), a few samples at a time, then sampled."""

    label = "einsum"
    _CHUNK_ELEMENTS = 1 << 24

    def __init__(self, mode, x, z, weight, gradient_equation):
        super().__init__([weight.st], torch.autograd.graph.get_gradient_edge(z), guarded=[x])
        self.x, self.weight, self.equation = x, weight, gradient_equation

    def contribute(self, d: torch.Tensor, sink: Sink) -> None:
        elements, columns, unique = self.weight.st.hits(self.weight.geometry)
        if not elements.numel():
            return
        batch = d.shape[0]
        step = max(1, self._CHUNK_ELEMENTS // max(self.weight.st.leaf.numel(), 1))
        for start in range(0, batch, step):
            stop = min(start + step, batch)
            per_sample = torch.einsum(self.equation, self.x[start:stop], d[start:stop])
            sink.add(self.weight.st, columns, per_sample.reshape(stop - start, -1)[:, elements], unique,
                     rows=slice(start, stop) if (start, stop) != (0, batch) else slice(None))


@register(torch.einsum)
def einsum(mode, func, args, kwargs):
    if kwargs or len(args) != 3 or not isinstance(args[0], str):
        raise NotCovered("only einsum(equation, a, b) with two operands is covered")
    equation, x, w = args
    x_first = mode.is_data(x)
    if not x_first:
        x, w = w, x
    if not mode.is_data(x) or mode.derived(w) is None:
        raise NotCovered("one operand must be data, the other a parameter")
    samples = mode.samples_of(x, "the einsum's data")
    if samples.dim != 0 or not samples.exact(x.shape, mode.batch_size):
        raise NotCovered("an einsum whose data does not have the batch first")
    spec = equation.replace(" ", "")
    if "->" not in spec or "." in spec:
        raise NotCovered("an einsum without an explicit output or with an ellipsis")
    inputs, z_sub = spec.split("->")
    x_sub, w_sub = inputs.split(",") if x_first else inputs.split(",")[::-1]
    batch_letter = x_sub[:1]
    if (len(x_sub) != x.dim() or len(w_sub) != w.dim() or x.shape[0] != mode.batch_size
            or batch_letter not in z_sub or batch_letter in w_sub
            or any(len(set(sub)) != len(sub) for sub in (x_sub, w_sub, z_sub))
            or not set(w_sub) <= set(x_sub) | set(z_sub)):
        raise NotCovered(f"an einsum {equation!r} whose first data index is not a batch index apart from the parameter's")
    weight = _view_of_parameter(mode, w, "einsum operand", w.dim())
    z = func(*args)
    mode.mark_data(z, Samples(z_sub.index(batch_letter)))
    if z.requires_grad:
        mode.add_use(EinsumUse(mode, x, z, weight, f"{x_sub},{z_sub}->{batch_letter}{w_sub}"))
    return z
