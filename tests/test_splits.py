"""Named splits on the real her2st spot layout: roles, coverage, seeding, spatial blocking."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from agl.data.readers import read_her2st
from agl.data.splits import loso_validation, make_splits, spatial_folds
from agl.errors import ConfigError

SECTIONS = ["B4", "C2", "C3"]


@pytest.fixture(scope="module")
def obs(her2st_dir) -> pd.DataFrame:
    return read_her2st(her2st_dir, SECTIONS, require_image=False).obs


@pytest.fixture(scope="module")
def splits(obs) -> pd.DataFrame:
    return make_splits(obs, seeds=(0, 1))


def test_names_follow_the_contract(splits):
    expected = ([f"kfold-s{s}-f{f}" for s in (0, 1) for f in range(5)]
                + [f"spatial-s{s}-f{f}" for s in (0, 1) for f in range(5)]
                + [f"loso-{s}" for s in SECTIONS])
    assert list(splits.columns) == expected


@pytest.mark.parametrize("kind", ["kfold", "spatial"])
def test_fold_roles_partition_every_slide(obs, splits, kind):
    slides = obs["slide_id"].to_numpy()
    tests = []
    for f in range(5):
        roles = splits[f"{kind}-s0-f{f}"]
        assert set(roles) == {"train", "val", "test"}  # every spot has a role (no "" here)
        for part in ("train", "val", "test"):
            assert set(slides[roles == part]) == set(SECTIONS), (f, part)  # every slide in every part
        # validation of fold f is the test part of fold f+1
        assert (splits[f"{kind}-s0-f{(f + 1) % 5}"] == "test").equals(roles == "val")
        tests.append((roles == "test").to_numpy())
    # the 5 test parts are disjoint and cover every spot exactly once
    assert np.array_equal(np.sum(tests, axis=0), np.ones(len(obs)))
    # folds are balanced within a slide (random: +-1; spatial blocks: capacity-bounded)
    for slide in SECTIONS:
        sizes = [t[slides == slide].sum() for t in tests]
        assert max(sizes) - min(sizes) <= 1 if kind == "kfold" else max(sizes) <= -(-sum(sizes) // 5)


def test_loso(obs, splits):
    slides = obs["slide_id"].to_numpy()
    for held in SECTIONS:
        roles = splits[f"loso-{held}"].to_numpy()
        assert set(slides[roles == "test"]) == {held} and (roles[slides == held] == "test").all()
        for other in set(SECTIONS) - {held}:
            val = (roles[slides == other] == "val").mean()
            assert abs(val - 0.2) < 0.01


def test_loso_validation_is_the_same_in_every_split_that_trains_on_a_slide(obs, splits):
    """So a loso split's training spots are every slide's non-validation spots minus the held-out slide's, and
    streaming ingest needs one sum per slide, not one per slide and split (SPLITS_VERSION 2)."""
    slides = obs["slide_id"].to_numpy()
    val = loso_validation(obs)
    for held in SECTIONS:
        roles = splits[f"loso-{held}"].to_numpy()
        assert np.array_equal(roles == "val", val & (slides != held))
        assert np.array_equal(roles == "train", ~val & (slides != held))
    # a slide's draw does not depend on which other slides are present
    alone = loso_validation(obs[slides != "C3"])
    assert np.array_equal(alone, val[slides != "C3"])


def test_seeded_and_deterministic(obs, splits):
    again = make_splits(obs, seeds=(0, 1))
    pd.testing.assert_frame_equal(splits, again)
    assert not splits["kfold-s0-f0"].equals(splits["kfold-s1-f0"])
    assert not splits["spatial-s0-f0"].equals(splits["spatial-s1-f0"])
    # a slide's folds do not depend on which other slides are present
    alone = make_splits(obs[obs["slide_id"] == "C2"], kinds=("kfold", "spatial"), seeds=(0,))
    both = splits.loc[obs["slide_id"] == "C2", alone.columns]
    pd.testing.assert_frame_equal(alone, both)


def _mean_nn_same_fold(xy: np.ndarray, folds: np.ndarray) -> float:
    """Fraction of spots whose nearest neighbour lies in the same fold (1 = compact blocks)."""
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((folds[d.argmin(1)] == folds).mean())


def test_spatial_folds_are_compact(obs, splits):
    """Spatial blocks keep neighbours together; random folds scatter them (measured on real spots)."""
    for slide in SECTIONS:
        at = (obs["slide_id"] == slide).to_numpy()
        xy = obs.loc[at, ["pixel_x", "pixel_y"]].to_numpy()

        def folds(kind: str) -> np.ndarray:
            return np.argmax([(splits.loc[at, f"{kind}-s0-f{f}"] == "test").to_numpy() for f in range(5)], axis=0)

        spatial, random = _mean_nn_same_fold(xy, folds("spatial")), _mean_nn_same_fold(xy, folds("kfold"))
        assert spatial > 0.8 and random < 0.4, (slide, spatial, random)


def test_spatial_folds_on_a_grid_make_blocks():
    xy = np.stack(np.meshgrid(np.arange(20), np.arange(10)), -1).reshape(-1, 2).astype(float)
    folds = spatial_folds(xy, 5, np.random.default_rng(0))
    assert np.bincount(folds).tolist() == [40] * 5
    assert _mean_nn_same_fold(xy, folds) > 0.85


def test_bad_arguments(obs):
    with pytest.raises(ConfigError, match="unknown split kind"):
        make_splits(obs, kinds=("kfold", "bogus"))
    with pytest.raises(ConfigError, match="n_folds"):
        make_splits(obs, n_folds=2)


def test_inner_folds_never_touch_the_outer_test_slide(demo_store) -> None:
    from agl.data.splits import inner_folds
    from agl.data.store import open_store

    store = open_store(demo_store)
    slides = store.spots["slide_id"].astype(str).to_numpy()
    outer = store.split("loso-B4").to_numpy()
    folds = inner_folds(store.spots, outer, kind="loso")
    assert sorted(folds) == ["loso-C2", "loso-C3", "loso-C4", "loso-C5"]
    for name, roles in folds.items():
        assert set(roles[slides == "B4"]) == {""}             # the sweep's test slide: in no fold
        held = name.removeprefix("loso-")
        assert set(roles[slides == held]) == {"test"}          # the fold's score: a slide it never trained on
        others = roles[(slides != held) & (slides != "B4")]
        assert set(others) == {"train", "val"}
    again = inner_folds(store.spots, outer, kind="loso")
    assert all((again[n] == folds[n]).all() for n in folds)    # seeded: recomputed identically
    spatial = inner_folds(store.spots, outer, kind="spatial", n_folds=3, max_folds=2)
    assert len(spatial) == 2 and all(set(r[slides == "B4"]) == {""} for r in spatial.values())


def test_loso_on_one_slide_is_a_clear_error(obs):
    one = obs[obs["slide_id"] == obs["slide_id"].iloc[0]]
    with pytest.raises(ConfigError, match="leave-one-slide-out needs at least 2 slides"):
        make_splits(one, kinds=("loso",))
    assert len(make_splits(one, kinds=("kfold", "loso")).columns) == 5  # kfold alone still works
