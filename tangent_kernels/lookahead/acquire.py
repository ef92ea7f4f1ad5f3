"""Acquisition scores for pool-based active learning: higher means "label this first".

Look-ahead criteria (Mohamadi, Bae, Sutherland, NeurIPS 2022) score a candidate by how
much adding it, with a hypothesised label, would change the predictions on evaluation
points E (typically the pool itself or a sample of it):

- :func:`most_likely_change` (the paper's MLMOC, eq. 13): the label is the candidate's
  most likely class, and the score is sum_e ||f_{L+}(e) - f_ref(e)||_2;
- :func:`expected_change` (EMOC, eq. 3): the same change averaged over every class,
  weighted by the predicted class probabilities;
- :func:`output_change`: the general form, for any labels and weights (regression);
- :func:`pseudo_label_disagreement`: the authors' code's default objective: the fraction
  of E whose predicted class the candidate (with its most likely class) would flip.

Myopic baselines score each candidate from outputs alone: :func:`margin`,
:func:`entropy` (of the network's outputs, or of the kernel model's:
``la.predict(K_CL, f0_C)``) and :func:`random_scores`. :func:`select` takes the top n.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from . import checks as inp
from .model import LookAhead


def output_change(la: LookAhead, K_CL: Any, k_CC: Any, K_EL: Any, K_EC: Any, y_C: Any, *,
                  weights: Any = None, f0_C: Any = None, f0_E: Any = None, reference: Any = None,
                  chunk: Optional[int] = None) -> torch.Tensor:
    """Scores [c]: sum_r weights[c, r] * sum_e ||what_if[c, r, e] - reference[e]||_2
    (the norm over the k outputs; absolute value for one output).

    reference: the predictions the change is measured from, [e] or [e, k]; None means
    f0_E (the network's own outputs, the paper's f_L), or 0 when f0_E is None too. Pass
    ``la.predict(K_EL, f0_E)`` to measure from the kernel model instead.
    weights: [c, r], e.g. label probabilities; None averages the r labels uniformly.
    Memory: one chunk of predictions at a time (``what_if(..., reduce=...)``).
    """
    ref = reference if reference is not None else f0_E
    if ref is not None:
        name = "reference" if reference is not None else "f0_E"
        e = inp.shape(K_EL, "K_EL")[0]
        inp.expect(name, inp.shape(ref, name), [e] + ([] if la.k is None else [la.k]), "predictions at E")
        ref = inp.working(ref, name, la.dtype, la.device)

    def reduce(pred: torch.Tensor) -> torch.Tensor:
        diff = pred.sub_(ref) if ref is not None else pred  # what_if hands over a fresh tensor
        per_point = diff.abs() if la.k is None else torch.linalg.vector_norm(diff, dim=-1)
        return per_point.sum(-1)  # [n, r]

    per_label = la.what_if(K_CL, k_CC, K_EL, K_EC, y_C, f0_C=f0_C, f0_E=f0_E, reduce=reduce, chunk=chunk)
    if weights is None:
        return per_label.mean(1)
    w = inp.working(weights, "weights", la.dtype, la.device)
    inp.expect("weights", tuple(w.shape), list(per_label.shape), "one weight per candidate label, like y_C[:, :, 0]")
    return (w * per_label).sum(1)


def _class_outputs(la: LookAhead, K_CL: Any, f0_C: Any, outputs: Any) -> torch.Tensor:
    if la.k is None:
        raise ValueError(
            "class-label criteria need k outputs (y_L of shape [m, k], one-hot rows); this LookAhead has one "
            "output: use output_change with your own labels y_C"
        )
    if outputs is not None:
        out = inp.working(outputs, "outputs", la.dtype, la.device)
        inp.expect("outputs", tuple(out.shape), [inp.shape(K_CL, "K_CL")[0], la.k], "class scores at the candidates")
        return out
    # The paper's pseudo-label comes from the network (f0_C); without it, the kernel model.
    return inp.working(f0_C, "f0_C", la.dtype, la.device) if f0_C is not None else la.predict(K_CL)


def most_likely_change(la: LookAhead, K_CL: Any, k_CC: Any, K_EL: Any, K_EC: Any, *, f0_C: Any = None,
                       f0_E: Any = None, outputs: Any = None, reference: Any = None,
                       chunk: Optional[int] = None) -> torch.Tensor:
    """MLMOC scores [c]: each candidate gets its most likely class (argmax of ``outputs``,
    default f0_C, else the kernel model's prediction) as a one-hot label, and the score is
    the summed change of the predictions at E (see :func:`output_change`)."""
    out = _class_outputs(la, K_CL, f0_C, outputs)
    y = torch.nn.functional.one_hot(out.argmax(1), la.k).to(la.dtype).unsqueeze(1)  # [c, 1, k]
    return output_change(la, K_CL, k_CC, K_EL, K_EC, y, f0_C=f0_C, f0_E=f0_E, reference=reference, chunk=chunk)


def expected_change(la: LookAhead, K_CL: Any, k_CC: Any, K_EL: Any, K_EC: Any, *, f0_C: Any = None,
                    f0_E: Any = None, outputs: Any = None, probs: Any = None, reference: Any = None,
                    chunk: Optional[int] = None) -> torch.Tensor:
    """EMOC scores [c]: the change of the predictions at E for each one-hot class label,
    averaged with weights ``probs`` [c, k] (default softmax of ``outputs``/f0_C/the kernel
    model). k labels per candidate: k times the work of :func:`most_likely_change`."""
    c = inp.shape(K_CL, "K_CL")[0]
    if probs is None:
        probs = torch.softmax(_class_outputs(la, K_CL, f0_C, outputs), 1)
    elif la.k is None:
        _class_outputs(la, K_CL, f0_C, None)  # raises the one-output error
    eye = torch.eye(la.k, dtype=la.dtype, device=la.device)
    return output_change(la, K_CL, k_CC, K_EL, K_EC, eye.expand(c, la.k, la.k), weights=probs, f0_C=f0_C,
                         f0_E=f0_E, reference=reference, chunk=chunk)


def pseudo_label_disagreement(la: LookAhead, K_CL: Any, k_CC: Any, K_EL: Any, K_EC: Any, *, f0_C: Any = None,
                              f0_E: Any = None, outputs: Any = None, reference: Any = None,
                              chunk: Optional[int] = None) -> torch.Tensor:
    """Scores [c] in [0, 1]: 1 - mean_e [argmax_j f_{L+}(e)_j == argmax_j f_ref(e)_j], where
    f_{L+} adds the candidate with its most likely class (as in :func:`most_likely_change`)
    and the classes of f_ref at E (``reference``, default f0_E) are E's pseudo-labels.

    Definition: the authors' code (github.com/mohamad-amin/ntk-lookahead-active-learning,
    src/utils/ntk_util.py, ``ntk_objective == 'pseudo_contrastive'``, the objective of its
    configs/cifar_resnet18.yml): the accuracy of each candidate's look-ahead predictions
    at E against the argmax of the current outputs there, candidates of lowest accuracy
    selected first; there the candidates' pseudo-labels and E's come from the network
    (its default ``pseudo_label_strategy = 'torch'``) and E is the candidate subset.
    Scores are multiples of 1/e, so ties are common: ``select`` keeps pool order.
    """
    out = _class_outputs(la, K_CL, f0_C, outputs)
    ref = reference if reference is not None else f0_E
    if ref is None:
        raise ValueError("pseudo_label_disagreement needs the predictions at E whose classes are E's pseudo-labels: "
                         "pass f0_E (the network's outputs) or reference (e.g. la.predict(K_EL, f0_E))")
    name = "reference" if reference is not None else "f0_E"
    inp.expect(name, inp.shape(ref, name), [inp.shape(K_EL, "K_EL")[0], la.k], "class scores at E")
    classes = inp.working(ref, name, la.dtype, la.device).argmax(1)
    y = torch.nn.functional.one_hot(out.argmax(1), la.k).to(la.dtype).unsqueeze(1)  # [c, 1, k]

    def reduce(pred: torch.Tensor) -> torch.Tensor:  # [n, 1, e, k] -> [n, 1]
        return (pred.argmax(-1) != classes).to(la.dtype).mean(-1)

    return la.what_if(K_CL, k_CC, K_EL, K_EC, y, f0_C=f0_C, f0_E=f0_E, reduce=reduce, chunk=chunk)[:, 0]


def _probs(outputs: Any) -> torch.Tensor:
    out = inp.working(outputs, "outputs", torch.float64, inp.tensor(outputs, "outputs").device)
    if out.ndim != 2 or out.shape[1] < 2:
        raise ValueError(f"outputs must be class scores [n, k] with k >= 2; got {list(out.shape)}")
    return torch.softmax(out, 1)


def margin(outputs: Any) -> torch.Tensor:
    """Margin sampling [n]: minus the gap between the two most probable classes of
    softmax(outputs); the least decided candidates score highest."""
    top = _probs(outputs).topk(2, dim=1).values
    return top[:, 1] - top[:, 0]


def entropy(outputs: Any) -> torch.Tensor:
    """Entropy [n] of softmax(outputs), in nats."""
    p = _probs(outputs)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(1)


def random_scores(n: int, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform random scores [n] (random acquisition through the same :func:`select`)."""
    return torch.rand(n, generator=generator, dtype=torch.float64)


def select(scores: torch.Tensor, n: int, *, exclude: Any = None) -> torch.Tensor:
    """Indices of the n highest scores (ties: lowest index first), skipping ``exclude``
    (indices already labelled)."""
    s = inp.tensor(scores, "scores").to(torch.float64).clone()
    if s.ndim != 1:
        raise ValueError(f"scores must be one score per candidate, [c]; got {list(s.shape)}")
    if exclude is not None:
        s[torch.as_tensor(exclude, dtype=torch.long)] = -torch.inf
    available = int(torch.isfinite(s).sum()) if exclude is not None else s.numel()
    if not 0 <= n <= available:
        raise ValueError(f"n = {n} but only {available} candidates can be selected")
    # stable descending sort: equal scores keep pool order, on every CPU
    return torch.sort(s, descending=True, stable=True).indices[:n]
