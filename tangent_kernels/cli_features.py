"""``tangent-kernels features``: the eNTK features (per-sample gradients at the sampled
parameters) to a file, as ``gram`` writes K.

    tangent-kernels features --model my_models:resnet --data X.npy --params 500000 --out F.safetensors

F is [n, p] ([n, k, p] for ``--output full``, ``trace`` or ``diagonal``: every logit's
gradient), column j the gradient at global parameter position ``idx[j]``. A .safetensors
file holds F as "features", the positions as "idx" (int64 [p]) and the metadata; .npy and
.pt hold F alone. With ``--projection DIM[:KIND[:SEED]]`` F is the sketch [n, DIM] (G R,
docs/sketch.md): "idx" then lists the parameters sketched, the metadata's "projection"
names R. The command's options, checks and messages are ``gram``'s (cli.py, cli_common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from .cli_common import (CommandError, check_writable, environment, model_data_idx, parse_output, parse_projection,
                         refuse_overwrites)

FORMAT = "tangent_kernels.features/1"
_SUFFIXES = (".safetensors", ".npy", ".pt")
# gram's options that say what is computed, and how; --data2 (a cross kernel), --checkpoint,
# --max-memory and --shards concern the Gram phase, which features do not have.
_SHARED = ("model", "weights", "data", "params", "idx", "seed", "output", "precision", "batch_size", "device",
           "no_progress", "projection")


def add_command(commands, gram_parser: argparse.ArgumentParser, debug: argparse.ArgumentParser) -> None:
    """The ``features`` subcommand, with ``gram``'s options (the same actions, so the same
    defaults and help) and its own --out."""
    f = commands.add_parser("features", parents=[debug], help="compute and save the eNTK features (per-sample gradients)",
                            description="Compute the eNTK features of a model over data, per-sample gradients at the "
                                        "sampled parameters, [n, p], and save them (safetensors with the positions and "
                                        "metadata, .npy or .pt).")
    for action in gram_parser._actions:
        if action.dest in _SHARED:
            f._add_action(action)
    f.add_argument("--out", required=True, help="where to save the features: .safetensors (with idx, the global "
                   "positions of the columns, and metadata), .npy or .pt")
    f.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .pipeline import features
    from .params import resolve_idx

    refuse_overwrites([("--out", args.out)], [("--data", args.data), ("--weights", args.weights),
                                                ("--idx", args.idx)])
    if Path(args.out).suffix not in _SUFFIXES:
        raise CommandError(f"--out {args.out}: write the features as {', '.join(_SUFFIXES)} (the suffix says the format)")
    check_writable(args.out, "--out")
    if args.out.endswith(".npy") and args.precision == "bf16":
        raise CommandError("--out *.npy cannot hold bfloat16 (NumPy has no such dtype): with --precision bf16 write "
                           ".safetensors or .pt")
    projection = parse_projection(args.projection)
    model, x, _, idx, total = model_data_idx(args)
    positions = resolve_idx(model, idx).positions  # column j's global position, whatever form idx took
    start = time.perf_counter()
    F = features(model, x.split(args.batch_size), idx, output=parse_output(args.output), precision=args.precision,
                 device=args.device, progress=not args.no_progress, projection=projection)
    seconds = time.perf_counter() - start
    p = len(positions)
    # With a projection the columns are the sketch's; idx still lists the parameters sketched.
    meta = {"model": args.model, "weights": args.weights, "data": args.data, "params": p, "params_total": total,
            "seed": args.seed, "idx": args.idx, "output": args.output, "precision": args.precision,
            "device": str(F.device), "seconds": round(seconds, 3), **environment(),
            **({"projection": projection.identity} if projection is not None else {})}
    if args.out.endswith(".safetensors"):
        save(args.out, F, positions, meta)
    elif args.out.endswith(".npy"):
        import numpy as np

        np.save(args.out, F.cpu().numpy())
    else:
        torch.save(F.cpu(), args.out)
    print(f"features {tuple(F.shape)} {str(F.dtype).replace('torch.', '')}, p = {p:,} of {total:,} parameters, "
          f"{seconds:.1f} s" + (f", sketched: {projection.identity}" if projection is not None else "")
          + f" -> {args.out}")
    return 0


def save(path: str, F, positions, meta: dict) -> None:
    """F, its columns' global positions and ``meta`` (JSON, with ``format``) in one
    safetensors file, written atomically (a temporary file beside it, then a rename), as
    tangent_kernels.io writes K. Read back with ``safetensors.torch.load_file`` and
    ``safe_open(path, "pt").metadata()["tangent_kernels"]``."""
    import torch
    from safetensors.torch import save_file

    target = Path(path)
    text = json.dumps({**meta, "format": FORMAT, "shape": list(F.shape), "dtype": str(F.dtype).replace("torch.", "")},
                      sort_keys=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent if str(target.parent) else ".")
    os.close(handle)
    try:
        save_file({"features": F.detach().cpu().contiguous(), "idx": positions.to(torch.int64).cpu().contiguous()},
                  tmp, metadata={"tangent_kernels": text})
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
