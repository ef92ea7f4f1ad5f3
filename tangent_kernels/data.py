"""From loader batches to model calls.

A batch is
- a tensor: the model's single input;
- a tuple/list: its first element is the input (the rest, e.g. labels, is ignored);
- a dict: passed as keyword arguments, with a ``labels`` key dropped.
``inputs=`` (a callable batch -> tensor | tuple of positional args | dict of kwargs)
overrides this. Tensors whose leading dimension is the batch size are split per
sample; any other argument is passed unchanged to every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch

__all__ = ["ModelInputs", "to_inputs", "iterate_inputs"]


@dataclass
class ModelInputs:
    """Positional and keyword arguments of one model call on a batch of ``size`` samples."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    size: int

    def _items(self):
        yield from enumerate(self.args)
        yield from self.kwargs.items()

    def is_batched(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == self.size

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "ModelInputs":
        """Apply ``fn`` to every batched tensor (e.g. slicing, device moves)."""
        conv = lambda v: fn(v) if self.is_batched(v) else v  # noqa: E731
        return ModelInputs(tuple(conv(a) for a in self.args), {k: conv(v) for k, v in self.kwargs.items()}, self.size)

    def to(self, device: torch.device, float_dtype: Optional[torch.dtype] = None) -> "ModelInputs":
        """Move every tensor to ``device``; cast floating tensors to ``float_dtype`` if given."""

        def move(v):
            if not isinstance(v, torch.Tensor):
                return v
            if v.is_meta:
                raise ValueError("an input batch holds tensors on the meta device (no values): load the data onto "
                                 "a real device (cpu, cuda) before computing its eNTK")
            dtype = float_dtype if (float_dtype is not None and v.is_floating_point()) else v.dtype
            return v.to(device=device, dtype=dtype)

        return ModelInputs(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()}, self.size)

    def slice(self, start: int, stop: int) -> "ModelInputs":
        sliced = self.map(lambda v: v[start:stop])
        sliced.size = stop - start
        return sliced

    def signature(self) -> Tuple:
        """What must agree between two loaders for K(X1, X2) to make sense."""

        def sig(v):
            if isinstance(v, torch.Tensor):
                shape = tuple(v.shape[1:]) if self.is_batched(v) else ("unbatched",) + tuple(v.shape)
                return ("tensor", v.dtype, shape)
            return (type(v).__name__,)

        return (
            tuple(sig(a) for a in self.args),
            tuple(sorted((k, sig(v)) for k, v in self.kwargs.items())),
        )


def _batch_size(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> int:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise TypeError(
        "could not find a batched tensor in the batch: the model inputs must contain at least one "
        "tensor whose first dimension is the batch size (pass inputs=callable to map your batches)"
    )


def to_inputs(batch: Any, inputs: Optional[Callable[[Any], Any]] = None) -> ModelInputs:
    """Turn one loader batch into a :class:`ModelInputs`."""
    if inputs is not None:
        mapped = inputs(batch)
        if isinstance(mapped, dict):
            args, kwargs = (), dict(mapped)
        elif isinstance(mapped, (tuple, list)):
            args, kwargs = tuple(mapped), {}
        else:
            args, kwargs = (mapped,), {}
    elif isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    elif isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError("the loader yielded an empty tuple/list batch; its first element must be the input")
        args, kwargs = (batch[0],), {}
    elif isinstance(batch, dict):
        args, kwargs = (), {k: v for k, v in batch.items() if k != "labels"}
    else:
        raise TypeError(
            f"cannot read a model input from a batch of type {type(batch).__name__}: the loader must "
            "yield tensors, tuples/lists (input first) or dicts of keyword arguments; or pass "
            "inputs=callable mapping a batch to the model's input"
        )
    return ModelInputs(args, kwargs, _batch_size(args, kwargs))


def iterate_inputs(loader: Iterable, inputs: Optional[Callable[[Any], Any]] = None, name: str = "loader"):
    """Yield ModelInputs per batch; a loader that yields nothing is an error."""
    if isinstance(loader, torch.Tensor):
        # A bare tensor is one batch, not an iterable of samples.
        loader = [loader]
    try:
        iterator = iter(loader)
    except TypeError:
        raise TypeError(
            f"{name} must be iterable (a DataLoader, a list of batches or a tensor), got "
            f"{type(loader).__name__}"
        ) from None
    empty = True
    for batch in iterator:
        model_inputs = to_inputs(batch, inputs)
        if model_inputs.size == 0:
            continue
        empty = False
        yield model_inputs
    if empty:
        raise ValueError(f"{name} yielded no samples; it must yield at least one non-empty batch")


def loader_length(loader: Iterable) -> Optional[int]:
    """Number of samples if the loader can tell without being iterated, else None."""
    if isinstance(loader, torch.Tensor):
        return int(loader.shape[0]) if loader.dim() else None
    if isinstance(loader, (list, tuple)) and loader and all(isinstance(b, torch.Tensor) and b.dim() for b in loader):
        # A list of batches (as in the README): the stores reserve it at once instead of
        # growing by copies, and progress bars know their end.
        return sum(int(b.shape[0]) for b in loader)
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None
