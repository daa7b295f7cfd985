"""Data: readers into the canonical AnnData, patch extraction, preprocessing and the store.

Names load on first use (PEP 562 ``__getattr__``), so importing a light submodule such as
``agl.data.commands`` (the CLI's parser) does not import scanpy and torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "READERS": "agl.data.readers", "read_anndata": "agl.data.readers", "read_her2st": "agl.data.readers",
    "read_hest": "agl.data.readers", "read_slides": "agl.data.readers", "read_visium": "agl.data.readers",
    "extract_patches": "agl.data.patches",
    # preprocessing, splits, the store and loaders
    "dihedral": "agl.data.augment", "dihedral_batch": "agl.data.augment",
    "build_store": "agl.data.ingest",
    "PatchDataset": "agl.data.loaders", "iter_patch_batches": "agl.data.loaders", "ray_dataset": "agl.data.loaders",
    "PRIORS": "agl.data.preprocess", "gene_set": "agl.data.preprocess", "preprocess": "agl.data.preprocess",
    "SPLIT_KINDS": "agl.data.splits", "make_splits": "agl.data.splits", "split_table": "agl.data.splits",
    "SplitTable": "agl.data.splits",
    "Store": "agl.data.store", "open_store": "agl.data.store", "write_store": "agl.data.store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'agl.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
