"""tk.Projection (sketched eNTKs): K~ = (G R)(G R)^T for R from the projection's own
generator, built here explicitly; unbiased over seeds; the same for every batch size and
slice size; bad arguments and unsupported combinations refused."""

import pytest
import torch

import tangent_kernels as tk
import tangent_kernels.sketch as sketch
from tangent_kernels.checkpoint import CheckpointMismatch
from tangent_kernels.params import resolve_idx

from _models import cnn, cnn_input, mlp
from conftest import batches

KINDS = ["gaussian", "rademacher"]


def explicit_r(projection: tk.Projection, index) -> torch.Tensor:
    """R [p, dim] in float64, whole: row j is the projection's row for idx[j]."""
    r = torch.zeros(len(index), projection.dim, dtype=torch.float64)
    for piece in index.tensor_slices:
        r[piece.columns] = projection.rows(piece.name, piece.local, torch.float64)
    return r


def assert_fp32_close(k, expected):
    # fp32 features and products: entries within a few 1e-6 of the scale of K~'s diagonal.
    scale = expected.diagonal().abs().max() if expected.shape[0] == expected.shape[1] else expected.abs().max()
    torch.testing.assert_close(k.double(), expected, rtol=1e-5, atol=1e-5 * float(scale))


@pytest.mark.parametrize("kind", KINDS)
def test_gram_is_the_explicit_sketch(kind):
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(7, 6)
    projection = tk.Projection(48, kind=kind, seed=5)
    g = tk.reference.features_autograd(model, [x])
    gr = g @ explicit_r(projection, resolve_idx(model, None))
    k = tk.gram(model, batches(x, 3), projection=projection, progress=False)
    assert k.shape == (7, 7) and k.dtype == torch.float32
    assert_fp32_close(k, gr @ gr.T)


def test_cnn_subsample_in_any_order_and_cross_kernel():
    # Conv, BatchNorm and linear paths; an idx in shuffled order (columns gathered, not sliced).
    torch.manual_seed(1)
    model, x1, x2 = cnn(), cnn_input(5), cnn_input(4)
    total = sum(p.numel() for p in model.parameters())
    idx = torch.randperm(total)[:300]
    index = resolve_idx(model, idx)
    projection = tk.Projection(40, kind="rademacher", seed=2)
    r = explicit_r(projection, index)
    g1 = tk.reference.features_autograd(model, [x1], idx) @ r
    g2 = tk.reference.features_autograd(model, [x2], idx) @ r
    k = tk.gram(model, batches(x1, 2), idx, batches(x2, 3), projection=projection, progress=False)
    assert_fp32_close(k, g1 @ g2.T)
    f = tk.features(model, batches(x1, 2), idx, projection=projection, precision="fp64", progress=False)
    assert f.shape == (5, 40)
    torch.testing.assert_close(f, g1, rtol=1e-10, atol=1e-12)


def test_every_logit_projects_each_logit():
    torch.manual_seed(2)
    model, x = mlp(k=3), torch.randn(5, 6)
    projection = tk.Projection(24, seed=1)
    r = explicit_r(projection, resolve_idx(model, None))
    g = tk.reference.features_autograd(model, [x], output="full") @ r  # [n, k, dim]
    f = tk.features(model, batches(x, 2), output="full", projection=projection, precision="fp64", progress=False)
    assert f.shape == (5, 3, 24)
    torch.testing.assert_close(f, g, rtol=1e-10, atol=1e-12)
    k = tk.gram(model, batches(x, 2), output="trace", projection=projection, progress=False)
    assert_fp32_close(k, torch.einsum("iad,jad->ij", g, g))


def test_output_probes_and_16_bit_stores():
    # The probe outputs' features are projected like any logit's; a 16-bit mode rounds the
    # projected features [B, dim] once, as it rounds unprojected ones.
    torch.manual_seed(7)
    model, x = mlp(k=4), torch.randn(6, 6)
    projection, probes = tk.Projection(20, seed=4), tk.OutputProbes(3, seed=1)
    f = tk.features(model, batches(x, 4), output=probes, projection=projection, precision="fp64", progress=False)
    assert f.shape == (6, 3, 20)
    k = tk.gram(model, batches(x, 4), output=probes, projection=projection, progress=False)
    assert_fp32_close(k, torch.einsum("iad,jad->ij", f, f) / 3)
    exact = tk.gram(model, batches(x, 4), projection=projection, precision="fp64", progress=False)
    for precision in ("bf16", "fp16"):
        rounded = tk.gram(model, batches(x, 4), projection=projection, precision=precision, progress=False)
        scale = float(exact.diagonal().max())
        torch.testing.assert_close(rounded.double(), exact, rtol=0, atol=2e-2 * scale)


@pytest.mark.parametrize("kind", KINDS)
def test_unbiased_over_seeds(kind):
    # E[K~] = K: the mean over seeds within a few of its standard errors of the exact K, and
    # (Gaussian) the spread as docs/sketch.md says: Var K~_ij = (K_ii K_jj + K_ij^2) / dim.
    torch.manual_seed(3)
    model, x = mlp(), torch.randn(4, 6)
    index = resolve_idx(model, None)
    g = tk.reference.features_autograd(model, [x])
    k = g @ g.T
    dim, seeds = 16, 400
    draws = []
    for seed in range(seeds):
        gr = tk.Projection(dim, kind=kind, seed=seed).project(g, index)
        draws.append(gr @ gr.T)
    draws = torch.stack(draws)
    mean, se = draws.mean(0), draws.std(0) / seeds ** 0.5
    assert bool(((mean - k).abs() <= 4.5 * se + 1e-12).all()), ((mean - k) / se)
    if kind == "gaussian":
        d = k.diagonal()
        predicted = (d[:, None] * d[None, :] + k ** 2) / dim
        ratio = draws.var(0).sum() / predicted.sum()
        assert 0.8 < float(ratio) < 1.25, float(ratio)


def test_same_sketch_for_every_batch_size_and_slice(monkeypatch):
    torch.manual_seed(4)
    model, x = cnn(), cnn_input(7)
    projection = tk.Projection(32, seed=9)
    ks = [tk.gram(model, batches(x, b), projection=projection, precision="fp64", progress=False) for b in (1, 3, 7)]
    for k in ks[1:]:
        torch.testing.assert_close(k, ks[0], rtol=1e-12, atol=1e-12)
    # R itself is a function of (seed, tensor, position, column): the same rows whatever
    # slice they are generated in, so a smaller slice bound gives the same projection.
    local = torch.arange(1000)
    for kind in KINDS:
        p = tk.Projection(32, kind=kind, seed=9)
        whole = p.rows("0.weight", local)
        assert torch.equal(torch.cat([p.rows("0.weight", local[a:a + 7]) for a in range(0, 1000, 7)]), whole)
    monkeypatch.setattr(sketch, "_SLICE_ENTRIES", 64)
    small = tk.gram(model, batches(x, 3), projection=projection, precision="fp64", progress=False)
    torch.testing.assert_close(small, ks[0], rtol=1e-12, atol=1e-12)


def test_seeds_and_kinds_differ_and_rows_are_scaled():
    local = torch.arange(4096)
    a, b = tk.Projection(64, seed=0), tk.Projection(64, seed=1)
    assert not torch.equal(a.rows("w", local), b.rows("w", local))
    assert not torch.equal(a.rows("w", local), a.rows("v", local))
    signs = tk.Projection(64, kind="rademacher").rows("w", local)
    assert bool((signs.abs() == 1 / 8).all())
    assert abs(float((a.rows("w", local) ** 2).sum(1).mean()) - 1) < 0.02  # E[|row|^2] = 1


@pytest.mark.parametrize("bad, error, words", [
    (dict(dim=0), ValueError, "positive int"),
    (dict(dim=-3), ValueError, "positive int"),
    (dict(dim=2.0), ValueError, "positive int"),
    (dict(dim=True), ValueError, "positive int"),
    (dict(dim=8, kind="gauss"), ValueError, "'gaussian', 'rademacher'"),
    (dict(dim=37, kind="kronecker"), ValueError, "balanced factorization"),
    (dict(dim=8, seed="0"), TypeError, "seed must be an int"),
])
def test_bad_projection_arguments(bad, error, words):
    with pytest.raises(error, match=words):
        tk.Projection(**bad)


def test_refusals_name_the_fix():
    model, x = mlp(), torch.randn(3, 6)
    with pytest.raises(TypeError, match="tk.Projection"):
        tk.gram(model, [x], projection=16, progress=False)
    with pytest.raises(TypeError, match="tk.Projection"):
        tk.features(model, [x], projection="gaussian", progress=False)
    with pytest.raises(ValueError, match="structured='auto'"):
        tk.gram(model, [x], projection=tk.Projection(8), structured="always", progress=False)


def test_checkpoint_records_the_projection(tmp_path):
    torch.manual_seed(5)
    model, x = mlp(), torch.randn(6, 6)
    projection = tk.Projection(16, seed=3)
    first = tk.gram(model, batches(x, 2), projection=projection, checkpoint=tmp_path, progress=False)
    again = tk.gram(model, batches(x, 2), projection=tk.Projection(16, seed=3), checkpoint=tmp_path, progress=False)
    assert torch.equal(first, again)
    for other in (tk.Projection(16, seed=4), tk.Projection(8, seed=3), tk.Projection(16, "rademacher", 3), None):
        with pytest.raises(CheckpointMismatch, match="projection"):
            tk.gram(model, batches(x, 2), projection=other, checkpoint=tmp_path, progress=False)


def test_generator_is_pinned():
    # R is part of every sketch a user keeps (and of checkpoints: Projection.identity names
    # the generator's version): a change to the generator must be deliberate, with a new version.
    local = torch.tensor([0, 7])
    signs = tk.Projection(6, "rademacher", seed=0).rows("w", local, torch.float64) * 6 ** 0.5
    assert signs.tolist() == [[-1, -1, -1, 1, -1, 1], [-1, 1, -1, -1, 1, -1]]
    normals = tk.Projection(6, "gaussian", seed=0).rows("w", local, torch.float64) * 6 ** 0.5
    expected = torch.tensor([[0.385663247, -0.165355258, 1.262720875, 0.126036656, -0.972743535, 1.045790854],
                             [-0.380399041, 0.681774038, 0.425447214, 1.491270861, 0.262715158, 0.083807568]],
                            dtype=torch.float64)
    torch.testing.assert_close(normals, expected, rtol=0, atol=1e-8)
    assert "lowbias32-v1" in tk.Projection(6).identity


@pytest.mark.gpu
def test_same_projection_on_cuda():
    # R is integer arithmetic up to its last step: Rademacher signs bit for bit, Gaussian
    # entries to the last bits of the device's log, sqrt, cos and sin.
    local = torch.arange(5000)
    for kind in KINDS:
        p = tk.Projection(96, kind=kind, seed=11)
        cpu, gpu = p.rows("a.weight", local), p.rows("a.weight", local, device="cuda").cpu()
        if kind == "rademacher":
            assert torch.equal(cpu, gpu)
        else:
            torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-6)
    torch.manual_seed(6)
    model, x = mlp(), torch.randn(6, 6)
    projection = tk.Projection(32, seed=3)
    k_cpu = tk.gram(model, batches(x, 4), projection=projection, precision="fp64", progress=False)
    k_gpu = tk.gram(model.cuda(), batches(x.cuda(), 4), projection=projection, precision="fp64", progress=False)
    torch.testing.assert_close(k_gpu.cpu(), k_cpu, rtol=1e-6, atol=1e-9)
