"""compat.trak against TRAK itself (traker, a test dependency in the Makefile's TOOLS):
the per-sample gradients against TRAK's FunctionalGradientComputer and a float64 autograd
loop of the margin; whole TRAKer runs (featurize, finalize, score) with ours and with
TRAK's own gradient computer; subsamples with both ways of projecting them."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trak import TRAKer
from trak.gradient_computers import FunctionalGradientComputer
from trak.modelout_functions import CLIPModelOutput, ImageClassificationModelOutput, TextClassificationModelOutput
from trak.projectors import BasicProjector, ProjectionType

import tangent_kernels as tk
from tangent_kernels.compat.trak import GradientComputer, SubsampleProjector
from conftest import rel_err

K = 5


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 6 * 6, K)

    def forward(self, x):
        return self.fc(F.relu(self.norm(self.conv(x))).flatten(1))


class TextClassifier(nn.Module):  # the keyword call TRAK's text task makes
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.types = nn.Embedding(2, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids, token_type_ids, attention_mask):
        h = torch.tanh(self.embed(input_ids) + self.types(token_type_ids)) * attention_mask.unsqueeze(-1)
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))


def margin_gradients(model, x, y):
    """The definition, in float64: one autograd pass per sample of f_y - logsumexp_{a!=y} f_a."""
    rows = []
    params = [p for p in model.parameters()]
    for b in range(x.shape[0]):
        logits = model(x[b:b + 1])[0]
        others = torch.cat([logits[:y[b]], logits[y[b] + 1:]])
        margin = logits[y[b]] - torch.logsumexp(others, 0)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(margin, params)]))
    return torch.stack(rows)


def flat(grads):
    grads = torch.cat([g.flatten(1) for g in grads.values()], dim=1) if isinstance(grads, dict) else grads
    return grads.detach()


@pytest.fixture
def data():
    torch.manual_seed(0)
    model = SmallCNN().double()
    x, y = torch.randn(7, 3, 8, 8, dtype=torch.float64), torch.randint(0, K, (7,))
    return model, x, y


def test_per_sample_gradients_match_trak_and_the_float64_definition(data):
    model, x, y = data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # TRAKer sets eval itself; a direct caller's mode is left alone
    task, P = ImageClassificationModelOutput(), tk.ParamIndex.all(model).layout.total
    ours = GradientComputer(model, task, P, torch.float32, "cpu")
    got = ours.compute_per_sample_grad((x, y))
    trak = FunctionalGradientComputer(model.eval(), task, P, torch.float32, "cpu").compute_per_sample_grad((x, y))
    model.train()
    assert list(got) == list(trak) and all(got[k].shape == trak[k].shape for k in got)
    expected = margin_gradients(model.eval(), x, y)
    # float64 throughout: both sides differ only in summation order (~1e-16 relative)
    for reference in (flat(trak), expected):
        assert rel_err(flat(got), reference) <= 1e-12
    loss_grad = ours.compute_loss_grad((x, y))
    p = torch.softmax(model(x), 1)[torch.arange(7), y]
    torch.testing.assert_close(loss_grad, (1 - p).detach().unsqueeze(-1), rtol=1e-12, atol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_grad_wrt_keeps_the_named_tensors_in_trak_order(data):
    model, x, y = data
    task, names = ImageClassificationModelOutput(), ["fc.weight", "conv.bias"]
    got = GradientComputer(model, task, None, torch.float32, "cpu", grad_wrt=names).compute_per_sample_grad((x, y))
    trak = FunctionalGradientComputer(model, task, None, torch.float32, "cpu", grad_wrt=names)
    trak = trak.compute_per_sample_grad((x, y))
    assert list(got) == list(trak) == ["conv.bias", "fc.weight"]
    for name in names:
        assert rel_err(got[name], trak[name].detach()) <= 1e-12


def test_text_classification_task_matches_trak():
    torch.manual_seed(1)
    model = TextClassifier().double()
    ids, types = torch.randint(0, 20, (5, 7)), torch.randint(0, 2, (5, 7))
    mask = (torch.rand(5, 7) > 0.3).double()
    mask[:, 0] = 1
    batch = (ids, types, mask, torch.randint(0, 3, (5,)))
    task = TextClassificationModelOutput()
    got = GradientComputer(model, task, None, torch.float32, "cpu").compute_per_sample_grad(batch)
    trak = FunctionalGradientComputer(model, task, None, torch.float32, "cpu").compute_per_sample_grad(batch)
    assert rel_err(flat(got), flat(trak)) <= 1e-12


def _run_traker(model, tmp_path, name, train, targets, projector=None, **kwargs):
    def traker():
        # A second TRAKer scores from the first one's save_dir (TRAK's own pattern): TRAK
        # 0.3.2's BasicProjector frees a one-block matrix in finalize_features and does
        # not rebuild it for score() in the same TRAKer.
        return TRAKer(model=model, task="image_classification", train_set_size=train[0].shape[0],
                      save_dir=str(tmp_path / name), device="cpu", use_half_precision=False, logging_level=40,
                      projector=projector() if projector else None, **kwargs)

    featurizer = traker()
    featurizer.load_checkpoint(model.state_dict(), model_id=0)
    for start in range(0, train[0].shape[0], 8):
        featurizer.featurize((train[0][start:start + 8], train[1][start:start + 8]),
                             num_samples=min(8, train[0].shape[0] - start))
    featurizer.finalize_features()
    grads = torch.as_tensor(featurizer.saver.current_store["grads"]).double()
    scorer = traker()
    scorer.start_scoring_checkpoint("targets", model.state_dict(), model_id=0, num_targets=targets[0].shape[0])
    scorer.score(targets, num_samples=targets[0].shape[0])
    return grads, torch.as_tensor(scorer.finalize_scores("targets")).double()


@pytest.fixture
def run_data():
    torch.manual_seed(2)
    model = SmallCNN().double()
    train = torch.randn(24, 3, 8, 8, dtype=torch.float64), torch.randint(0, K, (24,))
    targets = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, K, (5,))
    return model, train, targets


def test_a_whole_traker_run_gives_trak_s_scores(run_data, tmp_path):
    model, train, targets = run_data
    grads_ours, scores_ours = _run_traker(model, tmp_path, "ours", train, targets, proj_dim=12,
                                          gradient_computer=GradientComputer)
    grads_trak, scores_trak = _run_traker(model, tmp_path, "trak", train, targets, proj_dim=12)
    # TRAK stores float32: the projected features agree to float32 rounding; the scores
    # pass through (X^T X)^-1 of 24 x 12 features (condition number here < 1e3).
    assert rel_err(grads_ours, grads_trak) <= 1e-6
    assert rel_err(scores_ours, scores_trak) <= 1e-4


def test_a_subsample_as_the_projection_stores_the_sampled_gradients(run_data, tmp_path):
    model, train, targets = run_data
    idx = tk.subsample(model, 40, seed=3)
    grads, _ = _run_traker(model, tmp_path, "sub", train, targets, gradient_computer=GradientComputer.subsampled(idx),
                           projector=lambda: SubsampleProjector(idx, model))
    expected = margin_gradients(model.eval(), *train)[:, idx.positions]
    assert grads.shape == (24, 40)
    assert rel_err(grads, expected) <= 1e-6  # float32 storage


def test_a_projected_subsample_is_trak_s_projection_of_the_sampled_gradients(run_data, tmp_path):
    model, train, targets = run_data
    idx = tk.subsample(model, 40, seed=4)
    def projector():
        return BasicProjector(grad_dim=40, proj_dim=8, seed=0, proj_type=ProjectionType.normal, device="cpu")

    grads, _ = _run_traker(model, tmp_path, "proj", train, targets, gradient_computer=GradientComputer.subsampled(idx),
                           projector=projector)
    sampled = margin_gradients(model.eval(), *train)[:, idx.positions].float()
    fresh = projector()
    P = tk.ParamIndex.all(model).layout.total
    expected = fresh.project(sampled, model_id=0).double() / math.sqrt(P)
    assert rel_err(grads, expected) <= 1e-5


def test_bad_uses_are_refused_with_the_fix(data):
    model, x, y = data
    task = ImageClassificationModelOutput()
    with pytest.raises(NotImplementedError, match="subclass GradientComputer"):
        GradientComputer(model, CLIPModelOutput(), None, torch.float32, "cpu")
    with pytest.raises(ValueError, match="either idx"):
        GradientComputer(model, task, None, torch.float32, "cpu", grad_wrt=["fc.bias"], idx=[0, 1])
    with pytest.raises(ValueError, match="not trainable parameters"):
        GradientComputer(model, task, None, torch.float32, "cpu", grad_wrt=["fc.nonexistent"])
    model.conv.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="grad_wrt=\\[names of the trainable"):
        GradientComputer(model, task, sum(p.numel() for p in model.parameters()), torch.float32, "cpu")
    model.conv.bias.requires_grad_(True)
    computer = GradientComputer(model, task, None, torch.float32, "cpu")
    with pytest.raises(ValueError, match="one integer class index per sample"):
        computer.compute_per_sample_grad((x, torch.zeros(7, 2, dtype=torch.long)))


def test_a_new_checkpoint_is_read_by_load_model_params(data):
    model, x, y = data
    task = ImageClassificationModelOutput()
    computer = GradientComputer(model, task, None, torch.float32, "cpu")
    first = flat(computer.compute_per_sample_grad((x, y)))
    torch.manual_seed(5)
    model.load_state_dict(SmallCNN().double().state_dict())
    computer.load_model_params(model)
    second = flat(computer.compute_per_sample_grad((x, y)))
    expected = margin_gradients(model.eval(), x, y)
    assert rel_err(second, expected) <= 1e-12
    assert rel_err(first, second) > 1e-2


def test_float32_gradients_are_within_float32_rounding_of_the_definition(data):
    model, x, y = data
    model32 = SmallCNN()
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    got = flat(GradientComputer(model32, ImageClassificationModelOutput(), None, torch.float32, "cpu")
               .compute_per_sample_grad((x.float(), y)))
    assert got.dtype == torch.float32
    # float32 through a convolution, a norm and a linear layer: a few ulps of 6e-8 each
    # step, far under 1e-5; the reference sees the same float32-rounded inputs and weights
    expected = margin_gradients(model32.double().eval(), x.float().double(), y)
    assert rel_err(got, expected) <= 1e-5


def test_load_model_params_refuses_another_architecture(data):
    model, x, y = data
    computer = GradientComputer(model, ImageClassificationModelOutput(), None, torch.float32, "cpu")
    with pytest.raises(ValueError, match="build a new GradientComputer"):
        computer.load_model_params(nn.Sequential(nn.Flatten(), nn.Linear(192, K)).double())


def test_a_custom_output_of_the_logits_by_subclassing(data):
    model, x, y = data

    class CorrectLogit(GradientComputer):  # a user's task: the correct class's log-probability
        def model_output(self, logits, labels):
            return torch.log_softmax(logits, 1).gather(1, labels[:, None])[:, 0]

    class Task:  # any object: the subclass says what it means
        pass

    got = flat(CorrectLogit(model, Task(), None, torch.float32, "cpu").compute_per_sample_grad((x, y)))
    params = list(model.parameters())
    expected = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        torch.log_softmax(model(x[b:b + 1]), 1)[0, y[b]], params)]) for b in range(7)])
    assert rel_err(got, expected) <= 1e-12
