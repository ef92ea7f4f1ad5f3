"""Adapters: the torch.func NTK tutorial's functions (written out here from the
tutorial's published code, plain torch) and neural-tangents' conventions, against ours."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from tangent_kernels.compat import neural_tangents as nt
from tangent_kernels.compat import torch_func
from conftest import rel_err


class TutorialCNN(nn.Module):  # the tutorial's model, smaller
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, (3, 3))
        self.conv2 = nn.Conv2d(8, 8, (3, 3))
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def tutorial_jacobian_contraction(fnet_single, params, x1, x2, compute):
    """From the tutorial: jacobians by vmap(jacrev), contracted per parameter."""
    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    einsum_expr = {"full": "Naf,Mbf->NMab", "trace": "Naf,Maf->NM", "diagonal": "Naf,Maf->NMa"}[compute]
    return torch.stack([torch.einsum(einsum_expr, j1, j2) for j1, j2 in zip(jac1, jac2)]).sum(0)


@pytest.fixture
def tutorial():
    torch.manual_seed(0)
    net = TutorialCNN().double()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def fnet_single(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    x_train, x_test = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    return net, params, fnet_single, x_train, x_test


@pytest.mark.parametrize("compute", ["full", "trace", "diagonal"])
def test_the_tutorial_functions_give_the_tutorials_numbers(tutorial, compute):
    net, params, fnet_single, x_train, x_test = tutorial
    before = {k: v.clone() for k, v in net.state_dict().items()}
    expected = tutorial_jacobian_contraction(fnet_single, params, x_train, x_test, compute)
    for ours in (torch_func.empirical_ntk_jacobian_contraction, torch_func.empirical_ntk_ntk_vps):
        got = ours(fnet_single, params, x_train, x_test, compute)
        assert got.shape == expected.shape and got.dtype == torch.float64
        assert rel_err(got, expected) <= 1e-10
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_other_parameter_values_are_used_not_the_modules(tutorial):
    net, params, fnet_single, x_train, x_test = tutorial
    shifted = {k: v + 0.1 for k, v in params.items()}
    expected = tutorial_jacobian_contraction(fnet_single, shifted, x_train, x_test, "trace")
    got = torch_func.empirical_ntk_jacobian_contraction(fnet_single, shifted, x_train, x_test, "trace")
    assert rel_err(got, expected) <= 1e-10


def test_a_function_without_a_known_module_is_computed_as_the_tutorial_does():
    torch.manual_seed(1)
    w = torch.randn(5, 3, dtype=torch.float64)
    params = {"w": w}

    def fnet_single(params, x):
        return torch.tanh(x @ params["w"])

    x1, x2 = torch.randn(4, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    expected = tutorial_jacobian_contraction(fnet_single, params, x1, x2, "full")
    got = torch_func.empirical_ntk_jacobian_contraction(fnet_single, params, x1, x2, "full")
    assert rel_err(got, expected) <= 1e-12


def test_the_module_form(tutorial):
    net, params, fnet_single, x_train, x_test = tutorial
    expected = tutorial_jacobian_contraction(fnet_single, params, x_train, x_train, "full")
    got = torch_func.empirical_ntk(net, x_train, x_train, "full", batch_size=4)
    assert rel_err(got, expected) <= 1e-10


def test_bad_compute_is_refused(tutorial):
    net, params, fnet_single, x_train, x_test = tutorial
    with pytest.raises(ValueError, match=r"compute must be one of \('full', 'trace', 'diagonal'\)"):
        torch_func.empirical_ntk_jacobian_contraction(fnet_single, params, x_train, x_test, "mean")


@pytest.mark.parametrize("trace_axes, diagonal_axes, layout", [((-1,), (), "mean"), ((), (), "full"),
                                                               ((), (-1,), "diagonal")])
def test_neural_tangents_conventions(tutorial, trace_axes, diagonal_axes, layout):
    net, params, fnet_single, x_train, x_test = tutorial
    full = tutorial_jacobian_contraction(fnet_single, params, x_train, x_test, "full")
    expected = {"mean": full.diagonal(dim1=2, dim2=3).mean(-1), "full": full,
                "diagonal": full.diagonal(dim1=2, dim2=3)}[layout]
    kernel_fn = nt.empirical_ntk_fn(net, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    for fn in (kernel_fn, nt.batch(kernel_fn, batch_size=4)):
        got = fn(x_train, x_test)
        assert got.shape == expected.shape and rel_err(got, expected) <= 1e-10
    same = kernel_fn(x_train)  # x2=None: x1
    assert same.shape[:2] == (6, 6) and torch.allclose(same, kernel_fn(x_train, x_train))

    def f(params, x):  # a batched functional model, as neural-tangents' f(params, x)
        return functional_call(net, params, (x,))

    got = nt.empirical_ntk_fn(f, trace_axes=trace_axes, diagonal_axes=diagonal_axes)(x_train, x_test, params)
    assert rel_err(got, expected) <= 1e-10


def test_neural_tangents_unsupported_axes_are_said():
    with pytest.raises(NotImplementedError, match="only the output axis"):
        nt.empirical_ntk_fn(nn.Linear(2, 2), trace_axes=(0,))
    with pytest.raises(ValueError, match="both traced and diagonal"):
        nt.empirical_ntk_fn(nn.Linear(2, 2), trace_axes=(-1,), diagonal_axes=(-1,))
