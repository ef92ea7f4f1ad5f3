"""Evaluating a model without disturbing it.

Every gradient tangent_kernels takes goes through ``torch.func.functional_call`` on
detached copies of the parameters and buffers, in eval mode: the user's module keeps
its mode, its parameters, its buffers and its ``.grad`` exactly as they were.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .params import ParamLayout
from .precisions import fp32_math, matmul_allows_tf32  # noqa: F401 - their home is precisions.py; kept importable here

__all__ = ["RandomForwardError", "check_device", "check_parameter_aliases", "eval_mode", "evaluate", "fp32_math",
           "functional_state", "gradients_on", "matmul_allows_tf32", "model_device", "module_attributes_kept",
           "substituted"]

# nn.Module's own bookkeeping, which functional_call and hooks manage themselves.
_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules", "training", "_non_persistent_buffers_set"})


@contextmanager
def module_attributes_kept(model: nn.Module):
    """Every module's plain attributes as they were, after each evaluation of the model.

    Some models cache tensors computed from their parameters in a plain attribute during
    an eval-mode forward (timm's LeViT keeps ``attention_biases[:, idxs]`` in a dict). With
    the parameters swapped for the per-sample computation, such a cache would hold the
    swapped tensors: stale values and autograd graphs for every later evaluation, and a
    changed model for the caller. So attributes added are removed, attributes rebound are
    set back, and dicts, lists and sets are given back their contents.
    """
    saved = []
    for module in model.modules():
        state = {}
        for key, value in vars(module).items():
            if key in _MODULE_INTERNALS or key.startswith("_forward") or key.startswith("_backward") \
                    or key.endswith("hooks"):
                continue
            contents = dict(value) if isinstance(value, dict) else list(value) if isinstance(value, (list, set)) else None
            state[key] = (value, contents)
        saved.append((module, state))
    try:
        yield
    finally:
        for module, state in saved:
            attributes = vars(module)
            for key in [k for k in attributes if k not in state and not (
                    k in _MODULE_INTERNALS or k.startswith("_forward") or k.startswith("_backward") or k.endswith("hooks"))]:
                del attributes[key]
            for key, (value, contents) in state.items():
                if attributes.get(key) is not value:
                    attributes[key] = value
                if contents is None or _same_contents(value, contents):
                    continue
                if isinstance(value, dict):
                    value.clear()
                    value.update(contents)
                elif isinstance(value, list):
                    value[:] = contents
                else:
                    value.clear()
                    value.update(contents)


class RandomForwardError(ValueError):
    """The model draws random numbers in its forward: no eNTK is defined."""


def _generator_states(devices) -> list:
    states = [torch.get_rng_state()]
    for device in devices:
        states.append(torch.cuda.get_rng_state(device))
    return states


def _cuda_devices(values) -> list:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return sorted({v.device for v in values if isinstance(v, torch.Tensor) and v.device.type == "cuda"},
                  key=str)


@contextmanager
def random_draws_refused(tensors=()):
    """Torch's global generators (CPU, and CUDA on the devices of ``tensors``) as they
    were, and an error if the code inside drew from them.

    Every evaluation of the user's model runs inside: a forward that draws random numbers
    (``F.dropout(x, training=True)``, ``torch.rand``, a noise layer) has no eNTK (two calls
    would give two kernels), and, drawn or not, the caller's random stream must not move
    because the library evaluated the model. Comparing the generators' states before and
    after is exact for every draw from them and costs a copy of a few kB.
    """
    devices = _cuda_devices(tensors)
    before = _generator_states(devices)
    try:
        yield
    finally:
        after = _generator_states(devices)
        drew = any(not torch.equal(a, b) for a, b in zip(before, after))
        if drew:
            torch.set_rng_state(before[0])
            for device, state in zip(devices, before[1:]):
                torch.cuda.set_rng_state(state, device)
    if drew:
        raise RandomForwardError(
            "the model draws random numbers in its forward (e.g. F.dropout(x, training=True), torch.rand, "
            "randn_like noise), even in eval mode: its output is not a function of the weights, so it has no "
            "eNTK and two calls would give two kernels. Make the forward deterministic in eval mode: use "
            "nn.Dropout modules (model.eval() turns them off) or F.dropout(x, training=self.training)"
        )


class _Substituted(nn.Module):
    """Runs a function with the model's tensors swapped (torch.func.functional_call swaps
    them for the duration of a module's forward, and this forward is the function)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, run):
        return run()


def substituted(model: nn.Module, state, run: Callable[[], Any], tensors=()):
    """``run()`` with the model's parameters and buffers swapped for ``state``'s (a pair of
    dicts, ``functional_state``), every module's plain attributes kept
    (``module_attributes_kept``) and torch's random generators untouched
    (``random_draws_refused``, over the devices of ``tensors`` too).

    The swap lasts for all of ``run``, backward passes included: a model that recomputes
    part of its forward during the backward (``torch.utils.checkpoint``, as DenseNet's
    ``memory_efficient=True`` and timm's ``set_grad_checkpointing()`` do) must recompute it
    with the swapped tensors, or its gradients reach other tensors than the forward's.
    """
    from torch.func import functional_call

    prefixed = tuple({f"model.{name}": tensor for name, tensor in part.items()} for part in state)
    with module_attributes_kept(model), random_draws_refused([next(iter(state[0].values()), None), *tensors]):
        return functional_call(_Substituted(model), prefixed, (run,))


def _storage(t: torch.Tensor) -> Optional[int]:
    try:
        return t.untyped_storage().data_ptr() if t.numel() and not t.is_meta else None
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage
        return None


def _tensors_one_level(value):
    if isinstance(value, torch.Tensor):
        yield "", value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, torch.Tensor):
                yield f"[{i}]", item
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, torch.Tensor):
                yield f"[{key!r}]", item


def check_parameter_aliases(model: nn.Module) -> None:
    """Refuse a plain module attribute that shares memory with a parameter.

    Every evaluation substitutes the parameters (``functional_call``): a view of one kept
    in a plain attribute since construction (``self.e_t = self.e.weight.t()`` in
    ``__init__``) still holds the original tensor, so the gradient through it would be
    lost and K silently wrong. Checked by storage, in plain attributes and one level
    inside lists, tuples and dicts. A parameter object itself in a list is not refused
    here (``nn.LSTM`` keeps its weights in ``_flat_weights`` and refreshes that list in its
    forward); the batched pass refuses one that is used stale (persample.uses).
    """
    owners = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        storage = _storage(p)
        if storage is not None:
            owners.setdefault(storage, name)
    if not owners:
        return
    for module_name, module in model.named_modules(remove_duplicate=False):
        for key, value in vars(module).items():
            if key in _MODULE_INTERNALS or key.startswith("_forward") or key.startswith("_backward") \
                    or key.endswith("hooks") or key in ("_state_dict_hooks", "_load_state_dict_pre_hooks"):
                continue
            for suffix, t in _tensors_one_level(value):
                if isinstance(t, nn.Parameter):
                    continue
                owner = owners.get(_storage(t))
                if owner is None:
                    continue
                where = f"{module_name}.{key}" if module_name else key
                raise ValueError(
                    f"attribute {where}{suffix} of the model shares memory with parameter {owner!r} (a view of it "
                    f"kept since construction, e.g. self.{key} = <parameter>.t() in __init__): tangent_kernels "
                    "substitutes the parameters for every evaluation (torch.func.functional_call), so this "
                    "attribute would keep the original tensor and the gradient through it would be lost. Compute "
                    f"the view in forward (e.g. a property returning it, or <parameter>.t() where {key} is used)"
                )


def evaluate(model: nn.Module, state, args, kwargs):
    """The model's output on ``args``/``kwargs`` with its tensors swapped for ``state``'s
    (``substituted``): each evaluation sees the model as the caller left it, and leaves it,
    and the caller's random stream, that way."""
    return substituted(model, state, lambda: model(*args, **kwargs), [*args, *kwargs.values()])


@contextmanager
def gradients_on():
    """Autograd on for the duration, whatever the caller's mode: every eNTK is a gradient,
    and under ``torch.no_grad()`` or ``torch.inference_mode()`` the model's output would
    reach no parameter and every kernel would be zero."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _same_contents(value, contents) -> bool:
    """By identity: == on tensors is elementwise."""
    if isinstance(value, dict):
        return value.keys() == contents.keys() and all(value[k] is contents[k] for k in value)
    items = list(value)
    return len(items) == len(contents) and all(a is b for a, b in zip(items, contents))


@contextmanager
def eval_mode(model: nn.Module):
    """eval() for the duration, then every submodule's own training flag restored."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def check_device(device: Any, name: str = "device") -> Optional[torch.device]:
    """``device`` as a torch.device this machine has (None stays None). Torch's own errors
    come from deep inside the first ``.to()``, or from the driver, naming no argument."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device}: no CUDA device is available here "
                             "(torch.cuda.is_available() is False); use cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"{name} {device}: this machine has {count} CUDA device(s), cuda:0 .. cuda:{count - 1}")
    return resolved


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def functional_state(
    model: nn.Module, layout: ParamLayout, dtype: torch.dtype, device: Optional[torch.device]
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(trainable, rest): detached copies for ``functional_call``, floats cast to ``dtype``.

    ``trainable`` is keyed by the layout's names (tied parameters once, which
    functional_call's weight tying propagates to every alias); ``rest`` holds the
    frozen parameters and the buffers.

    Buffers are always copied (a model that updates one in its forward, a step counter
    or a cache, must not change the user's); parameters may share the user's memory (a
    model's size), and a forward that writes one in place is refused where it happens
    (persample.uses).
    """

    def copy(t: torch.Tensor) -> torch.Tensor:
        # A tensor made under torch.inference_mode() can never be saved for a backward.
        if t.is_inference():
            with torch.inference_mode(False):
                t = t.clone()
        t = t.detach()
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)

    trainable_names = set(layout.names)
    trainable, rest = {}, {}
    for name, p in model.named_parameters():
        (trainable if name in trainable_names else rest)[name] = copy(p)
    for name, b in model.named_buffers():
        buffer = copy(b)
        rest[name] = buffer.clone() if buffer.data_ptr() == b.data_ptr() and b.numel() else buffer
    return trainable, rest
