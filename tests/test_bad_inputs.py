"""The bad-input catalogue: each case, the exception type it raises and a phrase of its
message, so that every error stays one a user can act on."""

import numpy as np
import pytest
import torch
from torch import nn

import tangent_kernels as tk


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


X = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(2))


class Squeezes(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).squeeze(0)


class Detaches(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).detach()


def _psd():
    g = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    return g @ g.T


CASES = {
    "torchscript model": (lambda: tk.gram(torch.jit.script(_mlp()), [X], progress=False), TypeError,
                          "TorchScript module"),
    "meta-device model": (lambda: tk.gram(nn.Linear(4, 3, device="meta"), [X], progress=False), ValueError,
                          "on the meta device"),
    "batchnorm without running stats": (
        lambda: tk.gram(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)), [X],
                        progress=False), ValueError, "has no running statistics (track_running_stats=False)"),
    "(X, y) as the loader": (lambda: tk.gram(_mlp(), (X, Y), progress=False), ValueError,
                             "if you passed (X, y) or [X, y] as the loader"),
    "batches of different dtypes": (lambda: tk.gram(_mlp(), [X[:3], X[3:].double()], progress=False), ValueError,
                                    "batch 1 of loader differs from its batch 0"),
    "cross kernel of another input shape": (
        lambda: tk.gram(_mlp(), [X], None, [torch.randn(2, 5)], progress=False), ValueError,
        "loader2 (the second loader of a cross kernel"),
    "squeezed output of a batch of one": (lambda: tk.gram(Squeezes(), [X[:1]], progress=False), ValueError,
                                          "model output has shape (3,) for a batch of 1"),
    "detached output": (lambda: tk.gram(Detaches(), [X], progress=False), ValueError,
                        "the output does not depend on the parameters"),
    "detached output= callable": (lambda: tk.gram(_mlp(), [X], output=lambda o: o[:, 0].detach(), progress=False),
                                  ValueError, "output= (the model's output depends on them"),
    "max_memory=inf": (lambda: tk.gram(_mlp(), [X], max_memory=float("inf"), progress=False), ValueError,
                       "max_memory must be a positive, finite number"),
    "out requiring grad": (lambda: tk.gram(_mlp(), [X], out=torch.zeros(6, 6, requires_grad=True), progress=False),
                           ValueError, "out requires grad"),
    "inputs not callable": (lambda: tk.gram(_mlp(), [X], inputs=3, progress=False), TypeError,
                            "inputs must be a callable"),
    "checkpoint=''": (lambda: tk.gram(_mlp(), [X], checkpoint="", progress=False), ValueError,
                      "checkpoint='' is not a folder"),
    "save_gram meta not a dict": (lambda: tk.save_gram("/tmp/never.safetensors", torch.zeros(2, 2), meta=[1, 2]),
                                  TypeError, "meta must be a dict"),
    "cache_dir that is a file": (lambda: tk.gram(_mlp(), [X], store="disk", cache_dir=__file__, progress=False),
                                 ValueError, "is a file; give a folder for the disk store's file"),
    "negative seed": (lambda: tk.subsample(_mlp(), 5, seed=-1), ValueError, "seed must be >= 0"),
    "checkpoint_key not a str": (lambda: tk.gram(_mlp(), [X], checkpoint_key=3, progress=False), TypeError,
                                 "checkpoint_key must be a str"),
    "non-PSD K": (lambda: tk.solve(_psd() - 3 * torch.eye(6), torch.randn(6), 0.1, solver="eigh"), ValueError,
                  "K is not positive semi-definite"),
    "beta beyond the dtype": (lambda: tk.solve(_psd(), torch.randn(6), 1e300, solver="eigh"), ValueError,
                              "is beyond what float32 arithmetic can solve"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_clear_error(name):
    call, kind, phrase = CASES[name]
    with pytest.raises(kind) as raised:
        call()
    assert phrase in str(raised.value), str(raised.value)


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
    assert float((G.double() - ref).norm() / ref.norm()) <= 1e-6


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


def test_inputs_on_the_meta_device_are_refused():
    with pytest.raises(ValueError, match="meta device"):
        tk.gram(_mlp(), [torch.empty(3, 4, device="meta")], progress=False, device="cpu")
