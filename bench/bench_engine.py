"""The Gram phase alone: triangular vs full tile schedule, and each feature store,
measured side by side in one run on synthetic features.

Default (CPU, about a minute here): n = 4,096 samples, p = 50,000 fp32 features.
"full" computes every tile of K(X, X) (what a cross-kernel schedule does); "lower"
is the engine's schedule (tiles on or below the diagonal, then mirrored). Every
variant's K is checked against the first before any time is reported.

    python bench/bench_engine.py [--n 4096] [--p 50000] [--precision fp32] [--device cpu] [--margin 1.5]

Asserts that the triangular schedule is at least ``--margin`` times faster than the
full one (expected about 2x: it skips n(n - T)/2 of the n^2 entries with tiles of T rows).
"""

from __future__ import annotations

import argparse
import platform
import tempfile

import torch

from tangent_kernels import tiles
from tangent_kernels.precisions import PRECISIONS
from tangent_kernels.progress import Events
from _common import commit, timed
from tangent_kernels.store import FeatureStore


def _store(features: torch.Tensor, kind: str, device: torch.device, cache_dir: str) -> FeatureStore:
    store = FeatureStore(features.shape[1], features.dtype, device, kind=kind, max_memory=1 << 62,
                         cache_dir=cache_dir, name=f"bench_{kind}")
    for block in features.split(256):
        store.append(block)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--p", type=int, default=50_000)
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--margin", type=float, default=1.5)
    args = parser.parse_args()

    device = torch.device(args.device)
    precision = PRECISIONS[args.precision]
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(args.n, args.p, generator=generator).to(device=device, dtype=precision.store)
    events = Events(None, False)
    budget = 1 << 62
    results = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        device_store = _store(features, "device", device, cache_dir)
        results["device store, full schedule"] = timed(
            lambda: tiles.blocked_gram(device_store, device_store, False, precision.k, device, None, None, events, budget),
            device=device, warmup=False)
        for kind in ("device", "host", "disk"):
            store = device_store if kind == "device" else _store(features, kind, device, cache_dir)
            results[f"{kind} store, lower-triangle schedule"] = timed(
                lambda: tiles.blocked_gram(store, store, True, precision.k, device, None, None, events, budget),
                device=device, warmup=False)
            if kind != "device":
                store.close()
        device_store.close()

    reference = next(iter(results.values()))[1]
    for name, (_, k) in results.items():
        assert torch.equal(k, reference) or torch.allclose(k, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max())), name

    flops = 2.0 * args.n * args.n * args.p
    print(f"# Gram phase, n={args.n}, p={args.p}, {args.precision} features, device={device} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, commit {commit()}")
    print("| variant | seconds | GFLOP/s (of the full n^2 p product) | speedup vs full |")
    print("|---|---|---|---|")
    full = results["device store, full schedule"][0]
    for name, (seconds, _) in results.items():
        print(f"| {name} | {seconds:.2f} | {flops / seconds / 1e9:.1f} | {full / seconds:.2f}x |")
    speedup = full / results["device store, lower-triangle schedule"][0]
    assert speedup >= args.margin, f"triangular schedule only {speedup:.2f}x faster than full (margin {args.margin}x)"
    print(f"OK: triangular schedule {speedup:.2f}x faster than full (margin {args.margin}x)")


if __name__ == "__main__":
    main()
