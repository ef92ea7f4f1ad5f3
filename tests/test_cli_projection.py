"""--projection DIM[:KIND[:SEED]] of the gram and features commands: the library's sketch,
named in the metadata; malformed specs refused in one line before any work."""

import json

import numpy as np
import pytest
import torch

import tangent_kernels as tk
from tangent_kernels.cli import main

from test_cli import _model, workdir  # noqa: F401 (the fixture)


def _x():
    return torch.from_numpy(np.load("X.npy")).float()


@pytest.mark.parametrize("spec, projection", [("32", tk.Projection(32)), ("24:rademacher:5", tk.Projection(24, "rademacher", 5)),
                                              ("16:kronecker:2", tk.Projection(16, "kronecker", 2))])
def test_gram_and_features_sketch_as_the_library(workdir, capsys, spec, projection):
    from safetensors import safe_open
    from safetensors.torch import load_file

    assert main(["gram", "--model", "factory.py:make", "--data", "X.npy", "--projection", spec, "--batch-size", "16",
                 "--out", "K.safetensors", "--no-progress"]) == 0
    assert f"sketched: {projection.identity}" in capsys.readouterr().out
    K, meta = tk.load_gram("K.safetensors")
    expected = tk.gram(_model(), _x().split(16), projection=projection, progress=False)
    torch.testing.assert_close(K, expected, rtol=1e-5, atol=1e-5 * float(expected.diagonal().max()))
    assert meta["projection"] == projection.identity and meta["params"] == 147
    assert main(["features", "--model", "factory.py:make", "--data", "X.npy", "--projection", spec,
                 "--out", "F.safetensors", "--no-progress"]) == 0
    saved = load_file("F.safetensors")
    F = saved["features"]
    assert F.shape == (40, projection.dim) and saved["idx"].numel() == 147
    torch.testing.assert_close(F, tk.features(_model(), [_x()], projection=projection, progress=False),
                               rtol=1e-5, atol=1e-5 * float(F.abs().max()))
    with safe_open("F.safetensors", framework="pt") as handle:
        meta = json.loads(handle.metadata()["tangent_kernels"])
    assert meta["projection"] == projection.identity and meta["shape"] == [40, projection.dim]


@pytest.mark.parametrize("spec, message", [
    ("abc", "--projection must be DIM[:KIND[:SEED]]"),
    ("64:gauss", "--projection must be DIM[:KIND[:SEED]]"),
    ("64:gaussian:x", "--projection must be DIM[:KIND[:SEED]]"),
    ("64:gaussian:1:2", "--projection must be DIM[:KIND[:SEED]]"),
    ("0", "--projection 0: Projection dim must be a positive int"),
    ("37:kronecker", "--projection 37:kronecker: Projection dim 37 splits no better than 1 x 37"),
])
@pytest.mark.parametrize("command", ["gram", "features"])
def test_bad_projection_refused_before_any_work(workdir, capsys, command, spec, message):
    before = {f.name for f in workdir.iterdir()}
    assert main([command, "--model", "factory.py:make", "--data", "X.npy", "--projection", spec,
                 "--out", "O.npy", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert {f.name for f in workdir.iterdir()} == before
