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

import warnings

import torch
from torch.utils.data import DataLoader, IterableDataset

__all__ = ["LoadedOrder", "ModelInputs", "batch_count", "to_inputs", "iterate_inputs", "loader_length"]


@dataclass
class ModelInputs:
    """Positional and keyword arguments of one model call on a batch of ``size`` samples."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    size: int

    @classmethod
    def of(cls, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> "ModelInputs":
        """The call ``model(*args, **kwargs)``, its batch size read from its first batched tensor."""
        return cls(args, kwargs, _batch_size(args, kwargs))

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
            if v.is_inference():  # made under torch.inference_mode(): autograd could not save it
                with torch.inference_mode(False):
                    return v.to(device=device, dtype=dtype, copy=True)
            return v.to(device=device, dtype=dtype)

        return ModelInputs(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()}, self.size)

    def alone(self, row: int) -> "ModelInputs":
        """Sample ``row`` as a batch of two copies of itself: the sample evaluated alone
        (the definition of its gradient; take row 0's output), without a batch of one.

        A batch of one takes other kernels than any larger batch, and torch has had bugs
        only there (2.14.1's CPU BatchNorm eval backward at some strides was wrong for one
        sample). Two copies give the same output as one for every model that treats samples
        independently, and for batch statistics of the mean / variance / max kind too (the
        statistics of {x, x} are those of {x}, as functions of the weights)."""
        index = torch.tensor([row, row])
        pair = self.map(lambda v: v.index_select(0, index.to(v.device)))
        pair.size = 2
        return pair

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
    return ModelInputs.of(args, kwargs)


class LoadedOrder:
    """A DataLoader whose random order the caller accepts: K's rows follow the order of the
    pass that computed them, and ``indices`` (after it) names the dataset index of each row.

    ``tk.gram`` refuses a shuffling DataLoader by default: labels kept in dataset order no
    longer match K's rows, and a second pass (a cross kernel, a resume) comes in another
    order. ``tk.gram(model, tk.LoadedOrder(loader))`` says the order is wanted; every pass
    draws the order once, and ``indices`` is that order (a LongTensor [n]).
    """

    def __init__(self, loader):
        if not isinstance(loader, torch.utils.data.DataLoader) or loader.batch_sampler is None:
            raise TypeError("LoadedOrder wraps a torch.utils.data.DataLoader with a batch size (it reads the order "
                            f"from its sampler); got {type(loader).__name__}")
        self.loader = loader
        self.dataset = loader.dataset
        self.drop_last = loader.drop_last
        self.indices: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        from torch.utils.data import DataLoader

        # The order drawn once, kept, then loaded batch by batch in exactly that order.
        batches = [list(b) for b in self.loader.batch_sampler]
        self.indices = torch.tensor([i for b in batches for i in b], dtype=torch.int64)
        source = self.loader
        fixed = DataLoader(source.dataset, batch_sampler=batches, num_workers=source.num_workers,
                           collate_fn=source.collate_fn, pin_memory=source.pin_memory, timeout=source.timeout,
                           worker_init_fn=source.worker_init_fn, multiprocessing_context=source.multiprocessing_context,
                           persistent_workers=False)
        return iter(fixed)


def _random_sampler(loader) -> Optional[str]:
    """The name of a DataLoader's random sampler (shuffle=True and kin), or None."""
    from torch.utils.data import DataLoader, RandomSampler, SubsetRandomSampler, WeightedRandomSampler
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(loader, DataLoader):
        return None
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    for sampler in samplers:
        if isinstance(sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)) or (
                isinstance(sampler, DistributedSampler) and sampler.shuffle):
            return type(sampler).__name__
    return None


def check_loader_order(loader, name: str = "loader") -> None:
    """A loader whose order is random is refused (unless wrapped in LoadedOrder); one
    that drops samples is said aloud."""
    sampler = _random_sampler(loader)
    if sampler is not None:
        raise ValueError(
            f"{name} is a DataLoader with a {sampler} (shuffle=True): its order is random, so K's rows would come "
            "in an order nobody can recover (labels kept in dataset order no longer match them, and a second pass "
            "comes in another order). Pass a DataLoader with shuffle=False, or, to accept the order as loaded, "
            f"tk.LoadedOrder({name}): its .indices then give each row's dataset index"
        )
    dropped = _dropped_samples(loader)
    if dropped:
        warnings.warn(
            f"{name} drops its last {dropped} sample(s) (drop_last=True with a batch size that does not divide the "
            "data set): K has no rows for them. Use drop_last=False to include every sample",
            RuntimeWarning,
            stacklevel=4,
        )


def _dropped_samples(loader) -> int:
    if isinstance(loader, LoadedOrder):
        return _dropped_samples(loader.loader)
    if not getattr(loader, "drop_last", False) or getattr(loader, "batch_size", None) is None:
        return 0
    sampler = getattr(loader, "sampler", None)
    try:
        total = len(sampler) if sampler is not None else len(loader.dataset)
    except TypeError:
        return 0
    return total % loader.batch_size


def iterate_inputs(loader: Iterable, inputs: Optional[Callable[[Any], Any]] = None, name: str = "loader"):
    """Yield ModelInputs per batch; a loader that yields nothing is an error."""
    if isinstance(loader, torch.Tensor):
        # A bare tensor is one batch, not an iterable of samples.
        loader = [loader]
    check_loader_order(loader, name)
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
    if isinstance(loader, LoadedOrder):
        return loader_length(loader.loader)
    if isinstance(loader, (list, tuple)) and loader and all(isinstance(b, torch.Tensor) and b.dim() for b in loader):
        # A list of batches (as in the README): the stores reserve it at once instead of
        # growing by copies, and progress bars know their end.
        return sum(int(b.shape[0]) for b in loader)
    dataset = getattr(loader, "dataset", None)
    try:
        total = len(dataset) if dataset is not None else None
    except TypeError:
        return None
    sampler = getattr(loader, "sampler", None)
    if total is not None and sampler is not None and not isinstance(loader, LoadedOrder):
        try:
            total = len(sampler)  # a subset sampler yields fewer than the data set holds
        except TypeError:
            return None
    return None if total is None else total - _dropped_samples(loader)


def batch_count(loader: Iterable) -> Optional[int]:
    """The batches a loader will yield, where it tells reliably without being iterated (a
    tensor, a list or tuple of non-empty tensors, a DataLoader over a map-style data set);
    else None."""
    if isinstance(loader, torch.Tensor):
        return 1
    if isinstance(loader, (list, tuple)):
        fine = all(isinstance(b, torch.Tensor) and b.dim() and b.shape[0] for b in loader)
        return len(loader) if fine and loader else None
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        return len(loader)
    return None
