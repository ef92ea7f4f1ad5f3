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

Tasks: TRAK's ``ImageClassificationModelOutput`` (and its iterative twin) and
``TextClassificationModelOutput``; any other model output that is a function of the
logits and one per-sample tensor of the batch is served by a subclass overriding
``model_inputs``, ``labels`` and ``model_output``. Other tasks (CLIP's) raise
NotImplementedError naming that route.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

from .._model import eval_mode
from ..outputs import logits_of
from ..params import ParamIndex, ParamLayout, resolve_idx
from ._extract import BatchFeatures, index_on

try:  # TRAK's interface when it is installed; the adapter's contract is the same without it
    from trak.gradient_computers import AbstractGradientComputer as _GradientBase
    from trak.projectors import AbstractProjector as _ProjectorBase
except ImportError:  # pragma: no cover - traker is in the project's test tools
    _GradientBase = _ProjectorBase = object

__all__ = ["GradientComputer", "SubsampleProjector"]


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
