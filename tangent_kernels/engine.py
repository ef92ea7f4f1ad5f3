"""The eNTK engine: orders the work, loader -> features -> store -> tiles of K.

Features come from ``persample`` (one batched forward/backward with every use of a
sampled parameter intercepted; ``torch.func`` for the tensors no rule covers), batch by
batch into stores (``store``, the structured tensors' factors in ``structured``),
checkpointed as they finish; the Gram phase is ``tiles``. docs/engine.md has the why of
each choice.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from ._model import check_device, eval_mode, fp32_math, model_device
from .checkpoint import Checkpoint, model_fingerprint, tensor_fingerprint
from .data import loader_length
from .outputs import OutputProbes, OutputSpec, check_output_spec, is_multi, probed
from .params import ParamIndex, resolve_idx
from .store import check_max_memory, check_store
from .persample import FeatureExtractor, resolve_backend
from .structured import check_structured
from . import tiles
from .precisions import PRECISIONS, Precision, _check_precision, _to_store
from .progress import ProgressEvent, Events, check_progress
from .feature_phase import PER_SAMPLE_ROWS, feature_blocks, fill_store, new_extractor
from .sketch import check_projection

__all__ = ["features", "gram", "PRECISIONS", "ProgressEvent"]

_log = logging.getLogger("tangent_kernels")


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
    projection=None,
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
        projection: None, or a :class:`tk.Projection`: the features times its random
            R [p, dim], [n, dim] ([n, k, dim] for every logit), R generated on the fly,
            never whole (docs/sketch.md; kind="kronecker": the linear maps' weights
            sketched from their factors, no per-sample gradient of theirs formed).
    """
    projection = check_projection(projection)
    if isinstance(output, OutputProbes):  # the probe outputs' gradients [n, m, p]
        _check_model(model)
        with probed(model, output):
            return features(model, loader, idx, output="full", precision=precision, device=device,
                            progress=progress, inputs=inputs, backend=backend, projection=projection)
    index, output, precision, device, backend = _prepare(model, idx, output, precision, device, backend)
    progress = check_progress(progress)
    _check_inputs_callable(inputs)
    with eval_mode(model), fp32_math(precision.allow_tf32):
        blocks = feature_blocks(model, loader, index, output, precision, device, inputs, progress, "loader", backend,
                                projection)
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
    projection=None,
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
        projection: None, or a :class:`tk.Projection`: the sketched K~ = (G R)(G R)^T, an
            unbiased estimate of K over ``idx`` (docs/sketch.md). The projection decides
            which tensors take features (every one for the dense kinds; all but the linear
            maps' weights, sketched from their factors, for kind="kronecker"):
            structured="auto" leaves it to it, "always" is refused. Not yet under
            torch.distributed.
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
                           structured=structured, projection=projection)
    projection = check_projection(projection)
    if projection is not None:
        structured = check_structured(structured)
        if structured == "always":
            raise ValueError("structured='always' cannot be combined with projection=: the structured Gram forms K "
                             "from factors, without the features a projection applies to. Leave structured='auto' "
                             "(a projection decides it: features for every tensor with the dense kinds, every "
                             "linear map's factors with kind='kronecker')")
        structured = projection.structured

    if (split := active_group(group, shard, gather)) is not False:
        if projection is not None:
            raise NotImplementedError("projection= is not supported under torch.distributed yet: pass group=False to "
                                      "compute the sketched K in this process")
        from .distributed.driver import gram as distributed_gram

        return distributed_gram(model, loader, idx, loader2, group=split, shard=shard, gather=gather, output=output,
                                precision=precision, device=device, progress=progress, inputs=inputs, backend=backend,
                                out=out, callback=callback, checkpoint=checkpoint, store=store, max_memory=max_memory,
                                cache_dir=cache_dir, checkpoint_key=checkpoint_key, structured=structured)
    index, output, precision, device, backend = _prepare(model, idx, output, precision, device, backend)
    _check_inputs_callable(inputs)
    if projection is None:  # else checked above, and replaced by the projection's mode
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
            identity, _ = _identity(model, index, output, precision, backend, loader2 is not None, checkpoint_key,
                                    projection)
            ckpt = Checkpoint(checkpoint, identity)
        stores = []
        try:
            made = []

            def extractor() -> FeatureExtractor:
                # One for both loaders: the first batch's decisions (paths, check) hold for both.
                if not made:
                    made.append(new_extractor(model, index, output, precision, device, backend, structured, projection))
                return made[0]

            fill = dict(index=index, output=output, precision=precision, device=device, inputs=inputs,
                        backend=backend, kind=store, budget=budget, cache_dir=cache_dir, ckpt=ckpt, events=events,
                        extractor=extractor, projection=projection)
            first, signature = fill_store(model, loader, "loader", **fill)
            stores.append(first)
            second = first
            if loader2 is not None:
                second, _ = fill_store(model, loader2, "loader2", expected_signature=signature, **fill)
                stores.append(second)
            form = output if output in PER_SAMPLE_ROWS else "rows"
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
              key: Optional[str], projection=None):
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
        **({"features_layout": _LAYOUT} if output in PER_SAMPLE_ROWS else {}),
        # Only with one, so that folders written before projections existed still resume.
        **({"projection": projection.identity} if projection is not None else {}),
    }, bool(undecidable)


_LAYOUT = "one row per sample: the k logits' features side by side"


def _output_axes(k: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """K over (sample, logit) rows [n1 * k, n2 * k] -> [n1, n2, k, k]."""
    outputs = k.shape[0] // n1
    return k.view(n1, outputs, n2, outputs).permute(0, 2, 1, 3).contiguous()


