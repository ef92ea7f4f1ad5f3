"""fp32 means IEEE fp32 inside tangent_kernels, and the user's TF32 settings survive a call."""

import pytest
import torch
from torch import nn

import tangent_kernels as tk
from tangent_kernels._model import fp32_math


@pytest.fixture
def restore_precision_flags():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    yield matmul, conv
    matmul.fp32_precision, conv.fp32_precision = saved


def _small_gram():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return tk.gram(model, [torch.randn(5, 3)], progress=False)


def test_new_api_tf32_setting_is_ieee_inside_and_restored(restore_precision_flags):
    matmul, conv = restore_precision_flags
    matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"
    with fp32_math():
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    with fp32_math(allow_tf32=True):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        # oneDNN's reduced precision on CPU is never TF32 in our sense: stays IEEE
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    # A user who set the new flags: gram must not read the legacy flag (that raises)
    assert _small_gram().shape == (5, 5)
    assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")


def test_legacy_api_setting_stays_readable(restore_precision_flags):
    matmul, _ = restore_precision_flags
    matmul.allow_tf32 = True
    _small_gram()
    assert matmul.allow_tf32 is True
    matmul.allow_tf32 = False
    _small_gram()
    assert matmul.allow_tf32 is False
