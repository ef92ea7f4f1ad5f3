"""The eNTK engine: orders the work, loader -> features -> store -> tiles of K.

Features come from ``persample`` (one batched forward/backward with every use of a
sampled parameter intercepted; ``torch.func`` for the tensors no rule covers), batch by
batch into stores (``store``, the structured tensors' factors in ``structured``),
checkpointed as they finish; the Gram phase is ``tiles``. docs/engine.md has the why of
each choice.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from ._model import check_device, eval_mode, fp32_math, model_device
from .checkpoint import Checkpoint, CheckpointMismatch, batch_fingerprint, model_fingerprint, tensor_fingerprint
from .data import ModelInputs, iterate_inputs, loader_length
from .outputs import OutputProbes, OutputSpec, check_output_spec, is_multi, probed
from .params import ParamIndex, resolve_idx
from .store import FeatureStore, check_max_memory, check_store
from .persample import FeatureExtractor, resolve_backend
from .structured import check_structured
from .structured.stores import FactorStores, record_plan, recorded_plan
from . import tiles
from .precisions import PRECISIONS, Precision, _check_precision, _to_store
from .progress import ProgressEvent, Events, check_progress, progress_bar

__all__ = ["features", "gram", "PRECISIONS", "ProgressEvent"]

_log = logging.getLogger("tangent_kernels")


def _feature_blocks(
    model: nn.Module,
    loader: Iterable,
    index: ParamIndex,
    output: OutputSpec,
    precision: Precision,
    device: torch.device,
    inputs: Optional[Callable[[Any], Any]],
    progress: Union[bool, str],
    name: str,
    backend: str,
) -> Iterator[torch.Tensor]:
    """Yield F [B, p] per batch, in the compute dtype; F[:, j] = d s / d theta[idx[j]]."""
    per_sample = _new_extractor(model, index, output, precision, device, backend)
    bar = progress_bar(loader_length(loader), f"eNTK features ({name})", progress)
    seen = 0
    try:
        for batch in iterate_inputs(loader, inputs, name):
            block = per_sample(batch.to(device, precision.compute))
            _check_finite(block, seen, name)
            seen += batch.size
            if bar is not None:
                bar.update(batch.size)
            yield block
    finally:
        if bar is not None:
            bar.close()


# tk.Kernel (kernel.py) keeps its extractors across calls: around its calls this holds its
# {structured mode: extractor}, reused when made for the same idx, output and dtype.
reused_extractors: ContextVar[Optional[dict]] = ContextVar("reused_extractors", default=None)


def _new_extractor(model, index, output, precision: Precision, device, backend: str,
                   structured: str = "never") -> FeatureExtractor:
    reused = reused_extractors.get()
    kept = reused.get(structured) if reused is not None else None
    if kept is not None and kept.index is index and kept.output == output and kept.dtype == precision.compute:
        return kept
    made = FeatureExtractor(model, index, output, precision.compute, device, backend,
                          verify_in_ieee=precision.allow_tf32 and torch.device(device).type == "cuda",
                          structured=structured)
    if reused is not None:
        reused[structured] = made
    return made


def _check_finite(block: torch.Tensor, first_position: int, name: str) -> None:
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


def _check_model(model) -> None:
    """What no per-sample eNTK can be computed of, said before any work."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"model is a TorchScript module ({type(model).__name__}): its parameters cannot be swapped for the "
            "per-sample computation. Pass the nn.Module it was made from (before torch.jit.script/trace)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(
            f"the model has tensors on the meta device (no values), e.g. {meta[0]!r}: materialize and load its "
            "weights first (model.to_empty(device='cpu') then load_state_dict)"
        )
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.running_mean is None
                                                                    or module.running_var is None):
            raise ValueError(
                f"{type(module).__name__} {name or '(the model)'!r} has no running statistics "
                "(track_running_stats=False): even in eval mode it normalizes with the statistics of the batch, "
                "so one sample's output depends on the others and its per-sample eNTK is not defined. Use "
                "track_running_stats=True (with running statistics from training), or GroupNorm/LayerNorm"
            )
    from ._model import check_parameter_aliases  # a view of a parameter kept in a plain attribute
    check_parameter_aliases(model)


def _check_inputs_callable(inputs) -> None:
    if inputs is not None and not callable(inputs):
        raise TypeError(f"inputs must be a callable batch -> model input (tensor, tuple of arguments or dict), "
                        f"or None; got {type(inputs).__name__}")


def _prepare(model, idx, output, precision, device, backend):
    if isinstance(output, OutputProbes):  # gram and features evaluate them before they get here
        raise ValueError("output=OutputProbes is taken by tk.gram and tk.features (and the reference) only; for "
                         "the paths its probe outputs take, use output='full' (they take the same ones)")
    _check_model(model)
    index = resolve_idx(model, idx)
    output = check_output_spec(output)
    precision = _check_precision(precision)
    device = model_device(model) if device is None else check_device(device)
    return index, output, precision, device, resolve_backend(backend, device)


def features(
    model: nn.Module,
    loader: Iterable,
    idx=None,
    *,
    output: OutputSpec = "first",
    precision: str = "fp32",
    device=None,
    progress: Union[bool, str] = True,
    inputs: Optional[Callable[[Any], Any]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """eNTK features: per-sample gradients of the scalar output at ``idx``, [n, p].

    Args:
        model: any ``nn.Module``; evaluated in eval mode, left exactly as it was.
        loader: an iterable of batches (tensor; tuple/list with the input first; dict of
            keyword arguments, ``labels`` dropped), e.g. a DataLoader, or one tensor.
        idx: None (all trainable parameters), a :class:`ParamIndex`, or a 1-D integer
            tensor/array of global flat positions. Column j belongs to ``idx[j]``.
        output: "first", "sum" (pNTK), an int logit index, or a callable [B] reducer.
        precision: "fp32" (default), "fp64", "tf32", "bf16" or "fp16". Gradients are
            computed in fp32 (fp64 for "fp64"; "tf32" lets CUDA matmuls and convolutions
            use TF32); the result has the mode's dtype (bfloat16/float16 for the 16-bit
            modes). docs/precision.md has each mode's measured error.
        device: where to compute (default: the model's device); the model is not moved.
        progress: True (default) or None: a tqdm bar (samples, rate, ETA, phase) when
            stderr is a terminal, nothing in logs, CI or notebooks; "always": the bar even
            when stderr is not a terminal; False: no bar.
        inputs: optional callable batch -> model input (tensor, tuple of args, dict).
        backend: sampled-gradient kernels for tapped layers: "auto" (CPU: the C++ kernels
            when the extension is built, else plain torch; CUDA: Triton when available,
            else the CUDA kernels, else plain torch; the GPU choice is not yet measured),
            "torch", "cpp" (CPU), "cuda" (CUDA) or "triton" (CUDA, or CPU under
            TRITON_INTERPRET=1). See docs/kernels.md.
    """
    if isinstance(output, OutputProbes):  # the probe outputs' gradients [n, m, p]
        _check_model(model)
        with probed(model, output):
            return features(model, loader, idx, output="full", precision=precision, device=device,
                            progress=progress, inputs=inputs, backend=backend)
    index, output, precision, device, backend = _prepare(model, idx, output, precision, device, backend)
    progress = check_progress(progress)
    _check_inputs_callable(inputs)
    with eval_mode(model), fp32_math(precision.allow_tf32):
        blocks = _feature_blocks(model, loader, index, output, precision, device, inputs, progress, "loader", backend)
        # Each block is rounded to the store dtype as it arrives: no full-size copy in
        # the compute dtype. When the loader tells its size, blocks go straight into the
        # result (a concatenation at the end doubled the memory and, for p in the
        # millions, took longer than the features).
        total = loader_length(loader)
        if total is None:
            return torch.cat([_to_store(block, precision, scale_rows=False)[0] for block in blocks])
        result, seen = None, 0
        for block in blocks:
            stored = _to_store(block, precision, scale_rows=False)[0]
            if result is None:  # [n, p], or [n, k, p] for every logit
                result = torch.empty((total, *stored.shape[1:]), dtype=precision.store, device=device)
            if seen + stored.shape[0] > total:
                raise ValueError(f"the loader yields more than the {total} samples it announced")
            result[seen:seen + stored.shape[0]] = stored
            seen += stored.shape[0]
        if seen != total:
            raise ValueError(f"the loader yields {seen} samples but announced {total}")
        return result


def gram(
    model: nn.Module,
    loader: Iterable,
    idx=None,
    loader2: Optional[Iterable] = None,
    *,
    output: OutputSpec = "first",
    precision: str = "fp32",
    device=None,
    progress: Union[bool, str] = True,
    inputs: Optional[Callable[[Any], Any]] = None,
    backend: str = "auto",
    out: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[ProgressEvent], Any]] = None,
    checkpoint=None,
    store: str = "auto",
    max_memory: Optional[int] = None,
    cache_dir=None,
    checkpoint_key: Optional[str] = None,
    group=None,
    shard: bool = False,
    gather: str = "all",
    structured: str = "auto",
) -> torch.Tensor:
    """The eNTK Gram K[i, j] = <g(x_i), g(x_j)> over a loader, [n1, n2].

    ``loader2=None`` gives the symmetric K(X, X) (only the lower triangle is
    computed, then mirrored: K is exactly symmetric); otherwise the cross kernel
    K(X1, X2). K is float32 (float64 when ``precision="fp64"``) on ``device``: the
    16-bit modes round the features and accumulate their products in fp32 (fp16 with a
    power-of-two scale per sample, so no gradient overflows or underflows).

    Beyond the arguments of :func:`features`:
        out: a preallocated [n1, n2] tensor of K's dtype (e.g. pinned host memory for a
            K larger than the device; any strides, but not an expanded view); filled
            and returned. Its dtype and memory are checked before any work starts.
        callback: called with a :class:`ProgressEvent` after every loader batch and every
            finished row block of K. An exception it raises stops the run; with
            ``checkpoint`` nothing finished is lost.
        checkpoint: a folder. Finished feature batches and rows of K are persisted
            there (atomically) as they complete; calling again with the same arguments
            resumes where the last call stopped and returns a bit-identical K. A
            folder made by a different computation (weights, idx, output, precision,
            data) is refused with an error saying what differs.
        store: where features wait for the Gram phase: "auto" (the device while they
            fit in ``max_memory``, then host memory, then a file), "device", "host",
            "disk".
        max_memory: bytes of features allowed on the device (default: half its free
            memory; half the available memory for a CPU device).
        cache_dir: folder for the "disk" store's file (default: the system's temp dir).
        checkpoint_key: a name for the run, recorded in the checkpoint and required to
            match on resume; needed to resume with an ``output`` callable whose code
            cannot be fingerprinted (a builtin, a callable object holding arbitrary state).
        structured: "auto" (default): fully sampled linear weights contribute to K from
            their inputs and output gradients, without features, where the cost model
            (measured rates) says it is cheaper (docs/structured.md); "never": features
            for every tensor; "always": the structured Gram wherever it is exact.
            ``tk.coverage`` shows the choice per tensor; a resumed checkpoint keeps the
            choice it was made with. (The distributed path takes features for now.)
        group, shard, gather: under torch.distributed (a process group with several ranks
            initialized, or ``group=``) the work is split over the ranks and every rank
            must call ``gram``; ``group=False`` keeps it in this process. ``shard=True``:
            each rank passes its own samples; ``gather``: "all", "rank0" or "rows" (a
            ``tk.distributed.KShard``). See :func:`tangent_kernels.distributed.driver.gram`.
    """
    from .distributed import active_group  # the distributed path, when a process group asks for it

    if loader2 is loader:
        # One loader twice is K(X, X): one pass (a shuffling or streaming loader would give
        # the two sides in two orders), the lower triangle only, mirrored.
        loader2 = None
    if isinstance(output, OutputProbes):
        return _probe_gram(model, loader, idx, loader2, output, precision=precision, device=device,
                           progress=progress, inputs=inputs, backend=backend, out=out, callback=callback,
                           checkpoint=checkpoint, store=store, max_memory=max_memory, cache_dir=cache_dir,
                           checkpoint_key=checkpoint_key, group=group, shard=shard, gather=gather,
                           structured=structured)

    if (split := active_group(group, shard, gather)) is not False:
        from .distributed.driver import gram as distributed_gram

        return distributed_gram(model, loader, idx, loader2, group=split, shard=shard, gather=gather, output=output,
                                precision=precision, device=device, progress=progress, inputs=inputs, backend=backend,
                                out=out, callback=callback, checkpoint=checkpoint, store=store, max_memory=max_memory,
                                cache_dir=cache_dir, checkpoint_key=checkpoint_key, structured=structured)
    index, output, precision, device, backend = _prepare(model, idx, output, precision, device, backend)
    _check_inputs_callable(inputs)
    structured = check_structured(structured)
    if checkpoint_key is not None and not isinstance(checkpoint_key, str):
        raise TypeError(f"checkpoint_key must be a str naming the run, got {type(checkpoint_key).__name__}")
    store = check_store(store)
    progress = check_progress(progress)
    budget = check_max_memory(max_memory, device)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it receives a ProgressEvent); got {type(callback).__name__}")
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor [n1, n2] of dtype {precision.k}; got {type(out).__name__}")
    if out is not None and is_multi(output):
        raise ValueError(f"out= holds a [n1, n2] K; output={output!r} returns K with an output axis: leave out=None")
    if out is not None:
        tiles._check_out_memory(out, precision.k)
    events = Events(callback, progress)
    with eval_mode(model), fp32_math(precision.allow_tf32):
        ckpt = None
        if checkpoint is not None:
            # What cannot be fingerprinted (identity["undecidable"]) makes Checkpoint ask for checkpoint_key.
            identity, _ = _identity(model, index, output, precision, backend, loader2 is not None, checkpoint_key)
            ckpt = Checkpoint(checkpoint, identity)
        stores = []
        try:
            made = []

            def extractor() -> FeatureExtractor:
                # One for both loaders: the first batch's decisions (paths, check) hold for both.
                if not made:
                    made.append(_new_extractor(model, index, output, precision, device, backend, structured))
                return made[0]

            fill = dict(index=index, output=output, precision=precision, device=device, inputs=inputs,
                        backend=backend, kind=store, budget=budget, cache_dir=cache_dir, ckpt=ckpt, events=events,
                        extractor=extractor)
            first, signature = _fill_store(model, loader, "loader", **fill)
            stores.append(first)
            second = first
            if loader2 is not None:
                second, _ = _fill_store(model, loader2, "loader2", expected_signature=signature, **fill)
                stores.append(second)
            form = output if output in _PER_SAMPLE_ROWS else "rows"
            k = tiles._blocked_gram(first, second, loader2 is None, precision.k, device, out, ckpt, events, budget,
                                    terms=(first.structured, second.structured) if first.structured else None,
                                    form=form, outputs=first.outputs)
            return _output_axes(k, first.samples, second.samples) if output == "full" else k
        finally:
            events.close()
            for feature_store in stores:
                feature_store.close()
                if getattr(feature_store, "structured", None) is not None:
                    feature_store.structured.close()
            if ckpt is not None:
                ckpt.close()


def _probe_gram(model, loader, idx, loader2, probes: OutputProbes, *, out, **kwargs) -> torch.Tensor:
    """output=OutputProbes: the m probe outputs' kernels, as "trace" (their sum, divided
    by m: the estimate of the trace kernel) or "diagonal" (each, reduce=False)."""
    if out is not None:
        raise ValueError("out= is not supported with output=OutputProbes: leave out=None")
    _check_model(model)  # before a hook is put on it
    with probed(model, probes):
        k = gram(model, loader, idx, loader2, output="trace" if probes.reduce else "diagonal", **kwargs)
    return k.div_(probes.m) if probes.reduce else k


def _identity(model: nn.Module, index: ParamIndex, output, precision: Precision, backend: str, cross: bool,
              key: Optional[str]):
    """What a checkpoint must agree on to be resumed by this call (with ``parts``: the
    itemized fingerprints, to name what differs); and whether some of it could not be
    fingerprinted (then the Checkpoint asks for ``key``)."""
    from .identity import computation_fingerprint

    structure = computation_fingerprint(model)
    parts = {"model_structure": structure.parts}
    undecidable = list(structure.undecidable)
    if callable(output) and not isinstance(output, str):
        name = f"{getattr(output, '__module__', '?')}.{getattr(output, '__qualname__', type(output).__name__)}"
        fingerprint = computation_fingerprint(None, output)
        parts["output"] = fingerprint.parts
        undecidable += [f"output= {item}" for item in fingerprint.undecidable]
        output = f"callable {name} ({'code not decidable' if fingerprint.undecidable else fingerprint.digest})"
    return {
        "model_weights": model_fingerprint(model),
        "model_structure": structure.digest,
        "checkpoint_key": key,
        "idx": tensor_fingerprint(index.positions),
        "p": len(index),
        "output": output,
        "precision": precision.name,
        "backend": backend,
        "kernel": "cross K(X1, X2)" if cross else "symmetric K(X, X)",
        "undecidable": undecidable,
        "parts": parts,
        # Folders written before trace/diagonal took this layout (a row per (sample,
        # logit)) have no such key: they are refused, never read with the wrong shape.
        **({"features_layout": _LAYOUT} if output in _PER_SAMPLE_ROWS else {}),
    }, bool(undecidable)


# The outputs whose features are stored one row per sample, the k logits side by side
# [k * p]: the trace is the Gram of those rows, the diagonal k Grams of their column
# blocks (tiles), never the k^2 cross products; output="full" needs them all and stores a
# row per (sample, logit). Checkpoints record the layout (_identity).
_PER_SAMPLE_ROWS = ("trace", "diagonal")
_LAYOUT = "one row per sample: the k logits' features side by side"


def _output_axes(k: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """K over (sample, logit) rows [n1 * k, n2 * k] -> [n1, n2, k, k]."""
    outputs = k.shape[0] // n1
    return k.view(n1, outputs, n2, outputs).permute(0, 2, 1, 3).contiguous()


def _describe(signature) -> str:
    """A batch signature (data.ModelInputs.signature) as 'arg 0: 3x32x32 float32, ...'."""
    def one(s):
        if s[0] != "tensor":
            return s[0]
        return f"{'x'.join(map(str, s[2])) or 'scalar'} {str(s[1]).replace('torch.', '')}"

    args, kwargs = signature
    return "(" + ", ".join([f"arg {i}: {one(s)}" for i, s in enumerate(args)] + [f"{k}: {one(s)}" for k, s in kwargs]) + ")"


def _check_signature(first, cross, signature, name: str, b: int) -> None:
    """Batch b of loader ``name`` against its own first batch, and (for loader2) against
    the first loader's: per-sample shapes and dtypes must agree."""
    if first is not None and signature != first:
        raise ValueError(
            f"batch {b} of {name} differs from its batch 0 in per-sample shape or dtype: batch 0 gives "
            f"{_describe(first)}, batch {b} gives {_describe(signature)}. Every batch must hold the same kind of "
            "input; if you passed (X, y) or [X, y] as the loader, note that the loader is iterated over batches: "
            "pass [X], [(X, y)] or a DataLoader"
        )
    if cross is not None and signature != cross:
        raise ValueError(
            f"{name} (the second loader of a cross kernel K(X1, X2)) holds inputs of another per-sample shape or "
            f"dtype than loader: loader gives {_describe(cross)}, {name} gives {_describe(signature)}"
        )


def _fill_store(model, loader, name, *, index, output, precision, device, inputs, backend, kind, budget,
                cache_dir, ckpt, events, extractor, expected_signature=None):
    """Features of every sample of ``loader`` into a FeatureStore (read back from the
    checkpoint where it has them); returns (store, first batch's signature). The store's
    ``structured`` holds the structured tensors' factors (FactorStores), or None; both
    are sized once the extractor's plan is known, on the first batch."""
    total = loader_length(loader)
    recorded = ckpt.recorded_batches(name) if ckpt is not None else []
    forced = recorded_plan(ckpt)
    feature_store, factors = None, None

    def open_for(per_sample: FeatureExtractor):
        nonlocal feature_store, factors
        per_sample.commit()
        feature_store, factors = _open_stores(per_sample, name, precision, device, kind, budget, cache_dir,
                                              None if output == "full" else total, output in _PER_SAMPLE_ROWS)
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
            _check_signature(own, expected_signature if b == 0 else None, batch.signature(), name, b)
            own = batch.signature() if own is None else own
            fingerprint = batch_fingerprint(batch) if ckpt is not None else None
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
                block, batch_factors = _features_with_backoff(per_sample, batch.to(device, precision.compute))
                if feature_store is None:
                    open_for(per_sample)
                _check_finite(block, seen, name)
                if factors is not None:  # recorded before the features, whose record commits the batch
                    factors.append(batch_factors, lambda rows: _to_store(rows, precision, scale_rows=True),
                                   _check_finite, seen, ckpt, fingerprint)
                if output in _PER_SAMPLE_ROWS:  # [B, k, p] -> [B, k * p] (a view; -1 fails for p = 0)
                    block = block.reshape(block.shape[0], block.shape[1] * block.shape[2])
                stored, scales = _to_store(block, precision, scale_rows=True)
                feature_store.append(stored, scales)
                stored_rows += stored.shape[0]
                if ckpt is not None:
                    ckpt.record_batch(name, stored, scales, fingerprint)
            seen += batch.size
            events("features", name, seen, total, resumed=b < len(recorded))
        if feature_store is None:  # an empty loader
            feature_store = FeatureStore(len(index), precision.store, device, kind=kind, max_memory=budget,
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
    except BaseException:
        for opened in (feature_store, factors):
            if opened is not None:
                opened.close()
        raise
    return feature_store, own


def _open_stores(per_sample: FeatureExtractor, name: str, precision: Precision, device, kind: str, budget: int,
                 cache_dir, expected_rows: Optional[int], per_sample_rows: bool = False):
    """(FeatureStore of the plan's feature columns, FactorStores or None): the budget
    shared in proportion to the bytes each holds per sample. per_sample_rows: a row holds
    a sample's k logits side by side (_PER_SAMPLE_ROWS); else a row per (sample, logit).
    The store's ``outputs`` is k (1 for one scalar output)."""
    outputs = per_sample.k if per_sample.multi else 1
    p = len(per_sample.feature_index)
    choices = [per_sample.plan.choices[n] for n in per_sample.structured_names]
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


def _features_with_backoff(per_sample: FeatureExtractor, batch: ModelInputs):
    """(features, structured factors) of a batch (FeatureExtractor.extract); on CUDA
    out-of-memory, of its halves (recursively)."""
    try:
        block = per_sample(batch)
        return block, per_sample.factors
    except torch.cuda.OutOfMemoryError:
        if batch.size == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = batch.size // 2
        _log.info("out of memory on a batch of %d samples: retrying in halves", batch.size)
        (a, fa), (b, fb) = (_features_with_backoff(per_sample, batch.slice(0, half)),
                            _features_with_backoff(per_sample, batch.slice(half, batch.size)))
        return torch.cat([a, b]), {n: (torch.cat([fa[n][0], fb[n][0]]), torch.cat([fa[n][1], fb[n][1]])) for n in fa}


