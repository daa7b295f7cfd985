"""Data bundles: what ``agl.training.loop.fit`` reads from a store for one split.

``make_bundle(store, split, cfg)`` gathers the split's gene columns and roles once and
serves seeded batches. Two input sources share the batching logic:

- ``features``: frozen-backbone features of the 8 dihedral views (``feature_cache``);
  a training spot gets a random view per epoch, evaluation uses view 0.
- ``finetune``: the store's patches with the loader's transforms (``agl.data.loaders``).

Every draw is seeded by ``(cfg.seed, epoch)``, and with ``world_size > 1`` each rank
iterates a disjoint, equally long slice of the shuffled training order (data parallel).

By default (a store opened by ``agl.data.store``) the bundle holds nothing of size spots x
genes: targets are gathered per batch from the store's memory-mapped arrays and frozen
features from the memory-mapped cache (``agl.training.streaming``); evaluation streams a part
in chunks (``eval_batches``). ``in_memory=True`` builds the old bundle (dense targets, features
copied into a tensor), which gives the same batches and metrics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from agl.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from agl.training.loop import TrainConfig

N_VIEWS = 8
PARTS = ("train", "val", "test")
OUTER_PART = "val_outer"  # optional: validation spots reserved for the gate's outer objective


class FeatureInputs:
    """Cached frozen features ``[8, N, D]`` held in memory (tens of MB for thousands of spots)."""

    def __init__(self, features: Any):
        self.preprocessing = getattr(features, "preprocessing", None)  # the encoder input (feature_cache sets it)
        self.features = torch.tensor(np.asarray(features), dtype=torch.float32)  # a copy: caches are read-only memmaps
        if self.features.dim() != 3 or self.features.shape[0] != N_VIEWS:
            raise DataError("feature cache", f"expected features [8, N, D], got {tuple(self.features.shape)}")
        self.dim = int(self.features.shape[2])

    def batch(self, rows: np.ndarray, views: np.ndarray) -> Tensor:
        return self.features[torch.as_tensor(views, dtype=torch.long), torch.as_tensor(rows, dtype=torch.long)]


class PatchInputs:
    """Store patches for fine-tuning: memory-mapped uint8, a dihedral view per spot.

    The batches come from ``agl.data.loaders.load_views`` (the training loader's fast path),
    in the bundle's own seeded, shardable order. Training on an accelerator they stay uint8
    (a quarter of the bytes to build and to copy to the device; the Estimator normalises them
    there); on the CPU they are ImageNet-normalised float32 here, where numpy's cast is the
    fastest way to do it.
    """

    dim = None
    preprocessing = None  # the fine-tuned backbone converts its input itself (agl.models.backbones.Preprocessing)

    def __init__(self, store: Any, cfg: "TrainConfig"):
        from agl.training.loop import resolve_device

        self.patches = store.patches
        self.normalise = resolve_device(cfg.device).type == "cpu"

    def batch(self, rows: np.ndarray, views: np.ndarray) -> Tensor:
        from agl.data.loaders import load_views

        return load_views(self.patches, np.asarray(rows), np.asarray(views), normalise=self.normalise)


def _feature_inputs(store: Any, cfg: "TrainConfig") -> FeatureInputs:
    from agl.training.streaming import cached_features

    return FeatureInputs(cached_features(store, cfg))


def _mapped_feature_inputs(store: Any, cfg: "TrainConfig") -> Any:
    from agl.training.streaming import mapped_feature_inputs

    return mapped_feature_inputs(store, cfg)


INPUTS: dict[str, Callable[[Any, "TrainConfig"], Any]] = {
    "features": _mapped_feature_inputs,
    "finetune": PatchInputs,
}
# the in-memory bundle's inputs (in_memory=True): today's copy of the feature cache
IN_MEMORY_INPUTS: dict[str, Callable[[Any, "TrainConfig"], Any]] = {
    "features": _feature_inputs,
    "finetune": PatchInputs,
}
EVAL_CHUNK = 512  # spots per evaluation chunk (agl.training.loop.predict's batch)


@dataclass
class InMemoryBundle:
    """A split's targets, roles and inputs; implements ``agl.training.loop.DataBundle``."""

    genes: pd.DataFrame
    n_primary: int
    prior_ranks: dict[str, np.ndarray]
    input_dim: int | None
    targets: Any                        # [N, G] float32 array, or StoreTargets (read per batch); model output order
    slide_ids: np.ndarray               # [N]
    parts: dict[str, np.ndarray]        # part -> spot rows
    inputs: Any                         # FeatureInputs | PatchInputs
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    split: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    source: Any = None                  # the store folder, named in errors

    def _shard(self, order: np.ndarray) -> np.ndarray:
        """This rank's equally long, disjoint slice (equal lengths keep collective calls in step)."""
        if self.world_size == 1:
            return order
        per_rank = len(order) // self.world_size
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def _batches(self, rows: np.ndarray, views: np.ndarray, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        # near-equal batches: no trailing batch of 1-2 spots, whose Pearson loss is degenerate
        n_batches = max(1, math.ceil(len(rows) / batch_size)) if len(rows) else 0
        for chunk in np.array_split(np.arange(len(rows)), n_batches) if n_batches else []:
            r = rows[chunk]
            yield self.inputs.batch(r, views[chunk]), torch.from_numpy(self.targets[r])

    def train_rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's shuffled training rows and their dihedral views for ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch, 0])
        order = rng.permutation(self.parts["train"])
        views = rng.integers(0, N_VIEWS, size=len(order))
        keep = self._shard(np.arange(len(order)))
        return order[keep], views[keep]

    def val_rows(self, epoch: int, part: str = "val") -> np.ndarray:
        """This rank's shuffled rows of a validation part (``val`` or ``val_outer``) for ``epoch``."""
        salt = 1 if part == "val" else 2
        return self._shard(np.random.default_rng([self.seed, epoch, salt]).permutation(self.parts[part]))

    def train_batches(self, batch_size: int, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled training batches, a random dihedral view per spot, seeded by (seed, epoch)."""
        return self._batches(*self.train_rows(epoch), batch_size)

    def val_batches(self, batch_size: int, epoch: int, part: str = "val") -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled validation batches (view 0) for outer steps, seeded by (seed, epoch)."""
        rows = self.val_rows(epoch, part)
        return self._batches(rows, np.zeros(len(rows), dtype=np.int64), batch_size)

    def _part_rows(self, part: str) -> np.ndarray:
        if part not in self.parts:
            raise ValueError(f"unknown part {part!r}; choose one of {', '.join(self.parts)}")
        return self.parts[part]

    def _target_block(self, rows: np.ndarray, n_columns: int | None) -> np.ndarray:
        if hasattr(self.targets, "block"):
            return self.targets.block(rows, n_columns)
        return self.targets[rows] if n_columns is None else self.targets[rows, :n_columns]

    def eval_arrays(self, part: str, n_columns: int | None = None) -> tuple[Tensor, np.ndarray, np.ndarray]:
        """(inputs, targets, slide ids) of every spot of ``part`` in store order, view 0 (the whole part at
        once: ``eval_batches`` streams it); ``n_columns``: only the first genes' targets (e.g. the primary)."""
        rows = self._part_rows(part)
        x = self.inputs.batch(rows, np.zeros(len(rows), dtype=np.int64))
        return x, self._target_block(rows, n_columns), self.slide_ids[rows]

    def eval_batches(self, part: str, batch_size: int | None = None,
                     n_columns: int | None = None) -> Iterator[tuple[Tensor, np.ndarray, np.ndarray]]:
        """``eval_arrays`` in chunks of ``batch_size`` spots (``EVAL_CHUNK``), grouped by slide (store order
        within a slide), so a streaming metric holds one slide at a time."""
        batch_size = batch_size or EVAL_CHUNK
        rows = self._part_rows(part)
        rows = rows[np.argsort(self.slide_ids[rows], kind="stable")]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            yield (self.inputs.batch(chunk, np.zeros(len(chunk), dtype=np.int64)),
                   self._target_block(chunk, n_columns), self.slide_ids[chunk])

    def with_roles(self, roles: np.ndarray, val_outer_fraction: float = 0.0) -> "InMemoryBundle":
        """The same data under other roles (a CV fold of the outer split): targets and inputs are shared,
        not rebuilt."""
        import dataclasses

        parts = roles_to_parts(np.asarray(roles), self.slide_ids, val_outer_fraction, self.seed,
                               self.source, self.split)
        return dataclasses.replace(self, parts=parts)


def roles_to_parts(roles: np.ndarray, slide_ids: np.ndarray, val_outer_fraction: float, seed: int,
                   where: Any, split: str | None) -> dict[str, np.ndarray]:
    """Part -> spot rows of one role per spot (``val_outer`` carved from ``val`` when asked and absent)."""
    parts = {part: np.flatnonzero(roles == part) for part in PARTS}
    if (roles == OUTER_PART).any():
        parts[OUTER_PART] = np.flatnonzero(roles == OUTER_PART)
    elif val_outer_fraction > 0:
        from agl.data.splits import carve_val_outer

        roles = carve_val_outer(roles, slide_ids, val_outer_fraction, seed)
        parts = {part: np.flatnonzero(roles == part) for part in (*PARTS, OUTER_PART)}
    for part, rows in parts.items():
        if len(rows) < 2:
            raise DataError(where, f"split {split!r} has {len(rows)} {part} spots; need at least 2")
    return parts


def make_bundle(store: Any, split: str, cfg: "TrainConfig", rank: int | None = None,
                world_size: int | None = None, roles: np.ndarray | None = None,
                in_memory: bool = False) -> InMemoryBundle:
    """Gather one split of a store (an opened Store or its path) into a bundle.

    ``rank``/``world_size`` default to torch.distributed's when it is initialised. ``roles``
    (one per spot) replaces the split's stored roles while keeping its gene set: a sweep's
    cross-validation folds (``agl.data.splits.inner_folds``) share the outer split's genes.
    ``in_memory``: densify the split's targets and copy the features (the old bundle); otherwise
    both are read per batch from memory-mapped files (other store-like objects are densified).
    """
    from agl.data.store import Store, open_store
    from agl.training.ddp import world

    if isinstance(store, (str, Path)):
        store = open_store(store)
    if rank is None or world_size is None:
        rank, world_size = world()
    genes = store.gene_set(split).reset_index(drop=True)
    roles = np.asarray(store.split(split)) if roles is None else np.asarray(roles)
    slide_ids = store.spots["slide_id"].astype(str).to_numpy()
    parts = roles_to_parts(roles, slide_ids, cfg.val_outer_fraction, cfg.seed, getattr(store, "path", None), split)
    n_primary = int((genes["role"] == "primary").sum())
    if n_primary == 0 or not (genes["role"].iloc[:n_primary] == "primary").all():
        raise DataError(getattr(store, "path", None), f"gene set of split {split!r} must list its primary genes first")
    aux = genes.iloc[n_primary:]
    prior_ranks = {c[len("rank_"):]: aux[c].to_numpy(np.float32) for c in genes.columns if c.startswith("rank_")}
    columns = genes["column"].to_numpy()
    if in_memory or type(store) is not Store:  # a store-like object (agl.bench.selection's planted one)
        targets: Any = np.ascontiguousarray(np.asarray(store.expression)[:, columns], dtype=np.float32)
    else:
        from agl.training.streaming import StoreTargets

        targets = StoreTargets(store, columns, store.path / "gene_sets" / f"{split}.parquet")
    inputs = (IN_MEMORY_INPUTS if in_memory else INPUTS)[cfg.mode](store, cfg)
    return InMemoryBundle(
        genes=genes, n_primary=n_primary, prior_ranks=prior_ranks, input_dim=inputs.dim, targets=targets,
        slide_ids=slide_ids, parts=parts, inputs=inputs, seed=cfg.seed,
        rank=rank, world_size=world_size, split=split, manifest=dict(getattr(store, "manifest", {}) or {}),
        source=getattr(store, "path", None),
    )
