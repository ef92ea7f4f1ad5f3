"""The Gram on a torch.distributed group: ``tk.gram`` when a process group is up.

Phases (each ends with every rank's status exchanged, so one rank's error stops all):
1. arguments: every rank's fingerprints of the model (everything the single-process
   checkpoint identity covers: weights, attributes, hooks, requires_grad, code and the
   globals it reads), idx, output, ``inputs=``, precision, backend, loader layout and,
   without ``shard=True``, of every batch (a first pass over the loader, loaded and
   hashed, not evaluated) are compared with rank 0's (a digest; the itemized parts only
   when they differ, to name what differs);
2. features: each rank computes its share of the samples into a feature store (the
   one feature phase, ``feature_phase.fill_store``: stores, precisions, per-rank checkpoints);
3. gram: the shards of the column features visit every rank (a ring of point-to-point
   passes, or one all_gather) and each rank computes its blocks of K (schedule.py)
   with ``tiles.blocked_gram`` (tiles, out-of-memory halving, checkpointed
   row blocks); for K(X, X) the blocks a rank computed for another's rows are sent there;
4. K is returned as asked: every rank (``gather="all"``), rank 0, or row shards (KShard).
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from .. import feature_phase
from ..progress import Events
from ..request import Request
from ..sketch import check_projection
from ..tiles import blocked_gram
from ..tuning import settings
from ..checkpoint import Checkpoint, CheckpointMismatch, refuse_foreign
from ..data import loader_length
from ..identity import computation_fingerprint
from ..outputs import is_multi
from ..store import FeatureStore
from .exchange import Comm
from .schedule import (RankBatches, Task, batch_fingerprints, count_batches, cross_tasks, ring_steps, split_batches,
                       symmetric_tasks)
from .shard import KShard

__all__ = ["gram", "GATHERS", "EXCHANGES"]

GATHERS = ("all", "rank0", "rows")
EXCHANGES = ("auto", "ring", "allgather")
# "auto" is the ring: bench/bench_distributed.py (2 gloo processes, resnet18, n = 256,
# p = 100,000) measured 0.4 s blocked in the ring's one pass, overlapped with the diagonal
# tiles, against 1.4-1.8 s in all_gather moving the same bytes; and the ring holds a few
# shard-sized buffers, not every shard. NCCL has not been measured.


def gram(model, loader, idx=None, loader2=None, *, group=None, shard: bool = False, gather: str = "all",
         exchange: str = "auto", timeout: Optional[float] = None, output="first", precision: str = "fp32",
         device=None, progress=True, inputs=None, backend: str = "auto", out=None, callback=None,
         checkpoint=None, store: str = "auto", max_memory=None, cache_dir=None, checkpoint_key=None,
         structured: str = "auto", stats: Optional[dict] = None, projection=None):
    """The eNTK Gram over a process group; the arguments of :func:`tangent_kernels.gram`, plus

    group: the process group (None: the default one).
    shard: False (default): every rank passes the same loader and its batches are
        assigned to ranks in contiguous ranges (K's order is the loader's). True: each
        rank passes its own samples (K's order: rank 0's, then rank 1's, ...).
    gather: "all" (K on every rank), "rank0" (K on rank 0, None elsewhere) or "rows"
        (a :class:`KShard` per rank: its contiguous rows of K and their offsets).
    exchange: how feature shards travel: "ring" (W // 2 point-to-point passes for
        K(X, X), overlapped with the tiles; a few shards in memory), "allgather" (one
        collective; every shard in memory), "auto" (the ring: measured faster on gloo).
    timeout: seconds a rank waits for the others at a phase boundary (None: the
        group's timeout); the error names the phase and, on gloo, the missing ranks.
    projection: None, or a :class:`tk.Projection`: every rank sketches its samples with the same R (from
        the seed, never sent) and K~ is the sketches' Gram; the ranks compare it, checkpoints record it.
    stats: a dict, filled with this rank's seconds per phase ("features", "gram",
        "gather"; the process's CPU seconds in "features_cpu", "gram_cpu"), the
        seconds it was blocked in collectives ("communication": waits
        for other ranks included, transfers hidden behind tiles excluded), the
        exchange taken and its shard sizes.

    Exact to the bit against one process where every rank's shard is a multiple of
    2 x 1024 rows (the tiles then coincide); otherwise within fp32 rounding (the same
    products, summed in other tile shapes). Not yet: ``out=``, the every-logit
    outputs ("full", "trace", "diagonal"), the structured Gram contributions
    (``structured="auto"`` computes features for every tensor here; "always" is refused).
    """
    comm = Comm(group, timeout, device=_comm_device(device, model))
    error, plan = None, None
    try:
        from ..structured import check_structured

        projection = check_projection(projection)
        if check_structured(structured) == "always":
            raise ValueError("structured='always' is not supported by the distributed Gram yet (it computes "
                             "features for every tensor): use structured='auto' or 'never', or one process")
        plan = _Plan(comm, model, loader, idx, loader2, shard, gather, exchange, output, precision, device, progress,
                     inputs, backend, out, callback, checkpoint, store, max_memory, cache_dir, checkpoint_key, projection)
    except Exception as caught:  # told to every rank below, so none waits for a rank that stopped
        error = caught
    comm.settle("arguments", error)
    comm.agree("arguments", plan.record, plan.parts)
    plan.stats = {} if stats is None else stats
    with plan.request.evaluation():
        return plan.run(model)


def _comm_device(device, model) -> Optional[torch.device]:
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return None if first is None else first.device


class _Plan:
    """One rank's share of the run, checked before any work."""

    def __init__(self, comm: Comm, model, loader, idx, loader2, shard, gather, exchange, output, precision, device,
                 progress, inputs, backend, out, callback, checkpoint, store, max_memory, cache_dir, checkpoint_key,
                 projection=None):
        self.comm, self.projection = comm, projection
        request = Request.of(model, idx, output=output, precision=precision, device=device, backend=backend,
                             inputs=inputs, progress=progress, store=store, max_memory=max_memory, callback=callback,
                             checkpoint_key=checkpoint_key)
        self.request = request
        index, output, precision, device = request.index, request.output, request.precision, request.device
        if gather not in GATHERS:
            raise ValueError(f"gather must be one of {', '.join(GATHERS)}; got {gather!r}")
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {', '.join(EXCHANGES)}; got {exchange!r}")
        if not isinstance(shard, bool):
            raise TypeError(f"shard must be True (each rank passes its own samples) or False; got {shard!r}")
        if out is not None:
            raise ValueError("out= is not supported by the distributed Gram yet: K is assembled from the ranks' "
                             "shards; use gather='rows' for a K per rank that is not whole")
        if is_multi(output):
            raise ValueError(f"output={output!r} (every logit) is not supported by the distributed Gram yet: "
                             "use one scalar output ('first', 'sum', a logit index, a callable), or one process")
        self.index, self.output, self.precision, self.device = index, output, precision, device
        self.gather, self.exchange, self.shard, self.inputs = gather, exchange, shard, inputs
        self.store, self.budget, self.cache_dir = request.store, request.budget, cache_dir
        self.events = Events(callback, request.progress if comm.rank == 0 else False)
        self.symmetric = loader2 is None
        self.checkpoint, self.checkpoint_key = checkpoint, checkpoint_key
        with request.evaluation():  # as the run sees it (the engine's identity is taken in eval mode too)
            self.identity, self.undecidable = request.identity(not self.symmetric, projection)
        self.parts = dict(self.identity.get("parts") or {})
        self.record = {key: value for key, value in self.identity.items() if key != "parts"}
        self.record.update(world_size=comm.world, shard=shard, gather=gather, exchange=exchange,
                           checkpoint=checkpoint is not None,
                           inputs=None if inputs is None else computation_fingerprint(None, inputs).digest)
        self.loaders = [self._share(loader, "loader")] + ([] if self.symmetric else [self._share(loader2, "loader2")])
        self.record["batches"] = None if shard else [n for _, n, _ in self.loaders]

    def _share(self, loader, name: str):
        """(this rank's loader, the batches announced, the samples announced or None)."""
        rank, world = self.comm.rank, self.comm.world
        if self.shard:
            return loader, None, _announced(loader)
        if isinstance(loader, torch.Tensor):  # one batch: its samples are split instead
            if loader.dim() == 0 or loader.shape[0] < world:
                raise ValueError(f"{name} is one tensor of {loader.shape[0] if loader.dim() else 0} samples, fewer "
                                 f"than the {world} ranks: every rank needs at least one sample")
            loader = list(torch.tensor_split(loader, world))
        n_batches = count_batches(loader, rank)
        if n_batches < world:
            raise ValueError(f"{name} has {n_batches} batches for {world} ranks: every rank needs at least one "
                             "batch; use smaller batches (DataLoader(batch_size=...)) or fewer ranks")
        # Every batch, hashed: the ranks compare them before any work, and each rank checks
        # that the batches it then computes are these (a loader that shuffles per rank,
        # or at every pass, would give each rank other samples).
        expected = batch_fingerprints(loader, self.inputs, name, n_batches, rank)
        self.record[f"data ({name})"] = hashlib.blake2b("".join(expected).encode(), digest_size=16).hexdigest()
        self.parts[f"data ({name})"] = {f"batch {b}": f"#{fp[:12]}" for b, fp in enumerate(expected)}
        start, stop = split_batches(n_batches, world)[rank]
        return (RankBatches(loader, start, stop, n_batches, rank, rank == world - 1, expected, self.inputs),
                n_batches, _announced(loader))

    # ------------------------------------------------------------------ the run
    def run(self, model):
        comm, stores, ckpt, error = self.comm, [], None, None
        clock, cpu = time.perf_counter(), time.process_time()
        try:
            try:
                ckpt = self._open_checkpoint()
                stores = self._features(model, ckpt)
            except Exception as caught:
                error = caught
            comm.settle("features", error)  # no collective before it: a rank that failed is not in them
            self.stats["features"], clock = time.perf_counter() - clock, time.perf_counter()
            self.stats["features_cpu"], cpu = time.process_time() - cpu, time.process_time()
            signatures = comm.all_objects(self.signature)
            if len(set(signatures)) > 1:
                raise ValueError(f"the ranks' loaders hold inputs of different per-sample shapes or dtypes: "
                                 f"{'; '.join(f'rank {r}: {s}' for r, s in enumerate(signatures))}")
            sizes = [comm.all_objects(s.samples) for s in stores]
            announced = [a for _, _, a in self.loaders]
            for name, sizes_l, total in zip(("loader", "loader2"), sizes, announced):
                if not self.shard and total is not None and sum(sizes_l) != total:
                    raise ValueError(f"{name} yields {sum(sizes_l)} samples over the ranks ({sizes_l}) but "
                                     f"announced {total} (len(dataset)): its batches changed between ranks")
            rows = self._gram(stores, sizes, ckpt)
            self.stats["gram"], clock = time.perf_counter() - clock, time.perf_counter()
            self.stats["gram_cpu"] = time.process_time() - cpu
            k = self._gathered(rows, sizes)
            self.stats.update(gather=time.perf_counter() - clock, communication=comm.waited,
                              sizes=sizes[0], world_size=comm.world)
            return k
        finally:
            self.events.close()
            for feature_store in stores:
                feature_store.close()
            if ckpt is not None:
                ckpt.close()

    def _open_checkpoint(self) -> Optional[Checkpoint]:
        if self.checkpoint is None:
            return None
        rank, world = self.comm.rank, self.comm.world
        folder = Path(self.checkpoint)
        if (folder / "manifest.json").exists():
            raise CheckpointMismatch(f"checkpoint {folder} was made by a single-process run: it cannot be resumed "
                                     "by a distributed one; use another folder, or delete this one to start over")
        others = sorted({int(m.group(1)) for p in (folder.glob("rank-*-of-*") if folder.is_dir() else [])
                         if (m := re.fullmatch(r"rank-\d+-of-(\d+)", p.name)) and int(m.group(1)) != world})
        if others:
            raise CheckpointMismatch(
                f"checkpoint {folder} was made by a run on {others[0]} ranks, this one has {world}: its features "
                f"and blocks of K are split by rank, and a new split would assign other samples to each rank. "
                f"Relaunch with {others[0]} ranks (torchrun --nproc-per-node={others[0]}) to resume, or delete the "
                "folder to start over"
            )
        refuse_foreign(folder, also=lambda name: re.fullmatch(r"rank-\d+-of-\d+", name) is not None)
        identity = dict(self.identity, rank=rank, world_size=world, shard=self.shard)
        # Checkpoint refuses a resume whose computation is partly undecidable without checkpoint_key=.
        return Checkpoint(folder / f"rank-{rank}-of-{world}", identity)

    def _features(self, model, ckpt) -> List[FeatureStore]:
        made = []

        # The Kronecker kind sketches the linear maps from their factors in the extractor's pass.
        structured = "never" if self.projection is None else self.projection.structured

        def extractor():
            if not made:
                made.append(feature_phase.new_extractor(model, self.index, self.output, self.precision, self.device,
                                                        self.request.backend, structured, self.projection))
            return made[0]

        # One KeptRows for both loaders (the same R), dropped with this call's feature phase.
        kept_rows = feature_phase.keep_rows(self.request, self.projection, *(each for each, _, _ in self.loaders))
        fill = dict(cache_dir=self.cache_dir, ckpt=ckpt, events=self.events, extractor=extractor,
                    projection=self.projection, kept_rows=kept_rows)
        stores, signature = [], None
        try:
            for (loader, _, announced), name in zip(self.loaders, ("loader", "loader2")):
                feature_store, own = feature_phase.fill_store(self.request, loader, name, expected_signature=signature, **fill)
                stores.append(feature_store)
                signature = signature or own
                if self.shard and announced is not None and feature_store.samples != announced:
                    raise ValueError(f"rank {self.comm.rank}: {name} yields {feature_store.samples} samples but "
                                     f"announced {announced} (len(dataset)); fix the dataset's __len__")
        except BaseException:
            for feature_store in stores:
                feature_store.close()
            raise
        self.signature = feature_phase.describe(signature)
        return stores

    # ------------------------------------------------------------------ K
    def _gram(self, stores: List[FeatureStore], sizes: List[List[int]], ckpt) -> torch.Tensor:
        comm, rank, world = self.comm, self.comm.rank, self.comm.world
        own_rows, own_cols = stores[0], stores[-1]
        row_sizes, col_sizes = sizes[0], sizes[-1]
        col_offsets = _offsets(col_sizes)
        # One tile height for the schedule and the tiles, read once: the blocks a rank
        # expects from another are cut the way that rank cut them.
        tile_rows = self.tile_rows = settings.tile_rows
        tasks = (symmetric_tasks(rank, world, row_sizes, tile_rows) if self.symmetric
                 else cross_tasks(rank, world, row_sizes))
        rows = torch.empty(row_sizes[rank], col_offsets[-1], dtype=self.precision.k, device=self._k_home(
            row_sizes[rank] * col_offsets[-1]))
        progress = _TaskProgress(self.events, sum(t.row_stop - t.row_start for t in tasks))
        payload = _pack(own_cols, comm.device)
        blocks = []  # (task, block) computed here for another rank's rows
        exchange = self.exchange
        if exchange == "auto":
            exchange = "ring"
        self.stats["exchange"] = exchange
        # Only the transfers are inside comm.phase: an error of the tiles themselves is
        # not a collective's and keeps its own type.
        with comm.phase("gram: feature all_gather"):
            gathered = comm.all_gather_rows(payload, col_sizes) if exchange == "allgather" else None
        held, shift = payload, None
        for step in range(ring_steps(world, self.symmetric)):
            source = (rank - step) % world
            if gathered is not None:
                held = gathered[source]
            elif step + 1 < ring_steps(world, self.symmetric):
                with comm.phase(f"gram: ring step {step + 1}"):
                    shift = comm.ring_shift(held, col_sizes[(source - 1) % world])
            visiting = own_cols if step == 0 else _unpack(held, own_cols, self)
            try:
                for task in (t for t in tasks if t.step == step):
                    block = self._task(task, own_rows, visiting, held, payload, rows, col_offsets, ckpt, progress)
                    if block is not None:
                        blocks.append((task, block))
            finally:
                if visiting is not own_cols:
                    visiting.close()
            if shift is not None:
                with comm.phase(f"gram: ring step {step + 1}"):
                    held, shift = shift.wait(comm.timeout), None
        if self.symmetric and world > 1:
            with comm.phase("gram: blocks to their rows"):
                self._swap(blocks, rows, row_sizes, col_offsets, tile_rows)
        comm.settle("gram", None)
        return rows

    def _k_home(self, entries: int) -> torch.device:
        """Where this rank's rows of K live: the compute device while they take at most half
        its free memory, else host memory (tiles are computed on the device and copied
        there, as for ``out=`` a host tensor in one process). Not yet measured on a GPU."""
        if self.device.type != "cuda":
            return self.device
        need = entries * torch.empty((), dtype=self.precision.k).element_size()
        return self.device if need <= torch.cuda.mem_get_info(self.device)[0] // 2 else torch.device("cpu")

    def _task(self, task: Task, own: FeatureStore, visiting: FeatureStore, visiting_payload, own_payload, rows,
              col_offsets, ckpt, progress) -> Optional[torch.Tensor]:
        """Compute one block; returns it when it belongs (also) to another rank's rows."""
        rank = self.comm.rank
        task_ckpt = None
        if ckpt is not None:
            task_ckpt = Checkpoint(ckpt.folder / task.key, dict(ckpt.identity, block=task.key))
        try:
            c0, c1 = col_offsets[task.col_shard], col_offsets[task.col_shard + 1]
            budget, k_dtype = self.budget, self.precision.k
            if task.diagonal:
                blocked_gram(own, own, True, k_dtype, self.device, rows[:, c0:c1], task_ckpt, progress.of(task),
                             budget, tile_rows=self.tile_rows)
                return None
            if task.row_shard == rank:  # own rows, visiting columns: straight into this rank's rows
                # Only K(X, X) splits a block's rows, and there the rank's rows are the payload it sends.
                first = own if task.row_start == 0 else _unpack(own_payload[task.row_start:task.row_stop], own, self)
                try:
                    out = rows[task.row_start:task.row_stop, c0:c1]
                    blocked_gram(first, visiting, False, k_dtype, self.device, out, task_ckpt, progress.of(task),
                                 budget, tile_rows=self.tile_rows)
                finally:
                    if first is not own:
                        first.close()
                return out if self.symmetric else None
            # K(X, X): the visiting (later) shard's rows against this rank's: a block of the
            # visiting rank's rows, whose transpose is this rank's.
            first = _unpack(visiting_payload[task.row_start:task.row_stop], own, self)
            try:
                block = torch.empty(task.row_stop - task.row_start, own.n, dtype=k_dtype, device=self.device)
                blocked_gram(first, own, False, k_dtype, self.device, block, task_ckpt, progress.of(task), budget,
                             tile_rows=self.tile_rows)
            finally:
                first.close()
            r0 = col_offsets[task.row_shard] + task.row_start
            rows[:, r0:r0 + block.shape[0]].copy_(block.T)
            return block
        finally:
            if task_ckpt is not None:
                task_ckpt.close()

    def _swap(self, blocks, rows, sizes, offsets, tile_rows) -> None:
        """Each block computed for a pair of ranks goes to the other rank of the pair."""
        comm, rank = self.comm, self.comm.rank
        sends = [(t.col_shard if t.row_shard == rank else t.row_shard, b.to(comm.device)) for t, b in blocks]
        expected = [t for other in range(comm.world) if other != rank
                    for t in symmetric_tasks(other, comm.world, sizes, tile_rows)
                    if not t.diagonal and rank in (t.row_shard, t.col_shard)]
        recvs = []
        for t in expected:
            other = t.col_shard if t.row_shard == rank else t.row_shard
            recvs.append((other, torch.empty(t.row_stop - t.row_start, sizes[t.col_shard], dtype=rows.dtype,
                                             device=comm.device), t))
        comm.swap(sends, [(src, buf) for src, buf, _ in recvs])
        for _, block, t in recvs:
            block = block.to(rows.device)
            if t.row_shard == rank:
                rows[t.row_start:t.row_stop, offsets[t.col_shard]:offsets[t.col_shard + 1]].copy_(block)
            else:
                r0 = offsets[t.row_shard] + t.row_start
                rows[:, r0:r0 + block.shape[0]].copy_(block.T)

    def _gathered(self, rows: torch.Tensor, sizes: List[List[int]]):
        comm, row_sizes = self.comm, sizes[0]
        offsets = tuple(_offsets(row_sizes))
        shape = (offsets[-1], rows.shape[1])
        if self.gather == "rows":
            return KShard(rows, offsets[comm.rank], shape, offsets, comm.rank, comm.world, self.symmetric, comm.group)
        with comm.phase(f"gather K ({self.gather})"):
            k = comm.gather_row_shards(rows.to(comm.device), row_sizes, None if self.gather == "all" else 0)
        return None if k is None else k.to(self.device)


def _announced(loader) -> Optional[int]:
    """The samples a loader says it yields, to check against what it does: None when it
    cannot say, or drops its last partial batch (DataLoader(drop_last=True) yields fewer
    than len(dataset) by design)."""
    return None if getattr(loader, "drop_last", False) else loader_length(loader)


def _offsets(sizes: Sequence[int]) -> List[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def _pack(feature_store: FeatureStore, device: torch.device) -> torch.Tensor:
    """A store's rows as bytes [n, row_bytes (+ 4 for the fp16 scale)] on the comm device:
    the store's own memory where it already is that (an unscaled device store on the comm
    device), else copied one tile at a time (a host or disk store is never staged whole)."""
    n = feature_store.n
    if feature_store.kind == "device" and feature_store.device == device and not feature_store.scaled:
        return feature_store.rows(0, n).view(torch.uint8)
    width = feature_store.row_bytes + (4 if feature_store.scaled else 0)
    payload = torch.empty(n, width, dtype=torch.uint8, device=device)
    step = settings.tile_rows  # staging granularity only: any height gives the same bytes
    for i0 in range(0, n, step):
        i1 = min(i0 + step, n)
        block = feature_store.rows(i0, i1)
        try:
            payload[i0:i1, :feature_store.row_bytes].copy_(block.contiguous().view(torch.uint8).reshape(i1 - i0, -1))
        finally:
            feature_store.release(block)
        if feature_store.scaled:
            payload[i0:i1, feature_store.row_bytes:].copy_(
                feature_store.scales(i0, i1).contiguous().view(torch.uint8).reshape(i1 - i0, 4))
    return payload


def _unpack(payload: torch.Tensor, like: FeatureStore, plan: _Plan):
    """The rows of a payload as a store: read in place where they are already on the
    compute device in the store dtype (no copy: one shard-sized buffer less per ring
    step), else copied into a FeatureStore of the run's kind (fp16 with its interleaved
    scales; a gloo group computing on a GPU)."""
    n = payload.shape[0]
    if not like.scaled and payload.device == plan.device and payload.is_contiguous():
        return _BytesStore(payload.view(like.dtype))
    feature_store = FeatureStore(like.p, like.dtype, plan.device, kind=plan.store, max_memory=plan.budget,
                                 cache_dir=plan.cache_dir, scaled=like.scaled, expected_rows=n, name="visiting")
    try:
        if n:
            features = payload[:, :like.row_bytes].contiguous().view(like.dtype).to(plan.device)
            scales = payload[:, like.row_bytes:].contiguous().view(torch.float32).reshape(n) if like.scaled else None
            feature_store.append(features, scales)
        feature_store.samples = n
    except BaseException:
        feature_store.close()
        raise
    return feature_store


class _BytesStore:
    """Received feature rows [n, p] read in place, with the part of FeatureStore's interface
    that ``tiles.blocked_gram`` reads: a device-resident store without scales. Its bytes
    belong to the transfer buffer, which the exchange accounts for, so ``device_bytes`` is 0."""

    kind, scaled, device_bytes = "device", False, 0

    def __init__(self, features: torch.Tensor):
        self._features = features
        self.n = self.samples = features.shape[0]
        self.p, self.dtype, self.device = features.shape[1], features.dtype, features.device
        self.row_bytes = self.p * features.element_size()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self._features[start:stop]

    def release(self, rows: torch.Tensor) -> None:
        pass

    def scales(self, start: int, stop: int) -> None:
        return None

    def close(self) -> None:
        self._features = None


class _TaskProgress:
    """The engine's per-block progress events, summed over this rank's blocks."""

    def __init__(self, events, total: int):
        self.events, self.total, self.done = events, total, 0

    def of(self, task: Task) -> Callable:
        base = self.done
        self.done += task.row_stop - task.row_start

        def event(phase, loader, done, total, resumed):
            self.events("gram", None, base + done, self.total, resumed)

        return event
