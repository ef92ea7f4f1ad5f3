"""Embedding lookups of a parameter table: ``F.embedding``.

With batched indices (token ids) the lookup is a use: W[v, e]'s per-sample gradient is
sum_t [token_t == v] d[b, t, e]. With indices shared by the whole batch (position ids
[1, T] broadcast later, a relative-position bucket table) the lookup yields a derived
tensor whose pullback applies the same contraction to the per-sample gradients that
reach it where it meets the data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import sampled
from ..structured.plan import FactorForm
from .backends import embedding_kernel, writes_in_place
from .linear import _view_of_parameter
from .samples import by_sample
from .rules import Derived, NotCovered, Sink, Use, bind, register, register_derived
from .views import is_the_leaf

__all__ = ["EmbeddingUse", "EmbeddingPullback"]


def _arguments(mode, func, args, kwargs):
    given = bind(func, args, kwargs)
    if given["max_norm"] is not None or given["scale_grad_by_freq"] or given["sparse"]:
        raise NotCovered("max_norm / scale_grad_by_freq / sparse embeddings")
    weight = _view_of_parameter(mode, given["weight"], "embedding table", 2)
    padding_idx = given["padding_idx"]
    if padding_idx is not None and padding_idx < 0:
        padding_idx += given["weight"].shape[0]
    return given["input"], given["weight"], weight, padding_idx


# The sampled-dot kernels cost B x T x m (every sampled entry checks every token); the
# row gather costs B x T x k (k: most sampled entries in one table row) with a few more
# memory operations per term: it is used when k is this many times smaller than m.
# On the 2-core CPU (BERT, 1,000 x 128 table, 12% sampled, T = 64) the C++ kernel took
# 37 ms per batch of 64, the row gather ~1 ms.
_ROW_GATHER_ADVANTAGE = 8


def _contract(backend, st, geometry, tokens, d, padding_idx, sink: Sink) -> None:
    """tokens [B, T], d [B, T, E] -> the sampled entries of the table's gradient."""
    elements, columns, unique = st.hits(geometry)
    if not elements.numel():
        return
    vocab, width = geometry[0]
    key = ("embedding", geometry)
    if key not in st.cache:  # the table's rows and columns of its sampled entries: the same every batch
        st.cache[key] = (elements // width, elements % width)
    rows, cols = st.cache[key]
    key = ("embedding rows", geometry, padding_idx)
    if key not in st.cache:
        plan = sampled.embedding_row_plan(rows, cols, vocab, padding_idx)
        st.cache[key] = plan if plan[0].shape[1] * _ROW_GATHER_ADVANTAGE <= elements.numel() else None
    plan = st.cache[key]
    if plan is not None:
        sink.add(st, columns, sampled.sampled_embedding_grad_by_rows(tokens, d, plan, elements.numel()), unique)
        return
    if backend == "triton":
        tokens, d = tokens.contiguous(), d.contiguous()
    if sink.overwrites(st, unique) and writes_in_place(backend, sink.out, d):
        embedding_kernel(backend)(tokens, d, rows, cols, padding_idx, out=sink.out, out_columns=columns)
    else:
        sink.add(st, columns, embedding_kernel(backend)(tokens, d, rows, cols, padding_idx), unique)


class EmbeddingUse(Use):
    label = "embedding"

    def __init__(self, mode, tokens, z, weight, padding_idx, samples):
        super().__init__([weight.st], torch.autograd.graph.get_gradient_edge(z), guarded=[tokens])
        self.batch, self.backend = mode.batch_size, mode.backend
        self.tokens, self.weight, self.padding_idx = tokens, weight, padding_idx
        self.samples = samples  # where the token ids hold them (the output: the same dims first)

    def factor_form(self, st):
        """The whole table [V, E] as token ids (one-hot rows) times the output gradient:
        W's per-sample gradient is sum_t onehot(token_t) (x) d_t."""
        if self.weight.st is not st or st.leaf.dim() != 2 or not is_the_leaf(self.weight.geometry, st.leaf):
            return None
        return FactorForm(0, 1, int(st.leaf.shape[1]), self.tokens.numel() // self.batch, index=True)

    def contribute(self, d: torch.Tensor, sink: Sink) -> None:
        tokens = by_sample(self.tokens, self.samples, self.batch).reshape(self.batch, -1)
        d = by_sample(d, self.samples, self.batch)
        d = d.reshape(self.batch, tokens.shape[1], -1)
        if sink.factors is not None and self.weight.st.name in sink.factors.names:
            # Token ids as the input factor (structured/): the padding row gets no gradient.
            if self.padding_idx is not None:
                d = d * (tokens != self.padding_idx).unsqueeze(-1).to(d.dtype)
            sink.factors.add(self.weight.st.name, self.key, tokens.unsqueeze(-1).to(torch.float64), d)
            return
        _contract(self.backend, self.weight.st, self.weight.geometry, tokens, d, self.padding_idx, sink)


class EmbeddingPullback:
    """A lookup with indices shared by the batch: the derived table rows."""

    label = "embedding (shared indices)"

    def __init__(self, backend, weight, indices, padding_idx):
        self.backend, self.weight, self.indices, self.padding_idx = backend, weight, indices, padding_idx

    def per_sample_ok(self):
        return None

    def contribute(self, grad: torch.Tensor, aligned: bool, sink: Sink) -> None:
        batch = grad.shape[0]
        tokens = self.indices.reshape(batch, -1) if aligned else self.indices.reshape(1, -1).expand(batch, -1)
        _contract(self.backend, self.weight.st, self.weight.geometry, tokens,
                  grad.reshape(batch, tokens.shape[1], -1), self.padding_idx, sink)


@register(F.embedding)
def embedding(mode, func, args, kwargs):
    tokens, table, weight, padding_idx = _arguments(mode, func, args, kwargs)
    if weight is None:
        raise NotCovered("data as the embedding table")
    where = mode.samples_of(tokens, "the indices")
    z = func(*args, **kwargs)
    mode.mark_data(z, where)
    if z.requires_grad:
        mode.add_use(EmbeddingUse(mode, tokens, z, weight, padding_idx, where))
    return z


@register_derived(torch.Tensor.__getitem__)
def shared_rows(mode, func, args, kwargs, derived):
    """table[index] with a constant integer index (Swin's relative-position bias table
    read by its index buffer): an embedding lookup with shared indices."""
    z = func(*args, **kwargs)
    table, index = (args + (None,))[:2]
    weight = None
    if isinstance(index, torch.Tensor) and not kwargs and mode.kind(index) is None and z.requires_grad \
            and not index.is_floating_point() and index.dtype != torch.bool and index.numel() \
            and isinstance(table, torch.Tensor) and table.dim() == 2 and mode.derived(table) is not None:
        try:
            weight = _view_of_parameter(mode, table, "table", 2)
        except NotCovered:
            weight = None
        if weight is not None and not bool((index >= 0).all()):
            weight = None  # negative positions wrap: the kernels take plain rows
    if weight is None:
        mode.mark_derived(z, derived)  # autograd's pullback
        return z
    mode.set_kind(z, Derived(EmbeddingPullback(mode.backend, weight, index.long(), None), [weight.st]))
    return z


@register_derived(F.embedding)
def shared_embedding(mode, func, args, kwargs, derived):
    z = func(*args, **kwargs)
    try:
        tokens, table, weight, padding_idx = _arguments(mode, func, args, kwargs)
    except NotCovered:
        weight = None
    if weight is None or mode.derived(tokens) is not None or not z.requires_grad:
        mode.mark_derived(z, derived)  # autograd's pullback
        return z
    mode.set_kind(z, Derived(EmbeddingPullback(mode.backend, weight, tokens, padding_idx), [weight.st]))
    return z
