"""Taps: per-sample gradients from one batched forward and backward.

For every layer that owns sampled parameters and that a rule covers (Linear,
Conv1d/2d/3d, Embedding, BatchNorm in eval, LayerNorm, GroupNorm, their biases), a
forward hook records what the layer's per-sample weight gradient needs (its input,
or its normalized input) and the tensor z it produced. One
``torch.autograd.grad(s.sum(), [z_1, ..., z_L])`` then yields d_l = ds/dz_l for
every sample at once (samples do not interact in eval mode), and the sampled
entries of each weight gradient are contracted from (a, d) by the functions in
``sampled.py``; no weight gradient and no full per-sample gradient is ever formed.

Everything else (custom modules, parameters used by two modules, modules called more
than once per forward) goes through the generic ``torch.func`` path for just those
parameters.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from . import ops, sampled
from ._model import matmul_allows_tf32
from .outputs import scalarize
from .params import TensorSlice

_log = logging.getLogger("tangent_kernels")

__all__ = ["BACKENDS", "LayerRule", "resolve_backend", "rule_for", "TapRecorder", "Untappable"]

# Implementations of the sampled-gradient contractions for Linear, Conv and Embedding
# (norms and biases are a per-channel sum in plain torch on every backend):
#   "torch"   plain torch (sampled.py), any device: the reference;
#   "cpp"     the C++ CPU kernels (csrc/cpu/sampled_grad.cpp), CPU tensors;
#   "cuda"    the CUDA kernels (csrc/cuda/sampled_grad.cu), CUDA tensors;
#   "triton"  the Triton kernels (kernels/), CUDA tensors (CPU only under TRITON_INTERPRET=1);
#   "auto"    CPU: "cpp" when the extension has its CPU kernels (measured faster than
#             "torch": docs/kernels.md), else "torch". CUDA: "cuda" when built (measured
#             fastest on an H100: bench/RESULTS.md), else "triton", else "torch".
# "cpp" and "cuda" write each result straight into the caller's feature block.
BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")
_COMPILED = ("cpp", "cuda")


def _compiled_missing(backend: str, device: torch.device) -> Optional[str]:
    """Why the compiled sampled-gradient kernels of ``backend`` cannot run on ``device``."""
    from . import _ext, ops

    wanted = "cpu" if backend == "cpp" else "cuda"
    if device.type != wanted:
        other = "cuda" if backend == "cpp" else "cpp"
        return f"backend={backend!r} runs on {wanted.upper()} tensors, not {device}; use backend={other!r}, 'auto' or 'torch'"
    if not _ext.extension_loaded():
        return f"backend={backend!r} needs the compiled extension: {_ext.extension_error()} (see tangent_kernels.info())"
    if not ops.has_sampled_kernels(wanted):
        return (f"backend={backend!r}: the loaded extension has no {wanted.upper()} sampled-gradient kernels "
                f"(see tangent_kernels.info()); rebuild it with {'TANGENT_KERNELS_CUDA=1 ' if backend == 'cuda' else ''}"
                f"{_ext.BUILD_HINT}")
    return None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to use on ``device``; a clear error for an unknown or unusable one."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {list(BACKENDS)}")
    if backend == "torch":
        return backend
    if backend in _COMPILED:
        reason = _compiled_missing(backend, device)
        if reason is not None:
            raise ValueError(reason)
        return backend
    if backend == "auto" and device.type != "cuda":
        # On CPU Triton only runs interpreted (for tests): far slower than either.
        return "cpp" if device.type == "cpu" and _compiled_missing("cpp", device) is None else "torch"
    from . import kernels

    if backend == "auto":
        if _compiled_missing("cuda", device) is None:
            return "cuda"
        return "triton" if kernels.available() else "torch"
    reason = kernels.unavailable_reason()
    if reason is not None:
        raise ValueError(f"backend='triton' is not available: {reason}")
    if device.type != "cuda" and not kernels.INTERPRETED:
        raise ValueError(f"backend='triton' runs on CUDA devices (or under TRITON_INTERPRET=1), not {device}")
    return backend


def _writes_in_place(backend: str, out: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether a compiled op can write straight into ``out`` (a 2-D float block on d's
    device); otherwise the rule returns [B, m] and the caller scatters it."""
    return (backend in _COMPILED and out.dim() == 2 and out.device == d.device
            and out.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64))


class Untappable(Exception):
    """Raised inside a forward when a tapped module turns out not to fit its rule."""

    def __init__(self, module: nn.Module, why: str):
        super().__init__(why)
        self.module, self.why = module, why


class LayerRule:
    """How to tap one kind of layer: what to save in the forward, how to contract."""

    params: Tuple[str, ...] = ("weight", "bias")

    def save(self, module: nn.Module, a: torch.Tensor, batch: int):
        """What the weight gradient needs from the input a (detached); Untappable if unfit."""
        raise NotImplementedError

    def plan(self, module: nn.Module, param: str, local: torch.Tensor, backend: str):
        """Index work done once per run: (plan, order). ``grad`` returns its columns in
        ``order`` (a permutation of the m entries; None = as given)."""
        return local, None

    def grad(self, module: nn.Module, param: str, saved, d: torch.Tensor, plan, backend: str) -> torch.Tensor:
        """[B, m]: the planned sampled entries of d s / d param, for every sample."""
        raise NotImplementedError

    def grad_into(self, module: nn.Module, param: str, saved, d: torch.Tensor, plan, backend: str,
                  out: torch.Tensor, columns: torch.Tensor) -> None:
        """out[:, columns] = ``grad(...)``; rules with a compiled op write it in place."""
        out[:, columns] = self.grad(module, param, saved, d, plan, backend).to(out.dtype)

    def dense_entries(self, module: nn.Module, param: str, plan):
        """(out_channel, in_channel, kernel_offsets, kernel_size) of the planned entries when
        the dense GEMM strategy can compute ``param``'s gradient, else None."""
        return None

    def dense_operands(self, module: nn.Module, param: str, saved, d: torch.Tensor):
        """(a_pad, d, stride, dilation) for the dense strategy, as a groups=1 convolution."""
        raise NotImplementedError


def _detached_input(a: torch.Tensor, module: nn.Module, batch: int, min_dim: int) -> torch.Tensor:
    if not isinstance(a, torch.Tensor) or a.dim() < min_dim or a.shape[0] != batch:
        raise Untappable(module, f"input is not a batched tensor of >= {min_dim} dims")
    return a.detach()


class LinearRule(LayerRule):
    def save(self, module, a, batch):
        return _detached_input(a, module, batch, 2)

    def plan(self, module, param, local, backend):
        if param == "bias":
            return local, None
        return (local // module.in_features, local % module.in_features), None

    def grad(self, module, param, a, d, plan, backend):
        batch, n_in, n_out = a.shape[0], module.in_features, module.out_features
        d = d.reshape(batch, -1, n_out)
        if param == "bias":
            return sampled.sampled_bias_grad(d.transpose(1, 2), plan)
        rows, cols = plan
        if backend == "triton":
            linear = torch.ops.tangent_kernels.triton_sampled_linear_grad
        else:
            linear = ops.sampled_linear_grad if backend in _COMPILED else sampled.sampled_linear_grad
        return linear(a.reshape(batch, -1, n_in), d, rows, cols)

    def grad_into(self, module, param, a, d, plan, backend, out, columns):
        if param == "bias" or not _writes_in_place(backend, out, d):
            return super().grad_into(module, param, a, d, plan, backend, out, columns)
        batch = a.shape[0]
        rows, cols = plan
        ops.sampled_linear_grad(a.reshape(batch, -1, module.in_features), d.reshape(batch, -1, module.out_features),
                                rows, cols, out=out, out_columns=columns)

    def dense_entries(self, module, param, plan):
        if param != "weight":
            return None
        rows, cols = plan
        return rows, cols, torch.zeros(rows.shape[0], 1, dtype=torch.int64, device=rows.device), (1,)

    def dense_operands(self, module, param, a, d):
        # A linear layer is a 1x1 convolution over its tokens: channels first, views only.
        batch = a.shape[0]
        return (a.reshape(batch, -1, module.in_features).transpose(1, 2),
                d.reshape(batch, -1, module.out_features).transpose(1, 2), (1,), (1,))


class ConvRule(LayerRule):
    def save(self, module, a, batch):
        a = _detached_input(a, module, batch, module.weight.dim())
        if a.dim() != module.weight.dim():
            raise Untappable(module, "unbatched convolution input")
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        # _reversed_padding_repeated_twice is what ConvNd itself pads with ('same' included).
        return F.pad(a, module._reversed_padding_repeated_twice, mode=mode)

    def plan(self, module, param, local, backend):
        if param == "bias":
            return local, None
        kernel = tuple(module.weight.shape[2:])
        per_out = module.weight[0].numel()
        kernel_size = math.prod(kernel)
        out_channel = local // per_out
        channel_in_group = (local % per_out) // kernel_size
        groups_out = module.out_channels // module.groups
        in_channel = (out_channel // groups_out) * module.weight.shape[1] + channel_in_group
        if backend in ("triton", "cpp", "cuda"):
            offsets = torch.stack(torch.unravel_index(local % kernel_size, kernel), dim=1)
            return (out_channel, in_channel, offsets), None
        return sampled.conv_plan(out_channel, in_channel, local % kernel_size, kernel)

    def grad(self, module, param, a_padded, d, plan, backend):
        if param == "bias":
            return sampled.sampled_bias_grad(d.reshape(d.shape[0], d.shape[1], -1), plan)
        if backend == "triton":
            return torch.ops.tangent_kernels.triton_sampled_conv_grad(
                a_padded, d, *plan, list(module.stride), list(module.dilation)
            )
        if backend in _COMPILED:
            return ops.sampled_conv_grad(a_padded, d, *plan, module.stride, module.dilation)
        patches = sampled.conv_patches(a_padded, module.weight.shape[2:], module.stride, module.dilation, d.shape[2:])
        return sampled.sampled_conv_grad(patches, d, plan)

    def grad_into(self, module, param, a_padded, d, plan, backend, out, columns):
        if param == "bias" or not _writes_in_place(backend, out, d):
            return super().grad_into(module, param, a_padded, d, plan, backend, out, columns)
        ops.sampled_conv_grad(a_padded, d, *plan, module.stride, module.dilation, out=out, out_columns=columns)

    def dense_entries(self, module, param, plan):
        if param != "weight" or module.groups != 1 or len(plan) != 3:
            return None
        return (*plan, tuple(module.weight.shape[2:]))

    def dense_operands(self, module, param, a_padded, d):
        return a_padded, d, tuple(module.stride), tuple(module.dilation)


class EmbeddingRule(LayerRule):
    params = ("weight",)

    def save(self, module, tokens, batch):
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise Untappable(module, "max_norm / scale_grad_by_freq / sparse embeddings")
        return _detached_input(tokens, module, batch, 1)

    def plan(self, module, param, local, backend):
        return (local // module.embedding_dim, local % module.embedding_dim), None

    def grad(self, module, param, tokens, d, plan, backend):
        rows, cols = plan
        tokens = tokens.reshape(tokens.shape[0], -1)
        if backend == "triton":
            embedding = torch.ops.tangent_kernels.triton_sampled_embedding_grad
        else:
            embedding = ops.sampled_embedding_grad if backend in _COMPILED else sampled.sampled_embedding_grad
        return embedding(
            tokens, d.reshape(d.shape[0], -1, module.embedding_dim), rows, cols, module.padding_idx
        )

    def grad_into(self, module, param, tokens, d, plan, backend, out, columns):
        if not _writes_in_place(backend, out, d):
            return super().grad_into(module, param, tokens, d, plan, backend, out, columns)
        rows, cols = plan
        ops.sampled_embedding_grad(tokens.reshape(tokens.shape[0], -1), d.reshape(d.shape[0], -1, module.embedding_dim),
                                   rows, cols, module.padding_idx, out=out, out_columns=columns)


class _ChannelNormRule(LayerRule):
    """Norms whose affine parameters are per channel (dim 1): BatchNorm, GroupNorm."""

    def grad(self, module, param, xhat, d, local, backend):
        d = d.reshape(d.shape[0], d.shape[1], -1)
        if param == "bias":
            return sampled.sampled_bias_grad(d, local)
        return sampled.sampled_scale_grad(d, xhat.reshape(d.shape), local)


class BatchNormRule(_ChannelNormRule):
    def save(self, module, a, batch):
        if module.running_mean is None or module.running_var is None:
            # Without running statistics BatchNorm normalizes with batch statistics even in
            # eval mode: samples interact, so no per-sample tap (nor batched pass) is exact.
            raise Untappable(module, "BatchNorm without running statistics")
        a = _detached_input(a, module, batch, 2)
        shape = (1, -1) + (1,) * (a.dim() - 2)
        return (a - module.running_mean.reshape(shape)) * torch.rsqrt(module.running_var.reshape(shape) + module.eps)


class GroupNormRule(_ChannelNormRule):
    def save(self, module, a, batch):
        return F.group_norm(_detached_input(a, module, batch, 2), module.num_groups, None, None, module.eps)


class LayerNormRule(LayerRule):
    def save(self, module, a, batch):
        a = _detached_input(a, module, batch, 1 + len(module.normalized_shape))
        return F.layer_norm(a, module.normalized_shape, None, None, module.eps)

    def grad(self, module, param, xhat, d, local, backend):
        # Parameters span the normalized trailing dims; every leading dim is a position.
        size = math.prod(module.normalized_shape)
        d = d.reshape(d.shape[0], -1, size).transpose(1, 2)
        if param == "bias":
            return sampled.sampled_bias_grad(d, local)
        return sampled.sampled_scale_grad(d, xhat.reshape(xhat.shape[0], -1, size).transpose(1, 2), local)


_RULES: Dict[type, LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Conv3d: ConvRule(),
    nn.Embedding: EmbeddingRule(),
    nn.BatchNorm1d: BatchNormRule(),
    nn.BatchNorm2d: BatchNormRule(),
    nn.BatchNorm3d: BatchNormRule(),
    nn.GroupNorm: GroupNormRule(),
    nn.LayerNorm: LayerNormRule(),
}


def rule_for(module: nn.Module) -> Optional[LayerRule]:
    """The rule for a module whose forward is exactly a covered layer's (subclasses that
    override forward, e.g. weight-standardized convolutions, are not covered)."""
    for kind, rule in _RULES.items():
        if isinstance(module, kind) and type(module).forward is kind.forward:
            return rule
    return None


@dataclass
class _Tap:
    module: nn.Module
    rule: LayerRule
    slices: List[Tuple[str, TensorSlice]]  # (param attribute, its sampled slice)
    work: List[Tuple[str, object, torch.Tensor]] = None  # (attribute, rule plan, target columns)
    saved: object = None
    z: Optional[torch.Tensor] = None
    # The input as the layer saw it: an in-place op on it after the layer would change
    # what Linear/Embedding rules read (autograd itself refuses such models).
    source: Optional[torch.Tensor] = None
    source_version: int = 0


# Per-layer strategy for weight gradients of Linear and groups=1 Conv layers (the issue's
# "two strategies on GPU, chosen per layer by measured speed"):
#   "auto"   on CUDA with backend "cuda" or "triton": on the first batch, time the sparse
#            sampled-dot kernels and the dense GEMM-with-sampled-epilogue Triton kernel
#            (kernels/dense_conv_grad.py) on the layer, check they agree, keep the faster;
#            elsewhere sparse only (the dense kernel is Triton: on CPU only interpreted).
#   "always" dense wherever it applies and agrees with sparse (tests, under the interpreter).
#   "never"  sparse only.
DENSE_STRATEGY = "auto"
_DENSE_STRATEGIES = ("auto", "always", "never")
# Agreement required of the dense result on the first batch (relative Frobenius): fp32
# sums in another order (<< 1e-4); TF32 products carry ~1e-3.
_DENSE_AGREEMENT = {False: 1e-4, True: 1e-2}
# "auto" does not even compile the dense kernel for a layer whose computed tiles hold
# more than this many gradient entries per sampled one: on an H100 (IEEE fp32, resnet50,
# ~50 per sampled entry) dense was 15-40x slower than sparse on every convolution, so
# the break-even lies at a few; 8 leaves room for TF32 and better tiles while sparing
# sparse-sampled models the first batch's compilation and timing.
_DENSE_MAX_WORK_RATIO = 8.0


class TapRecorder:
    """Sampled per-sample gradients of the tapped layers for one batch at a time."""

    def __init__(self, model: nn.Module, taps: List[_Tap], state, output, device, backend: str):
        self.model, self.taps, self.state, self.output, self.backend = model, taps, state, output, backend
        if DENSE_STRATEGY not in _DENSE_STRATEGIES:
            raise ValueError(f"taps.DENSE_STRATEGY = {DENSE_STRATEGY!r}; use one of {_DENSE_STRATEGIES}")
        # (tap index, attribute) -> "sparse" or "dense", decided on the first batch, and
        # what the decision measured (seconds of each strategy, or why dense was skipped).
        self.strategy: Dict[Tuple[int, str], str] = {}
        self.measured: Dict[str, str] = {}
        self._dense_plans: Dict[Tuple[int, str], tuple] = {}
        for tap in taps:
            tap.work = []
            for attr, piece in tap.slices:
                plan, order = tap.rule.plan(tap.module, attr, piece.local.to(device), backend)
                columns = piece.columns.to(device)
                tap.work.append((attr, plan, columns if order is None else columns[order]))

    def __call__(self, batch, out: torch.Tensor) -> None:
        """Fill out[:, columns] of every tapped slice for ``batch`` (Untappable on misfit)."""
        try:
            ds = self._forward_backward(batch)
            for tap in self.taps:
                if tap.source is not None and tap.source._version != tap.source_version:
                    raise Untappable(tap.module, "its input was modified in place after the layer")
            for i, (tap, d) in enumerate(zip(self.taps, ds)):
                if d is None:  # the layer does not influence s
                    d = torch.zeros_like(tap.z)
                for attr, plan, columns in tap.work:
                    choice = self.strategy.get((i, attr))
                    if choice is None:
                        self.strategy[(i, attr)] = self._choose(i, tap, attr, plan, columns, d, out)
                    elif choice == "dense":
                        self._dense_into(i, tap, attr, d, out, columns)
                    else:
                        tap.rule.grad_into(tap.module, attr, tap.saved, d, plan, self.backend, out, columns)
        finally:
            for tap in self.taps:
                tap.saved, tap.z, tap.source = None, None, None

    def _dense_wanted(self, tap: _Tap, d: torch.Tensor) -> bool:
        from . import kernels

        if DENSE_STRATEGY == "never" or d.dtype == torch.float64 or not kernels.available():
            return False
        if DENSE_STRATEGY == "always":
            return True
        return d.is_cuda and self.backend in ("cuda", "triton") and not kernels.INTERPRETED

    def _dense(self, i: int, tap: _Tap, attr: str, d: torch.Tensor) -> torch.Tensor:
        from . import kernels

        plan, m, kernel = self._dense_plans[(i, attr)]
        a_pad, d_view, stride, dilation = tap.rule.dense_operands(tap.module, attr, tap.saved, d)
        return kernels.dense_conv_grad(a_pad, d_view, plan, m, kernel, stride, dilation, matmul_allows_tf32())

    def _dense_into(self, i: int, tap: _Tap, attr: str, d: torch.Tensor, out: torch.Tensor,
                    columns: torch.Tensor) -> None:
        out[:, columns] = self._dense(i, tap, attr, d).to(out.dtype)

    def _choose(self, i: int, tap: _Tap, attr: str, plan, columns: torch.Tensor, d: torch.Tensor,
                out: torch.Tensor) -> str:
        """Fill out[:, columns] for this first batch and pick the layer's strategy."""
        from . import kernels

        sparse = lambda: tap.rule.grad_into(tap.module, attr, tap.saved, d, plan, self.backend, out, columns)
        sparse()
        name = f"{type(tap.module).__name__}[{i}].{attr}"
        entries = tap.rule.dense_entries(tap.module, attr, plan)
        if entries is None or not self._dense_wanted(tap, d):
            return "sparse"
        *indices, kernel = entries
        m = indices[0].shape[0]
        dense_plan = kernels.dense_plan(*indices, kernel)
        ratio = dense_plan.tile_m.shape[0] * dense_plan.block_m * dense_plan.block_n / max(m, 1)
        if DENSE_STRATEGY == "auto" and ratio > _DENSE_MAX_WORK_RATIO:
            self.measured[name] = f"dense not tried: its tiles hold {ratio:.0f}x the sampled entries; sparse"
            return "sparse"
        self._dense_plans[(i, attr)] = (dense_plan, m, kernel)
        try:
            got = self._dense(i, tap, attr, d)
        except Exception as error:  # a kernel that cannot compile or launch here must not stop the run
            self.measured[name] = f"dense failed ({type(error).__name__}: {error}); sparse"
            _log.warning("dense strategy failed on %s, using the sparse kernels: %s", name, error)
            return "sparse"
        expected = out[:, columns].to(got.dtype)
        error = float((got - expected).norm() / expected.norm().clamp_min(torch.finfo(got.dtype).tiny))
        if not error <= _DENSE_AGREEMENT[matmul_allows_tf32()]:
            self.measured[name] = f"dense disagrees with sparse ({error:.1e}); sparse"
            _log.warning("dense strategy disagrees with the sparse kernels on %s (%.1e relative); using sparse",
                         name, error)
            return "sparse"
        if DENSE_STRATEGY == "always":
            out[:, columns] = got.to(out.dtype)
            return "dense"

        dense = lambda: self._dense_into(i, tap, attr, d, out, columns)
        t_sparse, t_dense = _device_seconds(sparse, d.device), _device_seconds(dense, d.device)
        choice = "dense" if t_dense < t_sparse else "sparse"
        self.measured[name] = f"sparse {t_sparse * 1e3:.3f} ms, dense {t_dense * 1e3:.3f} ms; {choice}"
        _log.debug("strategy for %s: %s", name, self.measured[name])
        if choice == "sparse":
            sparse()  # the last call decides what out holds: both agree, but be exact
        return choice

    def _forward_backward(self, batch) -> Tuple[Optional[torch.Tensor], ...]:
        """One hooked forward, then ds/dz at every tap."""
        for tap in self.taps:
            tap.saved, tap.z, tap.source = None, None, None
        self._batch = batch.size
        handles = [tap.module.register_forward_hook(self._hook(tap)) for tap in self.taps]
        try:
            with torch.enable_grad():
                result = functional_call(self.model, self.state, batch.args, batch.kwargs)
                s = scalarize(result, self.output, batch.size)
                missing = [tap.module for tap in self.taps if tap.z is None]
                if missing:
                    raise Untappable(missing[0], "not called in the forward")
                return torch.autograd.grad(s.sum(), [tap.z for tap in self.taps], allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, tap: _Tap):
        def hook(module, inputs, z):
            if tap.z is not None:
                raise Untappable(module, "called more than once per forward")
            if not inputs or not isinstance(z, torch.Tensor):
                raise Untappable(module, "no positional input or a non-tensor output")
            a = inputs[0]
            tap.saved = tap.rule.save(module, a, self._batch)
            if isinstance(a, torch.Tensor):
                tap.source, tap.source_version = a, a._version
            # z becomes the point where ds/dz is read. A clone goes downstream, so an
            # in-place op after the layer (ReLU(inplace=True), `out += identity`)
            # changes the clone and never the tapped tensor.
            tap.z = z if z.requires_grad else z.detach().requires_grad_(True)
            return tap.z.clone()

        return hook


def _device_seconds(fn, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of ``fn`` (already warm) on ``device``: CUDA events there."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]
