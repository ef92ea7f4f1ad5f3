"""Unusual inputs that are accepted and handled right: numpy integers, seeds beyond 64
bits, parameters the output does not depend on, stale disk-store files. The inputs that
are refused (with the error naming the problem and the fix) are in tests/test_errors.py."""

import numpy as np
import pytest
import torch
from torch import nn

import tangent_kernels as tk
from conftest import rel_err


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


X = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))


def test_numpy_integer_outputs_are_accepted():
    K = tk.gram(_mlp(), [X], output=np.int64(2), progress=False)
    assert torch.equal(K, tk.gram(_mlp(), [X], output=2, progress=False))


def test_seeds_beyond_64_bits_are_not_folded_onto_small_ones():
    model = _mlp()
    big = tk.subsample(model, 20, seed=2**80).positions
    assert not torch.equal(big, tk.subsample(model, 20, seed=0).positions)
    assert torch.equal(big, tk.subsample(model, 20, seed=2**80).positions)
    assert torch.equal(tk.subsample(model, 20, seed=5).positions, tk.subsample(model, 20, seed=5).positions)


def test_unused_parameters_get_zero_features_and_one_warning():
    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            self.unused(x)
            return self.used(x)

    model = Aux()
    with pytest.warns(RuntimeWarning, match=r"does not depend on 2 sampled parameter tensor\(s\).*unused.weight"):
        G = tk.features(model, [X], progress=False)
    assert torch.equal(G[:, 15:], torch.zeros(6, 15))
    ref = tk.reference.features_autograd(model, [X])
    assert rel_err(G, ref) <= 1e-6


def test_stale_disk_store_files_of_dead_processes_are_removed(tmp_path):
    from tangent_kernels.store import _remove_stale_files

    dead = subprocess_pid_that_has_exited()
    stale = tmp_path / f"tangent_kernels_{dead}_loader_x.bin"
    stale.write_bytes(b"old")
    mine = tmp_path / f"tangent_kernels_{__import__('os').getpid()}_loader_y.bin"
    mine.write_bytes(b"live")
    _remove_stale_files(tmp_path)
    assert not stale.exists() and mine.exists()


def subprocess_pid_that_has_exited() -> int:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)

