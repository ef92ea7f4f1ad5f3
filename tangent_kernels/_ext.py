"""Loading the compiled extension ``tangent_kernels._C``, and ``info()``: which backends
(C++ CPU kernels, CUDA kernels, Triton) are active here, and why one is not.

Importing ``_C`` registers the ``torch.ops.tangent_kernels.*`` ops with the dispatcher;
the module has nothing else in it. Loading never raises: without the extension the
package runs on its pure-torch path, and ``info()`` says why the extension is missing.
Set ``TANGENT_KERNELS_NO_EXT=1`` to skip loading it (tests use this to check that path).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from typing import Any, Dict, Optional

import torch

__all__ = ["info", "extension_loaded", "has_cpu_kernels", "has_cuda_kernels", "extension_error", "BUILD_HINT"]

OP = "tangent_kernels::gram_tile_update"  # the op whose kernels tell what was compiled
BUILD_HINT = "pip install --no-build-isolation -e .  (or `make build`)"

_C: Optional[Any] = None
_error: Optional[str] = None


def _load() -> None:
    global _C, _error
    if os.environ.get("TANGENT_KERNELS_NO_EXT", "") not in ("", "0"):
        _error = "disabled by TANGENT_KERNELS_NO_EXT=1"
        return
    try:
        _C = importlib.import_module("tangent_kernels._C")
    except ModuleNotFoundError as exc:
        if exc.name == "tangent_kernels._C":
            _error = f"extension not built: run `{BUILD_HINT}`"
        else:
            _error = f"extension failed to load ({exc}); rebuild it: `{BUILD_HINT}`"
    except (ImportError, OSError) as exc:
        # e.g. built against another torch or Python: undefined symbols, wrong ABI.
        _error = (
            f"extension failed to load ({type(exc).__name__}: {exc}); it was probably built for "
            f"another torch/Python: rebuild it with `{BUILD_HINT}`"
        )


_load()


def extension_loaded() -> bool:
    """True when ``tangent_kernels._C`` is loaded (its ops are registered)."""
    return _C is not None


def extension_error() -> Optional[str]:
    """Why the extension is not loaded (None when it is)."""
    return _error


def _query_kernel(dispatch_key: str) -> Optional[bool]:
    """Whether the op has a kernel for ``dispatch_key``; None when it cannot be told."""
    try:  # private API (present in torch 1.10 ... 2.14); guarded in case it moves
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(OP, dispatch_key))
    except Exception:
        return None


# Asked once, at load: what was compiled in cannot change afterwards, and plain
# booleans keep the backend choice traceable by torch.compile.
_KERNELS: Dict[str, Optional[bool]] = (
    {key: _query_kernel(key) for key in ("CPU", "CUDA")} if _C is not None else {"CPU": False, "CUDA": False}
)


def _has_kernel(dispatch_key: str) -> Optional[bool]:
    return _KERNELS[dispatch_key] if _C is not None else False


def has_cpu_kernels() -> bool:
    """True when the C++ CPU kernels are loaded."""
    return bool(_has_kernel("CPU"))


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels (a GPU may still be absent)."""
    return bool(_has_kernel("CUDA"))


def _triton_version() -> Optional[str]:
    try:  # the version without importing triton (slow, and it may initialize a driver)
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _triton_entry(triton_version: Optional[str]) -> Dict[str, Any]:
    """The Triton backend's state, from ``tangent_kernels.kernels`` (the Triton ops) when present."""
    interpret = os.environ.get("TRITON_INTERPRET", "") == "1"
    try:
        kernels = importlib.import_module("tangent_kernels.kernels")
    except ImportError as exc:  # a version without Triton kernels, or a broken import
        return {"active": False, "reason": f"no Triton kernels in this installation ({exc})"}
    reason = kernels.unavailable_reason()
    ops = sorted(name for name in getattr(kernels, "__all__", ()) if name.startswith("triton_"))
    if reason is not None:
        return {"active": False, "reason": reason, "ops": ops}
    where = "CPU interpreter (TRITON_INTERPRET=1)" if getattr(kernels, "INTERPRETED", interpret) else "GPU"
    note = f"triton {triton_version} on the {where}"
    return {"active": True, "reason": None, "ops": ops, "note": note}


class Info(dict):
    """``info()``'s result: a plain dict, printed as a short table."""

    def __str__(self) -> str:
        lines = [
            f"tangent_kernels {self['version']}  torch {self['torch']} (CUDA {self['torch_cuda'] or 'none'})  "
            f"triton {self['triton_version'] or 'not installed'}  python {self['python']}",
            f"extension: {self['extension']['path'] if self['extension']['loaded'] else self['extension']['error']}",
        ]
        if self["cuda_devices"]:
            lines.append(f"CUDA devices: {', '.join(self['cuda_devices'])}")
        width = max(len(name) for name in self["backends"])
        for name in self["backends"]:
            entry = self[name]
            state = "active  " if entry["active"] else "inactive"
            detail = entry["reason"] or ""
            if entry.get("note"):
                detail = f"{detail}; {entry['note']}" if detail else entry["note"]
            lines.append(f"  {name:<{width}}  {state}  {detail}".rstrip())
        return "\n".join(lines)


def info() -> Info:
    """What this installation can run, as a dict (printed as a table by ``str``).

    Keys: ``version``, ``torch``, ``torch_cuda``, ``triton_version`` (or None), ``python``,
    ``cuda_devices``, ``extension`` ({loaded, path, error}), and for each backend in
    ``backends`` ("cpp", "cuda", "triton") a dict {active: bool, reason: str or None, ...}
    where ``reason`` says why an inactive backend is off and how to turn it on.
    """
    from .version import __version__

    cuda_visible = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_visible else []

    cpp_active = has_cpu_kernels()
    cpp = {"active": cpp_active, "reason": None if cpp_active else (_error or "the extension has no CPU kernels")}

    compiled = _has_kernel("CUDA")
    if _C is None:
        cuda_reason = _error
    elif compiled is None:
        cuda_reason = "cannot tell whether the CUDA kernels were compiled in (torch dispatcher API changed)"
    elif not compiled:
        cuda_reason = (
            "extension built without CUDA sources (TANGENT_KERNELS_CUDA=0, a CPU-only torch, or no nvcc at "
            "build time); rebuild with TANGENT_KERNELS_CUDA=1 to require them"
        )
    elif not cuda_visible:
        cuda_reason = "CUDA kernels compiled but no CUDA device visible"
    else:
        cuda_reason = None
    cuda = {
        "active": cuda_reason is None,
        "compiled": bool(compiled),
        "reason": cuda_reason,
        "note": "gram_tile_update: backend='auto' uses cuBLAS (torch) on CUDA until the hand-written kernel is measured against it",
    }

    triton_version = _triton_version()
    triton = _triton_entry(triton_version)

    return Info(
        version=__version__,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        triton_version=triton_version,
        python=sys.version.split()[0],
        cuda_devices=devices,
        extension={"loaded": _C is not None, "path": getattr(_C, "__file__", None), "error": _error},
        backends=("cpp", "cuda", "triton"),
        cpp=cpp,
        cuda=cuda,
        triton=triton,
    )
