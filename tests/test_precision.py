"""precision= modes against the float64 per-sample autograd reference.

Tolerances (relative Frobenius error of K). Every mode computes per-sample gradients in
fp32; the 16-bit modes round the stored features once (relative error <= u, the unit
roundoff) and the Gram sums their products in fp32, so K's error is about 2u times
sum_k |g_ik g_jk| / |K_ij|: a few u for the kernels here. Bounds are ~4-8u:
  bf16: u = 2**-8 (3.9e-3) -> 2e-2;   fp16: u = 2**-11 (4.9e-4) -> 4e-3;
  tf32: on CUDA, 10 mantissa bits in every matmul/convolution of the forward and
        backward passes as well (u = 2**-11, compounded over layers) -> 2e-2; on CPU it
        is fp32 arithmetic.
"""

import zlib

import pytest
import torch
from torch import nn

import tangent_kernels as tk
from tangent_kernels import tuning
from _models import TinyTransformer, cnn, cnn_input, mlp, resnet18

TOLERANCE = {"tf32": 2e-2, "bf16": 2e-2, "fp16": 4e-3}
STORE_DTYPE = {"tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def rel_err(k: torch.Tensor, ref: torch.Tensor) -> float:
    return float((k.double() - ref).norm() / ref.norm())


def _case(name):
    torch.manual_seed(zlib.crc32(name.encode()))
    if name == "mlp":
        return mlp(), torch.randn(9, 6), None
    if name == "cnn":
        return cnn(), cnn_input(8), None
    if name == "resnet18":
        model = resnet18()
        return model, torch.randn(4, 3, 32, 32), tk.subsample(model, 20_000, seed=5)
    if name == "transformer":
        return TinyTransformer(), torch.randn(6, 5, 16), None
    raise KeyError(name)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18", "transformer"])
@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_mixed_precision_gram_and_features_match_reference(name, precision):
    model, x, idx = _case(name)
    loader = [x[:5], x[5:]]
    ref = tk.reference.gram_autograd(model, loader, idx)
    k = tk.gram(model, loader, idx, precision=precision, progress=False)
    assert k.dtype == torch.float32 and k.shape == ref.shape
    assert torch.equal(k, k.T)
    assert rel_err(k, ref) <= TOLERANCE[precision]

    g = tk.features(model, loader, idx, precision=precision, progress=False)
    assert g.dtype == STORE_DTYPE[precision]
    g_ref = tk.reference.features_autograd(model, loader, idx)
    assert rel_err(g, g_ref) <= TOLERANCE[precision] / 2  # one rounding, no products


class Scaled(nn.Module):
    """A model whose gradients are scaled by ``factor``: outside fp16's range when large
    (max 65504) or small (subnormal below 6.1e-5, zero below 6e-8)."""

    def __init__(self, factor: float):
        super().__init__()
        self.body, self.factor = mlp(), factor

    def forward(self, x):
        return self.body(x) * self.factor


@pytest.mark.parametrize("factor", [1e7, 1e-9])
def test_fp16_gram_scales_each_sample_out_of_overflow_and_underflow(monkeypatch, factor):
    monkeypatch.setattr(tuning.settings, "tile_rows", 4)  # scales undone on tiles off the diagonal too
    torch.manual_seed(11)
    model, x = Scaled(factor), torch.randn(10, 6)
    ref = tk.reference.gram_autograd(model, [x])
    k = tk.gram(model, [x[:4], x[4:]], precision="fp16", progress=False)
    assert rel_err(k, ref) <= TOLERANCE["fp16"]
    cross = tk.gram(model, [x[:7]], None, [x[3:]], precision="fp16", progress=False)
    assert rel_err(cross, ref[:7, 3:]) <= TOLERANCE["fp16"]
    # Unscaled, the same features would be useless: inf, or mostly flushed to zero.
    g = tk.features(model, [x], precision="fp32", progress=False)
    naive = g.to(torch.float16).float()
    assert not bool(torch.isfinite(naive).all()) or rel_err(naive @ naive.T, ref) > 0.1


def test_fp16_features_that_overflow_raise_with_the_fix():
    torch.manual_seed(12)
    with pytest.raises(ValueError, match=r"exceeds fp16's range.*precision='bf16' or 'fp32'"):
        tk.features(Scaled(1e7), [torch.randn(3, 6)], precision="fp16", progress=False)


def test_bf16_features_are_the_fp32_features_rounded_once():
    torch.manual_seed(13)
    model, x = cnn(), cnn_input(5)
    g32 = tk.features(model, [x], precision="fp32", progress=False)
    g16 = tk.features(model, [x], precision="bf16", progress=False)
    assert torch.equal(g16, g32.to(torch.bfloat16))


def test_zero_gradient_rows_survive_fp16_scaling():
    # A sample whose gradient is exactly zero (ReLU dead everywhere) must give a zero
    # row and column of K, not nan from a 0 * inf scale.
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(0.0)
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0], [0.5, 0.1, 0.2]])
    k = tk.gram(model, [x], idx=torch.arange(0, 16), precision="fp16", progress=False)
    ref = tk.reference.gram_autograd(model, [x], torch.arange(0, 16))
    assert bool(torch.isfinite(k).all())
    assert torch.equal(k[1], torch.zeros(3)) and float(ref[1].abs().max()) == 0.0
    assert rel_err(k, ref) <= TOLERANCE["fp16"]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_16_bit_cross_kernel_is_within_2x_of_rounding_the_exact_features(name, precision):
    # flash-attention's yardstick: the engine's error at most twice that of the plain
    # way at the same precision (exact fp64 features rounded once to 16 bits, products
    # in fp64), plus fp32's share (gradients computed in fp32, u = 6e-8, a few hundred u
    # at most after a deep backward pass).
    model, x, idx = _case(name)
    loader, loader2 = [x[:3], x[3:5]], [x[5:]]
    ref = tk.reference.gram_autograd(model, loader, idx, loader2)
    k = tk.gram(model, loader, idx, loader2, precision=precision, progress=False)
    assert k.dtype == torch.float32 and k.shape == ref.shape
    g1 = tk.reference.features_autograd(model, loader, idx).to(STORE_DTYPE[precision]).double()
    g2 = tk.reference.features_autograd(model, loader2, idx).to(STORE_DTYPE[precision]).double()
    plain = rel_err(g1 @ g2.T, ref)
    assert plain > 0  # the rounding is visible: the comparison below means something
    assert rel_err(k, ref) <= 2 * plain + 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_tf32_on_cuda_keeps_the_batched_pass(backend, recwarn):
    """TF32 roundings differ between a batch and a single sample; the verification must
    not mistake that for samples interacting and fall back to the generic path (which on
    an H100 made tf32 resnet50 eight times slower than bf16)."""
    if backend == "cuda" and not tk.ops.has_sampled_kernels("cuda"):
        pytest.skip("the extension was built without its CUDA kernels")
    torch.manual_seed(11)
    model = resnet18().cuda()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    idx = tk.subsample(model, 20_000, seed=3)
    ref = tk.reference.gram_autograd(model.double().cpu(), [x.double().cpu()], idx)
    model.float()
    k = tk.gram(model.cuda(), [x[:8], x[8:]], idx, precision="tf32", backend=backend, progress=False)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in recwarn]
    assert rel_err(k.cpu(), ref) < TOLERANCE["tf32"]
