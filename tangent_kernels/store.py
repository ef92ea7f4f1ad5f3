"""Where feature blocks live between the gradient phase and the Gram phase.

A :class:`FeatureStore` receives feature blocks [B, p] (in the precision's store dtype,
with per-row scales for fp16) as the loader is processed, and hands back row ranges on
the compute device for the Gram tiles. Three tiers, tried in order by ``store="auto"``:

- ``"device"``: on the compute device, while the features fit in ``max_memory``;
- ``"host"``: host memory (pinned when the device is CUDA, so copies to the GPU are
  asynchronous and overlap with the tile GEMMs), while it fits in half of the
  available physical memory;
- ``"disk"``: a file under ``cache_dir``, memory-mapped when read.

The number of samples is often unknown until the loader is exhausted, so a store starts
on the first tier that its estimate allows and *spills* to the next when an append
would exceed the tier's budget (moving what it has). ``device_bytes``/``peak_device_bytes``
account every byte of features resident on the device, staging copies included.
"""

from __future__ import annotations

import os
import math
import tempfile
from pathlib import Path
from typing import List, Optional, Union

from contextvars import ContextVar

import numpy as np
import torch

__all__ = ["FeatureStore", "STORES", "default_max_memory", "available_host_bytes", "recycled_buffers"]

STORES = ("auto", "device", "host", "disk")
_TIERS = ("device", "host", "disk")
# Share of free device memory the default budget takes: the rest is for the model's
# forward/backward, the Gram tiles and the allocator's slack.
_DEVICE_FRACTION = 0.5
# Share of available host memory a host store may take (and a CPU "device" store).
_HOST_FRACTION = 0.5


# tk.Kernel hands the buffers of the stores it drops at the start of a call (their weights
# changed) to the stores that call opens (kept.py): a repeated call opens stores of the same
# shapes, and a fresh buffer pays its page faults again (a 10 MB store: 15% of a repeated
# gram of the benchmark's sampled MLP at n = 512).
recycled_buffers: ContextVar[Optional[list]] = ContextVar("recycled_buffers", default=None)


def _new_buffer(shape, dtype: torch.dtype, device: torch.device, pin: bool) -> torch.Tensor:
    pool = recycled_buffers.get()
    if pool and not pin:
        for i, buffer in enumerate(pool):
            if buffer.shape == shape and buffer.dtype == dtype and buffer.device == device:
                return pool.pop(i)
    return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)


def available_host_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def default_max_memory(device: torch.device) -> int:
    """The default ``max_memory``: half the free memory of ``device`` (host memory for CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * _DEVICE_FRACTION)
    return int(available_host_bytes() * _HOST_FRACTION)


def check_max_memory(max_memory, device: torch.device) -> int:
    if max_memory is None:
        return default_max_memory(device)
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)) or not max_memory > 0 \
            or not math.isfinite(max_memory):
        raise ValueError(f"max_memory must be a positive, finite number of bytes (e.g. 8 * 2**30; None for the "
                         f"default, half the free memory); got {max_memory!r}")
    return int(max_memory)


def check_store(store: str) -> str:
    if store not in STORES:
        raise ValueError(f"store must be one of {', '.join(STORES)}; got {store!r}")
    return store


def _remove_stale_files(folder: Path) -> None:
    """Delete disk-store files left by runs whose process no longer exists (kill -9)."""
    for path in folder.glob("tangent_kernels_*_*.bin"):
        pid = path.name.split("_")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                path.unlink()
            except OSError:
                pass
        except (PermissionError, OSError):  # alive (another user's), or unknowable: leave it
            continue


class FeatureStore:
    """Append-only rows of features [n, p] (+ per-row fp32 scales), readable by row range."""

    def __init__(
        self,
        p: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        kind: str = "auto",
        max_memory: int,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        scaled: bool = False,
        expected_rows: Optional[int] = None,
        name: str = "features",
    ):
        self.p, self.dtype, self.device, self.scaled, self.name = p, dtype, device, scaled, name
        self.max_memory, self.cache_dir = max_memory, cache_dir
        self.row_bytes = p * torch.empty((), dtype=dtype).element_size()
        self.n = 0
        self.device_bytes = 0
        self.peak_device_bytes = 0
        self._scales: List[torch.Tensor] = []
        self._memory: Optional[torch.Tensor] = None  # device or host tier: [capacity, p]
        self._file: Optional[Path] = None  # disk tier
        self._handle = None
        self._map: Optional[np.memmap] = None
        self.fixed = kind != "auto"
        # Held by tk.Kernel for a later call (kept.py): close() leaves it until released.
        self.kept = False
        if kind == "auto":
            estimate = (expected_rows or 1) * self.row_bytes
            kind = next(t for t in _TIERS if self._fits(t, estimate))
        self.kind = kind
        if kind == "disk":
            self._open_file()

    # ------------------------------------------------------------------ budget
    def _fits(self, tier: str, nbytes: int) -> bool:
        if tier == "device":
            return nbytes <= self.max_memory
        if tier == "host":
            # On a CPU device the host is the device: the budget is the same.
            if self.device.type == "cpu":
                return False
            return nbytes <= available_host_bytes() * _HOST_FRACTION
        return True

    def _account(self, delta: int) -> None:
        self.device_bytes += delta
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)

    # ------------------------------------------------------------------ appending
    def append(self, block: torch.Tensor, scales: Optional[torch.Tensor] = None) -> None:
        if block.ndim != 2 or block.shape[1] != self.p or block.dtype != self.dtype:
            raise ValueError(f"feature block of shape {tuple(block.shape)}, {block.dtype}; store holds [*, {self.p}] {self.dtype}")
        rows = block.shape[0]
        needed = (self.n + rows) * self.row_bytes
        if not (self._fits(self.kind, needed) and self._growth_fits(self.n + rows)):
            if self.fixed:
                if self.kind == "device":
                    raise MemoryError(
                        f"store='device': the {self.name} features need {needed / 2**20:.1f} MiB, over "
                        f"max_memory={self.max_memory / 2**20:.1f} MiB; raise max_memory or use "
                        "store='auto' (spills to host memory, then disk)"
                    )
            else:
                later = _TIERS[_TIERS.index(self.kind) + 1 :]
                self._move_to(next(t for t in later if self._fits(t, needed)))
        if self.kind == "disk":
            self._handle.write(block.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._map = None
        else:
            self._reserve(self.n + rows)
            self._memory[self.n : self.n + rows].copy_(block)
        if self.scaled:
            self._scales.append(scales.detach().to(torch.float32).cpu())
        self.n += rows

    @property
    def _capacity(self) -> int:
        return 0 if self._memory is None else self._memory.shape[0]

    def _growth_fits(self, rows: int) -> bool:
        """Growing the device buffer holds the old and the new one at once: both must fit."""
        if self.kind != "device" or self.fixed or rows <= self._capacity:
            return True
        return (self._capacity + rows) * self.row_bytes <= self.max_memory

    def _reserve(self, rows: int) -> None:
        capacity = self._capacity
        if rows <= capacity:
            return
        new_capacity = max(rows, 2 * capacity, 64)
        if self.kind == "device":
            # Never past the budget, and while possible leave room for the old buffer,
            # which is held until its rows are copied.
            budget_rows = self.max_memory // max(self.row_bytes, 1)  # a store of 0 columns (every tensor structured)
            room = budget_rows - capacity if rows <= budget_rows - capacity else budget_rows
            new_capacity = max(rows, min(new_capacity, room))
        old = self._memory
        if self.kind == "device" and old is not None and (capacity + new_capacity) * self.row_bytes > self.max_memory:
            # Both buffers at once would break the budget (a forced device store near its
            # limit; "auto" spills to the next tier instead): the rows wait in host memory.
            old = old[: self.n].cpu()
            self._memory = None
            self._account(-capacity * self.row_bytes)
            capacity = 0
        target = self.device if self.kind == "device" else torch.device("cpu")
        pin = self.kind == "host" and self.device.type == "cuda"
        memory = _new_buffer((new_capacity, self.p), self.dtype, target, pin)
        if self.kind == "device":
            self._account(new_capacity * self.row_bytes)
        if old is not None:
            memory[: self.n].copy_(old[: self.n])
        del old
        if self.kind == "device":
            self._account(-capacity * self.row_bytes)
        self._memory = memory

    def _move_to(self, tier: str) -> None:
        """Move everything to ``tier`` (the data outgrew the current tier's budget)."""
        data = self._memory[: self.n] if self._memory is not None else None
        previous, self.kind, self._memory = self.kind, tier, None
        if tier == "disk":
            self._open_file()
            if data is not None and self.n:
                self._handle.write(data.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif data is not None and self.n:
            self._reserve(self.n)
            self._memory[: self.n].copy_(data)
        del data
        if previous == "device":
            self._account(-self.device_bytes)

    def _open_file(self) -> None:
        folder = Path(self.cache_dir) if self.cache_dir is not None else Path(tempfile.gettempdir())
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"cache_dir={str(folder)!r} is a file; give a folder for the disk store's file")
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_files(folder)
        # The pid in the name lets a later run remove the file of a run that was killed.
        handle, path = tempfile.mkstemp(prefix=f"tangent_kernels_{os.getpid()}_{self.name}_", suffix=".bin",
                                        dir=folder)
        os.close(handle)
        self._file = Path(path)
        self._handle = open(self._file, "wb+")

    # ------------------------------------------------------------------ reading
    def scales(self, start: int, stop: int) -> Optional[torch.Tensor]:
        if not self.scaled:
            return None
        if len(self._scales) > 1:
            self._scales = [torch.cat(self._scales)]
        return self._scales[0][start:stop].to(self.device)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) on the compute device. For host/disk stores this is a staged
        copy: the caller releases it with :meth:`release` so the accounting stays exact."""
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"rows [{start}, {stop}) of a store with {self.n}")
        if self.kind == "device":
            return self._memory[start:stop]
        if self.p == 0:  # no columns (every tensor's Gram from factors): an empty file cannot be mapped
            return torch.empty(stop - start, 0, dtype=self.dtype, device=self.device)
        if self.kind == "host":
            source = self._memory[start:stop]
        else:
            if self._map is None:
                self._handle.flush()
                # copy-on-write: a writable view for torch.from_numpy; the file is never written through it
                self._map = np.memmap(self._file, dtype=np.uint8, mode="c", shape=(self.n * self.row_bytes,))
            raw = torch.from_numpy(np.asarray(self._map[start * self.row_bytes : stop * self.row_bytes]))
            source = raw.view(self.dtype).view(stop - start, self.p)
        staged = source.to(self.device, non_blocking=self.kind == "host")
        self._account((stop - start) * self.row_bytes)
        return staged

    def release(self, rows: torch.Tensor) -> None:
        if self.kind != "device":
            self._account(-rows.shape[0] * self.row_bytes)

    def all_rows(self) -> torch.Tensor:
        return self.rows(0, self.n)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (device or host tier; a disk store's file is not counted)."""
        held = 0 if self._memory is None else self._memory.numel() * self._memory.element_size()
        return held + sum(s.numel() * s.element_size() for s in self._scales)

    def close(self, recycle: Optional[list] = None) -> None:
        """Free what it holds (nothing while ``kept``); ``recycle``: a list its in-memory
        buffer is handed to (recycled_buffers) instead of being freed."""
        if self.kept:
            return
        if recycle is not None and self._memory is not None and self.kind == "device":
            recycle.append(self._memory)
        self._map = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._file is not None and self._file.exists():
            self._file.unlink()
        self._memory = None
        self._account(-self.device_bytes)

    def __del__(self):  # pragma: no cover - best effort: no orphaned cache files
        try:
            self.close()
        except Exception:
            pass
