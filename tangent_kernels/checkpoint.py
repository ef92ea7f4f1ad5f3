"""Resumable Gram computations: ``gram(..., checkpoint="dir")``.

The folder holds
- ``manifest.json``: what the run is (a hash of the model's weights, of ``idx``, the
  output, precision, backend, loaders), the per-batch input fingerprints and row counts
  of each finished loader batch, and how many rows of K are finished;
- ``<loader>.features`` / ``<loader>.scales``: the stored feature rows, appended batch
  by batch (raw bytes in the store dtype; fp32 scales for fp16);
- ``K.bin``: K's finished rows (raw, row-major, K's dtype).

Every update is ordered so that a crash at any instant leaves a consistent folder:
data is appended and fsynced first, then the manifest is replaced atomically
(temporary file, fsync, rename). Bytes past what the manifest records are ignored (and
truncated on resume), so a half-written batch or row block is simply recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .data import ModelInputs

__all__ = ["Checkpoint", "CheckpointMismatch", "model_fingerprint", "tensor_fingerprint", "batch_fingerprint"]

_MANIFEST = "manifest.json"
_VERSION = 1
# Elements of each input tensor hashed per batch: enough to tell a shuffled or changed
# batch from the recorded one, cheap next to a forward pass.
_FINGERPRINT_ELEMENTS = 4096


class CheckpointMismatch(ValueError):
    """A checkpoint folder that belongs to a different computation."""


def _hash_bytes(h, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    h = hashlib.sha256()
    _hash_bytes(h, tensor)
    return h.hexdigest()[:32]


def model_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        h.update(name.encode())
        _hash_bytes(h, tensor)
    return h.hexdigest()[:32]


def batch_fingerprint(batch: ModelInputs) -> str:
    """A cheap hash of a batch: shapes, dtypes, and an evenly strided sample of each tensor."""
    h = hashlib.sha256()
    for key, value in list(enumerate(batch.args)) + sorted(batch.kwargs.items()):
        h.update(str(key).encode())
        if isinstance(value, torch.Tensor):
            flat = value.detach().reshape(-1)
            stride = max(1, flat.numel() // _FINGERPRINT_ELEMENTS)
            _hash_bytes(h, flat[::stride])
            h.update(str(tuple(value.shape)).encode())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()[:32]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpoint:
    """One Gram computation's persistent state (see the module docstring)."""

    def __init__(self, folder, identity: Dict[str, Any]):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"checkpoint={str(folder)!r} is a file; give a folder path (it is created if missing)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        manifest_path = self.folder / _MANIFEST
        if manifest_path.exists():
            self.manifest = json.loads(manifest_path.read_text())
            self._check_identity(self.manifest.get("identity", {}))
            self.resumed = True
        else:
            self.manifest = {"version": _VERSION, "identity": identity, "loaders": {}, "k_rows_done": 0, "k_shape": None}
            self._save()
            self.resumed = False

    def _check_identity(self, recorded: Dict[str, Any]) -> None:
        if self.manifest.get("version") != _VERSION:
            raise CheckpointMismatch(
                f"checkpoint {self.folder} has format version {self.manifest.get('version')}, this version "
                f"writes {_VERSION}: delete the folder to start over"
            )
        differs = [key for key in sorted(set(recorded) | set(self.identity)) if recorded.get(key) != self.identity.get(key)]
        if differs:
            details = "; ".join(f"{key}: checkpoint has {recorded.get(key)!r}, this call {self.identity.get(key)!r}" for key in differs)
            raise CheckpointMismatch(
                f"checkpoint {self.folder} was made by a different computation ({details}); use another "
                "folder, or delete this one to start over"
            )

    def _save(self) -> None:
        _write_atomic(self.folder / _MANIFEST, json.dumps(self.manifest, indent=1, sort_keys=True))

    # ------------------------------------------------------------------ features
    def _loader(self, name: str) -> Dict[str, Any]:
        return self.manifest["loaders"].setdefault(name, {"batches": [], "complete": False})

    def recorded_batches(self, name: str) -> List[Tuple[int, str]]:
        return [tuple(b) for b in self._loader(name)["batches"]]

    def loader_complete(self, name: str) -> bool:
        return bool(self._loader(name)["complete"])

    def _paths(self, name: str) -> Tuple[Path, Path]:
        return self.folder / f"{name}.features", self.folder / f"{name}.scales"

    def open_features(self, name: str, row_bytes: int) -> None:
        """Drop bytes past the recorded batches (an interrupted append)."""
        rows = sum(r for r, _ in self.recorded_batches(name))
        for path, width in zip(self._paths(name), (row_bytes, 4)):
            if path.exists() and path.stat().st_size > rows * width:
                with open(path, "rb+") as handle:
                    handle.truncate(rows * width)
                    os.fsync(handle.fileno())

    def read_features(self, name: str, start: int, stop: int, p: int, dtype: torch.dtype, scaled: bool):
        """Recorded feature rows [start, stop) as a CPU tensor (and their scales)."""
        features_path, scales_path = self._paths(name)
        row_bytes = p * torch.empty((), dtype=dtype).element_size()
        raw = np.fromfile(features_path, dtype=np.uint8, count=(stop - start) * row_bytes, offset=start * row_bytes)
        block = torch.from_numpy(raw).view(dtype).view(stop - start, p)
        scales = None
        if scaled:
            scales = torch.from_numpy(np.fromfile(scales_path, dtype=np.float32, count=stop - start, offset=start * 4))
        return block, scales

    def record_batch(self, name: str, block: torch.Tensor, scales: Optional[torch.Tensor], fingerprint: str) -> None:
        features_path, scales_path = self._paths(name)
        with open(features_path, "ab") as handle:
            handle.write(block.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        if scales is not None:
            with open(scales_path, "ab") as handle:
                handle.write(scales.detach().to(torch.float32).cpu().numpy().tobytes())
                handle.flush()
                os.fsync(handle.fileno())
        self._loader(name)["batches"].append([int(block.shape[0]), fingerprint])
        self._save()

    def complete_loader(self, name: str) -> None:
        self._loader(name)["complete"] = True
        self._save()

    # ------------------------------------------------------------------ K
    @property
    def k_rows_done(self) -> int:
        return int(self.manifest["k_rows_done"])

    def start_k(self, shape: Tuple[int, int], dtype: torch.dtype) -> None:
        recorded = self.manifest.get("k_shape")
        if recorded is not None and list(recorded) != list(shape):
            raise CheckpointMismatch(f"checkpoint {self.folder} holds K of shape {recorded}, this call makes {list(shape)}")
        self.manifest["k_shape"], self.manifest["k_dtype"] = list(shape), str(dtype)
        self._save()

    def read_k_rows(self, stop: int, shape: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        itemsize = torch.empty((), dtype=dtype).element_size()
        raw = np.fromfile(self.folder / "K.bin", dtype=np.uint8, count=stop * shape[1] * itemsize)
        return torch.from_numpy(raw).view(dtype).view(stop, shape[1])

    @property
    def k_tile_rows(self) -> Optional[int]:
        """The tile size the last finished row block of K used (None before the first)."""
        return self.manifest.get("k_tile_rows")

    def record_k_rows(self, start: int, rows: torch.Tensor, tile_rows: int) -> None:
        """Rows [start, start + len(rows)) of K are final: persist them, then say so.

        ``tile_rows`` is recorded because a tile's shape changes the summation order
        inside the tile op: a resumed run continues with the tile size the interrupted
        one had reached (e.g. after an out-of-memory halving), so its K is bit-identical."""
        data = rows.detach().cpu().contiguous()
        path = self.folder / "K.bin"
        mode = "rb+" if path.exists() else "wb+"
        with open(path, mode) as handle:
            handle.seek(start * data.shape[1] * data.element_size())
            handle.write(data.view(torch.uint8).numpy().tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        self.manifest["k_rows_done"] = start + data.shape[0]
        self.manifest["k_tile_rows"] = int(tile_rows)
        self._save()
