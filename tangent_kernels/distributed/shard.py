"""``KShard``: the rows of K one rank holds (``tk.gram(..., gather="rows")``), and its
files: one safetensors file per rank plus a JSON manifest (``tangent-kernels gram --shards``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

__all__ = ["KShard", "save_shards", "load_shards"]


@dataclass
class KShard:
    """Rows ``[row_start, row_stop)`` of a Gram K of ``shape`` [n1, n2], on this rank.

    rows: [row_stop - row_start, n2], K's dtype, every column (for a symmetric K the
        columns of the other ranks' rows too: ``rows`` is a horizontal slab of K).
    row_offsets: ``row_offsets[r]`` is rank r's first row; ``row_offsets[-1] == n1``.
    rank, world_size: this rank and the group's size; ``group`` the process group
        (None: the default group).
    symmetric: K(X, X) (then ``rows[:, row_start:row_stop]`` is this rank's diagonal block).

    K's row order is the loader's (every rank passed the same loader), or rank 0's
    samples, then rank 1's, ... (``shard=True``).
    """

    rows: torch.Tensor
    row_start: int
    shape: Tuple[int, int]
    row_offsets: Tuple[int, ...]
    rank: int
    world_size: int
    symmetric: bool
    group: Any = field(default=None, repr=False)

    def __post_init__(self):
        if tuple(self.rows.shape) != (self.row_stop - self.row_start, self.shape[1]):
            raise ValueError(f"KShard rows {tuple(self.rows.shape)} do not match rows [{self.row_start}, "
                             f"{self.row_stop}) of K {list(self.shape)}")

    @property
    def row_stop(self) -> int:
        return self.row_offsets[self.rank + 1]

    @property
    def sizes(self) -> Tuple[int, ...]:
        """Rows held by each rank."""
        return tuple(b - a for a, b in zip(self.row_offsets[:-1], self.row_offsets[1:]))

    def diagonal(self) -> torch.Tensor:
        """K's diagonal entries on this rank's rows (K(X, X) only)."""
        if not self.symmetric:
            raise ValueError("diagonal() needs a symmetric K(X, X); this shard is of a cross kernel")
        return self.rows[:, self.row_start:self.row_stop].diagonal()

    def gather(self, dst: Optional[int] = None) -> Optional[torch.Tensor]:
        """The whole K, assembled from every rank's shard: a collective (call it on every
        rank). ``dst=None``: K on every rank; ``dst=r``: on rank r, None elsewhere."""
        from .exchange import Comm

        comm = Comm(self.group, device=self.rows.device if self.rows.is_cuda else None)
        with comm.phase("gather K"):
            k = comm.gather_row_shards(self.rows.to(comm.device), self.sizes, dst)
        return None if k is None else k.to(self.rows.device)


_SHARDS_FORMAT = "tangent_kernels.kshards/1"


def save_shards(shard: KShard, out, meta: Optional[dict] = None) -> Path:
    """Every rank writes its rows to ``<out stem>.rank-<r>-of-<W>.safetensors`` (with
    ``meta``); rank 0 then writes ``<out stem>.shards.json``, the manifest
    :func:`load_shards` reads (written last, atomically: a manifest on disk means every
    shard it names is complete). A collective: call on every rank. Returns the manifest's path."""
    import torch.distributed as dist

    from ..io import save_gram

    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".safetensors" else out
    own = stem.with_name(f"{stem.name}.rank-{shard.rank}-of-{shard.world_size}.safetensors")
    save_gram(own, shard.rows, dict(meta or {}, row_start=shard.row_start, row_stop=shard.row_stop,
                                    k_shape=list(shard.shape), rank=shard.rank, world_size=shard.world_size,
                                    symmetric=shard.symmetric))
    dist.barrier(group=shard.group)
    manifest = stem.with_name(f"{stem.name}.shards.json")
    if shard.rank == 0:
        entries = [dict(file=stem.with_name(f"{stem.name}.rank-{r}-of-{shard.world_size}.safetensors").name,
                        row_start=shard.row_offsets[r], row_stop=shard.row_offsets[r + 1])
                   for r in range(shard.world_size)]
        text = json.dumps(dict(format=_SHARDS_FORMAT, shape=list(shard.shape), symmetric=shard.symmetric,
                               dtype=str(shard.rows.dtype).replace("torch.", ""), shards=entries, meta=meta or {}),
                          indent=1, sort_keys=True)
        tmp = manifest.with_name(f".{manifest.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, manifest)
    dist.barrier(group=shard.group)
    return manifest


def load_shards(manifest) -> Tuple[torch.Tensor, dict]:
    """(K, meta) from a manifest written by :func:`save_shards`: the row shards, checked
    and stacked, in one process."""
    from ..io import load_gram

    manifest = Path(manifest)
    try:
        record = json.loads(manifest.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{manifest}: not a readable K-shards manifest ({error})") from None
    if not isinstance(record, dict) or record.get("format") != _SHARDS_FORMAT:
        raise ValueError(f"{manifest}: not a K-shards manifest (format {_SHARDS_FORMAT}, written by "
                         "tangent-kernels gram --shards under torchrun)")
    rows, expected = [], 0
    for entry in record["shards"]:
        path = manifest.with_name(entry["file"])
        if not path.is_file():
            raise FileNotFoundError(f"{manifest} names the shard {path.name}, which is missing: copy every "
                                    f"{path.name.split('.rank-')[0]}.rank-*.safetensors file beside the manifest")
        k, meta = load_gram(path)
        if entry["row_start"] != expected or tuple(k.shape) != (entry["row_stop"] - entry["row_start"],
                                                                record["shape"][1]):
            raise ValueError(f"{path.name} holds rows {meta.get('row_start')}..{meta.get('row_stop')} "
                             f"{list(k.shape)}, the manifest says rows {entry['row_start']}..{entry['row_stop']} of "
                             f"K {record['shape']}: the shards are from different runs; recompute them")
        rows.append(k)
        expected = entry["row_stop"]
    if expected != record["shape"][0]:
        raise ValueError(f"{manifest}: its shards cover {expected} of K's {record['shape'][0]} rows")
    return torch.cat(rows), dict(record.get("meta") or {}, shape=record["shape"], symmetric=record["symmetric"])
