"""F [B, p] per batch: the batched pass for every tensor it covers, the generic path for
the rest, and the check, on every batch, that the batched pass is exact for it."""

from __future__ import annotations

import logging
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from .._model import evaluate, functional_state, gradients_on
from ..data import ModelInputs
from ..outputs import OutputSpec, is_multi, logits_of
from ..params import ParamIndex, TensorSlice
from .batched import BatchedPass, Uncovered
from .dense import DenseStrategy
from ..structured.plan import Plan, decide
from .factors import index_gradients, per_sample_gradients
from .generic import GenericPath
from ..tuning import keep_old_names, settings  # settings.batched False: every tensor on the generic path

__all__ = ["FeatureExtractor", "PlanCommitted"]

_log = logging.getLogger("tangent_kernels")
keep_old_names(__name__, {"BATCHED": "batched"})  # deprecated: tuning.settings

# Relative difference allowed, per tensor, between the batched pass and the checked sample
# evaluated alone. fp32 is loose: a batch and a sample alone take other algorithms, and a
# ReLU input within rounding of zero flips; a failure in fp32 is asked again in fp64.
# Under TF32 both sides round to 10-bit mantissas in other orders.
_VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9}
_TF32_TOLERANCE = 2e-2
# A tensor whose fp32 (or TF32) difference an fp64 recheck called rounding is allowed this
# many times that difference on later batches: rounding varies with the sample, a wrong
# rule or a mixing model differs by the size of the gradient.
_ROUNDING_MARGIN = 4.0
_MIXES_SAMPLES = "the batched pass differs from the sample evaluated alone (the model mixes samples within a batch)"


class PlanCommitted(RuntimeError):
    """A structured tensor must go back to the features after the plan was committed (the
    stores are sized by it)."""


class FeatureExtractor:
    """Per-sample gradient features of one model, output and idx, batch after batch."""

    def __init__(self, model: nn.Module, index: ParamIndex, output: OutputSpec, dtype, device, backend: str = "torch",
                 tf32_check: bool = False, dense=None, structured: str = "never"):
        self.model, self.index, self.output, self.dtype, self.device = model, index, output, dtype, device
        # The structured Gram (structured/): which tensors hand factors instead of features,
        # decided by plan_for on the first batch; blocks then hold feature_index's columns.
        self.structured_mode = structured
        self.plan: Optional[Plan] = None
        self.feature_index = index
        self.kept: Optional[torch.Tensor] = None  # full-index column of each feature column
        self.committed = False
        # A Kronecker projection (sketch.py) sketches the factors in the pass: their sketch
        # [B, (k,) dim] of the last batch, and the checked row's factors in what ``extract`` returns.
        self.projection = None
        self.factor_sketch: Optional[torch.Tensor] = None
        self.backend = backend
        self.dense = DenseStrategy(backend) if dense is None else dense
        # Under TF32 a batch and a single sample take different convolution algorithms
        # whose roundings compound through a deep network: on an H100, resnet50's batched
        # and per-sample gradients differed by more than 1e-2 with no sample mixing at all.
        # Re-running every batch in IEEE to check it would double the pass; the TF32
        # tolerance is looser instead, and what exceeds it is asked again in fp64.
        self.tolerance = _TF32_TOLERANCE if tf32_check else _VERIFY_TOLERANCE[dtype]
        # Every batch is checked (on one sample each); checked_batches numbers them.
        self.checking = True
        self.checked_batches = 0
        # tk.Kernel's repeated calls (docs/trust.md, "Repeated calls"): the batch sizes and
        # shapes a check passed on since the last failure, and whether the caller lets this
        # batch go unchecked when its own passed (``spare``, set per batch by fill_store;
        # it checks at least one batch of every loader in every call).
        self.passed: set = set()
        self.spare = False
        self.rotation: Optional[int] = None  # tk.Kernel's call number (None: a one-shot call)
        self.spared, self.failures = 0, 0  # batches left unchecked, checks failed (counts, for tk.Kernel)
        # Blocks the caller has copied and no longer holds (give_back, from fill_store): a
        # later batch's block of the same shape. A fresh one per batch paid its page faults
        # every call (a 128 x 136k block: 20% of a repeated gram of the benchmark's BERT).
        self.spare_blocks: List[torch.Tensor] = []
        self._rounding: Dict[str, float] = {}  # tensor -> relative error an fp64 recheck called rounding
        self.state = functional_state(model, index.layout, dtype, device)
        # Parameter tensor -> why it takes the generic path (decided on the first batch).
        self.generic_why: Dict[str, str] = {}
        if not settings.batched:
            self.generic_why = {piece.name: "the batched pass is switched off" for piece in index.tensor_slices}
        self._warned = not settings.batched
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
        self._truths: Dict[tuple, GenericPath] = {}  # the check's evaluations alone, per output and tensors
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
            raise PlanCommitted(
                f"the structured Gram was chosen for {', '.join(sorted(names))} on the first batch, but on this "
                f"batch {why}; pass structured='never' to gram() (features for every tensor), or delete the "
                "checkpoint folder if this is a resumed run")
        self.plan.drop(names, why)
        self._set_plan(self.plan)

    def commit(self) -> None:
        """The plan is final from here on (the engine sized its stores by it)."""
        self.committed = True

    def refresh(self) -> None:
        """Read the model's weights and buffers again (tk.Kernel, before each call). Every
        decision (plan, paths, the check's allowances) is kept: they depend on the structure.
        A copy (buffers always; weights cast to another dtype or device) is taken again even
        when no version counter moved: a write through ``.data`` moves none."""
        state = functional_state(self.model, self.index.layout, self.dtype, self.device)
        old = {**self.state[0], **self.state[1]}
        new = {**state[0], **state[1]}
        # Tensors that share the model's memory, contiguous (the batched pass's leaves are
        # then the same memory too), see every in-place update already: nothing to rebuild.
        if new.keys() == old.keys() and all(t.is_contiguous() and t.data_ptr() == old[name].data_ptr()
                                            and t.shape == old[name].shape for name, t in new.items()):
            return
        self.state = state
        self._build()

    def give_back(self, block: torch.Tensor) -> None:
        """A block of this extractor's that the caller copied and holds no more: kept for a
        later batch of its shape (two shapes at most: a cross kernel's two loaders)."""
        self.spare_blocks = [b for b in self.spare_blocks if b.shape != block.shape][-1:] + [block]

    def extract(self, batch: ModelInputs):
        """(block [B, p'] or [B, k, p'] of feature_index's columns, {tensor: factors}): the
        features and the structured tensors' factors of one batch (the feature phase's call)."""
        tensors = [v for v in (*batch.args, *batch.kwargs.values()) if isinstance(v, torch.Tensor)]
        versions = [t._version for t in tensors]
        with gradients_on():
            block, factors = self._features(batch)
        if any(t._version != v for t, v in zip(tensors, versions)):
            # The batched pass names the op; the generic path (no interception) can only tell.
            raise ValueError(
                "the model wrote its input in place during its forward: tangent_kernels evaluates a batch more "
                "than once and never changes the caller's data. Compute out of place in forward (e.g. "
                "x = x * 2 instead of x.mul_(2), or x = x.clone() first)"
            )
        return block, factors

    def __call__(self, batch: ModelInputs) -> torch.Tensor:
        """The block of feature_index's columns (``extract`` without the factors)."""
        return self.extract(batch)[0]

    def _count_outputs(self, batch: ModelInputs) -> int:
        """k, the number of logits, from one sample of the first batch."""
        sample = batch.alone(0)
        with torch.no_grad():
            result = evaluate(self.model, self.state, sample.args, sample.kwargs)
        return int(logits_of(result, sample.size).shape[1])

    def _features(self, batch: ModelInputs):
        if self.plan is None:
            self.plan_for(batch)
        if self.multi and self.k is None:
            self.k = self._count_outputs(batch)
            self._build()
        p = len(self.feature_index)
        shape = (batch.size, self.k, p) if self.multi else (batch.size, p)
        block = next((b for b in self.spare_blocks if b.shape == shape), None)
        if block is None:
            block = torch.empty(shape, dtype=self.dtype, device=self.device)
        else:
            self.spare_blocks = [b for b in self.spare_blocks if b is not block]
        factors = {}
        while self.batched is not None:
            try:
                factors = self.batched(batch, block, self.projection, self._checked_row(batch.size))
                self.factor_sketch = self.batched.sketch
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
        if self._needs_check() and not self._spared(batch) and not self._verify(batch, block, factors):
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

    def _checked_outputs(self) -> List[int]:
        """Which outputs the check evaluates: all of one, or the first and last logit
        (whether samples interact does not depend on the logit; each costs an evaluation of
        the whole model)."""
        return [0] if not self.multi else sorted({0, self.k - 1})

    def _checked_row(self, batch_size: int) -> int:
        """The sample this batch is checked on: drawn from the library's own generator,
        keyed by the batch's number (reproducible, and the caller's random stream untouched),
        so that over the batches every position is checked, the last one included."""
        generator = torch.Generator().manual_seed(0x7E57 + self.checked_batches)
        return int(torch.randint(batch_size, (1,), generator=generator))

    def _tensor_errors(self, batch: ModelInputs, block: torch.Tensor, factors, row: int) -> Dict[str, tuple]:
        """{tensor: (||batched - alone||, ||alone||)} on sample ``row`` over the checked
        outputs, for every tensor the batched pass served: its gradients (the block's
        columns, the structured tensors' rebuilt from their factors) against the sample
        evaluated alone (the definition; ModelInputs.alone: never a batch of one). Norms
        tensor by tensor, never [rows, p] copies: at p = 11M (resnet18) those copies cost
        more than the evaluation."""
        structured = {piece.name: piece for piece in self.index.tensor_slices if piece.name in factors}
        # The generic loop computes what the check does (each sample alone, as two copies):
        # its tensors are not checked. Those of vmap (a batch of one per sample) are.
        exact = set(self.generic_why) if self._generic_is_the_loop() else set()
        featured = [piece for piece in self.feature_index.tensor_slices if piece.name not in exact]
        norms: Dict[str, list] = {}

        def add(name: str, got: torch.Tensor, expected: Optional[torch.Tensor]) -> None:
            if expected is None:  # the output does not depend on the tensor: a zero gradient
                pair = (torch.linalg.vector_norm(got), got.new_zeros(()))
            else:  # fused (no temporary): 12x faster than forming the difference
                pair = (torch.dist(got, expected), torch.linalg.vector_norm(expected))
            norms.setdefault(name, []).append(torch.stack(pair).double())

        checked = [piece for piece in self.index.tensor_slices if piece.name not in exact or piece.name in structured]
        sample = batch.alone(row)
        for c in self._checked_outputs():
            key = (c, tuple(piece.name for piece in checked))
            if key not in self._truths:  # kept across batches until the paths change (_build)
                self._truths[key] = GenericPath(self.model, self.index.layout, checked, self.scalar_outputs[c],
                                                self.dtype, self.device, strategy="loop", state=self.state)
            grads = self._truths[key].sample_gradients(sample)
            got_row = block[row, c] if self.multi else block[row]
            for piece in featured:
                grad = grads[piece.name]
                span = piece.span(grad.numel() if grad is not None else -1)
                got = got_row[span] if span is not None else got_row[piece.columns.to(block.device)]
                add(piece.name, got, None if grad is None else grad.reshape(-1) if span is not None
                    else grad.reshape(-1)[piece.local.to(grad.device)])
            for name, (x, g) in factors.items():
                piece, grad, choice = structured[name], grads[name], self.plan.choices[name]
                # Every row's factors, or (a projection's) the checked row's alone.
                at = row if x.shape[0] > 1 else 0
                g_row = g[at:at + 1, c:c + 1] if self.multi else g[at:at + 1]
                if choice.index:  # token ids into the table's rows
                    rows_of_table = self.index.layout.shapes[self.index.layout.names.index(name)][0]
                    got = index_gradients(x[at:at + 1], g_row, rows_of_table).reshape(-1)
                else:
                    got = per_sample_gradients(x[at:at + 1], g_row, choice.axis).reshape(-1)
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
                    add(choice.bias, bias_got, None if bias_grad is None else bias_grad.reshape(-1))
                    add(name, got, None if grad is None else grad.reshape(weight_shape))
                    continue
                # rebuilt over the sampled entries in ascending order (factors.py)
                entries = None if piece.whole else torch.sort(piece.local).values.to(self.device)
                add(name, got.to(self.dtype), None if grad is None else grad.reshape(-1) if entries is None
                    else grad.reshape(-1)[entries])
        return {name: tuple(torch.stack(pairs).square().sum(0).sqrt().tolist()) for name, pairs in norms.items()}

    def _generic_is_the_loop(self) -> bool:
        return bool(self.generics) and self.generics[0].strategy == "loop"

    def _spared(self, batch: ModelInputs) -> bool:
        spared = self.spare and (batch.size, batch.signature()) in self.passed
        self.spared += spared
        return spared

    def _needs_check(self) -> bool:
        return self.checking and (self.batched is not None or (bool(self.generics) and not self._generic_is_the_loop()))

    def _failing(self, errors: Dict[str, tuple], tolerance: float, rounding=None) -> Dict[str, float]:
        """{tensor: relative error} of the tensors that differ by more than ``tolerance`` of
        their own norm (or ``_ROUNDING_MARGIN`` times the rounding an fp64 recheck found for
        the tensor, ``rounding``, where that is larger). A tensor whose norm is rounding-sized
        next to the whole gradient's (under tolerance x 1e-3 of it) is judged against that
        floor instead: its relative error is noise, its share of K nil."""
        rounding = rounding or {}
        whole = sum(reference ** 2 for _, reference in errors.values()) ** 0.5
        floor = tolerance * 1e-3 * whole
        return {name: difference / max(reference, torch.finfo(torch.float64).tiny)
                for name, (difference, reference) in errors.items()
                if difference > max(tolerance, _ROUNDING_MARGIN * rounding.get(name, 0.0)) * reference + floor}

    def _fp64_failing(self, batch: ModelInputs, row: int, suspects) -> Dict[str, float]:
        """The check of the same batch and sample again in float64, for the suspects: fp32
        roundings differ between a batch and a sample alone (other convolution algorithms),
        and a ReLU input within an ulp of 0 flips (a random DenseNet-121 failed on that
        alone). Whether the batched pass is wrong is asked in fp64, on the whole batch (a
        wrong sample dimension can depend on the batch's size)."""
        exact = FeatureExtractor(self.model, self.index, self.output, torch.float64, self.device, self.backend,
                                 structured="never")
        exact.generic_why, exact.k, exact._generic_strategy = dict(self.generic_why), self.k, self._generic_strategy
        exact._set_plan(Plan())
        exact.checking = False
        wide = batch.to(self.device, torch.float64)
        block = exact._features(wide)[0]
        errors = exact._tensor_errors(wide, block, {}, row)
        failing = exact._failing(errors, _VERIFY_TOLERANCE[torch.float64])
        return {name: error for name, error in failing.items() if name in suspects}

    def _verify(self, batch: ModelInputs, block: torch.Tensor, factors) -> bool:
        """Check this batch's per-sample gradients, tensor by tensor, on one of its
        samples (a different one each batch) against that sample evaluated alone.

        The batched pass is exact only if samples do not interact and every rule finds
        the samples' dimension of what it reads; a model that mixes samples (batch
        statistics, batch-level control flow), on this batch or from a later one on, or a
        rule wrong for this batch's shapes, is caught here tensor by tensor, and the
        tensors that differ take the generic path (which evaluates every sample alone),
        from this batch on. Returns False when the batch must be computed again.
        """
        row = self._checked_row(batch.size)
        self.checked_batches += 1
        errors = self._tensor_errors(batch, block, factors, row)
        failing = self._failing(errors, self.tolerance, self._rounding)
        if failing and self.dtype != torch.float64:
            try:
                confirmed = self._fp64_failing(batch, row, failing)
            except (RuntimeError, MemoryError) as failure:  # e.g. no room for a float64 copy of a large model
                _log.debug("float64 recheck not possible (%s): the %s check decides", failure, self.dtype)
            else:
                # What fp64 clears was this precision's rounding: allowed from now on (with a
                # margin), so that a deep network under TF32 does not pay an fp64 pass per batch.
                for name, error in failing.items():
                    if name not in confirmed:
                        self._rounding[name] = max(self._rounding.get(name, 0.0), error)
                failing = confirmed
        if not failing:
            self.passed.add((batch.size, batch.signature()))
            return True
        self.passed.clear()  # a failure: every batch is checked again until checks pass
        self.failures += 1
        generic = {name: error for name, error in failing.items() if name in self.generic_why}
        if generic:
            listed = ", ".join(f"{name} ({error:.1e})" for name, error in sorted(generic.items())[:6])
            warnings.warn(
                f"torch.func.vmap's per-sample gradients (a batch of one per sample) differ from the sample evaluated "
                f"alone as two copies of itself on batch {self.checked_batches - 1} for {len(generic)} tensor(s): "
                f"{listed}. The model depends on the batch's size (e.g. sums over the batch), or torch computes "
                "one-sample batches differently; the generic path evaluates samples one by one, as two copies, from "
                "this batch on",
                RuntimeWarning,
                stacklevel=6,
            )
            self._generic_strategy = "loop"
            self._build()
            return False
        worst = sorted(failing, key=failing.get, reverse=True)
        listed = ", ".join(f"{name} ({failing[name]:.1e})" for name in worst[:6])
        more = f", and {len(worst) - 6} more" if len(worst) > 6 else ""
        warnings.warn(
            f"per-sample gradients from the batched pass differ from the sample evaluated alone on batch "
            f"{self.checked_batches - 1} (sample {row}) for {len(failing)} tensor(s), relative to each tensor's own "
            f"norm: {listed}{more}. The model seems to mix samples within a batch (e.g. statistics over the "
            "batch), or a rule misread the samples' dimension"
            + ("; or, as this batch holds one sample, torch computed it with its one-sample kernels, which have "
               "differed (torch 2.14's CPU BatchNorm backward)" if batch.size == 1 else "")
            + "; these tensors "
            "take the generic per-sample path (exact, slower) from this batch on",
            RuntimeWarning,
            stacklevel=6,
        )
        lost = set(failing) & set(self.structured_names)
        lost |= {name for name in self.structured_names if self.plan.choices[name].bias in failing}
        if lost:  # the generic path gives features: back to features first (PlanCommitted leaves all as it was)
            self._drop_structured(lost, "the per-batch check failed")
        self.generic_why.update({name: f"{_MIXES_SAMPLES} on batch {self.checked_batches - 1}" for name in failing})
        self._warned = True  # this warning says it already
        self._generic_strategy = "loop"
        self._build()
        return False
