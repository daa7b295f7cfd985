"""Shared fixtures: the real her2st data beside the repository, and a built demo store."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """The original her2st release (../shared/data/her2st, or $AGL_HER2ST_DIR)."""
    path = Path(os.environ.get("AGL_HER2ST_DIR", REPO.parent / "shared" / "data" / "her2st"))
    if not (path / "ST-cnts").is_dir():
        pytest.fail(f"real her2st data not found at {path}; set AGL_HER2ST_DIR")
    return path


@pytest.fixture(scope="session")
def demo_store() -> Path:
    """The store built from the bundled her2st demo (built once into $AGL_CACHE_DIR or ~/.cache/agl)."""
    from agl.datasets import her2st_demo_store

    return her2st_demo_store()


@pytest.fixture(scope="session")
def small_store(her2st_dir, tmp_path_factory) -> Path:
    """A small real store (her2st C2 + C3, 32 px patches, seed 0), built once per session."""
    from agl.data.ingest import build_store
    from agl.data.readers import read_her2st

    adata = read_her2st(her2st_dir, ["C2", "C3"])
    return build_store(adata, tmp_path_factory.mktemp("stores") / "small", patch_px=32, seeds=(0,),
                       split_kinds=("kfold", "spatial", "loso"))


@pytest.fixture(scope="module")
def ray_local():
    """One small local Ray per test module (2 CPUs, no dashboard), shut down at the module's end."""
    import ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2)
    yield ray
    ray.shutdown()
