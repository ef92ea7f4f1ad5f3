"""The blocked Gram engine: feature stores and their memory accounting, out=, progress
callbacks, checkpoint/resume (bit-identical K after interruptions at any point,
refusal of a different computation), and out-of-memory backoff."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import tangent_kernels as tk
import tangent_kernels.engine as engine
import tangent_kernels.feature_phase as feature_phase
import tangent_kernels.tiles as tiles
from tangent_kernels import tuning
import tangent_kernels.store as store_module
from tangent_kernels.checkpoint import Checkpoint, CheckpointMismatch
from conftest import batches, rel_err, seeded_mlp

N, BATCH = 23, 5
# Tiles of 4 rows over 23 samples: row blocks, the diagonal, ragged edges, and batches
# (5 rows) that straddle tile borders.
pytestmark = pytest.mark.usefixtures("small_tiles")


def _problem(seed=0):
    model = seeded_mlp(seed)
    return model, batches(torch.randn(N, 6), BATCH)


class _Recorder:
    """Every FeatureStore a gram() call creates (to read its accounting afterwards)."""

    def __init__(self, monkeypatch):
        self.stores = []
        original = feature_phase.FeatureStore

        def make(*args, **kwargs):
            created = original(*args, **kwargs)
            self.stores.append(created)
            return created

        monkeypatch.setattr(feature_phase, "FeatureStore", make)


@pytest.mark.parametrize("kind", ["device", "host", "disk"])
def test_every_store_gives_the_same_K(kind, tmp_path):
    model, loader = _problem()
    ref = tk.reference.gram_autograd(model, loader)
    base = tk.gram(model, loader, progress=False)
    k = tk.gram(model, loader, progress=False, store=kind, cache_dir=tmp_path)
    assert torch.equal(k, base)  # same features, same tiles: identical bits
    assert rel_err(k, ref) <= 1e-5  # fp32 (see test_gram.py)
    cross = tk.gram(model, loader[:2], None, loader[1:], progress=False, store=kind, cache_dir=tmp_path)
    assert rel_err(cross, ref[:10, 5:]) <= 1e-5
    assert list(tmp_path.iterdir()) == []  # disk store files removed


def test_auto_store_spills_and_accounting_stays_under_max_memory(monkeypatch, tmp_path):
    model, loader = _problem(1)
    base = tk.gram(model, loader, progress=False)
    row_bytes = 83 * 4  # p = 83 parameters, fp32
    for budget_rows, expected_kind in [(200, "device"), (30, "device"), (20, "disk"), (9, "disk")]:
        recorder = _Recorder(monkeypatch)
        k = tk.gram(model, loader, progress=False, max_memory=budget_rows * row_bytes, cache_dir=tmp_path)
        assert torch.equal(k, base)
        (store,) = recorder.stores
        assert store.kind == expected_kind
        assert 0 < store.peak_device_bytes <= budget_rows * row_bytes
        assert store.device_bytes == 0  # everything released once gram() returns


def test_forced_device_store_over_budget_is_an_error():
    model, loader = _problem()
    with pytest.raises(MemoryError, match=r"store='device'.*over max_memory.*store='auto'"):
        tk.gram(model, loader, progress=False, store="device", max_memory=1000)


def test_bad_store_arguments():
    model, loader = _problem()
    with pytest.raises(ValueError, match="store must be one of auto, device, host, disk"):
        tk.gram(model, loader, store="gpu")
    with pytest.raises(ValueError, match="max_memory must be a positive, finite number of bytes"):
        tk.gram(model, loader, max_memory=0)
    with pytest.raises(TypeError, match="callback must be callable"):
        tk.gram(model, loader, callback="print")


def test_out_is_filled_and_returned():
    model, loader = _problem()
    base = tk.gram(model, loader, progress=False)
    out = torch.full((N, N), float("nan"))
    assert tk.gram(model, loader, progress=False, out=out) is out
    assert torch.equal(out, base)
    with pytest.raises(ValueError, match=r"out must be a \[23, 23\] tensor of dtype torch.float32"):
        tk.gram(model, loader, progress=False, out=torch.empty(N, N - 1))
    with pytest.raises(ValueError, match="dtype torch.float64"):
        tk.gram(model, loader, progress=False, precision="fp64", out=torch.empty(N, N))
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        tk.gram(model, loader, progress=False, out=[[0.0]])


def test_callback_sees_every_batch_and_row_block():
    model, loader = _problem()
    events = []
    tk.gram(model, loader, progress=False, callback=events.append)
    features = [(e.loader, e.done) for e in events if e.phase == "features"]
    rows = [e.done for e in events if e.phase == "gram"]
    assert features == [("loader", d) for d in (5, 10, 15, 20, 23)]
    assert rows == [4, 8, 12, 16, 20, 23]
    assert not any(e.resumed for e in events)
    # a list of batch tensors tells its sample count in advance (data.loader_length)
    assert {e.total for e in events if e.phase == "features"} == {N}
    assert {e.total for e in events if e.phase == "gram"} == {N}
    times = [e.elapsed for e in events]
    assert times == sorted(times)


class Interrupt(Exception):
    pass


def _interrupt_at(phase, done):
    def callback(event):
        if (event.phase, event.done) == (phase, done) and not event.resumed:
            raise Interrupt

    return callback


def _count_computed_batches(monkeypatch):
    counter = {"batches": 0}
    original = feature_phase.features_with_backoff

    def counting(per_sample, batch):
        counter["batches"] += 1
        return original(per_sample, batch)

    monkeypatch.setattr(feature_phase, "features_with_backoff", counting)
    return counter


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("stop", [("features", 5), ("features", 15), ("features", 23), ("gram", 4), ("gram", 16)])
def test_resume_after_interruption_is_bit_identical_and_recomputes_nothing(monkeypatch, tmp_path, stop, precision):
    model, loader = _problem(2)
    base = tk.gram(model, loader, progress=False, precision=precision)
    with pytest.raises(Interrupt):
        tk.gram(model, loader, progress=False, precision=precision, checkpoint=tmp_path,
                callback=_interrupt_at(*stop))
    counter = _count_computed_batches(monkeypatch)
    events = []
    k = tk.gram(model, loader, progress=False, precision=precision, checkpoint=tmp_path, callback=events.append)
    assert torch.equal(k, base)
    finished_batches = stop[1] // BATCH + (stop[1] == N) if stop[0] == "features" else 5
    assert counter["batches"] == 5 - finished_batches
    assert sum(e.resumed for e in events if e.phase == "features") == finished_batches
    # A finished checkpoint answers again without computing anything.
    counter["batches"] = 0
    assert torch.equal(tk.gram(model, loader, progress=False, precision=precision, checkpoint=tmp_path), base)
    assert counter["batches"] == 0


def test_cross_kernel_resumes(tmp_path):
    model, loader = _problem(3)
    base = tk.gram(model, loader[:3], None, loader[2:], progress=False)

    def stop_in_loader2(event):
        if event.loader == "loader2" and event.done == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        tk.gram(model, loader[:3], None, loader[2:], progress=False, checkpoint=tmp_path, callback=stop_in_loader2)
    assert torch.equal(tk.gram(model, loader[:3], None, loader[2:], progress=False, checkpoint=tmp_path), base)


def test_crash_in_the_middle_of_a_write_is_recovered(monkeypatch, tmp_path):
    """Data appended but the manifest not yet replaced (the crash window): resume must
    ignore the unrecorded bytes, not read them as a batch."""
    model, loader = _problem(4)
    base = tk.gram(model, loader, progress=False)
    saves = {"n": 0}
    original = Checkpoint._save

    def crashing_save(self):
        saves["n"] += 1
        if saves["n"] == 4:  # creation, batch 0, batch 1, then crash while recording batch 2
            raise Interrupt
        original(self)

    monkeypatch.setattr(Checkpoint, "_save", crashing_save)
    with pytest.raises(Interrupt):
        tk.gram(model, loader, progress=False, checkpoint=tmp_path)
    monkeypatch.setattr(Checkpoint, "_save", original)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["loaders"]["loader"]["batches"]) == 2
    assert (tmp_path / "loader.features").stat().st_size == 15 * 83 * 4  # batch 2 is on disk, unrecorded
    assert torch.equal(tk.gram(model, loader, progress=False, checkpoint=tmp_path), base)


def test_kill_9_mid_run_then_resume(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import tangent_kernels as tk
        from test_engine_scale import _problem
        tk.tuning.settings.tile_rows = 4
        model, loader = _problem(5)
        def die(event):
            if event.phase == "gram" and event.done == 12:
                os.kill(os.getpid(), signal.SIGKILL)
        tk.gram(model, loader, progress=False, checkpoint={str(tmp_path)!r}, callback=die)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert json.loads((tmp_path / "manifest.json").read_text())["k_rows_done"] == 12
    model, loader = _problem(5)
    assert torch.equal(tk.gram(model, loader, progress=False, checkpoint=tmp_path),
                       tk.gram(model, loader, progress=False))


def test_checkpoint_of_a_different_computation_is_refused(tmp_path):
    model, loader = _problem(6)
    tk.gram(model, loader, progress=False, checkpoint=tmp_path)
    with pytest.raises(CheckpointMismatch, match="precision: checkpoint has 'fp32', this call 'fp64'"):
        tk.gram(model, loader, progress=False, checkpoint=tmp_path, precision="fp64")
    with pytest.raises(CheckpointMismatch, match="output: checkpoint has 'first', this call 'sum'"):
        tk.gram(model, loader, progress=False, checkpoint=tmp_path, output="sum")
    with pytest.raises(CheckpointMismatch, match="idx"):
        tk.gram(model, loader, torch.arange(10), progress=False, checkpoint=tmp_path)
    with pytest.raises(CheckpointMismatch, match="kernel: checkpoint has 'symmetric"):
        tk.gram(model, loader, None, list(loader), progress=False, checkpoint=tmp_path)  # the same object is K(X, X)
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-3
    with pytest.raises(CheckpointMismatch, match="model_weights"):
        tk.gram(model, loader, progress=False, checkpoint=tmp_path)


def test_changed_or_reordered_data_is_refused(tmp_path):
    model, loader = _problem(7)
    tk.gram(model, loader, progress=False, checkpoint=tmp_path)
    changed = [b.clone() for b in loader]
    changed[2][1, 3] += 0.5
    with pytest.raises(CheckpointMismatch, match="loader batch 2 holds other values than the one checkpointed"):
        tk.gram(model, changed, progress=False, checkpoint=tmp_path)
    with pytest.raises(CheckpointMismatch, match="loader batch 0 (holds other values|has [0-9]+ samples)"):
        tk.gram(model, loader[::-1], progress=False, checkpoint=tmp_path)
    with pytest.raises(CheckpointMismatch, match="yields 4 batches but 5 were checkpointed"):
        tk.gram(model, loader[:4], progress=False, checkpoint=tmp_path)
    with pytest.raises(CheckpointMismatch, match="more batches than the 5 checkpointed"):
        tk.gram(model, loader + [loader[0]], progress=False, checkpoint=tmp_path)
    file_path = tmp_path / "manifest.json"
    with pytest.raises(ValueError, match="is a file; give a folder"):
        tk.gram(model, loader, progress=False, checkpoint=file_path)


def test_out_of_memory_in_the_gram_phase_halves_the_tiles(monkeypatch, set_tile_rows):
    model, loader = _problem(8)
    ref = tk.reference.gram_autograd(model, loader)
    base = tk.gram(model, loader, progress=False)
    set_tile_rows(16)
    original, calls = tiles.gram_tile_update, []

    def tight_memory(k, a, b, *args, **kwargs):
        calls.append(a.shape[0])
        if a.shape[0] > 4 or b.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("injected: CUDA out of memory")
        return original(k, a, b, *args, **kwargs)

    monkeypatch.setattr(tiles, "gram_tile_update", tight_memory)
    k = tk.gram(model, loader, progress=False)
    assert calls[:2] == [16, 8] and max(calls[2:]) <= 4  # 16 fails, 8 fails, then tiles of 4
    assert rel_err(k, ref) <= 1e-5 and torch.allclose(k, base, rtol=1e-6, atol=1e-7)
    assert torch.equal(k, k.T)


def test_out_of_memory_in_the_feature_phase_splits_the_batch(monkeypatch):
    model, loader = _problem(9)
    ref = tk.reference.gram_autograd(model, loader)
    original = engine.FeatureExtractor.extract  # what the feature phase calls per batch
    sizes = []

    def tight_memory(self, batch):
        sizes.append(batch.size)
        if batch.size > 2:
            raise torch.cuda.OutOfMemoryError("injected: CUDA out of memory")
        return original(self, batch)

    monkeypatch.setattr(engine.FeatureExtractor, "extract", tight_memory)
    k = tk.gram(model, loader, progress=False)
    assert max(sizes) == BATCH and min(sizes) == 1
    assert rel_err(k, ref) <= 1e-5


def test_resume_after_an_out_of_memory_halving_keeps_the_smaller_tiles(monkeypatch, tmp_path, set_tile_rows):
    # Tile shapes change the op's summation order; the resumed run must continue with the
    # tiles the interrupted run had reached, or its K would differ in the last bits.
    model, loader = _problem(10)
    set_tile_rows(6)
    fresh = tk.gram(model, loader, progress=False)
    original = tiles.gram_tile_update
    failed = []

    def one_out_of_memory(k, a, b, *args, **kwargs):
        if not failed and a.shape[0] == 6 and args[0] >= 6:  # the second row block of 6 rows
            failed.append(True)
            raise torch.cuda.OutOfMemoryError("injected: CUDA out of memory")
        return original(k, a, b, *args, **kwargs)

    monkeypatch.setattr(tiles, "gram_tile_update", one_out_of_memory)
    uninterrupted = tk.gram(model, loader, progress=False)
    assert failed
    # 6- and 3-row tiles sum in different orders: equal to fp32 rounding, not bit for bit
    # (whether the bits differ is up to the BLAS; the contract is the resumed run's bits).
    assert rel_err(uninterrupted, fresh) <= 1e-6
    failed.clear()
    with pytest.raises(Interrupt):  # rows 0-6 in tiles of 6, then 6-12 in tiles of 3
        tk.gram(model, loader, progress=False, checkpoint=tmp_path, callback=_interrupt_at("gram", 12))
    assert json.loads((tmp_path / "manifest.json").read_text())["k_tile_rows"] == 3
    monkeypatch.setattr(tiles, "gram_tile_update", original)  # no memory trouble this time
    resumed = tk.gram(model, loader, progress=False, checkpoint=tmp_path)
    assert torch.equal(resumed, uninterrupted)
    assert rel_err(resumed, tk.reference.gram_autograd(model, loader)) <= 1e-5  # fp32, see test_gram.py


def test_out_may_be_any_strided_view_but_not_an_expanded_one():
    model, loader = _problem(11)
    base = tk.gram(model, loader, progress=False)
    for out in (torch.empty(N, N).T, torch.empty(N, 2 * N)[:, ::2]):
        assert torch.equal(tk.gram(model, loader, progress=False, out=out), base)
    def never_called(event):
        raise AssertionError("work started before out was checked")

    with pytest.raises(ValueError, match=r"out's elements overlap in memory .*expanded.*torch.empty\(n1, n2"):
        tk.gram(model, loader, progress=False, out=torch.empty(1, N).expand(N, N), callback=never_called)
    with pytest.raises(ValueError, match=r"out's elements overlap in memory \(strides \(1, 1\)"):
        tk.gram(model, loader, progress=False, out=torch.empty(2 * N).as_strided((N, N), (1, 1)),
                callback=never_called)
    with pytest.raises(ValueError, match=r"out must be a tensor of dtype torch.float64"):
        tk.gram(model, loader, progress=False, precision="fp64", out=torch.empty(N, N), callback=never_called)


@pytest.mark.parametrize("kind", ["device", "host", "disk"])
@pytest.mark.parametrize("budget_rows", [23, 24, 100])
def test_each_forced_store_keeps_its_accounted_peak_under_max_memory(monkeypatch, tmp_path, kind, budget_rows):
    # A device store holds all 23 rows (its buffer may grow past them, within budget); a
    # host or disk store stages tiles of A and B rows, shrunk to fit what the budget allows.
    model, loader = _problem(12)
    base = tk.gram(model, loader, progress=False)
    recorder = _Recorder(monkeypatch)
    budget = budget_rows * 83 * 4  # p = 83 parameters, fp32
    k = tk.gram(model, loader, progress=False, store=kind, max_memory=budget, cache_dir=tmp_path)
    (store,) = recorder.stores
    assert store.kind == kind
    assert 0 < store.peak_device_bytes <= budget
    assert store.device_bytes == 0
    assert rel_err(k, tk.reference.gram_autograd(model, loader)) <= 1e-5  # fp32, see test_gram.py
    if kind == "device":
        assert torch.equal(k, base)  # same tiles as the default (device) run


def test_forced_device_store_growing_near_its_budget_passes_rows_through_the_host():
    # Growing from 64 to 100 rows in a 100-row budget cannot hold both buffers: the rows
    # wait in host memory, and the accounted peak stays within the budget.
    row_bytes = 3 * 4
    feature_store = store_module.FeatureStore(3, torch.float32, torch.device("cpu"), kind="device",
                                              max_memory=100 * row_bytes)
    blocks = [torch.randn(30, 3), torch.randn(30, 3), torch.randn(30, 3), torch.randn(10, 3)]
    for block in blocks:
        feature_store.append(block)
    assert torch.equal(feature_store.all_rows(), torch.cat(blocks))
    assert feature_store.peak_device_bytes <= 100 * row_bytes
    with pytest.raises(MemoryError, match="over max_memory"):
        feature_store.append(torch.randn(1, 3))
    feature_store.close()
    assert feature_store.device_bytes == 0
