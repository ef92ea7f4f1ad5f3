"""Factors of the structured tensors for one batch (structured/ says why they suffice).

Uses of a structured tensor hand (x, g) here instead of writing features: x [B, T_u, X]
the use's input, g [B, T_u, G] the gradient at its output (times the use's scale). The
uses' tokens are concatenated in forward order; x is recorded once (it does not depend
on the output), g once per output.

With a Kronecker projection (sketch.py) each use's factors are sketched as they are
handed, into ``sketch`` [B, (k,) dim], and only the checked row of them is kept (for the
extractor's per-batch check): no tensor's factors outlive its use's contribution.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .rules import Uncovered

__all__ = ["FactorSink", "index_gradients", "per_sample_gradients"]


class FactorSink:
    def __init__(self, choices: Dict[str, object], outputs: int, multi: bool, projection=None,
                 sketch: Optional[torch.Tensor] = None, keep_row: int = 0):
        self.choices, self.outputs, self.multi = choices, outputs, multi
        self.projection, self.sketch, self.keep_row = projection, sketch, keep_row
        self.names = set(choices)
        self.output = 0  # which output the backward in progress is for (set by the batched pass)
        self._order: Dict[str, List[Tuple[str, object]]] = {name: [] for name in choices}
        self._x: Dict[Tuple[str, str], torch.Tensor] = {}
        self._g: Dict[Tuple[str, str, int], torch.Tensor] = {}

    def register(self, name: str, key: str, form) -> None:
        """A use of a structured tensor in this forward (before any backward)."""
        choice = self.choices[name]
        if form is None or (form.axis, form.x_dim, form.g_dim) != (choice.axis, *choice.use_dims):
            raise Uncovered({name: "a use whose factors differ from the first batch's (the structured Gram "
                                   "needs the same uses every batch)"})
        self._order[name].append((key, form))

    def chunks(self, batch: int, per_sample: int) -> List[Tuple[int, int]]:
        """The sample ranges a rule hands its factors in (``add``'s ``start``): the whole
        batch, or under a projection chunks of a bounded size (per_sample: the entries of
        one sample's factors), so that a conv layer's unfolded patches never exist whole."""
        step = batch if self.projection is None else self.projection.factor_chunk(per_sample)
        return [(s, min(s + step, batch)) for s in range(0, batch, step)]

    def add(self, name: str, key: str, x: torch.Tensor, g: torch.Tensor, start: int = 0) -> None:
        """The factors of one use for samples start .. start + len(x) (all but under a
        projection: ``chunks``)."""
        # Detached: the activations are tracked by autograd, and the factors outlive the pass.
        choice = self.choices[name]
        if self.projection is not None:
            x, g = _select(x.detach(), choice.x_index), _select(g.detach(), choice.g_index)
            sketch = self.sketch[:, self.output] if self.multi else self.sketch
            self.projection.add_factor_sketch(name, choice, x, g, sketch[start:start + x.shape[0]])
            if start <= self.keep_row < start + x.shape[0]:
                row = slice(self.keep_row - start, self.keep_row - start + 1)
                # Copies: a view would keep the whole factor alive.
                self._x.setdefault((name, key), x[row].clone())
                self._g[(name, key, self.output)] = g[row].clone()
            return
        if (name, key) not in self._x:
            x = _select(x.detach(), choice.x_index)
            if choice.bias is not None:  # x.x' + 1: the absorbed bias' Gram rides along (plan.Choice.bias)
                x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
            self._x[(name, key)] = x
        self._g[(name, key, self.output)] = _select(g.detach(), choice.g_index)

    def finish(self, batch: int, like: torch.Tensor) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """name -> (x [B, T, X], g [B, T, G], or [B, k, T, G] for every logit); zeros where
        no gradient reached a use (its contribution is zero). With a projection, B = 1:
        the checked row's."""
        result = {}
        for name, uses in self._order.items():
            choice = self.choices[name]
            if sum(form.tokens for _, form in uses) != choice.tokens:
                raise Uncovered({name: f"its uses have {sum(f.tokens for _, f in uses)} tokens in all on this "
                                       f"batch, {choice.tokens} on the first (the structured Gram needs the same)"})
            xs, gs = [], [[] for _ in range(self.outputs)]
            for key, form in uses:
                x = self._x.get((name, key))
                xs.append(x if x is not None else like.new_zeros(batch, form.tokens, choice.x_dim))
                for a in range(self.outputs):
                    g = self._g.get((name, key, a))
                    gs[a].append(g if g is not None else like.new_zeros(batch, form.tokens, choice.g_dim))
            # One use (the usual case): its factors as they are, no copy.
            # Token ids stay float64 (exact to 2^53) whatever the precision: they are compared, not multiplied.
            x = (xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)).to(torch.float64 if choice.index else like.dtype)
            per_output = [(g[0] if len(g) == 1 else torch.cat(g, dim=1)).to(like.dtype) for g in gs]
            result[name] = (x, torch.stack(per_output, dim=1) if self.multi else per_output[0])
        return result


def _select(factor: torch.Tensor, index) -> torch.Tensor:
    """The Kronecker subsample's rows or columns of a factor's last dim (None: all)."""
    return factor if index is None else factor.index_select(-1, index.to(factor.device))


def index_gradients(ids: torch.Tensor, g: torch.Tensor, rows: int) -> torch.Tensor:
    """The flat per-sample gradients of a table [rows, G] from token ids [R, T, 1] and
    g [R, T, G] (or [R, k, T, G]): sum_t onehot(id_t) (x) g_t, [R, rows * G] (or [R, k, .])."""
    multi = g.dim() == 4
    r, t, width = ids.shape[0], ids.shape[1], g.shape[-1]
    index = ids.reshape(r, t).long()
    g4 = g if multi else g.unsqueeze(1)
    out = g.new_zeros(r, g4.shape[1], rows, width)
    out.scatter_add_(2, index[:, None, :, None].expand(r, g4.shape[1], t, width), g4)
    return (out if multi else out[:, 0]).flatten(-2)


def per_sample_gradients(x: torch.Tensor, g: torch.Tensor, axis: int) -> torch.Tensor:
    """The flat per-sample gradients the factors stand for: [R, m] (or [R, k, m] for
    g [R, k, T, G]), in the leaf's row-major order of its sampled entries (x on leaf axis
    ``axis``; for a Kronecker subsample, its rows x columns)."""
    multi = g.dim() == 4
    if axis == 1:  # leaf [G, X]
        grad = torch.einsum("batg,btx->bagx" if multi else "btg,btx->bgx", g, x)
    else:  # leaf [X, G]
        grad = torch.einsum("btx,batg->baxg" if multi else "btx,btg->bxg", x, g)
    return grad.flatten(-2)
