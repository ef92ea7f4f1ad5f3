"""``KShard``: the rows of K one rank holds (``tk.gram(..., gather="rows")``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import torch

__all__ = ["KShard"]


@dataclass
class KShard:
    """Rows ``[row_start, row_stop)`` of a Gram K of ``shape`` [n1, n2], on this rank.

    rows: [row_stop - row_start, n2], K's dtype, every column (for a symmetric K the
        columns of the other ranks' rows too: ``rows`` is a horizontal slab of K).
    row_offsets: ``row_offsets[r]`` is rank r's first row; ``row_offsets[-1] == n1``.
    rank, world_size: this rank and the group's size; ``group`` the process group
        (None: the default group).
    symmetric: K(X, X) (then ``rows[:, row_start:row_stop]`` is this rank's diagonal block).

    K's row order is the loader's (every rank passed the same loader), or rank 0's
    samples, then rank 1's, ... (``shard=True``).
    """

    rows: torch.Tensor
    row_start: int
    shape: Tuple[int, int]
    row_offsets: Tuple[int, ...]
    rank: int
    world_size: int
    symmetric: bool
    group: Any = field(default=None, repr=False)

    def __post_init__(self):
        if tuple(self.rows.shape) != (self.row_stop - self.row_start, self.shape[1]):
            raise ValueError(f"KShard rows {tuple(self.rows.shape)} do not match rows [{self.row_start}, "
                             f"{self.row_stop}) of K {list(self.shape)}")

    @property
    def row_stop(self) -> int:
        return self.row_offsets[self.rank + 1]

    @property
    def sizes(self) -> Tuple[int, ...]:
        """Rows held by each rank."""
        return tuple(b - a for a, b in zip(self.row_offsets[:-1], self.row_offsets[1:]))

    def diagonal(self) -> torch.Tensor:
        """K's diagonal entries on this rank's rows (K(X, X) only)."""
        if not self.symmetric:
            raise ValueError("diagonal() needs a symmetric K(X, X); this shard is of a cross kernel")
        return self.rows[:, self.row_start:self.row_stop].diagonal()

    def gather(self, dst: Optional[int] = None) -> Optional[torch.Tensor]:
        """The whole K, assembled from every rank's shard: a collective (call it on every
        rank). ``dst=None``: K on every rank; ``dst=r``: on rank r, None elsewhere."""
        from .exchange import Comm

        comm = Comm(self.group, device=self.rows.device)
        with comm.phase("gather K"):
            return comm.gather_row_shards(self.rows.to(comm.device), self.sizes, dst)
