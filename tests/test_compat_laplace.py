"""compat.laplace against laplace-torch itself (a test dependency in the Makefile's TOOLS):
the Jacobians and gradients against its own torch.func implementation and a float64
autograd loop; real SubnetLaplace / FullLaplace / DiagLaplace fits and linearized
predictives with our backend against the same fits with laplace-torch's GGN and EF."""

import pytest
import torch
import torch.nn.functional as F
from laplace import Laplace
from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tangent_kernels.compat.laplace import TangentKernelsEF, TangentKernelsGGN
from conftest import rel_err

O = 3


class Net(nn.Module):
    def __init__(self, outputs=O):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.fc1 = nn.Linear(4 * 6, 10)
        self.fc2 = nn.Linear(10, outputs)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(F.relu(self.conv(x)).flatten(1))))


class DictNet(Net):  # laplace-torch's Hugging Face convention: one dict argument
    def forward(self, data):
        return super().forward(data["x"] * data["scale"].unsqueeze(-1).unsqueeze(-1))


def jacobian_loop(model, x):
    """The definition in float64: one autograd pass per sample and output, [B, O, P]."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for b in range(x.shape[0]):
        out = model(x[b:b + 1])[0]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[a], params, retain_graph=True)])
                                 for a in range(out.shape[0])]))
    return torch.stack(rows)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(9, 2, 8, dtype=torch.float64)
    P = sum(p.numel() for p in model.parameters())
    indices = torch.randperm(P)[:37].sort().values
    return model, x, indices


@pytest.mark.parametrize("subnet", [False, True])
def test_jacobians_match_laplace_torch_and_the_float64_definition(setup, subnet):
    model, x, indices = setup
    indices = indices if subnet else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = TangentKernelsGGN(model, "classification", subnetwork_indices=indices)
    js, f = ours.jacobians(x)
    theirs, f_theirs = CurvatureInterface.jacobians(GGNInterface(model, "classification",
                                                                 subnetwork_indices=indices), x)
    exact = jacobian_loop(model, x)
    exact = exact if indices is None else exact[:, :, indices]
    assert js.shape == theirs.shape == exact.shape and js.dtype == torch.float64
    assert rel_err(js, theirs) <= 1e-12 and rel_err(js, exact) <= 1e-12  # float64: summation order only
    torch.testing.assert_close(f, f_theirs, rtol=1e-13, atol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_selected_output_jacobians_and_backprop_fallback(setup):
    model, x, indices = setup
    ours = TangentKernelsGGN(model, "classification", subnetwork_indices=indices)
    outputs = torch.randint(0, O, (9, 2))
    got, _ = ours.selected_output_jacobians(x, outputs)
    theirs, _ = CurvatureInterface.selected_output_jacobians(
        GGNInterface(model, "classification", subnetwork_indices=indices), x, outputs)
    assert got.shape == theirs.shape == (9, 2, 37) and rel_err(got, theirs) <= 1e-12
    full, _ = ours.jacobians(x)
    x_grad = x.clone().requires_grad_(True)
    js, _ = ours.jacobians(x_grad, enable_backprop=True)  # laplace-torch's own path
    assert js.requires_grad and rel_err(js.detach(), full) <= 1e-12


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_gradients_match_laplace_torch(setup, likelihood):
    model, x, indices = setup
    y = torch.randint(0, O, (9,)) if likelihood == "classification" else torch.randn(9, O, dtype=torch.float64)
    gs, loss = TangentKernelsEF(model, likelihood, subnetwork_indices=indices).gradients(x, y)
    gs_theirs, loss_theirs = EFInterface(model, likelihood, subnetwork_indices=indices).gradients(x, y)
    assert gs.shape == gs_theirs.shape == (9, 37)
    assert rel_err(gs, gs_theirs) <= 1e-12
    torch.testing.assert_close(loss, loss_theirs, rtol=1e-13, atol=0)


def _fit(model, likelihood, backend, x, y, **kwargs):
    la = Laplace(model, likelihood, backend=backend, **kwargs)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=5))
    return la


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_a_subnet_laplace_fit_and_its_predictive_match_laplace_torch(setup, likelihood, structure):
    model, x, indices = setup
    torch.manual_seed(1)
    y = torch.randint(0, O, (9,)) if likelihood == "classification" else torch.randn(9, O, dtype=torch.float64)
    x_test = torch.randn(4, 2, 8, dtype=torch.float64)
    kwargs = dict(subset_of_weights="subnetwork", hessian_structure=structure, subnetwork_indices=indices)
    for ours_cls, theirs_cls in ((TangentKernelsGGN, GGNInterface), (TangentKernelsEF, EFInterface)):
        ours = _fit(model, likelihood, ours_cls, x, y, **kwargs)
        theirs = _fit(model, likelihood, theirs_cls, x, y, **kwargs)
        assert ours.H.shape == theirs.H.shape and rel_err(ours.H, theirs.H) <= 1e-12
        assert abs(float(ours.log_marginal_likelihood() - theirs.log_marginal_likelihood())) <= 1e-9
        if likelihood == "classification":
            p_ours, p_theirs = ours(x_test, pred_type="glm", link_approx="probit"), \
                theirs(x_test, pred_type="glm", link_approx="probit")
            assert rel_err(p_ours, p_theirs) <= 1e-12
        else:
            (m_ours, v_ours), (m_theirs, v_theirs) = ours(x_test, pred_type="glm"), theirs(x_test, pred_type="glm")
            assert rel_err(m_ours, m_theirs) <= 1e-12 and rel_err(v_ours, v_theirs) <= 1e-12


def test_a_full_laplace_over_every_parameter_matches(setup):
    model, x, _ = setup
    y = torch.randint(0, O, (9,))
    ours = _fit(model, "classification", TangentKernelsGGN, x, y, subset_of_weights="all", hessian_structure="full")
    theirs = _fit(model, "classification", GGNInterface, x, y, subset_of_weights="all", hessian_structure="full")
    assert rel_err(ours.H, theirs.H) <= 1e-12
    x_test = torch.randn(3, 2, 8, dtype=torch.float64)
    assert rel_err(ours(x_test, link_approx="probit"), theirs(x_test, link_approx="probit")) <= 1e-12


def test_a_model_taking_a_dict_gets_the_same_jacobians(setup):
    _, x, indices = setup
    torch.manual_seed(2)
    model = DictNet().double()
    data = {"x": x, "scale": torch.rand(9, dtype=torch.float64) + 0.5}
    js, f = TangentKernelsGGN(model, "regression", subnetwork_indices=indices).jacobians(data)
    theirs, f_theirs = CurvatureInterface.jacobians(GGNInterface(model, "regression",
                                                                 subnetwork_indices=indices), data)
    assert rel_err(js, theirs) <= 1e-12 and rel_err(f, f_theirs) <= 1e-13


def test_float32_jacobians_are_within_float32_rounding(setup):
    model, x, indices = setup
    model32, x32 = Net(), x.float()
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    js, _ = TangentKernelsGGN(model32, "classification", subnetwork_indices=indices).jacobians(x32)
    exact = jacobian_loop(model, x)[:, :, indices]
    assert js.dtype == torch.float32
    # a few dozen fp32 roundings through three layers: well under 1e-5 relative
    assert rel_err(js, exact) <= 1e-5


def test_last_layer_laplace_still_works_and_kron_is_refused(setup):
    model, x, _ = setup
    y = torch.randint(0, O, (9,))
    ours = _fit(model, "classification", TangentKernelsGGN, x, y, subset_of_weights="last_layer",
                hessian_structure="full")
    # laplace-torch's closed-form last-layer Jacobians (not ours) against the definition:
    # the GGN sum_b J_b^T (diag(p_b) - p_b p_b^T) J_b over fc2's weight and bias (the last columns)
    last = model.fc2.weight.numel() + model.fc2.bias.numel()
    js = jacobian_loop(model, x)[:, :, -last:]
    p = torch.softmax(model(x), 1).detach()
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert rel_err(ours.H, torch.einsum("bcp,bck,bkq->pq", js, lam, js)) <= 1e-12
    with pytest.raises(NotImplementedError, match="BackPackGGN"):
        _fit(model, "classification", TangentKernelsGGN, x, y, subset_of_weights="all", hessian_structure="kron")
