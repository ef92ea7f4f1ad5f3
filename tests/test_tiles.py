"""The Gram phase's contract on K itself: finite, or a clear error naming the precision."""

import pytest
import torch
from torch import nn

import tangent_kernels as tk


class Loud(nn.Module):
    """An MLP whose output is multiplied by ``scale``: its per-sample gradients are ~scale
    (finite in float32 up to 3.4e38), K's entries ~scale^2 times the feature count."""

    def __init__(self, scale: float):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
        self.scale = scale

    def forward(self, x):
        return self.net(x) * self.scale


X = torch.randn(12, 5, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("cross", [False, True])
def test_a_K_that_overflows_its_dtype_is_refused_naming_the_fix(precision, cross):
    model = Loud(1e20)  # gradients ~1e20: finite; their products ~1e40: beyond float32
    features = tk.features(model, [X], precision="fp32", progress=False)
    assert torch.isfinite(features).all() and not torch.isfinite(features @ features.T).all()
    with pytest.raises(ValueError, match=r"K is not finite: rows 0\.\.11 hold inf or nan .* in float32 "
                                         r".*use precision='fp64'"):
        tk.gram(model, [X], loader2=[X[:7]] if cross else None, precision=precision, progress=False)


def test_fp64_holds_what_float32_cannot_and_overflows_only_past_float64():
    model = Loud(1e20)
    K = tk.gram(model, [X], precision="fp64", progress=False)
    reference = tk.reference.gram_autograd(model, [X])
    assert torch.isfinite(K).all() and float(K.abs().max()) > 1e39
    torch.testing.assert_close(K, reference, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match=r"K is not finite: .* in float64 .*scale the model's outputs down") as raised:
        tk.gram(Loud(1e160), [X], precision="fp64", progress=False)
    assert "precision='fp64'" not in str(raised.value)
