"""Readers from real spatial-transcriptomics layouts into the canonical AnnData, one module per format.

Every reader returns one AnnData that passes :func:`agl.data.schema.validate_canonical`
and raises :class:`agl.errors.DataError` naming the offending file and the problem.
Each format's module registers its reader with :func:`register_reader` (its name, the
keyword that selects slides, how to list them); :data:`READERS` maps a format name to its
reader and :func:`read_slides` dispatches through it. A new format is one new module that
registers itself (imported below, or by the user before ``read_slides``).
"""
from __future__ import annotations

from agl.data.readers.common import (DUPLICATE_POLICIES, IMAGE_SUFFIXES, ScaledImage, SlideData, assemble,
                                     choose_image, counts_to_csr, names_of_kept_genes, resolve_duplicate_genes)
from agl.data.readers.registry import (READER_ENTRIES, READERS, ReaderEntry, list_units, read_slides, reader_entry,
                                       register_reader)
# the built-in formats register themselves on import
from agl.data.readers.legacy_st import (PLAUSIBLE_MPP, ST_ARRAY_CHOICES, ST_ARRAYS, ST_GRID_UM, ST_SPOT_UM, STArray,
                                        STFiles, her2st_sections, check_plausible_mpp, detect_st_array,
                                        estimate_mpp_from_grid, read_her2st, read_her2st_section, read_st_section,
                                        st_section_files)
from agl.data.readers.hest import HEST_PATCH_MPP, HEST_PATCH_PX, read_hest, read_hest_sample
from agl.data.readers.visium import (VISIUM_IMAGES, VISIUM_SPOT_UM, TenXMatrix, read_10x_h5, read_10x_mtx,
                                     read_visium)
from agl.data.readers.h5ad import SCANPY_IMAGES, image_array_file, read_anndata
from agl.data.readers.visium_hd import HD_BIN_UM, read_visium_hd
from agl.data.readers.xenium import COUNTS_FROM, read_alignment, read_xenium

_her2st_sections = her2st_sections  # its name before the package split

__all__ = [
    "COUNTS_FROM", "DUPLICATE_POLICIES", "HD_BIN_UM", "HEST_PATCH_MPP", "HEST_PATCH_PX", "IMAGE_SUFFIXES",
    "PLAUSIBLE_MPP", "READERS", "READER_ENTRIES", "ReaderEntry", "SCANPY_IMAGES", "STArray", "STFiles",
    "ST_ARRAYS", "ST_ARRAY_CHOICES", "ST_GRID_UM", "ST_SPOT_UM", "ScaledImage", "SlideData", "TenXMatrix",
    "VISIUM_IMAGES", "VISIUM_SPOT_UM", "assemble", "check_plausible_mpp", "choose_image", "counts_to_csr",
    "detect_st_array", "estimate_mpp_from_grid", "her2st_sections", "image_array_file", "list_units",
    "names_of_kept_genes", "read_10x_h5", "read_10x_mtx", "read_alignment", "read_anndata", "read_her2st",
    "read_her2st_section", "read_hest", "read_hest_sample", "read_slides", "read_st_section", "read_visium",
    "read_visium_hd", "read_xenium", "reader_entry", "register_reader", "resolve_duplicate_genes",
    "st_section_files",
]
