"""Running a function on W gloo CPU processes, as PyTorch's own distributed tests do:
``multiprocessing`` spawn, a ``FileStore`` rendezvous in the test's tmp_path.

Each rank runs ``scenario(rank, world, *args)`` (a module-level function, so the
spawned interpreter can import it) and its return value (or the exception it raised,
as text) is saved for the parent, which asserts. Tiles are set to 4 rows in every rank
(``tuning.settings.tile_rows``) so that 40 samples make several tiles and several blocks.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

TILE_ROWS = 4


def _worker(rank: int, world: int, store: str, out: str, module: str, name: str, args, pg_timeout: float) -> None:
    import importlib

    import torch.distributed as dist

    torch.set_num_threads(1)  # W processes on a 2-core machine: no oversubscription
    from tangent_kernels import tuning

    tuning.settings.tile_rows = TILE_ROWS
    scenario = getattr(importlib.import_module(module), name)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=pg_timeout))
    try:
        result = scenario(rank, world, *args)
    except BaseException as error:  # the parent asserts on it
        result = {"error": f"{type(error).__name__}: {error}"}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def spawn(world: int, scenario, tmp_path: Path, *args, timeout: float = 180, pg_timeout: float = 60
          ) -> List[Optional[Dict[str, Any]]]:
    """Each rank's result (None for a rank that died without one)."""
    run = tmp_path / f"run-{uuid.uuid4().hex[:8]}"
    run.mkdir()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(run / "store"), str(run), scenario.__module__,
                                                 scenario.__name__, args, pg_timeout)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:  # past the deadline: a hang is a failure, not a stuck CI job
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join()
    results = []
    for r in range(world):
        path = run / f"rank{r}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else None)
    return results


# --- the problem the distributed test modules share -------------------------------------------------

def mlp_problem():
    """A seeded MLP, 40 samples in batches of 8, 13 more in batches of 5: (model, X, batches, batches2)."""
    from _models import mlp

    torch.manual_seed(0)
    model = mlp()
    X = torch.randn(40, 6)
    X2 = torch.randn(13, 6)
    return model, X, list(X.split(8)), list(X2.split(5))


def uneven_share(rank: int, world: int):
    """Rank r's own samples (5 + 3 r of them) of one fixed set, and the whole set."""
    sizes = [5 + 3 * r for r in range(world)]
    X = torch.randn(sum(sizes), 6, generator=torch.Generator().manual_seed(2))
    start = sum(sizes[:rank])
    return X[start:start + sizes[rank]], X


def error_of(fn):
    """What ``fn()`` raised, as "Type: message" (a rank returns it to the parent), or None."""
    try:
        fn()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None

