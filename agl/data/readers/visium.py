"""10x Visium: a Space Ranger ``outs/`` folder as Space Ranger writes it; registered as ``visium``."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from agl.data.readers.common import (ScaledImage, SlideData, check_pixels, check_unique_barcodes, decode_strings,
                                     first_file, open_binary, positive_float, require_file, assemble, read_json,
                                     choose_image, counts_to_csr, names_of_kept_genes, resolve_duplicate_genes)
from agl.data.readers.registry import register_reader
from agl.errors import DataError

log = logging.getLogger(__name__)

# 10x Visium: spots 55 um wide.
VISIUM_SPOT_UM = 55.0
_POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


@dataclass
class TenXMatrix:
    """A 10x feature-barcode matrix, Gene Expression features only."""

    counts: sp.csr_matrix  # int32, barcodes x genes
    genes: list[str]  # gene symbols (features "name"), duplicates kept
    gene_ids: np.ndarray  # Ensembl IDs (features "id"; a probe set's "gene_id"), one per gene
    barcodes: np.ndarray
    path: Path


def read_10x_h5(path: Path, feature_type: str = "Gene Expression") -> TenXMatrix:
    """Counts (barcodes x genes, int32 CSR), gene symbols, gene IDs and barcodes of a 10x HDF5 matrix."""
    require_file(path, "10x feature-barcode matrix")
    try:
        with h5py.File(path, "r") as f:
            if "matrix" not in f:
                raise DataError(path, "no 'matrix' group: not a Space Ranger v3+ HDF5 matrix")
            m = f["matrix"]
            n_features, n_barcodes = (int(v) for v in m["shape"][:])
            # 10x stores features x barcodes in CSC, i.e. barcodes x features in CSR.
            data = m["data"][:]
            mat = sp.csr_matrix((data, m["indices"][:], m["indptr"][:]), shape=(n_barcodes, n_features))
            barcodes = decode_strings(m["barcodes"][:])
            names = decode_strings(m["features/name"][:])
            # probe-based runs (FFPE, CytAssist) list probes in "id" and the gene's ID in "gene_id"
            ids = decode_strings(m["features/gene_id" if "gene_id" in m["features"] else "features/id"][:])
            types = decode_strings(m["features/feature_type"][:]) if "feature_type" in m["features"] else None
    except DataError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise DataError(path, f"cannot read the 10x HDF5 matrix: {type(err).__name__}: {err}") from err
    if types is not None:
        keep = np.flatnonzero(types == feature_type)
        if len(keep) == 0:
            raise DataError(path, f"no {feature_type!r} features")
        mat, names, ids = mat[:, keep], names[keep], ids[keep]
    return TenXMatrix(counts_to_csr(mat, path, barcodes, names), list(names), ids, barcodes, path)


def _read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    new, old = spatial / "tissue_positions.csv", spatial / "tissue_positions_list.csv"
    if new.is_file():
        path, kw = new, {"header": 0}
    elif old.is_file():
        path, kw = old, {"header": None, "names": _POSITION_COLUMNS}
    else:
        raise DataError(new, "missing spot positions (tissue_positions.csv or tissue_positions_list.csv)")
    try:
        pos = pd.read_csv(path, engine="c", dtype={"barcode": str} if "names" not in kw else {0: str}, **kw)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(path, f"cannot read spot positions: {err}") from err
    missing = [c for c in _POSITION_COLUMNS if c not in pos.columns]
    if missing:
        raise DataError(path, f"lacks columns {missing}")
    return pos, path


def read_10x_mtx(folder: Path, feature_type: str = "Gene Expression") -> TenXMatrix:
    """Counts, gene symbols, gene IDs and barcodes of a 10x Matrix Market folder (``filtered_feature_bc_matrix/``).

    Space Ranger >= 1 / Cell Ranger >= 3 write ``matrix.mtx.gz``, ``features.tsv.gz`` (id, name,
    feature type) and ``barcodes.tsv.gz``; older runs ``genes.tsv`` (id, name) and plain files.
    """
    import scipy.io

    mtx = first_file(folder, ("matrix.mtx.gz", "matrix.mtx"))
    feats = first_file(folder, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
    bcs = first_file(folder, ("barcodes.tsv.gz", "barcodes.tsv"))
    for found, name in ((mtx, "matrix.mtx.gz"), (feats, "features.tsv.gz"), (bcs, "barcodes.tsv.gz")):
        if found is None:
            raise DataError(folder / name, "missing file of the 10x feature-barcode matrix")
    try:
        with open_binary(mtx) as fh:
            mat = sp.csr_matrix(scipy.io.mmread(fh)).T.tocsr()  # 10x writes features x barcodes
        features = pd.read_csv(feats, sep="\t", header=None, dtype=str, keep_default_na=False)
        barcodes = pd.read_csv(bcs, sep="\t", header=None, dtype=str, keep_default_na=False)[0].to_numpy(dtype=str)
    except (OSError, EOFError, ValueError, IndexError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(folder, f"cannot read the 10x matrix folder: {type(err).__name__}: {err}") from err
    if features.shape[1] < 2:
        raise DataError(feats, f"needs gene id and name columns, has {features.shape[1]}")
    if mat.shape != (len(barcodes), len(features)):
        raise DataError(mtx, f"matrix is {mat.shape[1]} features x {mat.shape[0]} barcodes but {feats.name} "
                             f"lists {len(features)} and {bcs.name} {len(barcodes)}")
    names, ids = features[1].to_numpy(dtype=str), features[0].to_numpy(dtype=str)
    if features.shape[1] >= 3:
        keep = np.flatnonzero(features[2].to_numpy(dtype=str) == feature_type)
        if len(keep) == 0:
            raise DataError(feats, f"no {feature_type!r} features")
        mat, names, ids = mat[:, keep], names[keep], ids[keep]
    return TenXMatrix(counts_to_csr(mat, mtx, barcodes, names), list(names), ids, barcodes, folder)


def _visium_matrix(outs: Path) -> TenXMatrix:
    """The filtered feature-barcode matrix of ``outs/``: the HDF5 file, else the Matrix Market folder."""
    h5, folder = outs / "filtered_feature_bc_matrix.h5", outs / "filtered_feature_bc_matrix"
    if h5.is_file():
        return read_10x_h5(h5)
    if folder.is_dir():
        return read_10x_mtx(folder)
    raise DataError(h5, "missing 10x feature-barcode matrix (filtered_feature_bc_matrix.h5 or the "
                        "filtered_feature_bc_matrix/ folder): is this a Space Ranger outs/ folder?")


# Space Ranger's spatial/ images and the scale factor from full-resolution pixels to each.
VISIUM_IMAGES = (("tissue_hires_image.png", "tissue_hires_scalef"), ("tissue_lowres_image.png", "tissue_lowres_scalef"))


@register_reader("visium", help="10x Visium: a Space Ranger outs/ folder")
def read_visium(outs_dir: str | Path, image_path: str | Path | None = None, *,
                slide_id: str | None = None, duplicate_genes: str = "error",
                strict: bool = False) -> ad.AnnData:
    """Read a Space Ranger ``outs/`` folder as Space Ranger writes it.

    Counts: ``filtered_feature_bc_matrix.h5`` (or the ``filtered_feature_bc_matrix/`` Matrix
    Market folder), Gene Expression features only. Positions: ``spatial/tissue_positions.csv``
    (Space Ranger >= 2, header) or ``tissue_positions_list.csv`` (1.x, no header). Scale:
    ``spatial/scalefactors_json.json``; ``microns_per_pixel = 55 / (spot_diameter_fullres * s)``
    where ``s`` is 1 for the full-resolution ``image_path`` (``--image``; TIFF included), else
    ``tissue_hires_scalef`` for ``spatial/tissue_hires_image.png`` (pixel positions scaled alike,
    with a warning stating the resulting pixel size). Genes are named by symbol; their Ensembl
    IDs stay in ``var["gene_ids"]``, so a model trained on either finds them.
    """
    from agl.data.patches import image_size

    outs = Path(outs_dir)
    tenx = _visium_matrix(outs)
    barcodes, matrix = tenx.barcodes, tenx.path
    check_unique_barcodes(barcodes, matrix)
    names = names_of_kept_genes(tenx.genes, {"gene_ids": tenx.gene_ids})
    counts, genes = resolve_duplicate_genes(tenx.counts, tenx.genes, matrix, duplicate_genes)
    pos, pos_path = _read_positions(outs / "spatial")
    pos_ids = pd.Index(pos["barcode"].astype(str))
    check_unique_barcodes(pos_ids, pos_path)
    # Positions list every spot on the slide; only barcodes of the matrix without a position matter.
    missing = pd.Index(barcodes).difference(pos_ids, sort=False)
    if len(missing):
        problem = f"{len(missing)} barcodes have no position in {pos_path.name} (e.g. {list(missing[:3])})"
        if strict:
            raise DataError(matrix, problem)
        log.warning("%s: %s; dropped them", matrix, problem)
    rows = np.flatnonzero(pd.Index(barcodes).isin(pos_ids))
    if len(rows) == 0:
        raise DataError(matrix, f"no barcode has a position in {pos_path.name}")
    pos = pos.iloc[pos_ids.get_indexer(barcodes[rows])]
    pixels = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    check_pixels(pixels, barcodes[rows], pos_path)

    sf_path = outs / "spatial" / "scalefactors_json.json"
    scalefactors = read_json(sf_path, "scale factors")
    if not isinstance(scalefactors, dict) or "spot_diameter_fullres" not in scalefactors:
        raise DataError(sf_path, "lacks spot_diameter_fullres")
    diameter_px = positive_float(scalefactors["spot_diameter_fullres"], sf_path, "spot_diameter_fullres")
    spatial = outs / "spatial"
    candidates = [ScaledImage(name, key, name.removesuffix(".png"), spatial / name,
                              size=lambda f=spatial / name: image_size(f), file=lambda f=spatial / name: f)
                  for name, key in VISIUM_IMAGES if (spatial / name).is_file()]
    image, scale, kind = choose_image(
        outs, image_path, pixels, candidates, scalefactors, sf_path, sf_path.name, VISIUM_SPOT_UM / diameter_px,
        missing=DataError(spatial, "no image: neither spatial/tissue_hires_image.png nor tissue_lowres_image.png "
                                   "(Space Ranger writes them) and no --image; pass the full-resolution image with "
                                   "--image (images outside outs/ are never picked implicitly)"))
    sid = slide_id or (outs.parent.name if outs.name == "outs" else outs.name)
    info = {
        "image_path": str(image.absolute()),
        "microns_per_pixel": VISIUM_SPOT_UM / (diameter_px * scale),
        "spot_diameter_um": VISIUM_SPOT_UM,
        "source_format": "visium",
        "source_files": [str(p.absolute()) for p in (matrix, pos_path, sf_path, image)],
        "dropped_spots": int(len(missing)),
        "image_kind": kind,  # full-resolution, tissue_hires_image or tissue_lowres_image
        "image_scalef": scale,  # image pixels per full-resolution pixel
    }
    extra = {"array_row": pos["array_row"].to_numpy(np.int64), "array_col": pos["array_col"].to_numpy(np.int64)}
    return assemble([SlideData(sid, counts[rows], genes, barcodes[rows], pixels * scale, info, extra, str(matrix),
                               var_extra=names)])
