"""Per-op microbenchmarks of the batched pass's new call sites, per backend:

    pytest bench/ --benchmark-only          (pytest-benchmark; not part of `make test`)

- a linear map over batch-major flattened rows ([B * T, I] @ W[I, O] in addmm: a Hugging
  Face Conv1D), sparsely and densely sampled;
- an embedding looked up with indices shared by the batch (position ids [1, T]);
- a parameter broadcast into data (x + pos_embedding; x * scale).
Each benchmark times one batched pass (forward, backward, contraction) of a one-op model
and first checks its features against the float64 per-sample reference.
"""

import pytest
import torch
from torch import nn

import tangent_kernels as tk
from tangent_kernels.data import to_inputs
from tangent_kernels.persample.extractor import FeatureExtractor

pytest.importorskip("pytest_benchmark")

BACKENDS = ["torch"] + (["cpp"] if tk.ops.has_sampled_kernels("cpu") else [])
B, T, D = 64, 64, 128


class FlatRows(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(D, 3 * D) / D**0.5), nn.Parameter(torch.zeros(3 * D))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, D), self.weight).reshape(x.shape[0], T, -1)[:, -1, 0]


class SharedPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.positions = nn.Embedding(T, D)

    def forward(self, x):
        return (x + self.positions(torch.arange(T)[None])).tanh().sum((1, 2))


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos, self.scale = nn.Parameter(torch.randn(1, T, D)), nn.Parameter(torch.rand(D))

    def forward(self, x):
        return ((x + self.pos) * self.scale).tanh().sum((1, 2))


def _one_op(model_class, fraction, backend):
    torch.manual_seed(0)
    model, x = model_class(), torch.randn(B, T, D)
    total = sum(p.numel() for p in model.parameters())
    idx = tk.subsample(model, max(1, int(total * fraction)), seed=0)
    index = tk.params.resolve_idx(model, idx)
    extractor = FeatureExtractor(model, index, "first", torch.float32, torch.device("cpu"), backend)
    batch = to_inputs(x)
    features = extractor(batch)  # the first batch plans and verifies
    small = x[:3]
    ref = tk.reference.gram_autograd(model, [small], idx)
    got = tk.gram(model, [small], idx, precision="fp64", backend=backend, progress=False)
    assert float((got - ref).norm() / ref.norm()) <= 1e-10
    assert features.shape == (B, len(index))
    return lambda: extractor(batch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fraction", [0.01, 0.25])
def test_flattened_rows_linear(benchmark, backend, fraction):
    benchmark(_one_op(FlatRows, fraction, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_index_embedding(benchmark, backend):
    benchmark(_one_op(SharedPositions, 0.25, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_parameters(benchmark, backend):
    benchmark(_one_op(Broadcast, 0.25, backend))
