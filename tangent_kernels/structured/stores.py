"""The structured tensors' factors between the gradient phase and the Gram phase.

Per loader and structured tensor, two row stores (``store.FeatureStore``: device, host or
disk tier, spilling, the same accounting as features): x, one row [T * X] per sample,
and g, one row [T * G] per (sample, output). They are rounded to the precision's store
dtype like features (fp16 with a power-of-two scale per row). With a checkpoint, each
store is recorded as a loader of its own (``<loader>.s<i>x`` / ``.s<i>g``), batch by
batch, *before* the loader's features: the features' record is the commit point, and
factor batches past it are dropped on resume.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..store import FeatureStore
from .contract import structured_tile

__all__ = ["FactorStores", "record_plan", "recorded_plan", "structured_rows"]

_PLAN_KEY = "structured"


def recorded_plan(ckpt) -> Optional[List[str]]:
    """The structured tensors of a checkpointed run: None if it recorded nothing yet (a
    fresh folder), [] for a run that recorded features without a plan."""
    if ckpt is None:
        return None
    if _PLAN_KEY in ckpt.manifest:
        return list(ckpt.manifest[_PLAN_KEY])
    return [] if any(loader.get("batches") for loader in ckpt.manifest["loaders"].values()) else None


def record_plan(ckpt, names: Sequence[str]) -> None:
    """The plan into the manifest, saved with the first batch's record (so both or
    neither are on disk). It rides in the manifest, not in the identity, so that folders
    written before the structured path still resume (with features, recorded_plan)."""
    if ckpt is not None:
        ckpt.manifest[_PLAN_KEY] = list(names)


class FactorStores:
    """x and g row stores of every structured tensor, for one loader."""

    def __init__(self, choices: Sequence, outputs: int, dtype: torch.dtype, device: torch.device, *, kind: str,
                 budget: int, cache_dir, scaled: bool, expected_rows: Optional[int], name: str):
        self.choices, self.outputs, self.name = list(choices), outputs, name
        self.x: List[FeatureStore] = []
        self.g: List[FeatureStore] = []
        per_sample = max(self.row_bytes_of(self.choices, outputs, dtype), 1)
        size = torch.empty((), dtype=dtype).element_size()
        for i, c in enumerate(self.choices):
            for stores, width, copies, rows, tag in (
                    (self.x, c.tokens * c.x_dim, 1, expected_rows, "x"),
                    (self.g, c.tokens * c.g_dim, outputs, None if outputs > 1 else expected_rows, "g")):
                # Each store's share of the budget: its bytes per sample over all factors'.
                share = max(1, budget * width * copies * size // per_sample)
                ids = tag == "x" and c.index  # token ids: float64, unscaled, never rounded
                stores.append(FeatureStore(width, torch.float64 if ids else dtype, device, kind=kind,
                                           max_memory=share, cache_dir=cache_dir, scaled=scaled and not ids,
                                           expected_rows=rows, name=f"{name}.s{i}{tag}"))

    @staticmethod
    def row_bytes_of(choices: Sequence, outputs: int, dtype: torch.dtype) -> int:
        """Bytes per sample of all factors (x once, g per output)."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(c.tokens * (c.x_dim + outputs * c.g_dim) for c in choices) * size

    @property
    def stores(self) -> List[FeatureStore]:
        return self.x + self.g

    def staged_row_bytes(self, form: str = "rows") -> int:
        """Bytes per row of K staged on the device for a tile (stores off the device): a
        row is a (sample, output) pair for form "rows", a sample for "trace"/"diagonal"."""
        g = sum(s.row_bytes for s in self.g if s.kind != "device")
        x = sum(s.row_bytes for s in self.x if s.kind != "device")
        return g + x // self.outputs if form == "rows" else g * self.outputs + x

    def open(self, ckpt, batches: int) -> None:
        """Drop factor batches recorded past the loader's last committed one."""
        if ckpt is None:
            return
        for store in self.stores:
            record = ckpt.manifest["loaders"].get(store.name)
            if record is not None and len(record["batches"]) > batches:
                del record["batches"][batches:]
                ckpt._save()
            ckpt.open_features(store.name, store.row_bytes)

    def append(self, factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]], to_store: Callable, check: Callable,
               first_position: int, ckpt=None, fingerprint: Optional[str] = None) -> None:
        """One batch's factors (persample.factors.FactorSink.finish) into the stores."""
        for i, c in enumerate(self.choices):
            x, g = factors[c.name]
            batch = x.shape[0]
            check(x, first_position, self.name)
            check(g, first_position, self.name)
            for store, rows in ((self.x[i], x.reshape(batch, -1)), (self.g[i], g.reshape(batch * self.outputs, -1))):
                if rows.shape[1] != store.p:
                    raise ValueError(f"the factors of {c.name} have {rows.shape[1]} columns on this batch, "
                                     f"{store.p} on the first: the tokens per sample changed")
                stored, scales = (rows, None) if store.dtype == torch.float64 and c.index and store is self.x[i] \
                    else to_store(rows)
                store.append(stored, scales)
                if ckpt is not None:
                    ckpt.record_batch(store.name, stored, scales, fingerprint)

    def restore(self, ckpt, batch: int, samples: int) -> None:
        """Batch ``batch`` (``samples`` samples) read back from the checkpoint."""
        for i in range(len(self.choices)):
            for store, rows in ((self.x[i], samples), (self.g[i], samples * self.outputs)):
                recorded = ckpt.recorded_batches(store.name)
                if batch >= len(recorded) or recorded[batch][0] != rows:
                    from ..checkpoint import CheckpointCorrupt
                    raise CheckpointCorrupt(f"checkpoint {ckpt.folder}: the factors of batch {batch} of {self.name} "
                                            "are missing or of another size; delete the folder to start over")
                start = sum(r for r, _ in recorded[:batch])
                stored, scales = ckpt.read_features(store.name, batch, start, start + rows, store.p, store.dtype,
                                                    store.scaled)
                store.append(stored.to(store.device), scales)

    def close(self) -> None:
        for store in self.stores:
            store.close()


def structured_rows(first: FactorStores, second: FactorStores, i0: int, i1: int, j0: int, j1: int,
                    dtype: torch.dtype, form: str = "rows") -> torch.Tensor:
    """Sum over the structured tensors of their part of K[i0:i1, j0:j1] in ``dtype``:
    [i1 - i0, j1 - j0] for form "rows" (rows of K are (sample, output) pairs) and
    "trace" (rows are samples), [k, i1 - i0, j1 - j0] for "diagonal" (contract.FORMS)."""
    k = first.outputs
    per_row = k if form == "rows" else 1  # rows of K per sample
    s0, s1 = i0 // per_row, -(-i1 // per_row)
    t0, t1 = j0 // per_row, -(-j1 // per_row)
    total = None
    for i, c in enumerate(first.choices):
        taken = []
        try:
            parts = []
            for store, a, b in ((first.x[i], s0, s1), (first.g[i], s0 * k, s1 * k),
                                (second.x[i], t0, t1), (second.g[i], t0 * k, t1 * k)):
                rows = store.rows(a, b)
                taken.append((store, rows))
                parts.append((rows, store.scales(a, b)))
            scales = tuple(scale for _, scale in parts)
            scales = None if all(scale is None for scale in scales) else scales
            tile = structured_tile(parts[0][0], parts[1][0], parts[2][0], parts[3][0], c.tokens, k, dtype, scales,
                                   index=c.index, form=form)
        finally:
            for store, rows in taken:
                store.release(rows)
        if per_row > 1:  # the tile's rows start inside a sample's outputs
            tile = tile[i0 - s0 * per_row:i1 - s0 * per_row, j0 - t0 * per_row:j1 - t0 * per_row]
        total = tile if total is None else total.add_(tile)
    return total
