"""The cases that used to return a wrong K (or change the caller's data or model) without
an error: each now refuses, or computes the right thing, and says so. Here: the
checkpoint's (each refusal needs a first run on disk), buffers, the device checksum; the
refusals of one bad call (a forward writing its input or a parameter, overlapping out=,
a non-PSD K, a beta beyond the dtype) are in the catalogue, tests/test_errors.py."""

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
from conftest import batches, seeded_mlp


def _loader(n=12, batch=4, seed=1):
    return batches(torch.randn(n, 6, generator=torch.Generator().manual_seed(seed)), batch)


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
            tk.gram(seeded_mlp(), _loader(), progress=False, checkpoint=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    K = tk.gram(seeded_mlp(), _loader(), progress=False, checkpoint=tmp_path)  # kill -9 released it
    assert torch.equal(K, tk.gram(seeded_mlp(), _loader(), progress=False))


# 2. the computation changed, the weights did not
def test_resume_after_the_model_structure_changed_is_refused(tmp_path):
    tk.gram(seeded_mlp(activation=nn.Tanh), _loader(), progress=False, checkpoint=tmp_path)
    with pytest.raises(CheckpointMismatch, match="model_structure"):
        tk.gram(seeded_mlp(activation=nn.ReLU), _loader(), progress=False, checkpoint=tmp_path)


def test_resume_after_the_output_callable_changed_is_refused(tmp_path):
    tk.gram(seeded_mlp(), _loader(), progress=False, checkpoint=tmp_path, output=lambda o: o[:, 0])
    K = tk.gram(seeded_mlp(), _loader(), progress=False, checkpoint=tmp_path, output=lambda o: o[:, 0])
    assert torch.equal(K, tk.gram(seeded_mlp(), _loader(), progress=False, output=0))
    with pytest.raises(CheckpointMismatch, match="output"):
        tk.gram(seeded_mlp(), _loader(), progress=False, checkpoint=tmp_path, output=lambda o: o[:, 2])
    column = 0

    def closure(o):
        return o[:, column]

    other = tmp_path / "closure"
    tk.gram(seeded_mlp(), _loader(), progress=False, checkpoint=other, output=closure)
    column = 1
    with pytest.raises(CheckpointMismatch, match="output"):
        tk.gram(seeded_mlp(), _loader(), progress=False, checkpoint=other, output=closure)


def test_an_undecidable_output_callable_needs_a_checkpoint_key_to_resume(tmp_path):
    class Pick:  # a callable object holding state the fingerprint cannot value
        def __init__(self):
            self.index = object()

        def __call__(self, out):
            return out[:, 0]

    tk.gram(seeded_mlp(), _loader(), progress=False, checkpoint=tmp_path, output=Pick())
    with pytest.raises(CheckpointMismatch, match="checkpoint_key="):
        tk.gram(seeded_mlp(), _loader(), progress=False, checkpoint=tmp_path, output=Pick())
    keyed = tmp_path / "keyed"
    tk.gram(seeded_mlp(), _loader(), progress=False, checkpoint=keyed, output=Pick(), checkpoint_key="pick first")
    K = tk.gram(seeded_mlp(), _loader(), progress=False, checkpoint=keyed, output=Pick(), checkpoint_key="pick first")
    assert torch.equal(K, tk.gram(seeded_mlp(), _loader(), progress=False))


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
def test_damaged_checkpoint_files_are_refused_never_read(tmp_path, target, damage, set_tile_rows):
    class Stop(Exception):
        pass

    def stop_in_the_gram_phase(event):
        if event.phase == "gram" and not event.resumed:
            raise Stop

    model, loader = seeded_mlp(), _loader(n=40, batch=8)
    set_tile_rows(16)
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


# 5. a buffer changed in forward
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
