"""``run_rounds``: pool-based active learning end to end, from a model and data.

Each round scores the remaining pool with a strategy, takes the ``per_round`` best,
asks their labels (the pool's own labels, or ``oracle``), and updates the kernel model
on L: by ``LookAhead.add`` (a block Cholesky update, the network fixed: the paper's
"sequential" mode), or, with ``retrain``, by retraining the network on the new L and
recomputing every kernel and the factor around the new weights (as the paper does).

Kernels: one ``tk.gram`` call over all the loop's points [L; pool; E; test] per network
(each per-sample gradient computed once); every block the loop needs (K_LL, K_CL, the
candidates' diagonal, K_EL, K_EC, K_TL) is a slice of it, and so are the ``add`` blocks.
That Gram is (m + pool + e + test)^2 values: for pools whose Gram does not fit, write
the loop over ``tk.LookAhead`` with kernels of your own (docs/lookahead.md).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from .._model import eval_mode, model_device
from ..pipeline import gram
from ..outputs import logits_of
from .acquire import (entropy, expected_change, margin, most_likely_change, pseudo_label_disagreement, random_scores,
                      select)
from .model import LookAhead


@dataclass
class Candidates:
    """What a strategy sees in one round (c candidates: the remaining pool; e evaluation
    points; the kernel model's predictions ``pred_C``, ``pred_E`` are those of ``la``)."""

    la: LookAhead
    K_CL: torch.Tensor  # [c, m] (or [c, m, k, k])
    k_CC: torch.Tensor  # [c] (or [c, k, k])
    K_EL: torch.Tensor  # [e, m]
    K_EC: torch.Tensor  # [e, c]
    f0_C: torch.Tensor  # the network's outputs [c, k]
    f0_E: torch.Tensor  # [e, k]
    pred_C: torch.Tensor  # the kernel model at the candidates [c, k]
    pred_E: torch.Tensor  # [e, k]
    generator: torch.Generator
    chunk: Optional[int] = None


# The look-ahead criteria measure the change from the current kernel model (pred_E) and
# take their pseudo-label from it (pred_C): that is the model being updated. Right after a
# (re)build it is the network plus the kernel regression on its residuals at L, which is
# the network itself (the paper's f_L) when the network fits L; after an ``add`` with a
# fixed network, f0 no longer describes the model at all.
STRATEGIES: Dict[str, Callable[[Candidates], torch.Tensor]] = {
    "random": lambda c: random_scores(c.K_CL.shape[0], generator=c.generator),
    "margin": lambda c: margin(c.pred_C),
    "entropy": lambda c: entropy(c.pred_C),
    "look-ahead": lambda c: most_likely_change(c.la, c.K_CL, c.k_CC, c.K_EL, c.K_EC, f0_C=c.f0_C, f0_E=c.f0_E,
                                               outputs=c.pred_C, reference=c.pred_E, chunk=c.chunk),
    "expected-change": lambda c: expected_change(c.la, c.K_CL, c.k_CC, c.K_EL, c.K_EC, f0_C=c.f0_C, f0_E=c.f0_E,
                                                 outputs=c.pred_C, reference=c.pred_E, chunk=c.chunk),
    "disagreement": lambda c: pseudo_label_disagreement(c.la, c.K_CL, c.k_CC, c.K_EL, c.K_EC, f0_C=c.f0_C,
                                                        f0_E=c.f0_E, outputs=c.pred_C, reference=c.pred_E,
                                                        chunk=c.chunk),
}


@dataclass
class History:
    """What ``run_rounds`` did; lists are per round, index 0 = before the first pick.

    picked[r]: pool positions (indices into the pool as passed) labelled in round r + 1;
    scores[r]: the strategy's scores [c] of the candidates remaining then (pool order);
    labelled: |L|; accuracy: the kernel model's test accuracy; network_accuracy: the
    network's own (changes only with ``retrain``); seconds: wall time of each round.
    model: the network at the end (a retrained copy with ``retrain``, else the model
    passed in, unchanged); lookahead: the final ``LookAhead`` on L (to continue by hand).
    """

    strategy: str
    labelled: List[int] = field(default_factory=list)
    picked: List[torch.Tensor] = field(default_factory=list)
    scores: List[torch.Tensor] = field(default_factory=list)
    accuracy: List[float] = field(default_factory=list)
    network_accuracy: List[float] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    model: Optional[nn.Module] = None
    lookahead: Optional[LookAhead] = None


def _pair(data: Any, name: str, need_labels: bool):
    """(X, y) or X -> (X, y or None), with y integer class labels [n]."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    elif isinstance(data, torch.Tensor):
        x, y = data, None
    else:
        raise TypeError(f"{name} must be a tensor of inputs X or a pair (X, y) of tensors; got {type(data).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        raise TypeError(f"{name}: the inputs must be a tensor [n, ...], one sample per row; got {type(x).__name__}")
    if y is None:
        if need_labels:
            raise ValueError(f"{name} needs its labels: pass ({name}_X, {name}_y)")
        return x, None
    y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool or y.shape != (len(x),):
        raise ValueError(f"{name}: labels must be integer class labels of shape [{len(x)}] (one per sample); got "
                         f"dtype {y.dtype}, shape {list(y.shape)}")
    return x, y.long().cpu()


def _outputs(net: nn.Module, X: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    with torch.no_grad(), eval_mode(net):
        return torch.cat([logits_of(net(b.to(device)), len(b)).double() for b in X.split(batch_size)])


def run_rounds(model: nn.Module, labelled: Any, pool: Any, *, evaluation: Optional[torch.Tensor] = None,
               test: Any = None, strategy: Union[str, Callable[[Candidates], torch.Tensor]] = "look-ahead",
               rounds: int = 5, per_round: int = 10,
               retrain: Optional[Callable[[nn.Module, torch.Tensor, torch.Tensor], Optional[nn.Module]]] = None,
               oracle: Optional[Callable[[torch.Tensor], Any]] = None, idx=None, output: Any = "sum",
               precision: str = "fp32", beta: float = 1e-3, beta_scale: Optional[str] = "trace",
               batch_size: int = 256, device=None, seed: int = 0, chunk: Optional[int] = None) -> History:
    """Active learning rounds on a classifier; see the module docstring and docs/lookahead.md.

    Args:
        model: the network, trained on ``labelled``; outputs [B, k] class scores. Never
            modified (``retrain`` receives a copy).
        labelled: (X_L, y_L), integer labels [m]; the square-loss targets are one-hot.
        pool: (X_P, y_P), whose labels are revealed as points are picked, or X_P with
            ``oracle(positions) -> labels`` (positions: int64 indices into X_P).
        evaluation: inputs X_E where the look-ahead criteria measure the change of the
            predictions; None: the remaining pool (the paper's choice).
        test: (X_T, y_T) for the accuracy after each round, or None.
        strategy: "look-ahead" (MLMOC), "expected-change" (EMOC), "disagreement"
            (``pseudo_label_disagreement``), "margin", "entropy" (of the kernel model),
            "random", or a callable ``Candidates -> scores [c]``.
        retrain: None (``LookAhead.add`` between rounds, the network fixed), or
            ``retrain(model, X_L, y_L)`` called after each round's picks, which trains the
            copy in place (returning None) or returns a new network; every kernel is then
            recomputed and the factor rebuilt around the new weights.
        idx, output, precision, batch_size, device: as in ``tk.gram`` (output "sum", the
            pNTK of the paper, by default; "full" gives the k x k eNTK).
        beta: the ridge; with beta_scale="trace" relative to the mean diagonal of K_LL
            when a factor is built (at the start and after each retrain; ``add`` keeps
            it), with None absolute.
        seed: of the "random" strategy's generator. chunk: as in ``LookAhead.what_if``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    X_L, y_L = _pair(labelled, "labelled", need_labels=True)
    X_P, y_P = _pair(pool, "pool", need_labels=oracle is None)
    if oracle is not None and not callable(oracle):
        raise TypeError(f"oracle must be callable (pool positions -> labels); got {type(oracle).__name__}")
    X_T, y_T = _pair(test, "test", need_labels=True) if test is not None else (None, None)
    if evaluation is not None and (not isinstance(evaluation, torch.Tensor) or evaluation.ndim == 0):
        # Labels here would be ignored (the criteria use none): refuse them rather than drop them.
        raise TypeError(f"evaluation must be the inputs X_E (a tensor [e, ...]); got {type(evaluation).__name__}. "
                        "For the accuracy per round pass test=(X_T, y_T)")
    X_E = evaluation
    for arg, value in (("rounds", rounds), ("per_round", per_round)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if arg == "rounds" else 1):
            kind = "non-negative" if arg == "rounds" else "positive"
            raise ValueError(f"{arg} must be a {kind} int; got {value!r}")
    if rounds * per_round > len(X_P):
        raise ValueError(f"rounds * per_round = {rounds * per_round} points but the pool has {len(X_P)}: "
                         "fewer rounds, or fewer points per round")
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)} or a callable; got {strategy!r}")
        score, name = STRATEGIES[strategy], strategy
    elif callable(strategy):
        score, name = strategy, getattr(strategy, "__name__", "custom")
    else:
        raise TypeError(f"strategy must be a name or a callable Candidates -> scores; got {type(strategy).__name__}")
    if retrain is not None and not callable(retrain):
        raise TypeError(f"retrain must be callable (model, X_L, y_L) -> None or a model; got {type(retrain).__name__}")
    if beta_scale not in (None, "trace"):
        raise ValueError(f"beta_scale must be 'trace' (beta relative to mean(diag K_LL)) or None; got {beta_scale!r}")

    # Rows of the one Gram: [L0; pool; E; test]. Labels known so far in y_U (-1: unknown).
    parts = [X_L, X_P] + [x for x in (X_E, X_T) if x is not None]
    X_U = torch.cat([x.to(X_L.device) for x in parts])
    m0, P = len(X_L), len(X_P)
    rows_P = torch.arange(m0, m0 + P)
    rows_E = None if X_E is None else torch.arange(m0 + P, m0 + P + len(X_E))
    rows_T = None if X_T is None else torch.arange(len(X_U) - len(X_T), len(X_U))
    y_U = torch.full((len(X_U),), -1, dtype=torch.long)
    y_U[:m0] = y_L
    net = copy.deepcopy(model) if retrain is not None else model
    g = torch.Generator().manual_seed(seed)
    history = History(strategy=name)

    def kernels(network):
        K = gram(network, list(X_U.split(batch_size)), idx, output=output, precision=precision, device=device,
                 progress=False).double()
        f0 = _outputs(network, X_U, batch_size, device if device is not None else model_device(network))
        return K, f0.to(K.device)

    def build(K, f0, rows_L):
        K_LL = K[rows_L][:, rows_L]
        b = beta
        if beta_scale == "trace":
            d = K_LL.diagonal() if K_LL.ndim == 2 else torch.einsum("iiaa->i", K_LL) / K_LL.shape[-1]
            b = beta * float(d.mean())
        return LookAhead(K_LL, Y[rows_L], f0=f0[rows_L], beta=b)

    def record(la, K, f0, rows_L, seconds):
        history.labelled.append(len(rows_L))
        history.seconds.append(seconds)
        if rows_T is not None:
            y = y_U[rows_T].to(K.device)
            pred = la.predict(K[rows_T][:, rows_L], f0[rows_T])
            history.accuracy.append(float((pred.argmax(1) == y).double().mean()))
            history.network_accuracy.append(float((f0[rows_T].argmax(1) == y).double().mean()))

    start = time.perf_counter()
    K, f0 = kernels(net)
    k = f0.shape[1]
    if k < 2:
        raise ValueError(f"the model has {k} output(s); run_rounds is for classifiers with k >= 2 class scores")
    for what, y in (("labelled", y_L), ("pool", y_P), ("test", y_T)):
        if y is not None and len(y) and not 0 <= int(y.min()) <= int(y.max()) < k:
            raise ValueError(f"{what}: labels must lie in [0, {k}) (the model's {k} outputs); got "
                             f"[{int(y.min())}, {int(y.max())}]")
    y_U[m0:m0 + P] = y_P if y_P is not None else -1
    if rows_T is not None:
        y_U[rows_T] = y_T
    Y = torch.zeros(len(X_U), k, dtype=torch.float64, device=K.device)
    Y[:m0] = nn.functional.one_hot(y_L, k).double().to(K.device)

    rows_L, rows_C = torch.arange(m0), rows_P.clone()
    la = build(K, f0, rows_L)
    record(la, K, f0, rows_L, time.perf_counter() - start)
    for _ in range(rounds):
        start = time.perf_counter()
        rows_E_now = rows_C if rows_E is None else rows_E
        K_CL, K_EL = K[rows_C][:, rows_L], K[rows_E_now][:, rows_L]
        cand = Candidates(la=la, K_CL=K_CL, k_CC=K[rows_C, rows_C],  # the diagonal: [c] or [c, k, k]
                          K_EL=K_EL, K_EC=K[rows_E_now][:, rows_C], f0_C=f0[rows_C], f0_E=f0[rows_E_now],
                          pred_C=la.predict(K_CL, f0[rows_C]), pred_E=la.predict(K_EL, f0[rows_E_now]),
                          generator=g, chunk=chunk)
        scores = score(cand)
        sel = select(scores, per_round)
        rows_A = rows_C[sel.cpu()]
        positions = rows_A - m0
        history.scores.append(torch.as_tensor(scores).detach().double().cpu())
        history.picked.append(positions)
        if oracle is not None:
            got = torch.as_tensor(oracle(positions.clone()))
            if got.shape != (len(positions),) or got.dtype.is_floating_point:
                raise ValueError(f"oracle must return {len(positions)} integer labels, one per position; got "
                                 f"dtype {got.dtype}, shape {list(got.shape)}")
            y_U[rows_A] = got.long().cpu()
        y_A = y_U[rows_A]
        if not 0 <= int(y_A.min()) <= int(y_A.max()) < k:
            raise ValueError(f"labels of the picked pool points must lie in [0, {k}); got {y_A.tolist()}")
        Y[rows_A] = nn.functional.one_hot(y_A, k).double().to(K.device)
        keep = torch.ones(len(rows_C), dtype=torch.bool)
        keep[sel.cpu()] = False
        rows_old, rows_L, rows_C = rows_L, torch.cat([rows_L, rows_A]), rows_C[keep]
        if retrain is None:
            la.add(K[rows_A][:, rows_old], K[rows_A][:, rows_A], Y[rows_A], f0[rows_A])
        else:
            new = retrain(net, X_U[rows_L].clone(), y_U[rows_L].clone())
            if new is not None and not isinstance(new, nn.Module):
                raise TypeError("retrain must return None (trained in place) or an nn.Module; got "
                                f"{type(new).__name__}")
            net = new if new is not None else net
            K, f0 = kernels(net)
            la = build(K, f0, rows_L)
        record(la, K, f0, rows_L, time.perf_counter() - start)
    history.model, history.lookahead = net, la
    return history
