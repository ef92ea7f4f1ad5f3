"""The demo end to end (--quick) and its data construction."""

import json

import pytest
import torch
from torch import nn

from tangent_kernels import demo
from tangent_kernels.cli import main as cli_main


def test_shift_is_a_partition_with_every_class_on_both_sides():
    shift = demo.make_shift(seed=0)
    x_all, y_all = demo._digits()
    sizes = shift.sizes()
    assert sizes["train"] + sizes["val"] + sizes["test"] + sizes["ood"] == len(y_all)
    assert sizes["corrupted"] == sizes["test"]
    for name in ("train", "val", "test", "ood"):
        assert set(getattr(shift, name)[1].tolist()) == set(range(10))
    # ID and OOD images are different images (no sample on both sides)
    id_images = torch.cat([shift.train[0], shift.val[0], shift.test[0]]).reshape(-1, 64)
    ood_images = shift.ood[0].reshape(-1, 64)
    distances = torch.cdist(id_images[:200], ood_images)
    assert float(distances.min()) > 0
    # the corruption changes the images but keeps them in [0, 1], deterministically
    assert not torch.equal(shift.corrupted[0], shift.test[0])
    assert float(shift.corrupted[0].min()) >= 0 and float(shift.corrupted[0].max()) <= 1
    assert torch.equal(demo.corrupt(shift.test[0], 5), demo.corrupt(shift.test[0], 5))


def test_quick_demo_writes_well_formed_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "ID acc" in printed and "OOD acc" in printed and "total time" in printed
    report = json.loads((out / "results.json").read_text())
    assert set(report) >= {"config", "device", "versions", "summary", "runs", "figures", "wall_time_s"}
    assert report["config"]["quick"] is True and report["config"]["seeds"] == [0]
    run = report["runs"][0]
    methods = set(run["accuracy"])
    assert {"LP", "FT", "LP-FT"} <= methods
    assert sum("pNTK" in m for m in methods) == 2 and sum("first logit" in m for m in methods) == 2
    for method, accuracies in run["accuracy"].items():
        assert set(accuracies) == {"test", "ood", "corrupted"}
        assert all(0.0 <= a <= 1.0 for a in accuracies.values()), method
    # eNTK regression learns the ID task: far above chance (0.1) even in the quick run
    assert run["accuracy"]["pNTK (Nesterov, early stopping)"]["test"] > 0.5
    assert all(t >= 0 for t in run["times_s"].values()) and "pretraining" in run["times_s"]
    eigenvalues = run["pntk_kernel"]["eigenvalues"]
    assert len(eigenvalues) == run["sizes"]["train"] and eigenvalues == sorted(eigenvalues, reverse=True)
    assert run["pntk_kernel"]["beta_scale"] > 0
    assert len(run["nesterov_trajectory"]) == 3  # 0.01x, 1x and 100x the chosen beta
    for curve in run["nesterov_trajectory"].values():
        assert len(curve["iteration"]) == len(curve["val"]) == len(curve["ood"])
        assert all(0.0 <= a <= 1.0 for a in curve["val"] + curve["ood"])
    for figure in ("nesterov_accuracy.png", "id_vs_ood.png", "spectrum.png"):
        data = (out / figure).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_bad_params_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["demo", "--quick", "--params", "0", "--out", str(tmp_path)]) == 2
    assert "--params must be >= 1" in capsys.readouterr().err


def test_quick_lookahead_demo_prints_the_table_and_writes_the_figure(tmp_path, capsys):
    out = tmp_path / "lookahead"
    assert cli_main(["demo", "lookahead", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "labels" in printed and all(s in printed for s in ("look-ahead", "margin", "random"))
    report = json.loads((out / "lookahead.json").read_text())
    run = report["runs"][0]
    rounds, per_round, start = (report["config"][k] for k in ("rounds", "per_round", "start"))
    assert run["labels"] == [start + r * per_round for r in range(rounds + 1)]
    for strategy, curve in run["curves"].items():
        assert len(curve) == rounds + 1 and all(0.0 <= a <= 1.0 for a in curve), strategy
        assert curve[0] == run["curves"]["random"][0]  # one initial network and L for every strategy
        picked = sum(run["picked"][strategy], [])
        assert len(set(picked)) == rounds * per_round  # no point picked twice
    # the kernel model learns from the labels: far above chance (0.1) even in the quick run
    assert run["curves"]["look-ahead"][-1] > 0.5
    data = (out / "lookahead.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_unknown_demo_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        cli_main(["demo", "lookahed"])
    assert "invalid choice: 'lookahed'" in capsys.readouterr().err


def test_quick_tracking_demo_records_the_kernel_through_fine_tuning(tmp_path, capsys):
    out = tmp_path / "tracking"
    assert cli_main(["demo", "tracking", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "distance" in printed and "alignment" in printed and "lambda_1" in printed
    report = json.loads((out / "tracking.json").read_text())
    cfg, run = report["config"], report["runs"][0]
    assert run["step"] == list(range(0, cfg["steps"] + 1, cfg["every"]))
    records = len(run["step"])
    for column in ("distance", "alignment_centered", "top_eigenvalues", "effective_dimension", "test_accuracy"):
        assert len(run[column]) == records, column
    assert run["distance"][0] == pytest.approx(0.0, abs=1e-12)  # the first K against itself
    assert all(0.0 <= d <= 2.0 for d in run["distance"])
    assert all(-1.0 <= a <= 1.0 for a in run["alignment_centered"])
    for eig in run["top_eigenvalues"]:
        assert eig == sorted(eig, reverse=True) and eig[-1] > 0  # K is PSD with rank >= 3 on 32 images
    # the weights moved, so the kernel did: fine-tuning is not frozen
    assert run["distance"][-1] > 0 and run["top_eigenvalues"][-1] != run["top_eigenvalues"][0]
    data = (out / "tracking.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_tracking_demo_matches_tk_gram_at_the_same_weights():
    """The demo's records are K's statistics: the tracker (a tk.Kernel kept across the
    training steps) gives the same K as a fresh tk.gram after the steps."""
    import tangent_kernels as tk

    torch.manual_seed(0)
    model = demo.digits_cnn()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    tracker = tk.tracking.KernelTracker(model, [x], every=2, targets=y, output="sum", keep_kernels=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        tracker.step()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    record = tracker.record(step=3)
    K = tk.gram(model, [x], output="sum", precision="fp64", progress=False)
    assert torch.allclose(record.kernel, K, rtol=1e-4, atol=1e-4 * float(K.diagonal().max()))
