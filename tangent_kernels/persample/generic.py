"""The generic path: per-sample gradients through ``torch.func`` for any model.

F[b, j] = d s(x_b) / d theta[idx[j]] for the columns of the given tensors only, by
``functional_call`` + ``vmap(grad)`` or, where vmap cannot batch the model (data-dependent
control flow, in-place ops), an exact per-sample autograd loop. It serves the parameter
tensors that no rule of the batched pass covers, and the spot check of the batched pass.
"""

from __future__ import annotations

import time
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.func import grad, vmap

from .._model import evaluate, functional_state, substituted
from ..data import ModelInputs
from ..outputs import OutputError, OutputSpec, scalarize
from ..params import ParamLayout, TensorSlice
from ..tuning import keep_old_names, settings

__all__ = ["GenericPath"]

keep_old_names(__name__, {"STRATEGY": "generic_strategy"})  # deprecated: tuning.settings

# Upper bound on the per-sample gradient tensors one vmap call materializes
# (chunk x touched parameters); the batch is split into chunks to stay under it.
_PER_SAMPLE_GRAD_BYTES = 512 * 2**20
# How per-sample gradients are taken, unless a strategy is passed:
# tuning.settings.generic_strategy, "vmap", "loop" or "auto" (measure both, keep the faster).


class GenericPath:
    """The generic path: F[b, j] = d s(x_b) / d theta[idx[j]] through torch.func, for
    the columns of ``slices`` only (any model, any layer)."""

    def __init__(self, model: nn.Module, layout: ParamLayout, slices: List[TensorSlice], output: OutputSpec,
                 dtype, device, strategy: Optional[str] = None, state=None):
        """state: a ``functional_state`` of the model to share (its dicts are copied, its
        tensors not), instead of a copy of the model's state of its own."""
        self.model = model
        self.output = output
        self.dtype, self.device = dtype, device
        self.slices = [(s.name, s.local.to(device), s.columns.to(device)) for s in slices]
        self.names = [s.name for s in slices]
        if state is None:
            trainable, self.rest = functional_state(model, layout, dtype, device)
        else:
            trainable, self.rest = dict(state[0]), dict(state[1])
        self.touched = {name: trainable.pop(name) for name in self.names}
        # Untouched trainable tensors are constants here: no gradient is asked of them.
        self.rest.update(trainable)
        touched_bytes = sum(t.numel() * t.element_size() for t in self.touched.values())
        self.chunk = max(1, _PER_SAMPLE_GRAD_BYTES // max(touched_bytes, 1))
        # Neither strategy wins everywhere: vmap batches the work (a large win on GPUs and
        # for small layers) but materializes full per-sample weight gradients, which on a
        # CPU made resnet18 2.4x slower than the loop (bench/bench_gram.py). So, unless
        # told, time one chunk of each after a warm-up chunk and keep the faster.
        self.strategy = strategy or settings.generic_strategy
        self._timings: Dict[str, float] = {}
        self._spans: Dict[str, object] = {}  # tensor -> its columns as a slice, or None (TensorSlice.span)
        self._pieces = {s.name: s for s in slices}

    def __call__(self, batch: ModelInputs, out: torch.Tensor) -> None:
        """Fill this path's columns of out [B, p] for one batch."""
        for start in range(0, batch.size, self.chunk):
            stop = min(start + self.chunk, batch.size)
            self._chunk(batch.slice(start, stop), out[start:stop])

    def _gather(self, grads: Dict[str, torch.Tensor], out: torch.Tensor) -> None:
        """out[:, columns] = grads[name][:, local] for every touched tensor; grads are [c, *shape]."""
        for name, local, columns in self.slices:
            flat = grads[name].reshape(out.shape[0], -1)
            if name not in self._spans:
                self._spans[name] = self._pieces[name].span(flat.shape[1])
            span = self._spans[name]
            if span is not None:  # a whole tensor in order into consecutive columns: a copy
                out[:, span] = flat
            else:
                out[:, columns] = flat[:, local]

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

    def _scalar(self, params, args, kwargs, size: int = 1) -> torch.Tensor:
        """s of the first sample of a batch of ``size``."""
        out = evaluate(self.model, (params, self.rest), args, kwargs)
        return scalarize(out, self.output, size)[0]

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

    def sample_gradients(self, sample: ModelInputs, leaves=None) -> Dict[str, Optional[torch.Tensor]]:
        """{tensor: d s(x) / d tensor} for the first sample of ``sample`` (a sample alone:
        ModelInputs.alone), by autograd (the definition); None for a tensor the output
        does not depend on (a zero gradient)."""
        if leaves is None:
            leaves = {name: t.detach().requires_grad_(True) for name, t in self.touched.items()}

        def gradients():
            # The backward inside the swap: a forward it recomputes (torch.utils.checkpoint)
            # sees the leaves too.
            s = scalarize(self.model(*sample.args, **sample.kwargs), self.output, sample.size)[0]
            return (torch.autograd.grad(s, list(leaves.values()), allow_unused=True) if s.requires_grad
                    else [None] * len(leaves))  # no parameter reaches the output: zero gradient

        with torch.enable_grad():
            grads = substituted(self.model, (leaves, self.rest), gradients,
                                [*sample.args, *sample.kwargs.values()])
        return dict(zip(leaves, grads))

    def _loop(self, batch: ModelInputs, out: torch.Tensor) -> None:
        leaves = {name: t.detach().requires_grad_(True) for name, t in self.touched.items()}
        for b in range(batch.size):
            grads = self.sample_gradients(batch.alone(b), leaves)
            # Gathered per sample: a full per-sample gradient never outlives its row.
            full = {name: (torch.zeros_like(leaves[name]) if g is None else g).unsqueeze(0)
                    for name, g in grads.items()}
            self._gather(full, out[b : b + 1])
