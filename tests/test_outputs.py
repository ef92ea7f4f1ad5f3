"""Every logit at its true cost (issue 23): output="trace" and "diagonal" are k Grams of
one logit's size (features and structured factors), never the k^2 cross products; their
layout survives checkpoints and older folders are refused; every form within the
precision's bound of the float64 reference.

Tolerances: fp64 1e-10 (rounding only); fp32 1e-5; bf16 2e-2 and fp16 4e-3 (test_precision's:
each feature rounded once, the fp16 scale shared by a sample's k logits)."""

import json

import pytest
import torch

import tangent_kernels as tk
import tangent_kernels.tiles as tiles
from tangent_kernels import tuning
from _models import TinyTransformer, cnn, cnn_input, mlp
from tangent_kernels.structured import contract
from conftest import K_TOLERANCE, rel_err

FORMS = ("full", "trace", "diagonal")


def every_logit(model, x, outputs, idx=None):
    """Each output form of the float64 reference, from the per-logit gradients [n, k, p]."""
    per = torch.stack([tk.reference.features_autograd(model, [x], idx, output=a) for a in range(outputs)], 1)
    full = torch.einsum("iap,jbp->ijab", per, per)
    return {"full": full, "trace": full.diagonal(dim1=2, dim2=3).sum(-1), "diagonal": full.diagonal(dim1=2, dim2=3)}


def _count_products(monkeypatch):
    """Multiply-adds of the feature Gram's GEMMs, summed over every tile."""
    work = []
    original = tiles.gram_tile_update

    def counted(K, A, B, *args, **kwargs):
        work.append(A.shape[0] * B.shape[0] * A.shape[1])
        return original(K, A, B, *args, **kwargs)

    monkeypatch.setattr(tiles, "gram_tile_update", counted)
    return work


@pytest.mark.parametrize("symmetric", [True, False])
def test_trace_and_diagonal_cost_k_times_one_logit(monkeypatch, symmetric, set_tile_rows):
    """The feature Gram of trace/diagonal does exactly k times one logit's products;
    full does the k^2 cross products (about k^2 times)."""
    set_tile_rows(5)  # several tiles, borders inside the data
    torch.manual_seed(0)
    model, x = mlp(4), torch.randn(13, 6)
    work = _count_products(monkeypatch)
    loader, loader2 = [x[:6], x[6:]], (None if symmetric else [x[:4]])
    done = {}
    for output in (0, "trace", "diagonal", "full"):
        work.clear()
        tk.gram(model, loader, None, loader2, output=output, progress=False, structured="never")
        done[output] = sum(work)
    assert done["trace"] == done["diagonal"] == 4 * done[0]
    assert done["full"] >= 4 * 4 * done[0] * (0.5 if symmetric else 1)


@pytest.mark.parametrize("form", ["trace", "diagonal"])
@pytest.mark.parametrize("tokens, k, index", [(1, 1, False), (1, 3, False), (4, 1, False), (3, 2, False),
                                              (3, 2, True)])
def test_structured_contraction_of_matched_outputs(monkeypatch, form, tokens, k, index):
    """The structured tile's trace/diagonal forms equal the trace/diagonal of its full
    form, chunked (tiny chunks) and with fp16 scales that differ between outputs."""
    monkeypatch.setattr(contract, "_PAIR_ELEMENTS", 50)
    torch.manual_seed(1)
    x_dim = 1 if index else 6
    make_x = (lambda n: torch.randint(0, 4, (n, tokens)).double()) if index else \
        (lambda n: torch.randn(n, tokens * x_dim, dtype=torch.float64))
    x_i, x_j = make_x(5), make_x(4)
    g_i, g_j = torch.randn(5 * k, tokens * 7, dtype=torch.float64), torch.randn(4 * k, tokens * 7, dtype=torch.float64)
    rows = contract.structured_tile(x_i, g_i, x_j, g_j, tokens, k, torch.float64, index=index)
    diagonal = rows.view(5, k, 4, k).diagonal(dim1=1, dim2=3)  # [5, 4, k]
    expected = diagonal.sum(-1) if form == "trace" else diagonal.permute(2, 0, 1)  # the diagonal logit-major
    got = contract.structured_tile(x_i, g_i, x_j, g_j, tokens, k, torch.float64, index=index, form=form)
    assert got.shape == expected.shape and rel_err(got, expected) <= 1e-12
    scales = [torch.exp2(torch.randint(-3, 4, (r,)).double()) for r in (5, 5 * k, 4, 4 * k)]
    if index:
        scales[0] = scales[2] = None  # token ids are stored unscaled
    scaled = [t if s is None else t * s[:, None] for t, s in zip((x_i, g_i, x_j, g_j), scales)]
    got = contract.structured_tile(*scaled, tokens, k, torch.float64, scales, index=index, form=form)
    assert rel_err(got, expected) <= 1e-12


CASES = {
    "mlp": (lambda: mlp(3), lambda n: torch.randn(n, 6)),
    "cnn": (lambda: cnn(4), cnn_input),
    "transformer": (lambda: TinyTransformer(), lambda n: torch.randn(n, 4, 16)),
}


@pytest.mark.parametrize("structured", ["never", "always"])
@pytest.mark.parametrize("name", list(CASES))
def test_every_form_and_precision_against_the_reference(name, structured, set_tile_rows):
    set_tile_rows(4)
    torch.manual_seed(2)
    model, x = CASES[name][0](), CASES[name][1](7)
    outputs = model(x[:2]).shape[1]
    expected = every_logit(model, x, outputs)
    cross = every_logit(model, torch.cat([x, x[:3]]), outputs)
    for output in FORMS:
        for precision in ("fp64", "fp32", "bf16", "fp16"):
            K = tk.gram(model, [x[:3], x[3:]], output=output, precision=precision, progress=False,
                        structured=structured)
            assert K.shape == expected[output].shape, (output, precision)
            assert rel_err(K, expected[output]) <= K_TOLERANCE[precision], (output, precision)
        C = tk.gram(model, [x[:3], x[3:]], None, [x[:3]], output=output, precision="fp64", progress=False,
                    structured=structured)
        assert rel_err(C, cross[output][:7, 7:]) <= 1e-10, output


class Stop(Exception):
    pass


@pytest.mark.parametrize("output", ["trace", "diagonal"])
@pytest.mark.parametrize("stop", [("features", 10), ("gram", 8)])
def test_resume_is_bit_identical(tmp_path, output, stop, set_tile_rows):
    set_tile_rows(4)
    torch.manual_seed(3)
    model, loader = mlp(3), [torch.randn(5, 6) for _ in range(4)]
    base = tk.gram(model, loader, output=output, progress=False)

    def interrupt(event):
        if (event.phase, event.done) == stop and not event.resumed:
            raise Stop

    with pytest.raises(Stop):
        tk.gram(model, loader, output=output, checkpoint=tmp_path, callback=interrupt, progress=False)
    events = []
    K = tk.gram(model, loader, output=output, checkpoint=tmp_path, callback=events.append, progress=False)
    assert any(e.resumed for e in events) and torch.equal(K, base)


def test_a_folder_of_the_older_layout_is_refused(tmp_path):
    """Before issue 23, trace/diagonal checkpointed a row per (sample, logit): such a folder
    (its identity has no features_layout) must be refused, never read as samples' rows."""
    torch.manual_seed(4)
    model, loader = mlp(3), [torch.randn(5, 6) for _ in range(2)]

    def stop(event):
        if event.phase == "features" and not event.resumed:
            raise Stop

    with pytest.raises(Stop):
        tk.gram(model, loader, output="trace", checkpoint=tmp_path, callback=stop, progress=False)
    manifest = tmp_path / "manifest.json"
    record = json.loads(manifest.read_text())
    assert "features_layout" in record["identity"]
    del record["identity"]["features_layout"]
    manifest.write_text(json.dumps(record))
    with pytest.raises(tk.CheckpointMismatch, match="features_layout"):
        tk.gram(model, loader, output="trace", checkpoint=tmp_path, progress=False)


# The float64 reference of every form (issue 23: it raised a TypeError) --------------------

@pytest.mark.parametrize("name", list(CASES))
def test_the_reference_computes_every_form(name):
    """gram_autograd(output=form) against the per-logit references stacked by hand
    (output=a for each logit a: one scalar each, the reference's oldest path)."""
    torch.manual_seed(5)
    model, x1, x2 = CASES[name][0](), CASES[name][1](4), CASES[name][1](3)
    outputs = model(x1[:2]).shape[1]
    idx = tk.subsample(model, 150, seed=1)
    per1, per2 = (torch.stack([tk.reference.features_autograd(model, [x], idx, output=a) for a in range(outputs)], 1)
                  for x in (x1, x2))
    F = tk.reference.features_autograd(model, [x1[:2], x1[2:]], idx, output="full")
    assert F.dtype == torch.float64 and F.shape == (4, outputs, 150) and torch.equal(F, per1)
    full = torch.einsum("iap,jbp->ijab", per1, per2)
    expected = {"full": full, "trace": full.diagonal(dim1=2, dim2=3).sum(-1), "diagonal": full.diagonal(dim1=2, dim2=3)}
    for output in FORMS:
        K = tk.reference.gram_autograd(model, [x1], idx, [x2], output=output)
        assert K.shape == expected[output].shape and rel_err(K, expected[output]) <= 1e-14, output
    symmetric = tk.reference.gram_autograd(model, [x1], idx, output="trace")
    assert rel_err(symmetric, torch.einsum("iap,jap->ij", per1, per1)) <= 1e-14


def _resnet18():
    torchvision = pytest.importorskip("torchvision", reason="torchvision is one of the test tools (Makefile TOOLS)")
    return torchvision.models.resnet18(num_classes=10), torch.randn(5, 3, 32, 32)


def _bert():
    transformers = pytest.importorskip("transformers", reason="transformers is one of the test tools (Makefile TOOLS)")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=16, num_labels=3)
    ids, mask = torch.randint(0, 100, (5, 7)), torch.ones(5, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    return transformers.BertForSequenceClassification(config), {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("make", [_resnet18, _bert], ids=["torchvision-resnet18", "hf-bert-classifier"])
def test_every_form_on_real_architectures(make):
    """A torchvision CNN (k = 10) and a Hugging Face classifier (k = 3): every form,
    features and structured, within fp64's and fp32's bounds of the float64 reference."""
    torch.manual_seed(6)
    model, batch = make()
    model.eval()
    # Kronecker-sampled weights keep the structured form (docs/structured.md): "always" takes it.
    idx = tk.subsample(model, 3000, seed=2, structure="kronecker")
    assert tk.coverage(model, batch, idx, output="trace", structured="always").structured
    per = tk.reference.features_autograd(model, [batch], idx, output="full")
    full = torch.einsum("iap,jbp->ijab", per, per)
    expected = {"full": full, "trace": full.diagonal(dim1=2, dim2=3).sum(-1), "diagonal": full.diagonal(dim1=2, dim2=3)}
    for output in FORMS:
        for structured in ("never", "always"):
            K = tk.gram(model, [batch], idx, output=output, precision="fp64", progress=False, structured=structured)
            assert rel_err(K, expected[output]) <= 1e-10, (output, structured)
        # fp32: rounding through a deep network / two attention layers (test_real_transformers' 1e-4).
        K32 = tk.gram(model, [batch], idx, output=output, progress=False)
        assert rel_err(K32, expected[output]) <= 1e-4, output


@pytest.mark.parametrize("structured", ["never", "always"])
@pytest.mark.parametrize("output", ["trace", "diagonal"])
def test_stores_and_exact_symmetry(output, structured, tmp_path, set_tile_rows):
    """Host and disk stores (rows staged per tile) give the device store's K bit for bit,
    and K(X, X) is exactly symmetric in its sample axes."""
    set_tile_rows(3)
    torch.manual_seed(7)
    model, x = mlp(3), torch.randn(10, 6)
    loader = [x[:4], x[4:]]
    K = tk.gram(model, loader, output=output, progress=False, store="device", structured=structured)
    for store in ("host", "disk"):
        assert torch.equal(tk.gram(model, loader, output=output, progress=False, store=store, cache_dir=tmp_path,
                                   structured=structured), K)
    assert torch.equal(K, K.transpose(0, 1))


@pytest.mark.parametrize("structured", ["never", "always"])
def test_one_logit_models(structured):
    """k = 1 (a [B] or [B, 1] output): full [n, n, 1, 1], trace [n, n], diagonal [n, n, 1]."""
    torch.manual_seed(8)
    model, x = mlp(1), torch.randn(6, 6)
    expected = every_logit(model, x, 1)
    for output in FORMS:
        K = tk.gram(model, [x[:4], x[4:]], output=output, precision="fp64", progress=False, structured=structured)
        assert K.shape == expected[output].shape and rel_err(K, expected[output]) <= 1e-10, output
