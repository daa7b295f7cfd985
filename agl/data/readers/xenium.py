"""10x Xenium with its post-Xenium H&E: transcripts (or cells) pooled into square pseudo-spots, the H&E placed
through the alignment Xenium Explorer exports; registered as ``xenium``.

The bundle (Xenium Onboard Analysis output) holds ``experiment.xenium`` (JSON; ``pixel_size``, 0.2125 um per
morphology-image pixel), ``transcripts.parquet`` (x_location, y_location in um, feature_name, qv, ...),
``cells.parquet`` (cell_id, x_centroid, y_centroid in um) and ``cell_feature_matrix.h5`` (the 10x HDF5 schema).
The H&E is a separate image; ``*_he_imagealignment.csv`` is a 3 x 3 affine from H&E pixels to morphology pixels
(10x: "How can I convert coordinates between H&E image and Xenium data"; microns = pixels x pixel_size).
Xenium Explorer can export the keypoints instead (header ``fixedX,fixedY,alignmentX,alignmentY``; fixed: Xenium
morphology-image pixels, like the matrix's output; alignment: H&E pixels): an affine is fitted to them and scaled
by ``pixel_size`` as the matrix is. Checked against keypoints files written for Xenium Explorer by Xenium-Align
(github.com/YuLin-code/Xenium-Align: fixed = cell microns / pixel_size; their fit gives 1.78 morphology pixels per
H&E pixel, i.e. 0.38 um H&E pixels, where microns would give 1.78 um pixels and slides over 3 cm long).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from agl.data.readers.common import (SlideData, decode_strings, positive_float, require_file, assemble, counts_to_csr,
                                     pool_rows, pseudo_spot_id, read_json, resolve_duplicate_genes, square_index)
from agl.data.readers.registry import register_reader
from agl.data.readers.visium import read_10x_h5
from agl.errors import DataError, show

log = logging.getLogger(__name__)

DEFAULT_SPOT_UM = 112.0  # the default patch width: each pseudo-spot's counts come from exactly its patch's tissue
DEFAULT_MIN_QV = 20.0  # Xenium's own cell-feature matrix counts transcripts with qv >= 20 (a Phred-scaled score)
COUNTS_FROM = ("auto", "transcripts", "cells")
# feature_name prefixes of Xenium's control probes and codewords, never genes (used when no is_gene column)
CONTROL_PREFIXES = ("NegControlProbe_", "NegControlCodeword_", "BLANK_", "UnassignedCodeword_", "DeprecatedCodeword_",
                    "antisense_", "Intergenic_")
KEYPOINT_COLUMNS = ("fixedX", "fixedY", "alignmentX", "alignmentY")
_MAX_OUTSIDE = 0.1  # pseudo-spots outside the H&E tolerated (dropped, with a warning); more: the alignment is wrong


def _pixel_size(bundle: Path) -> float:
    path = bundle / "experiment.xenium"
    spec = read_json(path, "experiment.xenium (is this a Xenium output bundle?)")
    if not isinstance(spec, dict) or "pixel_size" not in spec:
        raise DataError(path, "lacks pixel_size (microns per morphology-image pixel)")
    return positive_float(spec["pixel_size"], path, "pixel_size")


def _find_alignment(bundle: Path, alignment_path: str | Path | None) -> Path:
    if alignment_path is not None:
        return require_file(Path(alignment_path), "H&E alignment (--alignment)")
    found = sorted(bundle.glob("*imagealignment.csv")) + sorted(bundle.glob("*keypoints*.csv"))
    he = [p for p in found if "he_" in p.name.lower() or "keypoints" in p.name.lower()]
    if len(he) == 1:
        return he[0]
    raise DataError(bundle, ("no" if not he else f"{len(he)}") + " H&E alignment files (*_he_imagealignment.csv "
                    "from Xenium Explorer) in the bundle" + (f": {[p.name for p in he]}" if he else "")
                    + "; pass the H&E-to-Xenium alignment with --alignment CSV")


def read_alignment(path: Path, pixel_size: float) -> np.ndarray:
    """The 3 x 3 affine from H&E pixels to Xenium microns, from a transformation matrix CSV (H&E pixels to
    morphology pixels) or a keypoints CSV (H&E pixels and morphology pixels; least squares over >= 3 pairs), both
    scaled here by ``pixel_size``."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(path, f"cannot read the alignment: {err}") from err
    first = text.splitlines()[0] if text else ""
    if all(c in first for c in KEYPOINT_COLUMNS):
        points = pd.read_csv(path)
        xy = points[list(KEYPOINT_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
        xy = xy[np.isfinite(xy).all(axis=1)]
        design = np.column_stack([xy[:, 2:], np.ones(len(xy))])
        if len(xy) < 3 or np.linalg.matrix_rank(design) < 3:
            raise DataError(path, f"{len(xy)} usable keypoints, not spanning two directions: an affine needs at least "
                                  "3 keypoints not on one line; place more in Xenium Explorer or pass --alignment "
                                  "with the exported transformation matrix")
        coef, *_ = np.linalg.lstsq(design, xy[:, :2], rcond=None)
        matrix = np.vstack([coef.T, [0.0, 0.0, 1.0]])  # H&E pixels -> morphology pixels, as the exported matrix
    else:
        try:
            matrix = np.array([[float(v) for v in line.replace(";", ",").split(",") if v.strip()]
                               for line in text.splitlines() if line.strip()], dtype=np.float64)
        except ValueError as err:
            raise DataError(path, f"not a 3 x 3 numeric matrix nor a keypoints table ({', '.join(KEYPOINT_COLUMNS)}): "
                                  f"{err}") from err
        if matrix.shape != (3, 3):
            raise DataError(path, f"the alignment matrix is {matrix.shape[0]} x "
                                  f"{matrix.shape[1] if matrix.ndim == 2 else '?'}, a 3 x 3 affine expected")
    um = matrix * np.array([[pixel_size], [pixel_size], [1.0]])
    if not np.isfinite(um).all() or not np.allclose(um[2], [0.0, 0.0, 1.0]):
        raise DataError(path, f"not an affine (last row {show(um[2].tolist())}, [0, 0, 1] expected, or non-finite)")
    det = float(np.linalg.det(um[:2, :2]))
    if not abs(det) > 1e-12 * max(1.0, float(np.abs(um[:2, :2]).max()) ** 2):
        raise DataError(path, f"the alignment is singular (determinant {det:.3g}): it maps the H&E onto a line; "
                              "export the alignment again from Xenium Explorer (--alignment)")
    return um


def _gene_mask(names: np.ndarray, is_gene: np.ndarray | None) -> np.ndarray:
    if is_gene is not None:
        return np.asarray(is_gene, dtype=bool)
    return ~pd.Series(names).str.startswith(CONTROL_PREFIXES).to_numpy()


def _transcripts(path: Path, min_qv: float) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """Positions (um), gene codes and gene names of the gene transcripts with qv >= ``min_qv``; and how many fell
    below it. Only the needed columns are read; the qv filter is applied while reading."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        need = ["x_location", "y_location", "feature_name", "qv"]
        missing = [c for c in need if c not in schema.names]
        if missing:
            raise DataError(path, f"lacks columns {missing} (Xenium transcripts.parquet has {', '.join(need)})")
        columns = need + (["is_gene"] if "is_gene" in schema.names else [])
        table = pq.read_table(path, columns=columns)
    except DataError:
        raise
    except Exception as err:  # pyarrow raises several types for damaged files
        raise DataError(path, f"cannot read the transcripts: {type(err).__name__}: {err}") from err
    n_all = table.num_rows
    table = table.filter(pc.greater_equal(table["qv"], min_qv))
    names = decode_strings(table["feature_name"].to_numpy(zero_copy_only=False))
    gene = _gene_mask(names, table["is_gene"].to_numpy(zero_copy_only=False) if "is_gene" in table.column_names
                      else None)
    codes, genes = pd.factorize(names[gene], sort=True)
    xy = np.column_stack([table["x_location"].to_numpy(), table["y_location"].to_numpy()]).astype(np.float64)[gene]
    return xy, codes, [str(g) for g in genes], n_all - table.num_rows


def _cells(bundle: Path) -> tuple[np.ndarray, sp.csr_matrix, list[str], Path]:
    """Cell centroids (um) and the cell-feature matrix rows in the same order."""
    tenx = read_10x_h5(bundle / "cell_feature_matrix.h5")
    path = require_file(bundle / "cells.parquet", "cells.parquet (cell centroids)")
    try:
        cells = pd.read_parquet(path, columns=["cell_id", "x_centroid", "y_centroid"])
    except Exception as err:
        raise DataError(path, f"cannot read cell centroids (cell_id, x_centroid, y_centroid): "
                              f"{type(err).__name__}: {err}") from err
    ids = pd.Index(decode_strings(cells["cell_id"].to_numpy()))
    at = ids.get_indexer(tenx.barcodes)
    if (at < 0).any():
        raise DataError(tenx.path, f"{int((at < 0).sum())} cells have no centroid in {path.name} "
                                   f"(e.g. {list(tenx.barcodes[at < 0][:3])})")
    xy = cells[["x_centroid", "y_centroid"]].to_numpy(np.float64)[at]
    return xy, tenx.counts, tenx.genes, tenx.path


def _he_image(bundle: Path, image_path: str | Path | None) -> Path:
    if image_path is not None:
        return require_file(Path(image_path), "H&E image (--he)")
    found = sorted(bundle.glob("*he_image*.tif*"))
    if len(found) == 1:
        return found[0]
    raise DataError(bundle, "no H&E image given: pass the post-Xenium H&E with --he IMAGE" +
                    (f" (the bundle has {[p.name for p in found]})" if found else ""))


@register_reader("xenium", help="10x Xenium bundle + its H&E and alignment: transcripts or cells pooled into squares")
def read_xenium(bundle_dir: str | Path, image_path: str | Path | None = None, *, alignment_path: str | Path | None = None,
                spot_um: float = DEFAULT_SPOT_UM, min_qv: float = DEFAULT_MIN_QV, counts_from: str = "auto",
                slide_id: str | None = None, duplicate_genes: str = "error") -> ad.AnnData:
    """Read a Xenium bundle with its H&E: gene transcripts of ``qv >= min_qv`` (``--min-qv``; control probes left
    out) or, with ``counts_from="cells"`` (``--xenium-counts cells``; ``auto`` takes them when there is no
    ``transcripts.parquet``), the cell-feature matrix by cell centroid, summed into ``spot_um`` squares of the
    Xenium micron grid (``--spot-um``; default 112 um, the default patch width). Each square's centre is placed
    in the H&E (``--he``) through the inverse of the alignment (``--alignment``: Xenium Explorer's
    ``*_he_imagealignment.csv`` or its keypoints CSV), and the H&E's pixel size is ``sqrt|det|`` of the affine's
    linear part in microns per H&E pixel. Squares whose centre falls outside the H&E are dropped with a warning (more than 10%: an
    error, the alignment or image is wrong).
    """
    from agl.data.patches import image_size

    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise DataError(bundle, "missing Xenium output bundle folder")
    if counts_from not in COUNTS_FROM:
        raise DataError(bundle, f"--xenium-counts must be one of {', '.join(COUNTS_FROM)}, got {counts_from!r}")
    spot_um = positive_float(spot_um, bundle, "--spot-um")
    pixel_size = _pixel_size(bundle)
    align_path = _find_alignment(bundle, alignment_path)
    to_um = read_alignment(align_path, pixel_size)
    image = _he_image(bundle, image_path)
    transcripts = bundle / "transcripts.parquet"
    if counts_from == "auto":
        counts_from = "transcripts" if transcripts.is_file() else "cells"
        if counts_from == "cells":
            log.warning("%s: no transcripts.parquet: pooling cells of cell_feature_matrix.h5 by centroid "
                        "(Xenium counts transcripts with qv >= 20 there; --min-qv does not apply)", bundle)
    n_low_qv = 0
    if counts_from == "transcripts":
        min_qv = float(min_qv)
        if not np.isfinite(min_qv) or min_qv < 0:
            raise DataError(bundle, f"--min-qv must be a number >= 0, got {min_qv}")
        require_file(transcripts, "transcripts.parquet (or pass --xenium-counts cells)")
        xy, codes, genes, n_low_qv = _transcripts(transcripts, min_qv)
        if len(xy) == 0:
            raise DataError(transcripts, f"no gene transcript has qv >= {min_qv:g}; lower --min-qv")
        squares, which = square_index(xy, spot_um)
        pooled = sp.csr_matrix((np.ones(len(which), np.int64), (which, codes)), shape=(len(squares), len(genes)))
        source = transcripts
    else:
        xy, counts, genes, source = _cells(bundle)
        squares, which = square_index(xy, spot_um)
        pooled = pool_rows(which, len(squares), counts)
    pooled = counts_to_csr(pooled, source, what="pooled counts")
    pooled, genes = resolve_duplicate_genes(pooled, genes, source, duplicate_genes)
    centre_um = (squares + 0.5) * spot_um
    pixels = (np.column_stack([centre_um, np.ones(len(centre_um))]) @ np.linalg.inv(to_um).T)[:, :2]
    width, height = image_size(image)
    outside = ((pixels < 0) | (pixels >= np.array([width, height], dtype=np.float64))).any(axis=1)
    if outside.mean() > _MAX_OUTSIDE:
        raise DataError(image, f"{int(outside.sum())} of {len(pixels)} pseudo-spot centres fall outside this "
                               f"{width}x{height} H&E after the alignment {align_path.name}: the image does not cover "
                               "the transcripts; check --he and --alignment (H&E pixels to Xenium, as Xenium "
                               "Explorer exports it)")
    if outside.any():
        log.warning("%s: %d of %d pseudo-spots lie outside the H&E; dropped them", image, int(outside.sum()),
                    len(pixels))
    keep = ~outside
    log.info("%s: %s pooled into %d pseudo-spots of %g um (%s)", bundle,
             f"{len(which)} gene transcripts with qv >= {min_qv:g} ({n_low_qv} below)" if counts_from == "transcripts"
             else f"{len(which)} cells", int(keep.sum()), spot_um, align_path.name)
    mpp = float(np.sqrt(abs(np.linalg.det(to_um[:2, :2]))))  # microns per H&E pixel (area scale of the affine)
    sid = slide_id or bundle.name
    meta: dict[str, Any] = {
        "image_path": str(image.absolute()),
        "microns_per_pixel": mpp,
        "spot_diameter_um": spot_um,
        "spot_shape": "square",
        "source_format": "xenium",
        "source_files": [str(p.absolute()) for p in (bundle / "experiment.xenium", source, align_path, image)],
        "xenium_counts": counts_from,
        "min_qv": float(min_qv) if counts_from == "transcripts" else None,
        "low_qv_transcripts": int(n_low_qv),
        "alignment_um_from_he_px": to_um.tolist(),
        "dropped_spots": int(outside.sum()),
    }
    n_items = np.bincount(which, minlength=len(squares))
    extra = {"array_col": squares[keep, 0], "array_row": squares[keep, 1],
             ("n_transcripts" if counts_from == "transcripts" else "n_cells"): n_items[keep]}
    return assemble([SlideData(sid, pooled[keep], genes, pseudo_spot_id(squares[keep], spot_um), pixels[keep], meta,
                               extra, str(source))])
