"""Per-layer choice between the sparse sampled-dot kernels and the dense GEMM strategy
(tangent_kernels/persample/dense.py, tuning.settings.dense_strategy), end to end through tk.gram.

Without a GPU the dense kernel runs through Triton's interpreter, forced with
dense_strategy = "always" (the "auto" policy measures only on CUDA); the GPU tests run
"auto" and check every layer's decision was measured.
"""

import logging

import pytest
import torch
from torch import nn

import tangent_kernels as tk
from tangent_kernels._model import eval_mode
from tangent_kernels.precisions import PRECISIONS
from tangent_kernels import kernels
from tangent_kernels.data import to_inputs
from tangent_kernels import tuning
from conftest import rel_err
from tangent_kernels.persample.extractor import FeatureExtractor
from _models import cnn, cnn_input, resnet18


def dense_model() -> nn.Module:
    # groups=1 convolutions of 1-3 spatial dims and linear layers with token dims take the
    # dense path; the grouped convolution and the biases stay sparse.
    return nn.Sequential(
        nn.Conv2d(3, 20, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(20, 18, (2, 3), dilation=(2, 1), padding="same", padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(18, 6, 3, groups=3), nn.Flatten(start_dim=2), nn.Linear(9, 24), nn.Tanh(),
        nn.Flatten(), nn.Linear(6 * 24, 3),
    )


def extractor_after_one_batch(model, x, idx, backend, precision=torch.float32):
    index = tk.params.resolve_idx(model, idx)
    extractor = FeatureExtractor(model, index, "first", precision, x.device, backend)
    with eval_mode(model):
        extractor(to_inputs(x.to(precision)))
    return extractor


def test_forced_dense_matches_the_reference(set_dense_strategy):
    if not kernels.available():
        pytest.skip(f"Triton cannot run here: {kernels.unavailable_reason()}")
    set_dense_strategy("always")
    torch.manual_seed(3)
    model, x = dense_model(), torch.randn(6, 3, 9, 9)
    idx = tk.subsample(model, 900, seed=1)
    ref = tk.reference.gram_autograd(model, [x], idx)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, x = model.to(device), x.to(device)
    k = tk.gram(model, [x[:4], x[4:]], idx, backend="triton", progress=False)
    # fp32 rounding in the model and the kernels (see test_taps.check): 1e-5.
    assert rel_err(k.cpu(), ref) <= 1e-5
    chosen = extractor_after_one_batch(model, x, idx, "triton").dense.strategy
    # Weights of groups=1 convolutions and linear maps are candidates; the grouped
    # convolution (4.weight) and the biases are not.
    assert chosen == {"0.weight conv #0": "dense", "2.weight conv #0": "dense", "6.weight linear #0": "dense",
                      "9.weight linear #0": "dense"}


def test_auto_stays_sparse_off_cuda():
    model, x = cnn(), cnn_input(4)
    chooser = extractor_after_one_batch(model, x, None, "torch").dense
    assert chooser.strategy == {} and chooser.measured == {}


@pytest.mark.parametrize("fault", ["raises", "wrong"])
def test_a_failing_or_wrong_dense_kernel_falls_back_to_sparse(monkeypatch, caplog, fault, set_dense_strategy):
    if not kernels.available():
        pytest.skip(f"Triton cannot run here: {kernels.unavailable_reason()}")
    set_dense_strategy("always")
    real = kernels.dense_conv_grad

    def broken(*args, **kwargs):
        if fault == "raises":
            raise RuntimeError("no kernel image for this device")
        return real(*args, **kwargs) * 1.01

    monkeypatch.setattr(kernels, "dense_conv_grad", broken)
    torch.manual_seed(4)
    model, x = dense_model(), torch.randn(4, 3, 9, 9)
    idx = tk.subsample(model, 500, seed=2)
    ref = tk.reference.gram_autograd(model, [x], idx)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with caplog.at_level(logging.WARNING, logger="tangent_kernels"):
        k = tk.gram(model.to(device), [x.to(device)], idx, backend="triton", progress=False)
    assert rel_err(k.cpu(), ref) <= 1e-5
    assert "using the sparse kernels" in caplog.text or "using sparse" in caplog.text


def test_unknown_policy_is_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"dense_strategy = 'sometimes'; use one of"):
        monkeypatch.setattr(tuning.settings, "dense_strategy", "sometimes")
    with pytest.raises(ValueError, match=r"dense_strategy = 'sometimes'; use one of"), tuning.tuned(dense_strategy="sometimes"):
        pass
    assert tuning.settings.dense_strategy == "auto"  # a refused value leaves the setting as it was


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_auto_measures_every_dense_candidate_on_cuda(precision):
    torch.manual_seed(5)
    model, x = resnet18(), torch.randn(8, 3, 32, 32)
    # Every parameter sampled: each layer's tiles are full, so "auto" times both strategies.
    idx = None
    ref = tk.reference.gram_autograd(model.double(), [x.double()], idx)
    model = model.float().cuda()
    k = tk.gram(model, [x[:4].cuda(), x[4:].cuda()], idx, precision=precision, backend="triton", progress=False)
    assert rel_err(k.cpu(), ref) <= (1e-5 if precision == "fp32" else 2e-2)
    with PRECISIONS[precision].math():
        chooser = extractor_after_one_batch(model, x.cuda(), idx, "triton").dense
    # Every groups=1 convolution and the linear head of resnet18: 20 + 1 weights.
    assert len(chooser.strategy) == 21 and set(chooser.measured) == set(chooser.strategy)
    assert all(" ms" in why for why in chooser.measured.values()), chooser.measured


@pytest.mark.gpu
def test_auto_skips_dense_where_its_tiles_are_mostly_unsampled():
    torch.manual_seed(6)
    model, x = resnet18().cuda(), torch.randn(4, 3, 32, 32, device="cuda")
    chooser = extractor_after_one_batch(model, x, tk.subsample(model, 20_000, seed=1), "triton").dense
    assert chooser.measured and all("not tried" in why for why in chooser.measured.values()), chooser.measured
    assert set(chooser.strategy.values()) == {"sparse"}
