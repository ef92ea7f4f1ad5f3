"""The Gram (and the iterative solvers) on a torch.distributed process group.

    torchrun --nproc-per-node=4 my_script.py      # my_script: init_process_group, then
    K = tk.gram(model, loader, idx)                # every rank: the same loader, the same K

Files: ``schedule.py`` (batches and blocks of K to ranks), ``exchange.py`` (everything
that crosses between ranks, and the errors), ``driver.py`` (the Gram's phases), ``shard.py``
(``KShard``, the rows of K a rank holds), ``solve.py`` (CG and Nesterov on a KShard).
docs/scale.md has the design, what was measured and what is still to do.
"""

from __future__ import annotations

import torch.distributed as dist

from .driver import gram
from .exchange import DistributedError, DistributedMismatch, DistributedTimeout, RankFailed
from .shard import KShard
from .solve import KShardOperator, ShardedSolution, solve

__all__ = ["KShard", "KShardOperator", "ShardedSolution", "solve", "DistributedError", "DistributedMismatch",
           "DistributedTimeout", "RankFailed", "gram",
           "active_group"]


def active_group(group=None, shard: bool = False, gather: str = "all"):
    """What ``tk.gram``'s ``group=`` means here: ``False`` when the call is one process's
    own work, else the group to split it over (None: the default group).

    ``group=None`` splits the work whenever a default process group with more than one
    rank is initialized (so every rank of a torchrun job must call ``tk.gram``);
    ``group=False`` computes the whole K in this process alone."""
    if group is False:
        if shard or gather != "all":
            raise ValueError("group=False computes K in this process alone: shard= and gather= need a process group")
        return False
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return None
    if shard or gather != "all":
        raise ValueError(
            f"shard={shard!r}, gather={gather!r} split K over ranks, but no torch.distributed process group is "
            "initialized here: launch with torchrun and call torch.distributed.init_process_group() first (or pass "
            "group=)"
        )
    return False

