"""The feature phase: batches in, per-sample gradient features (and the structured
tensors' factors) out, into stores, checkpointed as they finish.

``gram`` and ``features`` (engine), ``tk.coverage``, ``tk.Kernel`` and the distributed
driver all take their features here: one extractor per call (``new_extractor``, or the one
``tk.Kernel`` keeps: ``reused_extractors``), the out-of-memory backoff
(``features_with_backoff``), the finiteness check, the batches' signatures, and the
checkpoint records (``fill_store``). docs/engine.md has the why of each choice.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import torch

from .checkpoint import CheckpointMismatch, batch_fingerprint

from .data import ModelInputs, batch_count, iterate_inputs, loader_length
from .persample import FeatureExtractor
from .precisions import Precision, to_store
from .outputs import PER_SAMPLE_ROWS
from .progress import progress_bar
if TYPE_CHECKING:  # the request is made (request.py) before the feature phase; only its fields are read here
    from .request import Request
from .sketch import KeptRows, Projection, kept_rows_budget
from .store import FeatureStore
from .structured.stores import FactorStores, record_plan, recorded_plan

__all__ = ["PER_SAMPLE_ROWS", "check_finite", "check_signature", "describe", "feature_blocks", "features_with_backoff",
           "fill_store", "keep_rows", "kept_features", "new_extractor", "open_stores", "reused_extractors", "sketched", "spares"]

_log = logging.getLogger("tangent_kernels")


def feature_blocks(request: Request, loader: Iterable, name: str,
                   projection: Optional[Projection] = None) -> Iterator[torch.Tensor]:
    """Yield F [B, p] per batch, in the compute dtype; F[:, j] = d s / d theta[idx[j]]; with
    a ``projection``, F R [B, dim] (sketch.py). On CUDA out-of-memory a batch is computed
    in halves (``features_with_backoff``), as for the Gram."""
    per_sample = new_extractor(request.model, request.index, request.output, request.precision, request.device,
                               request.backend, "never" if projection is None else projection.structured, projection)
    bar = progress_bar(loader_length(loader), f"eNTK features ({name})", request.progress)
    kept = keep_rows(request, projection, loader)
    seen = 0
    try:
        for batch in iterate_inputs(loader, request.inputs, name):
            block, _ = features_with_backoff(per_sample, batch.to(request.device, request.precision.compute))
            check_finite(block, seen, name)
            if projection is not None:
                block = sketched(projection, per_sample, block, seen, name, kept)
            seen += batch.size
            if bar is not None:
                bar.update(batch.size)
            yield block
    finally:
        if bar is not None:
            bar.close()


def sketched(projection: Projection, per_sample: FeatureExtractor, block: torch.Tensor, seen: int,
             name: str, kept: Optional[KeptRows] = None) -> torch.Tensor:
    """A batch's sketch [B, dim] (or [B, k, dim]): its features' block projected (with the
    slices of R the call keeps, ``kept``), plus (the Kronecker kind) its structured
    tensors' sketch, formed in the extractor's pass from their factors (checked here: a
    non-finite factor leaves its sample's sketch non-finite)."""
    out = projection.project(block, per_sample.feature_index, kept)
    if per_sample.structured_names:
        check_finite(per_sample.factor_sketch, seen, name)
        out.add_(per_sample.factor_sketch)
    return out


def keep_rows(request: Request, projection: Optional[Projection], *loaders) -> Optional[KeptRows]:
    """The slices of R one call keeps across its batches (sketch.KeptRows), for the
    ``loaders`` it projects: None without a projection; made per call, so dropped with it."""
    if projection is None:
        return None
    counts = [batch_count(loader) for loader in loaders]
    batches = None if None in counts else sum(counts)
    return KeptRows(kept_rows_budget(request.budget, batches))


# tk.Kernel (kernel.py) keeps its extractors across calls: around its calls this holds its
# {structured mode: extractor}, reused when made for the same idx, output and dtype.
reused_extractors: ContextVar[Optional[dict]] = ContextVar("reused_extractors", default=None)


# tk.Kernel keeps the features of the loaders it evaluated last: around its gram calls this
# holds its kept.KeptFeatures, which fill_store asks before computing a loader and offers
# what it computed.
kept_features: ContextVar[Optional[Any]] = ContextVar("kept_features", default=None)


def _plan_key(per_sample: FeatureExtractor):
    """What a kept side's stores are laid out by: the feature columns and the structured tensors."""
    if per_sample.plan is None:
        return None
    return tuple(per_sample.plan.without_features), len(per_sample.feature_index), per_sample.k


def spares(rotation: Optional[int], b: int, batches: Optional[int]) -> bool:
    """Whether batch ``b`` of a loader of ``batches`` may go unchecked where its shapes
    passed the check before (FeatureExtractor.spare): tk.Kernel's calls after the first
    (``rotation``: the call's number) check one batch per loader, a different one each
    call (docs/trust.md, "Repeated calls"); one-shot calls (rotation None) check all."""
    return rotation is not None and batches is not None and b != rotation % batches


def new_extractor(model, index, output, precision: Precision, device, backend: str,
                   structured: str = "never", projection: Optional[Projection] = None) -> FeatureExtractor:
    """projection: one whose kind sketches the factors in the pass (the Kronecker kind)."""
    reused = reused_extractors.get()
    kept = reused.get(structured) if reused is not None else None
    if kept is not None and kept.index is index and kept.output == output and kept.dtype == precision.compute:
        kept.projection = projection if structured == "products" else None
        return kept
    made = FeatureExtractor(model, index, output, precision.compute, device, backend,
                          tf32_check=precision.allow_tf32 and torch.device(device).type == "cuda",
                          structured=structured)
    made.projection = projection if structured == "products" else None
    if reused is not None:
        reused[structured] = made
    return made


def check_finite(block: torch.Tensor, first_position: int, name: str) -> None:
    # One reduction pass first: a row with an inf or nan sums to inf or nan. isfinite on
    # the whole block is four elementwise passes (6% of a CPU gram of resnet18), and is
    # needed only when a sum is not finite (then it tells overflow of finite values apart).
    block = block.reshape(block.shape[0], -1)  # [B, k, p] (every logit): a sample's row is all of them
    if bool(torch.isfinite(block.sum(dim=1)).all()):
        return
    finite = torch.isfinite(block).all(dim=1)
    if bool(finite.all()):
        return
    row = int(torch.nonzero(~finite)[0])
    raise ValueError(
        f"non-finite gradient (inf or nan) for the sample at position {first_position + row} of "
        f"{name} (0-based, in iteration order): check that sample's input and the model's "
        "numerics at it (e.g. log of zero, overflow); try precision='fp64'"
    )




def describe(signature) -> str:
    """A batch signature (data.ModelInputs.signature) as 'arg 0: 3x32x32 float32, ...'."""
    def one(s):
        if s[0] != "tensor":
            return s[0]
        return f"{'x'.join(map(str, s[2])) or 'scalar'} {str(s[1]).replace('torch.', '')}"

    args, kwargs = signature
    return "(" + ", ".join([f"arg {i}: {one(s)}" for i, s in enumerate(args)] + [f"{k}: {one(s)}" for k, s in kwargs]) + ")"


def check_signature(first, cross, signature, name: str, b: int) -> None:
    """Batch b of loader ``name`` against its own first batch, and (for loader2) against
    the first loader's: per-sample shapes and dtypes must agree."""
    if first is not None and signature != first:
        raise ValueError(
            f"batch {b} of {name} differs from its batch 0 in per-sample shape or dtype: batch 0 gives "
            f"{describe(first)}, batch {b} gives {describe(signature)}. Every batch must hold the same kind of "
            "input; if you passed (X, y) or [X, y] as the loader, note that the loader is iterated over batches: "
            "pass [X], [(X, y)] or a DataLoader"
        )
    if cross is not None and signature != cross:
        raise ValueError(
            f"{name} (the second loader of a cross kernel K(X1, X2)) holds inputs of another per-sample shape or "
            f"dtype than loader: loader gives {describe(cross)}, {name} gives {describe(signature)}"
        )


def fill_store(request: Request, loader, name, *, cache_dir, ckpt, events, extractor, expected_signature=None,
               projection=None, kept_rows: Optional[KeptRows] = None):
    """Features of every sample of ``loader`` into a FeatureStore (read back from the
    checkpoint where it has them); returns (store, first batch's signature). The store's
    ``structured`` holds the structured tensors' factors (FactorStores), or None; both
    are sized once the extractor's plan is known, on the first batch. With a
    ``projection`` (sketch.py; the extractor must then be made with its
    ``structured`` mode) each batch's block (and factors) is projected as it forms: the
    store holds [B, dim], and no factors; ``kept_rows``: the call's slices of R kept
    across batches (``keep_rows``; None: each batch generates R)."""
    index, output, precision, device = request.index, request.output, request.precision, request.device
    inputs, kind, budget = request.inputs, request.store, request.budget
    columns = None if projection is None else projection.dim
    total = loader_length(loader)
    recorded = ckpt.recorded_batches(name) if ckpt is not None else []
    forced = recorded_plan(ckpt)
    feature_store, factors = None, None
    kept = kept_features.get() if ckpt is None and projection is None else None
    if kept is not None:
        per_sample = extractor()
        hit = kept.lookup(loader, inputs, expected_signature, _plan_key(per_sample))
        if hit is not None:
            # The other loader's features must be laid out by the same plan: it may no longer change.
            per_sample.commit()
            return hit
    fingerprints = [] if kept is not None else None
    batches_ahead = batch_count(loader)

    def open_for(per_sample: FeatureExtractor):
        nonlocal feature_store, factors
        per_sample.commit()
        feature_store, factors = open_stores(per_sample, name, precision, device, kind, budget, cache_dir,
                                              None if output == "full" else total, output in PER_SAMPLE_ROWS,
                                              columns)
        if ckpt is not None:
            record_plan(ckpt, per_sample.plan.without_features)
            ckpt.open_features(name, feature_store.row_bytes)
            if factors is not None:
                factors.open(ckpt, len(recorded))

    per_sample, own = None, None
    # output="full" stores k rows per sample (k read from the model); every other output one.
    multi, rows_per_sample, stored_rows = output == "full", None, 0
    seen, batches = 0, 0
    try:
        for b, batch in enumerate(iterate_inputs(loader, inputs, name)):
            batches = b + 1
            check_signature(own, expected_signature if b == 0 else None, batch.signature(), name, b)
            own = batch.signature() if own is None else own
            fingerprint = batch_fingerprint(batch) if ckpt is not None or kept is not None else None
            if fingerprints is not None:
                fingerprints.append((batch.size, fingerprint))
            if feature_store is None:
                per_sample = extractor() if per_sample is None else per_sample
                per_sample.plan_for(batch.to(device, precision.compute), forced)
                if b < len(recorded):
                    open_for(per_sample)
            if b < len(recorded):
                rows, recorded_fingerprint = recorded[b]
                # output="full" stores k rows per sample.
                if multi and rows % batch.size == 0 and rows_per_sample in (None, rows // batch.size):
                    rows_per_sample = rows // batch.size
                elif multi or rows != batch.size:
                    raise CheckpointMismatch(
                        f"{name} batch {b} has {batch.size} samples, the one checkpointed in {ckpt.folder} had "
                        f"{rows}: the batches must be cut the same way on resume (the same batch size: "
                        "DataLoader(batch_size=...), --batch-size), or delete the checkpoint folder to start over"
                    )
                if fingerprint != recorded_fingerprint:
                    raise CheckpointMismatch(
                        f"{name} batch {b} holds other values than the one checkpointed in {ckpt.folder}: the "
                        "loader must yield the same data in the same order on resume (shuffle=False, the same "
                        "dataset and transforms), or delete the checkpoint folder to start over"
                    )
                stored, scales = ckpt.read_features(name, b, stored_rows, stored_rows + rows, feature_store.p,
                                                    precision.store, precision.scaled)
                feature_store.append(stored.to(device), scales)
                if factors is not None:
                    factors.restore(ckpt, b, batch.size)
                stored_rows += rows
            else:
                if ckpt is not None and ckpt.loader_complete(name):
                    raise CheckpointMismatch(
                        f"{name} yields more batches than the {len(recorded)} checkpointed in {ckpt.folder}: "
                        "the data changed; delete the checkpoint folder to start over"
                    )
                if per_sample is None:
                    per_sample = extractor()
                per_sample.spare = spares(per_sample.rotation, b, batches_ahead)
                try:
                    block, batch_factors = features_with_backoff(per_sample, batch.to(device, precision.compute))
                    computed = block
                finally:
                    per_sample.spare = False
                if feature_store is None:
                    open_for(per_sample)
                check_finite(block, seen, name)
                if projection is not None:
                    block = sketched(projection, per_sample, block, seen, name, kept_rows)
                if factors is not None:  # recorded before the features, whose record commits the batch
                    factors.append(batch_factors, lambda rows: to_store(rows, precision, scale_rows=True),
                                   check_finite, seen, ckpt, fingerprint)
                if output in PER_SAMPLE_ROWS:  # [B, k, p] -> [B, k * p] (a view; -1 fails for p = 0)
                    block = block.reshape(block.shape[0], block.shape[1] * block.shape[2])
                stored, scales = to_store(block, precision, scale_rows=True)
                feature_store.append(stored, scales)
                stored_rows += stored.shape[0]
                if ckpt is not None:
                    ckpt.record_batch(name, stored, scales, fingerprint)
                if projection is None:  # copied into the store: the extractor may fill it again
                    per_sample.give_back(computed)
                del block, stored
            seen += batch.size
            events("features", name, seen, total, resumed=b < len(recorded))
        if feature_store is None:  # an empty loader
            feature_store = FeatureStore(len(index) if columns is None else columns, precision.store, device, kind=kind, max_memory=budget,
                                         cache_dir=cache_dir, scaled=precision.scaled, name=name)
            feature_store.outputs = 1
        if ckpt is not None:
            if batches < len(recorded):
                raise CheckpointMismatch(
                    f"{name} yields {batches} batches but {len(recorded)} were checkpointed in {ckpt.folder}: "
                    "the data changed; delete the checkpoint folder to start over"
                )
            if not ckpt.loader_complete(name):
                ckpt.complete_loader(name)
        feature_store.samples = seen
        feature_store.structured = factors
        if kept is not None and per_sample is not None:
            kept.offer(loader, fingerprints, own, feature_store, _plan_key(per_sample))
    except BaseException:
        for opened in (feature_store, factors):
            if opened is not None:
                opened.close()
        raise
    return feature_store, own


def open_stores(per_sample: FeatureExtractor, name: str, precision: Precision, device, kind: str, budget: int,
                 cache_dir, expected_rows: Optional[int], per_sample_rows: bool = False,
                 columns: Optional[int] = None):
    """(FeatureStore of the plan's feature columns, FactorStores or None): the budget
    shared in proportion to the bytes each holds per sample. per_sample_rows: a row holds
    a sample's k logits side by side (PER_SAMPLE_ROWS); else a row per (sample, logit).
    The store's ``outputs`` is k (1 for one scalar output). columns: the feature columns
    per output when not the plan's (a projection's dim)."""
    outputs = per_sample.k if per_sample.multi else 1
    p = len(per_sample.feature_index) if columns is None else columns
    # A projection's columns hold the structured tensors' sketch too: no factor stores.
    choices = [per_sample.plan.choices[n] for n in per_sample.structured_names] if columns is None else []
    feature_bytes = p * outputs * torch.empty((), dtype=precision.store).element_size()
    factor_bytes = FactorStores.row_bytes_of(choices, outputs, precision.store)
    share = feature_bytes / max(feature_bytes + factor_bytes, 1)
    feature_store = FeatureStore(p * outputs if per_sample_rows else p, precision.store, device, kind=kind,
                                 max_memory=max(1, int(budget * share)), cache_dir=cache_dir,
                                 scaled=precision.scaled, expected_rows=expected_rows, name=name)
    feature_store.outputs = outputs
    factors = None
    if choices:
        factors = FactorStores(choices, outputs, precision.store, device, kind=kind,
                               budget=max(1, int(budget * (1 - share))), cache_dir=cache_dir,
                               scaled=precision.scaled, expected_rows=expected_rows, name=name)
    return feature_store, factors


def features_with_backoff(per_sample: FeatureExtractor, batch: ModelInputs):
    """(features, structured factors) of a batch (FeatureExtractor.extract); on CUDA
    out-of-memory, of its halves (recursively): each sample's features are its own, so
    the halves' rows are exactly the whole batch's."""
    try:
        return per_sample.extract(batch)
    except torch.OutOfMemoryError:
        if batch.size == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = batch.size // 2
        _log.info("out of memory on a batch of %d samples: retrying in halves", batch.size)
        a, fa = features_with_backoff(per_sample, batch.slice(0, half))
        sketch_a = per_sample.factor_sketch
        b, fb = features_with_backoff(per_sample, batch.slice(half, batch.size))
        if sketch_a is not None:  # a Kronecker projection's sketch of the factors, per half
            per_sample.factor_sketch = torch.cat([sketch_a, per_sample.factor_sketch])
        return torch.cat([a, b]), {n: (torch.cat([fa[n][0], fb[n][0]]), torch.cat([fa[n][1], fb[n][1]])) for n in fa}
