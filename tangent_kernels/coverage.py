"""``tk.coverage``: which path each sampled parameter tensor takes, and why, from one batch."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

from .data import to_inputs
from .feature_phase import new_extractor
from .request import Request
from .structured import check_structured

__all__ = ["CoverageReport", "coverage"]


@dataclass
class CoverageReport:
    """rows: (parameter tensor, sampled entries, path) for every tensor with sampled
    entries; path is the rules of its uses ("linear", "embedding", "conv", "broadcast
    (view)", ...), "unused" when no use of it reached the output, or "generic: <why>".
    generic: [(tensor, why)] of the tensors on the generic per-sample path (empty when the
    whole model runs batched). gram: tensor -> how tk.gram forms its part of K, "Gram:
    structured (...)" (from its inputs and output gradients, no features) or "Gram:
    features (...)", with the cost model's estimate or why the structured form does not
    apply. structured: the tensors whose part of K is structured."""

    rows: List[Tuple[str, int, str]] = field(default_factory=list)
    generic: List[Tuple[str, str]] = field(default_factory=list)
    gram: Dict[str, str] = field(default_factory=dict)
    structured: List[str] = field(default_factory=list)

    @property
    def batched_entries(self) -> int:
        return sum(entries for _, entries, path in self.rows if not path.startswith("generic"))

    def __str__(self) -> str:
        width = max([len("parameter tensor")] + [len(name) for name, _, _ in self.rows])
        lines = [f"{'parameter tensor':<{width}}  {'sampled':>9}  path", f"{'-' * width}  {'-' * 9}  ----"]
        lines += [f"{name:<{width}}  {entries:>9}  {path}" + (f"; {self.gram[name]}" if name in self.gram else "")
                  for name, entries, path in self.rows]
        total = sum(entries for _, entries, _ in self.rows)
        lines.append(f"{len(self.rows) - len(self.generic)} of {len(self.rows)} tensors, {self.batched_entries} of "
                     f"{total} sampled entries on the batched path")
        return "\n".join(lines)

    __repr__ = __str__


def coverage(model: nn.Module, batch: Any, idx=None, output="first", *, inputs: Optional[Callable] = None,
             precision: str = "fp32", device=None, backend: str = "auto",
             structured: str = "auto") -> CoverageReport:
    """Run one batch through the per-sample gradient machinery (no Gram) and report the
    path of every parameter tensor with sampled entries. Arguments as in ``tk.gram``;
    ``batch`` is one loader batch (a tensor, a tuple with the input first, a dict)."""
    structured = check_structured(structured)
    request = Request.of(model, idx, output=output, precision=precision, device=device, backend=backend,
                         inputs=inputs)
    model_inputs = to_inputs(batch, inputs)
    with request.evaluation(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*generic per-sample path.*")
        extractor = new_extractor(model, request.index, request.output, request.precision, request.device,
                                  request.backend, structured)
        extractor.extract(model_inputs.to(request.device, request.precision.compute))
    index = request.index
    report = CoverageReport()
    paths = extractor.paths
    for piece in index.tensor_slices:
        why = extractor.generic_why.get(piece.name)
        if why is not None:
            path = f"generic: {why}"
            report.generic.append((piece.name, why))
        else:
            absorbed = extractor.plan.absorbed if extractor.plan is not None else {}
            # An absorbed bias is a constant in the pass: it is served by its weight's use.
            path = ", ".join(paths.get(absorbed.get(piece.name, piece.name), [])) or \
                "unused (no use of it reaches the output)"
            gram_path = extractor.plan.describe(piece.name) if extractor.plan is not None else None
            if gram_path is not None:
                report.gram[piece.name] = gram_path
        report.rows.append((piece.name, int(piece.local.numel()), path))
    report.structured = list(extractor.plan.without_features) if extractor.plan is not None else []
    return report
