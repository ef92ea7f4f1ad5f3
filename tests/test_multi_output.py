"""Every logit: output="full" ([n1, n2, k, k]), "trace" ([n1, n2]) and "diagonal"
([n1, n2, k]) kernels, and features [n, k, p], against the float64 reference per output."""

import pytest
import torch
from torch import nn

import tangent_kernels as tk
from _models import TinyTransformer, cnn, cnn_input, mlp
from _persample_check import CPP, split
from test_uses import CustomFunction, MixesSamples
from conftest import rel_err


def reference(model, batch, idx, outputs):
    """[n, k, p]: the float64 per-sample gradients of each logit."""
    return torch.stack([tk.reference.features_autograd(model, [batch], idx, output=a) for a in range(outputs)], 1)


def kernels(r1, r2):
    full = torch.einsum("iap,jbp->ijab", r1, r2)
    return {"full": full, "trace": full.diagonal(dim1=2, dim2=3).sum(-1), "diagonal": full.diagonal(dim1=2, dim2=3)}


CASES = {
    "mlp": (lambda: mlp(3), lambda: torch.randn(7, 6), 3),
    "cnn": (lambda: cnn(4), lambda: cnn_input(5), 4),
    "transformer": (lambda: TinyTransformer(), lambda: torch.randn(5, 4, 16), 3),
}


@pytest.mark.parametrize("backend", ["torch"] + CPP)
@pytest.mark.parametrize("name", list(CASES))
def test_every_logit_matches_the_reference(name, backend):
    torch.manual_seed(0)
    make_model, make_x, k = CASES[name]
    model, x = make_model(), make_x()
    idx = tk.subsample(model, 200, seed=1)
    ref = reference(model, x, idx, k)
    expected = kernels(ref, ref)
    loader = split(x, 2)
    G = tk.features(model, loader, idx, output="full", precision="fp64", progress=False, backend=backend)
    assert G.shape == (x.shape[0], k, 200) and rel_err(G, ref) <= 1e-10
    for output in ("full", "trace", "diagonal"):
        K = tk.gram(model, loader, idx, output=output, precision="fp64", progress=False, backend=backend)
        assert K.shape == expected[output].shape
        assert rel_err(K, expected[output]) <= 1e-10, output
        # fp32: rounding of the forward/backward and the fp32 accumulation (test_persample's 1e-5).
        K32 = tk.gram(model, loader, idx, output=output, progress=False, backend=backend)
        assert rel_err(K32, expected[output]) <= 1e-5, output


def test_cross_kernels_and_exact_symmetry():
    torch.manual_seed(1)
    model, x1, x2 = mlp(3), torch.randn(6, 6), torch.randn(4, 6)
    r1, r2 = reference(model, x1, None, 3), reference(model, x2, None, 3)
    K = tk.gram(model, [x1], None, [x2[:3], x2[3:]], output="full", precision="fp64", progress=False)
    assert K.shape == (6, 4, 3, 3)
    assert float((K - kernels(r1, r2)["full"]).norm() / K.norm()) <= 1e-10
    S = tk.gram(model, [x1[:4], x1[4:]], output="full", progress=False)
    assert torch.equal(S, S.permute(1, 0, 3, 2))  # K[i, j, a, b] = K[j, i, b, a], bit for bit


def test_every_logit_on_the_generic_path():
    torch.manual_seed(2)
    model = CustomFunction()  # a parameter inside an autograd.Function: generic
    x = torch.randn(5, 4)
    ref = reference(model, x, None, 2)
    with pytest.warns(RuntimeWarning, match="generic per-sample path"):
        K = tk.gram(model, [x], output="full", precision="fp64", progress=False)
    assert float((K - kernels(ref, ref)["full"]).norm() / K.norm()) <= 1e-10


def test_a_model_that_mixes_samples_is_caught_for_every_logit():
    torch.manual_seed(3)
    model, x = MixesSamples(), torch.randn(6, 4)
    ref = reference(model, x, None, 3)
    with pytest.warns(RuntimeWarning, match="mix samples"):
        K = tk.gram(model, [x], output="diagonal", precision="fp64", progress=False)
    assert float((K - kernels(ref, ref)["diagonal"]).norm() / K.norm()) <= 1e-10


def test_resume_of_a_full_kernel_is_bit_identical(tmp_path):
    torch.manual_seed(4)
    model, loader = mlp(3), [torch.randn(5, 6) for _ in range(4)]

    class Stop(Exception):
        pass

    def stop(event):
        if event.phase == "features" and event.done == 10 and not event.resumed:
            raise Stop

    with pytest.raises(Stop):
        tk.gram(model, loader, output="full", checkpoint=tmp_path, callback=stop, progress=False)
    events = []
    K = tk.gram(model, loader, output="full", checkpoint=tmp_path, callback=events.append, progress=False)
    assert sum(e.resumed for e in events if e.phase == "features") == 2
    assert torch.equal(K, tk.gram(model, loader, output="full", progress=False))
    with pytest.raises(tk.CheckpointMismatch, match="output"):
        tk.gram(model, loader, output="trace", checkpoint=tmp_path, progress=False)


def test_out_is_refused_for_an_output_axis():
    with pytest.raises(ValueError, match=r"out= holds a \[n1, n2\] K; output='full'"):
        tk.gram(mlp(3), [torch.randn(3, 6)], output="full", out=torch.empty(3, 3), progress=False)


def test_a_kernel_larger_than_memory_is_a_clear_error(monkeypatch):
    from tangent_kernels import store

    monkeypatch.setattr(store, "available_host_bytes", lambda: 1000)
    with pytest.raises(MemoryError, match=r"K \[6, 6, 3, 3\] needs 0.00 GiB of cpu memory"):
        tk.gram(mlp(3), [torch.randn(6, 6)], output="full", progress=False, max_memory=2**20)
