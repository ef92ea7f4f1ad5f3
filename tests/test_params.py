"""Parameter subsamples: the global flat index, subsample(), ParamIndex."""

import numpy as np
import pytest
import torch
from torch import nn

import tangent_kernels as tk
from _models import TiedHead, cnn, frozen_mlp, mlp


def test_subsample_is_uniform_without_replacement_and_sorted():
    model = cnn()
    total = sum(p.numel() for p in model.parameters())
    idx = tk.subsample(model, 400, seed=0)
    pos = idx.positions
    assert len(idx) == 400 and pos.dtype == torch.int64
    assert torch.equal(pos, torch.unique(pos))  # sorted, no repeats
    assert 0 <= int(pos.min()) and int(pos.max()) < total
    # Uniform over positions: over many seeds every decile of the range is hit ~equally.
    counts = np.zeros(10)
    for seed in range(50):
        p = tk.subsample(model, 400, seed=seed).positions.numpy()
        counts += np.bincount(p * 10 // total, minlength=10)
    expected = 50 * 400 / 10
    assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected))


def test_subsample_is_deterministic_per_architecture_n_seed():
    a = tk.subsample(cnn(), 300, seed=7)
    b = tk.subsample(cnn(), 300, seed=7)  # other weights, same architecture
    assert torch.equal(a.positions, b.positions)
    assert not torch.equal(a.positions, tk.subsample(cnn(), 300, seed=8).positions)
    # Pinned values: the draw is pure integer arithmetic, so these never change across
    # machines or torch/NumPy versions. A change here breaks users' saved subsamples.
    assert tk.subsample(mlp(), 5, seed=0).positions.tolist() == PINNED_MLP_SEED0


PINNED_MLP_SEED0 = [47, 136, 145, 233, 250]


def test_subsample_all_and_chunked_paths_agree(monkeypatch):
    model = mlp()
    total = sum(p.numel() for p in model.parameters())
    everything = tk.subsample(model, total)
    assert torch.equal(everything.positions, torch.arange(total))
    sizes = [1, 37, 200, total - 1]  # the last ones keep every key of the pass
    expected = [tk.subsample(model, n, seed=5).positions for n in sizes]
    import tangent_kernels.params as params

    monkeypatch.setattr(params, "_CHUNK", 16)  # many blocks, the last one partial
    assert all(torch.equal(tk.subsample(model, n, seed=5).positions, e) for n, e in zip(sizes, expected))
    # A first bound too low for n keys: the bound is raised until n keys fall under it.
    monkeypatch.setattr(params, "_first_bound", lambda total, n: 1)
    assert all(torch.equal(tk.subsample(model, n, seed=5).positions, e) for n, e in zip(sizes, expected))


def test_param_index_splits_by_tensor_in_given_order():
    model = mlp()
    sizes = [p.numel() for p in model.parameters()]
    offsets = np.cumsum([0] + sizes)
    positions = torch.tensor([offsets[2] + 3, 0, offsets[4], offsets[2] + 1, 5])
    idx = tk.ParamIndex.from_positions(model, positions)
    names = [n for n, _ in model.named_parameters()]
    assert idx.touched_names == [names[0], names[2], names[4]]
    first, third, fifth = idx.tensor_slices
    assert first.local.tolist() == [0, 5] and first.columns.tolist() == [1, 4]
    assert third.local.tolist() == [3, 1] and third.columns.tolist() == [0, 3]
    assert fifth.local.tolist() == [0] and fifth.columns.tolist() == [2]


def test_frozen_and_tied_parameters_are_excluded_or_counted_once():
    frozen = frozen_mlp()
    trainable = sum(p.numel() for p in frozen.parameters() if p.requires_grad)
    assert tk.ParamIndex.all(frozen).layout.total == trainable
    tied = TiedHead()
    assert tk.ParamIndex.all(tied).layout.total == sum(p.numel() for p in tied.parameters())
    assert "proj.weight" not in tk.ParamIndex.all(tied).layout.names


def test_param_index_for_another_architecture_is_refused():
    idx = tk.subsample(mlp(k=3), 10)
    with pytest.raises(ValueError, match="different parameter layout.*tk.subsample"):
        tk.gram(mlp(k=4), [torch.randn(2, 6)], idx, progress=False)


@pytest.mark.parametrize(
    "idx, error, message",
    [
        (torch.tensor([0, 10**9]), ValueError, r"position 1000000000, out of range: valid .* 0 \.\. \d+"),
        (torch.tensor([-1, 3]), ValueError, r"position -1, out of range"),
        (torch.tensor([4, 2, 4]), ValueError, r"duplicated position.*\[4\].*torch.unique"),
        (torch.tensor([0.0, 1.0]), TypeError, r"integer positions, got dtype torch.float32"),
        (torch.tensor([True, False]), TypeError, r"integer positions.*bool"),
        (torch.tensor([[0, 1]]), ValueError, r"must be 1-D, got shape \(1, 2\)"),
        (torch.tensor([], dtype=torch.int64), ValueError, r"idx is empty"),
        ("0:10", TypeError, r"idx must be None, a tk.ParamIndex"),
    ],
)
def test_bad_idx(idx, error, message):
    with pytest.raises(error, match=message):
        tk.gram(mlp(), [torch.randn(2, 6)], idx, progress=False)


@pytest.mark.parametrize("n", [0, -3, 10**9])
def test_subsample_n_out_of_range(n):
    total = sum(p.numel() for p in mlp().parameters())
    with pytest.raises(ValueError, match=rf"n={n}.*{total} trainable parameters.*1 \.\. {total}"):
        tk.subsample(mlp(), n)


def test_subsample_rejects_non_int_n():
    with pytest.raises(TypeError, match="n must be an int"):
        tk.subsample(mlp(), 10.0)


def test_no_trainable_parameters():
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters.*requires_grad_"):
        tk.gram(model, [torch.randn(2, 6)], progress=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        tk.subsample(model, 1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        tk.gram(nn.ReLU(), [torch.randn(2, 6)], progress=False)
