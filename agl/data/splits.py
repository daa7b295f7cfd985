"""Named, seeded train/validation/test splits of the spots of a store.

Names (see docs/architecture.md):

- ``kfold-s{seed}-f{f}``: per slide, ``n_folds`` random spot folds; test = fold f,
  validation = fold (f+1) % n_folds, train = the rest (the paper's intra-batch protocol).
- ``spatial-s{seed}-f{f}``: the same roles over spatially blocked folds per slide
  (size-balanced k-means on pixel coordinates), so test spots are not surrounded by
  training spots (random folds leak through spatial autocorrelation).
- ``loso-{slide}``: test = that slide, validation = a seeded 20% of every other slide's
  spots, train = the rest. A slide's validation spots are the same in every loso split
  where it is not held out (:func:`loso_validation`), so a split's training spots are
  (every slide's non-validation spots) minus (the held-out slide's): streaming ingest
  merges one sum per slide instead of one per slide and split (``SPLITS_VERSION`` 2;
  version 1 drew each split's validation spots anew).

A split is a column of roles ``"train" | "val" | "test" | ""`` (unused) in spot order,
optionally with ``"val_outer"``: validation spots kept for DkGSB's outer objective (the
threshold's loss), so that ``"val"`` (early stopping and model selection) is not the data
the threshold was fitted to (``make_splits(..., val_outer_fraction=...)`` or
``carve_val_outer``).
Every random draw is seeded by the split seed and the slide name, so adding a slide
does not change the folds of the others.
"""
from __future__ import annotations

import zlib
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from agl.errors import ConfigError
from agl.data.schema import OBS_PX, OBS_PY, OBS_SLIDE
from agl.registry import Registry

ROLES = ("train", "val", "test", "val_outer")
LOSO_VAL_FRACTION = 0.2
LOSO_SEED = 0
SPLITS_VERSION = 2  # bumped when a split's roles change for the same spots (2: loso validation per slide)


def _rng(seed: int, slide: str, salt: str) -> np.random.Generator:
    """A generator keyed by (seed, slide, kind) so each slide's draw is independent of the others."""
    return np.random.default_rng([int(seed), zlib.crc32(slide.encode()), zlib.crc32(salt.encode())])


def random_folds(n: int, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold id per item: a random permutation cut into ``n_folds`` near-equal parts."""
    folds = np.empty(n, dtype=np.int64)
    folds[rng.permutation(n)] = np.arange(n) % n_folds
    return folds


def spatial_folds(xy: np.ndarray, n_folds: int, rng: np.random.Generator, n_iter: int = 20) -> np.ndarray:
    """Fold id per spot: contiguous, size-balanced spatial blocks.

    Lloyd's k-means (k-means++ start) where the assignment step is capacity-constrained
    (each block takes at most ceil(n / n_folds) spots, closest pairs first), so blocks
    stay compact and folds have near-equal size.
    """
    xy = np.asarray(xy, dtype=np.float64)
    n = len(xy)
    if n < n_folds:
        raise ConfigError("splits", f"{n} spots cannot make {n_folds} spatial folds")
    centres = [xy[rng.integers(n)]]
    for _ in range(1, n_folds):  # k-means++ seeding: far points are likely new centres
        d2 = np.min(((xy[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(xy[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else xy[rng.integers(n)])
    centres = np.asarray(centres)
    cap = -(-n // n_folds)
    labels = np.full(n, -1)
    for _ in range(n_iter):
        dist = ((xy[:, None, :] - centres[None]) ** 2).sum(-1)
        order = np.argsort(dist, axis=None, kind="stable")
        new = np.full(n, -1)
        fill = np.zeros(n_folds, dtype=np.int64)
        for flat in order:  # greedy: closest (spot, block) pairs first, respecting capacity
            i, c = divmod(int(flat), n_folds)
            if new[i] < 0 and fill[c] < cap:
                new[i] = c
                fill[c] += 1
        if np.array_equal(new, labels):
            break
        labels = new
        centres = np.stack([xy[labels == c].mean(0) for c in range(n_folds)])
    # random block -> fold numbering, so fold 0 is not always the first seeded block
    return rng.permutation(n_folds)[labels]


def _fold_splits(obs: pd.DataFrame, kind: str, n_folds: int, seeds: Iterable[int],
                 assign: Callable[[pd.DataFrame, int, np.random.Generator], np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    slides = obs[OBS_SLIDE].astype(str).to_numpy()
    for seed in seeds:
        folds = np.empty(len(obs), dtype=np.int64)
        for slide in pd.unique(slides):
            at = np.flatnonzero(slides == slide)
            if len(at) < n_folds:
                raise ConfigError("splits", f"slide {slide!r} has {len(at)} spots, fewer than {n_folds} folds")
            folds[at] = assign(obs.iloc[at], n_folds, _rng(seed, slide, kind))
        for f in range(n_folds):
            roles = np.full(len(obs), "train", dtype=object)
            roles[folds == (f + 1) % n_folds] = "val"
            roles[folds == f] = "test"
            out[f"{kind}-s{seed}-f{f}"] = roles
    return out


def _kfold(obs: pd.DataFrame, n_folds: int, seeds: Iterable[int]) -> dict[str, np.ndarray]:
    return _fold_splits(obs, "kfold", n_folds, seeds, lambda o, k, rng: random_folds(len(o), k, rng))


def _spatial(obs: pd.DataFrame, n_folds: int, seeds: Iterable[int]) -> dict[str, np.ndarray]:
    return _fold_splits(obs, "spatial", n_folds, seeds,
                        lambda o, k, rng: spatial_folds(o[[OBS_PX, OBS_PY]].to_numpy(), k, rng))


def loso_validation(obs: pd.DataFrame) -> np.ndarray:
    """bool per spot: a seeded 20% of each slide, its validation spots in every loso split that trains on it."""
    slides = obs[OBS_SLIDE].astype(str).to_numpy()
    val = np.zeros(len(obs), dtype=bool)
    for slide in pd.unique(slides):
        at = np.flatnonzero(slides == slide)
        n_val = max(1, int(round(LOSO_VAL_FRACTION * len(at))))
        val[_rng(LOSO_SEED, slide, "loso").choice(at, n_val, replace=False)] = True
    return val


def _loso(obs: pd.DataFrame, n_folds: int, seeds: Iterable[int]) -> dict[str, np.ndarray]:
    slides = obs[OBS_SLIDE].astype(str).to_numpy()
    names = list(pd.unique(slides))
    out: dict[str, np.ndarray] = {}
    if len(names) < 2:
        return out  # leave-one-slide-out needs another slide to train on
    other_roles = np.where(loso_validation(obs), "val", "train").astype(object)
    for held in names:
        out[f"loso-{held}"] = np.where(slides == held, "test", other_roles).astype(object)
    return out


# kind -> function(obs, n_folds, seeds) -> {split name: roles}; add a kind with SPLIT_KINDS.register(name, fn).
SPLIT_KINDS: Registry[Callable[[pd.DataFrame, int, Iterable[int]], dict[str, np.ndarray]]] = Registry(
    "split kind", setting="split_kinds")
SPLIT_KINDS.register("kfold", _kfold)
SPLIT_KINDS.register("spatial", _spatial)
SPLIT_KINDS.register("loso", _loso)


def carve_val_outer(roles: np.ndarray, slides: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A copy of ``roles`` where a seeded ``fraction`` of each slide's ``val`` spots become ``val_outer``.

    Per slide (keyed like every other draw here), so each validation slide contributes to both
    roles; at least one spot stays ``val`` and one becomes ``val_outer`` where a slide has two
    or more validation spots.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError("val_outer_fraction", f"must lie in (0, 1), got {fraction}")
    roles = np.asarray(roles, dtype=object).copy()
    slides = np.asarray(slides).astype(str)
    for slide in pd.unique(slides):
        at = np.flatnonzero((slides == slide) & (roles == "val"))
        if len(at) < 2:
            continue
        n_outer = min(len(at) - 1, max(1, int(round(fraction * len(at)))))
        roles[_rng(seed, slide, "val_outer").choice(at, n_outer, replace=False)] = "val_outer"
    return roles


def make_splits(obs: pd.DataFrame, kinds: Iterable[str] = ("kfold", "spatial", "loso"),
                n_folds: int = 5, seeds: Iterable[int] = (0,), val_outer_fraction: float = 0.0) -> pd.DataFrame:
    """All named splits of the spots in ``obs`` (needs ``slide_id``, ``pixel_x``, ``pixel_y``).

    Returns a DataFrame indexed like ``obs``, one column per split name, values
    ``"train" | "val" | "test" | ""``; with ``val_outer_fraction > 0`` that share of each
    split's validation spots has the role ``"val_outer"`` instead (``carve_val_outer``,
    seeded by the split seed, or ``LOSO_SEED`` for leave-one-slide-out).
    """
    unknown = [k for k in kinds if k not in SPLIT_KINDS]
    if unknown:
        raise ConfigError("splits", f"unknown split kind(s) {unknown}; known: {sorted(SPLIT_KINDS)}")
    if n_folds < 3:
        raise ConfigError("splits", f"n_folds must be >= 3 (test, validation and train folds), got {n_folds}")
    seeds = [int(s) for s in seeds]
    columns: dict[str, np.ndarray] = {}
    for kind in kinds:
        columns.update(SPLIT_KINDS[kind](obs, n_folds, seeds))
    if val_outer_fraction:
        slides = obs[OBS_SLIDE].astype(str).to_numpy()
        columns = {name: carve_val_outer(roles, slides, val_outer_fraction, split_seed(name))
                   for name, roles in columns.items()}
    if not columns:  # e.g. only loso on a one-slide store: there is nothing to hold out
        n_slides = obs[OBS_SLIDE].nunique()
        raise ConfigError("splits", f"split kind(s) {list(kinds)} give no split on {n_slides} slide(s); "
                                    "leave-one-slide-out needs at least 2 slides (add kfold or spatial)")
    return pd.DataFrame(columns, index=obs.index, dtype=object)


def split_seed(name: str) -> int:
    """The seed in a split name (``kfold-s3-f1`` -> 3); ``LOSO_SEED`` for names without one."""
    for part in name.split("-")[1:]:
        if part.startswith("s") and part[1:].isdigit():
            return int(part[1:])
    return LOSO_SEED


def split_kind(name: str) -> str:
    """The kind of a split name (``kfold-s0-f1`` -> ``kfold``)."""
    return name.split("-", 1)[0]


def inner_folds(obs: pd.DataFrame, outer_roles: Iterable[str], kind: str = "loso", n_folds: int = 3,
                seed: int = 0, max_folds: int | None = None) -> dict[str, np.ndarray]:
    """Cross-validation folds over the spots a sweep may see: everything but ``outer_roles == "test"``.

    The outer split's test spots (the sweep's held-out slide or slides) get role ``""`` in every
    fold, so no fold trains, validates or scores on them. Within the rest, the folds are the
    registered split kinds applied to those spots only: ``loso`` holds out one remaining slide
    per fold (its spots are the fold's ``test`` part, the score; a seeded 20% of the other
    slides validate for early stopping and outer steps), ``spatial`` / ``kfold`` cut
    ``n_folds`` spot folds per slide. Names are ``{kind}-...`` as in :func:`make_splits`,
    seeded by ``seed`` and the slide names, so a trial recomputes the same folds anywhere.
    ``max_folds`` keeps the first folds only (in name order).
    """
    if kind not in SPLIT_KINDS:
        raise ConfigError("cv", f"unknown fold kind {kind!r}; known: {sorted(SPLIT_KINDS)}")
    outer = np.asarray(list(outer_roles), dtype=object)
    if len(outer) != len(obs):
        raise ConfigError("cv", f"outer split has {len(outer)} roles for {len(obs)} spots")
    seen = np.flatnonzero(outer != "test")
    inner = SPLIT_KINDS[kind](obs.iloc[seen], n_folds, [seed])
    if not inner:
        raise ConfigError("cv", f"{kind} folds need at least 2 slides outside the test part, found "
                                f"{sorted(pd.unique(obs[OBS_SLIDE].astype(str).to_numpy()[seen]))}")
    folds: dict[str, np.ndarray] = {}
    for name in sorted(inner)[:max_folds]:
        roles = np.full(len(obs), "", dtype=object)
        roles[seen] = inner[name]
        folds[name] = roles
    return folds
