"""Resumable Gram computations: ``gram(..., checkpoint="dir")``.

The folder holds
- ``identity.json``: the itemized fingerprint of the computation (``identity.py``: every
  module attribute, hook, ``requires_grad``, class and global reached), written once, read
  only to name what differs when a resume is refused;
- ``manifest.json``: what the run is (a hash of the model's weights and of everything
  else that decides what it computes, of ``idx``, the output, precision, backend, loaders), the per-batch input
  fingerprints (a hash of every byte), row counts and data checksums of each finished
  loader batch, and how many rows of K are finished with the checksum of each block;
- ``.lock``: held (an OS file lock) by the one run that owns the folder; the OS
  releases it when that process ends, however it ends;
- ``<loader>.features`` / ``<loader>.scales``: the stored feature rows, appended batch
  by batch (raw bytes in the store dtype; fp32 scales for fp16);
- ``K.bin``: K's finished rows (raw, row-major, K's dtype).

A folder that exists, holds anything, and has no manifest was not written by this
library: it is refused, never written into.

Every update is ordered so that a crash at any instant leaves a consistent folder:
data is appended and fsynced first, then the manifest is replaced atomically
(temporary file, fsync, rename). Bytes past what the manifest records are ignored (and
truncated on resume), so a half-written batch or row block is simply recomputed. Data
read back is checked against its recorded checksum: a damaged file raises
``CheckpointCorrupt`` naming it, and is never returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .data import ModelInputs

__all__ = ["Checkpoint", "CheckpointCorrupt", "CheckpointInUse", "CheckpointMismatch", "model_fingerprint",
           "tensor_fingerprint", "batch_fingerprint", "differing_parts", "refuse_foreign"]

_MANIFEST = "manifest.json"
_PARTS = "identity.json"
_LOCK = ".lock"
# What a start leaves before the manifest exists (the lock, the parts, their temporaries).
_BEFORE_MANIFEST = {_LOCK, _PARTS, f".{_PARTS}.tmp", f".{_MANIFEST}.tmp"}
# 2: checksums of every data block, full batch fingerprints, the model's structure.
# 3: the computation's fingerprint covers everything reachable (identity.py), itemized.
_VERSION = 3


class CheckpointMismatch(ValueError):
    """A checkpoint folder that belongs to a different computation."""


class CheckpointCorrupt(ValueError):
    """A checkpoint file that is damaged, truncated or missing: never read as data."""


class CheckpointInUse(RuntimeError):
    """Another run holds the checkpoint folder."""


def _hash_bytes(h, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    t = t.reshape(-1)  # a 0-d tensor (BatchNorm's num_batches_tracked) has no byte view
    # Every byte: one changed element must change the fingerprint (a strided sample
    # missed a single changed value and resumed into a K off by 1e4). blake2b hashes
    # ~1 GB/s, well under a forward pass per byte of input.
    h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")


def data_checksum(raw) -> str:
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    _hash_bytes(h, tensor)
    return h.hexdigest()[:32]


def model_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes, values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        h.update(name.encode())
        _hash_bytes(h, tensor)
    return h.hexdigest()[:32]


def device_checksum(tensor: torch.Tensor) -> bytes:
    """Two weighted sums of every 32-bit word of ``tensor``, computed where it lives (for
    CUDA batches: no copy to the host, which at ~1 GB/s of hashing would cost a fast
    model's batch time several times over).

    Word i is weighted by an odd 64-bit number (two different affine sequences, |1), and
    products and sums wrap modulo 2**64: a change of any one word by d != 0 (|d| < 2**32)
    changes each sum by d * w_i, which is never 0 modulo 2**64 since w_i is odd."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.int32).to(torch.int64)
    index = torch.arange(words.numel(), device=words.device, dtype=torch.int64)
    sums = []
    for a, b in ((0x9E3779B97F4A7C15 - 2**64, 0x632BE59BD9B4E019), (0xC2B2AE3D27D4EB4F - 2**64, 0x165667B19E3779F9)):
        weights = (index * a + b) | 1
        sums.append(int((words * weights).sum()) & 0xFFFFFFFFFFFFFFFF)
    return b"".join(s.to_bytes(8, "little") for s in sums)


def batch_fingerprint(batch: ModelInputs) -> str:
    """A hash of a batch: every byte of every tensor, with shapes and dtypes (CUDA
    tensors through ``device_checksum``, on the device)."""
    h = hashlib.blake2b(digest_size=16)
    for key, value in list(enumerate(batch.args)) + sorted(batch.kwargs.items()):
        h.update(str(key).encode())
        if isinstance(value, torch.Tensor) and value.is_cuda:
            h.update(str((tuple(value.shape), str(value.dtype))).encode())
            h.update(device_checksum(value))
        elif isinstance(value, torch.Tensor):
            _hash_bytes(h, value)
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def differing_parts(first: Optional[Dict[str, str]], second: Optional[Dict[str, str]], first_has: str,
                    second_has: str, most: int = 8) -> str:
    """The items of two itemized fingerprints (identity.Fingerprint.parts) that differ, as
    'act.approximate: checkpoint has 'none', this call 'tanh''; '' when either is missing."""
    if not isinstance(first, dict) or not isinstance(second, dict):
        return ""
    keys = [key for key in sorted(set(first) | set(second)) if first.get(key) != second.get(key)]
    shown = [f"{key}: {first_has} {first.get(key, '(nothing)')}, {second_has} {second.get(key, '(nothing)')}"
             for key in keys[:most]]
    return ", ".join(shown) + (f", and {len(keys) - most} more" if len(keys) > most else "")


def refuse_foreign(folder: Path, also=None) -> None:
    """A folder holding files this library did not write (no manifest) is someone else's:
    never written into. ``also``: a test of other names the library writes there (the
    distributed runs' rank folders)."""
    if not folder.is_dir() or (folder / _MANIFEST).exists():
        return
    foreign = sorted(p.name for p in folder.iterdir()
                     if p.name not in _BEFORE_MANIFEST and not (also is not None and also(p.name)))
    if foreign:
        raise CheckpointMismatch(
            f"checkpoint folder {folder} holds files not written by tangent_kernels (no {_MANIFEST}; it holds "
            f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): it is not a checkpoint and is left "
            "untouched. Give a new or empty folder"
        )


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


def _lock(folder: Path):
    """An exclusive OS lock on ``folder/.lock`` for this process (released by the OS when
    the process ends, so a lock left by a killed run is no obstacle); CheckpointInUse when
    another process, or another open checkpoint in this one, holds it."""
    path = folder / _LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if sys.platform == "win32":  # pragma: no cover - not a platform this project runs on
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        os.close(fd)
        raise CheckpointInUse(
            f"checkpoint {folder} is in use by another run (process {holder}): two runs writing one folder "
            "would interleave their data. Wait for it to finish, or give this run another folder"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _unlock(fd) -> None:
    try:
        if sys.platform != "win32":
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class Checkpoint:
    """One Gram computation's persistent state (see the module docstring). Owns the folder
    (an OS lock) until ``close()``."""

    def __init__(self, folder, identity: Dict[str, Any]):
        if isinstance(folder, str) and not folder.strip():
            raise ValueError("checkpoint='' is not a folder: give a folder path (it is created if missing), "
                             "or checkpoint=None for no checkpoint")
        self.folder = Path(folder)
        self._lock_fd = None
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"checkpoint={str(folder)!r} is a file; give a folder path (it is created if missing)")
        refuse_foreign(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.folder)
        try:
            # ``parts`` (per key of the identity: where -> shown value) only names what differs.
            self.identity = identity
            self.parts = identity.get("parts") or {}
            recorded_identity = {key: value for key, value in identity.items() if key != "parts"}
            manifest_path = self.folder / _MANIFEST
            if manifest_path.exists():
                self.manifest = self._read_manifest(manifest_path)
                self._check_identity(self.manifest.get("identity", {}), recorded_identity)
                self._check_decidable(recorded_identity)
                self.resumed = True
            else:
                _write_atomic(self.folder / _PARTS, json.dumps(self.parts, indent=1, sort_keys=True))
                self.manifest = {"version": _VERSION, "identity": recorded_identity, "loaders": {},
                                 "k_rows_done": 0, "k_shape": None, "k_blocks": []}
                self._save()
                self.resumed = False
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the folder's lock (idempotent)."""
        if self._lock_fd is not None:
            _unlock(self._lock_fd)
            self._lock_fd = None

    def __del__(self):  # a forgotten close() must not hold the folder until exit
        if getattr(self, "_lock_fd", None) is not None:
            self.close()

    def _corrupt(self, what: str, path: Path) -> CheckpointCorrupt:
        return CheckpointCorrupt(f"checkpoint {self.folder}: {what} ({path.name}); delete the folder "
                                 "to start over (its data cannot be trusted)")

    def _read_manifest(self, path: Path) -> Dict[str, Any]:
        try:
            manifest = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError, OSError) as error:
            raise self._corrupt(f"the manifest cannot be read ({type(error).__name__}: {error})", path) from None
        if not isinstance(manifest, dict):
            raise self._corrupt("the manifest is not a JSON object", path)
        if manifest.get("version") != _VERSION:
            raise CheckpointMismatch(
                f"checkpoint {self.folder} has format version {manifest.get('version')}, this version "
                f"writes {_VERSION}: delete the folder to start over"
            )
        expected = {"identity": dict, "loaders": dict, "k_rows_done": int, "k_blocks": list}
        for key, kind in expected.items():
            if not isinstance(manifest.get(key), kind):
                raise self._corrupt(f"the manifest's {key!r} is missing or malformed", path)
        for name, loader in manifest["loaders"].items():
            batches = loader.get("batches") if isinstance(loader, dict) else None
            if not isinstance(batches, list) or not all(isinstance(b, list) and len(b) == 4 for b in batches):
                raise self._corrupt(f"the manifest's record of {name!r} is malformed", path)
        return manifest

    def _check_identity(self, recorded: Dict[str, Any], identity: Dict[str, Any]) -> None:
        differs = [key for key in sorted(set(recorded) | set(identity)) if recorded.get(key) != identity.get(key)]
        if differs:
            recorded_parts = self._recorded_parts()
            details = []
            for key in differs:
                named = differing_parts(recorded_parts.get(key), self.parts.get(key), "checkpoint has", "this call")
                details.append(f"{key}: {named}" if named else
                               f"{key}: checkpoint has {recorded.get(key)!r}, this call {identity.get(key)!r}")
            raise CheckpointMismatch(
                f"checkpoint {self.folder} was made by a different computation ({'; '.join(details)}); use another "
                "folder, or delete this one to start over"
            )

    def _recorded_parts(self) -> Dict[str, Any]:
        try:
            parts = json.loads((self.folder / _PARTS).read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return {}  # only names what differs: the manifest's digests decide
        return parts if isinstance(parts, dict) else {}

    def _check_decidable(self, identity: Dict[str, Any]) -> None:
        undecidable = identity.get("undecidable") or []
        if undecidable and identity.get("checkpoint_key") is None:
            raise CheckpointMismatch(
                f"checkpoint {self.folder}: part of what this run computes cannot be fingerprinted "
                f"({'; '.join(undecidable[:5])}{'; ...' if len(undecidable) > 5 else ''}), so resuming could mix "
                "the results of two different computations. Name the run with checkpoint_key='...' (the same key "
                "on every resume of it, a new key whenever the model or output changes), or delete the folder "
                "to start over"
            )

    def _save(self) -> None:
        _write_atomic(self.folder / _MANIFEST, json.dumps(self.manifest, indent=1, sort_keys=True))

    # ------------------------------------------------------------------ features
    def _loader(self, name: str) -> Dict[str, Any]:
        return self.manifest["loaders"].setdefault(name, {"batches": [], "complete": False})

    def recorded_batches(self, name: str) -> List[Tuple[int, str]]:
        """(rows, input fingerprint) of each finished batch of loader ``name``."""
        return [(int(b[0]), b[1]) for b in self._loader(name)["batches"]]

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

    def read_features(self, name: str, batch: int, start: int, stop: int, p: int, dtype: torch.dtype,
                      scaled: bool):
        """Recorded feature rows [start, stop) of batch ``batch`` as a CPU tensor (and their
        scales), checked against the checksums recorded with them."""
        features_path, scales_path = self._paths(name)
        row_bytes = p * torch.empty((), dtype=dtype).element_size()
        _, _, features_sum, scales_sum = self._loader(name)["batches"][batch]
        raw = self._read_checked(features_path, start * row_bytes, (stop - start) * row_bytes, features_sum,
                                 f"feature rows {start}..{stop - 1} of {name}")
        # An empty buffer (p = 0: every tensor's Gram from factors) cannot be viewed as another dtype.
        block = torch.from_numpy(raw).view(dtype).view(stop - start, p) if raw.size else \
            torch.empty(stop - start, p, dtype=dtype)
        scales = None
        if scaled:
            raw = self._read_checked(scales_path, start * 4, (stop - start) * 4, scales_sum,
                                     f"the fp16 scales of rows {start}..{stop - 1} of {name}")
            scales = torch.from_numpy(raw).view(torch.float32)
        return block, scales

    def _read_checked(self, path: Path, offset: int, count: int, checksum: str, what: str) -> np.ndarray:
        if not path.is_file():
            raise self._corrupt(f"{what}: the data file is missing", path)
        raw = np.fromfile(path, dtype=np.uint8, count=count, offset=offset)
        if raw.size != count:
            raise self._corrupt(f"{what}: the data file is truncated ({raw.size} of {count} bytes)", path)
        if data_checksum(raw) != checksum:
            raise self._corrupt(f"{what}: the data do not match their checksum (the file was changed or damaged)",
                                path)
        return raw

    def record_batch(self, name: str, block: torch.Tensor, scales: Optional[torch.Tensor], fingerprint: str) -> None:
        features_path, scales_path = self._paths(name)
        raw = block.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1)
        with open(features_path, "ab") as handle:
            handle.write(raw.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        scales_sum = None
        if scales is not None:
            raw_scales = scales.detach().to(torch.float32).cpu().numpy().view(np.uint8).reshape(-1)
            with open(scales_path, "ab") as handle:
                handle.write(raw_scales.tobytes())
                handle.flush()
                os.fsync(handle.fileno())
            scales_sum = data_checksum(raw_scales)
        self._loader(name)["batches"].append([int(block.shape[0]), fingerprint, data_checksum(raw), scales_sum])
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
        """K's finished rows [0, stop), each recorded block checked against its checksum."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        row_bytes = shape[1] * itemsize
        blocks = []
        for start, end, checksum in self.manifest["k_blocks"]:
            if end > stop:
                break
            blocks.append(self._read_checked(self.folder / "K.bin", start * row_bytes, (end - start) * row_bytes,
                                             checksum, f"rows {start}..{end - 1} of K"))
        raw = np.concatenate(blocks) if blocks else np.empty(0, dtype=np.uint8)
        if raw.size != stop * row_bytes:
            raise self._corrupt(f"the manifest records {stop} rows of K but checksums for {raw.size // max(row_bytes, 1)}",
                                self.folder / _MANIFEST)
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
        raw = data.view(torch.uint8).numpy().reshape(-1)
        path = self.folder / "K.bin"
        mode = "rb+" if path.exists() else "wb+"
        with open(path, mode) as handle:
            handle.seek(start * data.shape[1] * data.element_size())
            handle.write(raw.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        self.manifest["k_blocks"] = [b for b in self.manifest["k_blocks"] if b[1] <= start]
        self.manifest["k_blocks"].append([start, start + data.shape[0], data_checksum(raw)])
        self.manifest["k_rows_done"] = start + data.shape[0]
        self.manifest["k_tile_rows"] = int(tile_rows)
        self._save()
