"""The command line: gram and solve round trips, and one-line errors with exit code 2."""

import json
import textwrap

import numpy as np
import pytest
import torch

import tangent_kernels as tk
from tangent_kernels.cli import main
from conftest import rel_err

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))

    instance = make()
    not_a_model = 3
""")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "factory.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    np.save("X.npy", x[:40])
    np.save("y.npy", y[:40])
    np.save("Xv.npy", x[40:])
    np.save("yv.npy", y[40:])
    torch.save(torch.from_numpy(x[:40]).float(), "X.pt")
    return tmp_path


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def test_gram_saves_the_same_K_as_the_library(workdir, capsys):
    assert main(["gram", "--model", "factory.py:make", "--data", "X.npy", "--params", "50", "--seed", "3",
                 "--output", "sum", "--batch-size", "16", "--out", "K.safetensors", "--no-progress"]) == 0
    assert "K(X, X) (40, 40) float32, p = 50 of 147 parameters" in capsys.readouterr().out
    K, meta = tk.load_gram("K.safetensors")
    x = torch.from_numpy(np.load("X.npy")).float()
    model = _model()
    expected = tk.gram(model, [x], tk.subsample(model, 50, seed=3), output="sum", progress=False)
    assert torch.equal(K, expected)
    assert meta["params"] == 50 and meta["output"] == "sum" and meta["model"] == "factory.py:make"
    assert "torch" in meta and meta["seconds"] >= 0


def test_gram_cross_kernel_from_a_module_path_and_pt_data(workdir):
    # "module:attr" imports from the working directory; .pt data; an instance, not a factory
    assert main(["gram", "--model", "factory:instance", "--data", "Xv.npy", "--data2", "X.pt",
                 "--out", "Kv.safetensors", "--no-progress", "--precision", "fp64"]) == 0
    K, _ = tk.load_gram("Kv.safetensors")
    x, xv = torch.load("X.pt"), torch.from_numpy(np.load("Xv.npy"))  # float32 and float64 data, as given
    ref = tk.reference.gram_autograd(_model(), [xv], None, [x])
    assert K.dtype == torch.float64 and K.shape == (20, 40)
    assert rel_err(K, ref) <= 1e-10  # fp64 (see test_gram.py)


def test_solve_round_trip_matches_kernel_ridge(workdir, capsys):
    for args in (["--data", "X.npy", "--out", "K.safetensors"], ["--data", "Xv.npy", "--data2", "X.npy", "--out", "Kv.safetensors"]):
        assert main(["gram", "--model", "factory.py:make", "--no-progress", *args]) == 0
    assert main(["solve", "--gram", "K.safetensors", "--labels", "y.npy", "--val-gram", "Kv.safetensors",
                 "--val-labels", "yv.npy", "--test-gram", "Kv.safetensors", "--test-labels", "yv.npy",
                 "--betas", "0.01", "0.1", "1", "--solver", "cholesky", "--json", "report.json",
                 "--coef", "alpha.pt", "--no-progress"]) == 0
    out = capsys.readouterr().out
    report = json.loads(open("report.json").read())
    K, Kv = tk.load_gram("K.safetensors")[0], tk.load_gram("Kv.safetensors")[0]
    y, yv = torch.from_numpy(np.load("y.npy")), torch.from_numpy(np.load("yv.npy"))
    kr = tk.KernelRidge(betas=(0.01, 0.1, 1.0), solver="cholesky").fit(K, y, K_val=Kv, Y_val=yv)
    assert report["best_beta"] == pytest.approx(kr.best_beta_)
    assert report["test_accuracy"] == pytest.approx(kr.score(Kv, yv))
    assert f"test accuracy: {kr.score(Kv, yv):.4f}" in out
    assert f"validation loss {kr.scores_[kr.best_index_]['loss']:.4f}, accuracy {kr.scores_[kr.best_index_]['accuracy']:.4f}" in out
    assert torch.allclose(torch.load("alpha.pt"), kr.dual_coef_.cpu())


def test_solve_regression_targets_report_r2(workdir, capsys):
    for args in (["--data", "X.npy", "--out", "K.safetensors"], ["--data", "Xv.npy", "--data2", "X.npy", "--out", "Kv.safetensors"]):
        assert main(["gram", "--model", "factory.py:make", "--no-progress", "--precision", "fp64", *args]) == 0
    x, xv = np.load("X.npy"), np.load("Xv.npy")
    np.save("t.npy", np.sin(x[:, :2]))  # real-valued targets [n, 2]: regression, scored by r2
    np.save("tv.npy", np.sin(xv[:, :2]))
    assert main(["solve", "--gram", "K.safetensors", "--labels", "t.npy", "--val-gram", "Kv.safetensors",
                 "--val-labels", "tv.npy", "--test-gram", "Kv.safetensors", "--test-labels", "tv.npy",
                 "--betas", "1e-3", "1e-1", "--solver", "eigh", "--json", "r.json", "--no-progress"]) == 0
    out = capsys.readouterr().out
    K, Kv = tk.load_gram("K.safetensors")[0], tk.load_gram("Kv.safetensors")[0]
    t, tv = torch.from_numpy(np.load("t.npy")), torch.from_numpy(np.load("tv.npy"))
    kr = tk.KernelRidge(betas=(1e-3, 1e-1), solver="eigh").fit(K, t, K_val=Kv, Y_val=tv)
    report = json.loads(open("r.json").read())
    assert report["best_beta"] == pytest.approx(kr.best_beta_)
    assert report["test_r2"] == pytest.approx(kr.score(Kv, tv), rel=1e-6)  # same fp64 fit, same data
    assert f"test r2: {kr.score(Kv, tv):.4f}" in out and "validation loss" in out


def test_solve_reports_an_unconverged_fit(workdir, capsys):
    assert main(["gram", "--model", "factory.py:make", "--no-progress", "--data", "X.npy", "--out", "K.safetensors"]) == 0
    assert main(["solve", "--gram", "K.safetensors", "--labels", "y.npy", "--betas", "1e-6", "--solver", "nesterov",
                 "--max-iter", "3", "--no-progress"]) == 0
    # tol=None on a float32 K: 1e-3, what float32 coefficients can hold
    assert "not converged to --tol 0.001 in 3 iterations" in capsys.readouterr().out


def test_gram_loads_weights(workdir):
    trained = _model()
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(-2.0)  # weights that differ from the factory's, so loading them is visible in K
    torch.save(trained.state_dict(), "w.pt")
    assert main(["gram", "--model", "factory.py:make", "--weights", "w.pt", "--data", "X.npy", "--precision", "fp64",
                 "--out", "K.safetensors", "--no-progress"]) == 0
    K, meta = tk.load_gram("K.safetensors")
    ref = tk.reference.gram_autograd(trained, [torch.from_numpy(np.load("X.npy"))])
    assert meta["weights"] == "w.pt"
    assert rel_err(K, ref) <= 1e-10  # fp64 against the fp64 reference (see test_gram.py)


@pytest.mark.parametrize("command", ["gram", "coverage"])
def test_fp64_keeps_float64_data_float64(workdir, capsys, command):
    x = torch.from_numpy(np.load("X.npy"))
    assert x.dtype == torch.float64 and not torch.equal(x.float().double(), x)  # not representable in float32
    if command == "coverage":  # the same loading: float64 data runs (a float32 model in float64)
        assert main(["coverage", "--model", "factory.py:make", "--data", "X.npy", "--precision", "fp64"]) == 0
        assert "0.weight" in capsys.readouterr().out
        return
    assert main(["gram", "--model", "factory.py:make", "--data", "X.npy", "--precision", "fp64",
                 "--out", "K.safetensors", "--no-progress"]) == 0
    K, _ = tk.load_gram("K.safetensors")
    ref = tk.reference.gram_autograd(_model(), [x])
    assert K.dtype == torch.float64
    assert rel_err(K, ref) <= 1e-12
    # What rounding the data to float32 first gave: an error float64 does not make.
    rounded = tk.reference.gram_autograd(_model(), [x.float()])
    assert rel_err(rounded, ref) > 1e-9
    # The other precisions compute in float32: there the data is rounded, as the model's weights are.
    assert main(["gram", "--model", "factory.py:make", "--data", "X.npy", "--out", "K32.safetensors",
                 "--no-progress"]) == 0
    assert torch.equal(tk.load_gram("K32.safetensors")[0], tk.gram(_model(), [x.float()], progress=False))


def test_solve_keeps_a_float64_K_float64(workdir):
    g = torch.Generator().manual_seed(0)
    F = torch.randn(40, 60, generator=g, dtype=torch.float64)
    np.save("K64.npy", (F @ F.T).numpy())
    t = torch.randn(40, generator=g, dtype=torch.float64)
    np.save("t.npy", t.numpy())
    assert main(["solve", "--gram", "K64.npy", "--labels", "t.npy", "--betas", "0.1", "--solver", "cholesky",
                 "--coef", "alpha.pt", "--no-progress"]) == 0
    alpha = torch.load("alpha.pt")
    expected = torch.linalg.solve(F @ F.T + 0.1 * torch.eye(40, dtype=torch.float64), t[:, None])
    assert alpha.dtype == torch.float64
    torch.testing.assert_close(alpha.reshape(-1), expected.reshape(-1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("argv, message", [
    (["gram", "--model", "factory.py:make", "--data", "X.npy", "--out", "X.npy"],
     "--out X.npy is the same file as --data X.npy: writing there would overwrite that input"),
    (["gram", "--model", "factory.py:make", "--data", "X.npy", "--out", "./sub/../X.npy"],
     "--out ./sub/../X.npy is the same file as --data X.npy"),
    (["gram", "--model", "factory.py:make", "--data", "X.npy", "--out", "link.npy"],
     "--out link.npy is the same file as --data X.npy"),
    (["gram", "--model", "factory.py:make", "--data", "Xv.npy", "--data2", "ABS/X.npy", "--out", "X.npy"],
     "--out X.npy is the same file as --data2"),
    (["gram", "--model", "factory.py:make", "--data", "X.npy", "--weights", "w.pt", "--out", "w.pt"],
     "--out w.pt is the same file as --weights w.pt"),
    (["gram", "--model", "factory.py:make", "--data", "X.npy", "--idx", "i.pt", "--out", "i.pt"],
     "--out i.pt is the same file as --idx i.pt"),
    (["solve", "--gram", "K.pt", "--labels", "y.npy", "--coef", "K.pt"],
     "--coef K.pt is the same file as --gram K.pt: writing there would overwrite that input"),
    (["solve", "--gram", "K.pt", "--labels", "y.npy", "--coef", "link.npy", "--json", "r.json"],
     "--coef link.npy is the same file as --labels"),
    (["solve", "--gram", "K.pt", "--labels", "y.npy", "--val-gram", "Kv.pt", "--val-labels", "yv.npy",
      "--json", "Kv.pt"], "--json Kv.pt is the same file as --val-gram Kv.pt"),
    (["solve", "--gram", "K.pt", "--labels", "y.npy", "--coef", "out.pt", "--json", "./out.pt"],
     "--coef out.pt is the same file as --json ./out.pt: writing there would overwrite the other output"),
])
def test_outputs_never_overwrite_inputs(workdir, capsys, argv, message):
    torch.save(_model().state_dict(), "w.pt")
    torch.save(torch.tensor([0, 3, 7]), "i.pt")
    torch.save(torch.eye(40), "K.pt")
    torch.save(torch.ones(20, 40), "Kv.pt")
    (workdir / "sub").mkdir()
    target = "y.npy" if argv[0] == "solve" else "X.npy"
    (workdir / "link.npy").symlink_to(workdir / target)
    argv = [str(workdir / "X.npy") if a == "ABS/X.npy" else a for a in argv]
    message = message if "--data2" not in message else "--out X.npy is the same file as --data2 " + str(workdir / "X.npy")
    before = {f.name: f.read_bytes() for f in workdir.iterdir() if f.is_file()}
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    after = {f.name: f.read_bytes() for f in workdir.iterdir() if f.is_file()}
    assert after == before  # nothing written, no input touched


@pytest.mark.parametrize("argv, message", [
    (["gram", "--model", "factory.py:nope", "--data", "X.npy", "--out", "K.safetensors"], "has no attribute 'nope'"),
    (["gram", "--model", "factory.py:not_a_model", "--data", "X.npy", "--out", "K.safetensors"], "factory.py:not_a_model is a int, not an nn.Module"),
    (["gram", "--model", "missing.py:make", "--data", "X.npy", "--out", "K.safetensors"], "no file missing.py"),
    (["gram", "--model", "no_such_module:make", "--data", "X.npy", "--out", "K.safetensors"], "cannot import module 'no_such_module'"),
    (["gram", "--model", "factory", "--data", "X.npy", "--out", "K.safetensors"], "must be 'module:factory'"),
    (["gram", "--model", "factory.py:make", "--data", "nothing.npy", "--out", "K.safetensors"], "--data: no file nothing.npy"),
    (["gram", "--model", "factory.py:make", "--data", "factory.py", "--out", "K.safetensors"], "must be a .npy or .pt file"),
    (["gram", "--model", "factory.py:make", "--data", "X.npy", "--output", "last", "--out", "K.safetensors"], "--output must be"),
    (["gram", "--model", "factory.py:make", "--data", "X.npy", "--params", "1000", "--idx", "y.npy", "--out", "K.safetensors"], "--idx and --params both choose the parameters"),
    (["solve", "--gram", "K.safetensors", "--labels", "y.npy"], "no Gram file"),
    (["solve", "--gram", "X.npy", "--labels", "y.npy"], "must be a square"),
    (["solve", "--gram", "X.npy", "--labels", "y.npy", "--val-gram", "X.npy"], "go together"),
    (["solve", "--gram", "X.npy", "--labels", "y.npy", "--betas", "0.1", "small"], "--betas must be 'auto' or numbers"),
    (["gram", "--model", "factory.py:make", "--data", "junk.pt", "--out", "K.safetensors"], "--data: junk.pt is not a tensor saved with torch.save"),
    (["gram", "--model", "factory.py:make", "--data", "junk.npy", "--out", "K.safetensors"], "--data: cannot read junk.npy as a numeric .npy array"),
    (["solve", "--gram", "X.npy", "--labels", "objects.npy"], "--labels: cannot read objects.npy as a numeric .npy array"),
    (["gram", "--model", "factory.py:make", "--data", "X.npy", "--batch-size", "0", "--out", "K.safetensors"], "--batch-size must be >= 1"),
    (["gram", "--model", "factory.py:make", "--data", "X6.npy", "--out", "K.safetensors"],
     "--data: the model cannot run on samples of shape (6,) and dtype float32: mat1 and mat2 shapes cannot be multiplied"),
    (["gram", "--model", "factory.py:make", "--data", "X.npy", "--data2", "X6.npy", "--out", "K.safetensors"],
     "--data2: the model cannot run on samples of shape (6,)"),
    (["gram", "--model", "factory.py:make", "--data", "X.npy", "--weights", "nothing.pt", "--out", "K.safetensors"], "--weights: no file nothing.pt"),
    (["gram", "--model", "factory.py:make", "--data", "X.npy", "--weights", "y.npy", "--out", "K.safetensors"], "--weights: y.npy is not a state_dict saved with torch.save"),
    (["gram", "--model", "factory.py:make", "--data", "X.npy", "--weights", "X.pt", "--out", "K.safetensors"], "must hold a state_dict (a dict of tensors); got Tensor"),
    (["gram", "--model", "factory.py:make", "--data", "X.npy", "--weights", "wide.pt", "--out", "K.safetensors"],
     "--weights: wide.pt does not fit the model factory.py:make: Error(s) in loading state_dict"),
])
def test_errors_are_one_line_with_exit_code_2(workdir, capsys, argv, message):
    np.save("X6.npy", np.zeros((4, 6), dtype=np.float32))  # 6 features for a model that takes 5
    (workdir / "junk.pt").write_bytes(b"not a torch file")
    (workdir / "junk.npy").write_bytes(b"not a numpy file")
    np.save("objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    torch.save(torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).state_dict(), "wide.pt")
    code = main(argv + ["--no-progress"])
    err = capsys.readouterr().err
    if message is None:  # --idx wins over --params; y.npy holds valid positions 0/1 ... duplicated -> refused
        assert code == 2 and "duplicate" in err
        return
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("command", [
    ["gram", "--model", "factory.py:make", "--data", "X.npy", "--out", "K.safetensors"],
    ["solve", "--gram", "X.npy", "--labels", "y.npy"],
    ["demo", "--quick", "--out", "demo_out"],
])
def test_bad_device_is_one_line_before_any_work(workdir, capsys, command):
    assert main(command + ["--device", "banana"]) == 2
    assert "--device: 'banana' is not a device; use cpu, cuda or cuda:N" in capsys.readouterr().err
    missing = "cuda:0" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    assert main(command + ["--device", missing]) == 2
    err = capsys.readouterr().err
    assert f"--device {missing}: " in err and len(err.strip().splitlines()) == 1
    assert not (workdir / "demo_out").exists()  # refused before the demo created its folder


def test_debug_shows_the_traceback(workdir):
    from tangent_kernels.cli import CommandError

    with pytest.raises(CommandError, match="no attribute"):
        main(["gram", "--model", "factory.py:nope", "--data", "X.npy", "--out", "K.safetensors", "--debug"])


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("gram", "solve", "features", "coverage", "demo", "info"):
        assert command in out


def test_every_option_of_every_command_has_help():
    import argparse

    from tangent_kernels.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.option_strings:
                assert action.help, f"tangent-kernels {name} {action.option_strings[0]} has no help text"


def test_coverage_prints_every_tensor_and_its_path(workdir, capsys):
    assert main(["coverage", "--model", "factory.py:make", "--data", "X.npy", "--params", "40", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    model = tk.cli.load_model("factory.py:make")
    report = tk.coverage(model, torch.from_numpy(np.load("X.npy")[:16]).float(), tk.subsample(model, 40, seed=1))
    assert out.strip() == str(report).strip()
    assert "0.weight" in out and "linear" in out and "40 of 40 sampled entries on the batched path" in out


@pytest.mark.parametrize("setup, argv, message", [
    ("raise RuntimeError('no weights here')", ["--model", "bad.py:make"], "--model: running bad.py failed: RuntimeError"),
    ("def make(:\n    pass", ["--model", "bad.py:make"], "--model: running bad.py failed: SyntaxError"),
    ("def make():\n    raise ValueError('bad config')", ["--model", "bad.py:make"],
     "--model: calling bad.py:make() failed: ValueError: bad config"),
    ("def make():\n    return None", ["--model", "bad.py:make"], "--model: bad.py:make() returned a NoneType, not an nn.Module"),
    ("", ["--model", "factory.py:make", "--params", "100000"], "--params 100000: the model has 147 trainable parameters"),
    ("", ["--model", "factory.py:make", "--out", "K.txt"], "--out K.txt: write K as .safetensors, .npy, .pt"),
    ("", ["--model", "factory.py:make", "--out", "no_such_folder/K.safetensors"], "the folder no_such_folder does not exist"),
])
def test_model_and_output_problems_are_one_line_before_any_work(workdir, capsys, setup, argv, message):
    (workdir / "bad.py").write_text(setup)
    args = ["gram", "--data", "X.npy", "--out", "K.safetensors", *argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


@pytest.mark.parametrize("suffix", [".npy", ".pt"])
def test_gram_out_writes_the_format_its_suffix_names(workdir, suffix):
    assert main(["gram", "--model", "factory.py:make", "--data", "X.npy", "--no-progress", "--out", f"K{suffix}"]) == 0
    K = np.load(f"K{suffix}") if suffix == ".npy" else torch.load(f"K{suffix}").numpy()
    ref = tk.gram(tk.cli.load_model("factory.py:make"), [torch.from_numpy(np.load("X.npy")).float()], progress=False)
    assert np.array_equal(K, ref.numpy())


@pytest.mark.parametrize("output, suffix", [("full", ".safetensors"), ("trace", ".npy"), ("diagonal", ".pt"),
                                            ("diagonal", ".safetensors")])
def test_gram_writes_every_logit_forms(workdir, capsys, output, suffix):
    """--output full / trace / diagonal (issue 23): K as tk.gram gives it, in each format."""
    assert main(["gram", "--model", "factory.py:make", "--data", "X.npy", "--output", output, "--batch-size", "16",
                 "--out", f"K{suffix}", "--no-progress"]) == 0
    expected = tk.gram(_model(), [torch.from_numpy(np.load("X.npy")).float()], output=output, progress=False)
    shape = {"full": (40, 40, 3, 3), "trace": (40, 40), "diagonal": (40, 40, 3)}[output]
    assert expected.shape == shape and f"K(X, X) {shape} float32" in capsys.readouterr().out
    if suffix == ".safetensors":
        K, meta = tk.load_gram(f"K{suffix}")
        assert meta["output"] == output and meta["shape"] == list(shape)
    else:
        K = torch.from_numpy(np.load(f"K{suffix}")) if suffix == ".npy" else torch.load(f"K{suffix}")
    # Batches of 16 against one batch of 40: the same products, summed in another order.
    assert K.shape == shape and rel_err(K, expected) <= 1e-6


# ----------------------------------------------------------------------------- features


def _features_meta(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return json.loads(handle.metadata()["tangent_kernels"])


def test_features_saves_the_same_features_as_the_library(workdir, capsys):
    from safetensors.torch import load_file

    assert main(["features", "--model", "factory.py:make", "--data", "X.npy", "--params", "50", "--seed", "3",
                 "--output", "sum", "--batch-size", "16", "--out", "F.safetensors", "--no-progress"]) == 0
    assert "features (40, 50) float32, p = 50 of 147 parameters" in capsys.readouterr().out
    saved = load_file("F.safetensors")
    model = _model()
    idx = tk.subsample(model, 50, seed=3)
    expected = tk.features(model, [torch.from_numpy(np.load("X.npy")).float()], idx, output="sum", progress=False)
    # Batches of 16 against one batch of 40: per-sample gradients, each sample alone either way.
    assert torch.allclose(saved["features"], expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    assert torch.equal(saved["idx"], idx.positions)
    meta = _features_meta("F.safetensors")
    assert meta["format"] == "tangent_kernels.features/1" and meta["shape"] == [40, 50]
    assert meta["params"] == 50 and meta["params_total"] == 147 and meta["output"] == "sum" and "torch" in meta
    # the features give gram's K
    assert main(["gram", "--model", "factory.py:make", "--data", "X.npy", "--params", "50", "--seed", "3",
                 "--output", "sum", "--out", "K.npy", "--no-progress"]) == 0
    K = torch.from_numpy(np.load("K.npy"))
    F = saved["features"].double()
    assert torch.allclose(K.double(), F @ F.T, rtol=1e-5, atol=1e-5 * float(K.abs().max()))


@pytest.mark.parametrize("output, suffix, shape", [("first", ".npy", (40, 147)), ("full", ".pt", (40, 3, 147)),
                                                   ("1", ".safetensors", (40, 147))])
def test_features_writes_the_format_its_suffix_names(workdir, output, suffix, shape):
    torch.save(torch.tensor([140, 2, 77]), "i.pt")  # an explicit --idx, unsorted, for the safetensors case
    extra = ["--idx", "i.pt"] if suffix == ".safetensors" else []
    assert main(["features", "--model", "factory.py:make", "--data", "X.npy", "--output", output, *extra,
                 "--out", f"F{suffix}", "--no-progress"]) == 0
    model = _model()
    idx = tk.ParamIndex.from_positions(model, torch.tensor([140, 2, 77])) if extra else None
    expected = tk.features(model, [torch.from_numpy(np.load("X.npy")).float()], idx,
                           output=int(output) if output.isdigit() else output, progress=False)
    if suffix == ".npy":
        F = torch.from_numpy(np.load(f"F{suffix}"))
    elif suffix == ".pt":
        F = torch.load(f"F{suffix}")
    else:
        from safetensors.torch import load_file

        saved = load_file(f"F{suffix}")
        F, shape = saved["features"], (40, 3)
        assert torch.equal(saved["idx"], idx.positions)  # column j is the gradient at idx[j]
    assert F.shape == shape and torch.equal(F, expected)


@pytest.mark.parametrize("argv, message", [
    (["--out", "X.npy"], "--out X.npy is the same file as --data X.npy: writing there would overwrite that input"),
    (["--out", "link.npy"], "--out link.npy is the same file as --data X.npy"),
    (["--weights", "w.pt", "--out", "w.pt"], "--out w.pt is the same file as --weights w.pt"),
    (["--idx", "i.pt", "--out", "i.pt"], "--out i.pt is the same file as --idx i.pt"),
    (["--out", "F.txt"], "--out F.txt: write the features as .safetensors, .npy, .pt"),
    (["--out", "no_such_folder/F.npy"], "the folder no_such_folder does not exist"),
    (["--precision", "bf16", "--out", "F.npy"], "cannot hold bfloat16"),
    (["--params", "1000", "--out", "F.npy"], "--params 1000: the model has 147 trainable parameters"),
    (["--params", "5", "--idx", "i.pt", "--out", "F.npy"], "--idx and --params both choose the parameters"),
    (["--output", "middle", "--out", "F.npy"], "--output must be 'first', 'sum'"),
])
def test_features_refuses_bad_arguments_before_any_work(workdir, capsys, argv, message):
    torch.save(_model().state_dict(), "w.pt")
    torch.save(torch.tensor([0, 3, 7]), "i.pt")
    (workdir / "link.npy").symlink_to(workdir / "X.npy")
    before = {f.name: f.read_bytes() for f in workdir.iterdir() if f.is_file()}
    assert main(["features", "--model", "factory.py:make", "--data", "X.npy", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    after = {f.name: f.read_bytes() for f in workdir.iterdir() if f.is_file()}
    assert after == before  # nothing written, no input touched
