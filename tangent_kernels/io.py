"""Saving and loading Gram matrices with their metadata.

    tk.save_gram("K.safetensors", K, {"model": "resnet50", "params": 500_000})
    K, meta = tk.load_gram("K.safetensors")

Format: safetensors, one file holding K and a JSON metadata string. Chosen over
.npy + a .json sidecar because one file cannot lose its metadata, over torch.save
because loading runs no pickled code, and over .npz because the file is memory-mapped
on load (a 50,000 x 50,000 fp32 K is 10 GB). numpy, JAX and Rust read it too
(``safetensors.numpy.load_file``). Writes are atomic: a temporary file in the same
folder, fsync, then rename, so an interrupted save never leaves a truncated K.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

__all__ = ["save_gram", "load_gram", "FORMAT"]

FORMAT = "tangent_kernels.gram/1"
_TENSOR = "K"
_META = "tangent_kernels"

PathLike = Union[str, os.PathLike]


def _atomic_target(path: Path):
    """A temporary file beside ``path`` (same filesystem, so the rename is atomic)."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    return Path(tmp)


def save_gram(path: PathLike, K: torch.Tensor, meta: Optional[Dict[str, Any]] = None) -> Path:
    """Write the Gram matrix ``K`` (any 2-D float tensor, or tk.gram's every-logit forms
    [n1, n2, k] / [n1, n2, k, k]) and JSON-serializable ``meta``.

    Returns the path written. The metadata read back by :func:`load_gram` is ``meta``
    plus ``format``, ``shape`` and ``dtype`` entries (which ``meta`` may not set).
    """
    from safetensors.torch import save_file

    if not isinstance(K, torch.Tensor):
        raise TypeError(f"K must be a torch.Tensor; got {type(K).__name__} (use torch.from_numpy for arrays)")
    if K.ndim not in (2, 3, 4) or not K.is_floating_point():
        raise ValueError(f"K must be a 2-D floating-point tensor [n1, n2] (or [n1, n2, k] / [n1, n2, k, k]: "
                         f"output='diagonal' / 'full'); got shape {tuple(K.shape)}, dtype {K.dtype}")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict of JSON-serializable values (or None); got {type(meta).__name__}")
    meta = dict(meta or {})
    reserved = {"format", "shape", "dtype"} & set(meta)
    if reserved:
        raise ValueError(f"meta may not set {sorted(reserved)}: save_gram records them itself")
    meta.update(format=FORMAT, shape=list(K.shape), dtype=str(K.dtype).replace("torch.", ""))
    try:
        text = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"meta must be JSON-serializable (str, numbers, lists, dicts): {error}") from None

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file name such as {path / 'K.safetensors'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_target(path)
    try:
        save_file({_TENSOR: K.detach().to("cpu").contiguous()}, str(tmp), metadata={_META: text})
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_gram(path: PathLike, *, device: Union[str, torch.device] = "cpu") -> Tuple[torch.Tensor, Dict[str, Any]]:
    """(K, meta) from a file written by :func:`save_gram`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Gram file at {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            header = handle.metadata() or {}
            if _META not in header or _TENSOR not in handle.keys():
                raise ValueError(
                    f"{path} is a safetensors file but not one written by tangent_kernels.save_gram "
                    f"(no {_TENSOR!r} tensor with {_META!r} metadata)"
                )
            K = handle.get_tensor(_TENSOR)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a Gram file written by tangent_kernels.save_gram: {error}") from None
    try:
        meta = json.loads(header[_META])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} has unreadable tangent_kernels metadata (not JSON: {error}); "
                         f"the file was not written by save_gram or was altered") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path} has format {found!r}; this version reads {FORMAT!r}")
    if list(K.shape) != meta.get("shape"):
        raise ValueError(f"{path} is inconsistent: K has shape {list(K.shape)}, its metadata says {meta.get('shape')}")
    return K, meta
