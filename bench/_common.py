"""What every benchmark script shares: timing with device synchronization, the commit.

The scripts run as ``python bench/<name>.py``, which puts bench/ on sys.path.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import torch


def timed(fn: Callable[[], Any], repeats: int = 1, device: Optional[torch.device] = None,
          warmup: bool = True) -> Tuple[float, Any]:
    """(median seconds over ``repeats`` calls, the last result). ``warmup`` runs ``fn``
    once first, untimed (allocator, tracing, thread pools); CUDA work is synchronized
    around every call so the time is the device's, not the launch's."""
    sync = device is not None and torch.device(device).type == "cuda"
    if warmup:
        fn()
    times, result = [], None
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def commit() -> str:
    """$TANGENT_KERNELS_COMMIT when set (a working tree copied to a GPU machine may carry
    a stale .git), else the checkout's short commit hash, else "unknown"."""
    if os.environ.get("TANGENT_KERNELS_COMMIT"):
        return os.environ["TANGENT_KERNELS_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.check_output(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
