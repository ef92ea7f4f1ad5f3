"""F [B, p] per batch: the batched pass for every tensor it covers, the generic path for
the rest, and the spot check that the batched pass is exact for this model."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from .._model import evaluate, fp32_math, functional_state, gradients_on
from ..data import ModelInputs
from ..outputs import OutputSpec, is_multi, logits_of
from ..params import ParamIndex, TensorSlice
from .batched import BatchedPass, Uncovered
from .dense import DenseStrategy
from ..structured.plan import Plan, decide
from .factors import index_gradients, per_sample_gradients
from .generic import GenericPath

__all__ = ["FeatureExtractor", "BATCHED"]

_log = logging.getLogger("tangent_kernels")

# Whether the batched pass is used at all (False: every tensor takes the generic path;
# for benchmarks that measure the generic path alone).
BATCHED = True
# Relative difference allowed between the batched pass and a per-sample evaluation of
# the first batch's first and last samples. fp32 is loose: ReLU kinks within rounding of
# zero (see README); TF32 is not checked in TF32 (verify_in_ieee).
_VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9}
_MIXES_SAMPLES = "the batched pass differs from a per-sample evaluation (the model mixes samples within a batch)"


class FeatureExtractor:
    """Per-sample gradient features of one model, output and idx, batch after batch."""

    def __init__(self, model: nn.Module, index: ParamIndex, output: OutputSpec, dtype, device, backend: str = "torch",
                 verify_in_ieee: bool = False, dense=None, structured: str = "never"):
        self.model, self.index, self.output, self.dtype, self.device = model, index, output, dtype, device
        # The structured Gram (structured/): which tensors hand factors instead of features,
        # decided by plan_for on the first batch; blocks then hold feature_index's columns.
        self.structured_mode = structured
        self.plan: Optional[Plan] = None
        self.feature_index = index
        self.kept: Optional[torch.Tensor] = None  # full-index column of each feature column
        self.committed = False
        self.factors: Dict[str, tuple] = {}  # of the last batch
        self.backend = backend
        self.dense = DenseStrategy(backend) if dense is None else dense
        self.tolerance = _VERIFY_TOLERANCE[dtype]
        # Under TF32 a batch and a single sample take different convolution algorithms
        # whose roundings compound through a deep network: on an H100, resnet50's batched
        # and per-sample gradients differed by more than 1e-2 with no sample mixing at
        # all, and every run fell back to the generic path (10x slower). The check asks
        # whether samples interact, so it runs both sides in IEEE fp32 instead.
        self.verify_in_ieee = verify_in_ieee
        self.state = functional_state(model, index.layout, dtype, device)
        # Parameter tensor -> why it takes the generic path (decided on the first batch).
        self.generic_why: Dict[str, str] = {}
        if not BATCHED:
            self.generic_why = {piece.name: "the batched pass is switched off" for piece in index.tensor_slices}
        self.verified = False
        self._warned = not BATCHED
        # After a failed spot check the generic path runs the exact per-sample loop only:
        # vmap itself was seen to differ from the loop on some models (timm's LeViT: 6%).
        self._generic_strategy: Optional[str] = None
        # output "full" / "trace" / "diagonal": every logit, one scalar output per logit,
        # blocks [B, k, p]; k is read from the model on the first batch.
        self.multi = is_multi(output)
        self.k: Optional[int] = None
        self._build()

    @property
    def scalar_outputs(self) -> list:
        """The scalar outputs whose gradients each batch gives: [output], or 0 .. k-1."""
        return list(range(self.k or 0)) if self.multi else [self.output]

    @property
    def generic(self) -> Optional[GenericPath]:
        return self.generics[0] if self.generics else None

    def _view(self, block: torch.Tensor, a: int) -> torch.Tensor:
        return block[:, a] if self.multi else block

    @property
    def generic_slices(self) -> List[TensorSlice]:
        return [piece for piece in self.feature_index.tensor_slices if piece.name in self.generic_why]

    @property
    def structured_names(self) -> List[str]:
        return self.plan.structured if self.plan is not None else []

    @property
    def paths(self) -> Dict[str, List[str]]:
        """The rules that served each batched tensor on the first batch."""
        return self.batched.paths if self.batched is not None else {}

    def _build(self) -> None:
        names = set(self.structured_names)
        batched = [piece for piece in self.feature_index.tensor_slices if piece.name not in self.generic_why]
        structured = [piece for piece in self.index.tensor_slices if piece.name in names]
        choices = {name: self.plan.choices[name] for name in names}
        self.batched = (BatchedPass(self.model, batched, self.state, self.output, self.device, self.backend, self.dense,
                                    structured, choices) if batched or structured else None)
        generic = self.generic_slices
        self.generics = [GenericPath(self.model, self.index.layout, generic, output, self.dtype, self.device,
                                     strategy=self._generic_strategy, state=self.state)
                         for output in self.scalar_outputs] if generic else []
        if self.batched is None:
            self.verified = True

    def plan_for(self, batch: ModelInputs, forced: Optional[List[str]] = None) -> Plan:
        """Decide (once) which tensors take the structured Gram, from a forward of the
        batch's first two samples; ``forced``: exactly these (a checkpointed run's)."""
        if self.plan is not None:
            return self.plan
        with gradients_on():
            return self._plan_for(batch, forced)

    def _plan_for(self, batch: ModelInputs, forced: Optional[List[str]]) -> Plan:
        if self.multi and self.k is None:
            self.k = self._count_outputs(batch)
        plan = Plan()
        if self.batched is not None and (self.structured_mode != "never" or forced):
            probe = self.batched  # before any plan: every covered tensor, features only
            uses, uncovered = probe.probe(batch.slice(0, min(batch.size, 2)))
            excluded = {**{name: f"generic: {why}" for name, why in self.generic_why.items()},
                        **{name: f"generic: {why}" for name, why in uncovered.items()}}
            plan = decide(uses, probe.sampled, excluded, self.k or 1, self.structured_mode, self.device, self.dtype,
                          forced)
        self._set_plan(plan)
        return plan

    def _set_plan(self, plan: Plan) -> None:
        self.plan = plan
        names = set(plan.without_features)
        keep = torch.cat([piece.columns for piece in self.index.tensor_slices if piece.name not in names]
                         or [torch.empty(0, dtype=torch.int64)])
        # The slices come in layout order, so keep is ascending unless idx was given unsorted.
        ascending = keep.numel() < 2 or bool((keep[1:] > keep[:-1]).all())
        self.kept = keep if ascending else torch.sort(keep).values
        self.feature_index = (ParamIndex(self.index.layout, self.index.positions[self.kept]) if names
                              else self.index)
        self._build()

    def _drop_structured(self, names, why: str) -> None:
        """Send structured tensors back to the features (before the plan is committed)."""
        if self.committed:
            raise RuntimeError(
                f"the structured Gram was chosen for {', '.join(sorted(names))} on the first batch, but on this "
                f"batch {why}; pass structured='never' to gram() (features for every tensor), or delete the "
                "checkpoint folder if this is a resumed run")
        self.plan.drop(names, why)
        self._set_plan(self.plan)

    def commit(self) -> None:
        """The plan is final from here on (the engine sized its stores by it)."""
        self.committed = True

    def extract(self, batch: ModelInputs):
        """(block [B, p'] or [B, k, p'] of feature_index's columns, {tensor: factors})."""
        block = self(batch)
        return block, self.factors

    def __call__(self, batch: ModelInputs) -> torch.Tensor:
        """The block of feature_index's columns; the structured tensors' factors of the
        same batch are left in ``self.factors`` (see extract)."""
        self.factors = {}
        tensors = [v for v in (*batch.args, *batch.kwargs.values()) if isinstance(v, torch.Tensor)]
        versions = [t._version for t in tensors]
        with gradients_on():
            block, self.factors = self._features(batch)
        if any(t._version != v for t, v in zip(tensors, versions)):
            # The batched pass names the op; the generic path (no interception) can only tell.
            raise ValueError(
                "the model wrote its input in place during its forward: tangent_kernels evaluates a batch more "
                "than once and never changes the caller's data. Compute out of place in forward (e.g. "
                "x = x * 2 instead of x.mul_(2), or x = x.clone() first)"
            )
        return block

    def _count_outputs(self, batch: ModelInputs) -> int:
        """k, the number of logits, from one sample of the first batch."""
        sample = batch.slice(0, 1)
        with torch.no_grad():
            result = evaluate(self.model, self.state, sample.args, sample.kwargs)
        return int(logits_of(result, 1).shape[1])

    def _features(self, batch: ModelInputs):
        if self.plan is None:
            self.plan_for(batch)
        if self.multi and self.k is None:
            self.k = self._count_outputs(batch)
            self._build()
        p = len(self.feature_index)
        shape = (batch.size, self.k, p) if self.multi else (batch.size, p)
        block = torch.empty(shape, dtype=self.dtype, device=self.device)
        factors = {}
        while self.batched is not None:
            try:
                factors = self.batched(batch, block)
                break
            except Uncovered as misfit:
                _log.debug("generic path for %s", misfit)
                lost = set(misfit.why) & set(self.structured_names)
                if lost:  # back to features first: the generic path cannot hand factors
                    self._drop_structured(lost, "; ".join(misfit.why[name] for name in lost))
                    return self._features(batch)
                self.generic_why.update(misfit.why)
                self._build()
        for a, generic in enumerate(self.generics):
            generic(batch, self._view(block, a))
        if not self.verified and not self._verify(batch, block, factors):
            return self._features(batch)
        if not self._warned:
            self._warned = True
            self._warn_generic()
        return block, factors

    def _warn_generic(self) -> None:
        self._warn_unused()
        generic = self.generic_slices
        if not generic:
            return
        entries = sum(piece.local.numel() for piece in generic)
        listed = "; ".join(f"{piece.name} ({self.generic_why[piece.name]})" for piece in generic[:8])
        more = f"; and {len(generic) - 8} more" if len(generic) > 8 else ""
        warnings.warn(
            f"{len(generic)} parameter tensor(s) with {entries} of the {len(self.index)} sampled entries take the "
            f"generic per-sample path, which evaluates the model sample by sample (slower): {listed}{more}. "
            "tk.coverage(model, batch, idx) lists every tensor's path.",
            RuntimeWarning,
            stacklevel=5,
        )

    def _warn_unused(self) -> None:
        if self.batched is None:
            return
        unused = [st.name for st in self.batched.sampled if st.name not in self.batched.reached]
        if unused:
            listed = ", ".join(unused[:8]) + (f", and {len(unused) - 8} more" if len(unused) > 8 else "")
            warnings.warn(
                f"the output does not depend on {len(unused)} sampled parameter tensor(s) on the first batch: "
                f"{listed}; their features are zero (the exact gradient), so they add nothing to K",
                RuntimeWarning,
                stacklevel=5,
            )

    def _fp64_disagreement(self, batch: ModelInputs) -> float:
        """The spot check again in float64, on the batch's first few samples."""
        sub = batch.slice(0, min(batch.size, 4)).to(self.device, torch.float64)
        exact = FeatureExtractor(self.model, self.index, self.output, torch.float64, self.device, self.backend)
        exact.generic_why, exact.k = dict(self.generic_why), self.k
        exact._build()
        exact.verified = exact._warned = True
        block = exact._features(sub)[0]
        return exact._disagreement(sub, block, {}, sorted({0, sub.size - 1}))

    def _checked_outputs(self) -> List[int]:
        """Which outputs the spot check evaluates: all of one, or the first and last logit
        (whether samples interact does not depend on the logit; each costs per-sample
        evaluations of the whole model)."""
        return [0] if not self.multi else sorted({0, self.k - 1})

    def _disagreement(self, batch: ModelInputs, block: torch.Tensor, factors, rows: List[int]) -> float:
        """||batched - alone|| / ||alone|| over ``rows`` and the checked outputs: the
        batched pass's gradients (the block's columns, the structured tensors' rebuilt from
        their factors) against each sample evaluated alone (the definition). Norms tensor by
        tensor, combined in float64, never [rows, p] copies: at p = 11M (resnet18) those
        copies cost more than the per-sample evaluations."""
        structured = {piece.name: piece for piece in self.index.tensor_slices if piece.name in factors}
        featured = self.feature_index.tensor_slices
        squares = []  # (||got - expected||, ||expected||) per tensor, row and output, as 0-d tensors

        def add(got: torch.Tensor, expected: Optional[torch.Tensor]) -> None:
            if expected is None:  # the output does not depend on the tensor: a zero gradient
                squares.append((torch.linalg.vector_norm(got), got.new_zeros(())))
            else:  # fused (no temporary): 12x faster than forming the difference
                squares.append((torch.dist(got, expected), torch.linalg.vector_norm(expected)))

        for c in self._checked_outputs():
            alone = GenericPath(self.model, self.index.layout, self.index.tensor_slices, self.scalar_outputs[c],
                                self.dtype, self.device, strategy="loop", state=self.state)
            for row in rows:
                grads = alone.sample_gradients(batch.slice(row, row + 1))
                got_row = block[row, c] if self.multi else block[row]
                for piece in featured:
                    grad = grads[piece.name]
                    span = piece.span(grad.numel() if grad is not None else -1)
                    got = got_row[span] if span is not None else got_row[piece.columns.to(block.device)]
                    add(got, None if grad is None else grad.reshape(-1) if span is not None
                        else grad.reshape(-1)[piece.local.to(grad.device)])
                for name, (x, g) in factors.items():
                    piece, grad, choice = structured[name], grads[name], self.plan.choices[name]
                    g_row = g[row:row + 1, c:c + 1] if self.multi else g[row:row + 1]
                    if choice.index:  # token ids into the table's rows
                        rows_of_table = self.index.layout.shapes[self.index.layout.names.index(name)][0]
                        got = index_gradients(x[row:row + 1], g_row, rows_of_table).reshape(-1)
                    else:
                        got = per_sample_gradients(x[row:row + 1], g_row, choice.axis).reshape(-1)
                    if choice.bias is not None:
                        # The input's last entry is the absorbed bias' constant 1: the leaf's matrix
                        # [G, X] (axis 1) or [X, G] (axis 0) plus the bias as its last column or row.
                        # Compared as views (torch.dist reads strides: no copies).
                        bias_grad, weight_shape = grads[choice.bias], (choice.g_dim, choice.x_dim - 1)
                        if choice.axis == 1:
                            matrix = got.view(choice.g_dim, choice.x_dim)
                            bias_got, got = matrix[:, -1], matrix[:, :-1]
                        else:
                            matrix, weight_shape = got.view(choice.x_dim, choice.g_dim), weight_shape[::-1]
                            bias_got, got = matrix[-1], matrix[:-1]
                        add(bias_got, None if bias_grad is None else bias_grad.reshape(-1))
                        add(got, None if grad is None else grad.reshape(weight_shape))
                        continue
                    # rebuilt over the sampled entries in ascending order (factors.py)
                    entries = None if piece.whole else torch.sort(piece.local).values.to(self.device)
                    add(got.to(self.dtype), None if grad is None else grad.reshape(-1) if entries is None
                        else grad.reshape(-1)[entries])
        norms = torch.stack([torch.stack(pair) for pair in squares]).double() if squares else torch.zeros(1, 2)
        difference, reference = norms.square().sum(0).sqrt().tolist()
        return difference / max(reference, torch.finfo(torch.float64).tiny)

    def _verify(self, batch: ModelInputs, block: torch.Tensor, factors) -> bool:
        """Spot-check the first batch's first and last samples against the generic path.

        A batched pass is exact only if samples do not interact; a model that mixes
        them (batch statistics, batch-level control flow) is caught here, as far as a
        spot check can, and sent down the generic path, which evaluates every sample
        alone. It guards every rule of the batched pass as well.
        """
        self.verified = True
        rows = sorted({0, batch.size - 1})
        with fp32_math(allow_tf32=False) if self.verify_in_ieee else contextlib.nullcontext():
            batched = block
            if self.verify_in_ieee:
                batched = torch.empty_like(block)
                factors = self.batched(batch, batched)
                for a, generic in enumerate(self.generics):
                    generic(batch, self._view(batched, a))
            error = self._disagreement(batch, batched, factors, rows)
        if error > self.tolerance and self.dtype == torch.float32 and self.batched is not None:
            # fp32 roundings differ between a batch and one sample (other convolution
            # algorithms), and a ReLU input within an ulp of 0 flips: on a random DenseNet-121
            # that alone exceeded the tolerance. Whether samples interact is asked in fp64.
            try:
                fp64_error = self._fp64_disagreement(batch)
            except (RuntimeError, MemoryError) as failure:  # e.g. no room for a float64 copy of a large model
                _log.debug("float64 recheck not possible (%s): the fp32 check decides", failure)
                fp64_error = float("inf")
            _log.debug("spot check: fp32 %.1e, fp64 %.1e", error, fp64_error)
            if fp64_error <= _VERIFY_TOLERANCE[torch.float64]:
                return True
        if error > self.tolerance:
            warnings.warn(
                f"per-sample gradients from the batched pass differ from a per-sample evaluation by "
                f"{error:.1e} (relative) on the first batch: the model seems to mix samples within a "
                "batch (e.g. BatchNorm without running statistics), or lays out activations with the "
                "batch not first (seq-first [T, B, d] with T a multiple of B), or, in fp32 and rarely, a "
                "ReLU input rounded across zero; using the generic per-sample path (exact, slower)",
                RuntimeWarning,
                stacklevel=5,
            )
            self.generic_why.update({piece.name: _MIXES_SAMPLES for piece in self.index.tensor_slices
                                     if piece.name not in self.generic_why})
            self._warned = True  # this warning says it already
            self._generic_strategy = "loop"
            if self.structured_names:  # the generic path gives features: recompute the batch with them
                self._drop_structured(set(self.structured_names), "the spot check failed")
                return False
            self._build()
            for a, generic in enumerate(self.generics):
                generic(batch, self._view(block, a))
        return True
