"""The adapters differentiate the user's function, not a module found behind it.

torch_func's ``fnet_single`` and neural-tangents' ``f`` are functions of the parameters:
whatever they do around the module call (a softmax, a scaled input, a selected or scaled
output, a detached parameter) is part of the kernel. Each case is checked against a float64
torch.func computation on the user's own function (the tutorial's Jacobian contraction,
neural-tangents' Jacobian of the batched f), in the layout those libraries give.
"""

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from tangent_kernels.compat import neural_tangents as nt
from tangent_kernels.compat import torch_func
from conftest import rel_err

# The adapters compute in float32 for a float32 model: products of Jacobian entries summed
# over a few hundred parameters, each entry through three layers, stay within ~1e-6 of
# float64 here; 1e-5 leaves a 10x margin without letting a wrong kernel (these differ by
# 10% and more) through.
FP32_TOL = 1e-5

EINSUM = {"full": "Naf,Mbf->NMab", "trace": "Naf,Maf->NM", "diagonal": "Naf,Maf->NMa"}


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def per_sample_functions(net):
    """name -> (fnet_single, its per-sample output shape): the tutorial's function and
    functions that do something around the module call. Each closes over net itself, as
    user code does, so the adapter finds the module behind it."""
    def module(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    def softmax(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0).softmax(-1)

    def input_scaling(params, x):
        return functional_call(net, params, ((3 * x).unsqueeze(0),)).squeeze(0)

    def select_one(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)[2]

    def select_three(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)[..., :3]

    def output_scaling(params, x):
        return 5 * functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    def detached_biases(params, x):  # the module's values, other gradients
        held = {k: (v.detach() if k.endswith("bias") else v) for k, v in params.items()}
        return functional_call(net, held, (x.unsqueeze(0),)).squeeze(0)

    shapes = {"select_one": (), "select_three": (3,)}
    functions = (module, softmax, input_scaling, select_one, select_three, output_scaling, detached_biases)
    return {fn.__name__: (fn, shapes.get(fn.__name__, (5,))) for fn in functions}


def batched_functions(net):
    """The same, as neural-tangents' batched f(params, x)."""
    def module(params, x):
        return functional_call(net, params, (x,))

    def softmax(params, x):
        return functional_call(net, params, (x,)).softmax(-1)

    def input_scaling(params, x):
        return functional_call(net, params, (3 * x,))

    def select_one(params, x):
        return functional_call(net, params, (x,))[:, 2]

    def select_three(params, x):
        return functional_call(net, params, (x,))[..., :3]

    def output_scaling(params, x):
        return functional_call(net, params, (x,)) * 5

    def detached_biases(params, x):
        return functional_call(net, {k: (v.detach() if k.endswith("bias") else v) for k, v in params.items()}, (x,))

    shapes = {"select_one": (), "select_three": (3,)}
    functions = (module, softmax, input_scaling, select_one, select_three, output_scaling, detached_biases)
    return {fn.__name__: (fn, shapes.get(fn.__name__, (5,))) for fn in functions}


# what the warning names: the first difference the check meets
REASONS = {"softmax": "outputs differ", "input_scaling": "outputs differ", "output_scaling": "outputs differ",
           "select_one": "returns outputs of shape", "select_three": "returns outputs of shape",
           "detached_biases": "gradients differ"}
CASES = ["module", "softmax", "input_scaling", "select_one", "select_three", "output_scaling", "detached_biases"]


def float64_kernel(jacobians, x1, x2, compute):
    """sum over parameters of the contraction of [N, O, p] Jacobians, in float64 (a scalar
    output per sample is O = 1)."""
    return sum(torch.einsum(EINSUM[compute], a, b) for a, b in zip(jacobians(x1), jacobians(x2)))


@pytest.fixture
def data():
    net = small_net()
    params = {k: v.detach() for k, v in net.named_parameters()}
    torch.manual_seed(1)
    return net, params, torch.randn(6, 3, 6, 6), torch.randn(4, 3, 6, 6)


@pytest.mark.parametrize("compute", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("case", CASES)
def test_torch_func_differentiates_fnet_single(data, case, compute):
    net, params, x1, x2 = data
    fnet_single, out_shape = per_sample_functions(net)[case]
    p64 = {k: v.double() for k, v in params.items()}

    def jacobians(x):  # the tutorial's vmap(jacrev(fnet_single)) on the user's function, float64
        jac = vmap(jacrev(fnet_single), (None, 0))(p64, x.double())
        return [jac[k].reshape(x.shape[0], -1, p64[k].numel()) for k in p64]

    # the tutorial's layout; a scalar output per sample (where the tutorial's flatten(2)
    # fails) is one output, as tk.gram counts a [B] output
    expected = float64_kernel(jacobians, x1, x2, compute)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for method in (torch_func.empirical_ntk_jacobian_contraction, torch_func.empirical_ntk_ntk_vps):
        if case == "module":  # the module's own forward: the tk.gram path, no warning
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                got = method(fnet_single, params, x1, x2, compute)
            assert not [w for w in record if "forward at params" in str(w.message)]
        else:
            with pytest.warns(UserWarning, match=rf"fnet_single is not the Sequential's forward.*{REASONS[case]}.*"
                                                 "computed from fnet_single"):
                got = method(fnet_single, params, x1, x2, compute)
        assert got.shape == expected.shape, (case, got.shape, expected.shape)
        assert rel_err(got, expected) <= FP32_TOL, (case, rel_err(got, expected))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("trace_axes, diagonal_axes, layout", [((-1,), (), "mean"), ((), (), "full"),
                                                               ((), (-1,), "diagonal")])
@pytest.mark.parametrize("case", CASES)
def test_neural_tangents_differentiates_f(data, case, trace_axes, diagonal_axes, layout):
    net, params, x1, x2 = data
    f, out_shape = batched_functions(net)[case]
    p64 = {k: v.double() for k, v in params.items()}

    def jacobians(x):  # neural-tangents': the Jacobian of the batched f, float64
        jac = jacrev(f)(p64, x.double())
        return [jac[k].reshape(x.shape[0], -1, p64[k].numel()) for k in p64]

    kernel_fn = nt.empirical_ntk_fn(f, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
    if out_shape == () and layout != "full":  # neural-tangents would trace the batch axis
        with pytest.warns(UserWarning, match="is not the Sequential's forward"):
            with pytest.raises(NotImplementedError, match=r"\[N\] outputs.*batch axis.*trace_axes=\(\)"):
                kernel_fn(x1, x2, params)
        return
    compute = {"mean": "trace", "full": "full", "diagonal": "diagonal"}[layout]
    expected = float64_kernel(jacobians, x1, x2, compute)
    if out_shape == ():  # neural-tangents' layout: [N] outputs have no output axes
        expected = expected.reshape(x1.shape[0], x2.shape[0])
    if layout == "mean":  # neural-tangents averages traced axes
        expected = expected / out_shape[0]
    for fn in (kernel_fn, nt.batch(kernel_fn, batch_size=4)):
        if case == "module":
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                got = fn(x1, x2, params)
            assert not [w for w in record if "forward at params" in str(w.message)]
        else:
            with pytest.warns(UserWarning, match=rf"f is not the Sequential's forward.*{REASONS[case]}.*"
                                                 "computed from f itself"):
                got = fn(x1, x2, params)
        assert got.shape == expected.shape, (case, got.shape, expected.shape)
        assert rel_err(got, expected) <= FP32_TOL, (case, rel_err(got, expected))


def test_the_warning_points_at_the_callers_line(data):
    net, params, x1, x2 = data
    fnet_single, _ = per_sample_functions(net)["softmax"]
    f, _ = batched_functions(net)["softmax"]
    for compute_kernel in (lambda: torch_func.empirical_ntk_jacobian_contraction(fnet_single, params, x1, x2),
                           lambda: torch_func.empirical_ntk_ntk_vps(fnet_single, params, x1, x2),
                           lambda: nt.empirical_ntk_fn(f)(x1, x2, params)):
        with pytest.warns(UserWarning, match="is not the Sequential's forward") as record:
            compute_kernel()
        assert [w.filename for w in record] == [__file__]


def test_a_random_function_is_refused_with_the_fix():
    """A module in train mode with dropout: fnet_single is random, and has no kernel."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def fnet_single(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    def f(params, x):
        return functional_call(net, params, (x,))

    x = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match=r"fnet_single could not be evaluated.*call \.eval\(\)"):
        torch_func.empirical_ntk_jacobian_contraction(fnet_single, params, x, x)
    with pytest.warns(UserWarning, match="outputs differ"):  # batched, dropout draws differ from the module's
        with pytest.raises(ValueError, match=r"f returns different outputs on two calls.*random.*call \.eval\(\)"):
            nt.empirical_ntk_fn(f)(x, x, params)
    assert net.training


def test_neural_tangents_f_without_a_module_is_differentiated(data):
    """An f over its own dict of tensors (no nn.Module): computed, not refused."""
    _, _, x1, x2 = data
    torch.manual_seed(2)
    params = {"w": torch.randn(3 * 6 * 6, 4), "v": torch.randn(4, 2)}

    def f(p, x):
        return torch.tanh(x.flatten(1) @ p["w"]) @ p["v"]

    p64 = {k: v.double() for k, v in params.items()}
    jac1, jac2 = (jacrev(f)(p64, x.double()) for x in (x1, x2))
    expected = sum(torch.einsum("Naf,Mbf->NMab", jac1[k].reshape(6, 2, -1), jac2[k].reshape(4, 2, -1)) for k in p64)
    got = nt.empirical_ntk_fn(f, trace_axes=())(x1, x2, params)
    assert got.shape == expected.shape and rel_err(got, expected) <= FP32_TOL


def test_neural_tangents_module_is_left_in_its_mode(data):
    net, _, x1, x2 = data
    net.train()
    nt.empirical_ntk_fn(net)(x1, x2)
    assert net.training and all(m.training for m in net.modules())


def test_neural_tangents_outputs_with_more_axes_are_refused(data):
    net, params, x1, x2 = data

    def f(p, x):
        return functional_call(net, p, (x,)).reshape(x.shape[0], 5, 1)

    with pytest.warns(UserWarning, match="returns outputs of shape"):  # not the module's [N, 5]
        with pytest.raises(NotImplementedError, match=r"\[N, 5, 1\].*only \[N\] and \[N, O\] outputs"):
            nt.empirical_ntk_fn(f)(x1, x2, params)


class DictOutput(nn.Module):  # a Hugging Face-style model: its logits in a dict
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return {"logits": self.body(x)}


def test_a_selected_logits_entry_is_differentiated():
    torch.manual_seed(0)
    net = DictOutput()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def fnet_single(params, x):
        return functional_call(net, params, (x.unsqueeze(0),))["logits"].squeeze(0)

    x1, x2 = torch.randn(5, 4), torch.randn(3, 4)
    p64 = {k: v.double() for k, v in params.items()}

    def jacobians(x):
        jac = vmap(jacrev(fnet_single), (None, 0))(p64, x.double())
        return [jac[k].reshape(x.shape[0], 3, -1) for k in p64]

    expected = float64_kernel(jacobians, x1, x2, "full")
    with pytest.warns(UserWarning, match="returns Tensor where the module returns dict"):
        got = torch_func.empirical_ntk_jacobian_contraction(fnet_single, params, x1, x2, "full")
    assert got.shape == expected.shape and rel_err(got, expected) <= FP32_TOL


def test_a_function_of_several_outputs_is_refused(data):
    net, params, x1, x2 = data

    def fnet_single(params, x):
        out = functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)
        return out, out

    with pytest.warns(UserWarning, match="returns tuple"):
        with pytest.raises(TypeError, match="fnet_single must return one tensor"):
            torch_func.empirical_ntk_jacobian_contraction(fnet_single, params, x1, x2)


class ScalarOutput(nn.Module):  # one output per sample, returned as [B]
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.body(x).squeeze(-1)


@pytest.mark.parametrize("compute, shape", [("full", (5, 3, 1, 1)), ("trace", (5, 3)), ("diagonal", (5, 3, 1))])
def test_scalar_outputs_have_one_layout_on_either_path(compute, shape):
    """A scalar per sample is one output (tk.gram's [B]) whether the module serves the
    kernel or fnet_single is differentiated."""
    torch.manual_seed(0)
    net = ScalarOutput()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def module(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    def scaled(params, x):
        return 2 * functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    x1, x2 = torch.randn(5, 4), torch.randn(3, 4)
    fast = torch_func.empirical_ntk_jacobian_contraction(module, params, x1, x2, compute)
    with pytest.warns(UserWarning, match="outputs differ"):
        exact = torch_func.empirical_ntk_jacobian_contraction(scaled, params, x1, x2, compute)
    assert fast.shape == exact.shape == shape
    assert rel_err(exact, 4 * fast.double()) <= FP32_TOL


def test_neural_tangents_scalar_outputs():
    """[N] outputs: [N1, N2] for trace_axes=(), as neural-tangents; tracing axis -1 (there
    the batch axis) is refused with the fix."""
    torch.manual_seed(0)
    net = ScalarOutput()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(params, x):
        return functional_call(net, params, (x,))

    x1, x2 = torch.randn(5, 4), torch.randn(3, 4)
    module_form = nt.empirical_ntk_fn(net, trace_axes=())(x1, x2)
    functional_form = nt.empirical_ntk_fn(f, trace_axes=())(x1, x2, params)
    assert module_form.shape == functional_form.shape == (5, 3)
    assert rel_err(functional_form, module_form.double()) <= FP32_TOL
    with pytest.raises(NotImplementedError, match="trace_axes=()"):
        nt.empirical_ntk_fn(net)(x1, x2)
