"""Who computes what: loader batches to ranks, and blocks of K to ranks.

Rows of K are split into one contiguous *shard* per rank, in rank order (rank 0's
samples first), so that K's order is the loader's order. Each rank holds the features
of its own shard for the whole run; the other shards visit it one at a time (a ring)
or all at once (all_gather). A :class:`Task` is one block of K that a rank computes
from its own shard and the visiting one.

Symmetric K(X, X): at ring step s (s = 0 .. W // 2) rank r holds shard v = (r - s) mod W.
Each unordered pair of shards {a, b} is computed once, by the rank that meets it at
the smaller ring distance; at distance W / 2 (even W) both ranks meet the pair at the
same step, and each computes half of its rows. Every block is oriented *lower*: rows
from the later shard, columns from the earlier one (K[R_hi, R_lo]), so its tiles are
the ones a single process computes wherever shard boundaries fall on tile boundaries.
With equal shards every rank computes the same number of entries (``work``), half of
them in W // 2 ring steps, i.e. half the feature traffic of a full rotation.

Cross K(X1, X2): rank r computes its rows K[R1_r, :] against every X2 shard (W steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ..checkpoint import batch_fingerprint
from ..data import to_inputs

__all__ = ["Task", "batch_fingerprints", "split_batches", "symmetric_tasks", "cross_tasks", "ring_steps", "work", "split_rows"]


@dataclass(frozen=True)
class Task:
    """Rows [row_start, row_stop) of shard ``row_shard`` against all of ``col_shard``.

    ``step``: the ring step at which the computing rank holds both shards.
    ``diagonal``: a block on K's diagonal (only its lower triangle is computed, then
    mirrored: row_shard == col_shard and the whole shard's rows).
    """

    step: int
    row_shard: int
    col_shard: int
    row_start: int
    row_stop: int
    diagonal: bool

    @property
    def key(self) -> str:
        """A name for the block, stable across runs (its checkpoint folder)."""
        return f"block-{self.row_shard}-{self.col_shard}-rows-{self.row_start}-{self.row_stop}"


def split_batches(n_batches: int, world: int) -> List[Tuple[int, int]]:
    """Contiguous, balanced ranges of batch indices, one per rank ([start, stop))."""
    return [(r * n_batches // world, (r + 1) * n_batches // world) for r in range(world)]


def split_rows(n: int, tile_rows: int) -> int:
    """Where a block of ``n`` rows shared by two ranks is cut: the middle, moved down to a
    tile boundary when the block spans at least two tiles (the tiles then match a single
    process's)."""
    if n >= 2 * tile_rows:
        return (n // 2) // tile_rows * tile_rows
    return n // 2


def ring_steps(world: int, symmetric: bool) -> int:
    """How many shards a rank holds in turn (its own included)."""
    return world // 2 + 1 if symmetric else world


def symmetric_tasks(rank: int, world: int, sizes: Sequence[int], tile_rows: int) -> List[Task]:
    """The blocks of K(X, X) that ``rank`` computes, in ring order; ``sizes[r]`` is shard r's rows."""
    tasks = [Task(0, rank, rank, 0, sizes[rank], True)]
    for step in range(1, ring_steps(world, True)):
        other = (rank - step) % world
        hi, lo = max(rank, other), min(rank, other)
        if 2 * step < world:
            tasks.append(Task(step, hi, lo, 0, sizes[hi], False))
        elif 2 * step == world:
            # Both ranks of the pair meet it now: the earlier rank computes the first rows.
            cut = split_rows(sizes[hi], tile_rows)
            start, stop = (0, cut) if rank == lo else (cut, sizes[hi])
            if stop > start:
                tasks.append(Task(step, hi, lo, start, stop, False))
    return tasks


def cross_tasks(rank: int, world: int, sizes1: Sequence[int]) -> List[Task]:
    """The blocks K[R1_rank, R2_v] of a cross kernel, one per ring step."""
    return [Task(step, rank, (rank - step) % world, 0, sizes1[rank], False) for step in range(world)]


def work(tasks: Sequence[Task], col_sizes: Sequence[int]) -> int:
    """Entries of K a list of tasks computes (a diagonal block counts its lower triangle)."""
    total = 0
    for t in tasks:
        rows = t.row_stop - t.row_start
        total += rows * (rows + 1) // 2 if t.diagonal else rows * col_sizes[t.col_shard]
    return total


def count_batches(loader, rank: int) -> int:
    """The number of batches every rank's copy of ``loader`` announces (``len``)."""
    try:
        return len(loader)
    except TypeError:
        raise TypeError(
            f"rank {rank}: with every rank passing the same loader, tk.gram assigns batches to ranks by their "
            f"position and needs their number up front, but this {type(loader).__name__} has no len(). Pass a "
            "DataLoader or a list of batches, or give each rank its own share with shard=True"
        ) from None


def batch_fingerprints(loader, inputs, name: str, announced: int, rank: int) -> List[str]:
    """A hash of every batch of ``loader`` as the model sees it (after ``inputs=``)."""
    fingerprints = [batch_fingerprint(to_inputs(batch, inputs)) for batch in loader]
    if len(fingerprints) != announced:
        raise ValueError(
            f"rank {rank}: the {name} yields {len(fingerprints)} batches but announced {announced} (len()): every "
            "rank assigns batches by that number, so it must be exact (an IterableDataset's len() often is not). "
            "Fix the loader's len(), or give each rank its own share with shard=True"
        )
    return fingerprints


class RankBatches:
    """Batches [start, stop) of a loader every rank iterates the same way.

    The batches before ``start`` are iterated past (loaded, not evaluated): cheap for
    tensors; for a loader with costly transforms, give each rank its own share
    (``shard=True``). The last rank iterates to the end, so a loader that yields
    more batches than it announced is caught; one that yields fewer is caught by the
    rank whose range it does not reach. ``expected``: the fingerprint of every batch
    (after ``inputs``) that the ranks agreed on before any work; a batch that differs
    now (a loader that shuffles or augments at every pass) is refused.
    """

    def __init__(self, loader, start: int, stop: int, announced: int, rank: int, last: bool,
                 expected: Optional[Sequence[str]] = None, inputs=None):
        self.loader, self.start, self.stop, self.announced = loader, start, stop, announced
        self.rank, self.last, self.expected, self.inputs = rank, last, expected, inputs

    def __iter__(self):
        seen = 0
        for b, batch in enumerate(self.loader):
            seen = b + 1
            if b >= self.stop and not self.last:
                return
            if self.expected is not None:
                self._check(b, batch)
            if self.start <= b < self.stop:
                yield batch
        if seen < self.stop or (self.last and seen != self.announced):
            raise ValueError(
                f"rank {self.rank}: the loader yields {seen} batches but announced {self.announced} (len()): every "
                "rank assigns batches by that number, so it must be exact (an IterableDataset's len() often is "
                "not). Fix the loader's len(), or give each rank its own share with shard=True"
            )

    def _check(self, b: int, batch) -> None:
        if b >= len(self.expected) or batch_fingerprint(to_inputs(batch, self.inputs)) != self.expected[b]:
            raise ValueError(
                f"rank {self.rank}: batch {b} of the loader differs from the one the ranks compared before the run: "
                "the loader yields other batches each time it is iterated (a DataLoader with shuffle=True, random "
                "transforms). Every rank passing the same loader must see the same batches: use a fixed order and "
                "deterministic transforms, or give each rank its own share with shard=True"
            )
