"""The per-batch data path of ``fit``: nothing of size spots x genes is held in memory.

``agl.training.bundles.make_bundle`` builds its bundle from these readers (unless asked for
the in-memory bundle, ``in_memory=True``):

- :class:`StoreTargets`: a split's gene columns of the store's expression, gathered per batch
  from the memory-mapped arrays (CSR segments of the rows asked for, or dense rows); the
  split's columns are mapped to model-output positions once.
- :class:`MappedFeatureInputs`: the frozen-feature cache ``[8, N, D]`` memory-mapped and
  gathered per batch (float32 or float16 files; batches are float32).

Both read files that every process on a node maps, so concurrent Tune trials, CV folds and
Ray Train workers share one copy in the OS page cache instead of each holding its own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from agl.errors import DataError

N_VIEWS = 8


class StoreTargets:
    """``targets[rows]`` -> float32 ``[len(rows), G]`` of a split's genes, read from the store per call.

    Stands in for the in-memory ``[N, G]`` array of the old bundle: indexing with a row array
    gives the same values; there is no whole-array access (``np.asarray`` refuses).
    """

    def __init__(self, store: Any, columns: np.ndarray, source: str | Path | None = None):
        self.store = store
        self.columns = np.asarray(columns, dtype=np.int64)
        self.positions = store.column_positions(self.columns, source)  # the split's genes, mapped once
        store.check_expression_shape()
        self.shape = (int(store.manifest["n_spots"]), len(self.columns))
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        rows = np.arange(self.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        if rows.ndim == 0:  # one spot
            return self[rows[None]][0]
        if rows.ndim != 1:
            raise IndexError("StoreTargets takes a row or a 1-D array of rows")
        return self.store.expression_block(rows, self.columns, self.positions)

    def block(self, rows: np.ndarray, n_columns: int | None = None) -> np.ndarray:
        """``self[rows]`` restricted to the first ``n_columns`` genes (e.g. the primary ones)."""
        if n_columns is None or n_columns == len(self.columns):
            return self[rows]
        return self.store.expression_block(np.asarray(rows, dtype=np.int64), self.columns[:n_columns])

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("StoreTargets is read per batch; densifying every spot x gene is what it avoids "
                        "(index it with rows, or build the bundle with in_memory=True)")


class MappedFeatureInputs:
    """Cached frozen features ``[8, N, D]``, memory-mapped; each batch gathers its (view, row) pairs."""

    def __init__(self, features: np.ndarray, path: str | Path | None = None, n_spots: int | None = None):
        self.preprocessing = getattr(features, "preprocessing", None)  # the encoder input (feature_cache sets it)
        where = path or getattr(features, "filename", None) or "feature cache"
        if features.ndim != 3 or features.shape[0] != N_VIEWS:
            raise DataError(where, f"expected features [8, N, D], got {tuple(features.shape)}")
        if n_spots is not None and features.shape[1] != n_spots:
            raise DataError(where, f"holds features of {features.shape[1]} spots, the store has {n_spots}; "
                                   "delete the file to recompute it")
        if features.dtype not in (np.float32, np.float16):
            raise DataError(where, f"expected float32 or float16 features, got {features.dtype}")
        self.features = features
        self.dim = int(features.shape[2])

    def batch(self, rows: np.ndarray, views: np.ndarray) -> Tensor:
        gathered = self.features[np.asarray(views, dtype=np.int64), np.asarray(rows, dtype=np.int64)]
        return torch.from_numpy(np.ascontiguousarray(gathered, dtype=np.float32))


def cached_features(store: Any, cfg: Any) -> Any:
    """The store's feature cache for ``cfg``'s backbone in ``cfg.feature_dtype`` (computed first if missing, on
    ``cfg.device`` at its precision)."""
    from agl.models import feature_cache
    from agl.training.device import resolve_device

    return feature_cache(store, cfg.backbone, cfg.weights, device=str(resolve_device(cfg.device)),
                         precision=cfg.precision, dtype=cfg.feature_dtype)


def mapped_feature_inputs(store: Any, cfg: Any) -> MappedFeatureInputs:
    """The store's feature cache for ``cfg``'s backbone, memory-mapped (computed first if missing)."""
    features = cached_features(store, cfg)
    return MappedFeatureInputs(features, getattr(features, "filename", None), int(store.manifest["n_spots"]))
