"""Builds the extension ``tangent_kernels._C``: the C++ ops, plus their CUDA kernels when
it can. Metadata lives in pyproject.toml; always install with the torch you already have:

    pip install --no-build-isolation -e .      # or: pip install --no-build-isolation .

Environment:
    TANGENT_KERNELS_CUDA=0|1  0: CPU kernels only. 1: require the CUDA kernels (fail
                              with the reason if they cannot be built). Unset: build
                              them when torch has CUDA and nvcc is found.
    CUDA_HOME                 the CUDA toolkit root (found from nvcc when unset).
    TORCH_CUDA_ARCH_LIST      GPU architectures (default here: "8.0;9.0").
    MAX_JOBS                  parallel compile jobs (honoured by torch's ninja build).

Without a compiler the package still imports and runs on its pure-torch path
(e.g. from a source checkout with PYTHONPATH=.), just without the C++/CUDA kernels.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0"  # A100 and H100/H200, the GPUs this project targets

try:
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit(
        "tangent_kernels: building the extension needs torch>=2.4 already installed.\n"
        "Install torch first, then build without isolation so the extension links against it:\n"
        "    pip install torch && pip install --no-build-isolation .\n"
        "(or run `make test`, which sets up a .venv)"
    )


def _log(message: str) -> None:
    print(f"tangent_kernels setup: {message}", file=sys.stderr)


def _toolkit_root_from_nvcc(nvcc: str) -> Optional[str]:
    """The toolkit root behind an nvcc, which may be a wrapper script (as on the project's
    machines: /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc), so that
    dirname(dirname(nvcc)) (torch's guess) would be wrong. nvcc --dryrun prints its own
    TOP=<root> and _HERE_=<bin dir> settings."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60
        )
        text = out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError):
        text = ""
    for key in ("TOP", "_HERE_"):
        match = re.search(rf"^#\$ {key}=(.+)$", text, re.MULTILINE)
        if match:
            path = Path(match.group(1).strip()).resolve()
            root = path.parent if key == "_HERE_" else path
            if (root / "bin").is_dir():
                return str(root)
    guess = Path(os.path.realpath(nvcc)).parent.parent
    return str(guess) if (guess / "include" / "cuda_runtime.h").is_file() else None


def _find_cuda_home() -> Optional[str]:
    """Sets CUDA_HOME (never overriding the user's) before torch.utils.cpp_extension reads it."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for nvcc in candidates:
        if nvcc and os.path.exists(nvcc):
            root = _toolkit_root_from_nvcc(nvcc)
            if root:
                os.environ["CUDA_HOME"] = root
                _log(f"CUDA_HOME={root} (from {nvcc})")
                return root
    return None


def _cuda_wanted() -> bool:
    """Decides whether to compile the CUDA kernels; explains the decision on stderr."""
    setting = os.environ.get("TANGENT_KERNELS_CUDA", "").strip()
    if setting not in ("", "0", "1"):
        sys.exit(f"tangent_kernels: TANGENT_KERNELS_CUDA must be 0 or 1, got {setting!r}")
    if setting == "0":
        _log("TANGENT_KERNELS_CUDA=0: building the CPU kernels only")
        return False
    problem = None
    if torch.version.cuda is None:
        problem = f"the installed torch {torch.__version__} is a CPU-only build"
    elif _find_cuda_home() is None:
        problem = "nvcc was not found (set CUDA_HOME to the CUDA toolkit root or put nvcc on PATH)"
    else:
        nvcc = Path(os.environ.get("CUDA_HOME") or os.environ["CUDA_PATH"]) / "bin" / "nvcc"
        if not nvcc.exists():
            problem = f"CUDA_HOME has no bin/nvcc ({nvcc})"
    if problem is None:
        return True
    if setting == "1":
        sys.exit(f"tangent_kernels: TANGENT_KERNELS_CUDA=1 but the CUDA kernels cannot be built: {problem}. "
                 "On a machine without the CUDA toolkit, build the CPU kernels only: `make test CUDA=0`, or "
                 "TANGENT_KERNELS_CUDA=0 pip install --no-build-isolation .")
    _log(f"building the CPU kernels only: {problem} (TANGENT_KERNELS_CUDA=1 makes this an error)")
    return False


def _nvidia_wheel_includes() -> List[str]:
    """Include dirs of the CUDA math libraries that torch's pip dependencies ship
    (cublas_v2.h, cusparse.h, ... live there, not in a minimal toolkit). CUDA 13 wheels
    put them in nvidia/cu13/include; CUDA 12 wheels in nvidia/<library>/include."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    major = (torch.version.cuda or "").split(".")[0]
    found: List[str] = []
    for base in list(getattr(nvidia, "__path__", [])):
        merged = os.path.join(base, f"cu{major}", "include")
        if major and os.path.isdir(merged):
            found.append(merged)
            continue
        for lib in ("cuda_runtime", "cublas", "cusparse", "cusolver", "curand", "cufft", "nvtx"):
            found.extend(glob.glob(os.path.join(base, lib, "include")))
    return found


def _extensions():
    build_cuda = _cuda_wanted()
    # Imported only now: torch.utils.cpp_extension reads CUDA_HOME at import time.
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = ["csrc/ops.cpp", "csrc/cpu/gram_tile_update.cpp", "csrc/cpu/sampled_grad.cpp"]
    cxx_flags = ["-O3"]
    nvcc_flags = ["-O3", "-lineinfo"]
    if build_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # With no GPU visible torch cannot detect the arch; never override the user's.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        _log(f"building the CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        # -isystem: searched after the toolkit's own -I dirs, so the wheels only fill in
        # headers the toolkit lacks and never shadow its own.
        for include in _nvidia_wheel_includes():
            cxx_flags += ["-isystem", include]
            nvcc_flags += ["-isystem", include]
        sources += ["csrc/cuda/gram_tile_update.cu", "csrc/cuda/sampled_grad.cu"]
        make = CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    else:
        make = CppExtension
        extra = {"cxx": cxx_flags}
    return [
        make(
            name="tangent_kernels._C",
            sources=sources,
            include_dirs=[str(ROOT / "csrc")],
            define_macros=[("TANGENT_KERNELS_PYTHON_MODULE", "1")],
            extra_compile_args=extra,
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


os.chdir(ROOT)  # sources are given relative to the repository root
setup(ext_modules=_extensions(), cmdclass=_cmdclass())
