"""The structured Gram (docs/structured.md) against its baselines, all parameters, in one run.

Models: an MLP 784-512-512-10, a small CNN (two convolutions and a dense head) on
3x16x16, torchvision's resnet18 at 32x32. For each, K over all parameters (idx=None) for
one output (logit 0) and for every logit (output="full", [n, n, 10, 10]), by
- tk: tk.gram (structured="auto": the cost model picks per tensor);
- features: tk.gram(structured="never"), the previous path (features for every tensor);
- torch.func: the jacobian contraction of PyTorch's NTK tutorial (vmap(jacrev) per
  sample, einsum over parameters; with x1 = x2 the Jacobian is formed once, which favours it);
- nngeometry: nngeometry.GramMatrix (its hooks backend), when the package is installed.
A method whose memory would exceed --memory-gib is skipped and says so. Each is timed
--repeats times after a warm-up (round-robin over the methods); the median and the
range are printed, with ratios against
tk from the same run, and every K is checked against tk's (relative Frobenius <= 1e-4).
Margins asserted (half the targets of issue #16): tk >= 16.5x the feature path on the MLP,
>= 1.5x on the CNN and on resnet18; >= 2.5x torch.func on every model; >= 0.5x nngeometry.

    python bench/bench_structured.py [--n 256] [--n-resnet 64] [--repeats 3] [--device cpu] [--json out.json]

With --kronecker instead: how well a Kronecker subsample's K (tk.subsample(...,
structure="kronecker")) approximates the full-parameter K, against a uniform subsample
of the same p and one of the same estimated cost, at 1% and 5% of the parameters, for
subsample seeds 1 and 2, on the demo's digits (load_digits_split(0)) for two random-init
networks in eval mode: the digits CNN (600 train / 300 test, 1x8x8) and resnet18
(num_classes=10; 500 train / 300 test, the 8x8 images upsampled bilinearly to 32x32 with
F.interpolate and the channel repeated to 3x32x32). Reported: relative Frobenius error
after the best scale, kernel ridge accuracy on the held-out digits, seconds per K, in
fp64; the full-parameter K (resnet18's by tk's structured path) is the reference. The
run ends with a Markdown table of the rows.
"""

from __future__ import annotations

# OpenMP's wait policy moves these numbers by up to 9x, so say which one ran: libgomp's
# threads spin while they wait (the default), which on a quiet machine took tk's one-logit
# MLP kernel in 8.8 ms and with OMP_WAIT_POLICY=PASSIVE in 16.6 ms (2 threads); on a CPU
# shared with other jobs the spinning pools stall each other (the CNN: 290 ms spinning, 33
# ms passive, at load ~4). Run it quiet with the default, or PASSIVE when shared.
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from _common import commit
import tangent_kernels as tk

OUTPUTS = 10


def mlp():
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, OUTPUTS))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, OUTPUTS))


def resnet18():
    import torchvision

    return torchvision.models.resnet18(num_classes=OUTPUTS)


MODELS = {"mlp": (mlp, (784,)), "cnn": (cnn, (3, 16, 16)), "resnet18": (resnet18, (3, 32, 32))}
# Margins asserted: half of issue #16's targets.
FEATURE_MARGIN = {"mlp": 16.5, "cnn": 1.5, "resnet18": 1.5}
TORCH_FUNC_MARGIN, NNGEOMETRY_MARGIN = 2.5, 0.5


def tk_gram(model, x, output, structured):
    loader = [x[i:i + 256] for i in range(0, x.shape[0], 256)]
    K = tk.gram(model, loader, output="full" if output == "full" else 0, progress=False, structured=structured)
    return K


def torch_func(model, x, output):
    """The tutorial's jacobian contraction (compute='full'), on logit 0 or all logits."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(params, x):
        out = functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)
        return out if output == "full" else out[:1]

    jac = [j.flatten(2) for j in vmap(jacrev(fnet_single), (None, 0))(params, x).values()]
    K = torch.stack([torch.einsum("Naf,Mbf->NMab", j, j) for j in jac]).sum(0)
    return K if output == "full" else K[:, :, 0, 0]


def nngeometry(model, x, output):
    from nngeometry import GramMatrix
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x), batch_size=256)
    function = (lambda x: model(x)) if output == "full" else (lambda x: model(x)[:, :1])
    G = GramMatrix(model, loader, function=function).to_torch()  # [k, n, k, n]
    return G.permute(1, 3, 0, 2).contiguous() if output == "full" else G[0, :, 0, :]


def fits(method, p, n, output, budget):
    rows = n * (OUTPUTS if output == "full" else 1)
    need = {"features": rows * p * 4, "torch.func": rows * p * 4 * 2}.get(method, 0)
    return need <= budget, need


def measure_all(fns, repeats, device=torch.device("cpu")):
    """{method: (times, last result or the error)}: a warm-up of each, then the repeats
    round-robin over the methods, so that a change of the machine's load (shared CPUs)
    falls on all of them alike; on CUDA each call is synchronized (device time)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    runs = {}
    for method, fn in fns.items():
        try:
            fn()  # warm-up: thread pools, allocator, the cost model's rate measurement
            runs[method] = ([], None)
        except Exception as error:  # noqa: BLE001 - a baseline that cannot run this model says why
            runs[method] = (None, error)
    for _ in range(repeats):
        for method, fn in fns.items():
            times, _ = runs[method]
            if times is None:
                continue
            sync()
            start = time.perf_counter()
            result = fn()
            sync()
            times.append(time.perf_counter() - start)
            runs[method] = (times, result)
    return runs


def _scaled_error(sub: torch.Tensor, full: torch.Tensor) -> float:
    """min over s of ||s sub - full|| / ||full||: subsamples estimate K up to a scale."""
    sub, full = sub.double().flatten(), full.double().flatten()
    cosine = float(sub @ full / (sub.norm() * full.norm()))
    return max(0.0, 1.0 - cosine ** 2) ** 0.5


def _ridge_accuracy(k_train, k_test, y_train, y_test) -> float:
    k_train, k_test = k_train.double(), k_test.double()
    ridge = 1e-3 * float(k_train.diagonal().mean())
    targets = torch.nn.functional.one_hot(y_train, int(y_train.max()) + 1).double()
    alpha = torch.linalg.solve(k_train + ridge * torch.eye(k_train.shape[0], dtype=torch.float64), targets)
    return float(((k_test @ alpha).argmax(1) == y_test).double().mean())


def _cost_matched_p(model, x, idx) -> int:
    """Columns of a uniform subsample whose Gram costs what idx's does: per structured
    tensor T^2 (x + g) multiply-adds per pair of samples, per other tensor its entries."""
    from tangent_kernels import engine, feature_phase
    from tangent_kernels.data import to_inputs
    from tangent_kernels.params import resolve_idx

    index = resolve_idx(model, idx)
    extractor = feature_phase.new_extractor(model, index, 0, engine.PRECISIONS["fp32"], torch.device("cpu"), "auto", "auto")
    plan = extractor.plan_for(to_inputs(x[:2], None))
    structured = {c.name: c for c in plan.choices.values() if c.structured}
    cost = sum(c.tokens ** 2 * (c.x_dim + c.g_dim) for c in structured.values())
    return int(cost + sum(piece.local.numel() for piece in index.tensor_slices if piece.name not in structured))


KRONECKER_SEEDS = (1, 2)
# Samples per problem (train, test): resnet18's fp64 K pair at 500 x 300 takes about a
# minute on 2 loaded cores, so the whole --kronecker run stays near 10 minutes.
KRONECKER_SIZES = {"digits CNN": (600, 300), "resnet18": (500, 300)}


def digits_as_rgb32(x: torch.Tensor) -> torch.Tensor:
    """The demo's 1x8x8 digits as resnet18 inputs: bilinear upsampling to 32x32
    (F.interpolate, align_corners=False), the channel repeated three times -> 3x32x32."""
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return x.repeat(1, 3, 1, 1)


def kronecker_comparison(fractions=(0.01, 0.05), seeds=KRONECKER_SEEDS) -> list:
    """Both problems on the demo's digits (load_digits_split(0)), random init, eval mode,
    fp64, K on logit 0: the digits CNN on the 1x8x8 images, resnet18 (num_classes=10) on
    them upsampled to 3x32x32 (digits_as_rgb32). For each fraction and seed: the Kronecker
    subsample, a uniform one of the same p, a uniform one of the same estimated cost
    (_cost_matched_p); relative Frobenius error of K_train against the full-parameter
    K_train after the best scale, kernel ridge accuracy on the held-out digits. The
    errors and accuracies of the Kronecker and same-p draws repeat exactly from run to run;
    the same-cost p follows the cost model's per-tensor choice, which uses measured rates,
    so it can move with the machine's load (resnet18 at 5%: 73,301 or 83,008 columns)."""
    from tangent_kernels.demo import digits_cnn, load_digits_split

    rows = []
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_digits_split(0)
    problems = [("digits CNN", digits_cnn().eval(), lambda x: x),
                ("resnet18", resnet18().eval(), digits_as_rgb32)]
    for name, model, prepare in problems:
        n_train, n_test = KRONECKER_SIZES[name]
        x, x_held = prepare(x_train[:n_train]), prepare(x_test[:n_test])
        labels, labels_held = y_train[:n_train], y_test[:n_test]
        total = sum(q.numel() for q in model.parameters())
        tk.gram(model, [x[:8]], None, output=0, progress=False, precision="fp64")  # warm-up, untimed

        def kernels(idx):
            start = time.perf_counter()
            k = tk.gram(model, [x], idx, output=0, progress=False, precision="fp64")
            seconds = time.perf_counter() - start
            k_test = tk.gram(model, [x_held], idx, [x], output=0, progress=False, precision="fp64")
            return k, k_test, seconds, time.perf_counter() - start

        problem_start = time.perf_counter()
        full, full_test, full_s, full_pair_s = kernels(None)
        result = {"model": name, "p_total": total, "n_train": n_train, "n_test": n_test,
                  "input_shape": list(x.shape[1:]), "precision": "fp64", "full_s": full_s,
                  "full_pair_s": full_pair_s, "full_accuracy": _ridge_accuracy(full, full_test, labels, labels_held)}
        print(f"\n{name}: all {total} parameters, n = {n_train} train / {n_test} test {tuple(x.shape[1:])}, "
              f"K_train in {full_s:.2f} s (with K_test {full_pair_s:.2f} s), "
              f"kernel ridge accuracy {result['full_accuracy']:.3f}", flush=True)
        for fraction in fractions:
            for seed in seeds:
                kron = tk.subsample(model, max(1, int(fraction * total)), seed=seed, structure="kronecker")
                same_cost = min(total, _cost_matched_p(model, x, kron))
                for label, idx in (("kronecker", kron),
                                   ("uniform, same p", tk.subsample(model, len(kron), seed=seed)),
                                   ("uniform, same cost", tk.subsample(model, same_cost, seed=seed))):
                    k, k_test, seconds, pair_seconds = kernels(idx)
                    entry = {"model": name, "fraction": fraction, "seed": seed, "subsample": label, "p": len(idx),
                             "seconds": seconds, "pair_seconds": pair_seconds, "error": _scaled_error(k, full),
                             "accuracy": _ridge_accuracy(k, k_test, labels, labels_held)}
                    rows.append(entry)
                    print(f"  {fraction:>5.0%} seed {seed} {label:>18}: p = {len(idx):>9}, {seconds:6.2f} s "
                          f"({pair_seconds:6.2f} s with K_test), rel. error {entry['error']:.3f}, "
                          f"accuracy {entry['accuracy']:.3f}", flush=True)
        result["total_s"] = time.perf_counter() - problem_start
        rows.append(result)
    print_kronecker_table(rows)
    return rows


def print_kronecker_table(rows) -> None:
    """The rows as a Markdown table: per network and fraction, each subsample's p, then
    relative error and ridge accuracy per seed (seed 1 / seed 2)."""
    full = {r["model"]: r for r in rows if "full_accuracy" in r}
    cells = {}
    for r in rows:
        if "subsample" in r:
            cells.setdefault((r["model"], r["fraction"], r["subsample"]), []).append(r)
    print("\n| network (n train / test) | fraction | subsample | p (per seed) | rel. error (per seed) "
          "| ridge accuracy (per seed) | s for K_train (per seed) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in full.items():
        print(f"| {name} ({r['n_train']} / {r['n_test']}) | 100% | all parameters | {r['p_total']:,} | 0 "
              f"| {r['full_accuracy']:.3f} | {r['full_s']:.1f} |")
        for (model, fraction, label), entries in cells.items():
            if model != name:
                continue
            p = " / ".join(format(e["p"], ",") for e in entries)
            error = " / ".join(format(e["error"], ".3f") for e in entries)
            accuracy = " / ".join(format(e["accuracy"], ".3f") for e in entries)
            seconds = " / ".join(format(e["seconds"], ".1f") for e in entries)
            print(f"| {name} | {fraction:.0%} | {label} | {p} | {error} | {accuracy} | {seconds} |")


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as handle:
            return handle.read().strip()
    except OSError:
        return "unknown"


def _header() -> dict:
    """What a run records first: the commit, versions, threads, OpenMP's wait policy (it
    moves the timings up to 9x, see above) and the load when it starts."""
    return {"commit": commit(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (active)"), "loadavg_start": _loadavg()}


def has_nngeometry() -> bool:
    try:
        import nngeometry  # noqa: F401
        return True
    except ImportError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--n-resnet", type=int, default=64, help="samples for resnet18 (its baselines' memory)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--outputs", default="one,full")
    parser.add_argument("--memory-gib", type=float, default=8.0, help="skip a method needing more")
    parser.add_argument("--skip", default="", help="methods to leave out: nngeometry, or model:method:output, "
                                                   "e.g. resnet18:nngeometry:full (about 1,000 s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (model, data and every method there)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--kronecker", action="store_true", help="the subsample comparison instead")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.kronecker:
        # The commit and the load when the run starts: the library is imported now, and a
        # run of ~10 minutes may outlast the checkout's HEAD.
        header = _header()
        start = time.perf_counter()
        rows = kronecker_comparison()
        header.update(loadavg_end=_loadavg(), seconds=time.perf_counter() - start)
        print(header)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({**header, "kronecker": rows}, handle, indent=1)
        return 0
    budget = int(args.memory_gib * 2 ** 30)
    methods = ["tk", "features", "torch.func"] + (["nngeometry"] if has_nngeometry() else [])
    header = {**_header(), "machine": platform.processor() or platform.machine()}
    print(header)
    results, failures = [], []
    for name in args.models.split(","):
        make, shape = MODELS[name]
        device = torch.device(args.device)
        model = make().eval().to(device)
        n = args.n_resnet if name == "resnet18" else args.n
        x = torch.randn(n, *shape).to(device)
        p = sum(q.numel() for q in model.parameters())
        structured = tk.coverage(model, x[:4]).structured
        print(f"\n{name}: p = {p}, n = {n}; structured: {len(structured)} tensors")
        for output in args.outputs.split(","):
            row = {"model": name, "n": n, "p": p, "output": output, "times": {}, "skipped": {}}
            reference = None
            every = {"tk": lambda: tk_gram(model, x, output, "auto"),
                     "features": lambda: tk_gram(model, x, output, "never"),
                     "torch.func": lambda: torch_func(model, x, output),
                     "nngeometry": lambda: nngeometry(model, x, output)}
            fns = {}
            for method in methods:
                ok, need = fits(method, p, n, output, budget)
                skip = args.skip.split(",")
                if method != "tk" and (method in skip or f"{name}:{method}:{output}" in skip):
                    row["skipped"][method] = "--skip"
                elif not ok:
                    row["skipped"][method] = f"needs {need / 2**30:.1f} GiB > --memory-gib"
                else:
                    fns[method] = every[method]
            for method, (times, K) in measure_all(fns, args.repeats, device).items():
                if times is None:
                    row["skipped"][method] = f"{type(K).__name__}: {str(K)[:120]}"
                    continue
                row["times"][method] = times
                if reference is None:
                    reference = K.double()
                else:
                    agreement = float((K.double() - reference).norm() / reference.norm())
                    row.setdefault("agreement", {})[method] = agreement
                    if agreement > 1e-4:
                        failures.append(f"{name} {output}: {method}'s K differs from tk's by {agreement:.1e}")
            results.append(row)
            base = statistics.median(row["times"]["tk"])
            for method, times in row["times"].items():
                ratio = statistics.median(times) / base
                print(f"  {output:>4} {method:>10}: {statistics.median(times):8.3f} s "
                      f"[{min(times):.3f}, {max(times):.3f}]" + ("" if method == "tk" else f"  tk is {ratio:.1f}x faster"))
            for method, why in row["skipped"].items():
                print(f"  {output:>4} {method:>10}: skipped ({why})")
            margins = {"features": FEATURE_MARGIN[name], "torch.func": TORCH_FUNC_MARGIN,
                       "nngeometry": NNGEOMETRY_MARGIN}
            for method, margin in margins.items():
                if method in row["times"]:
                    ratio = statistics.median(row["times"][method]) / base
                    row.setdefault("ratio", {})[method] = ratio
                    if ratio < margin:
                        failures.append(f"{name} {output}: tk is {ratio:.2f}x {method}, the margin is {margin}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "results": results, "failures": failures}, handle, indent=1)
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
