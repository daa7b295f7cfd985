"""10x Visium HD: Space Ranger's ``outs/binned_outputs/square_{002,008,016}um/`` pooled into square pseudo-spots;
registered as ``visium-hd``.

Each bin folder holds ``filtered_feature_bc_matrix.h5`` (the 10x HDF5 schema), ``spatial/tissue_positions.parquet``
(barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres: the bin's centre in the
full-resolution image given to Space Ranger) and ``spatial/scalefactors_json.json`` (bin_size_um,
microns_per_pixel, spot_diameter_fullres = the bin's width in full-resolution pixels, tissue_hires_scalef, ...).
The full-resolution H&E is the user's own image (``--image``); ``outs/`` holds only downsampled PNGs. Space
Ranger 4 adds ``segmented_outputs/`` (cells) beside ``binned_outputs/``; the bins are read the same way.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from agl.data.readers.common import (ScaledImage, SlideData, check_pixels, check_unique_barcodes, positive_float,
                                     require_file, assemble, check_side, read_json, choose_image, counts_to_csr,
                                     names_of_kept_genes, pool_rows, pseudo_spot_id, resolve_duplicate_genes)
from agl.data.readers.registry import register_reader
from agl.data.readers.visium import VISIUM_IMAGES, read_10x_h5
from agl.errors import DataError

log = logging.getLogger(__name__)

HD_BIN_UM = (2, 8, 16)  # the bin sizes Space Ranger writes (square_002um, square_008um, square_016um)
DEFAULT_SPOT_UM = 112.0  # the default patch width: each pseudo-spot's counts come from exactly its patch's tissue
_MPP_TOLERANCE = 0.01  # relative disagreement of bin_size_um / spot_diameter_fullres with microns_per_pixel


def _bin_folder(outs: Path, bin_um: int) -> Path:
    """``square_{bin}um`` of ``outs/`` (or of ``outs/binned_outputs``, or ``outs`` itself when it is one)."""
    name = f"square_{bin_um:03d}um"
    for candidate in (outs / "binned_outputs" / name, outs / name, outs):
        if (candidate / "spatial").is_dir() and candidate.name == name:
            return candidate
    found = sorted(p.name for p in (outs / "binned_outputs").glob("square_*um")) if (outs / "binned_outputs").is_dir() \
        else []
    raise DataError(outs / "binned_outputs" / name, f"missing Visium HD bin folder for --bin-um {bin_um}"
                    + (f" (this outs/ has {', '.join(found)})" if found else
                       ": is this a Space Ranger outs/ folder of a Visium HD run (binned_outputs/)?"))


def _read_bin_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    path = require_file(spatial / "tissue_positions.parquet", "bin positions (tissue_positions.parquet)")
    try:
        pos = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for damaged files
        raise DataError(path, f"cannot read the bin positions: {type(err).__name__}: {err}") from err
    need = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    missing = [c for c in need if c not in pos.columns]
    if missing:
        raise DataError(path, f"lacks columns {missing}")
    pos["barcode"] = pos["barcode"].astype(str)
    return pos, path


def _hd_scale(sf_path: Path, bin_um: int) -> tuple[dict[str, Any], float]:
    """The scale factors and the full-resolution pixel size, checked three ways (bin size, bin width, pixel size)."""
    sf = read_json(sf_path, "scale factors")
    missing = [k for k in ("bin_size_um", "microns_per_pixel", "spot_diameter_fullres") if k not in sf]
    if missing:
        raise DataError(sf_path, f"lacks {missing} (Space Ranger writes them for Visium HD bins)")
    size = positive_float(sf["bin_size_um"], sf_path, "bin_size_um")
    mpp = positive_float(sf["microns_per_pixel"], sf_path, "microns_per_pixel")
    width = positive_float(sf["spot_diameter_fullres"], sf_path, "spot_diameter_fullres")
    if abs(size - bin_um) > 1e-6:
        raise DataError(sf_path, f"bin_size_um is {size:g} but the folder is for --bin-um {bin_um}")
    if abs(size / width - mpp) > _MPP_TOLERANCE * mpp:
        raise DataError(sf_path, f"bin_size_um / spot_diameter_fullres = {size:g} / {width:g} = {size / width:.5g} um "
                                 f"per pixel disagrees with microns_per_pixel {mpp:.5g} (more than "
                                 f"{_MPP_TOLERANCE:.0%}): the scale factors do not belong together")
    return sf, mpp


def _grid_to_pixels(pos: pd.DataFrame, path: Path) -> np.ndarray:
    """Least-squares affine from (array_col, array_row) to full-resolution (x, y) pixels over every listed bin:
    3 x 2, rows col step, row step, offset (the bin grid may be rotated in the image)."""
    design = np.column_stack([pos["array_col"].to_numpy(np.float64), pos["array_row"].to_numpy(np.float64),
                              np.ones(len(pos))])
    pixels = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    if np.linalg.matrix_rank(design) < 3:
        raise DataError(path, "the bins do not span two grid directions: cannot place the pseudo-spots")
    coef, *_ = np.linalg.lstsq(design, pixels, rcond=None)
    return coef


@register_reader("visium-hd", help="10x Visium HD: outs/binned_outputs/square_XXXum pooled into square pseudo-spots")
def read_visium_hd(outs_dir: str | Path, image_path: str | Path | None = None, *, bin_um: int = 8,
                   spot_um: float = DEFAULT_SPOT_UM, slide_id: str | None = None,
                   duplicate_genes: str = "error") -> ad.AnnData:
    """Read a Visium HD ``outs/`` folder: the ``bin_um`` bins (``--bin-um`` 2, 8 or 16) summed into squares of
    ``spot_um`` (``--spot-um``; a whole number of bins; default 112 um, the default patch width, so that a patch
    shows exactly the tissue whose counts its pseudo-spot holds). A square is the block of bins
    ``array_row // k, array_col // k`` (``k = spot_um / bin_um``) that has any bin in the filtered matrix; its
    position is the centre of the block in full-resolution pixels (an affine fit of the bin grid to the bins'
    pixel positions, exact for Space Ranger's grid). The pixel size is ``microns_per_pixel`` of the scale
    factors, checked against ``bin_size_um / spot_diameter_fullres``. The image is ``--image`` (full
    resolution); without it the bin folder's ``spatial/tissue_hires_image.png`` with a warning, as
    :func:`agl.data.readers.visium.read_visium` does.
    """
    from agl.data.patches import image_size

    outs = Path(outs_dir)
    if bin_um not in HD_BIN_UM:
        raise DataError(outs, f"--bin-um must be one of {', '.join(map(str, HD_BIN_UM))} (Space Ranger's bins), "
                              f"got {bin_um}")
    spot_um = positive_float(spot_um, outs, "--spot-um")
    k = check_side(spot_um, float(bin_um), "--spot-um", "--bin-um")
    folder = _bin_folder(outs, bin_um)
    spatial = folder / "spatial"
    sf_path = spatial / "scalefactors_json.json"
    scalefactors, mpp = _hd_scale(sf_path, bin_um)
    tenx = read_10x_h5(folder / "filtered_feature_bc_matrix.h5")
    check_unique_barcodes(tenx.barcodes, tenx.path)
    names = names_of_kept_genes(tenx.genes, {"gene_ids": tenx.gene_ids})
    counts, genes = resolve_duplicate_genes(tenx.counts, tenx.genes, tenx.path, duplicate_genes)
    pos, pos_path = _read_bin_positions(spatial)
    check_unique_barcodes(pos["barcode"], pos_path)
    at = pd.Index(pos["barcode"]).get_indexer(tenx.barcodes)
    if (at < 0).any():
        raise DataError(tenx.path, f"{int((at < 0).sum())} bins of the matrix have no position in {pos_path.name} "
                                   f"(e.g. {list(tenx.barcodes[at < 0][:3])})")
    check_pixels(pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)[at], tenx.barcodes, pos_path)
    grid = _grid_to_pixels(pos, pos_path)
    blocks = np.column_stack([pos["array_col"].to_numpy(np.int64)[at] // k, pos["array_row"].to_numpy(np.int64)[at] // k])
    squares, which = np.unique(blocks, axis=0, return_inverse=True)
    which = which.ravel()
    pooled = counts_to_csr(pool_rows(which, len(squares), counts), tenx.path, what="pooled counts")
    n_bins = np.bincount(which, minlength=len(squares))
    centre = squares * k + (k - 1) / 2.0  # block centre in bin-grid units (col, row)
    pixels = np.column_stack([centre, np.ones(len(centre))]) @ grid
    barcodes = pseudo_spot_id(squares, spot_um)
    candidates = [ScaledImage(name, key, name.removesuffix(".png"), spatial / name,
                              size=lambda f=spatial / name: image_size(f), file=lambda f=spatial / name: f)
                  for name, key in VISIUM_IMAGES if (spatial / name).is_file()]
    image, scale, kind = choose_image(
        outs, image_path, pixels, candidates, scalefactors, sf_path, sf_path.name, mpp,
        missing=DataError(spatial, "no image: neither spatial/tissue_hires_image.png nor tissue_lowres_image.png and "
                                   "no --image; pass the full-resolution H&E given to Space Ranger with --image"))
    sid = slide_id or (outs.parent.name if outs.name == "outs" else outs.name)
    log.info("%s: %d bins of %d um pooled into %d pseudo-spots of %g um (%d x %d bins)", folder, len(which), bin_um,
             len(squares), spot_um, k, k)
    meta = {
        "image_path": str(Path(image).absolute()),
        "microns_per_pixel": mpp / scale,
        "spot_diameter_um": spot_um,
        "spot_shape": "square",
        "source_format": "visium-hd",
        "source_files": [str(p.absolute()) for p in (tenx.path, pos_path, sf_path, Path(image))],
        "bin_um": int(bin_um),
        "image_kind": kind,
        "image_scalef": scale,
        "segmented_outputs": (outs / "segmented_outputs").is_dir(),  # Space Ranger >= 4 (not read: bins are)
    }
    extra = {"array_col": squares[:, 0], "array_row": squares[:, 1], "n_bins": n_bins}
    return assemble([SlideData(sid, pooled, genes, barcodes, pixels * scale, meta, extra, str(tenx.path),
                               var_extra=names)])
