"""Parity with neural-tangents itself (JAX), on an MLP with the same weights.

neural-tangents 0.6.5 imports only with an old JAX, in an environment of its own (see
../shared/ENVIRONMENT.md): point TK_NEURAL_TANGENTS_PYTHON at that environment's python
to run this test; without it the test is skipped and says so. Ran on 2026-12-01 (see
docs/compat.md for the agreement measured).
"""

import json
import os
import subprocess
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from tangent_kernels.compat import neural_tangents as nt
from conftest import rel_err

PYTHON = os.environ.get("TK_NEURAL_TANGENTS_PYTHON")

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import neural_tangents as nt
    data = np.load(sys.argv[1])
    params = [(data["w0"], data["b0"]), (data["w1"], data["b1"])]
    def f(params, x):
        (w0, b0), (w1, b1) = params
        return jnp.tanh(x @ w0 + b0) @ w1 + b1
    out = {}
    for name, trace_axes, diagonal_axes in (("mean", (-1,), ()), ("full", (), ()), ("diagonal", (), (-1,))):
        k = nt.empirical_ntk_fn(f, trace_axes=trace_axes, diagonal_axes=diagonal_axes, vmap_axes=0)(
            data["x1"], data["x2"], params)
        out[name] = np.asarray(k).tolist()
    print(json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.skipif(PYTHON is None, reason="TK_NEURAL_TANGENTS_PYTHON (a python with jax + neural_tangents) is not set")
def test_the_same_kernels_as_neural_tangents(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x1, x2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    np.savez(tmp_path / "net.npz", w0=model[0].weight.detach().numpy().T, b0=model[0].bias.detach().numpy(),
             w1=model[2].weight.detach().numpy().T, b1=model[2].bias.detach().numpy(), x1=x1.numpy(), x2=x2.numpy())
    (tmp_path / "neural_tangents_kernels.py").write_text(SCRIPT)
    done = subprocess.run([PYTHON, str(tmp_path / "neural_tangents_kernels.py"), str(tmp_path / "net.npz")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    for name, trace_axes, diagonal_axes in (("mean", (-1,), ()), ("full", (), ()), ("diagonal", (), (-1,))):
        ours = nt.empirical_ntk_fn(model, trace_axes=trace_axes, diagonal_axes=diagonal_axes)(x1, x2)
        reference = torch.tensor(theirs[name], dtype=torch.float64)
        assert ours.shape == reference.shape, name
        assert rel_err(ours, reference) <= 1e-12, name
