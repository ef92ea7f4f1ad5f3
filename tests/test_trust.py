"""Trust by construction (issue #20): what the library refuses or gets right whatever the
caller's context: random forwards, grad-less modes, the caller's random stream, loader
order, and per-batch verification of the batched pass."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tangent_kernels as tk
from conftest import rel_err, seeded_mlp


def _data(n=12, d=6, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- 4. random or grad-less forwards
class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = seeded_mlp()

    def forward(self, x):
        return self.body(F.dropout(x, 0.3, training=True))  # ignores eval(): random in every mode


class RandomNoise(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = seeded_mlp()

    def forward(self, x):
        return self.body(x + 0.1 * torch.randn_like(x))


@pytest.mark.parametrize("model_class", [FunctionalDropout, RandomNoise])
@pytest.mark.parametrize("entry", ["gram", "features", "reference", "coverage"])
def test_a_forward_that_draws_random_numbers_is_refused(model_class, entry):
    model, x = model_class(), _data()
    call = {
        "gram": lambda: tk.gram(model, [x], progress=False),
        "features": lambda: tk.features(model, [x], progress=False),
        "reference": lambda: tk.reference.gram_autograd(model, [x]),
        "coverage": lambda: tk.coverage(model, x),
    }[entry]
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"draws random numbers in its forward.*training=self.training"):
        call()
    assert torch.equal(torch.get_rng_state(), state)  # and the caller's stream did not move


def test_dropout_modules_are_off_in_eval_mode_and_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3)).train()
    x = _data()
    K = tk.gram(model, [x], progress=False)
    assert rel_err(K, tk.reference.gram_autograd(model, [x])) <= 1e-5
    assert model.training  # the caller's mode, as it was


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_grad_less_modes_give_the_kernel_not_zeros(mode):
    model, x = seeded_mlp(), _data()
    expected = tk.reference.gram_autograd(model, [x])
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        data = x.clone()  # an inference tensor under inference_mode
        K = tk.gram(model, [data], progress=False)
        G = tk.features(model, [data], progress=False)
        reference = tk.reference.gram_autograd(model, [data])
    assert expected.abs().max() > 0
    assert rel_err(K, expected) <= 1e-5 and rel_err(G @ G.T, expected) <= 1e-5
    assert rel_err(reference, expected) <= 1e-12


# ---------------------------------------------------------------- 5. the caller's random stream
def test_the_callers_random_stream_is_untouched():
    model, x = seeded_mlp(), _data()
    for call in (lambda: tk.gram(model, [x], progress=False),
                 lambda: tk.gram(model, [x], progress=False, structured="always"),
                 lambda: tk.coverage(model, x),
                 lambda: tk.features(model, [x], progress=False),
                 lambda: tk.reference.gram_autograd(model, [x])):
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        call()
        assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- 6. loader order
def _dataset(n=50):
    return torch.utils.data.TensorDataset(_data(n))


@pytest.mark.parametrize("entry", ["gram", "features", "reference"])
def test_a_shuffling_loader_is_refused_with_the_opt_in(entry):
    model = seeded_mlp()
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=16, shuffle=True)
    call = {"gram": lambda: tk.gram(model, loader, progress=False),
            "features": lambda: tk.features(model, loader, progress=False),
            "reference": lambda: tk.reference.gram_autograd(model, loader)}[entry]
    with pytest.raises(ValueError, match=r"RandomSampler \(shuffle=True\).*tk.LoadedOrder\(loader\)"):
        call()


def test_the_order_as_loaded_is_returned_with_its_indices():
    model, dataset = seeded_mlp(), _dataset()
    torch.manual_seed(5)
    loader = tk.LoadedOrder(torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True))
    K = tk.gram(model, loader, progress=False)
    order = loader.indices
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
    x = dataset.tensors[0]
    assert rel_err(K, tk.reference.gram_autograd(model, [x[order]])) <= 1e-5
    # The same loader as both sides of a cross kernel: one pass, one order, K(X, X).
    K2 = tk.gram(model, loader, None, loader, progress=False)
    assert torch.equal(K2, K2.T)
    assert rel_err(K2, tk.reference.gram_autograd(model, [x[loader.indices]])) <= 1e-5


def test_dropped_samples_are_said_and_the_size_is_right():
    model = seeded_mlp()
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=16, drop_last=True)
    with pytest.warns(RuntimeWarning, match="drops its last 2 sample"):
        K = tk.gram(model, loader, progress=False)
    with pytest.warns(RuntimeWarning, match="drops its last 2 sample"):
        G = tk.features(model, loader, progress=False)
    assert K.shape == (48, 48) and G.shape[0] == 48
    assert rel_err(K, tk.reference.gram_autograd(model, [_dataset().tensors[0][:48]])) <= 1e-5


def test_a_subset_sampler_in_order_gives_its_samples():
    model, dataset = seeded_mlp(), _dataset()
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=list(range(0, 50, 3)))
    G = tk.features(model, loader, progress=False)
    assert G.shape[0] == 17
    assert rel_err(G @ G.T, tk.reference.gram_autograd(model, [dataset.tensors[0][::3]])) <= 1e-5


# ---------------------------------------------------------------- 2. every batch is checked
class CentersLaterBatches(nn.Module):
    """Mixes samples (centering over the batch) only in batches of more than one sample."""

    def __init__(self):
        super().__init__()
        self.body = seeded_mlp()

    def forward(self, x):
        h = self.body[0](x)
        if x.shape[0] > 1:
            h = h - h.mean(0)
        return self.body[2](self.body[1](h))


class StartsMixingAtBatch(nn.Module):
    """Samples interact only once a flag in the input says so (from the third batch on)."""

    def __init__(self):
        super().__init__()
        self.body = seeded_mlp(d=7)

    def forward(self, x):
        h = self.body[0](x)
        if bool(x[0, -1] > 0):
            h = h + h.flip(0)  # each sample sees its mirror in the batch
        return self.body[2](self.body[1](h))


def test_mixing_that_starts_in_a_later_batch_is_caught():
    model = StartsMixingAtBatch()
    x = _data(24, 7)
    x[:, -1] = torch.tensor([-1.0] * 8 + [1.0] * 16)
    loader = [x[i:i + 4] for i in range(0, 24, 4)]
    with pytest.warns(RuntimeWarning, match=r"mix samples within a batch"):
        K = tk.gram(model, loader, progress=False, precision="fp64")
    assert rel_err(K, tk.reference.gram_autograd(model, loader)) <= 1e-10


def test_a_first_batch_of_one_sample_does_not_hide_batch_centering():
    model, x = CentersLaterBatches(), _data(9)
    loader = [x[:1], x[1:5], x[5:]]
    with pytest.warns(RuntimeWarning, match=r"mix samples within a batch"):
        K = tk.gram(model, loader, progress=False, precision="fp64")
    assert rel_err(K, tk.reference.gram_autograd(model, loader)) <= 1e-10


class SequenceFirst(nn.Module):
    """Tokens first ([T, B, d]), as nn.MultiheadAttention(batch_first=False) lays them out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.inner, self.head = nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):  # x: [B, T, d]
        h = torch.tanh(self.inner(x.transpose(0, 1)))  # [T, B, d]
        return self.head(h.mean(0))


@pytest.mark.parametrize("tokens", [4, 8, 3])
def test_every_tensor_is_right_whatever_the_token_count(tokens):
    # tokens == batch size (4) and a multiple of it (8) once made a rule read the tokens as
    # the samples; whatever the rules do, the check must leave every tensor right.
    model, x = SequenceFirst(), torch.randn(8, tokens, 5, generator=torch.Generator().manual_seed(4))
    loader = [x[:4], x[4:]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        G = tk.features(model, loader, progress=False, precision="fp64")
    reference = tk.reference.features_autograd(model, loader)
    index = tk.params.resolve_idx(model, None)
    for piece in index.tensor_slices:  # each tensor against its own norm, not K's
        got, expected = G[:, piece.columns], reference[:, piece.columns]
        assert rel_err(got, expected) <= 1e-10, piece.name


SEEN_BATCH_SIZES = []


class RecordsBatchSizes(CentersLaterBatches):
    def forward(self, x):
        SEEN_BATCH_SIZES.append(x.shape[0])
        return super().forward(x)


def test_no_evaluation_is_a_batch_of_one(monkeypatch):
    # One-sample batches take other kernels, where torch has had bugs (issue #20 item 3):
    # the check, the generic loop and the reference evaluate a sample alone as two copies.
    # (torch.func.vmap shows the model a batch of one per sample while its kernels run on
    # the whole batch; the check compares it with the two copies: tested above.)
    monkeypatch.setattr(tk.tuning.settings, "generic_strategy", "loop")
    model, x = RecordsBatchSizes(), _data(9)
    SEEN_BATCH_SIZES.clear()
    with pytest.warns(RuntimeWarning, match="mix samples"):
        K = tk.gram(model, [x[:4], x[4:]], progress=False, precision="fp64")
    reference = tk.reference.gram_autograd(model, [x[:4], x[4:]])
    assert SEEN_BATCH_SIZES and min(SEEN_BATCH_SIZES) == 2
    assert rel_err(K, reference) <= 1e-10


# ---------------------------------------------------------------- 13. checkpointed forwards
class Checkpointed(nn.Module):
    """Part of the forward recomputed during the backward (torch.utils.checkpoint, non-reentrant),
    as DenseNet(memory_efficient=True) and timm's set_grad_checkpointing() do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.inner, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(lambda t: torch.tanh(self.inner(t)), x, use_reentrant=False)
        return self.head(h)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_a_checkpointed_forward_gives_the_kernel(batched, precision, set_batched):
    set_batched(batched)  # False: every tensor on the generic path
    model, x = Checkpointed(), _data()
    plain = nn.Sequential(model.inner, nn.Tanh(), model.head)
    expected = tk.reference.gram_autograd(plain, [x])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the generic path says it is slower
        K = tk.gram(model, [x[:5], x[5:]], progress=False, precision=precision)
    assert rel_err(K, expected) <= (1e-5 if precision == "fp32" else 1e-12)
    assert rel_err(tk.reference.gram_autograd(model, [x]), expected) <= 1e-12
    assert tk.coverage(model, x).generic == ([] if batched else tk.coverage(model, x).generic)


def test_densenet_memory_efficient_gives_the_kernel():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2,
                                        num_classes=3, memory_efficient=True)
    plain = torchvision.models.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2,
                                        num_classes=3, memory_efficient=False)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    idx = tk.subsample(model, 500, seed=0)
    expected = tk.reference.gram_autograd(plain.double(), [x.double()], idx)
    with pytest.warns(RuntimeWarning, match=r"recomputed during the backward \(torch.utils.checkpoint\)"):
        K = tk.gram(model, [x[:3], x[3:]], idx, progress=False, precision="fp64")
    assert rel_err(K, expected) <= 1e-10
    assert rel_err(tk.reference.gram_autograd(model.double(), [x.double()], idx), expected) <= 1e-12


def test_vmaps_batch_of_one_is_checked_against_the_sample_alone():
    # A model that sums over the batch: vmap (a batch of one per sample) and the sample
    # alone as two copies disagree; the check sends the generic path to the loop.
    from test_persample import SumsOverTheBatch

    torch.manual_seed(6)
    model, x = SumsOverTheBatch(), torch.randn(6, 4)
    with pytest.warns(RuntimeWarning, match=r"torch.func.vmap's per-sample gradients .* differ"):
        K = tk.gram(model, [x[:3], x[3:]], progress=False, precision="fp64")
    assert rel_err(K, tk.reference.gram_autograd(model, [x])) <= 1e-10


def test_rounding_an_fp64_recheck_cleared_is_allowed_later_and_nothing_more():
    from tangent_kernels.persample.extractor import _ROUNDING_MARGIN, FeatureExtractor

    errors = {"a": (2e-3, 1.0), "b": (0.5, 1.0), "c": (1e-5, 1.0)}  # (||difference||, ||alone||)
    judge = FeatureExtractor._failing
    assert set(judge(None, errors, 1e-3)) == {"a", "b"}
    cleared = {"a": 1e-3, "b": 1e-3}  # what an fp64 recheck once called rounding
    assert set(judge(None, errors, 1e-3, cleared)) == {"b"}  # 2e-3 <= 4 x 1e-3; 0.5 is no rounding
    assert _ROUNDING_MARGIN * cleared["b"] < 0.5
