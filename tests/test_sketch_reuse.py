"""The slices of R one tk.features / tk.gram call keeps across its batches (sketch.KeptRows):
the same sketch bit for bit as generating R per batch (a budget of 0), R generated once
per call where it fits the budget (per batch past it), nothing kept after the call."""

import gc
import weakref

import pytest
import torch

import tangent_kernels as tk
import tangent_kernels.feature_phase as feature_phase
import tangent_kernels.sketch as sketch

from _models import cnn, cnn_input, mlp
from conftest import batches

KINDS = ["gaussian", "rademacher", "kronecker"]  # kronecker: its dense tensors (biases, norms) take R


def counted_rows(monkeypatch) -> list:
    """Records each generation of a slice of R (sketch._rows) made by Projection.project."""
    calls, original = [], sketch._rows

    def rows(key, local, width, *args, **kwargs):
        calls.append((key, int(local.numel()), width))
        return original(key, local, width, *args, **kwargs)

    monkeypatch.setattr(sketch, "_rows", rows)
    return calls


def sketched_features(model, loader, idx, projection, budget, monkeypatch, **kwargs):
    monkeypatch.setattr(sketch, "KEPT_ROWS_BYTES", budget)
    return tk.features(model, loader, idx, projection=projection, progress=False, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_kept_rows_give_the_per_batch_sketch_bit_for_bit(kind, monkeypatch):
    # Small slices (several per tensor), a shuffled subsample (gathered columns), batches
    # of unequal size: every budget, from none through part of R to all of it, gives the
    # same bits as generating R for each batch.
    torch.manual_seed(3)
    model, x = cnn(), cnn_input(11)
    total = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(sketch, "_SLICE_ENTRIES", 64 * 20)
    projection = tk.Projection(64, kind=kind, seed=7)
    for idx in (None, torch.randperm(total)[:700]):
        loader = batches(x, 3)
        per_batch = sketched_features(model, loader, idx, projection, 0, monkeypatch)
        for budget in (64 * 20 * 4 * 3, 256 << 20):
            kept = sketched_features(model, loader, idx, projection, budget, monkeypatch)
            assert torch.equal(kept, per_batch), (kind, budget)
        monkeypatch.setattr(sketch, "KEPT_ROWS_BYTES", 256 << 20)
        k_kept = tk.gram(model, loader, idx, batches(x[:5], 2), projection=projection, progress=False)
        monkeypatch.setattr(sketch, "KEPT_ROWS_BYTES", 0)
        k_per_batch = tk.gram(model, loader, idx, batches(x[:5], 2), projection=projection, progress=False)
        assert torch.equal(k_kept, k_per_batch), kind


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_r_is_generated_once_per_call_within_the_budget(kind, monkeypatch):
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(16, 6)
    monkeypatch.setattr(sketch, "_SLICE_ENTRIES", 32 * 16)  # 16 rows a slice: several slices per weight
    projection = tk.Projection(32, kind=kind, seed=1)
    calls = counted_rows(monkeypatch)
    sketched_features(model, batches(x, 4), None, projection, 0, monkeypatch)
    per_batch, slices = len(calls), len(calls) // 4
    assert per_batch == 4 * slices and slices > 4
    calls.clear()
    sketched_features(model, batches(x, 4), None, projection, 256 << 20, monkeypatch)
    assert len(calls) == slices  # once per call, not per batch
    # A budget of two full slices keeps two of them: the others are generated per batch.
    calls.clear()
    slice_bytes = 16 * 32 * 4
    sketched_features(model, batches(x, 4), None, projection, 2 * slice_bytes, monkeypatch)
    assert len(calls) == 2 + 4 * (slices - 2)
    # A cross Gram's two loaders share the call's slices: R generated once for both.
    calls.clear()
    monkeypatch.setattr(sketch, "KEPT_ROWS_BYTES", 256 << 20)
    tk.gram(model, batches(x, 4), None, batches(x[:6], 3), projection=projection, progress=False)
    assert len(calls) == slices


def test_nothing_is_kept_after_the_call(monkeypatch):
    made = []

    class Recorded(sketch.KeptRows):
        def __init__(self, budget):
            super().__init__(budget)
            made.append(weakref.ref(self))

    monkeypatch.setattr(feature_phase, "KeptRows", Recorded)
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(12, 6)
    projection = tk.Projection(16, seed=2)
    before = dict(vars(projection))
    tk.features(model, batches(x, 4), projection=projection, progress=False)
    tk.gram(model, batches(x, 4), projection=projection, progress=False)
    gc.collect()
    assert len(made) == 2 and all(ref() is None for ref in made)
    assert vars(projection) == before  # the Projection holds no slices of its own


def test_budget_rule():
    assert sketch.kept_rows_budget(None, 8) == sketch.KEPT_ROWS_BYTES
    assert sketch.kept_rows_budget(None, None) == sketch.KEPT_ROWS_BYTES  # batches unknown: keep
    assert sketch.kept_rows_budget(4 << 30, 8) == sketch.KEPT_ROWS_BYTES
    assert sketch.kept_rows_budget(400 << 20, 8) == 100 << 20  # a quarter of max_memory
    assert sketch.kept_rows_budget(None, 1) == 0  # one batch: nothing to reuse
