"""compat.trak.SketchProjector (TRAK's projector interface on tk.Projection) against an
explicit dense matrix built from the same rows, inside whole TRAKer runs (featurize,
finalize, score) with TRAK's own gradient computer and ours; determinism per (seed,
model_id); unbiased inner products at TRAK's scale (the mean over seeds within its
standard error)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trak import TRAKer
from trak.gradient_computers import FunctionalGradientComputer
from trak.modelout_functions import ImageClassificationModelOutput
from trak.projectors import AbstractProjector, ProjectionType

import tangent_kernels as tk
from conftest import rel_err
from tangent_kernels.compat.trak import GradientComputer, SketchProjector

K = 5


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, K)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def dense_matrix(model, projector, model_id):
    """The projector's R as a [P, k] matrix, at TRAK's scale, in named_parameters order."""
    projection = projector.projection(model_id)
    rows = [projection.rows(name, torch.arange(p.numel()), torch.float64) for name, p in model.named_parameters()]
    return torch.cat(rows) * math.sqrt(projector.proj_dim)


class DenseProjector(AbstractProjector):
    """The reference: TRAK's BasicSingleBlockProjector's matmul with an explicit matrix."""

    def __init__(self, matrix):
        self.matrix, self.proj_dim, self.proj_type, self.grad_dim = matrix, matrix.shape[1], "dense", matrix.shape[0]

    def project(self, grads, model_id):
        flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1)
        return (flat.double() @ self.matrix).float()


def per_sample_gradients(model, x, y):
    task, P = ImageClassificationModelOutput(), sum(p.numel() for p in model.parameters())
    grads = FunctionalGradientComputer(model.eval(), task, P, torch.float32, "cpu").compute_per_sample_grad((x, y))
    return {name: g.detach() for name, g in grads.items()}


def assert_rounding_apart(got, expected):
    """float32 sums in another order (of 845 products per entry): ~1e-7 of the norm."""
    assert rel_err(got, expected) <= 1e-6


@pytest.fixture
def data():
    torch.manual_seed(0)
    model = SmallCNN()
    train = torch.randn(24, 3, 8, 8), torch.randint(0, K, (24,))
    targets = torch.randn(5, 3, 8, 8), torch.randint(0, K, (5,))
    return model, train, targets


def _run(model, tmp_path, name, train, targets, projector, **kwargs):
    def traker():
        return TRAKer(model=model, task="image_classification", train_set_size=train[0].shape[0],
                      save_dir=str(tmp_path / name), device="cpu", use_half_precision=False, logging_level=40,
                      projector=projector, **kwargs)

    featurizer = traker()
    featurizer.load_checkpoint(model.state_dict(), model_id=0)
    for start in range(0, 24, 8):
        featurizer.featurize((train[0][start:start + 8], train[1][start:start + 8]), num_samples=8)
    featurizer.finalize_features()
    grads = torch.as_tensor(featurizer.saver.current_store["grads"]).double()
    scorer = traker()
    scorer.start_scoring_checkpoint("targets", model.state_dict(), model_id=0, num_targets=targets[0].shape[0])
    scorer.score(targets, num_samples=targets[0].shape[0])
    return grads, torch.as_tensor(scorer.finalize_scores("targets")).double()


@pytest.mark.parametrize("proj_type", [ProjectionType.rademacher, ProjectionType.normal])
@pytest.mark.parametrize("ours", [False, True], ids=["trak_gradients", "tk_gradients"])
def test_a_whole_traker_run_equals_the_explicit_matrix(data, tmp_path, proj_type, ours):
    model, train, targets = data
    P = sum(p.numel() for p in model.parameters())
    projector = SketchProjector(grad_dim=P, proj_dim=12, seed=3, proj_type=proj_type, device="cpu")
    extra = {"gradient_computer": GradientComputer} if ours else {}
    grads, scores = _run(model, tmp_path, "sketch", train, targets, projector, **extra)
    expected_grads, expected_scores = _run(model, tmp_path, "dense", train, targets,
                                           DenseProjector(dense_matrix(model, projector, 0)), **extra)
    # float32 storage; the scores pass through (X^T X)^-1 of 24 x 12 features
    assert grads.shape == (24, 12) and scores.shape == (24, 5)
    assert rel_err(grads, expected_grads) <= 1e-5
    assert rel_err(scores, expected_scores) <= 1e-3
    # and the stored features are TRAK's phi = R^T g / sqrt(P), R of unit-variance entries
    exact = torch.cat([g.flatten(1) for g in per_sample_gradients(model, *train).values()], 1).double()
    phi = exact @ dense_matrix(model, projector, 0) / math.sqrt(P)
    assert rel_err(grads, phi) <= 1e-5


def test_deterministic_per_seed_and_model_id(data):
    model, train, _ = data
    grads = per_sample_gradients(model, *train)
    P = sum(p.numel() for p in model.parameters())

    def project(seed=0, model_id=0, g=grads, **kwargs):
        return SketchProjector(P, 64, seed, "rademacher", "cpu", **kwargs).project(g, model_id)

    first = project()
    assert torch.equal(first, project())  # a fresh projector, the same R
    again = SketchProjector(P, 64, 0, "rademacher", "cpu")
    again.project(grads, 1)
    assert torch.equal(first, again.project(grads, 0))  # back to model 0 after model 1
    assert not torch.allclose(first, project(model_id=1)) and not torch.allclose(first, project(seed=1))
    # TRAK's seed + 1e4 * model_id would make these two the same matrix
    assert not torch.allclose(project(seed=10_000, model_id=0), project(seed=0, model_id=1))
    # a row's R does not depend on the batch it is in
    rows = torch.cat([project(g={k: v[i:i + 5] for k, v in grads.items()}) for i in range(0, 24, 5)])
    assert_rounding_apart(rows, first)
    # the flat [B, P] layout with the model's index is the dict's projection, and
    # tk.features' with the same tk.Projection (times sqrt(proj_dim))
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1)
    assert_rounding_apart(project(g=flat, index=tk.ParamIndex.all(model)), first)
    projection = SketchProjector(P, 64, 0, "rademacher", "cpu").projection(0)
    assert_rounding_apart(projection.project(flat, tk.ParamIndex.all(model)) * 8.0, first)


def test_a_subsample_s_rows_are_the_full_model_s_rows(data):
    model, train, _ = data
    flat = torch.cat([g.flatten(1) for g in per_sample_gradients(model, *train).values()], 1)
    idx = tk.subsample(model, 100, seed=1)
    masked = torch.zeros_like(flat)
    masked[:, idx.positions] = flat[:, idx.positions]
    sub = SketchProjector(100, 32, 5, "normal", "cpu", index=idx).project(flat[:, idx.positions], 0)
    full = SketchProjector(flat.shape[1], 32, 5, "normal", "cpu", index=tk.ParamIndex.all(model)).project(masked, 0)
    assert_rounding_apart(sub, full)


@pytest.mark.parametrize("proj_type", ["rademacher", "normal"])
def test_inner_products_are_unbiased_at_trak_s_scale(data, proj_type):
    model, train, _ = data
    grads = {k: v[:6].double() for k, v in per_sample_gradients(model, *train).items()}
    exact = torch.cat([g.flatten(1) for g in grads.values()], 1)
    exact_K = exact @ exact.T
    k, seeds = 16, 300
    samples = torch.stack([
        (lambda phi: phi @ phi.T / k)(SketchProjector(exact.shape[1], k, s, proj_type, "cpu", torch.float64)
                                      .project(grads, 0))
        for s in range(seeds)])
    mean, stderr = samples.mean(0), samples.std(0) / math.sqrt(seeds)
    # 21 distinct entries at 4.5 standard errors: a deterministic draw (fixed seeds) that a
    # biased estimate (a wrong scale: off by a factor) fails by hundreds of errors
    assert bool(((mean - exact_K).abs() <= 4.5 * stderr).all()), float(((mean - exact_K).abs() / stderr).max())
    # TRAK's scale: E[phi_i . phi_i] = k |g_i|^2, not |g_i|^2
    assert float((mean.diagonal() / exact_K.diagonal()).mean()) == pytest.approx(1.0, abs=0.1)


def test_bad_uses_are_refused_with_the_fix(data):
    model, train, _ = data
    grads = per_sample_gradients(model, *train)
    P = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="'normal'.*'rademacher'"):
        SketchProjector(P, 8, 0, "kronecker", "cpu")
    with pytest.raises(ValueError, match="positive int"):
        SketchProjector(P, 0, 0, "normal", "cpu")
    with pytest.raises(ValueError, match=f"grad_dim={P}"):
        SketchProjector(P + 1, 8, 0, "normal", "cpu").project(grads, 0)
    with pytest.raises(ValueError, match=r"\[B, 7\] tensor"):
        SketchProjector(7, 8, 0, "normal", "cpu").project(torch.zeros(3, 8), 0)
    with pytest.raises(ValueError, match="grad_dim=len\\(index\\)"):
        SketchProjector(7, 8, 0, "normal", "cpu", index=tk.subsample(model, 6))
