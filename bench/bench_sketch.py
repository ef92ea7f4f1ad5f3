"""Sketched eNTK features (tk.Projection, docs/sketch.md) against per-sample gradients
followed by a projection, time and memory, in one run.

--part cnn: a 0.42M-parameter CNN (three stride-2 convolutions 3-32-64-128 on 3x32x32, a
dense head 2048-160-10), all parameters, dim 2,048, n = 64 in one batch, CPU, one thread:
- tk kronecker (and with --dense gaussian, rademacher): tk.features(model, [x], projection=...)
  [64, 2048];
- torch.func + Gaussian: vmap(grad) per-sample gradients of logit 0 (all tensors, [64, p]),
  then a blockwise Gaussian projection (torch.randn blocks of R of 2^21 entries from a
  seeded generator, accumulated: R never whole; the same R kind, not the same numbers);
- train step: forward, cross-entropy, backward and an SGD step on the same 64 samples (the
  gradients freed after it, so that its peak holds them).
Each method is timed --repeats times after a warm-up, round-robin; the ratio to torch.func
+ Gaussian is per repeat (the machine is shared: a ratio from the same round counts).
Each sketch's K~ is compared with the exact K (from torch.func's gradients): relative
Frobenius error. Memory: each method in a fresh process (MALLOC_MMAP_THRESHOLD_=65536, so
that freed buffers leave the resident set), after one warm-up call the peak resident set
(/proc VmHWM, reset through /proc/self/clear_refs) above the resident set before the call.
Margins asserted: tk kronecker >= 5x torch.func + Gaussian, its memory < 2x the train step's.

--part resnet: torchvision's resnet18 (num_classes=10) on 3x32x32, all 11.2M parameters,
dim 4,096, n = 8 (--n-resnet), CPU, one thread: tk kronecker against TRAK's BasicProjector
(traker 0.3.2, normal, its block loop) applied to torch.func's per-sample gradients. TRAK's
projector generates R [p, block_size] per block of columns and multiplies: on this CPU a
whole run (4096 / block_size blocks of 11.2M x block_size normals) takes minutes, so one
block is timed (generation and product, as its project() runs it) and the total given as
that time x the number of blocks (said so in the output); its memory is measured on one
block, which is its steady state. The dense kinds of tk generate p x dim = 46e9 entries
of R here: not run (the same order of time as TRAK's).

    python bench/bench_sketch.py [--part cnn|resnet|all] [--dense] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from _common import commit
import tangent_kernels as tk

DIM_CNN, DIM_RESNET = 2048, 4096
SPLIT = []  # (torch.func seconds, TRAK block seconds) per call of the resnet baseline
_SLICE = 1 << 21


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(128 * 4 * 4, 160), nn.ReLU(), nn.Linear(160, 10),
    ).eval()


def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def inputs(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def per_sample_gradients(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[n, p] gradients of logit 0, every parameter, torch.func (vmap of grad)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def logit(p, sample):
        return functional_call(model, (p, buffers), (sample[None],))[0, 0]

    grads = vmap(grad(logit), in_dims=(None, 0))(params, x)
    return torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], dim=1)


def gaussian_blockwise(g: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """g [n, p] @ R [p, dim], R N(0, 1/dim) drawn block by block (2^21 entries), never whole."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros(g.shape[0], dim)
    step = max(1, _SLICE // dim)
    for a in range(0, g.shape[1], step):
        r = torch.randn(min(step, g.shape[1] - a), dim, generator=generator).mul_(dim ** -0.5)
        out.addmm_(g[:, a:a + step], r)
    return out


def train_step(model: nn.Module, x: torch.Tensor):
    model = model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    labels = torch.arange(x.shape[0]) % 10

    def step():
        nn.functional.cross_entropy(model(x), labels).backward()
        optimizer.step()
        # Freed after the step, not before the next: the step's peak then holds its gradients.
        optimizer.zero_grad(set_to_none=True)
    return step


def methods(part: str, n: int, dense: bool = False):
    """name -> a no-argument callable, for a part; built fresh (a child process builds its own)."""
    model = cnn() if part == "cnn" else resnet18()
    x = inputs(n)
    dim = DIM_CNN if part == "cnn" else DIM_RESNET
    found = {}
    kinds = ("kronecker", "gaussian", "rademacher") if part == "cnn" and dense else ("kronecker",)
    for kind in kinds:
        projection = tk.Projection(dim, kind=kind, seed=0)
        found[f"tk {kind}"] = lambda p=projection: tk.features(model, [x], projection=p, progress=False)
    if part == "cnn":
        found["torch.func + Gaussian"] = lambda: gaussian_blockwise(per_sample_gradients(model, x), dim)
        found["train step"] = train_step(cnn(), x)
    else:
        from trak.projectors import BasicProjector, ProjectionType

        p = sum(t.numel() for t in model.parameters())
        block = int(os.environ.get("BENCH_TRAK_BLOCK", "100"))  # TRAK's default block_size

        def trak_block():
            # One of TRAK's blocks: proj_dim = block_size makes its __init__ generate the block
            # and project() one product; the gradients' and the block's times are kept apart.
            start = time.perf_counter()
            g = per_sample_gradients(model, x)
            middle = time.perf_counter()
            projector = BasicProjector(p, block, 0, ProjectionType.normal, torch.device("cpu"), block_size=block)
            out = projector.project(g, model_id=0)
            SPLIT.append((middle - start, time.perf_counter() - middle))
            return out
        found["torch.func + TRAK BasicProjector, one block"] = trak_block
        found["train step"] = train_step(resnet18(), x)
    return found


def _resident() -> tuple:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def child(part: str, name: str, n: int) -> None:
    torch.set_num_threads(1)
    fn = methods(part, n, dense=True)[name]
    if "TRAK" not in name:  # TRAK's block is the same allocation every call: no warm-up needed (16 s)
        fn()  # warm-up: the allocator's, tk's plan and the optimizer's state
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak resident set starts again from the current one
    before, _ = _resident()
    fn()
    _, peak = _resident()
    print(json.dumps({"peak_bytes": peak - before}))


def peak_memory(part: str, name: str, n: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", part, name, "--n", str(n)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def run_part(part: str, n: int, repeats: int, dense: bool) -> dict:
    found = methods(part, n, dense)
    times = {name: [] for name in found}
    results = {}
    for name, fn in found.items():
        results[name] = fn()  # warm-up
    for _ in range(repeats):
        for name, fn in found.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    memory = {name: peak_memory(part, name, n) for name in found}
    report = {"part": part, "n": n, "dim": DIM_CNN if part == "cnn" else DIM_RESNET, "repeats": repeats,
              "p": sum(t.numel() for t in (cnn() if part == "cnn" else resnet18()).parameters()), "methods": {}}
    baseline = "torch.func + Gaussian" if part == "cnn" else "torch.func + TRAK BasicProjector, one block"
    exact = None
    if part == "cnn":
        g = per_sample_gradients(cnn(), inputs(n)).double()
        exact = g @ g.T
    for name in found:
        entry = {"seconds_median": statistics.median(times[name]), "seconds": times[name],
                 "peak_bytes": memory[name]}
        if part == "cnn":
            entry["ratio_to_baseline"] = [b / t for b, t in zip(times[baseline], times[name])]
            if name.startswith("tk") or name == baseline:
                s = results[name].double()
                entry["relative_error"] = float((s @ s.T - exact).norm() / exact.norm())
            if name == "tk kronecker":  # cheap: over seeds 0..4 too
                model, x = cnn(), inputs(n)
                errors = []
                for seed in range(5):
                    s = tk.features(model, [x], projection=tk.Projection(DIM_CNN, "kronecker", seed),
                                    progress=False).double()
                    errors.append(float((s @ s.T - exact).norm() / exact.norm()))
                entry["relative_error_seeds"] = errors
        report["methods"][name] = entry
    if part == "resnet":
        block = int(os.environ.get("BENCH_TRAK_BLOCK", "100"))
        blocks = -(-DIM_RESNET // block)
        gradients = statistics.median(t for t, _ in SPLIT[1:])  # the warm-up's left out
        projection = statistics.median(t for _, t in SPLIT[1:])
        report["torch_func_seconds"], report["trak_block_seconds"] = gradients, projection
        report["trak_block_size"] = block
        report["trak_extrapolated_seconds"] = gradients + blocks * projection
        ours = report["methods"]["tk kronecker"]
        ours["ratio_to_trak_extrapolated"] = report["trak_extrapolated_seconds"] / ours["seconds_median"]
    return report


def show(report: dict) -> None:
    print(f"\n{report['part']}: p = {report['p']:,}, dim = {report['dim']}, n = {report['n']}, "
          f"{report['repeats']} repeats (seconds: median [range]; peak MB above resident)")
    for name, e in report["methods"].items():
        line = (f"  {name:48s} {e['seconds_median']:8.3f} s [{min(e['seconds']):.3f}, {max(e['seconds']):.3f}]"
                f"  {e['peak_bytes'] / 2 ** 20:8.1f} MB")
        if "ratio_to_baseline" in e:
            r = e["ratio_to_baseline"]
            line += f"  x{statistics.median(r):.2f} [{min(r):.2f}, {max(r):.2f}] vs torch.func + Gaussian"
        if "relative_error" in e:
            line += f"  K~ rel. err {e['relative_error']:.3f}"
        if "relative_error_seeds" in e:
            r = e["relative_error_seeds"]
            line += f" (seeds 0-4: {statistics.mean(r):.3f} [{min(r):.3f}, {max(r):.3f}])"
        if "ratio_to_trak_extrapolated" in e:
            line += f"  x{e['ratio_to_trak_extrapolated']:.1f} vs TRAK (extrapolated)"
        print(line)
    if "trak_extrapolated_seconds" in report:
        print(f"  of which torch.func {report['torch_func_seconds']:.2f} s, one TRAK block of "
              f"{report['trak_block_size']} columns {report['trak_block_seconds']:.2f} s")
        print(f"  torch.func + TRAK BasicProjector, all {report['dim']} columns (block_size "
              f"{report['trak_block_size']}): ~{report['trak_extrapolated_seconds']:.1f} s extrapolated from one block")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["cnn", "resnet", "all"], default="cnn")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dense", action="store_true", help="also tk's dense kinds on the CNN (~10 s each here)")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--n-resnet", type=int, default=8)
    parser.add_argument("--json")
    parser.add_argument("--child", nargs=2, metavar=("PART", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.n)
        return
    torch.set_num_threads(1)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"torch {torch.__version__}, commit {commit()}, {cpu}, one thread, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    reports = []
    for part in (["cnn", "resnet"] if args.part == "all" else [args.part]):
        report = run_part(part, args.n if part == "cnn" else args.n_resnet, args.repeats, args.dense)
        show(report)
        reports.append(report)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"torch": torch.__version__, "commit": commit(), "cpu": cpu, "reports": reports}, handle, indent=1)
    for report in reports:
        if report["part"] == "cnn":
            ours, train = report["methods"]["tk kronecker"], report["methods"]["train step"]
            assert min(ours["ratio_to_baseline"]) >= 5, f"tk kronecker under 5x torch.func + Gaussian: {ours}"
            assert ours["peak_bytes"] < 2 * train["peak_bytes"], f"tk kronecker's memory over 2x a train step's"


if __name__ == "__main__":
    main()
