"""Host-store staging that overlaps copies with the tile GEMMs (tiles._staged_blocks).

The real thing needs CUDA (side stream, pinned memory): the `gpu` test runs it. On a
CPU, the schedule itself is checked with stand-ins for the stream API: the next block
is staged before the current one is used, at most two blocks are staged at once, the
budget accounts for both, every block is released, also when a tile fails."""

import contextlib

import pytest
import torch
from torch import nn

import tangent_kernels as tk
import tangent_kernels.feature_phase as feature_phase
import tangent_kernels.tiles as tiles
from tangent_kernels import tuning

N, BATCH = 23, 5


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(tuning.settings, "tile_rows", 4)  # 6 row blocks, ragged last one


def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(N, 6)
    return model, [x[i : i + BATCH] for i in range(0, N, BATCH)]


class _Streams:
    """Stand-ins for torch.cuda's streams and events that log what the engine asks."""

    def __init__(self, monkeypatch):
        self.log = []
        log = self.log

        class Event:
            def record(self, stream):
                log.append(("record", stream.name))

        class Stream:
            def __init__(self, device=None, name="copies"):
                self.name = name

            def wait_event(self, event):
                log.append(("wait", self.name))

        @contextlib.contextmanager
        def on(stream):
            log.append(("enter", stream.name))
            yield
            log.append(("exit", stream.name))

        compute = Stream(name="compute")
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "stream", on)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: log.append(("keep", stream.name)))
        monkeypatch.setattr(tiles, "_overlaps_copies", lambda store, device: store.kind == "host")


class _Recorder:
    def __init__(self, monkeypatch):
        self.stores = []
        original = feature_phase.FeatureStore

        def make(*args, **kwargs):
            self.stores.append(original(*args, **kwargs))
            return self.stores[-1]

        monkeypatch.setattr(feature_phase, "FeatureStore", make)


def test_overlapped_schedule_gives_the_same_K_within_budget(monkeypatch):
    model, loader = _problem()
    # The tile shape changes the op's summation order, so the baseline uses 3-row tiles too.
    monkeypatch.setattr(tuning.settings, "tile_rows", 3)
    base = tk.gram(model, loader, progress=False, store="host")
    monkeypatch.setattr(tuning.settings, "tile_rows", 4)
    ref = tk.reference.gram_autograd(model, loader)
    streams, recorder = _Streams(monkeypatch), _Recorder(monkeypatch)
    row_bytes = 83 * 4  # p = 83 parameters, fp32
    budget = 9 * row_bytes  # A + two B blocks of 3 rows: tiles shrink from 4 rows to 3
    k = tk.gram(model, loader, progress=False, store="host", max_memory=budget)
    assert torch.equal(k, base)  # same tiles in the same order: identical bits
    assert float((k.double() - ref).norm() / ref.norm()) <= 1e-5  # fp32, see test_gram.py
    (store,) = recorder.stores
    assert store.peak_device_bytes == budget  # A and two B blocks staged at once, no more
    assert store.device_bytes == 0
    log = streams.log
    # Every staged block: copied inside the side stream, its end recorded, waited for by
    # the compute stream and kept alive for it.
    assert log.count(("enter", "copies")) == log.count(("record", "copies")) == log.count(("wait", "compute"))
    assert log.count(("keep", "compute")) == log.count(("wait", "compute"))
    # Overlap: whenever a row has a next block, it is already staged when the compute
    # stream starts waiting for the current one (two copies ahead of the waits).
    ahead, staged, waited = [], 0, 0
    for entry in log:
        staged += entry == ("enter", "copies")
        if entry == ("wait", "compute"):
            ahead.append(staged - waited)
            waited += 1
    row_starts = range(0, N, 3)
    blocks_per_row = [-(-min(i0 + 3, N) // 3) for i0 in row_starts]  # lower triangle: ceil(i1 / 3)
    assert ahead.count(2) == sum(b - 1 for b in blocks_per_row)
    assert ahead.count(1) == len(blocks_per_row) and set(ahead) == {1, 2}


@pytest.mark.parametrize("fail_at_tile", [1, 2, 4])
def test_a_failing_tile_releases_every_staged_block(monkeypatch, fail_at_tile):
    model, loader = _problem(1)
    _Streams(monkeypatch)
    recorder = _Recorder(monkeypatch)
    calls = {"n": 0}
    original = tiles.gram_tile_update

    staged_at_call = []

    def flaky(*args, **kwargs):
        calls["n"] += 1
        staged_at_call.append(recorder.stores[0].device_bytes)
        if calls["n"] == fail_at_tile:
            raise torch.cuda.OutOfMemoryError("injected")
        return original(*args, **kwargs)

    monkeypatch.setattr(tiles, "gram_tile_update", flaky)
    k = tk.gram(model, loader, progress=False, store="host")
    row_bytes = 83 * 4
    # Before the failure: A and at most two B blocks of 4 rows. At the retry's first tile
    # (2-row tiles): A and at most two B blocks of 2 rows, so nothing of the failed
    # attempt is still staged (a leak would add its 8 to 12 rows).
    assert max(staged_at_call[:fail_at_tile]) <= 3 * 4 * row_bytes
    assert staged_at_call[fail_at_tile] <= 3 * 2 * row_bytes
    assert recorder.stores[0].device_bytes == 0
    # The retry used halved tiles (another summation order): compare with the reference,
    # at fp32's tolerance (see test_gram.py).
    ref = tk.reference.gram_autograd(model, loader)
    assert float((k.double() - ref).norm() / ref.norm()) <= 1e-5
    assert torch.equal(k, k.T)


@pytest.mark.gpu
def test_host_store_on_cuda_matches_device_store(monkeypatch):
    # 3-row tiles everywhere: a budget of 9 rows gives the host store exactly that (A and
    # two B blocks), and equal tile shapes make equal bits a fair demand.
    monkeypatch.setattr(tuning.settings, "tile_rows", 3)
    model, loader = _problem(2)
    model = model.cuda()
    loader = [x.cuda() for x in loader]
    base = tk.gram(model, loader, progress=False, store="device")
    row_bytes = 83 * 4
    for budget_rows in (9, 100):
        k = tk.gram(model, loader, progress=False, store="host", max_memory=budget_rows * row_bytes)
        assert torch.equal(k, base)
    ref = tk.reference.gram_autograd(model.cpu(), [x.cpu() for x in loader])
    assert float((base.double().cpu() - ref).norm() / ref.norm()) <= 1e-5  # fp32, TF32 off
