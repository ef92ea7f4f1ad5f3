"""Random output probes (issue 23): output=tk.OutputProbes(m, kind, seed) estimates the
trace kernel from m probe outputs v_r . f(x). Exact for given probe vectors (against the
full kernel and the float64 reference); unbiased (the mean over many probes within a few
standard errors of the trace); its variance as docs/outputs.md states it."""

import pytest
import torch
from torch import nn

import tangent_kernels as tk
from _models import cnn, cnn_input, mlp
from conftest import rel_err


def _full(model, x, **kwargs):
    return tk.gram(model, [x], output="full", precision="fp64", progress=False, **kwargs)


@pytest.mark.parametrize("structured", ["never", "always"])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_each_probe_kernel_is_exact(kind, structured):
    """K_r = v_r^T A v_r with A the full k x k kernel, for the probes the seed gives."""
    torch.manual_seed(0)
    model, x = cnn(5), cnn_input(6)
    probes = tk.OutputProbes(4, kind=kind, seed=3, reduce=False)
    V = probes.vectors(5)
    expected = torch.einsum("ra,ijab,rb->ijr", V, _full(model, x), V)
    K = tk.gram(model, [x[:4], x[4:]], output=probes, precision="fp64", progress=False, structured=structured)
    assert K.shape == (6, 6, 4) and rel_err(K, expected) <= 1e-10
    mean = tk.gram(model, [x[:4], x[4:]], output=tk.OutputProbes(4, kind=kind, seed=3), progress=False,
                   structured=structured)
    assert mean.shape == (6, 6) and rel_err(mean, expected.mean(-1)) <= 1e-5  # fp32
    ref = tk.reference.gram_autograd(model, [x], output=probes)
    assert rel_err(ref, expected) <= 1e-10
    G = tk.features(model, [x], output=probes, precision="fp64", progress=False)
    assert G.shape == (6, 4, sum(p.numel() for p in model.parameters()))
    assert rel_err(torch.einsum("irp,jrp->ijr", G, G), expected) <= 1e-10


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_unbiased_with_the_stated_variance(kind):
    """4,000 probes over 4 seeds: their mean is within 3 standard errors (Frobenius) of the
    exact trace, and their per-entry variance is the formula's (docs/outputs.md)."""
    torch.manual_seed(1)
    model, x = mlp(6), torch.randn(5, 6)
    A = _full(model, x)  # [n, n, k, k]
    trace = A.diagonal(dim1=2, dim2=3).sum(-1)
    per_probe = torch.cat([tk.gram(model, [x], output=tk.OutputProbes(1000, kind=kind, seed=s, reduce=False),
                                   precision="fp64", progress=False) for s in range(4)], -1)
    estimate, stderr = per_probe.mean(-1), tk.outputs.probe_error(per_probe)
    assert float((estimate - trace).norm()) <= 3 * float(stderr.norm())
    pairs = A * (A + A.transpose(2, 3))  # A_ab (A_ab + A_ba)
    variance = pairs.sum((2, 3)) - (pairs.diagonal(dim1=2, dim2=3).sum(-1) if kind == "rademacher" else 0)
    assert rel_err(per_probe.var(-1), variance) <= 0.15
    # Rademacher probes: no variance at all where the kernel has no cross-logit part.
    if kind == "rademacher":
        diagonal_only = torch.diag_embed(A.diagonal(dim1=2, dim2=3))
        V = tk.OutputProbes(3, seed=0).vectors(6)
        assert torch.allclose(torch.einsum("ra,ijab,rb->ijr", V, diagonal_only, V),
                              trace[..., None].expand(-1, -1, 3), rtol=1e-12, atol=0)


def test_the_model_is_left_as_it_was_and_resume_checks_the_probes(tmp_path):
    torch.manual_seed(2)
    model, loader = mlp(4), [torch.randn(5, 6) for _ in range(3)]
    K = tk.gram(model, loader, output=tk.OutputProbes(3, seed=0), checkpoint=tmp_path, progress=False)
    assert not model._forward_hooks
    assert torch.equal(tk.gram(model, loader, output=tk.OutputProbes(3, seed=0), checkpoint=tmp_path,
                               progress=False), K)
    with pytest.raises(tk.CheckpointMismatch):
        tk.gram(model, loader, output=tk.OutputProbes(3, seed=1), checkpoint=tmp_path, progress=False)
    assert not model._forward_hooks
    sequence = nn.Linear(4, 3)  # [B, T, 3]: no logits [B, k]
    with pytest.raises(ValueError, match=r"model output has shape \(\d+, 5, 3\)"):
        tk.gram(sequence, [torch.randn(3, 5, 4)], output=tk.OutputProbes(2), progress=False)
    assert not sequence._forward_hooks  # an error inside: the hook is removed too


@pytest.mark.parametrize("args, error, message", [
    ((0,), ValueError, "m must be an int >= 1"),
    ((2, "uniform"), ValueError, "kind must be one of"),
    ((2, "gaussian", 1.5), TypeError, "seed must be an int"),
])
def test_bad_probes_say_what_is_wrong(args, error, message):
    with pytest.raises(error, match=message):
        tk.OutputProbes(*args)
    with pytest.raises(ValueError, match="at least 2 probes"):
        tk.outputs.probe_error(torch.zeros(3, 3, 1))
    with pytest.raises(ValueError, match="taken by tk.gram and tk.features"):
        tk.coverage(mlp(3), torch.randn(3, 6), output=tk.OutputProbes(2))
    with pytest.raises(ValueError, match="out= is not supported with output=OutputProbes"):
        tk.gram(mlp(3), [torch.randn(3, 6)], output=tk.OutputProbes(2), out=torch.empty(3, 3), progress=False)
