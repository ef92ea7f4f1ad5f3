"""``torchrun --nproc-per-node=2 -m tangent_kernels gram ...`` (gloo on CPU processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import tangent_kernels as tk

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
""")


def test_torchrun_gram_writes_the_single_process_K(tmp_path):
    (tmp_path / "factory.py").write_text(FACTORY)
    x = np.random.default_rng(0).normal(size=(40, 5))
    np.save(tmp_path / "X.npy", x)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "tangent_kernels", "gram",
               "--model", "factory.py:make", "--data", "X.npy", "--params", "50", "--batch-size", "8",
               "--out", "K.npy", "--no-progress", "--checkpoint", "ckpt"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("K(X, X) (40, 40) float32") == 1  # rank 0 alone writes and reports
    K = torch.from_numpy(np.load(tmp_path / "K.npy"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    expected = tk.gram(model, [torch.from_numpy(x).float()], tk.subsample(model, 50), progress=False)
    torch.testing.assert_close(K, expected, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["rank-0-of-2", "rank-1-of-2"]


def test_torchrun_gram_with_a_projection_writes_the_single_process_sketched_K(tmp_path):
    (tmp_path / "factory.py").write_text(FACTORY)
    x = np.random.default_rng(2).normal(size=(24, 5))
    np.save(tmp_path / "X.npy", x)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "tangent_kernels", "gram",
               "--model", "factory.py:make", "--data", "X.npy", "--batch-size", "8", "--projection", "64:kronecker:5",
               "--out", "K.npy", "--no-progress"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("sketched: kronecker dim=64 seed=5") == 1  # rank 0 alone writes and reports
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    expected = tk.gram(model, [torch.from_numpy(x).float()], projection=tk.Projection(64, "kronecker", seed=5),
                       progress=False)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "K.npy")), expected, rtol=1e-5, atol=1e-6)


def test_torchrun_gram_shards_then_solve_reads_them(tmp_path, capsys, monkeypatch):
    from tangent_kernels.cli import main

    (tmp_path / "factory.py").write_text(FACTORY)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5))
    np.save(tmp_path / "X.npy", x)
    np.save(tmp_path / "y.npy", (x[:, 0] > 0).astype(np.int64))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "tangent_kernels", "gram",
               "--model", "factory.py:make", "--data", "X.npy", "--batch-size", "8", "--out", "K.safetensors",
               "--shards", "--no-progress"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.glob("K.*")) == ["K.rank-0-of-2.safetensors", "K.rank-1-of-2.safetensors",
                                                            "K.shards.json"]
    from tangent_kernels.distributed.shard import load_shards

    K, meta = load_shards(tmp_path / "K.shards.json")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    torch.testing.assert_close(K, tk.gram(model, [torch.from_numpy(x).float()], progress=False), rtol=1e-5, atol=1e-6)
    assert meta["shape"] == [40, 40] and meta["precision"] == "fp32"
    monkeypatch.chdir(tmp_path)
    assert main(["solve", "--gram", "K.shards.json", "--labels", "y.npy", "--betas", "0.1", "--solver", "cholesky",
                 "--no-progress"]) == 0
    assert "beta" in capsys.readouterr().out
    (tmp_path / "K.rank-1-of-2.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="K.rank-1-of-2.safetensors, which is missing"):
        load_shards(tmp_path / "K.shards.json")


def test_shards_without_torchrun_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from tangent_kernels.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "factory.py").write_text(FACTORY)
    np.save(tmp_path / "X.npy", np.zeros((4, 5)))
    assert main(["gram", "--model", "factory.py:make", "--data", "X.npy", "--out", "K.safetensors", "--shards"]) == 2
    assert "--shards writes one file per rank: run under torchrun" in capsys.readouterr().err
    assert not list(tmp_path.glob("K*"))
