"""progress= and callback= of tk.gram / tk.features: the bar's three modes, what it
shows (phase, rate, ETA), and a callback's exception stopping the run cleanly."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tangent_kernels as tk
from tangent_kernels import tuning

N = 13


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(tuning.settings, "tile_rows", 4)  # several row blocks of K over 13 samples


def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    # A DataLoader announces its sample count, so the bar can show an ETA.
    loader = DataLoader(TensorDataset(torch.randn(N, 5)), batch_size=4)
    return model, loader


def test_always_shows_both_phases_with_rate_and_eta_when_stderr_is_not_a_terminal(capsys):
    model, loader = _problem()
    k = tk.gram(model, loader, progress="always")
    err = capsys.readouterr().err
    assert "eNTK features (loader)" in err and "eNTK Gram rows" in err
    assert f"{N}/{N}" in err  # both phases run to the end
    assert "sample/s" in err and "row/s" in err  # rates, per phase unit
    assert "<" in err  # tqdm's [elapsed<remaining] ETA field
    ref = tk.reference.gram_autograd(model, loader)
    # fp32 features and products: see test_gram.py's tolerance table
    assert float((k.double() - ref).norm() / ref.norm()) <= 1e-5


def test_always_on_features(capsys):
    model, loader = _problem(1)
    tk.features(model, loader, progress="always")
    assert "eNTK features (loader)" in capsys.readouterr().err


@pytest.mark.parametrize("progress", [True, None, False])
def test_no_bar_when_stderr_is_not_a_terminal_or_when_off(capsys, progress):
    # Under pytest's capture stderr is not a terminal: True (and None, its alias, as in
    # tk.solve) behave as in a log or CI.
    model, loader = _problem(2)
    tk.gram(model, loader, progress=progress)
    tk.features(model, loader, progress=progress)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad", ["yes", "alwyas", 1, 0.0])
def test_bad_progress_is_refused_with_the_choices(bad):
    model, loader = _problem()
    for fn in (tk.gram, tk.features):
        with pytest.raises(ValueError, match=r"progress must be True or None .* False .* or 'always'"):
            fn(model, loader, progress=bad)


class Stop(Exception):
    pass


@pytest.mark.parametrize("phase", ["features", "gram"])
def test_callback_exception_stops_the_run_and_cleans_up(tmp_path, phase):
    model, loader = _problem(3)
    seen = []

    def callback(event):
        seen.append(event)
        if event.phase == phase:
            raise Stop(event.done)

    with pytest.raises(Stop):
        tk.gram(model, loader, progress=False, callback=callback, store="disk", cache_dir=tmp_path)
    # stopped at the first event of that phase, nothing after it
    assert seen[-1].phase == phase and sum(e.phase == phase for e in seen) == 1
    assert list(tmp_path.iterdir()) == []  # the disk store's file is removed on the way out


def test_a_list_of_batches_announces_its_sample_count():
    model, _ = _problem(2)
    batches = [torch.randn(4, 5), torch.randn(3, 5)]
    events = []
    tk.gram(model, batches, progress=False, callback=events.append)
    features = [e for e in events if e.phase == "features"]
    assert [(e.done, e.total) for e in features] == [(4, 7), (7, 7)]
