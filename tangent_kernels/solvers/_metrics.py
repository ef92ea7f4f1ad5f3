"""Validation scores, selection keys and per-beta histories."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ._checks import _Targets
from .multi_output import unflatten_scores


# ----------------------------------------------------------------------------- metrics


@dataclass
class _Validation:
    """Held-out data: cross kernel [n_val, n], targets, and f0 offsets [n_val, m] or None."""

    K: torch.Tensor
    targets: _Targets
    f0: Optional[torch.Tensor]
    block: int = 1  # k of a multi-output kernel flattened to [n_val k, n k] (solvers/multi_output.py)

    def scores(self, coefs: torch.Tensor) -> torch.Tensor:
        """coefs [n, a, m] -> validation scores [n_val, a, m] (f0 added); a multi-output
        kernel's flat coefs [n k, a, 1] -> [n_val, a, k]."""
        n, a, m = coefs.shape
        P = (self.K @ coefs.reshape(n, a * m)).view(-1, a, m)
        if self.block > 1:
            P = unflatten_scores(P, self.block)
        return P if self.f0 is None else P + self.f0[:, None, :]


def _metrics(P: torch.Tensor, targets: _Targets) -> Dict[str, List[float]]:
    """Scores P [n, a, m] against targets -> {'loss': [a], 'accuracy' or 'r2': [a]}."""
    T = targets.values
    err = P - T[:, None, :]
    out = {"loss": err.pow(2).mean(dim=(0, 2)).tolist()}
    if targets.labels is not None:
        hits = P.argmax(dim=2) == targets.labels[:, None]
        out["accuracy"] = hits.to(P.dtype).mean(dim=0).tolist()
    else:
        # R^2 per output, averaged over outputs (scikit-learn's multioutput="uniform_average");
        # a constant target column scores 1 when predicted exactly, else 0 (as scikit-learn).
        sse = err.pow(2).sum(dim=0)  # [a, m]
        sst = (T - T.mean(dim=0)).pow(2).sum(dim=0)  # [m]
        r2 = torch.where(sst > 0, 1 - sse / sst.clamp_min(torch.finfo(P.dtype).tiny), (sse == 0).to(P.dtype))
        out["r2"] = r2.mean(dim=1).tolist()
    return out


def _key(metrics: Dict[str, List[float]], i: int) -> Tuple[float, ...]:
    """Larger is better: accuracy first (ties broken by lower loss), else lower loss. NaN is worst."""
    loss = metrics["loss"][i]
    loss = -math.inf if math.isnan(loss) else -loss
    if "accuracy" in metrics:
        return (metrics["accuracy"][i], loss)
    return (loss,)


def _new_history(beta: float, validation: bool, classification: bool) -> Dict[str, Any]:
    h: Dict[str, Any] = {"beta": beta, "iteration": [], "train_loss": [], "residual": []}
    if validation:
        h["val_loss"] = []
        h["val_accuracy" if classification else "val_r2"] = []
        h["best_iteration"] = None
    return h


def _record(h: Dict[str, Any], iteration: int, train: float, residual: float,
            val: Optional[Dict[str, List[float]]], i: int) -> None:
    h["iteration"].append(iteration)
    h["train_loss"].append(train)
    h["residual"].append(residual)
    if val is not None:
        h["val_loss"].append(val["loss"][i])
        key = "val_accuracy" if "accuracy" in val else "val_r2"
        h[key].append(val["accuracy" if "accuracy" in val else "r2"][i])
