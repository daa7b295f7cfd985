"""HEST-1k (``st/``, ``metadata/``, ``patches/``, ``wsis/``), read without the hest package; registered as ``hest``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import anndata as ad
import numpy as np

from agl.data.readers.common import (IMAGE_SUFFIXES, SlideData, check_pixels, check_unique_barcodes, raw_counts_of,
                                     positive_float, read_h5ad_file, assemble, counts_to_csr, read_json,
                                     resolve_duplicate_genes)
from agl.data.readers.registry import register_reader
from agl.errors import DataError

# HEST-1k (mahmoodlab/HEST, src/hest/HESTData.py, HESTData.dump_patches): patches are cut
# around adata.obsm["spatial"] at 0.5 um/px, 224 px wide; the .h5 holds "img" [N,224,224,3]
# uint8, "coords" = the patch's TOP-LEFT corner in full-resolution pixels
# (coords_center - patch_size_src // 2) and "barcode" [N,1] bytes (adata.obs index).
HEST_PATCH_PX = 224
HEST_PATCH_MPP = 0.5



def read_hest_sample(root: str | Path, sample_id: str, *, duplicate_genes: str = "error") -> SlideData:
    """One HEST-1k sample: ``st/{id}.h5ad``, ``metadata/{id}.json``, optional patches and WSI."""
    root = Path(root)
    st_path = root / "st" / f"{sample_id}.h5ad"
    meta_path = root / "metadata" / f"{sample_id}.json"
    adata = read_h5ad_file(st_path)
    meta = read_json(meta_path, "HEST metadata file")
    key = next((k for k in ("pixel_size_um_estimated", "pixel_size_um_embedded") if meta.get(k)), None)
    if key is None:
        raise DataError(meta_path, "no pixel size (pixel_size_um_estimated / pixel_size_um_embedded)")
    mpp = positive_float(meta[key], meta_path, key)
    spot_um = meta.get("spot_diameter")
    spot_um = positive_float(spot_um, meta_path, "spot_diameter") if spot_um is not None else None

    barcodes = np.asarray(adata.obs_names, dtype=str)
    check_unique_barcodes(barcodes, st_path)
    if "spatial" in adata.obsm:
        pixels = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    elif {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(adata.obs.columns):
        pixels = adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    else:
        raise DataError(st_path, "no spot positions (obsm['spatial'] or obs pxl_col/row_in_fullres)")
    check_pixels(pixels, barcodes, st_path)
    values, where = raw_counts_of(adata, st_path)
    counts = counts_to_csr(values, st_path, barcodes, list(adata.var_names), where)
    counts, genes = resolve_duplicate_genes(counts, list(adata.var_names), st_path, duplicate_genes)

    wsi = next((p for p in sorted((root / "wsis").glob(f"{sample_id}.*"))
                if p.suffix.lower() in IMAGE_SUFFIXES), None) if (root / "wsis").is_dir() else None
    patches = root / "patches" / f"{sample_id}.h5"
    if not patches.is_file() and wsi is None:
        raise DataError(root / "wsis" / f"{sample_id}.tif", "missing image: neither the WSI nor "
                        f"{patches} exists")
    info = {
        "image_path": str(wsi.absolute()) if wsi is not None else None,
        "microns_per_pixel": mpp,
        "spot_diameter_um": spot_um,
        "source_format": "hest",
        "source_files": [str(p.absolute()) for p in (st_path, meta_path, patches, wsi)
                         if p is not None and p.is_file()],
        "dropped_spots": 0,
    }
    if patches.is_file():
        info["patches_h5"] = str(patches.absolute())
        info["patches_um_per_px"] = HEST_PATCH_MPP
    extra = {c: adata.obs[c].to_numpy() for c in ("array_row", "array_col") if c in adata.obs}
    return SlideData(sample_id, counts, genes, barcodes, pixels, info, extra, str(st_path))


def _hest_units(root: Path, **_: Any) -> list[str]:
    return sorted(p.stem for p in (root / "st").glob("*.h5ad"))


@register_reader("hest", subset="sample_ids", list_units=_hest_units, help="HEST-1k: st/, metadata/, patches/, wsis/")
def read_hest(root: str | Path, sample_ids: Sequence[str] | str | None = None, *,
              duplicate_genes: str = "error") -> ad.AnnData:
    """Read HEST-1k samples (``st/``, ``metadata/``, ``patches/``, ``wsis/``) without the hest package.

    ``sample_ids=None`` reads every ``st/{id}.h5ad``. The pixel size comes from the metadata's
    ``pixel_size_um_estimated``; pre-extracted patches are recorded as ``patches_h5``.
    """
    root = Path(root)
    if not (root / "st").is_dir():
        raise DataError(root / "st", "missing folder: not a HEST-1k layout")
    if isinstance(sample_ids, str):
        sample_ids = [sample_ids]
    if sample_ids is None:
        sample_ids = sorted(p.stem for p in (root / "st").glob("*.h5ad"))
        if not sample_ids:
            raise DataError(root / "st", "no .h5ad samples")
    return assemble([read_hest_sample(root, s, duplicate_genes=duplicate_genes) for s in sample_ids])
