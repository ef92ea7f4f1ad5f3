"""The pipeline's seams (docs/pipeline.md): the request checked once for every entry, the
feature phase's out-of-memory backoff for tk.features as for tk.gram, the tuning knobs."""

import pytest
import torch
from torch import nn

import tangent_kernels as tk
from tangent_kernels import tuning
from tangent_kernels.persample import FeatureExtractor
from tangent_kernels.request import Request
from _models import cnn, cnn_input, mlp


def _oom_once(monkeypatch, at_least: int = 2):
    """FeatureExtractor.extract raises CUDA out-of-memory once, on the first batch of at
    least ``at_least`` samples (what a GPU does when a batch does not fit); returns the
    batch sizes it was called with."""
    calls = []
    original = FeatureExtractor.extract

    def extract(self, batch):
        calls.append(batch.size)
        if batch.size >= at_least and not any(size == "raised" for size in calls):
            calls.append("raised")
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, batch)

    monkeypatch.setattr(FeatureExtractor, "extract", extract)
    return calls


@pytest.mark.parametrize("projection", [None, "rademacher"])
def test_features_retry_an_out_of_memory_batch_in_halves(monkeypatch, projection):
    torch.manual_seed(0)
    model, x = cnn(), cnn_input(7).double()
    model = model.double()
    idx = tk.subsample(model, 60, seed=0)
    sketch = None if projection is None else tk.Projection(16, kind=projection, seed=1)
    expected = tk.features(model, [x[:5], x[5:]], idx, precision="fp64", progress=False, projection=sketch)
    calls = _oom_once(monkeypatch)
    got = tk.features(model, [x[:5], x[5:]], idx, precision="fp64", progress=False, projection=sketch)
    assert calls[:4] == [5, "raised", 2, 3]  # the 5-sample batch again, as 2 + 3
    # Each sample's features are its own: the halves' rows are the whole batch's, to fp64 rounding.
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    reference = tk.reference.features_autograd(model, [x], idx)
    if projection is None:
        torch.testing.assert_close(got, reference.to(got.dtype), rtol=1e-10, atol=1e-12)


def test_an_out_of_memory_error_on_one_sample_is_raised(monkeypatch):
    _oom_once(monkeypatch, at_least=1)
    with pytest.raises(torch.OutOfMemoryError):
        tk.features(mlp(), [torch.randn(1, 6)], progress=False)


@pytest.mark.parametrize("entry", ["gram", "features", "coverage", "Kernel"])
@pytest.mark.parametrize("argument, match", [
    (dict(precision="fp8"), r"unknown precision 'fp8'"),
    (dict(output="second"), r"unknown output 'second'"),
    (dict(inputs="x"), r"inputs must be a callable"),
    (dict(device="nonsense"), r"device"),
])
def test_every_entry_checks_its_arguments_with_one_message(entry, argument, match):
    model, x = mlp(), torch.randn(4, 6)
    call = {
        "gram": lambda: tk.gram(model, [x], progress=False, **argument),
        "features": lambda: tk.features(model, [x], progress=False, **argument),
        "coverage": lambda: tk.coverage(model, x, **argument),
        "Kernel": lambda: tk.Kernel(model, **argument),
    }[entry]
    with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
        call()


def test_the_model_is_checked_by_every_entry():
    scripted = torch.jit.script(mlp())
    for call in (lambda: tk.gram(scripted, [torch.randn(2, 6)], progress=False),
                 lambda: tk.features(scripted, [torch.randn(2, 6)], progress=False),
                 lambda: tk.coverage(scripted, torch.randn(2, 6)),
                 lambda: tk.Kernel(scripted)):
        with pytest.raises(TypeError, match="TorchScript"):
            call()


def test_a_request_carries_its_precision_whole():
    request = Request.of(mlp(), precision="tf32", store="auto")
    assert request.precision is tk.engine.PRECISIONS["tf32"]
    assert request.budget is not None and request.store == "auto"
    assert Request.of(mlp()).store is None  # no feature store for features or coverage
    # A Precision passes as itself: a request made from another's fields is the same.
    assert Request.of(mlp(), precision=request.precision).precision is request.precision


def test_the_precision_math_context_restores_the_users_settings():
    flags = torch.backends.cuda.matmul
    before = getattr(flags, "fp32_precision", None)
    with tk.engine.PRECISIONS["tf32"].math():
        if before is not None:
            assert flags.fp32_precision == "tf32"
    with tk.engine.PRECISIONS["fp32"].math():
        if before is not None:
            assert flags.fp32_precision == "ieee"
    assert getattr(flags, "fp32_precision", None) == before


def test_tuned_sets_and_restores_and_checks():
    assert tuning.settings.tile_rows == 1024
    model, x = mlp(), torch.randn(9, 6)
    base = tk.gram(model, [x], progress=False, precision="fp64")
    with tuning.tuned(tile_rows=2) as settings:
        assert settings.tile_rows == 2
        small = tk.gram(model, [x], progress=False, precision="fp64")
    assert tuning.settings.tile_rows == 1024
    torch.testing.assert_close(small, base, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="tile_rows must be a positive int"):
        with tuning.tuned(tile_rows=0):
            pass
    with pytest.raises(TypeError, match="unknown tuning knob"):
        with tuning.tuned(tile_row=4):
            pass
    assert tuning.settings.tile_rows == 1024


def test_tile_rows_as_a_parameter_of_the_gram_phase(monkeypatch):
    # blocked_gram takes tile_rows (the distributed driver passes the height it scheduled).
    from tangent_kernels import tiles

    heights = []
    original = tiles.blocked_gram

    def spy(*args, tile_rows=None, **kwargs):
        heights.append(tile_rows)
        return original(*args, tile_rows=3, **kwargs)

    monkeypatch.setattr(tiles, "blocked_gram", spy)
    model, x = mlp(), torch.randn(7, 6)
    k = tk.gram(model, [x], progress=False, precision="fp64")
    assert heights == [None]
    torch.testing.assert_close(k, tk.reference.gram_autograd(model, [x]).to(k.dtype), rtol=1e-10, atol=1e-12)


def test_engine_and_driver_are_reached_through_the_public_entry(monkeypatch):
    # group=False: one process, whatever the environment; tk.gram is pipeline.gram.
    assert tk.gram is tk.pipeline.gram and tk.features is tk.engine.features
    model = nn.Linear(3, 2)
    k = tk.gram(model, [torch.randn(4, 3)], group=False, progress=False)
    assert k.shape == (4, 4)


def test_the_old_module_knobs_still_work_deprecated(monkeypatch):
    from tangent_kernels.persample import dense, extractor, generic

    for module, old, knob, value in ((dense, "DENSE_STRATEGY", "dense_strategy", "never"),
                                     (extractor, "BATCHED", "batched", False),
                                     (generic, "STRATEGY", "generic_strategy", "loop")):
        with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated: use tangent_kernels.tuning"):
            monkeypatch.setattr(module, old, value)  # reads the old value first, sets the new one
        assert getattr(tuning.settings, knob) == value
        with pytest.warns(DeprecationWarning):
            assert getattr(module, old) == value
    with pytest.raises(ValueError, match="dense_strategy = 'sometimes'"), pytest.warns(DeprecationWarning):
        dense.DENSE_STRATEGY = "sometimes"
    monkeypatch.undo()
    assert (tuning.settings.dense_strategy, tuning.settings.batched, tuning.settings.generic_strategy) == \
        ("auto", True, "auto")
