"""Bundled real data, like scanpy's ``pbmc68k_reduced``: five imaged her2st sections.

``her2st_demo()`` reads them into the canonical AnnData; ``her2st_demo_store()`` builds
a store from them once into a cache folder and reuses it afterwards. See
``agl/datasets/data/her2st_demo/README.md`` for source, licence (CC BY 4.0) and citation.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from anndata import AnnData

from agl.errors import DataError
from agl.fileio import default_cache_dir  # re-exported: agl.datasets.default_cache_dir

log = logging.getLogger(__name__)

HER2ST_DEMO_DIR = Path(__file__).resolve().parent / "data" / "her2st_demo"
HER2ST_DEMO_SECTIONS = ("B4", "C2", "C3", "C4", "C5")
# Ingest settings of the demo store; part of its cache key, so changing them rebuilds it.
DEMO_STORE_SETTINGS: dict[str, Any] = {
    "patch_um": 112.0, "patch_px": 224, "border": "pad", "min_genes": 200, "min_cells": 3,
    "normalize_total": None, "log1p": True, "n_primary": 50, "priors": ["hvg", "mean"],
    "split_kinds": ["kfold", "spatial", "loso"], "seeds": [0, 1, 2],
}


def her2st_demo(sections: Sequence[str] | str | None = None) -> AnnData:
    """The bundled her2st sections (B4, C2-C5; or a subset) as one canonical AnnData of raw counts."""
    from agl.data.readers import read_her2st

    return read_her2st(HER2ST_DEMO_DIR, sections if sections is not None else list(HER2ST_DEMO_SECTIONS))


def _demo_key(settings: dict[str, Any] | None = None) -> str:
    """Hash of the bundled files, the ingest settings, the store schema and the split draws' version."""
    from agl.data.splits import SPLITS_VERSION
    from agl.data.store import SCHEMA_VERSION
    from agl.fileio import sha256_file

    # splits: a store cached before a change of the split draws would keep the old roles
    h = hashlib.sha256(json.dumps({"settings": settings or DEMO_STORE_SETTINGS, "schema": SCHEMA_VERSION,
                                   "splits": SPLITS_VERSION}, sort_keys=True).encode())
    for f in sorted(p for p in HER2ST_DEMO_DIR.rglob("*") if p.is_file() and p.name != "README.md"):
        h.update(f.relative_to(HER2ST_DEMO_DIR).as_posix().encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()[:16]


def her2st_demo_store(cache_dir: str | Path | None = None, **overrides: Any) -> Path:
    """Path of a store built from the bundled sections; built on first use (about a minute).

    ``overrides`` change ingest settings (e.g. ``primary_min_detection=0.3`` for a primary
    panel of genes detected in at least 30% of the training spots, ``stain="macenko"`` for
    stain-normalised patches); the default store has none.
    The folder name carries a hash of the data and settings, so a changed package never
    reuses a stale store. Concurrent callers are safe: each builds in a temporary folder
    and renames it into place; whoever loses the race discards its copy and uses the winner's.
    """
    from agl.data.ingest import build_store
    from agl.data.store import StoreExistsError, open_store

    unknown = sorted(set(overrides) - set(DEMO_STORE_SETTINGS) - {"primary_min_detection", "stain"})
    if unknown:
        from agl.errors import ConfigError

        raise ConfigError("her2st_demo_store", f"unknown ingest settings {unknown}")
    settings = {**DEMO_STORE_SETTINGS, **overrides}
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # no overrides: the key (and folder) of the default store stays what it always was
    target = root / f"her2st_demo-{_demo_key(settings if overrides else None)}"
    if target.exists():
        open_store(target)  # raises DataError naming manifest.json if the folder is not a store
        return target
    log.info("building the her2st demo store at %s (once)", target)
    try:
        return build_store(her2st_demo(), target, **settings)
    except StoreExistsError:
        if (target / "manifest.json").is_file():  # another process finished first
            return target
        raise DataError(target, "exists but holds no store; delete it and retry")


__all__ = ["HER2ST_DEMO_DIR", "HER2ST_DEMO_SECTIONS", "default_cache_dir", "her2st_demo", "her2st_demo_store"]
