"""The check every batched-pass test makes: K against the float64 per-sample reference,
for each backend, in fp64 and fp32, over a loader of two batches, and which tensors went
down the generic path."""

import warnings

import torch

import tangent_kernels as tk
from tangent_kernels._model import eval_mode
from tangent_kernels.data import to_inputs
from tangent_kernels.persample.extractor import FeatureExtractor
from conftest import rel_err

# Backends of the sampled-gradient contractions that run here; Triton through its
# interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU); the C++
# kernels whenever the extension is built with them (CI builds it).
CPP = ["cpp"] if tk.ops.has_sampled_kernels("cpu") else []
BACKENDS = ["torch", "triton"] + CPP


def _cast(batch, dtype):
    if isinstance(batch, dict):
        return {k: _cast(v, dtype) for k, v in batch.items()}
    return batch.to(dtype) if isinstance(batch, torch.Tensor) and batch.is_floating_point() else batch


def split(batch, at: int):
    """Two loader batches: samples [0, at) and [at, n) of ``batch`` (a tensor or a dict)."""
    if isinstance(batch, dict):
        size = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
        pieces = [{k: (v[s] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size else v)
                   for k, v in batch.items()} for s in (slice(0, at), slice(at, None))]
        return pieces
    return [batch[:at], batch[at:]]


def extractor_after_one_batch(model, batch, idx=None, dtype=torch.float64):
    """The feature extractor after the first batch (a verification fallback is an error)."""
    index = tk.params.resolve_idx(model, idx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generic path's notes: asserted where they are the point
        warnings.filterwarnings("error", message="per-sample gradients from the batched pass")
        extractor = FeatureExtractor(model, index, "first", dtype, torch.device("cpu"))
        with eval_mode(model):
            extractor(to_inputs(_cast(batch, dtype)))
    return extractor


def generic_after_one_batch(model, batch, idx=None):
    """Names of the parameter tensors that went down the generic path."""
    return {piece.name for piece in extractor_after_one_batch(model, batch, idx).generic_slices}


def check(model, batch, idx=None, generic=frozenset(), output="first", backends=BACKENDS, at=None, fp32_tol=1e-5):
    torch.manual_seed(0)
    assert generic_after_one_batch(model, batch, idx) == set(generic)
    ref = tk.reference.gram_autograd(model, [batch], idx, output=output)
    size = ref.shape[0]
    halves = split(batch, size // 2 if at is None else at)
    for backend in backends:
        k = tk.gram(model, halves, idx, precision="fp64", output=output, progress=False, backend=backend)
        assert rel_err(k, ref) <= 1e-10, backend
    # fp32: rounding of the forward/backward and of the fp32 accumulation (Triton accumulates
    # fp32 inputs in fp32); 1e-5 leaves two orders of magnitude of margin on these models.
    for backend in backends:
        k = tk.gram(model, halves, idx, output=output, progress=False, backend=backend)
        assert rel_err(k, ref) <= fp32_tol, backend
    return ref
