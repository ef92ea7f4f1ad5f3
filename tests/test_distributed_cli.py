"""``torchrun --nproc-per-node=2 -m tangent_kernels gram ...`` (gloo on CPU processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
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
