"""The public entries of the pipeline: request -> feature phase -> Gram phase (docs/pipeline.md).

``tk.gram`` decides here whether the Gram is one process's work (``engine.gram``) or a
process group's (``distributed.driver.gram``), so that neither of those imports the
other; both check their arguments through one ``request.Request``. ``tk.features`` is
always one process's (``engine.features``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from . import engine
from .distributed import active_group
from .distributed import driver
from .engine import features
from .outputs import OutputProbes, OutputSpec, probed
from .progress import ProgressEvent
from .request import check_model
from .sketch import check_projection

__all__ = ["features", "gram"]


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
            structured="auto" leaves it to it, "always" is refused. Under torch.distributed
            every rank sketches its samples with the same R (a function of the seed).
    """
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
    projection = check_projection(projection)  # its combination with structured= is engine.gram's to check
    if (split := active_group(group, shard, gather)) is not False:
        return driver.gram(model, loader, idx, loader2, group=split, shard=shard, gather=gather, output=output,
                           precision=precision, device=device, progress=progress, inputs=inputs, backend=backend,
                           out=out, callback=callback, checkpoint=checkpoint, store=store, max_memory=max_memory,
                           cache_dir=cache_dir, checkpoint_key=checkpoint_key, structured=structured,
                           projection=projection)
    return engine.gram(model, loader, idx, loader2, output=output, precision=precision, device=device,
                       progress=progress, inputs=inputs, backend=backend, out=out, callback=callback,
                       checkpoint=checkpoint, store=store, max_memory=max_memory, cache_dir=cache_dir,
                       checkpoint_key=checkpoint_key, structured=structured, projection=projection)


def _probe_gram(model, loader, idx, loader2, probes: OutputProbes, *, out, **kwargs) -> torch.Tensor:
    """output=OutputProbes: the m probe outputs' kernels, as "trace" (their sum, divided
    by m: the estimate of the trace kernel) or "diagonal" (each, reduce=False)."""
    if out is not None:
        raise ValueError("out= is not supported with output=OutputProbes: leave out=None")
    check_model(model)  # before a hook is put on it
    with probed(model, probes):
        k = gram(model, loader, idx, loader2, output="trace" if probes.reduce else "diagonal", **kwargs)
    return k.div_(probes.m) if probes.reduce else k
