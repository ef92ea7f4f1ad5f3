"""tk.Kernel: repeated calls equal a fresh tk.gram / the float64 reference at the model's
weights of the time, through optimizer steps, writes through .data, buffer updates and
structure changes; the per-batch check keeps running on every call."""

import warnings

import pytest
import torch
from torch import nn

import tangent_kernels as tk
from tangent_kernels.reference import features_autograd, gram_autograd

# (atol relative to K's largest entry) per precision
TOL = {"fp32": 2e-5, "fp64": 1e-11}


def close(k, reference, precision):
    scale = reference.abs().max().item()
    assert k.shape == reference.shape
    assert (k.double() - reference).abs().max().item() <= TOL[precision] * scale, (k.double() - reference).abs().max()


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g)


def sgd_step(model, x, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
@pytest.mark.parametrize("structured", ["auto", "never", "always"])
@pytest.mark.parametrize("output", ["first", "sum"])
def test_exact_after_optimizer_steps(precision, structured, output):
    model, x = mlp(), data()
    loader = [x[:5], x[5:]]  # two batches: the check runs on each
    kernel = tk.Kernel(model, output=output, precision=precision, structured=structured)
    for step in range(3):
        close(kernel.gram(loader, progress=False), gram_autograd(model, loader, output=output), precision)
        sgd_step(model, x)
    assert kernel.rebuilds == 0  # the same structure throughout: nothing derived again


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_exact_after_writes_that_move_no_version_counter(precision):
    # p.data.mul_() moves no _version: a float64 copy of the weights must be read again anyway.
    model, x = mlp(), data()
    kernel = tk.Kernel(model, precision=precision)
    kernel.gram([x], progress=False)
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(1.5)
    close(kernel.gram([x], progress=False), gram_autograd(model, [x]), precision)
    model.load_state_dict(mlp(seed=3).state_dict())
    close(kernel.gram([x], progress=False), gram_autograd(model, [x]), precision)


class Scaled(nn.Module):
    """A buffer the forward reads: its updates must reach the kernel."""

    def __init__(self):
        super().__init__()
        self.inner = mlp()
        self.register_buffer("scale", torch.ones(6))

    def forward(self, x):
        return self.inner(x * self.scale)


def test_exact_after_buffer_updates():
    model, x = Scaled(), data()
    kernel = tk.Kernel(model, output="sum")
    kernel.gram([x], progress=False)
    model.scale.mul_(3.0)
    close(kernel.gram([x], progress=False), gram_autograd(model, [x], output="sum"), "fp32")
    model.scale = torch.full((6,), 0.25)  # a new tensor for the buffer
    close(kernel.gram([x], progress=False), gram_autograd(model, [x], output="sum"), "fp32")


def test_batchnorm_running_statistics_after_training_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).eval()
    x = data(16)
    kernel = tk.Kernel(model, precision="fp64")
    kernel.gram([x], progress=False)
    for _ in range(2):
        sgd_step(model, x)  # train mode: the running statistics move too
    close(kernel.gram([x], progress=False), gram_autograd(model, [x]), "fp64")


def test_structure_changes_derive_everything_again():
    model, x = mlp(), data()
    kernel = tk.Kernel(model, output="sum")
    kernel.gram([x], progress=False)
    model[2] = nn.Linear(16, 16)  # a module replaced
    close(kernel.gram([x], progress=False), gram_autograd(model, [x], output="sum"), "fp32")
    model[0].weight = nn.Parameter(torch.randn(16, 6))  # a parameter replaced
    close(kernel.gram([x], progress=False), gram_autograd(model, [x], output="sum"), "fp32")
    model[0].bias.requires_grad_(False)  # idx=None: the trainable parameters of the time
    k = kernel.gram([x], progress=False)
    close(k, gram_autograd(model, [x], output="sum"), "fp32")
    assert kernel.index.layout.total == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert kernel.rebuilds == 3


def test_an_idx_for_another_layout_is_refused_after_a_structure_change():
    model, x = mlp(), data()
    kernel = tk.Kernel(model, tk.subsample(model, 50, seed=0))
    close(kernel.gram([x], progress=False), gram_autograd(model, [x], tk.subsample(model, 50, seed=0)), "fp32")
    model[4] = nn.Linear(16, 5)
    with pytest.raises(ValueError, match="different parameter layout"):
        kernel.gram([x], progress=False)


class Mixing(nn.Module):
    """Mixes the samples of a batch once ``mix`` is set: the check must see it on a later call."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(6, 16), nn.Linear(16, 2)
        self.mix = False

    def forward(self, x):
        h = torch.tanh(self.body(x))
        if self.mix:
            h = h + 0.5 * h.mean(0, keepdim=True)
        return self.head(h)


def test_the_check_runs_on_every_call_and_can_drop_the_structured_plan():
    torch.manual_seed(0)
    model, x = Mixing(), data()
    kernel = tk.Kernel(model, output="sum", structured="always")
    close(kernel.gram([x[:6], x[6:]], progress=False), gram_autograd(model, [x], output="sum"), "fp32")
    model.mix = True  # no structure change: the kept decisions are reused, and the check must catch it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the check's warning that samples are mixed
        k = kernel.gram([x[:6], x[6:]], progress=False)
    close(k, gram_autograd(model, [x], output="sum"), "fp32")
    # and on a third call the tensors it moved to the generic path stay there, still exact
    close(kernel.gram([x[:6], x[6:]], progress=False), gram_autograd(model, [x], output="sum"), "fp32")


def test_features_and_cross_follow_the_weights():
    model, x = mlp(), data()
    test = data(5, seed=7)
    kernel = tk.Kernel(model, precision="fp64", output=1)
    for _ in range(2):
        f = kernel.features([x], progress=False)
        close(f, features_autograd(model, [x], output=1), "fp64")
        close(kernel.cross([test], [x], progress=False), gram_autograd(model, [test], None, [x], output=1), "fp64")
        close(kernel.gram([x], progress=False), gram_autograd(model, [x], output=1), "fp64")
        sgd_step(model, x)


def test_equals_one_shot_gram_bit_for_bit_on_unchanged_weights():
    model, x = mlp(), data()
    kernel = tk.Kernel(model, output="sum")
    first = kernel.gram([x[:7], x[7:]], progress=False)
    assert torch.equal(kernel.gram([x[:7], x[7:]], progress=False), first)
    assert torch.equal(tk.gram(model, [x[:7], x[7:]], output="sum", progress=False), first)


def test_clear_and_run_options():
    model, x = mlp(), data()
    kernel = tk.Kernel(model)
    out = torch.empty(12, 12)
    assert kernel.gram([x], progress=False, out=out) is out
    kernel.clear()
    close(kernel.gram([x], progress=False), gram_autograd(model, [x]), "fp32")


def test_fixed_options_and_the_distributed_path_are_refused_per_call():
    kernel = tk.Kernel(mlp())
    with pytest.raises(TypeError, match="precision is fixed"):
        kernel.gram([data()], precision="fp64")
    with pytest.raises(TypeError, match="tk.gram for the distributed path"):
        kernel.gram([data()], group=None)
    with pytest.raises(ValueError, match="unknown precision"):
        tk.Kernel(mlp(), precision="fp128")
    with pytest.raises(TypeError, match="nn.Module"):
        tk.Kernel(lambda x: x)


def test_the_model_is_left_as_it_was():
    model, x = Scaled(), data()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tk.Kernel(model).gram([x], progress=False)
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_non_contiguous_parameter_is_read_again():
    # The batched pass works on a contiguous copy of such a tensor: updates must reach it.
    model, x = mlp(), data()
    model[2].weight = nn.Parameter(torch.randn(16, 16).t())
    kernel = tk.Kernel(model, output="sum")
    kernel.gram([x], progress=False)
    sgd_step(model, x)
    close(kernel.gram([x], progress=False), gram_autograd(model, [x], output="sum"), "fp32")


def test_other_input_shapes_on_a_later_call():
    # The kept decisions were made on 8x8 images; 12x12 ones must come out exact too.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 3))
    kernel = tk.Kernel(model, output="sum", precision="fp64")
    small, large = torch.randn(6, 1, 8, 8), torch.randn(5, 1, 12, 12)
    close(kernel.gram([small], progress=False), gram_autograd(model, [small], output="sum"), "fp64")
    close(kernel.gram([large], progress=False), gram_autograd(model, [large], output="sum"), "fp64")


@pytest.mark.parametrize("output", ["full", "trace"])
def test_every_logit_after_optimizer_steps(output):
    model, x = mlp(), data(8)
    kernel = tk.Kernel(model, output=output, precision="fp64")
    for _ in range(2):
        sgd_step(model, x)
        fresh = tk.gram(model, [x[:3], x[3:]], output=output, precision="fp64", progress=False)
        k = kernel.gram([x[:3], x[3:]], progress=False)
        assert k.shape == fresh.shape
        assert (k - fresh).abs().max() <= 1e-11 * fresh.abs().max()


def test_kernels_of_other_idx_or_output_on_one_model_do_not_interfere():
    model, x = mlp(), data()
    idx = tk.subsample(model, 40, seed=1)
    a, b = tk.Kernel(model, idx, output=0), tk.Kernel(model, output="sum")
    for _ in range(2):
        close(a.gram([x], progress=False), gram_autograd(model, [x], idx, output=0), "fp32")
        close(b.gram([x], progress=False), gram_autograd(model, [x], output="sum"), "fp32")
        sgd_step(model, x)


def checked_sizes(kernel, monkeypatch):
    """The sizes of the batches the check ran on, in order."""
    from tangent_kernels.persample.extractor import FeatureExtractor

    sizes, verify = [], FeatureExtractor._verify

    def recorded(self, batch, block, factors):
        sizes.append(batch.size)
        return verify(self, batch, block, factors)

    monkeypatch.setattr(FeatureExtractor, "_verify", recorded)
    return sizes


def test_the_first_call_checks_every_batch_and_later_calls_one_per_loader_rotating(monkeypatch):
    model, x = mlp(), data()
    kernel = tk.Kernel(model, output="sum", structured="never")
    sizes = checked_sizes(kernel, monkeypatch)
    loader = [x[:3], x[3:7], x[7:]]  # sizes 3, 4, 5 tell the batches apart
    kernel.gram(loader, progress=False)
    assert sizes == [3, 4, 5]
    later = []
    for call in range(3):
        sgd_step(model, x)
        del sizes[:]
        close(kernel.gram(loader, progress=False), gram_autograd(model, loader, output="sum"), "fp32")
        assert len(sizes) == 1  # at least one batch, the shapes of the others passed before
        later += sizes
    assert sorted(later) == [3, 4, 5]  # a different batch each call: over three calls, all
    del sizes[:]
    kernel.features(loader, progress=False)  # the features path checks every batch
    assert sizes == [3, 4, 5]
    del sizes[:]
    kernel.cross(loader, [x[:3], x[3:]], progress=False)  # one per loader
    assert len(sizes) == 2
    del sizes[:]
    kernel.gram(loader + [x[:2]], progress=False)  # a batch size no check passed on is checked
    assert 2 in sizes and len(sizes) <= 2  # and the rotation's one, unless that is it
    model.flag = True  # a plain attribute set: the computation may differ, every batch is checked
    del sizes[:]
    kernel.gram(loader, progress=False)
    assert sizes == [3, 4, 5]


class MixingByBuffer(nn.Module):
    """Each sample sees its mirror in the batch once its buffer says so (no attribute
    changes, a buffer does): a mixing the batched pass cannot see, the check can."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(6, 16), nn.Linear(16, 2)
        self.register_buffer("mix", torch.zeros(()))

    def forward(self, x):
        h = self.body(x)
        if bool(self.mix > 0):
            h = h + 0.5 * h.flip(0)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("structured", ["never", "always"])
def test_a_check_failing_in_a_call_that_spared_batches_computes_the_call_again(structured, monkeypatch):
    redone = []
    for calls_before in range(1, 4):  # the rotation then checks each of the three batches once
        torch.manual_seed(0)
        model, x = MixingByBuffer(), data()
        loader = [x[:4], x[4:8], x[8:]]
        kernel = tk.Kernel(model, output="sum", structured=structured)
        sizes = checked_sizes(kernel, monkeypatch)
        for _ in range(calls_before):
            kernel.gram(loader, progress=False)
        model.mix.fill_(1.0)  # every batch mixes from now on; the check sees it on the one batch it checks
        del sizes[:]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the check's warning that samples are mixed
            k = kernel.gram(loader, progress=False)
        close(k, gram_autograd(model, [x], output="sum"), "fp32")
        redone.append(len(sizes) > 1)
    # Where batches before the failing one went unchecked, the call was computed again
    # (every batch checked); where the first batch failed, the rest went to the exact loop.
    assert any(redone)


def test_a_dataloader_is_rotated_and_a_loader_of_unknown_length_checked_whole(monkeypatch):
    from torch.utils.data import DataLoader, IterableDataset, TensorDataset

    class Stream(IterableDataset):
        def __init__(self, x):
            self.x = x

        def __iter__(self):
            return iter(self.x.split(4))

    model, x = mlp(), data()
    kernel = tk.Kernel(model, output="sum", structured="never")
    sizes = checked_sizes(kernel, monkeypatch)
    loader = DataLoader(TensorDataset(x), batch_size=4)  # 3 batches, len() = 3
    stream = DataLoader(Stream(x), batch_size=None)  # no length known ahead
    for source, later in ((loader, 1), (stream, 3)):
        kernel.gram(source, progress=False)
        sgd_step(model, x)
        del sizes[:]
        close(kernel.gram(source, progress=False), gram_autograd(model, [x], output="sum"), "fp32")
        assert len(sizes) == later
