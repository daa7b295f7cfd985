"""Helpers for the training tests: cheap real features and small, fast configurations.

The training loop does not care where features come from; computing MobileNetV2 features of
every demo patch under 8 views takes minutes on 2 CPU cores, so tests use a cheap, real
image descriptor instead: the mean colour of a 4 x 4 grid of cells of each (real) patch,
for each dihedral view (pooling commutes with the view, so view k is exact).
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from agl.data.augment import N_VIEWS, dihedral

GRID = 4


@lru_cache(maxsize=4)
def _pooled(store_path: str) -> np.ndarray:
    from agl.data.store import open_store

    patches = np.asarray(open_store(store_path).patches)
    n, px = patches.shape[0], patches.shape[1]
    cell = px // GRID
    crop = patches[:, : cell * GRID, : cell * GRID].reshape(n, GRID, cell, GRID, cell, 3)
    grid = crop.mean(axis=(2, 4), dtype=np.float32) / 255.0  # [N, 4, 4, 3] (HWC); no float copy of the patches
    views = np.stack([np.ascontiguousarray(dihedral(grid, k)).reshape(n, -1) for k in range(N_VIEWS)])
    return ((views - views.mean(axis=(0, 1))) / (views.std(axis=(0, 1)) + 1e-6)).astype(np.float32)


def pooled_features(store: Any) -> np.ndarray:
    """[8, N, 48] grid-pooled colour features of the store's real patches."""
    return _pooled(str(Path(getattr(store, "path", store)).resolve()))


def use_cheap_features(monkeypatch: Any) -> None:
    """Make features mode read ``pooled_features`` instead of a CNN feature cache."""
    from agl.training import bundles as bundle

    cheap = lambda store, cfg: bundle.FeatureInputs(pooled_features(store))  # noqa: E731
    monkeypatch.setitem(bundle.INPUTS, "features", cheap)
    monkeypatch.setitem(bundle.IN_MEMORY_INPUTS, "features", cheap)


def small_config(**changes: Any) -> Any:
    """A fast TrainConfig for the demo store (small trunk, few epochs, CPU)."""
    from agl.training.loop import TrainConfig

    base = dict(method="dkgsb", epochs=3, patience=10, batch_size=128, bilevel_batch_size=128, trunk=[16],
                dropout=0.1, lr=3e-3, outer_lr=3e-2, device="cpu", weights=None, seed=0)
    return TrainConfig.from_dict({**base, **changes})


def first_split(store: Any) -> str:
    from agl.data.store import open_store

    names = open_store(getattr(store, "path", store)).split_names
    return next(n for n in names if n.startswith("kfold"))


def finalised_run(store: Any, split: str, root: Path, epochs: int = 3) -> Path:
    """A short real run (topk k=32, trunk [64], MobileNetV2 features) on ``split``, finalised like a sweep
    trial (checkpoint + run record) into ``root/final``."""
    from agl import runs
    from agl.training.bundles import make_bundle
    from agl.training.loop import TrainConfig, fit

    cfg = TrainConfig.from_dict({"method": "topk", "k": 32, "epochs": epochs, "trunk": [64]})
    data = make_bundle(store, split, cfg)
    result = fit(cfg, data, out_dir=root / "run")
    runs.finalize_run(result, data, root / "final", split=split)
    return root / "final"


@contextmanager
def cheap_bundle(store: Any, **changes: Any) -> Iterator[Any]:
    """The first k-fold split's training bundle on cheap features (for module-scoped fixtures)."""
    import pytest

    from agl.training.bundles import make_bundle

    patch = pytest.MonkeyPatch()
    use_cheap_features(patch)
    try:
        yield make_bundle(store, first_split(store), small_config(**changes))
    finally:
        patch.undo()


def cv_space(description: str, trunk: int, start_with: str) -> str:
    """A small cross-validated sweep: 2 of the 4 leave-one-slide-out folds of loso-B4, 2 epochs,
    ASHA (grace 1 fold), topk/pgl with k only for topk; ``start_with`` is the YAML list's body."""
    return f"""
description: {description}
split: loso-B4
cv: {{kind: loso, max_folds: 2}}
metric: cv_pcc
direction: max
num_samples: 3
seed: 0
scheduler: {{name: asha, grace_period: 1, reduction_factor: 2}}
resources: {{cpu: 1}}
fixed: {{mode: features, epochs: 2, patience: 2, inner_steps: 1, trunk: [{trunk}]}}
start_with:
{start_with}
params:
  method: {{type: categorical, choices: [topk, pgl]}}
  k:      {{type: int, low: 8, high: 256, log: true, when: {{method: topk}}}}
  lr:     {{type: float, low: 5.0e-4, high: 3.0e-3, log: true}}
"""
