"""tk.gram against neural-tangents' empirical NTK on the same weights, side by side (issue #16).

neural-tangents (0.6.5, JAX 0.4.25) cannot share the project's environment; it runs in a
separate venv (bench/nt_side.py gives the install line), started as a subprocess with
--nt-python. The models: bench_structured's MLP 784-512-512-10 and CNN (two convolutions
and a dense head on 3x16x16), and the issue's MLP 64-256-256-10, each with torch.manual_seed
fixed weights. resnet18 is left out: stax has neither MaxPool (resnet18's stem) nor an
eval-mode BatchNorm (an affine per channel), and its SAME padding differs from torch's
symmetric one at stride 2 (see nt_side.py); each would be a custom layer written here, so
the NT side would no longer be neural-tangents' own model.

The weights (torch's state_dict) and the inputs go to an .npz in a temporary directory,
which bench/nt_side.py loads and converts to stax's layouts. First the layouts are proven
at --check-n samples in float64 (tk precision="fp64", jax x64): every NT K must match tk's
to 1e-10. Then for each model, n in --n and output in --outputs (one: logit 0, K [n, n];
full: every logit, K [n, n, 10, 10]):
- tk: tk.gram(model, [x[i:i + 256] ...], output=0 or "full", progress=False), default
  structured="auto", fp32; a warm-up, then --repeats timed calls;
- NT: one subprocess running NtkImplementation.STRUCTURED_DERIVATIVES and
  JACOBIAN_CONTRACTION (trace_axes=(), vmap_axes=0, x2=None, under jax.jit); the jit
  compilation is excluded (a warm-up call), each of its --repeats ends in block_until_ready;
- tk again, --repeats more, so that a change of the machine's load falls on both sides.
Both sides run --threads threads (default 1: on a shared 2-core machine two OpenMP
threads per process, under others' load, made tk 10-40x slower in a probe). Printed:
median [min, max] of each, the ratio NT / tk (above 1: tk faster), and the relative
Frobenius norm of K_tk - K_nt (<= 1e-4 in fp32). A configuration whose memory estimate
exceeds --memory-gib is skipped and says so (the Jacobian contraction holds the
[n, outputs, p] Jacobian), and so is a Jacobian contraction above --jacobian-max-gflop.
A Markdown table closes the output.

Found on the way (neural-tangents 0.6.5, jax 0.4.25, CPU): the Jacobian contraction under
jax.jit with vmap_axes=0 returned a wrong K for the 64-256-256-10 MLP at n = 256 (1.6e-1
from tk's and from NT's structured K, in every entry; right at n = 128 and 512, right
unjitted or with vmap_axes=None). The row's "vs NT structured" shows such a case: a
Jacobian-contraction K off from both tk's and NT's structured K (which agree) is printed
as NT-SIDE and does not fail the run; any other disagreement with tk does.

    python bench/bench_neural_tangents.py [--nt-python /tmp/ntenv/bin/python] [--n 256,1024]
        [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

from _common import commit
from bench_structured import OUTPUTS, cnn, mlp
import tangent_kernels as tk

NT_SIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nt_side.py")
IMPLS = ("structured", "jacobian")


def mlp_small():
    """Issue #16's MLP 64-256-256-10."""
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, OUTPUTS))


MODELS = {"mlp": (mlp, (784,)), "mlp_small": (mlp_small, (64,)), "cnn": (cnn, (3, 16, 16))}


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tk_gram(model, x, output, precision="fp32"):
    loader = [x[i:i + 256] for i in range(0, x.shape[0], 256)]
    return tk.gram(model, loader, output="full" if output == "full" else 0, progress=False, precision=precision)


def relative_error(K, reference) -> float:
    """||K - reference||_F / ||reference||_F in float64, a block of rows at a time."""
    num = den = 0.0
    for i in range(0, K.shape[0], 64):
        a, b = K[i:i + 64].double(), reference[i:i + 64].double()
        num += float(((a - b) ** 2).sum())
        den += float((b ** 2).sum())
    return (num / den) ** 0.5


def nt_env(threads):
    """The subprocess's environment: CPU JAX, quiet, and the thread count of the tk side
    (one thread: XLA's Eigen pool off)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    if threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                            " intra_op_parallelism_threads=1").strip()
    return env


def run_nt(nt_python, weights, model, n, output, impls, repeats, threads, fp64=False):
    """NT's (result dict, {impl: K as a torch tensor}) from one nt_side.py subprocess."""
    with tempfile.TemporaryDirectory(prefix="nt_side_") as out:
        command = [nt_python, NT_SIDE, "--weights", weights, "--model", model, "--n", str(n), "--output", output,
                   "--impls", ",".join(impls), "--repeats", str(repeats), "--out", out] + (["--fp64"] if fp64 else [])
        done = subprocess.run(command, env=nt_env(threads), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nt_side.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
        with open(os.path.join(out, "result.json")) as handle:
            result = json.load(handle)
        kernels = {impl: torch.from_numpy(np.load(os.path.join(out, f"K_{impl}.npy"))) for impl in impls}
    return result, kernels


def nt_memory(impl, n, output, p):
    """Bytes an implementation is estimated to hold: the Jacobian contraction the
    [n, outputs, p] Jacobian twice (it and its contraction's operand) and K; the
    structured derivatives about three K (measured peaks: nt_peak_rss_gib in the JSON)."""
    k = OUTPUTS if output == "full" else 1
    kernel = n * n * k * k * 4
    return {"jacobian": 2 * n * k * p * 4 + kernel, "structured": 3 * kernel}[impl]


def jacobian_gflop(n, output, p):
    """The Jacobian contraction's multiply-adds, x2: [n k, p] @ [p, n k]."""
    k = OUTPUTS if output == "full" else 1
    return 2 * (n * k) ** 2 * p / 1e9


def summary(times):
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "times": times}


def fmt(entry):
    if entry is None:
        return "skipped"
    return f"{entry['median']:.3f} [{entry['min']:.3f}, {entry['max']:.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nt-python", default=os.environ.get("NT_PYTHON", "/tmp/ntenv/bin/python"),
                        help="the python of the neural-tangents venv")
    parser.add_argument("--n", default="256,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--outputs", default="one,full")
    parser.add_argument("--check-n", type=int, default=8, help="samples of the float64 layout check")
    parser.add_argument("--memory-gib", type=float, default=8.0, help="skip a configuration needing more")
    parser.add_argument("--jacobian-max-gflop", type=float, default=2000.0,
                        help="skip a Jacobian contraction of more (1,100 GFLOP took 48 s a call on one thread)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, and NT's (1: XLA's Eigen pool off; more: XLA takes every core). "
                             "1 by default: on a shared machine two OpenMP threads per process thrash")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget = args.memory_gib * 2 ** 30
    sizes = [int(n) for n in args.n.split(",")]
    header = {"commit": commit(), "torch": torch.__version__, "tangent_kernels": getattr(tk, "__version__", "?"),
              "threads": args.threads, "torch_threads": torch.get_num_threads(), "cpu": cpu_name(), "cores": os.cpu_count(),
              "python": platform.python_version(), "loadavg_start": loadavg()}
    print(header)
    failures, nt_defects, checks, results = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_nt_") as tmp:
        built = {}
        for name in args.models.split(","):
            make, shape = MODELS[name]
            torch.manual_seed(0)
            model = make().eval()
            x = torch.randn(max(sizes + [args.check_n]), *shape)
            weights = os.path.join(tmp, f"{name}.npz")
            arrays = {f"param/{key}": value.detach().numpy() for key, value in model.state_dict().items()}
            np.savez(weights, **arrays, **{f"x/{name}": x.numpy()})
            built[name] = (model, x, weights, sum(q.numel() for q in model.parameters()))

        # The layouts, proven in float64.
        print(f"\nlayout check, n = {args.check_n}, float64 (tk precision='fp64', jax x64): rel. Frobenius error")
        for name, (model, x, weights, p) in built.items():
            for output in args.outputs.split(","):
                reference = tk_gram(model, x[:args.check_n], output, "fp64")
                _, kernels = run_nt(args.nt_python, weights, name, args.check_n, output, IMPLS, 1, args.threads,
                                     fp64=True)
                for impl, K in kernels.items():
                    error = relative_error(K, reference) if K.shape == reference.shape else float("inf")
                    checks.append({"model": name, "output": output, "impl": impl, "error": error,
                                   "shapes": [list(K.shape), list(reference.shape)]})
                    print(f"  {name:>9} {output:>4} {impl:>10}: {error:.1e}")
                    if not error <= 1e-10:
                        failures.append(f"layout check {name} {output} {impl}: {error:.1e} "
                                        f"(shapes {tuple(K.shape)} vs {tuple(reference.shape)})")
        if failures:
            for failure in failures:
                print("FAIL:", failure)
            return 1

        for name, (model, x, weights, p) in built.items():
            print(f"\n{name}: p = {p}")
            for n in sizes:
                xn = x[:n]
                for output in args.outputs.split(","):
                    row = {"model": name, "n": n, "p": p, "output": output, "skipped": {}, "nt": {},
                           "agreement": {}, "loadavg_before": loadavg()}
                    impls = []
                    for impl in IMPLS:
                        need = nt_memory(impl, n, output, p)
                        if need > budget:
                            row["skipped"][impl] = f"needs ~{need / 2**30:.1f} GiB > --memory-gib {args.memory_gib}"
                        elif impl == "jacobian" and jacobian_gflop(n, output, p) > args.jacobian_max_gflop:
                            row["skipped"][impl] = (f"{jacobian_gflop(n, output, p):.0f} GFLOP > --jacobian-max-gflop "
                                                    f"{args.jacobian_max_gflop:.0f}")
                        else:
                            impls.append(impl)
                    tk_gram(model, xn, output)  # warm-up: thread pools, allocator, the cost model's rates
                    tk_times, K_tk = [], None

                    def tk_round():
                        nonlocal K_tk
                        for _ in range(args.repeats):
                            start = time.perf_counter()
                            K_tk = tk_gram(model, xn, output)
                            tk_times.append(time.perf_counter() - start)

                    tk_round()
                    if impls:
                        try:
                            nt_result, kernels = run_nt(args.nt_python, weights, name, n, output, impls, args.repeats,
                                                       args.threads)
                        except RuntimeError as error:
                            nt_result, kernels = None, {}
                            for impl in impls:
                                row["skipped"][impl] = str(error)[-300:]
                        if nt_result is not None:
                            row["nt_peak_rss_gib"] = nt_result["peak_rss_gib"]
                            row["nt_compile_and_first_s"] = nt_result["compile_and_first_s"]
                            header.setdefault("nt", {k: nt_result[k] for k in
                                                     ("jax", "neural_tangents", "numpy", "python", "jax_devices",
                                                      "xla_flags")})
                            for impl, K in kernels.items():
                                row["nt"][impl] = summary(nt_result["times"][impl])
                                agreement = relative_error(K, K_tk) if K.shape == K_tk.shape else float("inf")
                                row["agreement"][impl] = agreement
                            if len(kernels) == 2:  # which side is off, when one is
                                row["nt_structured_vs_jacobian"] = relative_error(kernels["jacobian"],
                                                                                  kernels["structured"])
                            for impl, agreement in row["agreement"].items():
                                if agreement <= 1e-4:
                                    continue
                                message = f"{name} n={n} {output}: NT {impl}'s K differs from tk's by {agreement:.1e}"
                                if (impl == "jacobian" and row["agreement"].get("structured", 1.0) <= 1e-4
                                        and row.get("nt_structured_vs_jacobian", 0.0) > 1e-4):
                                    # tk and NT's structured K agree; NT's own two K do not.
                                    nt_defects.append(message + " and from NT structured's by "
                                                      f"{row['nt_structured_vs_jacobian']:.1e} (an NT-side fault)")
                                else:
                                    failures.append(message)
                            del kernels
                    tk_round()
                    row["tk"] = summary(tk_times)
                    row["loadavg_after"] = loadavg()
                    base = row["tk"]["median"]
                    row["ratio"] = {impl: entry["median"] / base for impl, entry in row["nt"].items()}
                    results.append(row)
                    line = f"  n={n:>5} {output:>4}  tk {fmt(row['tk'])}"
                    for impl in IMPLS:
                        if impl in row["nt"]:
                            line += (f" | NT {impl} {fmt(row['nt'][impl])} = {row['ratio'][impl]:.2f}x tk, "
                                     f"err {row['agreement'][impl]:.1e}")
                            if impl == "jacobian" and "nt_structured_vs_jacobian" in row:
                                line += f" (vs NT structured {row['nt_structured_vs_jacobian']:.1e})"
                        else:
                            line += f" | NT {impl} skipped ({row['skipped'].get(impl)})"
                    print(line + f"  (load {row['loadavg_before']} -> {row['loadavg_after']})", flush=True)
    header["loadavg_end"] = loadavg()
    print("\n| model | n | output | tk (s) | NT structured (s) | NT jacobian contraction (s) "
          "| NT struct. / tk | NT jac. / tk | rel. Frobenius (struct. / jac.) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results:
        cells = [row["model"], str(row["n"]), row["output"], fmt(row["tk"])]
        cells += [fmt(row["nt"].get(impl)) for impl in IMPLS]
        cells += [f"{row['ratio'][impl]:.2f}x" if impl in row["ratio"] else "-" for impl in IMPLS]
        cells.append(" / ".join(f"{row['agreement'][impl]:.1e}" if impl in row["agreement"] else "-"
                                for impl in IMPLS))
        print("| " + " | ".join(cells) + " |")
    print(header)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "layout_check": checks, "results": results, "failures": failures,
                       "nt_defects": nt_defects}, handle, indent=1)
    for defect in nt_defects:
        print("NT-SIDE:", defect)
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
