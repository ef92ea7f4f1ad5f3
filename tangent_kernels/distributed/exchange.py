"""Everything that crosses between ranks, on torch.distributed (gloo, NCCL, ...).

A :class:`Comm` wraps the process group with the phase names and the errors: a failed
or timed-out collective is re-raised naming this rank and the phase; at every phase
boundary the ranks first meet at a barrier (gloo: ``monitored_barrier``, which names
the ranks that did not arrive) and then exchange their status, so an exception on one
rank stops every rank with a message naming the rank that failed, instead of leaving
the others blocked in the next collective until the group's timeout.

Tensors travel as raw bytes (uint8 views): every backend moves uint8, whatever the
feature dtype (gloo has no bfloat16 on every build). Shards of unequal sizes are padded
to the largest for collectives that need equal sizes.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..checkpoint import differing_parts

__all__ = ["Comm", "DistributedError", "DistributedMismatch", "DistributedTimeout", "RankFailed"]


class DistributedError(RuntimeError):
    """A distributed Gram or solve could not proceed (a collective failed)."""


class DistributedTimeout(DistributedError):
    """A rank did not reach a phase (or a collective) in time."""


class RankFailed(DistributedError):
    """Another rank raised an error; this rank stopped with it."""


class DistributedMismatch(ValueError):
    """Ranks were called with arguments that disagree."""


def _is_timeout(error: BaseException) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text or "failed to pass monitoredbarrier" in text


class Comm:
    """One process group, seen from this rank."""

    def __init__(self, group=None, timeout: Optional[float] = None, device: Optional[torch.device] = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        # NCCL moves CUDA tensors only; gloo (and the others) host tensors.
        if self.backend == "nccl":
            device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
            if device.type != "cuda":
                raise ValueError(f"rank {self.rank}: the process group's backend is NCCL, which moves CUDA tensors "
                                 f"only, and this rank computes on {device}: put the model on this rank's GPU "
                                 "(model.to(f'cuda:{local_rank}')), or use a gloo group for CPU ranks")
            self.device = device
        else:
            self.device = torch.device("cpu")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds (or None: the process group's); "
                             f"got {timeout!r}")
        self.timeout = timeout
        self.waited = 0.0  # seconds this rank spent blocked in collectives (not hidden behind compute)

    @contextlib.contextmanager
    def _blocked(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.waited += time.perf_counter() - start

    def global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    # ------------------------------------------------------------------ errors
    @contextlib.contextmanager
    def phase(self, name: str):
        """Collectives inside fail with the rank and phase in their message."""
        try:
            yield
        except (DistributedError, DistributedMismatch):
            raise
        except RuntimeError as error:
            kind = DistributedTimeout if _is_timeout(error) else DistributedError
            raise kind(
                f"rank {self.rank} of {self.world}, phase {name!r}: a collective failed ({type(error).__name__}: "
                f"{' '.join(str(error).split())}). Another rank probably failed or is stuck before this phase: "
                "see that rank's own error; a slow rank needs a longer timeout (timeout= seconds, or "
                "init_process_group(timeout=...))"
            ) from error

    def settle(self, phase: str, error: Optional[BaseException]) -> None:
        """Every rank at the end of ``phase``: raise on all of them if any failed there."""
        with self.phase(phase):
            if self.backend == "gloo":
                kwargs = {} if self.timeout is None else {"timeout": datetime.timedelta(seconds=self.timeout)}
                try:
                    with self._blocked():
                        dist.monitored_barrier(group=self.group, wait_all_ranks=True, **kwargs)
                except RuntimeError as barrier_error:
                    if error is not None:
                        raise error
                    raise DistributedTimeout(
                        f"rank {self.rank} of {self.world}: not every rank reached the end of phase {phase!r} within "
                        f"{f'{self.timeout:g} s' if self.timeout is not None else 'the process group timeout'} "
                        f"({' '.join(str(barrier_error).split())}). The ranks named there are stuck or dead in "
                        f"{phase!r} (a loader that blocks, an infinite loop, a killed process), or never called "
                        "tk.gram: under a process group every rank must call it (group=False keeps a call in "
                        "one process); a slow rank needs a longer timeout= (seconds)"
                    ) from barrier_error
            else:
                with self._blocked():
                    dist.barrier(group=self.group)
            status = None if error is None else f"{type(error).__name__}: {error}"
            statuses = self.all_objects(status)
        if error is not None:
            raise error
        failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
        if failed:
            rank, message = failed[0]
            others = f" (ranks {', '.join(str(r) for r, _ in failed)} failed)" if len(failed) > 1 else ""
            raise RankFailed(f"rank {rank} failed in phase {phase!r}{others}: {message}")

    # ------------------------------------------------------------------ objects
    def all_objects(self, value: Any) -> List[Any]:
        gathered: List[Any] = [None] * self.world
        with self._blocked():
            dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def agree(self, phase: str, record: Dict[str, Any], parts: Optional[Dict[str, Any]] = None) -> None:
        """Refuse (on every rank) when any rank's ``record`` differs from rank 0's, naming
        the field, the ranks, and (from ``parts``: per field, where -> shown value, as
        identity.Fingerprint.parts) what inside it differs. Only a digest of the record
        travels unless the ranks disagree."""
        digest = hashlib.blake2b(repr(sorted(record.items())).encode(), digest_size=16).hexdigest()
        with self.phase(phase):
            if len(set(self.all_objects(digest))) == 1:
                return
            records = self.all_objects((record, parts or {}))
        problems = []
        (first, first_parts) = records[0]
        for r, (other, other_parts) in enumerate(records[1:], start=1):
            for key in sorted(set(first) | set(other)):
                if first.get(key) == other.get(key):
                    continue
                named = differing_parts(first_parts.get(key), other_parts.get(key), "rank 0 has", f"rank {r} has")
                problems.append(f"{key}: {named}" if named else
                                f"{key}: rank 0 has {first.get(key)!r}, rank {r} has {other.get(key)!r}")
        differ = sorted({r for r, (other, _) in enumerate(records) if other != first})
        raise DistributedMismatch(
            f"the ranks were called with different arguments (rank{'s' if len(differ) > 1 else ''} "
            f"{', '.join(map(str, differ))} differ{'' if len(differ) > 1 else 's'} from rank 0: "
            f"{'; '.join(problems[:6])}{'; ...' if len(problems) > 6 else ''}). Every rank must pass the same "
            "model (weights, attributes, hooks, requires_grad), idx, output, projection=, inputs=, precision, backend, loader "
            "layout and, without shard=True, the same batches in the same order: build them the same way on "
            "every rank (the same seed for tk.subsample and for any shuffling, the same checkpoint loaded "
            "before the call)"
        )

    # ------------------------------------------------------------------ tensors
    def all_gather_rows(self, payload: torch.Tensor, sizes: Sequence[int]) -> List[torch.Tensor]:
        """Every rank's payload [sizes[r], width] (uint8), on every rank."""
        width, most = payload.shape[1], max(sizes)
        padded = torch.zeros(most, width, dtype=torch.uint8, device=self.device)
        padded[: payload.shape[0]].copy_(payload)
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        with self._blocked():
            dist.all_gather(gathered, padded, group=self.group)
        return [g[:n] for g, n in zip(gathered, sizes)]

    def ring_shift(self, payload: torch.Tensor, incoming_rows: int) -> "_Shift":
        """Send ``payload`` to the next rank and receive the previous rank's (``incoming_rows``
        rows of the same width), asynchronously: wait() returns the received tensor."""
        received = torch.empty(incoming_rows, payload.shape[1], dtype=torch.uint8, device=self.device)
        nxt, prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        ops = [dist.P2POp(dist.isend, payload, self.global_rank(nxt), self.group),
               dist.P2POp(dist.irecv, received, self.global_rank(prev), self.group)]
        return _Shift(dist.batch_isend_irecv(ops), received, self)

    def swap(self, sends: Sequence[Tuple[int, torch.Tensor]], recvs: Sequence[Tuple[int, torch.Tensor]]) -> None:
        """Point-to-point transfers posted at once (each pair of ranks exchanges at most one
        tensor each way), then waited for."""
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.global_rank(dst), self.group) for dst, t in sends]
        ops += [dist.P2POp(dist.irecv, t, self.global_rank(src), self.group) for src, t in recvs]
        if ops:
            with self._blocked():
                for work in dist.batch_isend_irecv(ops):
                    work.wait() if self.timeout is None else work.wait(datetime.timedelta(seconds=self.timeout))

    def gather_row_shards(self, rows: torch.Tensor, sizes: Sequence[int], dst: Optional[int]) -> Optional[torch.Tensor]:
        """The row shards [sizes[r], m] stacked into [sum(sizes), m]: on every rank
        (dst=None) or on rank ``dst`` only (None elsewhere)."""
        most, m = max(sizes), rows.shape[1]
        padded = torch.zeros(most, m, dtype=rows.dtype, device=self.device)
        padded[: rows.shape[0]].copy_(rows)
        with self._blocked():
            if dst is None:
                gathered = [torch.empty_like(padded) for _ in range(self.world)]
                dist.all_gather(gathered, padded, group=self.group)
            else:
                gathered = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == dst else None
                dist.gather(padded, gathered, dst=self.global_rank(dst), group=self.group)
        if self.rank != dst and dst is not None:
            return None
        return torch.cat([g[:n] for g, n in zip(gathered, sizes)])

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (on the comm device; copied back if it lives elsewhere)."""
        moved = tensor if tensor.device == self.device else tensor.to(self.device)
        with self._blocked():
            dist.all_reduce(moved, group=self.group)
        return tensor if moved is tensor else tensor.copy_(moved)


class _Shift:
    def __init__(self, works, received: torch.Tensor, comm: Comm):
        self.works, self.received, self.comm = works, received, comm

    def wait(self, timeout: Optional[float] = None) -> torch.Tensor:
        with self.comm._blocked():
            for work in self.works:
                if timeout is None:
                    work.wait()
                else:
                    work.wait(datetime.timedelta(seconds=timeout))
        return self.received
