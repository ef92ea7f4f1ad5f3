"""The samples' dimension of every activation is known by provenance, never by its size:
samples folded with windows ([B * nW, T, C]), with image rows ([B * H, W, C]) or
sequence first ([T, B, d], [T * B, d]) where a size equals the batch size. Each model
is checked at a batch size equal to the misleading size and at others, K in fp32 and
fp64 against the float64 per-sample reference and every tensor's features on their
own (a small tensor can be wholly wrong while K is barely off)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tangent_kernels as tk
from _persample_check import CPP, check, generic_after_one_batch
from conftest import rel_err

BACKENDS = ["torch"] + CPP


def per_tensor_errors(model, batch, at, floor=0.0):
    """Relative error of each tensor's fp32 features against the float64 reference."""
    halves = [batch[:at], batch[at:]]
    got = tk.features(model, halves, progress=False, backend="torch").double()
    ref = tk.reference.features_autograd(model, [batch])
    errors, start = {}, 0
    for name, p in model.named_parameters():
        cols = slice(start, start + p.numel())
        start += p.numel()
        scale = max(float(ref[:, cols].norm()), floor * float(ref.norm()), 1e-30)
        errors[name] = float((got[:, cols] - ref[:, cols]).norm()) / scale
    return errors


def assert_exact(model, batch, at, floor=0.0):
    """K within the precision's bound, every tensor batched, every tensor's features right
    (floor: relative to the whole block, for tensors whose exact gradient is 0, e.g. the
    key bias of attention, where fp32 rounding alone is the whole of what is left)."""
    assert generic_after_one_batch(model, batch[:at]) == set()
    check(model, batch, at=at, backends=BACKENDS)
    bad = {name: err for name, err in per_tensor_errors(model, batch, at, floor).items() if err > 1e-4}
    assert not bad, bad


class Windows(nn.Module):
    """Swin-style window attention: [B, H, W, C] -> [B * nW, T, C] windows of T tokens."""

    def __init__(self, window=2, dim=6, heads=2):
        super().__init__()
        self.window, self.heads = window, heads
        tokens = window * window
        self.embed = nn.Linear(3, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens) / 2)  # relative-position bias
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):  # [B, H, W, 3]
        batch, height, width, _ = x.shape
        ws, heads = self.window, self.heads
        x = self.embed(x)
        dim = x.shape[-1]
        w = x.view(batch, height // ws, ws, width // ws, ws, dim).permute(0, 1, 3, 2, 4, 5)
        w = w.reshape(-1, ws * ws, dim)  # [B * nW, T, C]
        rows, tokens = w.shape[:2]
        qkv = self.qkv(w).reshape(rows, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)
        attn = (attn + self.bias.unsqueeze(0)).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(rows, tokens, dim)
        out = self.proj(out)
        out = out.view(batch, height // ws, width // ws, ws, ws, dim).permute(0, 1, 3, 2, 4, 5)
        x = x + out.reshape(batch, height, width, dim)
        return self.head(self.norm(x).mean((1, 2)))


@pytest.mark.parametrize("batch", [4, 3, 8])  # windows of 4 tokens: 4 is the misleading size
def test_window_fold(batch):
    torch.manual_seed(0)
    model = Windows()
    x = torch.randn(2 * batch, 4, 4, 3)
    assert_exact(model, x, batch)


@pytest.mark.parametrize("batch", [16, 8])
def test_torchvision_swin_with_windows_of_batch_size_tokens(batch):
    """The issue's case: windows of 16 tokens read as sequence first at batch size 16
    (proj and qkv of features.1 off by 80-160%, K by 1e-2 in fp32)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4], num_classes=3)
    x = torch.randn(2 * batch, 3, 32, 32)
    assert_exact(model, x, batch, floor=1e-6)


class Rows(nn.Module):
    """Axial attention along image rows: [B, C, H, W] -> [B * H, W, C]."""

    def __init__(self, dim=5):
        super().__init__()
        self.conv = nn.Conv2d(2, dim, 1)
        self.attn = nn.MultiheadAttention(dim, 1, batch_first=True)
        self.mix = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.randn(dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # [B, 2, H, W]
        batch, _, height, width = x.shape
        x = self.conv(x)
        r = x.permute(0, 2, 3, 1).reshape(batch * height, width, -1)  # [B * H, W, C]
        r = r + self.attn(r, r, r, need_weights=False)[0]
        r = torch.tanh(self.mix(r)) * self.scale
        return self.head(r.reshape(batch, height, width, -1).mean((1, 2)))


@pytest.mark.parametrize("batch", [4, 2, 3])  # rows of 4 pixels
def test_row_fold(batch):
    torch.manual_seed(1)
    model = Rows()
    x = torch.randn(2 * batch, 2, 3, 4)
    assert_exact(model, x, batch)


class SequenceFirst(nn.Module):
    """[B, T, d] -> [T, B, d] (sequence first) -> [T * B, d] (samples minor)."""

    def __init__(self, d=4):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.pos = nn.Parameter(torch.randn(8, 1, d) / 2)
        self.mid = nn.Linear(d, d)
        self.emb = nn.Embedding(7, d)
        self.out = nn.Linear(d, 2)

    def forward(self, x, ids):  # x [B, T, 3], ids [B, T]
        batch, length, _ = x.shape
        h = self.inp(x).transpose(0, 1) + self.pos[:length]  # [T, B, d]
        h = h + self.emb(ids.t())
        flat = torch.tanh(self.mid(h.reshape(length * batch, -1)))  # [T * B, d]: sample b at rows b, B + b, ...
        h = flat.reshape(length, batch, -1)
        return self.out(h.mean(0))


@pytest.mark.parametrize("batch, length", [(4, 4), (2, 4), (4, 8), (3, 5)])
def test_sequence_first(batch, length):
    torch.manual_seed(2)
    model = SequenceFirst()
    data = {"x": torch.randn(2 * batch, length, 3), "ids": torch.randint(0, 7, (2 * batch, length))}
    assert generic_after_one_batch(model, {k: v[:batch] for k, v in data.items()}) == set()
    check(model, data, at=batch, backends=BACKENDS)


# --- a reshape that moves the samples to another dim; where no dim holds them, generic ----
class Interleaved(nn.Module):
    """[B, T, d] -> [T, B, d] -> reshaped back to [B, T, d] (a shape that reads batch first,
    but whose dim 0 holds tokens): the samples are on dim 1 when B divides T, and on no
    dim otherwise."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        batch, length, d = x.shape
        y = self.lin(x.transpose(0, 1).reshape(batch, length, d))
        return y.reshape(length, batch, d).transpose(0, 1).pow(2).sum((1, 2))


@pytest.mark.parametrize("batch, length", [(4, 4), (2, 4), (2, 3)])
def test_reshape_moves_the_samples(batch, length):
    torch.manual_seed(3)
    model = Interleaved()
    x = torch.randn(2 * batch, length, 3)
    lost = length % batch != 0
    assert generic_after_one_batch(model, x[:batch]) == ({"lin.weight", "lin.bias"} if lost else set())
    if lost:
        report = tk.coverage(model, x[:batch])
        assert {name for name, _ in report.generic} == {"lin.weight", "lin.bias"}
        path = {name: p for name, _, p in report.rows}["lin.weight"]
        assert "samples" in path and "reshape" in path, path
    # the loader's two batches of `batch` samples; the whole batch (one of 2 * batch) is what
    # check() asks the generic set of
    whole = {"lin.weight", "lin.bias"} if length % (2 * batch) else set()
    check(model, x, generic=whole, at=batch, backends=BACKENDS)


class BatchStatistics(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.rand(3) + 0.5)

    def forward(self, x):
        h = self.lin(x)
        return (h + h.mean(0)) * self.scale  # statistics of the batch outside any norm layer


def test_a_reduction_over_the_samples_is_generic_with_reason():
    torch.manual_seed(6)
    model, x = BatchStatistics(), torch.randn(6, 4)
    with pytest.warns(RuntimeWarning) as record:
        K = tk.gram(model, [x], precision="fp64", progress=False)
    assert any("mean reduced over the samples' dim 0" in str(w.message) or "mix samples" in str(w.message)
               for w in record)
    ref = tk.reference.gram_autograd(model, [x])
    assert rel_err(K, ref) <= 1e-10


# --- item 7: a parameter view cached at construction --------------------------------------
class CachedTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Linear(4, 3, bias=False)
        self.e_t = self.e.weight.t()  # not substituted by functional_call: its gradient is lost
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.e(x) @ self.e_t))


class CachedInList(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.views = [self.lin.weight[:1]]

    def forward(self, x):
        return (self.lin(x) * self.views[0]).sum(1, keepdim=True)


@pytest.mark.parametrize("cls, attribute", [(CachedTranspose, "e_t"), (CachedInList, "views")])
@pytest.mark.parametrize("entry", ["gram", "features", "coverage"])
def test_parameter_view_cached_at_construction_is_refused(cls, attribute, entry):
    torch.manual_seed(4)
    model = cls()
    x = torch.randn(3, 3 if cls is CachedInList else 4)
    call = {"gram": lambda: tk.gram(model, x, progress=False),
            "features": lambda: tk.features(model, x, progress=False),
            "coverage": lambda: tk.coverage(model, x)}[entry]
    with pytest.raises(ValueError, match=attribute) as error:
        call()
    assert "forward" in str(error.value)


def test_tensor_attributes_not_aliasing_parameters_are_fine():
    class Buffers(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.scale = torch.ones(2) * 2  # a plain tensor attribute, its own memory
            self.register_buffer("shift", torch.zeros(2))

        def forward(self, x):
            return (self.lin(x) * self.scale + self.shift).sum(1)

    torch.manual_seed(5)
    model = Buffers()
    x = torch.randn(4, 3)
    check(model, x, backends=["torch"])


class ParameterInAList(nn.Module):
    """The parameter object itself kept in a plain list: not a view, so the model check lets
    it pass (nn.LSTM keeps such a list and refreshes it in forward); using it stale is refused."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.weights = [self.lin.weight]

    def forward(self, x):
        return (x @ self.weights[0].t()).sum(1, keepdim=True) + self.lin(x).sum(1, keepdim=True)


def test_a_stale_parameter_used_in_forward_is_refused():
    torch.manual_seed(7)
    with pytest.raises(ValueError, match="lin.weight"):
        tk.gram(ParameterInAList(), torch.randn(4, 3), progress=False)
    lstm = nn.LSTM(3, 2, batch_first=True)  # its _flat_weights list, refreshed in its forward

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = lstm, nn.Linear(2, 1)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    check(Head(), torch.randn(4, 5, 3), backends=["torch"])


# --- the propagation itself, against the samples' ids carried through the same ops ---------
def _ids(batch, shape, dtype=torch.float64):
    """A [B, *shape] tensor whose every element is its sample's index + 1."""
    return torch.arange(1, batch + 1, dtype=dtype).reshape(batch, *([1] * len(shape))).expand(batch, *shape).clone()


def _holds(result, samples, batch):
    """Whether, along samples.dim, index i holds sample (i // inner) % B everywhere (up to
    one constant factor: a product by ones sums copies of the same sample)."""
    index = torch.arange(result.shape[samples.dim]) // samples.inner % batch + 1
    shape = [1] * result.dim()
    shape[samples.dim] = -1
    ratio = result / index.reshape(shape).to(result.dtype)
    return bool(torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-12, atol=0))


OPS = {
    "windows": lambda x: x.view(x.shape[0], 2, 2, 2, 2, 3).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, 3),
    "windows back": lambda x: x.view(x.shape[0], 2, 2, 2, 2, 3).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, 3)
    .view(x.shape[0], 2, 2, 2, 2, 3).permute(0, 1, 3, 2, 4, 5).reshape(x.shape[0], 4, 4, 3),
    "rows": lambda x: x.reshape(-1, 4, 3),
    "seq-first flat": lambda x: x.flatten(1, 2).transpose(0, 1).reshape(-1, 3),
    "seq-first flat back": lambda x: x.flatten(1, 2).transpose(0, 1).reshape(-1, 3).reshape(16, x.shape[0], 3),
    "T": lambda x: x.flatten(1).T,
    "mT": lambda x: x.mT,
    "movedim": lambda x: x.movedim(0, -1),
    "index": lambda x: x[:, 1, ..., None],
    "index last": lambda x: x[..., 0],
    "list index": lambda x: x[:, [0, 2]],
    "mask index": lambda x: x[:, :, torch.tensor([True, False, True, True])],
    "vector_norm": lambda x: torch.linalg.vector_norm(x, 2, -1),
    "gather rows": lambda x: x.flatten(1, 2)[torch.arange(x.shape[0]), torch.zeros(x.shape[0], dtype=torch.long)],
    "split": lambda x: x.split(2, dim=1)[1],
    "unbind": lambda x: x.unbind(2)[0],
    "chunk": lambda x: x.chunk(2, -1)[0],
    "mean": lambda x: x.mean((1, 2)),
    "amax keepdim": lambda x: x.amax(1, keepdim=True),
    "max values": lambda x: x.max(dim=2).values,
    "matmul": lambda x: x @ torch.ones(3, 5, dtype=x.dtype),
    "matmul batched": lambda x: x.flatten(1, 2).transpose(0, 1) @ torch.ones(3, 5, dtype=x.dtype),
    "einsum": lambda x: torch.einsum("bhwc,cd->hbd", x, torch.ones(3, 2, dtype=x.dtype)),
    "cat": lambda x: torch.cat([x, x], dim=1),
    "stack": lambda x: torch.stack([x, x], dim=0),
    "expand": lambda x: x.unsqueeze(0).expand(2, -1, -1, -1, -1),
    "unfold": lambda x: torch.nn.functional.unfold(x.permute(0, 3, 1, 2), 2),
    "transpose_": lambda x: x.clone().transpose_(0, 1),
    "conv": lambda x: torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), torch.ones(2, 3, 1, 1, dtype=x.dtype)),
}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("batch", [4, 2, 3])
def test_the_samples_follow_the_ops(op, batch):
    from tangent_kernels.persample.uses import UseMode

    x = _ids(batch, (4, 4, 3))
    mode = UseMode([], batch, "torch")
    mode.mark_data(x)
    with mode:
        y = OPS[op](x)
    samples = mode.samples(y)
    assert samples is not None and samples.known(), samples
    assert _holds(y, samples, batch), (samples, list(y.shape))


LOSES = {
    "reduced": (lambda x: x.sum(0), "reduced over the samples"),
    "split across dims": (lambda x: x.reshape(2, 2, 48).transpose(0, 1), "split the samples"),
    "sliced": (lambda x: x[1:], "slice of the samples"),
    "indexed": (lambda x: x[torch.tensor([1, 0])], "index into the samples"),
    "joined": (lambda x: torch.cat([x, x]), "along the samples"),
}


@pytest.mark.parametrize("op", sorted(LOSES))
def test_where_no_dim_holds_the_samples_they_are_lost_with_the_op(op):
    from tangent_kernels.persample.uses import UseMode

    x = _ids(4, (4, 4, 3))
    mode = UseMode([], 4, "torch")
    mode.mark_data(x)
    fn, why = LOSES[op]
    with mode:
        y = fn(x)
    samples = mode.samples(y)
    assert samples is not None and not samples.known() and why in samples.why, samples


def test_identity_indices_keep_the_samples():
    """Hugging Face's masks: mask[arange(B)[:, None, None, None], kv[None, None, None, :]]."""
    from tangent_kernels.persample.uses import UseMode

    for batch in (4, 2, 7):
        x = _ids(batch, (7,))
        mode = UseMode([], batch, "torch")
        mode.mark_data(x)
        with mode:
            y = x[torch.arange(batch)[:, None, None, None], torch.arange(7)[None, None, None, :]]
            lengths = (x[:, :1] * 0 + 2).long().squeeze(1)  # data, one per sample
            z = x[:, None][torch.arange(batch), :, lengths]
        for result in (y, z):
            samples = mode.samples(result)
            assert samples is not None and samples.known() and _holds(result, samples, batch), samples


def test_reading_a_stale_parameter_without_its_gradient_is_fine():
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.kept = [self.lin.weight]

        def forward(self, x):  # its size only, and a detached copy: no gradient through it
            return self.lin(x).sum(1) * self.kept[0].shape[0] + 0 * self.kept[0].detach().sum()

    torch.manual_seed(8)
    check(Reads(), torch.randn(4, 3), backends=["torch"])
