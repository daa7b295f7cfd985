"""Data: readers into the canonical AnnData, patch extraction, preprocessing and the store."""
from agl.data.patches import extract_patches
from agl.data.readers import (
    READERS,
    read_anndata,
    read_her2st,
    read_hest,
    read_slides,
    read_visium,
)

__all__ = [
    "READERS",
    "extract_patches",
    "read_anndata",
    "read_her2st",
    "read_hest",
    "read_slides",
    "read_visium",
]

# preprocessing, splits, the store and loaders
from agl.data.augment import dihedral, dihedral_batch  # noqa: E402
from agl.data.ingest import build_store  # noqa: E402
from agl.data.loaders import PatchDataset, iter_patch_batches, ray_dataset  # noqa: E402
from agl.data.preprocess import PRIORS, gene_set, preprocess  # noqa: E402
from agl.data.splits import SPLIT_KINDS, make_splits  # noqa: E402
from agl.data.store import Store, open_store, write_store  # noqa: E402

__all__ += [
    "PRIORS", "SPLIT_KINDS", "PatchDataset", "Store", "build_store", "dihedral", "dihedral_batch",
    "gene_set", "iter_patch_batches", "make_splits", "open_store", "preprocess", "ray_dataset", "write_store",
]
