"""A gradient computer for TRAK (``traker``) on tangent_kernels' fused per-sample path.

Before::

    from trak import TRAKer
    traker = TRAKer(model=model, task="image_classification", train_set_size=n)

After::

    from trak import TRAKer
    from tangent_kernels.compat.trak import GradientComputer
    traker = TRAKer(model=model, task="image_classification", train_set_size=n,
                    gradient_computer=GradientComputer)

``GradientComputer`` implements TRAK's ``AbstractGradientComputer`` (``load_model_params``,
``compute_per_sample_grad(batch)``, ``compute_loss_grad(batch)``) and is constructed by
``TRAKer`` with the same keywords as TRAK's ``FunctionalGradientComputer``. Per-sample
gradients of TRAK's model output function come from one batched forward and one batched
backward per batch: the adapter differentiates the task's per-sample output (for the
classification tasks the margin ``f_y - logsumexp_{a != y} f_a``) computed from the
logits inside the forward, with the labels passed along as a batched input, so that
every sample's gradient is its own. Over every parameter (or ``grad_wrt``'s) the result is a dict
``{name: [B, *shape]}`` like ``FunctionalGradientComputer``'s, so every TRAK projector
takes it. ``compute_loss_grad`` is the task's own ``get_out_to_loss_grad``.

A parameter subsample (``GradientComputer.subsampled(idx)``) gives ``[B, p]`` tensors of
the sampled coordinates instead; TRAK's projector must then be built for ``grad_dim=p``.
Two ways, see docs/compat.md: project the subsample (``BasicProjector(grad_dim=p, ...)``),
or use the subsample *as* the projection (``SubsampleProjector(idx, model)``): a uniform
coordinate sample scaled by sqrt(P) has the second moment of TRAK's Rademacher/Gaussian
projection to ``proj_dim = p`` (E[R R^T] = p I for both), so after TRAKer's division by
sqrt(P) the features are ``g[idx]`` and E<phi, phi'> = (p / P) <g, g'> as in TRAK.

``SketchProjector`` is a TRAK projector (``AbstractProjector``) backed by
``tk.Projection``: R generated on the fly from a counter-based hash, in slices, never
[grad_dim, proj_dim] and no CUDA extension (TRAK's ``fast_jl``) needed, scaled like TRAK's
projectors (entries of unit variance, E[R R^T] = proj_dim I), deterministic per
(seed, model_id) on every device::

    TRAKer(..., projector=SketchProjector(grad_dim=P, proj_dim=4096, seed=0, proj_type="rademacher",
                                          device="cpu"))

Tasks: TRAK's ``ImageClassificationModelOutput`` (and its iterative twin) and
``TextClassificationModelOutput``; any other model output that is a function of the
logits and one per-sample tensor of the batch is served by a subclass overriding
``model_inputs``, ``labels`` and ``model_output``. Other tasks (CLIP's) raise
NotImplementedError naming that route.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

from .._model import eval_mode
from ..outputs import logits_of
from ..params import ParamIndex, ParamLayout, resolve_idx
from ..sketch import Projection
from ._extract import BatchFeatures, index_on

try:  # TRAK's interface when it is installed; the adapter's contract is the same without it
    from trak.gradient_computers import AbstractGradientComputer as _GradientBase
    from trak.projectors import AbstractProjector as _ProjectorBase
except ImportError:  # pragma: no cover - traker is in the project's test tools
    _GradientBase = _ProjectorBase = object

__all__ = ["GradientComputer", "SketchProjector", "SubsampleProjector"]


class _Output(nn.Module):
    """model -> the task's per-sample output (TRAK's f(z, theta)), labels passed as a
    batched input so that every sample keeps its own."""

    def __init__(self, model: nn.Module, output):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, *args, tk_labels: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.output(logits_of(self.model(*args, **kwargs), tk_labels.shape[0]), tk_labels)


def _task_name(task) -> str:
    return type(task).__name__


class GradientComputer(_GradientBase):
    """TRAK's gradient computer, with the keywords ``TRAKer`` passes to it.

    ``idx`` (None: every trainable parameter, or ``grad_wrt``'s) is a tk.ParamIndex or
    global flat positions of ``model``; ``backend`` is tk.features'. Gradients are
    computed in float32 (float64 for a float64 model) and returned in that dtype; TRAK
    rounds them to its own ``dtype`` when it stores them.
    """

    def __init__(self, model: nn.Module, task, grad_dim: Optional[int] = None, dtype: torch.dtype = torch.float16,
                 device="cuda", grad_wrt: Optional[Iterable[str]] = None, *, idx=None, backend: str = "auto"):
        # TRAK's base __init__ only stores these attributes; set them here so the class
        # is the same with or without traker installed.
        self.model, self.modelout_fn, self.grad_dim, self.dtype, self.device = model, task, grad_dim, dtype, device
        self.grad_wrt = list(grad_wrt) if grad_wrt is not None else None
        self.backend = backend
        self._check_task(task)
        self.index, self.names = self._resolve(model, idx, self.grad_wrt)
        if grad_dim is not None and idx is None and grad_dim != len(self.index):
            raise ValueError(
                f"grad_dim={grad_dim} but the gradient has {len(self.index)} entries: TRAK counts every parameter, "
                "frozen ones too, while tangent_kernels differentiates the trainable ones; pass TRAKer "
                "grad_wrt=[names of the trainable parameters] (or unfreeze the frozen ones)"
            )
        self.load_model_params(model)

    @classmethod
    def subsampled(cls, idx, **kwargs):
        """A constructor for ``TRAKer(gradient_computer=...)`` that returns the sampled
        coordinates ``g[idx]`` ([B, p]); build TRAKer's projector for ``grad_dim=len(idx)``."""
        return functools.partial(cls, idx=idx, **kwargs)

    # --- the interface --------------------------------------------------------------

    def load_model_params(self, model: nn.Module) -> None:
        """Read ``model``'s current parameters (TRAKer calls this after loading each
        checkpoint); the per-batch extractor is rebuilt from them."""
        if ParamLayout.of(model) != self.index.layout:
            raise ValueError("load_model_params got a model whose trainable parameters differ (names or shapes) from "
                             "the one this gradient computer was built for: build a new GradientComputer for it")
        self.model = model
        self.func_weights = dict(model.named_parameters())
        self.func_buffers = dict(model.named_buffers())
        wrapped = _Output(model, self.model_output)
        self._features = BatchFeatures(wrapped, index_on(wrapped, self.index.positions), "first",
                                       backend=self.backend)

    def compute_per_sample_grad(self, batch: Sequence[torch.Tensor]):
        """Per-sample gradients of the task's output: ``{name: [B, *shape]}`` over whole
        tensors, ``[B, p]`` for a subsample."""
        args, kwargs = self.model_inputs(batch)
        labels = self.labels(batch)
        grads = self._features(args=args, kwargs={**kwargs, "tk_labels": labels})
        return grads if self.names is None else self._as_dict(grads)

    def compute_loss_grad(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """The out-to-loss gradient (TRAK's Q), [B, 1]: the task's own."""
        with torch.no_grad(), eval_mode(self.model):
            return self.modelout_fn.get_out_to_loss_grad(self.model, self.func_weights, self.func_buffers, batch)

    # --- what a task means, for the fused path ---------------------------------------

    def model_inputs(self, batch: Sequence[torch.Tensor]) -> Tuple[Tuple, Dict[str, Any]]:
        """The model call's (args, kwargs) for a TRAK batch of this task."""
        if _task_name(self.modelout_fn) == "TextClassificationModelOutput":
            input_ids, token_type_ids, attention_mask = batch[:3]
            return (), {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
        return (batch[0],), {}

    def labels(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """The per-sample tensor ``model_output`` reads besides the logits: TRAK's labels."""
        labels = batch[-1]
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(f"the batch's labels have shape {tuple(labels.shape)} and dtype {labels.dtype}; TRAK's "
                             "classification tasks take one integer class index per sample, shape [B]")
        return labels

    def model_output(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The per-sample output [B] TRAK differentiates, as a function of the logits:
        its margin f_y - logsumexp_{a != y} f_a."""
        correct = logits.gather(1, labels.long()[:, None])[:, 0]
        others = logits.masked_fill(torch.nn.functional.one_hot(labels.long(), logits.shape[1]).bool(), float("-inf"))
        return correct - others.logsumexp(dim=1)

    # --- internals ------------------------------------------------------------------

    _FUSED = ("ImageClassificationModelOutput", "IterativeImageClassificationModelOutput",
              "TextClassificationModelOutput")

    def _check_task(self, task) -> None:
        overridden = type(self).model_output is not GradientComputer.model_output
        if isinstance(task, str):
            raise TypeError(f"task={task!r}: pass TRAKer the task (it turns a name into a model output object "
                            "before constructing the gradient computer), or an AbstractModelOutput instance")
        if not overridden and _task_name(task) not in self._FUSED:
            raise NotImplementedError(
                f"task {_task_name(task)}: the fused path knows TRAK's classification margins "
                f"({', '.join(self._FUSED)}). For another model output that is a function of the logits, "
                "subclass GradientComputer and override model_inputs(batch), labels(batch) and "
                "model_output(logits, labels); "
                "otherwise use TRAK's FunctionalGradientComputer"
            )

    @staticmethod
    def _resolve(model: nn.Module, idx, grad_wrt) -> Tuple[ParamIndex, Optional[list]]:
        """The index, and the tensor names when it covers whole tensors (dict output)."""
        if idx is not None:
            if grad_wrt is not None:
                raise ValueError("pass either idx (a parameter subsample) or grad_wrt (whole tensors), not both")
            return resolve_idx(model, idx), None
        every = ParamIndex.all(model)
        if grad_wrt is None:
            return every, list(every.layout.names)
        names = list(every.layout.names)
        missing = [name for name in grad_wrt if name not in names]
        if missing:
            raise ValueError(f"grad_wrt names {missing[:5]}, which are not trainable parameters of the model "
                             f"(those are e.g. {names[:5]}); tangent_kernels differentiates trainable parameters")
        wanted = set(grad_wrt)
        offsets = every.layout.offsets
        positions = torch.cat([torch.arange(int(offsets[t]), int(offsets[t + 1]), dtype=torch.int64)
                               for t, name in enumerate(names) if name in wanted])
        return ParamIndex(every.layout, positions), [name for name in names if name in wanted]

    def _as_dict(self, grads: torch.Tensor) -> Dict[str, torch.Tensor]:
        shapes = dict(zip(self.index.layout.names, self.index.layout.shapes))
        out, start = {}, 0
        for name in self.names:
            numel = math.prod(shapes[name])
            out[name] = grads[:, start:start + numel].reshape(grads.shape[0], *shapes[name])
            start += numel
        return out


class SubsampleProjector(_ProjectorBase):
    """A TRAK projector that *is* the subsample: ``project(g[idx]) = sqrt(P) g[idx]``, so
    that TRAKer's division by sqrt(P) leaves ``g[idx]`` (module docstring). Pass it as
    ``TRAKer(projector=SubsampleProjector(idx, model), gradient_computer=GradientComputer.subsampled(idx))``."""

    def __init__(self, idx, model: nn.Module, device="cpu"):
        index = resolve_idx(model, idx)
        self.grad_dim = self.proj_dim = len(index)
        self.seed, self.proj_type, self.device = 0, "subsample", device
        self.scale = math.sqrt(index.layout.total)

    def project(self, grads, model_id: int) -> torch.Tensor:
        if isinstance(grads, dict) or grads.shape[1] != self.proj_dim:
            raise ValueError(f"SubsampleProjector takes the [B, {self.proj_dim}] sampled gradients of "
                             "GradientComputer.subsampled(idx) with the same idx")
        return grads * self.scale

    def free_memory(self) -> None:
        pass


# TRAK's proj_type values (its ProjectionType is a str enum) -> tk.Projection's kinds.
_KINDS = {"normal": "gaussian", "gaussian": "gaussian", "rademacher": "rademacher"}


class SketchProjector(_ProjectorBase):
    """TRAK's projector interface on ``tk.Projection``: ``project(grads, model_id)``
    returns ``sqrt(proj_dim) * g @ R`` with R the ``tk.Projection(proj_dim, kind,
    seed=...)`` of this (seed, model_id) (``self.projection(model_id)``), whose entries
    have variance 1/proj_dim: the entries of ``sqrt(proj_dim) R`` are N(0, 1) or +-1, as
    in TRAK's BasicProjector and CudaProjector (E[R R^T] = proj_dim I), so TRAKer's
    division by sqrt(grad_dim) gives features of the same scale as TRAK's own and
    E<phi, phi'> = (proj_dim / grad_dim) <g, g'>.

    ``grads`` is TRAK's dict ``{name: [B, *shape]}`` (a row of R belongs to a tensor's
    name and a position in it, so each tensor is projected as it is, never concatenated
    into [B, grad_dim]), or a [B, grad_dim] tensor: its columns are ``index``'s (a
    tk.ParamIndex, e.g. the ``idx`` of ``GradientComputer.subsampled(idx)``: R's rows are
    then those of the full model's R at the sampled positions), or without ``index`` one
    tensor named ``"grads"``. ``block_size`` and ``max_batch_size`` (TRAK's projectors'
    keywords) are accepted and unused: R is generated in slices of at most 2**21 entries.
    """

    def __init__(self, grad_dim: int, proj_dim: int, seed: int = 0, proj_type="rademacher", device="cpu",
                 dtype: torch.dtype = torch.float32, model_id: int = 0, *, index: Optional[ParamIndex] = None,
                 block_size: Optional[int] = None, max_batch_size: Optional[int] = None):
        kind = _KINDS.get(getattr(proj_type, "value", proj_type))
        if kind is None:
            raise ValueError(f"proj_type={proj_type!r}: SketchProjector takes TRAK's 'normal' (Gaussian, also "
                             f"'gaussian') or 'rademacher'")
        if index is not None and not isinstance(index, ParamIndex):
            raise TypeError(f"index must be a tk.ParamIndex (tk.subsample(model, p)), got {type(index).__name__}")
        if index is not None and len(index) != grad_dim:
            raise ValueError(f"index has {len(index)} columns but grad_dim={grad_dim}: build the projector for "
                             f"grad_dim=len(index)")
        Projection(proj_dim, kind, 0)  # checks proj_dim's value with tk.Projection's message
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.grad_dim, self.proj_dim, self.seed, self.proj_type = grad_dim, proj_dim, seed, proj_type
        self.device, self.dtype, self.model_id, self.kind, self.index = device, dtype, model_id, kind, index

    def projection(self, model_id: int) -> Projection:
        """The tk.Projection of this (seed, model_id): ``tk.features(model, loader,
        projection=...)`` times sqrt(proj_dim) is ``project`` of the same gradients. Its
        seed is a hash of both (TRAK adds 1e4 * model_id to the seed, so that seed 10000 of
        model 0 is seed 0 of model 1; a hash has no such collisions)."""
        digest = hashlib.sha256(f"tk.compat.trak:{self.seed}:{int(model_id)}".encode()).digest()
        return Projection(self.proj_dim, self.kind, int.from_bytes(digest[:8], "little") >> 1)

    def project(self, grads, model_id: int) -> torch.Tensor:
        """[B, proj_dim] in ``dtype``, on ``device``."""
        self.model_id = model_id
        projection = self.projection(model_id)
        if isinstance(grads, dict):
            # a generator: one tensor's index (8 bytes a parameter) alive at a time
            pieces = ((g.reshape(g.shape[0], -1), index) for g, index in zip(grads.values(), self._per_tensor(grads)))
        elif isinstance(grads, torch.Tensor) and grads.dim() == 2 and grads.shape[1] == self.grad_dim:
            pieces = [(grads, self.index if self.index is not None else self._one_tensor())]
        else:
            shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
            raise ValueError(f"SketchProjector(grad_dim={self.grad_dim}) takes a dict {{name: [B, *shape]}} or a "
                             f"[B, {self.grad_dim}] tensor, got {shape}")
        scale = math.sqrt(self.proj_dim)
        out = None
        for block, index in pieces:
            part = projection.project(block.detach().to(device=self.device, dtype=self.dtype), index)
            out = part if out is None else out.add_(part)
        return out.mul_(scale)

    def free_memory(self) -> None:
        """Nothing to free: R is never held (TRAKer calls this before finalizing)."""

    def _per_tensor(self, grads: Dict[str, torch.Tensor]):
        """A ParamIndex per tensor of the dict, checked against grad_dim."""
        total = sum(math.prod(g.shape[1:]) for g in grads.values())
        if total != self.grad_dim:
            raise ValueError(f"the gradients have {total} entries over {len(grads)} tensors but "
                             f"grad_dim={self.grad_dim}: build the projector for grad_dim={total}")
        return (_whole_tensor(name, tuple(g.shape[1:])) for name, g in grads.items())

    def _one_tensor(self) -> ParamIndex:
        return _whole_tensor("grads", (self.grad_dim,))


def _whole_tensor(name: str, shape: Tuple[int, ...]) -> ParamIndex:
    """The index of one whole tensor ``name`` (R's rows are keyed by its name and the
    positions in it), built as ParamIndex.all of a module holding only that parameter, on
    the meta device: its columns are views of one arange (8 bytes a parameter, made per
    call in milliseconds), where ParamIndex(layout, positions) splits the positions by
    tensor (24 bytes a parameter, 270 MB and 2.6 s for resnet18)."""
    *path, leaf = name.split(".")
    module = holder = nn.Module()
    for part in path:
        module.add_module(part, nn.Module())
        module = getattr(module, part)
    module.register_parameter(leaf, nn.Parameter(torch.empty(shape, device="meta")))
    return ParamIndex.all(holder)
