"""The batched pass: sampled per-sample gradients of many tensors from one forward and one
backward per batch.

The sampled parameter tensors enter ``functional_call`` as leaves that require grad, so
that every op consuming one of them is recorded by autograd; ``UseMode`` (uses.py) sees
each such op and the rules record what its per-sample gradient needs. One
``torch.autograd.grad(s.sum(), targets)`` then reads ds/d(target) at every use for all
samples at once (samples do not interact in eval mode); no weight gradient is computed
(autograd prunes what the targets do not need), and no full per-sample gradient is
formed except by the autograd pullback of small derived tensors.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointError
from .._model import substituted

from ..data import ModelInputs
from ..outputs import OutputSpec, OutputValueError, logits_of, scalarize
from ..params import TensorSlice
from . import broadcast, conv, decompose, embedding, fallback, linear  # noqa: F401 - they register their rules
from .factors import FactorSink
from .rules import Sink, Uncovered
from .uses import UseMode, leaf_kind
from .views import SampledTensor

__all__ = ["BatchedPass", "Uncovered"]

_RECOMPUTED = ("the forward is recomputed during the backward (torch.utils.checkpoint) in a way the batched pass "
               "cannot follow")


def _tracked(result) -> bool:
    """Whether any tensor of a model's result (a tensor, a tuple, a dict / ModelOutput) is
    tracked by autograd."""
    values = result.values() if isinstance(result, dict) else result if isinstance(result, (tuple, list)) else [result]
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def _starts(uses) -> List[int]:
    """Where each use's gradients start in the flat list of all uses' targets."""
    starts, at = [], 0
    for use in uses:
        starts.append(at)
        at += len(use.targets)
    return starts


class BatchedPass:
    """F[:, columns] of the given tensors for one batch at a time (``Uncovered`` on misfit)."""

    def __init__(self, model: nn.Module, slices: Sequence[TensorSlice], state, output: OutputSpec,
                 device: torch.device, backend: str, dense=None, structured: Sequence[TensorSlice] = (),
                 choices: Optional[Dict[str, object]] = None):
        """structured: slices of tensors whose uses hand factors (``choices``: their
        structured.plan.Choice) instead of features; their columns are not in ``out``."""
        self.model, self.output, self.backend, self.dense = model, output, backend, dense
        self.choices = dict(choices or {})
        trainable, rest = state
        self.sampled: List[SampledTensor] = []
        leaves = {}
        for piece in list(slices) + list(structured):
            tensor = trainable[piece.name]
            leaf = (tensor if tensor.is_contiguous() else tensor.contiguous()).detach().requires_grad_(True)
            leaves[piece.name] = leaf
            self.sampled.append(SampledTensor(piece.name, leaf, piece.local.to(device), piece.columns.to(device),
                                              whole=piece.whole))
        self.state = ({**trainable, **leaves}, rest)
        self._leaf_kinds = [leaf_kind(st) for st in self.sampled]  # the same leaves every batch
        self._featured = [st for st in self.sampled if st.name not in self.choices]
        self._featured_count = sum(st.columns.numel() for st in self._featured)
        self._columns: Optional[torch.Tensor] = None  # their columns of out, when out has others too
        self.sketch: Optional[torch.Tensor] = None  # the last pass's sketch of the factors (a projection's)
        # What the first batch saw: parameter name -> the rules of its uses.
        self.paths: Dict[str, List[str]] = {}
        self.reached: set = set()  # tensors some gradient reached on the first batch
        self.dead_tokens: Dict[str, bool] = {}
        self._module_names = {id(module): name or "(the model)" for name, module in model.named_modules()}
        # The caller's parameters (the state shares their memory where dtype and device agree).
        self._parameters = {name: p for name, p in model.named_parameters()}

    def _featured_columns(self, device: torch.device) -> torch.Tensor:
        # Concatenated on first need only: the pass the plan probes with (every tensor,
        # 11M columns for resnet18) never needs them, and the cat cost 40 ms per call.
        if self._columns is None:
            columns = [st.columns for st in self._featured]
            self._columns = torch.cat(columns) if columns else torch.empty(0, dtype=torch.int64, device=device)
        return self._columns

    def probe(self, batch: ModelInputs) -> Tuple[list, Dict[str, str]]:
        """The forward alone: (its uses, the tensors no rule covers with why), for the plan."""
        mode, _ = substituted(self.model, self.state, lambda: self._forward(batch), self._tensors(batch))
        return mode.uses, dict(mode.uncovered)

    @staticmethod
    def _tensors(batch: ModelInputs) -> list:
        return [*batch.args, *batch.kwargs.values()]

    def _forward(self, batch: ModelInputs):
        """The model's forward on the batch with every use of a sampled tensor seen; runs
        inside ``substituted`` (the model's tensors are the leaves already)."""
        mode = UseMode(self.sampled, batch.size, self.backend, self._leaf_kinds)
        inputs = [value for value in (*batch.args, *batch.kwargs.values()) if isinstance(value, torch.Tensor)]
        for value in inputs:
            if batch.is_batched(value):
                mode.mark_data(value)
        # Which module writes its input in place is named from the frames when it happens.
        mode.watch_inputs(inputs, self._module_names, self._parameters)
        with torch.enable_grad():
            with mode:
                result = self.model(*batch.args, **batch.kwargs)
        return mode, result

    def __call__(self, batch: ModelInputs, out: torch.Tensor, projection=None,
                 keep_row: int = 0) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """out [B, p] (one scalar output) or [B, k, p] (every logit: output "full" and kin):
        the sampled per-sample gradients, from one forward and one backward per output.
        Returns the structured tensors' factors (persample.factors.FactorSink.finish); with
        a Kronecker ``projection`` their sketch [B, (k,) dim] instead, in ``self.sketch``,
        and the factors of row ``keep_row`` only (the check's).
        Forward and backward run with the model's tensors swapped (a forward recomputed
        during the backward, torch.utils.checkpoint, must see the same tensors)."""
        self.sketch = None
        return substituted(self.model, self.state, lambda: self._pass(batch, out, projection, keep_row),
                           self._tensors(batch))

    def _pass(self, batch: ModelInputs, out: torch.Tensor, projection=None,
              keep_row: int = 0) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        mode, result = self._forward(batch)
        with torch.enable_grad():
            if mode.uncovered:
                raise Uncovered(mode.uncovered)
            changed = {st.name: "its input was modified in place after the use" for use in mode.uses
                       if use.changed_input() for st in use.sampled}
            if changed:
                raise Uncovered(changed)
            if out.dim() == 3:  # every logit: one backward per output over the one forward
                logits = logits_of(result, batch.size)
                if logits.shape[1] != out.shape[1]:
                    raise OutputValueError(f"the model returned {logits.shape[1]} outputs for this batch, "
                                           f"{out.shape[1]} for the first")
                scalars = [logits[:, a] for a in range(out.shape[1])]
            else:
                scalars = [scalarize(result, self.output, batch.size)]
            s = scalars[0]
            uses = mode.uses
            seen = Counter()
            for use in uses:
                name = f"{use.sampled[0].name} {use.label}"
                use.key = f"{name} #{seen[name]}"
                seen[name] += 1
            targets = [target for use in uses for target in use.targets]
            if not s.requires_grad and (mode.detached is not None or _tracked(result)):
                where = (f"{mode.detached} in the forward" if mode.detached is not None
                         else "output= (the model's output depends on them, the scalar it returned does not)")
                raise OutputValueError(
                    f"the output does not depend on the parameters: {where} cut it off the computation (e.g. "
                    ".detach(), .item(), torch.no_grad()); return the output as computed"
                )
            counts = Counter(st.name for use in uses for st in use.sampled)
            factors = None
            if self.choices:
                if projection is not None:
                    self.sketch = torch.zeros(*out.shape[:-1], projection.dim, dtype=out.dtype, device=out.device)
                factors = FactorSink(self.choices, len(scalars), out.dim() == 3, projection, self.sketch, keep_row)
                for use in uses:
                    for st in use.sampled:
                        if st.name in self.choices:
                            factors.register(st.name, use.key, use.factor_form(st))
            reached = set()
            for a, scalar in enumerate(scalars):
                if factors is not None:
                    factors.output = a
                grads = [None] * len(targets)
                if targets and scalar.requires_grad:
                    try:
                        grads = torch.autograd.grad(scalar.sum(), targets, allow_unused=True,
                                                    retain_graph=a < len(scalars) - 1)
                    except CheckpointError as error:
                        # The recomputation runs outside the interception, and torch found it
                        # saving other tensors than the intercepted forward did.
                        raise Uncovered({st.name: _RECOMPUTED for st in self.sampled}) from error
                block = out if out.dim() == 2 else out[:, a]
                # The contractions read activations that autograd tracks: F must not join the graph.
                with torch.no_grad():
                    if block.shape[1] == self._featured_count:
                        block.zero_()
                    else:
                        block[:, self._featured_columns(block.device)] = 0
                    sink = Sink(block, self.backend, counts, self.dense, self.dead_tokens, factors)
                    for use, grad_start in zip(uses, _starts(uses)):
                        use_grads = list(grads[grad_start:grad_start + len(use.targets)])
                        use.contribute_all(use_grads, sink)
                        if any(g is not None for g in use_grads):
                            reached.update(st.name for st in use.sampled)
        if not self.paths:
            self.reached = reached
            paths = {st.name: [] for st in self.sampled}
            for use in uses:
                for st in use.sampled:
                    label = use.path(st)
                    if label not in paths[st.name]:
                        paths[st.name].append(label)
            self.paths = paths
        if factors is None:
            return {}
        return factors.finish(batch.size if projection is None else 1, out)
