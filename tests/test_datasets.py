"""The bundled her2st demo: the packaged files, the AnnData, and the cached demo store."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import agl.datasets as datasets
from agl.data.readers import read_her2st
from agl.data.schema import validate_canonical
from agl.data.store import StoreExistsError, open_store


def test_bundled_files_are_the_original_release(her2st_dir):
    root = datasets.HER2ST_DEMO_DIR
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert "README.md" in files and len(files) == 16  # 5 x (counts, spot file, image) + README
    for rel in files:
        if rel != "README.md":  # unmodified copies of the public release
            assert (root / rel).read_bytes() == (her2st_dir / rel).read_bytes(), rel
    assert sum((root / f).stat().st_size for f in files) < 40e6
    readme = (root / "README.md").read_text()
    assert "CC BY 4.0" in readme and "Nature Communications 12, 6012 (2021)" in readme and "Andersson" in readme


def test_her2st_demo_anndata(her2st_dir):
    adata = datasets.her2st_demo()
    validate_canonical(adata)
    assert sorted(adata.obs["slide_id"].unique()) == ["B4", "C2", "C3", "C4", "C5"]
    assert all(Path(m["image_path"]).is_relative_to(datasets.HER2ST_DEMO_DIR) for m in adata.uns["slides"].values())
    one = datasets.her2st_demo("C3")
    ref = read_her2st(her2st_dir, ["C3"])
    assert list(one.obs_names) == list(ref.obs_names) and (one.X != ref.X).nnz == 0


def test_demo_store(demo_store):
    store = open_store(demo_store)
    m = store.manifest
    assert list(m["slides"]) == ["B4", "C2", "C3", "C4", "C5"] and m["n_spots"] > 900
    assert m["patch_shape"] == [224, 224, 3] and m["patch"]["patch_um"] == 112.0
    assert len(store.split_names) == 3 * 5 * 2 + 5  # kfold + spatial for seeds 0-2, loso per slide
    assert demo_store.name.startswith("her2st_demo-")
    # the bundled store is reused, not rebuilt
    assert datasets.her2st_demo_store(demo_store.parent) == demo_store


@pytest.fixture
def small_demo(monkeypatch):
    """Shrink the demo (one section, small patches) so cache behaviour can be tested quickly."""
    monkeypatch.setattr(datasets, "DEMO_STORE_SETTINGS",
                        {**datasets.DEMO_STORE_SETTINGS, "patch_px": 16, "seeds": [0], "split_kinds": ["kfold"]})
    real = datasets.her2st_demo
    monkeypatch.setattr(datasets, "her2st_demo", lambda sections=None: real(["C2"]))


def test_cache_key_and_reuse(small_demo, tmp_path, monkeypatch):
    monkeypatch.setenv("AGL_CACHE_DIR", str(tmp_path / "env"))
    first = datasets.her2st_demo_store()
    assert first.parent == tmp_path / "env" and open_store(first).manifest["patch_shape"] == [16, 16, 3]
    mtime = (first / "manifest.json").stat().st_mtime_ns
    assert datasets.her2st_demo_store() == first and (first / "manifest.json").stat().st_mtime_ns == mtime
    # different settings -> a different store name
    monkeypatch.setattr(datasets, "DEMO_STORE_SETTINGS", {**datasets.DEMO_STORE_SETTINGS, "patch_px": 8})
    assert datasets.her2st_demo_store() != first


def test_losing_a_build_race_uses_the_winner(small_demo, tmp_path, monkeypatch):
    import agl.data.store as store_mod

    winner = datasets.her2st_demo_store(tmp_path / "other")
    real_publish = store_mod._publish

    def other_process_finishes_first(tmp, out, overwrite):
        shutil.copytree(winner, out)  # the other process renames its store into place
        return real_publish(tmp, out, overwrite)

    monkeypatch.setattr(store_mod, "_publish", other_process_finishes_first)
    cache = tmp_path / "cache"
    got = datasets.her2st_demo_store(cache)
    assert got.parent == cache and open_store(got).manifest["created"] == open_store(winner).manifest["created"]
    assert [p.name for p in cache.iterdir()] == [got.name]  # our temporary build was discarded
    with pytest.raises(StoreExistsError):
        real_publish(cache / "nothing", got, False)
