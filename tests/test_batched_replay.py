"""What the batched pass keeps from one batch to the next (the sampled leaves' kinds, the
index plans of the linear uses, which tokens are dead) must never replay a stale
decision: batches whose shapes change, a last smaller batch, uses that differ between
batches of the same shapes, one weight seen through different views. K against the
float64 reference on fresh random inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tangent_kernels as tk
from conftest import rel_err


class Switching(nn.Module):
    """The same function computed along other paths depending on the batch's size, so
    that the uses of a batch are not those of the one before: ``w`` through F.linear
    ([out, in]), a matmul by its transpose or an addmm over flattened rows; the norms'
    affine parameters inside F.layer_norm or applied after it; a projection as a module
    or functionally. Sample b's output never depends on the rest of its batch."""

    def __init__(self, d=6, length=5):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / 2)
        self.b = nn.Parameter(torch.randn(d))
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.norm2_w = nn.Parameter(1 + torch.randn(length, d) / 4)
        self.norm2_b = nn.Parameter(torch.randn(length, d) / 4)
        self.head = nn.Linear(d, 1)

    def forward(self, x):  # [B, T, d]
        batch, length, d = x.shape
        path = 0 if batch >= 4 else 1 if batch == 3 else 2
        h = self.norm(x) if path != 1 else F.layer_norm(x, (d,)) * self.norm.weight + self.norm.bias
        if path == 0:
            h = torch.tanh(F.linear(h, self.w, self.b))
        elif path == 1:
            h = torch.tanh(h @ self.w.T + self.b)
        else:
            h = torch.tanh(torch.addmm(self.b, h.reshape(-1, d), self.w.T).reshape(batch, length, d))
        h = torch.tanh(self.proj(h) if path != 2 else F.linear(h, self.proj.weight, self.proj.bias))
        if path == 0:
            h = F.layer_norm(h, (length, d), self.norm2_w, self.norm2_b)
        else:
            h = F.layer_norm(h, (length, d)) * self.norm2_w + self.norm2_b
        return self.head(h[:, -1])  # the last token only: the others are dead for the head


def _batches(seed):
    """Batches of 5, 3, 5 and a last smaller one of 2: each takes other paths than the
    one before."""
    torch.manual_seed(seed)
    return [torch.randn(n, 5, 6) for n in (5, 3, 5, 2)]


@pytest.mark.parametrize("sampled", [None, 60])
def test_decisions_are_not_replayed_across_changing_batches(sampled):
    torch.manual_seed(0)
    model = Switching().eval()
    loader = _batches(1)
    idx = None if sampled is None else tk.subsample(model, sampled, seed=2)
    for batch in loader:  # every batch on the batched path: this tests it, not the fallback
        assert tk.coverage(model, batch, idx).generic == []
    for order in (loader, loader[::-1]):  # the other order: the first batch decides otherwise
        ref = tk.reference.gram_autograd(model, order, idx)
        K = tk.gram(model, order, idx, precision="fp64", progress=False)
        assert rel_err(K, ref) <= 1e-10
        K32 = tk.gram(model, order, idx, progress=False)
        assert rel_err(K32, ref) <= 1e-5


class NormLayouts(nn.Module):
    """Norm affine parameters on every layout the one-use form takes or declines: the
    normalized shape over one or two dims, weight or bias alone, an RMS norm, a weight
    computed from a parameter (1 + w), and samples on dim 1 (sequence first)."""

    def __init__(self, d=4, length=3):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.ln2 = nn.LayerNorm((length, d))
        self.w_only = nn.LayerNorm(d, bias=False)
        self.gain = nn.Parameter(torch.randn(d) / 4)
        self.bias_only = nn.Parameter(torch.randn(d))
        self.rms = nn.Parameter(1 + torch.randn(d) / 4)

    def forward(self, x):  # [B, T, d]
        h = self.ln2(torch.tanh(self.ln(x)))
        h = torch.tanh(self.w_only(h))
        h = F.layer_norm(h, (h.shape[-1],), 1 + self.gain, None)
        h = F.layer_norm(h, (h.shape[-1],), None, self.bias_only)
        if hasattr(F, "rms_norm"):
            h = F.rms_norm(h, (h.shape[-1],), self.rms)
        seq_first = F.layer_norm(torch.tanh(h).transpose(0, 1), (h.shape[-1],), self.gain, self.bias_only)
        return (h.sum(dim=(1, 2)) + seq_first.pow(2).sum(dim=(0, 2)))[:, None]


@pytest.mark.parametrize("sampled", [None, 20])
def test_norm_affine_parameters_on_every_layout(sampled):
    torch.manual_seed(3)
    model = NormLayouts().eval()
    loader = [torch.randn(4, 3, 4), torch.randn(3, 3, 4)]
    idx = None if sampled is None else tk.subsample(model, sampled, seed=4)
    assert tk.coverage(model, loader[0], idx).generic == []
    ref = tk.reference.gram_autograd(model, loader, idx)
    K = tk.gram(model, loader, idx, precision="fp64", progress=False)
    assert rel_err(K, ref) <= 1e-10
    paths = {name: path for name, _, path in tk.coverage(model, loader[0]).rows}
    assert paths["gain"] == "broadcast (autograd), broadcast" and paths["ln.weight"] == "broadcast", paths


class TableViews(nn.Module):
    """Tables read at shared indices, then viewed and copied before they meet the data:
    an index buffer (with negative positions in one), a boolean mask (not a lookup), an
    embedding permuted and unsqueezed (T5's bias), a view made contiguous (Swin's)."""

    def __init__(self, d=4, length=3):
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * length - 1, 2))
        self.wrapped = nn.Parameter(torch.randn(2 * length - 1, 2))
        self.masked = nn.Parameter(torch.randn(length, d))
        self.bias = nn.Embedding(2 * length - 1, 2)
        positions = torch.arange(length)
        self.register_buffer("relative", positions[:, None] - positions[None, :] + length - 1)
        self.register_buffer("keep", torch.tensor([True, False, True]))
        self.proj = nn.Linear(d, d)

    def forward(self, x):  # [B, T, d] with T = length, d = 4
        h = torch.tanh(self.proj(x))
        scores = (h[..., :3] @ h[..., :3].transpose(1, 2)).unsqueeze(1)  # [B, 1, T, T]
        scores = scores + self.table[self.relative.reshape(-1)].view(3, 3, 2).permute(2, 0, 1).contiguous()
        scores = scores + self.wrapped[self.relative - 2 * 3 + 1].permute(2, 0, 1)[:1]  # negative positions
        scores = scores + self.bias(self.relative).permute(2, 0, 1).unsqueeze(0)[:, :1]
        h = h + self.masked[self.keep].sum(0)
        return (torch.tanh(scores).sum(dim=(1, 2, 3)) + h.pow(2).sum(dim=(1, 2)))[:, None]


@pytest.mark.parametrize("sampled", [None, 25])
def test_views_of_tables_read_at_shared_indices(sampled):
    torch.manual_seed(5)
    model = TableViews().eval()
    loader = [torch.randn(4, 3, 4), torch.randn(2, 3, 4)]
    idx = None if sampled is None else tk.subsample(model, sampled, seed=6)
    assert tk.coverage(model, loader[0], idx).generic == []
    ref = tk.reference.gram_autograd(model, loader, idx)
    K = tk.gram(model, loader, idx, precision="fp64", progress=False)
    assert rel_err(K, ref) <= 1e-10
    paths = {name: path for name, _, path in tk.coverage(model, loader[0]).rows}
    lookup = "broadcast (embedding (shared indices))"
    assert paths["table"] == paths["bias.weight"] == lookup and paths["wrapped"] != lookup, paths


class _ScalesInPlace(nn.Module):
    def forward(self, x):
        return x.mul_(2)


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(_ScalesInPlace(), nn.Linear(4, 4))
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.block(x)))


def test_the_module_that_writes_its_input_in_place_is_named():
    """Which module was running is read from the frames when the write happens (no hook
    on every module call): the innermost one, here a submodule of a submodule."""
    x = torch.randn(4, 4)
    before = x.clone()
    with pytest.raises(ValueError, match=r"writes its input in place \(TensorBase.mul_ in module 'block.0'\)"):
        tk.gram(_Outer(), [x], progress=False)
    assert torch.equal(x, before)
