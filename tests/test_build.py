"""The build: what `info()` reports, that the CI configuration really built what it
expects (a silently dropped CUDA build must fail CI), and that the package works with
the extension absent (pure-torch path)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tangent_kernels
from tangent_kernels import _ext

# Set by `make test`: "cuda" (extension with CUDA kernels), "cpp" (CPU kernels only).
EXPECT_BUILD = os.environ.get("TANGENT_KERNELS_EXPECT_BUILD", "")
ROOT = Path(__file__).resolve().parents[1]


def test_info_reports_every_backend():
    info = _ext.info()
    assert isinstance(info, dict)
    assert info["torch"] == torch.__version__
    assert info["version"] == tangent_kernels.__version__
    for backend in ("cpp", "cuda", "triton"):
        entry = info[backend]
        assert isinstance(entry["active"], bool)
        # an inactive backend says why
        assert entry["active"] or entry["reason"], f"{backend} is inactive without a reason"
    assert info["cpp"]["active"] == _ext.extension_loaded()
    if not torch.cuda.is_available():
        assert not info["cuda"]["active"]
    text = str(info)
    for word in ("cpp", "cuda", "triton", torch.__version__):
        assert word in text


@pytest.mark.skipif(EXPECT_BUILD not in ("cpp", "cuda"),
                    reason="TANGENT_KERNELS_EXPECT_BUILD is not set (`make test` sets it)")
def test_ci_build_is_complete():
    info = _ext.info()
    assert info["extension"]["loaded"], f"tangent_kernels._C did not load: {info['extension']['error']}"
    assert info["cpp"]["active"], info["cpp"]["reason"]
    # the extension is the one in this checkout (the editable install put it beside the sources)
    assert Path(info["extension"]["path"]).parent == Path(tangent_kernels.__file__).parent
    if EXPECT_BUILD == "cuda":
        assert info["cuda"]["compiled"], (
            f"the CUDA kernels were not compiled in: {info['cuda']['reason']} "
            "(rebuild with TANGENT_KERNELS_CUDA=1 to see why)")
        if not torch.cuda.is_available():
            assert info["cuda"]["reason"] == "CUDA kernels compiled but no CUDA device visible"


@pytest.mark.skipif(EXPECT_BUILD not in ("cpp", "cuda"),
                    reason="TANGENT_KERNELS_EXPECT_BUILD is not set (`make test` sets it)")
def test_ci_build_has_the_sampled_gradient_kernels():
    """Every sampled-gradient op has its kernel for each device the build targets."""
    from tangent_kernels import ops

    assert ops.has_sampled_kernels("cpu"), "csrc/cpu/sampled_grad.cpp was not compiled in"
    if EXPECT_BUILD == "cuda":
        assert ops.has_sampled_kernels("cuda"), "csrc/cuda/sampled_grad.cu was not compiled in"


NO_EXT_SCRIPT = textwrap.dedent("""
    import torch
    import tangent_kernels as tk
    from tangent_kernels import _ext, ops

    info = _ext.info()
    assert not info["extension"]["loaded"] and not info["cpp"]["active"], info
    assert "TANGENT_KERNELS_NO_EXT" in info["cpp"]["reason"], info["cpp"]["reason"]
    assert not hasattr(torch.ops.tangent_kernels, "gram_tile_update")
    # Triton's tile kernel needs no extension (listed on CPU only under TRITON_INTERPRET=1)
    assert [b for b in ops.available_tile_backends("cpu") if b != "triton"] == ["torch"]

    K = torch.zeros(3, 3)
    A = torch.arange(6.0).view(3, 2)
    ops.gram_tile_update(K, A, A, 0, 0, lower=True)   # auto -> torch
    assert torch.equal(K, torch.tril(A @ A.T)), K
    try:
        ops.gram_tile_update(K, A, A, backend="cpp")
    except RuntimeError as error:
        assert "needs the compiled extension" in str(error), error
    else:
        raise AssertionError("backend='cpp' without the extension did not raise")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    x = torch.randn(6, 4)
    K = tk.gram(model, [x], progress=False)
    K_ref = tk.reference.gram_autograd(model, [x])
    assert torch.allclose(K.double(), K_ref, rtol=1e-5, atol=1e-7), (K, K_ref)
    print(info)
""")


def test_package_works_without_extension():
    env = dict(os.environ, TANGENT_KERNELS_NO_EXT="1")
    result = subprocess.run([sys.executable, "-c", NO_EXT_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "disabled by TANGENT_KERNELS_NO_EXT=1" in result.stdout
