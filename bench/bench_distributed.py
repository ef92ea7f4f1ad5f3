"""tk.gram on 1 and 2 gloo processes against one process, measured in one run.

Default (CPU, a few minutes on a 2-core machine): torchvision resnet18 (random
weights, eval) on 32x32 inputs, p = 100,000 sampled parameters, n = 1,024, batches of
64, fp32. Every process (the single-process baseline included) runs ``--threads``
intra-op threads (default 1): W processes use W cores, so the efficiency measures the
added processes, not thread scaling (which, on a loaded machine, was measured much
worse: 2 threads took 5x longer per sample than 2 processes of 1 thread). For
each configuration: wall time (the slowest rank), throughput (samples/s), scaling
efficiency T_single / (W T_W), the CPU seconds of all ranks and the work efficiency
CPU_single / sum(CPU_ranks) (what the distributed path costs in work, whatever else
runs on the machine: on a shared machine the wall-clock efficiency measures the
neighbours too), and per rank the seconds of the feature phase, the Gram
phase and the time blocked in collectives (transfers hidden behind tiles excluded).
Every distributed K is checked against the single-process K before a time is reported.

    python bench/bench_distributed.py [--n 1024] [--params 100000] [--worlds 1,2] [--threads 1] [--json out.json]
    python bench/bench_distributed.py --device cuda --backend nccl --worlds 1   # one GPU: the distributed path's overhead

With ``--backend nccl`` rank r computes on cuda:(r mod the GPU count); NCCL refuses two
ranks on one GPU, so one GPU measures W = 1 only (the issue's < 5% overhead target).

Asserts that the 2-process run's work efficiency is at least ``--margin`` (default
0.75): splitting the work must not cost more than a third more CPU time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from _common import commit


def _problem(n: int, params: int, seed: int = 0, device: str = "cpu"):
    import torchvision

    import tangent_kernels as tk

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10).eval().to(device)
    X = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    return model, X, tk.subsample(model, params, seed=seed)


def _rank(rank: int, world: int, folder: str, args: dict, threads: int, exchange: str) -> None:
    device = args["device"]
    if device == "cuda":
        device = f"cuda:{rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    import torch.distributed as dist

    import tangent_kernels as tk

    torch.set_num_threads(threads)
    dist.init_process_group(args["backend"], store=dist.FileStore(os.path.join(folder, "store"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=30))
    model, X, idx = _problem(args["n"], args["params"], device=device)
    loader = list(X.split(args["batch_size"]))
    stats = {}
    tk.distributed.gram(model, loader[:world], idx, progress=False)  # warm-up, as for the single process
    _sync(device)
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    K = tk.distributed.gram(model, loader, idx, exchange=exchange, gather="rank0", progress=False, stats=stats)
    _sync(device)
    stats["wall"], stats["cpu"] = time.perf_counter() - start, time.process_time() - cpu
    torch.save({"stats": stats, "K": None if K is None else K.cpu()}, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _distributed(world: int, args: dict, threads: int, exchange: str):
    with tempfile.TemporaryDirectory() as folder:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_rank, args=(r, world, folder, args, threads, exchange))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a rank of the {world}-process run failed (exit codes {[p.exitcode for p in procs]})")
        ranks = [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    return ranks[0]["K"], [r["stats"] for r in ranks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--margin", type=float, default=0.75)
    parser.add_argument("--json")
    args = parser.parse_args()
    config = dict(n=args.n, params=args.params, batch_size=args.batch_size, device=args.device, backend=args.backend)

    import tangent_kernels as tk

    torch.set_num_threads(args.threads)
    model, X, idx = _problem(args.n, args.params, device=args.device)
    loader = list(X.split(args.batch_size))
    tk.gram(model, loader[:1], idx, progress=False)  # warm-up: thread pools, the first batch's decisions
    _sync(args.device)
    start, cpu = time.perf_counter(), time.process_time()
    single = tk.gram(model, loader, idx, progress=False, group=False)
    _sync(args.device)
    t_single, cpu_single = time.perf_counter() - start, time.process_time() - cpu
    single = single.cpu()
    rows = [dict(config="one process (tk.gram)", world=1, wall=t_single, efficiency=1.0, cpu=cpu_single,
                 work_efficiency=1.0)]
    for world in [int(w) for w in args.worlds.split(",")]:
        for exchange in (["ring", "allgather"] if world > 1 else ["ring"]):
            K, stats = _distributed(world, config, args.threads, exchange)
            torch.testing.assert_close(K, single, rtol=1e-4, atol=1e-5 * float(single.abs().max()))
            wall = max(s["wall"] for s in stats)
            rows.append(dict(config=f"{world} {args.backend} process{'es' if world > 1 else ''}, {exchange}", world=world,
                             wall=wall, efficiency=t_single / (world * wall), exact=bool(torch.equal(K, single)),
                             cpu=sum(s["cpu"] for s in stats), work_efficiency=cpu_single / sum(s["cpu"] for s in stats),
                             features=[round(s["features"], 3) for s in stats], gram=[round(s["gram"], 3) for s in stats],
                             features_cpu=[round(s["features_cpu"], 3) for s in stats],
                             gram_cpu=[round(s["gram_cpu"], 3) for s in stats],
                             communication=[round(s["communication"], 3) for s in stats],
                             communication_share=max(s["communication"] / s["wall"] for s in stats)))
    print(f"n={args.n}, p={args.params}, resnet18 32x32, fp32, {args.device}, {args.backend}, {args.threads} thread(s) per process, "
          f"{os.cpu_count()} cores ({platform.machine()}), load average {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, commit {commit()}")
    print("| configuration | wall s | samples/s | efficiency | CPU s (all ranks) | work efficiency | features s (per rank) "
          "| features CPU s | Gram s | Gram CPU s | blocked in collectives s | share |")
    print("|---|---:|---:|---:|---:|---:|---|---|---|---|---|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['wall']:.2f} | {args.n / r['wall']:.0f} | {r['efficiency']:.2f} | {r['cpu']:.2f} | "
              f"{r['work_efficiency']:.2f} | "
              f"{r.get('features', '')} | {r.get('features_cpu', '')} | {r.get('gram', '')} | {r.get('gram_cpu', '')} | "
              f"{r.get('communication', '')} | "
              f"{r.get('communication_share', 0):.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows, commit=commit()), indent=1))
    two = [r for r in rows if r["world"] == 2]
    if two:
        best = max(r["work_efficiency"] for r in two)
        assert best >= args.margin, f"2-process work efficiency {best:.2f} < margin {args.margin}"


if __name__ == "__main__":
    main()
