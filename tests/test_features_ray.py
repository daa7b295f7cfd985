"""The feature cache on Ray Data (actor pool): same file as the in-process cache, resumable per slide."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from agl.data.store import open_store
from agl.models.features import cache_target, feature_cache

BACKBONE = "timm/mobilenetv3_small_050"  # small, random-init: this tests the pipeline, not ImageNet


@pytest.fixture()
def store_copy(small_store, tmp_path):
    """A private copy of the real 2-slide store (its own cache folder)."""
    dst = tmp_path / "store"
    shutil.copytree(small_store, dst, ignore=shutil.ignore_patterns("cache"))
    return open_store(dst)


def test_ray_cache_equals_the_in_process_cache_and_resumes_per_slide(store_copy, tmp_path, ray_local) -> None:
    from agl.distributed.features import _part_path, feature_cache_ray

    module, key, _, path, shape = cache_target(store_copy, BACKBONE, None, 2, "float32")
    parts = path.parent / f"{key}.parts"
    slides = store_copy.spots["slide_id"].astype(str).to_numpy()
    first = slides[0]
    rows = np.flatnonzero(slides == first)
    # a finished part from an interrupted run: a rerun must keep it (its values are marked to prove it)
    parts.mkdir(parents=True)
    np.save(_part_path(parts, first), np.full((len(rows), shape[0], shape[2]), 7.0, dtype=np.float32))
    feats = feature_cache_ray(store_copy, BACKBONE, None, views=2, num_workers=2, batch_size=16)
    assert feats.shape == shape and path.is_file() and not parts.exists()
    assert np.all(feats[:, rows] == 7.0)  # resumed: the finished slide was not recomputed

    # without the planted part, the Ray cache equals the in-process one, spot for spot
    path.unlink()
    ray_feats = np.array(feature_cache_ray(store_copy, BACKBONE, None, views=2, num_workers=2, batch_size=16))
    path.unlink()
    (path.with_suffix(".json")).unlink()
    local = feature_cache(store_copy, BACKBONE, None, views=2)
    np.testing.assert_allclose(ray_feats, local, rtol=1e-4, atol=1e-5)
    assert not np.allclose(ray_feats[:, rows], 7.0)


def test_ray_cache_reuses_an_existing_cache_without_actors(store_copy, ray_local, monkeypatch) -> None:
    import agl.distributed.features as ray_features

    local = feature_cache(store_copy, BACKBONE, None, views=1)

    def boom(*a, **k):
        raise AssertionError("started actors although the cache exists")

    monkeypatch.setattr(ray_features, "_compute_parts", boom)
    again = ray_features.feature_cache_ray(store_copy, BACKBONE, None, views=1)
    assert np.array_equal(np.asarray(again), np.asarray(local))
