"""The eNTK engine: per-sample gradient features, then the blocked Gram product.

Features: layers that a tap rule covers get their sampled per-sample gradients from
one batched forward/backward (``taps.py``); every other sampled parameter goes
through ``torch.func`` (``functional_call`` + ``vmap(grad)``, or an exact per-sample
loop where vmap cannot batch the model), for just the tensors ``idx`` touches. The
Gram is accumulated tile by tile through ``ops.gram_tile_update``; for K(X, X) only
tiles on or below the diagonal are computed and then mirrored. docs/engine.md has
the why of each choice.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ._model import eval_mode, fp32_math, functional_state, model_device
from .data import ModelInputs, iterate_inputs, loader_length
from .ops import gram_tile_update
from .outputs import OutputError, OutputSpec, check_output_spec, scalarize
from .params import ParamIndex, ParamLayout, TensorSlice, resolve_idx
from .taps import TapRecorder, Untappable, _Tap, resolve_backend, rule_for

__all__ = ["features", "gram", "PRECISIONS"]

_log = logging.getLogger("tangent_kernels")

@dataclass(frozen=True)
class Precision:
    """How one ``precision=`` mode computes.

    Per-sample gradients are always computed in ``compute`` (fp32, or fp64 for "fp64"):
    the 16-bit modes round only the stored features, and the Gram accumulates their
    products in fp32, so their error is the features' rounding alone (docs/precision.md).
    """

    name: str
    compute: torch.dtype  # the model, its per-sample gradients
    store: torch.dtype  # the feature blocks: what ``features`` returns, what the Gram reads
    k: torch.dtype  # K itself: never 16-bit
    allow_tf32: bool = False  # TF32 in the model's matmuls/convolutions and the Gram (CUDA)
    # Power-of-two scale per sample before rounding to fp16, so that neither large
    # gradients overflow (max 65504) nor small ones underflow (normal from 6.1e-5);
    # undone exactly in fp32 on every tile of K.
    scaled: bool = False


PRECISIONS: Dict[str, Precision] = {
    "fp64": Precision("fp64", torch.float64, torch.float64, torch.float64),
    "fp32": Precision("fp32", torch.float32, torch.float32, torch.float32),
    "tf32": Precision("tf32", torch.float32, torch.float32, torch.float32, allow_tf32=True),
    "bf16": Precision("bf16", torch.float32, torch.bfloat16, torch.float32),
    "fp16": Precision("fp16", torch.float32, torch.float16, torch.float32, scaled=True),
}
# fp16 rows are scaled so that their largest magnitude lies in [2**13, 2**14): two such
# entries multiply to < 2**28, far from fp32's limits, and a row keeps 28 binades above
# fp16's smallest normal number.
_FP16_TARGET_EXPONENT = 14

# Upper bound on the per-sample gradient tensors one vmap call materializes
# (chunk x touched parameters); the batch is split into chunks to stay under it.
_PER_SAMPLE_GRAD_BYTES = 512 * 2**20
# How per-sample gradients are taken: "vmap", "loop" or "auto" (measure both, keep the faster).
_STRATEGY = "auto"
# Whether covered layers are tapped (one batched pass) or all go through torch.func.
_TAPS = True
# Relative difference allowed between the batched pass and a per-sample evaluation of
# the first sample. fp32 is loose: ReLU kinks within rounding of zero (see README);
# TF32 (10 mantissa bits) ten times looser still.
_VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9}
# Rows per Gram tile: large enough for BLAS efficiency, small enough that the
# lower-triangle schedule skips about half the work.
_TILE_ROWS = 1024


def _check_precision(precision: str) -> Precision:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; available: {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def _fp16_scales(block: torch.Tensor) -> torch.Tensor:
    """Per-row powers of two mapping each row's largest magnitude into [2**13, 2**14)."""
    peak = block.abs().amax(dim=1).to(torch.float32)
    exponent = torch.where(peak > 0, torch.floor(torch.log2(peak)), torch.full_like(peak, _FP16_TARGET_EXPONENT - 1))
    return torch.exp2(_FP16_TARGET_EXPONENT - 1 - exponent)


def _to_store(block: torch.Tensor, precision: Precision, scale_rows: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(features in the store dtype, per-row scales or None); ``features = stored / scales``."""
    if not (precision.scaled and scale_rows):
        stored = block.to(precision.store)
        if precision.store == torch.float16 and not bool(torch.isfinite(stored).all()):
            raise ValueError(
                f"a per-sample gradient exceeds fp16's range (largest finite value 65504; the largest "
                f"here is {float(block.abs().max()):.3g}): use precision='bf16' or 'fp32' for features "
                "(gram() scales fp16 features per sample and is not affected)"
            )
        return stored, None
    scales = _fp16_scales(block)
    return (block * scales[:, None].to(block.dtype)).to(precision.store), scales

def _progress_bar(total: Optional[int], desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: shown on a terminal, silent in logs and CI.
    return tqdm(total=total, desc=desc, unit="sample", disable=None, dynamic_ncols=True)


class _PerSampleGradients:
    """The generic path: F[b, j] = d s(x_b) / d theta[idx[j]] through torch.func, for
    the columns of ``slices`` only (any model, any layer)."""

    def __init__(self, model: nn.Module, layout: ParamLayout, slices: List[TensorSlice], output: OutputSpec,
                 dtype, device, strategy: Optional[str] = None):
        self.model = model
        self.output = output
        self.dtype, self.device = dtype, device
        self.slices = [(s.name, s.local.to(device), s.columns.to(device)) for s in slices]
        self.names = [s.name for s in slices]
        trainable, self.rest = functional_state(model, layout, dtype, device)
        self.touched = {name: trainable.pop(name) for name in self.names}
        # Untouched trainable tensors are constants here: no gradient is asked of them.
        self.rest.update(trainable)
        touched_bytes = sum(t.numel() * t.element_size() for t in self.touched.values())
        self.chunk = max(1, _PER_SAMPLE_GRAD_BYTES // max(touched_bytes, 1))
        # Neither strategy wins everywhere: vmap batches the work (a large win on GPUs and
        # for small layers) but materializes full per-sample weight gradients, which on a
        # CPU made resnet18 2.4x slower than the loop (bench/bench_gram.py). So, unless
        # told, time one chunk of each after a warm-up chunk and keep the faster.
        self.strategy = strategy or _STRATEGY
        self._timings: Dict[str, float] = {}

    def __call__(self, batch: ModelInputs, out: torch.Tensor) -> None:
        """Fill this path's columns of out [B, p] for one batch."""
        for start in range(0, batch.size, self.chunk):
            stop = min(start + self.chunk, batch.size)
            self._chunk(batch.slice(start, stop), out[start:stop])

    def _gather(self, grads: Dict[str, torch.Tensor], out: torch.Tensor) -> None:
        """out[:, columns] = grads[name][:, local] for every touched tensor; grads are [c, *shape]."""
        for name, local, columns in self.slices:
            out[:, columns] = grads[name].reshape(out.shape[0], -1)[:, local]

    def _chunk(self, batch: ModelInputs, out: torch.Tensor) -> None:
        strategy = self.strategy
        if strategy == "auto":
            # Chunk 1 warms vmap up (tracing, allocator), chunk 2 times it, chunk 3 the loop.
            strategy = "loop" if "vmap" in self._timings else "vmap"
            timed = "warm-up" in self._timings
            start = self._now()
        if strategy == "vmap":
            try:
                self._gather(self._vmap(batch), out)
            except OutputError:
                raise
            except Exception as error:  # noqa: BLE001 - any vmap limitation: the loop is exact
                self.strategy = strategy = "loop"
                warnings.warn(
                    f"torch.func.vmap could not batch this model ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200]}); using a per-sample autograd loop instead "
                    "(same result, slower)",
                    RuntimeWarning,
                    stacklevel=4,
                )
        if strategy == "loop":
            self._loop(batch, out)
        if self.strategy == "auto":
            key = strategy if timed else "warm-up"
            self._timings[key] = (self._now() - start) / batch.size
            if "loop" in self._timings:
                self.strategy = min(("vmap", "loop"), key=self._timings.__getitem__)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _scalar(self, params, args, kwargs) -> torch.Tensor:
        out = functional_call(self.model, (params, self.rest), args, kwargs)
        return scalarize(out, self.output, 1)[0]

    def _vmap(self, batch: ModelInputs) -> Dict[str, torch.Tensor]:
        arg_dims = tuple(0 if batch.is_batched(a) else None for a in batch.args)
        kwarg_dims = {k: (0 if batch.is_batched(v) else None) for k, v in batch.kwargs.items()}

        def one_sample(params, args, kwargs):
            # vmap strips the batch dimension; models (BatchNorm, attention) expect one.
            args = tuple(a.unsqueeze(0) if d == 0 else a for a, d in zip(args, arg_dims))
            kwargs = {k: (v.unsqueeze(0) if kwarg_dims[k] == 0 else v) for k, v in kwargs.items()}
            return self._scalar(params, args, kwargs)

        with warnings.catch_warnings():
            # vmap's "no batching rule, falling back to a loop" notes are about speed only.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            return vmap(grad(one_sample), in_dims=(None, arg_dims, kwarg_dims))(
                self.touched, batch.args, batch.kwargs
            )

    def _loop(self, batch: ModelInputs, out: torch.Tensor) -> None:
        leaves = {name: t.detach().requires_grad_(True) for name, t in self.touched.items()}
        for b in range(batch.size):
            sample = batch.slice(b, b + 1)
            with torch.enable_grad():
                s = self._scalar(leaves, sample.args, sample.kwargs)
                grads = torch.autograd.grad(s, list(leaves.values()), allow_unused=True)
            # Gathered per sample: a full per-sample gradient never outlives its row.
            full = {name: (torch.zeros_like(t) if g is None else g).unsqueeze(0)
                    for (name, t), g in zip(leaves.items(), grads)}
            self._gather(full, out[b : b + 1])


class _FeatureExtractor:
    """F [B, p] per batch: tapped layers from one batched pass, the rest generically."""

    def __init__(self, model: nn.Module, index: ParamIndex, output: OutputSpec, dtype, device, backend: str = "torch",
                 tolerance: Optional[float] = None):
        self.model, self.index, self.output, self.dtype, self.device = model, index, output, dtype, device
        self.backend = backend
        self.tolerance = _VERIFY_TOLERANCE[dtype] if tolerance is None else tolerance
        self.state = functional_state(model, index.layout, dtype, device)
        self.taps = _plan_taps(model, index) if _TAPS else []
        self.verified = not self.taps
        self._build()

    def _build(self) -> None:
        tapped = {id(piece) for tap in self.taps for _, piece in tap.slices}
        self.generic_slices = [piece for piece in self.index.tensor_slices if id(piece) not in tapped]
        self.tapped = TapRecorder(self.model, self.taps, self.state, self.output, self.device, self.backend) if self.taps else None
        self.generic = (
            _PerSampleGradients(self.model, self.index.layout, self.generic_slices, self.output, self.dtype, self.device)
            if self.generic_slices else None
        )
        if self.generic_slices:
            _log.debug("generic torch.func path for: %s", ", ".join(p.name for p in self.generic_slices))

    def _untap(self, keep, why: str) -> None:
        dropped = [tap for tap in self.taps if not keep(tap)]
        self.taps = [tap for tap in self.taps if keep(tap)]
        _log.debug("untapped %s: %s", [type(t.module).__name__ for t in dropped], why)
        self._build()

    def __call__(self, batch: ModelInputs) -> torch.Tensor:
        block = torch.empty(batch.size, len(self.index), dtype=self.dtype, device=self.device)
        while self.tapped is not None:
            try:
                self.tapped(batch, block)
                break
            except Untappable as misfit:
                self._untap(lambda tap: tap.module is not misfit.module, misfit.why)
        if self.generic is not None:
            self.generic(batch, block)
        if not self.verified:
            self._verify(batch, block)
        return block

    def _verify(self, batch: ModelInputs, block: torch.Tensor) -> None:
        """Spot-check the first batch's first and last samples against the generic path.

        A batched pass is exact only if samples do not interact; a model that mixes
        them (batch statistics, batch-level control flow) is caught here, as far as a
        spot check can, and sent down the generic path, which evaluates every sample
        alone.
        """
        self.verified = True
        check = _PerSampleGradients(self.model, self.index.layout, self.index.tensor_slices, self.output,
                                    self.dtype, self.device, strategy="loop")
        rows = sorted({0, batch.size - 1})
        expected = torch.empty(len(rows), len(self.index), dtype=self.dtype, device=self.device)
        for k, row in enumerate(rows):
            check(batch.slice(row, row + 1), expected[k : k + 1])
        error = float((block[rows] - expected).norm() / expected.norm().clamp_min(torch.finfo(self.dtype).tiny))
        if error > self.tolerance:
            warnings.warn(
                f"per-sample gradients from the batched pass differ from a per-sample evaluation by "
                f"{error:.1e} (relative) on the first batch: the model seems to mix samples within a "
                "batch (e.g. BatchNorm without running statistics), or, in fp32 and rarely, a ReLU "
                "input rounded across zero; using the generic per-sample path (exact, slower)",
                RuntimeWarning,
                stacklevel=4,
            )
            self._untap(lambda tap: False, "verification failed")
            self.generic(batch, block)


def _plan_taps(model: nn.Module, index: ParamIndex) -> List[_Tap]:
    """A tap for every covered module that owns sampled parameters not shared elsewhere."""
    owners: Dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    by_name = {piece.name: piece for piece in index.tensor_slices}
    taps = []
    for prefix, module in model.named_modules():
        rule = rule_for(module)
        if rule is None:
            continue
        slices = []
        for attr in rule.params:
            param = getattr(module, attr, None)
            piece = by_name.get(f"{prefix}.{attr}" if prefix else attr)
            # A tied parameter's gradient sums over all its users: generic path.
            if piece is not None and isinstance(param, nn.Parameter) and owners.get(id(param)) == 1:
                slices.append((attr, piece))
        if slices:
            taps.append(_Tap(module, rule, slices))
    return taps


def _feature_blocks(
    model: nn.Module,
    loader: Iterable,
    index: ParamIndex,
    output: OutputSpec,
    precision: Precision,
    device: torch.device,
    inputs: Optional[Callable[[Any], Any]],
    progress: bool,
    name: str,
    backend: str,
    expected_signature=None,
) -> Iterator[Tuple[Any, torch.Tensor]]:
    """Yield (input signature, F [B, p]) per batch, in the compute dtype;
    F[:, j] = d s / d theta[idx[j]]."""
    dtype = precision.compute
    tolerance = _VERIFY_TOLERANCE[dtype] * (10 if precision.allow_tf32 else 1)
    per_sample = _FeatureExtractor(model, index, output, dtype, device, backend, tolerance)
    bar = _progress_bar(loader_length(loader), f"eNTK features ({name})", progress)
    seen = 0
    try:
        for batch in iterate_inputs(loader, inputs, name):
            signature = batch.signature()
            if expected_signature is not None and signature != expected_signature:
                raise ValueError(
                    f"{name} batches differ in structure from loader's: loader gives "
                    f"{expected_signature}, {name} gives {signature} (per-sample shapes "
                    "and dtypes of the inputs must match for a cross kernel)"
                )
            batch = batch.to(device, dtype)
            block = per_sample(batch)
            _check_finite(block, seen, name)
            seen += batch.size
            if bar is not None:
                bar.update(batch.size)
            yield signature, block
    finally:
        if bar is not None:
            bar.close()


def _check_finite(block: torch.Tensor, first_position: int, name: str) -> None:
    finite = torch.isfinite(block).all(dim=1)
    if bool(finite.all()):
        return
    row = int(torch.nonzero(~finite)[0])
    raise ValueError(
        f"non-finite gradient (inf or nan) for the sample at position {first_position + row} of "
        f"{name} (0-based, in iteration order): check that sample's input and the model's "
        "numerics at it (e.g. log of zero, overflow); try precision='fp64'"
    )


def _prepare(model, idx, output, precision, device, backend):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    index = resolve_idx(model, idx)
    output = check_output_spec(output)
    precision = _check_precision(precision)
    device = model_device(model) if device is None else torch.device(device)
    return index, output, precision, device, resolve_backend(backend, device)


def _collect(
    blocks: Iterator[Tuple[Any, torch.Tensor]], precision: Precision, scale_rows: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Any]:
    """(all blocks in the store dtype, their per-row scales or None, the first batch's
    input signature). Each block is rounded as it arrives: no full-size copy in the
    compute dtype."""
    signatures, parts, scales = [], [], []
    for signature, block in blocks:
        signatures.append(signature)
        stored, scale = _to_store(block, precision, scale_rows)
        parts.append(stored)
        scales.append(scale)
    return torch.cat(parts), (torch.cat(scales) if scales[0] is not None else None), signatures[0]


def features(
    model: nn.Module,
    loader: Iterable,
    idx=None,
    *,
    output: OutputSpec = "first",
    precision: str = "fp32",
    device=None,
    progress: bool = True,
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
        progress: show a progress bar on a terminal.
        inputs: optional callable batch -> model input (tensor, tuple of args, dict).
        backend: sampled-gradient kernels for tapped layers: "auto" (Triton on CUDA when
            available, else plain torch), "torch", or "triton".
    """
    index, output, precision, device, backend = _prepare(model, idx, output, precision, device, backend)
    with eval_mode(model), fp32_math(precision.allow_tf32):
        blocks = _feature_blocks(model, loader, index, output, precision, device, inputs, progress, "loader", backend)
        g, _, _ = _collect(blocks, precision, scale_rows=False)
    return g


def gram(
    model: nn.Module,
    loader: Iterable,
    idx=None,
    loader2: Optional[Iterable] = None,
    *,
    output: OutputSpec = "first",
    precision: str = "fp32",
    device=None,
    progress: bool = True,
    inputs: Optional[Callable[[Any], Any]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The eNTK Gram K[i, j] = <g(x_i), g(x_j)> over a loader, [n1, n2].

    ``loader2=None`` gives the symmetric K(X, X) (only the lower triangle is
    computed, then mirrored: K is exactly symmetric); otherwise the cross kernel
    K(X1, X2). K is float32 (float64 when ``precision="fp64"``) on ``device``: the
    16-bit modes round the features and accumulate their products in fp32 (fp16 with a
    power-of-two scale per sample, so no gradient overflows or underflows).
    The other arguments are those of :func:`features`.
    """
    index, output, precision, device, backend = _prepare(model, idx, output, precision, device, backend)
    with eval_mode(model), fp32_math(precision.allow_tf32):
        blocks = _feature_blocks(model, loader, index, output, precision, device, inputs, progress, "loader", backend)
        g1, s1, signature = _collect(blocks, precision, scale_rows=True)
        if loader2 is None:
            return _symmetric_gram(g1, s1, precision.k)
        blocks2 = _feature_blocks(
            model, loader2, index, output, precision, device, inputs, progress, "loader2", backend,
            expected_signature=signature,
        )
        g2, s2, _ = _collect(blocks2, precision, scale_rows=True)
        return _cross_gram(g1, s1, g2, s2, precision.k)


def _tile_update(k: torch.Tensor, a, a_scales, i0: int, i1: int, b, b_scales, j0: int, j1: int, lower: bool) -> None:
    """k[i0:i1, j0:j1] = a[i0:i1] b[j0:j1]^T (k starts at zero), per-row scales undone in fp32."""
    tile = k[i0:i1, j0:j1]
    gram_tile_update(tile, a[i0:i1], b[j0:j1], i0, j0, lower=lower)
    if a_scales is not None:
        tile.mul_((1.0 / a_scales[i0:i1, None]) * (1.0 / b_scales[None, j0:j1]))


def _symmetric_gram(g: torch.Tensor, scales: Optional[torch.Tensor], k_dtype: torch.dtype) -> torch.Tensor:
    n = g.shape[0]
    k = torch.zeros(n, n, dtype=k_dtype, device=g.device)
    for i0 in range(0, n, _TILE_ROWS):
        i1 = min(i0 + _TILE_ROWS, n)
        for j0 in range(0, i0 + 1, _TILE_ROWS):
            j1 = min(j0 + _TILE_ROWS, n)
            _tile_update(k, g, scales, i0, i1, g, scales, j0, j1, lower=(i0 == j0))
            if i0 != j0:
                k[j0:j1, i0:i1].copy_(k[i0:i1, j0:j1].T)
        diagonal = k[i0:i1, i0:i1]
        diagonal.copy_(diagonal.tril() + diagonal.tril(-1).T)
    return k


def _cross_gram(g1: torch.Tensor, s1: Optional[torch.Tensor], g2: torch.Tensor, s2: Optional[torch.Tensor],
                k_dtype: torch.dtype) -> torch.Tensor:
    n1, n2 = g1.shape[0], g2.shape[0]
    k = torch.zeros(n1, n2, dtype=k_dtype, device=g1.device)
    for i0 in range(0, n1, _TILE_ROWS):
        for j0 in range(0, n2, _TILE_ROWS):
            i1, j1 = min(i0 + _TILE_ROWS, n1), min(j0 + _TILE_ROWS, n2)
            _tile_update(k, g1, s1, i0, i1, g2, s2, j0, j1, lower=False)
    return k
