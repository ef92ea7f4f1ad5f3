"""tk.Projection(kind="kronecker"): a linear map's weight (linear, or convolution through
its unfolded patches) projected as R_out (x) R_in from its input and output-gradient
factors, every other tensor by the Gaussian kind's R. Checked against an explicit R built
here from the projection's factor rows; unbiased over seeds on linear and conv layers;
deterministic per seed and batch size; the same on every backend."""

import warnings

import pytest
import torch
from torch import nn

import tangent_kernels as tk
import tangent_kernels.sketch as sketch
from tangent_kernels.checkpoint import CheckpointMismatch
from tangent_kernels.data import iterate_inputs
from tangent_kernels.params import resolve_idx
from tangent_kernels.persample import FeatureExtractor


def loader(x, batch):
    return [x[i:i + batch] for i in range(0, len(x), batch)]


def conv_net(k: int = 3) -> nn.Module:
    # Two ungrouped convolutions (Kronecker-projected through their patches), a grouped one, a
    # BatchNorm and the biases (the Gaussian kind's R), two linear maps (one without bias).
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(),
        nn.Conv2d(5, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1, groups=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 7), nn.Tanh(), nn.Linear(7, k, bias=False),
    ).eval()


def conv_input(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8)


# The tensors this contract Kronecker-projects in conv_net.
CONV_NET_KRONECKER = {"0.weight", "2.weight", "8.weight", "10.weight"}


class Lookup(nn.Module):
    """An embedding (token ids: the Gaussian kind's R) feeding linear maps."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(9, 5)
        self.mix = nn.Linear(5, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids)).mean(1)))


def explicit_r(projection, model, kronecker, idx=None) -> torch.Tensor:
    """R [p, dim] in float64, whole, over ``idx``'s entries: the entry (o, i) of a weight in
    ``kronecker`` (its matrix [out, in], a convolution's [out, in * kernel]) has the row
    kron(R_out[o], R_in[i]); every other entry the Gaussian kind's row."""
    index = resolve_idx(model, idx)
    params = dict(model.named_parameters())
    r = torch.zeros(len(index), projection.dim, dtype=torch.float64)
    for piece in index.tensor_slices:
        if piece.name not in kronecker:
            r[piece.columns] = projection.rows(piece.name, piece.local, torch.float64)
            continue
        out_width = params[piece.name].shape[0]
        in_width = params[piece.name].numel() // out_width
        r_out = projection.factor_rows(piece.name, "out", torch.arange(out_width), torch.float64)
        r_in = projection.factor_rows(piece.name, "in", torch.arange(in_width), torch.float64)
        o, i = piece.local // in_width, piece.local % in_width
        r[piece.columns] = (r_out[o][:, :, None] * r_in[i][:, None, :]).reshape(len(piece.local), -1)
    return r


def assert_fp32_close(k, expected):
    scale = expected.diagonal().abs().max() if expected.shape[0] == expected.shape[1] else expected.abs().max()
    torch.testing.assert_close(k.double(), expected, rtol=1e-5, atol=1e-5 * float(scale))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_features_and_gram_are_the_explicit_kronecker_sketch(backend):
    torch.manual_seed(0)
    model, x1, x2 = conv_net(), conv_input(7), conv_input(4)
    projection = tk.Projection(48, kind="kronecker", seed=3)  # 6 x 8
    assert projection.factor_dims == (6, 8)
    r = explicit_r(projection, model, CONV_NET_KRONECKER)
    g1 = tk.reference.features_autograd(model, [x1]) @ r
    g2 = tk.reference.features_autograd(model, [x2]) @ r
    f = tk.features(model, loader(x1, 3), projection=projection, precision="fp64", backend=backend, progress=False)
    assert f.shape == (7, 48)
    torch.testing.assert_close(f, g1, rtol=1e-10, atol=1e-12)
    k = tk.gram(model, loader(x1, 3), projection=projection, backend=backend, progress=False)
    assert_fp32_close(k, g1 @ g1.T)
    cross = tk.gram(model, loader(x1, 3), None, loader(x2, 2), projection=projection, precision="fp64",
                    backend=backend, progress=False)
    torch.testing.assert_close(cross, g1 @ g2.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_rows_by_columns_subsample_takes_the_full_r_rows(backend):
    # A Kronecker subsample (rows x columns) of a weight stays Kronecker-projected, with the
    # full-parameter R's rows at its positions; a scattered subsample of another weight takes
    # the Gaussian kind's rows (through the backend's sampled-gradient kernels).
    torch.manual_seed(1)
    model, x = conv_net(), conv_input(5)
    layout = resolve_idx(model, None)
    offsets, at = {}, 0
    for name, p in model.named_parameters():
        offsets[name], at = at, at + p.numel()
    rows, cols = torch.tensor([0, 2, 5, 6]), torch.tensor([1, 4, 30, 35])
    chosen = [offsets["8.weight"] + (rows[:, None] * 36 + cols[None, :]).reshape(-1)]
    chosen.append(offsets["2.weight"] + torch.randperm(4 * 45)[:50])  # scattered: not rows x columns
    others = [torch.arange(offsets[n], offsets[n] + p.numel()) for n, p in model.named_parameters()
              if n not in ("8.weight", "8.bias", "2.weight", "2.bias")]
    idx = torch.cat(chosen + others)
    projection = tk.Projection(64, kind="kronecker", seed=4)
    kronecker = CONV_NET_KRONECKER - {"8.weight", "2.weight"}
    full = explicit_r(projection, model, kronecker | {"8.weight"})
    r = explicit_r(projection, model, kronecker, idx)
    # The subsample's rows of the Kronecker weight are the full R's rows at its positions.
    index = resolve_idx(model, idx)
    piece = next(s for s in index.tensor_slices if s.name == "8.weight")
    full_index = resolve_idx(model, None)
    whole = next(s for s in full_index.tensor_slices if s.name == "8.weight")
    r[piece.columns] = full[whole.columns[piece.local]]
    expected = tk.reference.features_autograd(model, [x], idx) @ r
    f = tk.features(model, loader(x, 2), idx, projection=projection, precision="fp64", backend=backend,
                    progress=False)
    torch.testing.assert_close(f, expected, rtol=1e-10, atol=1e-12)
    assert len(layout) > len(idx)


def test_every_logit_and_embeddings():
    torch.manual_seed(2)
    model, ids = Lookup(), torch.randint(0, 9, (6, 4))
    projection = tk.Projection(16, kind="kronecker", seed=1)
    r = explicit_r(projection, model, {"mix.weight", "head.weight"})
    g = tk.reference.features_autograd(model, [ids], output="full") @ r  # [n, k, dim]
    f = tk.features(model, loader(ids, 4), output="full", projection=projection, precision="fp64", progress=False)
    assert f.shape == (6, 2, 16)
    torch.testing.assert_close(f, g, rtol=1e-10, atol=1e-12)
    k = tk.gram(model, loader(ids, 4), output="trace", projection=projection, precision="fp64", progress=False)
    torch.testing.assert_close(k, torch.einsum("iad,jad->ij", g, g), rtol=1e-10, atol=1e-12)


def _sketches(model, x, dim, seeds):
    """The exact K and K~ for each seed, from one extraction (features and factors)."""
    index = resolve_idx(model, None)
    extractor = FeatureExtractor(model, index, "first", torch.float64, torch.device("cpu"), "torch",
                                 structured="products")
    batch = next(iter(iterate_inputs([x], None, "x"))).to("cpu", torch.float64)
    block, factors = extractor.extract(batch)
    choices = extractor.plan.choices
    g = tk.reference.features_autograd(model, [x])
    draws = []
    for seed in range(seeds):
        s = tk.Projection(dim, kind="kronecker", seed=seed).sketch(block, extractor.feature_index, factors, choices)
        draws.append(s @ s.T)
    return g @ g.T, torch.stack(draws), set(factors)


@pytest.mark.parametrize("layers", ["linear", "conv"])
def test_unbiased_over_seeds(layers):
    # E[K~] = K with R = R_out (x) R_in: E[R R^T] = E[R_out R_out^T] (x) E[R_in R_in^T] = I,
    # the two independent with unit-variance entries (scaled by 1/a and 1/b).
    torch.manual_seed(3)
    if layers == "linear":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 1)).double()
        x, projected = torch.randn(4, 6, dtype=torch.float64), {"0.weight", "2.weight", "4.weight"}
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2), nn.Tanh(),
                              nn.Flatten(), nn.Linear(2 * 2 * 2, 1, bias=False)).double()
        x, projected = torch.randn(4, 2, 6, 6, dtype=torch.float64), {"0.weight", "2.weight", "5.weight"}
    seeds = 400
    k, draws, factored = _sketches(model, x, 16, seeds)
    assert factored == projected  # the Kronecker path itself is under test
    mean, se = draws.mean(0), draws.std(0) / seeds ** 0.5
    assert bool(((mean - k).abs() <= 4.5 * se + 1e-12).all()), ((mean - k) / se)


def test_deterministic_per_seed_batch_size_and_chunk(monkeypatch):
    torch.manual_seed(4)
    model, x = conv_net(), conv_input(7)
    projection = tk.Projection(32, kind="kronecker", seed=9)
    ks = [tk.gram(model, loader(x, b), projection=projection, precision="fp64", progress=False) for b in (1, 3, 7)]
    for k in ks[1:]:
        torch.testing.assert_close(k, ks[0], rtol=1e-12, atol=1e-12)
    with monkeypatch.context() as patch, warnings.catch_warnings():
        # The factors formed and sketched a sample at a time: the same K, and the per-batch
        # check (on one row, kept from its chunk) passes on every batch.
        warnings.simplefilter("error")
        patch.setattr(sketch, "_SLICE_ENTRIES", 64)
        patch.setattr(sketch, "_FACTOR_ENTRIES", 64)
        small = tk.gram(model, loader(x, 7), projection=projection, precision="fp64", progress=False)
    torch.testing.assert_close(small, ks[0], rtol=1e-12, atol=1e-12)
    again = tk.gram(model, loader(x, 3), projection=tk.Projection(32, kind="kronecker", seed=9), precision="fp64",
                    progress=False)
    assert torch.equal(again, ks[1])
    other = tk.gram(model, loader(x, 3), projection=tk.Projection(32, kind="kronecker", seed=10), precision="fp64",
                    progress=False)
    assert not torch.allclose(other, ks[1])
    # The factor rows are functions of (seed, tensor, side, position): any slice, the same rows.
    local = torch.arange(50)
    rows = projection.factor_rows("0.weight", "in", local)
    assert torch.equal(torch.cat([projection.factor_rows("0.weight", "in", local[a:a + 7]) for a in range(0, 50, 7)]),
                       rows)
    assert not torch.equal(projection.factor_rows("0.weight", "out", local), rows[:, :4])


def test_checkpoint_and_kernel():
    torch.manual_seed(5)
    model, x = conv_net(), conv_input(6)
    projection = tk.Projection(16, kind="kronecker", seed=3)
    direct = tk.gram(model, loader(x, 2), projection=projection, precision="fp64", progress=False)
    kernel = tk.Kernel(model, precision="fp64", projection=projection)
    torch.testing.assert_close(kernel.gram(loader(x, 2), progress=False), direct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernel.gram(loader(x, 3), progress=False), direct, rtol=1e-12, atol=1e-12)
    f = kernel.features(loader(x, 2), progress=False)
    torch.testing.assert_close(f @ f.T, direct, rtol=1e-10, atol=1e-12)


def test_checkpoint_resumes_and_refuses_another_kind(tmp_path):
    torch.manual_seed(6)
    model, x = conv_net(), conv_input(6)
    projection = tk.Projection(16, kind="kronecker", seed=3)
    first = tk.gram(model, loader(x, 2), projection=projection, checkpoint=tmp_path, progress=False)
    again = tk.gram(model, loader(x, 2), projection=tk.Projection(16, "kronecker", 3), checkpoint=tmp_path,
                    progress=False)
    assert torch.equal(first, again)
    with pytest.raises(CheckpointMismatch, match="projection"):
        tk.gram(model, loader(x, 2), projection=tk.Projection(16, seed=3), checkpoint=tmp_path, progress=False)


@pytest.mark.parametrize("dim, words", [(1021, "balanced factorization"), (2 * 509, "splits no better than 2 x 509")])
def test_unbalanced_dims_refused(dim, words):
    with pytest.raises(ValueError, match=words):
        tk.Projection(dim, kind="kronecker")
    assert tk.Projection(dim).dim == dim  # the dense kinds take any dim


def test_factor_rows_side_named():
    with pytest.raises(ValueError, match="'in' or 'out'"):
        tk.Projection(16, kind="kronecker").factor_rows("w", "left", torch.arange(3))
    a = tk.Projection(2048, kind="kronecker").factor_rows("w", "out", torch.arange(4096))
    b = tk.Projection(2048, kind="kronecker").factor_rows("w", "in", torch.arange(4096))
    assert a.shape == (4096, 32) and b.shape == (4096, 64)
    assert abs(float((a ** 2).sum(1).mean()) - 1) < 0.02 and abs(float((b ** 2).sum(1).mean()) - 1) < 0.02


class Mixing(nn.Module):
    """Centres a hidden layer over the batch: samples interact, which the check must see."""

    def __init__(self):
        super().__init__()
        self.inner, self.out = nn.Linear(4, 6, bias=False), nn.Linear(6, 1, bias=False)  # only Kronecker tensors

    def forward(self, x):
        h = self.inner(x)
        return self.out(torch.tanh(h - h.mean(0, keepdim=True)))


def test_per_batch_check_sees_the_sketched_layers():
    # The factors are sketched in the pass; the check still rebuilds the checked row's
    # gradient from the factors kept for it, and catches a model that mixes samples.
    torch.manual_seed(7)
    model, x = Mixing(), torch.randn(6, 4)
    with pytest.warns(RuntimeWarning, match="mix samples"):
        tk.features(model, [x], projection=tk.Projection(16, kind="kronecker", seed=0), precision="fp64",
                    progress=False)


def test_out_of_memory_halves_keep_the_factors_sketch(monkeypatch):
    # A batch retried in halves (CUDA out of memory) joins the halves' sketches of the factors.
    torch.manual_seed(8)
    model, x = conv_net(), conv_input(6)
    projection = tk.Projection(16, kind="kronecker", seed=2)
    expected = tk.gram(model, loader(x, 6), projection=projection, precision="fp64", progress=False)
    original = FeatureExtractor.__call__

    def small_batches_only(self, batch):
        if batch.size > 2:
            raise torch.cuda.OutOfMemoryError("test: out of memory")
        return original(self, batch)

    monkeypatch.setattr(FeatureExtractor, "__call__", small_batches_only)
    k = tk.gram(model, loader(x, 6), projection=projection, precision="fp64", progress=False)
    torch.testing.assert_close(k, expected, rtol=1e-12, atol=1e-12)


def test_factor_generator_is_pinned_and_the_rest_is_the_gaussian_kind():
    # R_out and R_in are part of every Kronecker sketch a user keeps and of checkpoints
    # (Projection.identity names the generator's version): a change must be deliberate.
    p = tk.Projection(16, "kronecker", seed=0)
    assert p.factor_dims == (4, 4)
    out = p.factor_rows("w", "out", torch.tensor([0, 7]), torch.float64) * 4 ** 0.5
    expected = torch.tensor([[0.350016781, -0.026105992, 0.098121321, 0.093464251],
                             [0.225433224, -0.439709097, -1.420242999, -0.229706548]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-8)
    inputs = p.factor_rows("w", "in", torch.tensor([3]), torch.float64) * 4 ** 0.5
    torch.testing.assert_close(inputs, torch.tensor([[0.245996928, 0.541982326, -0.330558543, 0.390691016]],
                                                    dtype=torch.float64), rtol=0, atol=1e-8)
    # The tensors it does not Kronecker-project take exactly the Gaussian kind's rows.
    local = torch.arange(100)
    assert torch.equal(p.rows("0.bias", local), tk.Projection(16, "gaussian", seed=0).rows("0.bias", local))
