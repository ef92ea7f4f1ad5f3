"""The batched pass: each layer kind against the float64 reference, and what goes generic."""

import pytest
import torch
from torch import nn

import tangent_kernels as tk
from tangent_kernels.persample import resolve_backend
from _models import SharedLinear, TiedHead, resnet18
from _persample_check import CPP, check
from conftest import rel_err


class Tokens(nn.Module):
    """Linear over token dims, Embedding with padding_idx, LayerNorm over two dims."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(17, 6, padding_idx=3)
        self.norm = nn.LayerNorm([5, 6])
        self.lin = nn.Linear(6, 4)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, tokens):
        h = self.lin(self.norm(self.embed(tokens)))  # [B, 5, 4]: Linear over a token dim
        return self.head(torch.tanh(h).mean(1))


def test_linear_embedding_layernorm():
    tokens = torch.randint(0, 17, (6, 5))
    tokens[0, :2] = 3  # padding_idx rows get no gradient
    check(Tokens(), tokens)


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv1d(3, 6, 4, stride=2, padding=3, dilation=2),
        lambda: nn.Conv1d(3, 6, 4, padding="same", padding_mode="circular"),
        lambda: nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 2), groups=3),
        lambda: nn.Conv2d(3, 3, 3, padding="same", groups=3, padding_mode="reflect", bias=False),  # depthwise
        lambda: nn.Conv2d(3, 6, 2, padding="same", dilation=3, padding_mode="replicate"),  # even kernel
        lambda: nn.Conv3d(3, 4, (2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1)),
    ],
    ids=["conv1d-stride-dilation", "conv1d-same-circular", "conv2d-groups", "depthwise-reflect",
         "conv2d-even-same-replicate", "conv3d"],
)
def test_convolutions(conv):
    torch.manual_seed(1)
    layer = conv()
    ndim = layer.weight.dim() - 2
    x = torch.randn((5, 3) + (7,) * ndim)
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    model(x)  # materialize the lazy head
    check(model, x)


@pytest.mark.parametrize("unfold", [True, False], ids=["unfold-bmm", "grouped-backward"])
@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv1d(4, 5, 3, stride=2, padding=2, dilation=2),
        lambda: nn.Conv2d(4, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        lambda: nn.Conv2d(4, 5, 3, padding="same", padding_mode="reflect"),
    ],
    ids=["conv1d", "conv2d-stride-dilation", "conv2d-same-reflect"],
)
def test_dense_conv_gradients_by_either_strategy(conv, unfold, monkeypatch):
    """The whole per-sample conv gradients (densely sampled, CPU) come from the grouped
    backward or from unfold + one batched GEMM, by the patch width per position; both
    against the float64 reference (the sampled-entries columns included: idx a subsample)."""
    from tangent_kernels.persample import conv as conv_rule

    monkeypatch.setattr(conv_rule, "_UNFOLD_MIN_PATCH_PER_POSITION", 0 if unfold else 10 ** 9)
    torch.manual_seed(3)
    layer = conv()
    ndim = layer.weight.dim() - 2
    x = torch.randn((6, 4) + (8,) * ndim)
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    model(x)
    check(model, x, backends=["cpp"] if CPP else ["torch"])
    subsample = tk.subsample(model, sum(p.numel() for p in model.parameters()) // 2, seed=0)
    check(model, x, subsample, backends=["cpp"] if CPP else ["torch"])


@pytest.mark.parametrize("norm", ["batch1d", "batch2d", "batch3d", "group"])
def test_norms(norm):
    torch.manual_seed(2)
    make = {
        "batch1d": (lambda: nn.BatchNorm1d(4), (6, 4)),
        "batch2d": (lambda: nn.BatchNorm2d(4), (6, 4, 3, 3)),
        "batch3d": (lambda: nn.BatchNorm3d(4), (6, 4, 2, 2, 2)),
        "group": (lambda: nn.GroupNorm(2, 4), (6, 4, 3, 3)),
    }[norm]
    layer, shape = make[0](), make[1]
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.running_mean.uniform_(-0.3, 0.3)
            layer.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(int(torch.tensor(shape[1:]).prod()), 2))
    check(model, torch.randn(shape))


class InplaceResidual(nn.Module):
    """The resnet pattern: `out += identity` on a BatchNorm output, then ReLU(inplace)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(3 * 6 * 6, 2)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x
        return self.head(self.relu(out).flatten(1))


def test_inplace_ops_after_a_tap_do_not_corrupt_it():
    torch.manual_seed(3)
    model = InplaceResidual()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.3, 0.3)
    check(model, torch.randn(6, 3, 6, 6), output="sum")


def test_resnet18_is_fully_tapped():
    torch.manual_seed(4)
    model = resnet18()
    # The interpreter is too slow for resnet18: Triton is covered by the layer tests above.
    check(model, torch.randn(4, 3, 32, 32), tk.subsample(model, 30_000, seed=1), backends=["torch"] + CPP)


def test_shared_and_tied_parameters_are_batched():
    torch.manual_seed(5)
    check(SharedLinear(), torch.randn(6, 5))
    check(TiedHead(), torch.randint(0, 11, (6, 4)))


class CustomScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x * self.scale)


def test_a_raw_parameter_in_an_elementwise_op_is_batched():
    check(CustomScale(), torch.randn(5, 4))


class Recurrent(nn.Module):
    """nn.LSTM / GRU / RNN: no rule knows their fused ops; the per-op fallback evaluates
    each op alone one sample at a time (batch first or not, stacked layers)."""

    def __init__(self, cell, batch_first):
        super().__init__()
        self.rnn = cell(3, 4, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        if not self.rnn.batch_first:
            x = x.transpose(0, 1)
        out = self.rnn(x)[0]
        return self.head((out if self.rnn.batch_first else out.transpose(0, 1))[:, -1])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_cells_are_differentiated_per_op(cell, batch_first):
    torch.manual_seed(6)
    check(Recurrent(cell, batch_first), torch.randn(6, 5, 3), backends=["torch"] + CPP)


class SumsOverTheBatch(nn.Module):
    """A parameter meets data in an op whose result has no batch dim: nothing batched can
    serve it, so it (alone) takes the generic path. (The sum over the batch adds the same
    number to every sample's output: the head's per-sample gradients do not see it.)"""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(x) + torch.einsum("bi,ij->j", x, self.w).sum()


def test_uncovered_parameters_go_generic_alone():
    torch.manual_seed(6)
    with pytest.warns(RuntimeWarning, match=r"1 parameter tensor\(s\) .* generic per-sample path.*w \(.*einsum"):
        check(SumsOverTheBatch(), torch.randn(6, 4), generic={"w"})


class InputChangedAfterUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(x)
        y = self.lin(h)
        h.mul_(2)  # the Linear's saved input changes: its weight gradient cannot be read
        return y


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*\['auto', 'torch', 'cpp', 'cuda', 'triton'\]"):
        tk.gram(CustomScale(), [torch.randn(2, 4)], progress=False, backend="fast")


def test_compiled_backend_on_the_wrong_device():
    with pytest.raises(ValueError, match=r"backend='cuda' runs on CUDA tensors, not cpu; use backend='cpp'"):
        tk.gram(CustomScale(), [torch.randn(2, 4)], progress=False, backend="cuda")


def test_auto_picks_cpp_on_cpu_when_built():
    assert resolve_backend("auto", torch.device("cpu")) == ("cpp" if CPP else "torch")


def test_cpp_backend_without_the_extension_names_info():
    """With the extension disabled, backend='cpp' says what is missing and where to look."""
    import subprocess
    import sys

    code = ("import torch, tangent_kernels as tk\n"
            "try:\n    tk.persample.resolve_backend('cpp', torch.device('cpu'))\n"
            "except ValueError as e:\n    print(e)\n")
    env = dict(__import__("os").environ, TANGENT_KERNELS_NO_EXT="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "backend='cpp' needs the compiled extension" in result.stdout, result.stdout + result.stderr
    assert "tangent_kernels.info()" in result.stdout


def test_input_modified_after_the_layer_raises_like_autograd():
    model, x = InputChangedAfterUse(), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        tk.reference.gram_autograd(model, [x])
    # vmap fails first (said with a warning), then the exact per-sample loop raises like autograd.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"), \
            pytest.warns(RuntimeWarning, match="vmap could not batch this model"):
        tk.gram(model, [x], progress=False)


@pytest.mark.skipif(not CPP, reason="the C++ extension with the sampled-gradient CPU kernels is not built")
def test_cpp_backend_writes_straight_into_the_feature_block(monkeypatch):
    """backend='cpp' hands the engine's block to the ops (no [B, m] temporary), and K is right."""
    calls = []
    for name in ("sampled_linear_grad", "sampled_conv_grad"):
        original = getattr(tk.ops, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, kwargs.get("out") is not None))
            return _original(*args, **kwargs)

        monkeypatch.setattr(tk.ops, name, spy)
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x = torch.randn(4, 2, 6, 6)
    # Sparsely sampled: a whole or dense weight takes one batched product instead.
    idx = tk.subsample(model, sum(p.numel() for p in model.parameters()) // 20, seed=0)
    ref = tk.reference.gram_autograd(model, [x], idx)
    k = tk.gram(model, [x], idx, precision="fp64", progress=False, backend="cpp")
    assert rel_err(k, ref) <= 1e-10
    assert {name for name, _ in calls} == {"sampled_linear_grad", "sampled_conv_grad"}
    assert all(in_place for _, in_place in calls), calls


@pytest.mark.gpu
def test_auto_picks_the_cuda_kernels_on_a_gpu_when_built():
    from tangent_kernels import kernels

    expected = "cuda" if tk.ops.has_sampled_kernels("cuda") else ("triton" if kernels.available() else "torch")
    assert resolve_backend("auto", torch.device("cuda")) == expected
