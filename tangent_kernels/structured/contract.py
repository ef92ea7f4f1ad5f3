"""One tensor's structured contribution to a tile of K, from stored factors (pure).

x holds one row per sample, g one per (sample, output), output fastest. For samples i, j
and outputs a, b:

    K[(i, a), (j, b)] = sum_{t, t'} (x_it . x_jt') (g_iat . g_jbt')

``form`` says which of those entries a tile holds:
- "rows": all of them, rows of K are (sample, output) pairs ([Si k, Sj k]);
- "trace": sum_a K[(i, a), (j, a)] ([Si, Sj]): g's k outputs concatenated per token,
  (sum_a g_iat . g_jat') = (g_i:t . g_j:t'), so it is the one-output contraction with
  g_dim k G: k times the work of one output, never the k^2 cross products;
- "diagonal": K[(i, a), (j, a)] for each a ([k, Si, Sj], logit-major as tiles forms
  it): k one-output contractions sharing the inputs' Gram.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["FORMS", "structured_tile"]

FORMS = ("rows", "trace", "diagonal")

# Elements of the largest per-chunk Gram of token pairs formed at once: [Si k T, Sj k T'].
_PAIR_ELEMENTS = 1 << 23


def _gram(u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # 16-bit factors are upcast: their products are exact in fp32 and the sums run in fp32,
    # as the feature path's 16-bit tiles do.
    return u.to(dtype) @ v.to(dtype).T


def structured_tile(x_i: torch.Tensor, g_i: torch.Tensor, x_j: torch.Tensor, g_j: torch.Tensor, tokens: int,
                    outputs: int, dtype: torch.dtype, scales=None, index: bool = False,
                    form: str = "rows") -> torch.Tensor:
    """[Si k, Sj k] ("rows"), [Si, Sj] ("trace") or [k, Si, Sj] ("diagonal") in ``dtype``.

    x_i: [Si, T * X], g_i: [Si * k, T * G] (rows as stored); x_j, g_j likewise for the
    columns. scales: None, or the fp16 scales (sx_i, sg_i, sx_j, sg_j) of those rows
    (stored = true * scale; None for a factor stored unscaled). index: x are token ids
    (X = 1), standing for one-hot rows: their Gram is token equality.
    """
    if form not in FORMS:
        raise ValueError(f"structured_tile: form must be one of {FORMS}, got {form!r}")
    si, sj, k = x_i.shape[0], x_j.shape[0], outputs
    shape = {"rows": (si * k, sj * k), "trace": (si, sj), "diagonal": (k, si, sj)}[form]
    out = torch.empty(shape, dtype=dtype, device=x_i.device)
    if si == 0 or sj == 0:
        return out
    if form != "rows" and scales is not None and scales[1] is not None:
        # g's scales differ between a sample's outputs: undone before the outputs are summed.
        sx_i, sg_i, sx_j, sg_j = scales
        g_i, g_j = _unscaled(g_i, sg_i, dtype), _unscaled(g_j, sg_j, dtype)
        scales = (sx_i, None, sx_j, None)
    # Chunks of samples keep the token-pair Grams within _PAIR_ELEMENTS: [Si k T, Sj k T]
    # for "rows", k of [Si T, Sj T] for "diagonal", one for "trace".
    pairs = _PAIR_ELEMENTS / (k if form == "diagonal" else 1)
    per_sample = k * tokens if form == "rows" else tokens
    step = max(1, int((pairs ** 0.5) // per_sample))
    rows = k if form == "rows" else 1  # rows of the tile per sample
    for i0 in range(0, si, step):
        i1 = min(i0 + step, si)
        for j0 in range(0, sj, step):
            j1 = min(j0 + step, sj)
            parts = (x_i[i0:i1], g_i[i0 * k:i1 * k], x_j[j0:j1], g_j[j0 * k:j1 * k], tokens, k, dtype,
                     *_slices(scales, i0, i1, j0, j1, k))
            if form == "rows":
                block = _block(*parts, index=index)
            else:
                block = _matched_block(*parts, index=index, trace=form == "trace")
            out[..., i0 * rows:i1 * rows, j0 * rows:j1 * rows] = block
    return out


def _unscaled(g: torch.Tensor, scales: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    g = g.to(dtype)
    return g if scales is None else g / scales.to(dtype)[:, None]


def _matched_block(x_i, g_i, x_j, g_j, tokens, k, dtype, sx_i, sg_i, sx_j, sg_j, index: bool = False,
                   trace: bool = True) -> torch.Tensor:
    """[Si, Sj] (trace) or [k, Si, Sj] (diagonal): only the pairs of equal outputs.
    g is unscaled here (sg_i, sg_j None): structured_tile undid its scales."""
    si, sj = x_i.shape[0], x_j.shape[0]
    g_dim = g_i.shape[1] // tokens
    # [S, k, T, G] -> per (output, sample, token) rows [k, S T, G]
    gi = g_i.reshape(si, k, tokens, g_dim).transpose(0, 1).reshape(k, si * tokens, g_dim)
    gj = g_j.reshape(sj, k, tokens, g_dim).transpose(0, 1).reshape(k, sj * tokens, g_dim)
    if trace:  # the outputs side by side: one Gram over k G columns
        gi = gi.permute(1, 0, 2).reshape(1, si * tokens, k * g_dim)
        gj = gj.permute(1, 0, 2).reshape(1, sj * tokens, k * g_dim)
    gg = torch.bmm(gi.to(dtype), gj.to(dtype).transpose(1, 2))  # [k or 1, Si T, Sj T]
    x_dim = x_i.shape[1] // tokens
    gx = _inputs_gram(x_i.reshape(si * tokens, x_dim), x_j.reshape(sj * tokens, x_dim), dtype, index)
    gx = _scaled(gx, None if sx_i is None else sx_i.repeat_interleave(tokens),
                 None if sx_j is None else sx_j.repeat_interleave(tokens))
    if tokens == 1:
        block = gg * gx  # [k or 1, Si, Sj]
    else:
        block = (gg.view(-1, si, tokens, sj, tokens) * gx.view(1, si, tokens, sj, tokens)).sum(dim=(2, 4))
    return block[0] if trace else block


def _slices(scales, i0, i1, j0, j1, k):
    if scales is None:
        return (None,) * 4
    sx_i, sg_i, sx_j, sg_j = scales

    def cut(scale, a, b):  # token ids are stored unscaled
        return None if scale is None else scale[a:b]

    return cut(sx_i, i0, i1), cut(sg_i, i0 * k, i1 * k), cut(sx_j, j0, j1), cut(sg_j, j0 * k, j1 * k)


def _inputs_gram(x_i, x_j, dtype, index: bool) -> torch.Tensor:
    if index:  # one-hot rows of token ids: 1 where the tokens are the same
        return (x_i.reshape(-1, 1) == x_j.reshape(1, -1)).to(dtype)
    return _gram(x_i, x_j, dtype)


def _block(x_i, g_i, x_j, g_j, tokens, k, dtype, sx_i, sg_i, sx_j, sg_j, index: bool = False) -> torch.Tensor:
    si, sj = x_i.shape[0], x_j.shape[0]
    if tokens == 1:
        gx = _scaled(_inputs_gram(x_i, x_j, dtype, index), sx_i, sx_j)  # [Si, Sj]
        gg = _scaled(_gram(g_i, g_j, dtype), sg_i, sg_j)  # [Si k, Sj k]
        if k == 1:
            return gx.mul_(gg) if gx.dtype == gg.dtype else gx * gg
        return (gg.view(si, k, sj, k) * gx[:, None, :, None]).view(si * k, sj * k)
    x_dim, g_dim = x_i.shape[1] // tokens, g_i.shape[1] // tokens
    gx = _inputs_gram(x_i.reshape(si * tokens, x_dim), x_j.reshape(sj * tokens, x_dim), dtype, index)
    gx = gx.view(si, tokens, sj, tokens)
    gg = _gram(g_i.reshape(si * k * tokens, g_dim), g_j.reshape(sj * k * tokens, g_dim), dtype)
    gg = gg.view(si, k, tokens, sj, k, tokens)
    if sx_i is not None:
        gx = gx / (sx_i.to(dtype).view(si, 1, 1, 1) * sx_j.to(dtype).view(1, 1, sj, 1))
    if sg_i is not None:
        gg = gg / (sg_i.to(dtype).view(si, k, 1, 1, 1, 1) * sg_j.to(dtype).view(1, 1, 1, sj, k, 1))
    if k == 1:
        return (gx * gg.view(si, tokens, sj, tokens)).sum(dim=(1, 3))
    return torch.einsum("itjs,iatjbs->iajb", gx, gg).reshape(si * k, sj * k)


def _scaled(gram: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]) -> torch.Tensor:
    if rows is None:
        return gram
    return gram / (rows.to(gram.dtype)[:, None] * cols.to(gram.dtype)[None, :])
