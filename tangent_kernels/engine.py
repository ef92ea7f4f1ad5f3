"""The eNTK engine in one process: orders the work, request -> features -> store -> tiles of K.

``tk.features`` is here; ``tk.gram`` (pipeline.py) calls ``gram`` here unless a process
group asks for the distributed driver. Arguments are checked once, by ``request.Request``
(docs/pipeline.md). Features come from ``persample`` (one batched forward/backward with
every use of a sampled parameter intercepted; ``torch.func`` for the tensors no rule
covers), batch by batch into stores (``store``, the structured tensors' factors in
``structured``), checkpointed as they finish; the Gram phase is ``tiles``.
docs/engine.md has the why of each choice.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from . import tiles
from .checkpoint import Checkpoint
from .data import loader_length
from .feature_phase import PER_SAMPLE_ROWS, feature_blocks, fill_store, keep_rows, new_extractor
from .outputs import OutputProbes, OutputSpec, is_multi, probed
from .persample import FeatureExtractor
from .precisions import PRECISIONS, to_store
from .progress import Events, ProgressEvent
from .request import Request, check_model
from .sketch import check_projection
from .structured import check_structured

__all__ = ["features", "gram", "PRECISIONS", "ProgressEvent"]

_log = logging.getLogger("tangent_kernels")


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
        check_model(model)  # before a hook is put on it
        with probed(model, output):
            return features(model, loader, idx, output="full", precision=precision, device=device,
                            progress=progress, inputs=inputs, backend=backend, projection=projection)
    request = Request.of(model, idx, output=output, precision=precision, device=device, backend=backend,
                         inputs=inputs, progress=progress)
    precision, device = request.precision, request.device
    with request.evaluation():
        blocks = feature_blocks(request, loader, "loader", projection)
        # Each block is rounded to the store dtype as it arrives: no full-size copy in
        # the compute dtype. When the loader tells its size, blocks go straight into the
        # result (a concatenation at the end doubled the memory and, for p in the
        # millions, took longer than the features).
        total = loader_length(loader)
        if total is None:
            return torch.cat([to_store(block, precision, scale_rows=False)[0] for block in blocks])
        result, seen = None, 0
        for block in blocks:
            stored = to_store(block, precision, scale_rows=False)[0]
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
    structured: str = "auto",
    projection=None,
) -> torch.Tensor:
    """The eNTK Gram in this process: :func:`tangent_kernels.gram` (pipeline.py, which
    decides between this and a process group) without ``group``, ``shard``, ``gather``."""
    if loader2 is loader:
        # One loader twice is K(X, X): one pass (a shuffling or streaming loader would give
        # the two sides in two orders), the lower triangle only, mirrored.
        loader2 = None
    projection = check_projection(projection)
    structured = check_structured(structured)
    request = Request.of(model, idx, output=output, precision=precision, device=device, backend=backend,
                         inputs=inputs, progress=progress, store=store, max_memory=max_memory, callback=callback,
                         checkpoint_key=checkpoint_key)
    if projection is not None:
        if structured == "always":
            raise ValueError("structured='always' cannot be combined with projection=: the structured Gram forms K "
                             "from factors, without the features a projection applies to. Leave structured='auto' "
                             "(a projection decides it: features for every tensor with the dense kinds, every "
                             "linear map's factors with kind='kronecker')")
        structured = projection.structured
    output, precision, device, budget = request.output, request.precision, request.device, request.budget
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor [n1, n2] of dtype {precision.k}; got {type(out).__name__}")
    if out is not None and is_multi(output):
        raise ValueError(f"out= holds a [n1, n2] K; output={output!r} returns K with an output axis: leave out=None")
    if out is not None:
        tiles.check_out_memory(out, precision.k)
    events = Events(callback, request.progress)
    with request.evaluation():
        ckpt = None
        if checkpoint is not None:
            # What cannot be fingerprinted (identity["undecidable"]) makes Checkpoint ask for checkpoint_key.
            identity, _ = request.identity(loader2 is not None, projection)
            ckpt = Checkpoint(checkpoint, identity)
        stores = []
        try:
            made = []

            def extractor() -> FeatureExtractor:
                # One for both loaders: the first batch's decisions (paths, check) hold for both.
                if not made:
                    made.append(new_extractor(model, request.index, output, precision, device, request.backend,
                                              structured, projection))
                return made[0]

            # One KeptRows for both loaders: a cross Gram's two sides take the same R.
            fill = dict(cache_dir=cache_dir, ckpt=ckpt, events=events, extractor=extractor, projection=projection,
                        kept_rows=keep_rows(request, projection, loader, *([loader2] if loader2 is not None else [])))
            first, signature = fill_store(request, loader, "loader", **fill)
            stores.append(first)
            second = first
            if loader2 is not None:
                second, _ = fill_store(request, loader2, "loader2", expected_signature=signature, **fill)
                stores.append(second)
            form = output if output in PER_SAMPLE_ROWS else "rows"
            k = tiles.blocked_gram(first, second, loader2 is None, precision.k, device, out, ckpt, events, budget,
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


def _output_axes(k: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """K over (sample, logit) rows [n1 * k, n2 * k] -> [n1, n2, k, k]."""
    outputs = k.shape[0] // n1
    return k.view(n1, outputs, n2, outputs).permute(0, 2, 1, 3).contiguous()


