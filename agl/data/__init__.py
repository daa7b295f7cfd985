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
