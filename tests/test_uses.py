"""Taps at the uses of parameters: each pattern of the coverage issue in a model written
from scratch, against the float64 per-sample reference, with the path tk.coverage reports."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tangent_kernels as tk
from _persample_check import BACKENDS, CPP, check, extractor_after_one_batch
from conftest import rel_err

FAST = ["torch"] + CPP  # the interpreter is slow: Triton on the smaller models only


def paths(model, batch, idx=None):
    return {name: path for name, _, path in tk.coverage(model, batch, idx).rows}


# --- 1. linear maps called as functions ---------------------------------------------
class FunctionalLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(8, 5) / 2), nn.Parameter(torch.randn(8))
        self.w2, self.b2 = nn.Parameter(torch.randn(8, 6) / 3), nn.Parameter(torch.randn(6))  # [in, out]
        self.w3 = nn.Parameter(torch.randn(6, 6) / 3)
        self.w4 = nn.Parameter(torch.randn(6, 6) / 3)
        self.w5 = nn.Parameter(torch.randn(3, 4) / 2)
        self.w6 = nn.Parameter(torch.randn(6, 2) / 2)
        self.w7 = nn.Parameter(torch.randn(6, 6) / 3)

    def forward(self, x):  # x [B, 4, 5]
        batch = x.shape[0]
        h = torch.tanh(F.linear(x, self.w1, self.b1))  # [B, 4, 8]
        # rows flattened as [B * T, d] with an [in, out] weight (Hugging Face Conv1D)
        h = torch.tanh(torch.addmm(self.b2, h.reshape(-1, 8), self.w2).reshape(batch, 4, 6))
        h = torch.tanh(h @ self.w3)
        h = torch.tanh(h @ self.w7.T)  # a transposed view
        h = torch.tanh(torch.bmm(h, self.w4.expand(batch, -1, -1)))
        h = torch.tanh(self.w5 @ h)  # the parameter on the left: [3, 4] @ [B, 4, 6]
        return torch.einsum("btd,dk->bk", h, self.w6)


@pytest.mark.parametrize("idx", [None, 150])
def test_functional_linear_maps(idx):
    torch.manual_seed(0)
    model = FunctionalLinear()
    x = torch.randn(6, 4, 5)
    index = None if idx is None else tk.subsample(model, idx, seed=3)
    check(model, x, index)
    assert paths(model, x) == {"w1": "linear", "b1": "linear", "w2": "linear", "b2": "linear", "w3": "linear",
                               "w4": "linear", "w5": "linear", "w6": "einsum", "w7": "linear"}


class Attention(nn.Module):
    """nn.MultiheadAttention: packed in_proj, out_proj used functionally, masks."""

    def __init__(self, batch_first: bool, separate: bool, need_weights: bool):
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.kv = nn.Linear(8, 5) if separate else None
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=5 if separate else None,
                                          vdim=5 if separate else None)
        self.head = nn.Linear(8, 2)

    def forward(self, x, padding):
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        kv = x if self.kv is None else self.kv(x)
        q, kv = (x, kv) if self.batch_first else (x.transpose(0, 1), kv.transpose(0, 1))
        out, weights = self.attn(q, kv, kv, key_padding_mask=padding, attn_mask=causal,
                                 need_weights=self.need_weights)
        out = out if self.batch_first else out.transpose(0, 1)
        if weights is not None:
            out = out * (1 + weights.sum(-1, keepdim=True))
        return self.head(torch.tanh(out).mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("separate, need_weights", [(False, False), (True, True), (False, True)])
def test_multi_head_attention(batch_first, separate, need_weights):
    torch.manual_seed(1)
    model = Attention(batch_first, separate, need_weights)
    x = torch.randn(6, 5, 8)
    padding = torch.zeros(6, 5, dtype=torch.bool)
    padding[1, 3:] = padding[4, 4:] = True
    batch = {"x": x, "padding": padding}
    check(model, batch, backends=FAST)
    report = tk.coverage(model, batch)
    assert report.generic == [] and all(path == "linear" for _, _, path in report.rows), str(report)


# --- 2. embeddings: shared index, tied output projection ----------------------------
class Embeddings(nn.Module):
    def __init__(self, vocab=13, d=6, length=5):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d, padding_idx=-2)
        self.positions = nn.Embedding(length + 2, d)
        self.mix = nn.Linear(d, d)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)  # [1, T]: shared by the batch
        h = self.tokens(ids) + self.positions(positions)
        h = torch.tanh(self.mix(h))
        return F.linear(h, self.tokens.weight)[:, -1]  # tied to the output projection


def test_embeddings_with_shared_indices_and_a_tied_head():
    torch.manual_seed(2)
    model = Embeddings()
    ids = torch.randint(0, 13, (6, 5))
    ids[0, 1] = 11  # padding_idx=-2
    check(model, ids)
    assert paths(model, ids) == {"tokens.weight": "embedding, linear",
                                 "positions.weight": "broadcast (embedding (shared indices))",
                                 "mix.weight": "linear", "mix.bias": "linear"}


# --- 3. parameters in broadcasting elementwise ops ----------------------------------
class Broadcasts(nn.Module):
    """Position embedding added, layer scale, an RMSNorm-style scale, class and
    distillation tokens expanded and concatenated, a relative-position bias table gathered
    by a buffer index, a custom bias, and a parameter used by a linear map and an add."""

    def __init__(self, d=6, length=4, heads=2):
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.dist_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, length + 2, d) / 2)
        self.scale = nn.Parameter(torch.rand(d) + 0.5)
        self.rms_weight = nn.Parameter(torch.rand(d) + 0.5)
        self.table = nn.Parameter(torch.randn(2 * (length + 2) - 1, heads))
        positions = torch.arange(length + 2)
        self.register_buffer("relative", positions[:, None] - positions[None, :] + length + 1)
        self.qk = nn.Linear(d, 2 * d)
        self.bias = nn.Parameter(torch.randn(d))
        self.heads = heads

    def forward(self, x):  # [B, T, 3]
        batch = x.shape[0]
        h = self.embed(x)
        h = torch.cat([self.cls_token.expand(batch, -1, -1), self.dist_token.expand(batch, -1, -1), h], dim=1)
        h = h + self.pos
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.rms_weight
        q, k = self.qk(h).chunk(2, dim=-1)
        q, k = (t.reshape(batch, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores + self.table[self.relative].permute(2, 0, 1)  # [H, T, T] over the batch
        h = torch.softmax(scores, -1).mean(1) @ h
        h = torch.tanh(h * self.scale + self.bias) + self.qk.weight[0, : h.shape[-1]]
        return h[:, 0, :2]


@pytest.mark.parametrize("idx", [None, 60])
def test_broadcasting_parameters(idx):
    torch.manual_seed(3)
    model = Broadcasts()
    x = torch.randn(5, 4, 3)
    index = None if idx is None else tk.subsample(model, idx, seed=4)
    check(model, x, index, backends=FAST, at=2)
    found = paths(model, x)
    assert found["cls_token"] == found["dist_token"] == found["pos"] == "broadcast"
    assert found["scale"] == found["rms_weight"] == found["bias"] == "broadcast"
    assert found["table"] == "broadcast (embedding (shared indices))"  # a view of a table read by an index
    assert found["qk.weight"] == "linear, broadcast"


# --- 4. convolutions and norms called functionally ----------------------------------
class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(4, 3, 3, 2) / 3), nn.Parameter(torch.randn(4))
        self.w2 = nn.Parameter(torch.randn(4, 2, 3) / 3)
        self.gn_w, self.gn_b = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
        self.bn_w, self.bn_b = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
        self.register_buffer("mean", torch.randn(4) / 4)
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.ln_w, self.ln_b = nn.Parameter(torch.rand(7) + 0.5), nn.Parameter(torch.randn(7))
        self.rms = nn.RMSNorm(7) if hasattr(nn, "RMSNorm") else nn.LayerNorm(7)
        with torch.no_grad():
            self.rms.weight.uniform_(0.5, 1.5)
        self.head = nn.Linear(4 * 7, 2)

    def forward(self, x):  # [B, 3, 7, 6]
        h = torch.tanh(F.conv2d(x, self.w1, self.b1, padding="same"))  # even kernel: asymmetric 'same'
        h = F.group_norm(h, 2, self.gn_w, self.gn_b)
        h = F.batch_norm(h, self.mean, self.var, self.bn_w, self.bn_b, training=False)
        h = h.mean(-1)  # [B, 4, 7]
        h = torch.tanh(F.conv1d(h, self.w2, stride=1, padding=1, groups=2))
        h = self.rms(F.layer_norm(h, (7,), self.ln_w, self.ln_b))
        return self.head(h.flatten(1))


def test_functional_convolutions_and_norms():
    torch.manual_seed(4)
    model = Functional()
    x = torch.randn(5, 3, 7, 6)
    check(model, x, backends=FAST)
    found = paths(model, x)
    assert found["w1"] == found["b1"] == found["w2"] == "conv"
    assert all(found[n] == "broadcast" for n in ("gn_w", "gn_b", "bn_w", "bn_b", "ln_w", "ln_b", "rms.weight"))


# --- 5. repeated and shared uses ------------------------------------------------------
class Repeated(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(5, 5)
        self.other = nn.Linear(5, 5)
        self.other.weight = self.block.weight  # one weight, two modules
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.block(x))
        h = torch.tanh(self.block(h))  # a module called twice
        h = torch.tanh(self.other(h) + self.head.weight[1, :5])  # a parameter in a covered op and an add
        return self.head(h)


def test_repeated_and_shared_uses():
    torch.manual_seed(5)
    model = Repeated()
    x = torch.randn(6, 5)
    check(model, x, backends=BACKENDS)
    assert paths(model, x) == {"block.weight": "linear", "block.bias": "linear", "other.bias": "linear",
                               "head.weight": "broadcast, linear", "head.bias": "linear"}


class Everything(nn.Module):
    """The patterns combined in one model."""

    def __init__(self):
        super().__init__()
        self.embed = Embeddings(vocab=11, d=6, length=4)
        self.broadcasts = Broadcasts(d=6, length=4)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, ids):
        h = self.embed.tokens(ids) + self.embed.positions(torch.arange(ids.shape[1])[None])
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.broadcasts(h[..., :3]) + self.embed(ids)[:, :2]


@pytest.mark.parametrize("n", [1, 3, 7])
def test_all_patterns_combined_at_several_batch_sizes(n):
    torch.manual_seed(6)
    model = Everything()
    ids = torch.randint(0, 11, (n, 4))
    idx = tk.subsample(model, 300, seed=n)
    ref = check(model, ids, idx, backends=["torch"] + CPP, at=max(1, n // 2) if n > 1 else 1) if n > 1 else None
    if n == 1:  # one sample: a single batch
        K = tk.gram(model, [ids], idx, precision="fp64", progress=False)
        ref = tk.reference.gram_autograd(model, [ids], idx)
        assert rel_err(K, ref) <= 1e-10
    assert tk.coverage(model, ids, idx).generic == []


# --- safety: mixing samples is still caught; state untouched -----------------------
class MixesSamples(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.rand(3) + 0.5)

    def forward(self, x):
        h = self.lin(x)
        # Each output reads another sample (the batch reversed): the layout is kept, so only
        # the spot check can see it. (Batch statistics, h.mean(0), lose the samples' dim: the
        # tensors they reach go generic by provenance, test_provenance.py.)
        return (h + h.flip(0)) * self.scale


def test_a_model_that_mixes_samples_is_caught():
    torch.manual_seed(7)
    model, x = MixesSamples(), torch.randn(6, 4)
    with pytest.warns(RuntimeWarning, match="mix samples within a batch"):
        K = tk.gram(model, [x], precision="fp64", progress=False)
    ref = tk.reference.gram_autograd(model, [x])
    assert rel_err(K, ref) <= 1e-10


def test_model_state_is_untouched():
    torch.manual_seed(8)
    model = Everything()
    model.train()
    model.embed.mix.weight.grad = torch.ones_like(model.embed.mix.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 11, (4, 4))
    tk.gram(model, [ids], progress=False)
    tk.coverage(model, ids)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.embed.mix.weight.grad, torch.ones_like(model.embed.mix.weight))
    assert all(not p.grad_fn and p.is_leaf for p in model.parameters())


def test_coverage_report_lists_the_generic_tensors_and_why():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(3, 4)
            self.w = nn.Parameter(torch.randn(4, 2))

        def forward(self, x):
            return MatmulFunction.apply(torch.tanh(self.pre(x)), self.w)  # a custom autograd.Function

    report = tk.coverage(Mixed(), torch.randn(3, 3))
    assert [name for name, _ in report.generic] == ["w"]
    assert "gradients off" in report.generic[0][1]
    text = str(report)
    assert "pre.weight" in text and "linear" in text and "generic: " in text
    assert "2 of 3 tensors" in text


@pytest.mark.parametrize("sampled, by_rows", [(4, False), (78, True)])
def test_embedding_row_gather_and_kernels_agree_with_the_reference(monkeypatch, sampled, by_rows):
    """Few sampled entries per table row: the rows are gathered; a handful in all: the
    backends' sampled-dot kernels serve the lookup (embedding.py's cost rule)."""
    torch.manual_seed(9)
    model = Embeddings(vocab=13, d=6, length=5)
    ids = torch.randint(0, 13, (6, 5))
    names = [name for name, _ in model.named_parameters()]
    table = names.index("tokens.weight")
    offset = sum(p.numel() for p in list(model.parameters())[:table])
    positions = torch.randperm(13 * 6)[:sampled] + offset
    idx = tk.ParamIndex.from_positions(model, positions)
    calls = []
    real = tk.sampled.sampled_embedding_grad_by_rows
    monkeypatch.setattr(tk.sampled, "sampled_embedding_grad_by_rows", lambda *a: calls.append(1) or real(*a))
    check(model, ids, idx)
    assert bool(calls) == by_rows


def test_a_rule_that_breaks_sends_its_tensors_to_the_generic_path(monkeypatch, caplog):
    from tangent_kernels.persample import uses

    def broken(mode, func, args, kwargs):
        raise RuntimeError("an argument combination the rule did not foresee")

    monkeypatch.setitem(uses._RULES, torch.einsum, broken)
    torch.manual_seed(10)
    model, x = FunctionalLinear(), torch.randn(4, 4, 5)
    with caplog.at_level("WARNING", logger="tangent_kernels"):
        report = tk.coverage(model, x)
    assert [name for name, _ in report.generic] == ["w6"]
    assert "the rule failed (RuntimeError: an argument combination" in report.generic[0][1]
    assert "its parameters take the generic path" in caplog.text
    with pytest.warns(RuntimeWarning, match="generic per-sample path"):
        K = tk.gram(model, [x], precision="fp64", progress=False)
    ref = tk.reference.gram_autograd(model, [x])
    assert rel_err(K, ref) <= 1e-10


def test_an_error_of_the_model_itself_is_raised_as_is():
    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return F.linear(x, self.w)  # x has 5 features: the model's own shape error

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        tk.gram(Wrong(), [torch.randn(2, 5)], progress=False)


# --- ops without a rule: per-op vector-Jacobian products; custom autograd.Functions ---
class NoRuleOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.prelu = nn.PReLU(4)
        self.up = nn.ConvTranspose2d(4, 2, 3, stride=2)
        self.lin = nn.Linear(2 * 13 * 13, 5)
        self.bilinear = nn.Bilinear(5, 5, 3)

    def forward(self, x):
        h = self.up(self.prelu(self.conv(x)))
        h = torch.tanh(self.lin(h.flatten(1)))
        return self.bilinear(h, h)


def test_ops_without_a_rule_are_differentiated_one_sample_at_a_time():
    torch.manual_seed(11)
    model, x = NoRuleOps(), torch.randn(5, 3, 8, 8)
    check(model, x, backends=FAST)
    found = paths(model, x)
    assert all(found[name] == "per-op" for name in ("prelu.weight", "up.weight", "up.bias", "bilinear.weight",
                                                      "bilinear.bias"))


class MatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w.T, x.T @ grad


class CustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(MatmulFunction.apply(x, self.w))


def test_a_parameter_inside_a_custom_autograd_function_goes_generic():
    # The Function's forward runs with gradients off: the use cannot be read back, and
    # its gradient flows through a backward the mode does not see.
    torch.manual_seed(12)
    model, x = CustomFunction(), torch.randn(5, 4)
    report = tk.coverage(model, x)
    assert [name for name, _ in report.generic] == ["w"] and "gradients off" in report.generic[0][1]
    with pytest.warns(RuntimeWarning):
        K = tk.gram(model, [x], precision="fp64", progress=False)
    ref = tk.reference.gram_autograd(model, [x])
    assert rel_err(K, ref) <= 1e-10


class SequenceFirst(nn.Module):
    """Activations laid out [T, B, d] (nn.TransformerEncoderLayer's default), with a
    position embedding [T, 1, d] added and token ids [T, B]."""

    def __init__(self, length):
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.pos = nn.Parameter(torch.randn(length, 1, 16) / 4)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0)
        self.head = nn.Linear(16, 2)

    def forward(self, ids):  # [B, T]
        h = self.embed(ids.transpose(0, 1)) + self.pos
        return self.head(self.encoder(h).mean(0))


@pytest.mark.parametrize("length", [5, 8])  # 8: a multiple of the batch of 4
def test_sequence_first_layouts_are_batched(length):
    torch.manual_seed(13)
    model, ids = SequenceFirst(length), torch.randint(0, 11, (8, length))
    check(model, ids, backends=FAST, at=4)
    assert tk.coverage(model, ids).generic == []


@pytest.mark.parametrize("layout", ["linear", "addmm"])
def test_a_whole_weight_is_one_batched_product(monkeypatch, layout):
    """idx=None: every entry of a weight sampled, written by one bmm into F (no kernel)."""
    calls = []
    monkeypatch.setattr(tk.ops, "sampled_linear_grad", lambda *a, **k: calls.append(1))
    torch.manual_seed(14)
    model = (nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Flatten()) if layout == "linear"
             else FlatRowsSmall())
    x = torch.randn(6, 4, 5)
    check(model, x, backends=["torch"] + CPP)
    assert calls == []


class FlatRowsSmall(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(5, 3) / 2), nn.Parameter(torch.randn(3))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, 5), self.weight).reshape(x.shape[0], -1)


class CachesItsBias(nn.Module):
    """Caches a tensor computed from a parameter in a plain dict attribute in eval mode
    (as timm's LeViT does with its attention biases)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.table = nn.Parameter(torch.randn(5))
        self.register_buffer("index", torch.tensor([0, 3, 4]))
        self.cache = {}

    def forward(self, x):
        if not self.training:
            if "bias" not in self.cache:
                self.cache["bias"] = self.table[self.index]
            bias = self.cache["bias"]
        else:
            bias = self.table[self.index]
        return self.lin(x) + bias


def test_attributes_a_forward_caches_are_kept_as_they_were():
    torch.manual_seed(15)
    model, x = CachesItsBias().eval(), torch.randn(6, 4)
    check(model, x, backends=FAST)
    assert model.cache == {}


def test_after_a_failed_spot_check_the_generic_path_is_the_exact_loop():
    torch.manual_seed(16)
    model, x = MixesSamples(), torch.randn(6, 4)
    from tangent_kernels.data import to_inputs
    from tangent_kernels.persample.extractor import FeatureExtractor

    extractor = FeatureExtractor(model, tk.params.resolve_idx(model, None), "first", torch.float64,
                                 torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match="mix samples"):
        block = extractor(to_inputs(x.double()))
    # The tensor whose batched gradient the batch statistic makes wrong goes generic (the
    # exact loop): scale's (h_b + mean h, not 2 h_b). lin's are right as batched: the
    # gradient at its output is 2 * scale in and out of the batch.
    assert set(extractor.generic_why) == {"scale"} and extractor.generic.strategy == "loop"
    reference = tk.reference.features_autograd(model, [x])
    assert rel_err(block, reference) <= 1e-10


def test_an_fp32_spot_check_failed_by_rounding_alone_keeps_the_batched_pass(monkeypatch):
    from tangent_kernels.persample import extractor

    # Every fp32 rounding now "fails": only the float64 recheck can tell rounding from mixing.
    monkeypatch.setitem(extractor._VERIFY_TOLERANCE, torch.float32, 0.0)
    torch.manual_seed(17)
    model, x = FunctionalLinear(), torch.randn(6, 4, 5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K = tk.gram(model, [x], progress=False)
    ref = tk.reference.gram_autograd(model, [x])
    assert rel_err(K, ref) <= 1e-5
    with pytest.warns(RuntimeWarning, match="mix samples"):
        tk.gram(MixesSamples(), [torch.randn(6, 4)], progress=False)


class CatBias(nn.Module):
    """A linear bias assembled from parameters (BEiT: cat of q bias, zeros, v bias)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        bias = torch.cat([self.q_bias, torch.zeros(2), self.v_bias])
        return self.head(torch.tanh(F.linear(x, self.lin.weight, bias)))


def test_a_bias_computed_from_parameters_is_batched():
    torch.manual_seed(18)
    model, x = CatBias(), torch.randn(6, 4)
    check(model, x, backends=FAST)
    found = paths(model, x)
    assert found["q_bias"] == found["v_bias"] == found["lin.weight"] == "linear"


class LowRank(nn.Module):
    """Weights computed from parameters: a LoRA-style W + B @ A, and weight normalization."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(5, 6)
        self.lora_a, self.lora_b = nn.Parameter(torch.randn(2, 5) / 3), nn.Parameter(torch.randn(6, 2) / 3)
        self.normed = nn.utils.parametrizations.weight_norm(nn.Linear(6, 3))

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.base.weight + self.lora_b @ self.lora_a, self.base.bias))
        return self.normed(h)


def test_weights_computed_from_parameters_are_batched():
    torch.manual_seed(19)
    model, x = LowRank(), torch.randn(6, 5)
    check(model, x, backends=FAST)
    report = tk.coverage(model, x)
    assert report.generic == [], str(report)
