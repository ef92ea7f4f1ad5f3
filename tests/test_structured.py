"""The structured Gram (tangent_kernels/structured/): K from fully sampled linear weights'
inputs and output gradients, against the float64 per-sample reference and the feature
path, for every use form, tokens, biases, cross kernels, precisions, every-logit outputs,
stores and checkpoints; and fp32 K's accuracy at p >= 10^7.

Tolerances: fp64 1e-10 (rounding only); fp32 1e-5 (as test_multi_output: fp32 forward and
backward, K summed in fp64); bf16 / fp16 factors are rounded once each, so an entry of a
product of two factor Grams is off by at most about 2u relative (u = 2^-8 / 2^-11)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tangent_kernels as tk
import tangent_kernels.tiles as tiles
from tangent_kernels import tuning
from _models import SharedLinear, TinyTransformer, cnn, cnn_input, mlp
from tangent_kernels.structured import contract
from conftest import rel_err

TOLERANCE = {"fp64": 1e-10, "fp32": 1e-5, "bf16": 2 * 2.0 ** -8, "fp16": 2 * 2.0 ** -11}


class Uses(nn.Module):
    """A weight used twice (3 tokens, then 1), one in x @ V ([in, out]), one on the left of
    the data (M @ h^T), one through a transposed view (h @ U.T), and a broadcast bias."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5) * 0.4)
        self.v = nn.Parameter(torch.randn(6, 4) * 0.4)
        self.m = nn.Parameter(torch.randn(3, 4) * 0.4)
        self.u = nn.Parameter(torch.randn(2, 3) * 0.4)
        self.b = nn.Parameter(torch.randn(3) * 0.1)

    def forward(self, x):  # [B, 3, 5]
        h = torch.tanh(F.linear(x, self.w)) + torch.tanh(F.linear(x.mean(1), self.w))[:, None]
        h = torch.tanh(h @ self.v)
        h = torch.tanh(self.m @ h.transpose(1, 2) + self.b[:, None]).transpose(1, 2)
        return (h @ self.u.T).mean(1)


class Tokens(nn.Module):
    """Linear layers over T tokens; the head reads the last token only (dead tokens)."""

    def __init__(self, d=8, k=3):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(d, 12), nn.GELU(), nn.Linear(12, d))
        self.head = nn.Linear(d, k)

    def forward(self, x):
        return self.head(self.inner(x))[:, -1]


class Convs(nn.Module):
    """A 1-D convolution (stride, zero padding), a 2-D one (dilation, reflect padding, no
    bias) on its output seen as an image, and a head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(1, 3, (2, 3), dilation=(1, 2), padding=1, padding_mode="reflect", bias=False)
        self.head = nn.Linear(3 * 6 * 2, 2)

    def forward(self, x):  # [B, 2, 9]
        h = torch.tanh(self.c1(x))  # [B, 4, 5]
        h = torch.tanh(self.c2(h.transpose(1, 2)[:, None]))  # [B, 3, 6, 2]
        return self.head(h.flatten(1))


# model, input, the tensors "always" must make structured: the weights, and the biases that
# every use of a weight adds (absorbed into its factors); "uses"' broadcast bias is not one.
CASES = {
    "mlp": (lambda: mlp(3), lambda n: torch.randn(n, 6), ["0.weight", "2.weight", "4.weight", "0.bias", "2.bias", "4.bias"]),
    "uses": (Uses, lambda n: torch.randn(n, 3, 5), ["w", "v", "m", "u"]),
    "tokens": (Tokens, lambda n: torch.randn(n, 5, 8), ["inner.0.weight", "inner.2.weight", "head.weight",
                                                      "inner.0.bias", "inner.2.bias", "head.bias"]),
    "shared": (SharedLinear, lambda n: torch.randn(n, 5), ["inner.weight", "out.weight", "inner.bias", "out.bias"]),
    # attention: the packed q/k/v weight is used whole by one linear map; the norms take features.
    "transformer": (TinyTransformer, lambda n: torch.randn(n, 4, 16),
                    ["encoder.linear1.weight", "encoder.linear2.weight", "encoder.self_attn.out_proj.weight",
                     "encoder.self_attn.in_proj_weight", "head.weight", "encoder.linear1.bias", "encoder.linear2.bias",
                     "encoder.self_attn.in_proj_bias", "encoder.self_attn.out_proj.bias", "head.bias"]),
    # grouped convolutions take features; the ungrouped one, unfolded, and the head do not.
    "cnn": (lambda: cnn(4), cnn_input, ["0.weight", "7.weight", "0.bias", "7.bias"]),
    "convs": (lambda: Convs(), lambda n: torch.randn(n, 2, 9), ["c1.weight", "c2.weight", "head.weight", "c1.bias", "head.bias"]),
}


def _case(name, n, seed):
    torch.manual_seed(seed)
    make_model, make_x, structured = CASES[name]
    return make_model(), make_x(n), structured


@pytest.mark.parametrize("name", list(CASES))
def test_structured_equals_the_reference_and_the_features(name):
    model, x, structured = _case(name, 7, 0)
    report = tk.coverage(model, x, structured="always")
    assert sorted(report.structured) == sorted(structured)
    assert all(report.gram[t].startswith("Gram: structured") for t in structured)
    loader = [x[:4], x[4:]]
    ref = tk.reference.gram_autograd(model, loader)
    K = tk.gram(model, loader, precision="fp64", progress=False, structured="always")
    features = tk.gram(model, loader, precision="fp64", progress=False, structured="never")
    assert rel_err(K, ref) <= 1e-10 and rel_err(features, ref) <= 1e-10
    assert torch.equal(K, K.T)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ["mlp", "uses", "tokens", "convs"])
def test_precisions(name, precision):
    model, x, _ = _case(name, 9, 1)
    loader = [x[:5], x[5:]]
    ref = tk.reference.gram_autograd(model, loader)
    K = tk.gram(model, loader, precision=precision, progress=False, structured="always")
    assert K.dtype == torch.float32
    assert rel_err(K, ref) <= TOLERANCE[precision], precision


@pytest.mark.parametrize("name", ["mlp", "uses", "tokens", "convs"])
def test_cross_kernels(name):
    model, x, _ = _case(name, 9, 2)
    x1, x2 = x[:6], x[6:]
    ref = tk.reference.features_autograd(model, [x1]) @ tk.reference.features_autograd(model, [x2]).T
    K = tk.gram(model, [x1[:4], x1[4:]], None, [x2], precision="fp64", progress=False, structured="always")
    assert K.shape == (6, 3) and rel_err(K, ref) <= 1e-10
    K32 = tk.gram(model, [x1[:4], x1[4:]], None, [x2], progress=False, structured="always")
    assert rel_err(K32, ref) <= 1e-5


def _every_logit(model, x, outputs, idx=None):
    per = torch.stack([tk.reference.features_autograd(model, [x], idx, output=a) for a in range(outputs)], 1)
    full = torch.einsum("iap,jbp->ijab", per, per)
    return {"full": full, "trace": full.diagonal(dim1=2, dim2=3).sum(-1), "diagonal": full.diagonal(dim1=2, dim2=3)}


@pytest.mark.parametrize("name", ["mlp", "uses", "tokens", "convs"])
def test_every_logit(name, set_tile_rows):
    # Tiles of 4 rows over 7 samples x k logits: tile borders cut through a sample's logits.
    set_tile_rows(4)
    model, x, _ = _case(name, 7, 3)
    outputs = model(x[:1]).shape[1]
    expected = _every_logit(model, x, outputs)
    for output in ("full", "trace", "diagonal"):
        K = tk.gram(model, [x[:3], x[3:]], output=output, precision="fp64", progress=False, structured="always")
        assert K.shape == expected[output].shape and rel_err(K, expected[output]) <= 1e-10, output
    K32 = tk.gram(model, [x[:3], x[3:]], output="full", progress=False, structured="always")
    assert rel_err(K32, expected["full"]) <= 1e-5


def test_mixed_sampling_stays_exact_and_is_reported():
    """A partially sampled weight keeps its features; the whole ones go structured."""
    torch.manual_seed(4)
    model, x = mlp(3), torch.randn(8, 6)
    # flat layout: 0.weight 0..95, 0.bias, 2.weight 112..239, 2.bias, 4.weight 248..271, 4.bias
    half = torch.arange(112, 240)[torch.randperm(128)[:64]].sort().values
    idx = torch.cat([torch.arange(0, 96), half, torch.arange(248, 272)])
    report = tk.coverage(model, x, idx, structured="always")
    assert sorted(report.structured) == ["0.weight", "4.weight"]
    assert "partially sampled" in report.gram["2.weight"] and "structured" in str(report)
    ref = tk.reference.gram_autograd(model, [x], idx)
    K = tk.gram(model, [x[:3], x[3:]], idx, precision="fp64", progress=False, structured="always")
    assert rel_err(K, ref) <= 1e-10
    # idx in another column order: the same K
    shuffled = idx[torch.randperm(idx.numel())]
    assert rel_err(tk.gram(model, [x], shuffled, precision="fp64", progress=False, structured="always"), ref) <= 1e-10


def test_auto_chooses_by_cost_and_says_so():
    torch.manual_seed(5)
    wide = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
    report = tk.coverage(wide, torch.randn(4, 64))
    assert {"0.weight", "2.weight"} <= set(report.structured)
    assert "cheaper than features" in report.gram["2.weight"]
    # 32 tokens of width 4: T^2 (I + O) = 8192 against I O = 16 per pair of samples.
    narrow = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    report = tk.coverage(narrow, torch.randn(4, 32, 4), output=lambda out: out.sum(dim=(1, 2)))
    assert report.structured == [] and "costlier" in report.gram["0.weight"]
    assert "1-D" in report.gram["0.bias"]
    never = tk.coverage(wide, torch.randn(4, 64), structured="never")
    assert never.structured == []
    with pytest.raises(ValueError, match="structured must be one of"):
        tk.gram(wide, [torch.randn(2, 64)], progress=False, structured="yes")


def test_a_model_that_mixes_samples_falls_back_exactly():
    """The spot check covers the structured tensors too (their gradients from the factors):
    batch statistics send everything to the exact generic path."""
    from test_uses import MixesSamples

    torch.manual_seed(6)
    model, x = MixesSamples(), torch.randn(6, 4)
    ref = tk.reference.gram_autograd(model, [x])
    with pytest.warns(RuntimeWarning, match="mix samples within a batch"):
        K = tk.gram(model, [x], precision="fp64", progress=False, structured="always")
    assert rel_err(K, ref) <= 1e-10


@pytest.mark.parametrize("store", ["disk", "auto"])
def test_stores_and_spilling(store, tmp_path, monkeypatch):
    kinds = []
    original = tiles.blocked_gram

    def spy(*args, terms=None, **kwargs):
        kinds.extend(s.kind for s in terms[0].stores)
        return original(*args, terms=terms, **kwargs)

    model, x, _ = _case("tokens", 12, 7)
    loader = [x[i:i + 5] for i in range(0, 12, 5)]
    ref = tk.reference.gram_autograd(model, loader)
    base = tk.gram(model, loader, progress=False, structured="always")
    # 64 bytes of device budget: every store spills to disk after its first rows, and the
    # tiles shrink to what the budget stages (other tile shapes: other rounding, not bits).
    monkeypatch.setattr(tiles, "blocked_gram", spy)
    K = tk.gram(model, loader, progress=False, structured="always", store=store, max_memory=64, cache_dir=tmp_path)
    assert kinds and set(kinds) == {"disk"}
    assert rel_err(K, ref) <= 1e-5 and torch.allclose(K, base, rtol=1e-6, atol=1e-7)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("name", ["uses", "mlp"])  # mlp: no feature columns at all (biases absorbed)
@pytest.mark.parametrize("output", ["first", "full"])
@pytest.mark.parametrize("stop", [("features", 10), ("gram", 4), ("gram", 8)])
def test_checkpoint_resume_is_bit_identical(tmp_path, stop, output, name, set_tile_rows):
    set_tile_rows(4)
    model, x, _ = _case(name, 13, 8)
    loader = [x[i:i + 5] for i in range(0, 13, 5)]
    base = tk.gram(model, loader, output=output, progress=False, structured="always")

    def interrupt(event):
        if (event.phase, event.done) == stop and not event.resumed:
            raise Interrupt

    with pytest.raises(Interrupt):
        tk.gram(model, loader, output=output, progress=False, structured="always", checkpoint=tmp_path,
                callback=interrupt)
    # The checkpoint's plan wins over this call's structured=: the same K, bit for bit.
    events = []
    K = tk.gram(model, loader, output=output, progress=False, structured="never", checkpoint=tmp_path,
                callback=events.append)
    assert torch.equal(K, base)
    assert any(e.resumed for e in events)
    assert (tmp_path / "loader.s0x.features").is_file()


def test_tile_contraction_against_einsum(monkeypatch):
    """The contraction alone, on random factors, chunked (tiny chunks) and fp16-scaled."""
    monkeypatch.setattr(contract, "_PAIR_ELEMENTS", 50)
    torch.manual_seed(9)
    for tokens, k in ((1, 1), (1, 3), (4, 1), (3, 2)):
        x_i, x_j = torch.randn(5, tokens * 6, dtype=torch.float64), torch.randn(4, tokens * 6, dtype=torch.float64)
        g_i, g_j = torch.randn(5 * k, tokens * 7, dtype=torch.float64), torch.randn(4 * k, tokens * 7, dtype=torch.float64)
        expected = torch.einsum("itx,jsx,iatg,jbsg->iajb", x_i.view(5, tokens, 6), x_j.view(4, tokens, 6),
                                g_i.view(5, k, tokens, 7), g_j.view(4, k, tokens, 7)).reshape(5 * k, 4 * k)
        got = contract.structured_tile(x_i, g_i, x_j, g_j, tokens, k, torch.float64)
        assert rel_err(got, expected) <= 1e-12
        scales = [torch.exp2(torch.randint(-3, 4, (r,)).double()) for r in (5, 5 * k, 4, 4 * k)]
        scaled = contract.structured_tile(x_i * scales[0][:, None], g_i * scales[1][:, None], x_j * scales[2][:, None],
                                          g_j * scales[3][:, None], tokens, k, torch.float64, scales)
        assert rel_err(scaled, expected) <= 1e-12


def test_fp32_stays_accurate_at_ten_million_parameters():
    """p >= 10^7: one fp32 product over all columns was off by 2.2e-5 here; partial fp32
    products of 64k columns summed in fp64 keep K within 1e-5 of the float64 reference."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(1000, 10000), nn.Tanh(), nn.Linear(10000, 1))
    assert sum(p.numel() for p in model.parameters()) >= 10 ** 7
    x = torch.rand(3, 1000) + 0.5  # inputs of one sign: long sums without cancellation
    ref = tk.reference.gram_autograd(model, [x])
    K = tk.gram(model, [x], progress=False, structured="never")
    assert rel_err(K, ref) <= 1e-5
    assert rel_err(tk.gram(model, [x], progress=False), ref) <= 1e-5  # the structured way


@pytest.mark.parametrize("name", ["mlp", "uses", "cnn", "convs"])
def test_kronecker_subsample_keeps_the_structured_form(name):
    model, x, structured = _case(name, 7, 11)
    total = sum(p.numel() for p in model.parameters())
    idx = tk.subsample(model, total // 3, seed=5, structure="kronecker")
    assert abs(len(idx) - total // 3) <= 0.25 * total // 3  # per-tensor rounding
    assert torch.equal(idx.positions, tk.subsample(model, total // 3, seed=5, structure="kronecker").positions)
    report = tk.coverage(model, x, idx, structured="always")
    weights = [t for t in structured if not t.endswith("bias")]
    assert sorted(t for t in report.structured if t in weights) == sorted(weights)
    sampled, sizes = {n: e for n, e, _ in report.rows}, {n: p.numel() for n, p in model.named_parameters()}
    # A bias is absorbed only whole, into a whole weight (a Kronecker-sampled one keeps its bias on features).
    absorbed = set(report.structured) - set(weights)
    assert all(sampled[b] == sizes[b] and "structured with" in report.gram[b] for b in absorbed)
    partial = [t for t in weights if sampled[t] < sizes[t]]
    assert partial and all("Kronecker-sampled" in report.gram[t] for t in partial)
    ref = tk.reference.gram_autograd(model, [x], idx)
    loader = [x[:4], x[4:]]
    K = tk.gram(model, loader, idx, precision="fp64", progress=False, structured="always")
    features = tk.gram(model, loader, idx, precision="fp64", progress=False, structured="never")
    assert rel_err(K, ref) <= 1e-10 and rel_err(features, ref) <= 1e-10
    full = tk.gram(model, loader, idx, output="full", precision="fp64", progress=False, structured="always")
    assert rel_err(full, _every_logit(model, x, full.shape[-1], idx)["full"]) <= 1e-10


def test_a_uniform_subsample_is_not_a_product_set():
    torch.manual_seed(12)
    model, x = mlp(3), torch.randn(5, 6)
    report = tk.coverage(model, x, tk.subsample(model, 150, seed=1), structured="always")
    assert report.structured == [] and "not rows x columns" in report.gram["2.weight"]
    with pytest.raises(ValueError, match="structure must be"):
        tk.subsample(model, 10, structure="blocks")


class BiasUses(nn.Module):
    """Biases that can and cannot ride in their weight's factors: ``a`` is added by its
    weight's only use (absorbed); ``w2`` is used once with ``b2`` and once without (not);
    ``c`` is added by two different weights' uses (not); addmm adds ``d`` with beta equal
    to alpha (absorbed) and ``e`` with beta != alpha (not)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 6)
        self.w2, self.b2 = nn.Parameter(torch.randn(6, 6) * 0.4), nn.Parameter(torch.randn(6) * 0.1)
        self.u, self.v = nn.Parameter(torch.randn(4, 6) * 0.4), nn.Parameter(torch.randn(4, 6) * 0.4)
        self.c = nn.Parameter(torch.randn(4) * 0.1)
        self.m, self.d = nn.Parameter(torch.randn(4, 3) * 0.4), nn.Parameter(torch.randn(3) * 0.1)
        self.n, self.e = nn.Parameter(torch.randn(4, 3) * 0.4), nn.Parameter(torch.randn(3) * 0.1)

    def forward(self, x):  # [B, 5]
        h = torch.tanh(self.lin(x))
        h = torch.tanh(F.linear(h, self.w2, self.b2)) + torch.tanh(F.linear(h, self.w2))
        h = torch.tanh(F.linear(h, self.u, self.c)) * torch.tanh(F.linear(h, self.v, self.c))
        return (torch.addmm(self.d, h, self.m, beta=0.5, alpha=0.5)
                + torch.addmm(self.e, h, self.n, beta=2.0, alpha=0.5)).sum(1, keepdim=True)


def test_biases_absorbed_into_their_weights_factors_exactly_where_exact():
    """K (x, x') + 1 carries a bias' Gram inside its weight's when every use of the weight
    adds that bias alone: against the float64 reference, one output and every logit, cross
    kernels, fp32; the report says which, and the others keep features."""
    torch.manual_seed(21)
    model, x = BiasUses(), torch.randn(9, 5)
    report = tk.coverage(model, x, structured="always")
    assert set(report.structured) == {"lin.weight", "w2", "u", "v", "m", "n", "lin.bias", "d"}
    assert report.gram["lin.bias"] == "Gram: structured with lin.weight (its input augmented by a constant 1)"
    assert "its bias lin.bias" in report.gram["lin.weight"] and "its bias" not in report.gram["w2"]
    assert all(report.gram[b].startswith("Gram: features") for b in ("b2", "c", "e"))
    assert dict((n, path) for n, _, path in report.rows)["lin.bias"] == "linear"
    ref = tk.reference.gram_autograd(model, [x])
    loader = [x[:4], x[4:]]
    assert rel_err(tk.gram(model, loader, precision="fp64", progress=False, structured="always"), ref) <= 1e-10
    assert rel_err(tk.gram(model, loader, progress=False, structured="always"), ref) <= 1e-5
    cross = tk.gram(model, [x[:4]], None, [x[4:]], precision="fp64", progress=False, structured="always")
    assert rel_err(cross, tk.reference.gram_autograd(model, [x[:4]], None, [x[4:]])) <= 1e-10
    mlp_model, y = mlp(3), torch.randn(7, 6)
    full = tk.gram(mlp_model, [y[:3], y[3:]], output="full", precision="fp64", progress=False, structured="always")
    assert rel_err(full, _every_logit(mlp_model, y, full.shape[-1], None)["full"]) <= 1e-10


def test_a_checkpointed_plan_without_absorbed_biases_keeps_them_on_features():
    """A checkpoint written before biases were absorbed recorded only the weights: resuming
    it must keep the biases on features (the stores' widths depend on it)."""
    from tangent_kernels.data import to_inputs
    from tangent_kernels.engine import PRECISIONS
    from tangent_kernels.feature_phase import new_extractor
    from tangent_kernels.params import resolve_idx

    torch.manual_seed(22)
    model, x = mlp(3), torch.randn(5, 6)
    extractor = new_extractor(model, resolve_idx(model, None), "first", PRECISIONS["fp64"], torch.device("cpu"),
                               "torch", "auto")
    plan = extractor.plan_for(to_inputs(x.double()), forced=["0.weight", "2.weight", "4.weight"])
    assert plan.structured == ["0.weight", "2.weight", "4.weight"] and plan.absorbed == {}
    block = extractor(to_inputs(x.double()))
    assert block.shape[1] == sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "convnext_atto"])
def test_real_cnns_with_every_eligible_tensor_structured(name):
    """Depthwise and grouped convolutions (features), squeeze-excitation 1x1 convolutions
    and pointwise MLPs with their biases (structured), layer scales: K against float64."""
    torch.manual_seed(1)
    if name == "mobilenet_v3_small":
        import torchvision

        model = torchvision.models.mobilenet_v3_small(num_classes=3)
    else:
        timm = pytest.importorskip("timm", reason="timm is one of the test tools (Makefile TOOLS)")
        model = timm.create_model(name, pretrained=False, num_classes=3)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    report = tk.coverage(model, x, structured="always")
    assert any(n.endswith("bias") for n in report.structured) and report.generic == []
    ref = tk.reference.gram_autograd(model, [x])
    K = tk.gram(model, [x], precision="fp64", progress=False, structured="always")
    assert rel_err(K, ref) <= 1e-10


class Lookups(nn.Module):
    """An embedding table looked up by batched token ids (padding row, sequence-first,
    twice per sample, or tied to an output projection), then a dense head."""

    def __init__(self, padding_idx=None, seq_first=False, twice=False, tied=False):
        super().__init__()
        self.table, self.head = nn.Embedding(50, 8, padding_idx=padding_idx), nn.Linear(8, 3)
        self.seq_first, self.twice, self.tied = seq_first, twice, tied

    def forward(self, tokens):  # [B, T]
        h = self.table(tokens.T).transpose(0, 1) if self.seq_first else self.table(tokens)
        if self.twice:
            h = h + self.table(tokens.flip(1))
        h = torch.tanh(h)
        out = self.head(h).mean(1)
        return out + (h @ self.table.weight.T).mean(1)[:, :3] if self.tied else out


@pytest.mark.parametrize("kind", ["plain", "padding", "seq-first", "twice", "tied"])
def test_embedding_tables_from_token_ids(kind, tmp_path):
    """A whole table's Gram from token ids and output gradients: sum over token pairs of
    [id == id'] (g . g'). Against float64, every precision, cross, every logit, resumed from
    a checkpoint; a table tied to a product keeps features."""
    torch.manual_seed(23)
    model = Lookups(**{"plain": {}, "padding": {"padding_idx": 4}, "seq-first": {"seq_first": True},
                       "twice": {"twice": True}, "tied": {"tied": True}}[kind])
    tokens = torch.randint(0, 50, (9, 6))
    tokens[0, :3] = 4  # repeated tokens within a sample (and the padding id)
    tokens[1, 2] = 4
    report = tk.coverage(model, tokens, structured="always")
    assert ("table.weight" in report.structured) == (kind != "tied")
    if kind != "tied":
        assert "token ids" in report.gram["table.weight"]
    ref = tk.reference.gram_autograd(model, [tokens])
    loader = [tokens[:4], tokens[4:]]
    for precision in TOLERANCE:
        K = tk.gram(model, loader, precision=precision, progress=False, structured="always")
        assert rel_err(K, ref) <= TOLERANCE[precision], precision
    cross = tk.gram(model, [tokens[:4]], None, [tokens[4:]], precision="fp64", progress=False, structured="always")
    assert rel_err(cross, tk.reference.gram_autograd(model, [tokens[:4]], None, [tokens[4:]])) <= 1e-10
    full = tk.gram(model, loader, output="full", precision="fp64", progress=False, structured="always")
    assert rel_err(full, _every_logit(model, tokens, 3)["full"]) <= 1e-10

    def stop(event):
        if event.phase == "gram" and not event.resumed:
            raise Interrupt

    with pytest.raises(Interrupt):
        tk.gram(model, loader, progress=False, structured="always", checkpoint=tmp_path, callback=stop)
    resumed = tk.gram(model, loader, progress=False, structured="always", checkpoint=tmp_path)
    assert torch.equal(resumed, tk.gram(model, loader, progress=False, structured="always"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mlp", "tokens", "transformer", "convs", "embedding"])
def test_structured_on_a_gpu_against_float64(name):
    """The structured path on CUDA (factor stores on the device, the tile contraction in
    cuBLAS, TF32 and 16-bit modes) against the float64 CPU reference."""
    if name == "embedding":
        torch.manual_seed(24)
        model, x = Lookups(padding_idx=4), torch.randint(0, 50, (9, 6))
    else:
        model, x, _ = _case(name, 9, 4)
    ref = tk.reference.gram_autograd(model, [x])
    model, x = model.cuda(), x.cuda()
    assert tk.coverage(model, x, structured="always").structured
    loader = [x[:4], x[4:]]
    # tf32: 10 mantissa bits in every matmul of the forward, backward and Gram, the bound
    # test_precision.py justifies (2e-2); the others as on the CPU.
    for precision, tolerance in {**TOLERANCE, "tf32": 2e-2}.items():
        K = tk.gram(model, loader, precision=precision, progress=False, structured="always")
        assert K.is_cuda and rel_err(K.cpu(), ref) <= tolerance, precision
    full = tk.gram(model, loader, output="full", precision="fp64", progress=False, structured="always")
    assert rel_err(full.cpu(), _every_logit(model.cpu(), x.cpu(), full.shape[-1])["full"]) <= 1e-10
