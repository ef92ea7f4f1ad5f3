"""bench/sketch_accuracy.py: its --quick run (tables, figure, JSON), and the shortcut it
takes for the dense kinds (Projection.project on the exact features, the smaller dims as
the first columns of the largest) against tk.features(projection=) at each dim."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

import tangent_kernels as tk
from conftest import rel_err
from tangent_kernels import demo

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "sketch_accuracy.py"


def _script():
    spec = importlib.util.spec_from_file_location("sketch_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dense_shortcut_is_tk_features_with_the_projection():
    script = _script()
    torch.manual_seed(0)
    model, x = demo.digits_cnn().eval(), demo.load_digits_split(0)[0][:6]
    G = tk.features(model, [x], progress=False)
    for kind in script.DENSE:
        got = script.sketched_features(model, x, G, kind, (64, 256), seed=3)
        for dim, F in got.items():
            expected = tk.features(model, [x], progress=False, projection=tk.Projection(dim, kind, seed=3))
            # float32 products summed in another order (and sqrt(256 / 64) = 2 exact)
            assert rel_err(F, expected) <= 1e-5, (kind, dim)


def test_quick_run_writes_the_tables_and_the_figure(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    figure, table, data = tmp_path / "f.png", tmp_path / "t.md", tmp_path / "r.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--figure", str(figure), "--table", str(table),
                             "--json", str(data)], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text, results = table.read_text(), json.loads(data.read_text())
    kinds = _script().accepted_kinds()
    assert {r["kind"] for r in results["errors"]} == set(kinds) and {"gaussian", "rademacher"} <= set(kinds)
    assert {r["model"] for r in results["errors"]} == {"digits CNN", "small BERT"}
    for r in results["errors"]:
        assert len(r["errors"]) == 2 and all(math.isfinite(e) and 0 < e < 1 for e in r["errors"])
        assert f"| {r['model']} |" in text
    # The dense kinds' error falls as 1/sqrt(dim): 1,024 columns against 256 halve it, far
    # beyond two seeds' spread. The Kronecker kind's falls as about dim^(-1/4) (R_in and R_out
    # each get sqrt(dim) columns: docs/sketch.md), which two seeds do not resolve.
    for kind in set(kinds) & {"gaussian", "rademacher"}:
        for model in ("digits CNN", "small BERT"):
            mean = {r["dim"]: r["mean"] for r in results["errors"] if r["kind"] == kind and r["model"] == model}
            assert mean[1024] < mean[256], (kind, model, mean)
    methods = {r["method"] for r in results["ridge"]}
    assert {"uniform subsample", "exact (every parameter)"} | {f"projection, {k}" for k in kinds} == methods
    assert all(0.5 < r["test"] <= 1 and 0 <= r["ood"] <= 1 for r in results["ridge"])
