"""The cases that used to return a wrong K (or change the caller's data or model) without
an error: each now refuses, or computes the right thing, and says so."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import tangent_kernels as tk
from tangent_kernels.checkpoint import CheckpointCorrupt, CheckpointInUse, CheckpointMismatch


def _mlp(activation=nn.Tanh):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), activation(), nn.Linear(8, 3))


def _loader(n=12, batch=4, seed=1):
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
    return [x[i:i + batch] for i in range(0, n, batch)]


# 1. two runs on one checkpoint folder
def test_a_folder_in_use_by_another_checkpoint_is_refused(tmp_path):
    from tangent_kernels.checkpoint import Checkpoint

    first = Checkpoint(tmp_path, {"a": 1})
    try:
        with pytest.raises(CheckpointInUse, match=rf"in use by another run \(process {os.getpid()}\)"):
            Checkpoint(tmp_path, {"a": 1})
    finally:
        first.close()
    Checkpoint(tmp_path, {"a": 1}).close()  # released: the folder is free again


def test_a_lock_left_by_a_killed_process_is_no_obstacle(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from tangent_kernels.checkpoint import _lock
        _lock(Path({str(tmp_path)!r}))  # what a run holds while it works
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointInUse, match=rf"process {holder.pid}"):
            tk.gram(_mlp(), _loader(), progress=False, checkpoint=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    K = tk.gram(_mlp(), _loader(), progress=False, checkpoint=tmp_path)  # kill -9 released it
    assert torch.equal(K, tk.gram(_mlp(), _loader(), progress=False))


# 2. the computation changed, the weights did not
def test_resume_after_the_model_structure_changed_is_refused(tmp_path):
    tk.gram(_mlp(nn.Tanh), _loader(), progress=False, checkpoint=tmp_path)
    with pytest.raises(CheckpointMismatch, match="model_structure"):
        tk.gram(_mlp(nn.ReLU), _loader(), progress=False, checkpoint=tmp_path)


def test_resume_after_the_output_callable_changed_is_refused(tmp_path):
    tk.gram(_mlp(), _loader(), progress=False, checkpoint=tmp_path, output=lambda o: o[:, 0])
    K = tk.gram(_mlp(), _loader(), progress=False, checkpoint=tmp_path, output=lambda o: o[:, 0])
    assert torch.equal(K, tk.gram(_mlp(), _loader(), progress=False, output=0))
    with pytest.raises(CheckpointMismatch, match="output"):
        tk.gram(_mlp(), _loader(), progress=False, checkpoint=tmp_path, output=lambda o: o[:, 2])
    column = 0

    def closure(o):
        return o[:, column]

    other = tmp_path / "closure"
    tk.gram(_mlp(), _loader(), progress=False, checkpoint=other, output=closure)
    column = 1
    with pytest.raises(CheckpointMismatch, match="output"):
        tk.gram(_mlp(), _loader(), progress=False, checkpoint=other, output=closure)


def test_an_undecidable_output_callable_needs_a_checkpoint_key_to_resume(tmp_path):
    class Pick:  # a callable object holding state the fingerprint cannot value
        def __init__(self):
            self.index = object()

        def __call__(self, out):
            return out[:, 0]

    tk.gram(_mlp(), _loader(), progress=False, checkpoint=tmp_path, output=Pick())
    with pytest.raises(CheckpointMismatch, match="checkpoint_key="):
        tk.gram(_mlp(), _loader(), progress=False, checkpoint=tmp_path, output=Pick())
    keyed = tmp_path / "keyed"
    tk.gram(_mlp(), _loader(), progress=False, checkpoint=keyed, output=Pick(), checkpoint_key="pick first")
    K = tk.gram(_mlp(), _loader(), progress=False, checkpoint=keyed, output=Pick(), checkpoint_key="pick first")
    assert torch.equal(K, tk.gram(_mlp(), _loader(), progress=False))


# 3. one changed element of a batch
def test_one_changed_element_of_a_large_batch_is_detected(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(1024, 3))
    loader = [torch.randn(16, 1024) for _ in range(2)]
    tk.gram(model, loader, progress=False, checkpoint=tmp_path)
    changed = [b.clone() for b in loader]
    changed[1][7, 513] = 100.0
    with pytest.raises(CheckpointMismatch, match="loader batch 1 holds other values"):
        tk.gram(model, changed, progress=False, checkpoint=tmp_path)


# 4. corrupted checkpoint data
@pytest.mark.parametrize("target, damage", [("loader.features", "random"), ("loader.features", "nan"),
                                            ("K.bin", "random"), ("loader.features", "truncate"),
                                            ("manifest.json", "garbage"), ("manifest.json", "missing key"),
                                            ("loader.features", "delete")])
def test_damaged_checkpoint_files_are_refused_never_read(tmp_path, target, damage):
    class Stop(Exception):
        pass

    def stop_in_the_gram_phase(event):
        if event.phase == "gram" and not event.resumed:
            raise Stop

    model, loader = _mlp(), _loader(n=40, batch=8)
    from tangent_kernels.tuning import tuned

    with tuned(tile_rows=16):
        with pytest.raises(Stop):
            tk.gram(model, loader, progress=False, checkpoint=tmp_path, callback=stop_in_the_gram_phase)
        path = tmp_path / target
        if damage == "random":
            raw = bytearray(path.read_bytes())
            raw[8:40] = np.random.default_rng(0).integers(0, 256, 32, dtype=np.uint8).tobytes()
            path.write_bytes(bytes(raw))
        elif damage == "nan":
            data = np.fromfile(path, dtype=np.float32)
            data[3] = np.nan
            data.tofile(path)
        elif damage == "truncate":
            path.write_bytes(path.read_bytes()[:100])
        elif damage == "garbage":
            path.write_bytes(b"\xff\xfe not json")
        elif damage == "missing key":
            manifest = json.loads(path.read_text())
            del manifest["loaders"]
            path.write_text(json.dumps(manifest))
        else:
            path.unlink()
        with pytest.raises(CheckpointCorrupt, match=rf"\({target}\); delete the folder"):
            tk.gram(model, loader, progress=False, checkpoint=tmp_path)


# 5. a model that writes its input in place
class WritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        x.mul_(2)
        return self.lin(x)


def test_a_model_that_writes_its_input_is_refused_and_the_data_kept():
    x = torch.randn(8, 6)
    before = x.clone()
    with pytest.raises(ValueError, match=r"writes its input in place \(TensorBase.mul_ in module '\(the model\)'\)"):
        tk.gram(WritesItsInput(), [x[:4], x[4:]], progress=False)
    assert torch.equal(x, before)


# 6. a buffer changed in forward
class Counts(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count += 1
        return self.lin(x)


def test_a_buffer_the_forward_updates_is_left_as_it_was():
    model = Counts()
    tk.gram(model, _loader(), progress=False)
    tk.features(model, _loader(), progress=False)
    assert float(model.count) == 0.0


def test_a_forward_that_writes_a_parameter_is_refused_and_the_parameter_kept():
    class Renorms(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            with torch.no_grad():
                self.lin.weight.mul_(2)
            return self.lin(x)

    model = Renorms()
    before = model.lin.weight.clone()
    with pytest.raises(ValueError, match=r"writes parameter lin.weight in place"):
        tk.gram(model, _loader(), progress=False)
    assert torch.equal(model.lin.weight, before)


# 7. out= with internal overlap
def test_out_with_internal_overlap_is_refused():
    out = torch.empty(200).as_strided((12, 12), (1, 1))
    with pytest.raises(ValueError, match=r"out's elements overlap in memory"):
        tk.gram(_mlp(), _loader(), progress=False, out=out)


# 8. solvers
def _indefinite(n=40):
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return a + a.T


@pytest.mark.parametrize("solver", ["eigh", "cg", "krylov", "auto"])
def test_a_non_psd_kernel_is_refused_with_its_smallest_eigenvalue(solver):
    K = _indefinite()
    smallest = float(torch.linalg.eigvalsh(K)[0])
    with pytest.raises(ValueError, match=r"K is not positive semi-definite: its smallest eigenvalue is about -"):
        tk.solve(K, torch.randn(40, dtype=torch.float64), 1e-2, solver=solver)
    assert smallest < 0


@pytest.mark.parametrize("solver", ["eigh", "cg", "nesterov", "cholesky", "krylov"])
def test_a_beta_beyond_the_dtype_is_refused(solver):
    g = torch.randn(30, 8, generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"beta = 1e\+300 is beyond what float32 arithmetic can solve"):
        tk.solve(g @ g.T, torch.randn(30), 1e300, solver=solver)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.uint8])
def test_the_device_checksum_sees_every_single_change(dtype):
    """The on-device fingerprint of CUDA batches (run here on CPU tensors: same code)."""
    from tangent_kernels.checkpoint import device_checksum

    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(7, 33, generator=gen) * 100).to(dtype)
    base = device_checksum(x)
    assert device_checksum(x.clone()) == base
    for position in [0, 1, 77, 230]:
        changed = x.clone().reshape(-1)
        changed[position] = changed[position] + 1 if dtype != torch.uint8 else (int(changed[position]) + 1) % 256
        assert device_checksum(changed.reshape(7, 33)) != base


def test_a_write_through_data_or_detach_of_a_parameter_is_refused():
    for alias in ("data", "detach"):
        class Aliases(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(6, 3)

            def forward(self, x, _alias=alias):
                target = self.lin.weight.data if _alias == "data" else self.lin.weight.detach()
                target.mul_(2)
                return self.lin(x)

        model = Aliases()
        before = model.lin.weight.clone()
        with pytest.raises(ValueError, match=r"writes parameter lin.weight in place"):
            tk.gram(model, _loader(), progress=False)
        assert torch.equal(model.lin.weight, before)
