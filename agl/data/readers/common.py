"""Shared pieces of the readers: the one-slide record, count and position checks, assembly, images.

Every reader returns one AnnData that passes :func:`agl.data.schema.validate_canonical`
(built by :func:`assemble`) and raises :class:`agl.errors.DataError` naming the offending
file and the problem.
"""
from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from agl.data import schema
from agl.errors import DataError, show

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".svs", ".btf")
DUPLICATE_POLICIES = ("error", "sum", "first")
_INT32_MAX = np.iinfo(np.int32).max


@dataclass
class SlideData:
    """One slide before assembly: counts aligned with genes and spot positions."""

    slide_id: str
    counts: sp.csr_matrix  # int32, spots x genes
    genes: list[str]
    barcodes: np.ndarray  # str, one per spot
    pixels: np.ndarray  # float64 (n, 2): x = column, y = row, full-resolution pixels
    meta: dict[str, Any]  # uns["slides"][slide_id]
    obs_extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. array_row / array_col
    source: str = ""  # the file that defines the gene list, for error messages
    var_extra: dict[str, np.ndarray] = field(default_factory=dict)  # other names per gene, e.g. gene_ids


# --------------------------------------------------------------------------- shared checks


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(path, f"missing {what}")
    return path


def counts_to_csr(values: Any, path: Path | str, barcodes: Sequence[str] | None = None,
                  genes: Sequence[str] | None = None, what: str = "counts") -> sp.csr_matrix:
    """Check raw counts (dense array or sparse matrix) and return them as int32 CSR.

    Raises DataError on NaN/inf, negative, non-integer or int32-overflowing values, naming
    the first offending spot and gene when the labels are given.
    """
    mat = sp.csr_matrix(values) if not sp.issparse(values) else values.tocsr()
    if mat.dtype.kind not in "biuf":
        raise DataError(path, f"{what} must be numeric, got dtype {mat.dtype}")
    data = mat.data

    def where(mask: np.ndarray) -> str:
        k = int(np.flatnonzero(mask)[0])
        row = int(np.searchsorted(mat.indptr, k, side="right") - 1)
        col = int(mat.indices[k])
        spot = barcodes[row] if barcodes is not None else f"row {row}"
        gene = genes[col] if genes is not None else f"column {col}"
        return f"{int(mask.sum())} values, first at spot {show(spot)}, gene {show(gene)}: {show(data[k])}"

    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise DataError(path, f"NaN or infinite {what} ({where(bad)})")
        bad = data != np.round(data)
        if bad.any():
            raise DataError(path, f"{what} are not integers (raw UMI counts expected; {where(bad)})")
    bad = data < 0
    if bad.any():
        raise DataError(path, f"negative {what} ({where(bad)})")
    bad = data > _INT32_MAX
    if bad.any():
        raise DataError(path, f"{what} overflow int32 ({where(bad)})")
    out = sp.csr_matrix((data.astype(np.int32), mat.indices, mat.indptr), shape=mat.shape)
    out.eliminate_zeros()
    out.sort_indices()
    return out


def resolve_duplicate_genes(counts: sp.csr_matrix, genes: Sequence[str], path: Path | str,
                            policy: str = "error") -> tuple[sp.csr_matrix, list[str]]:
    """Make gene symbols unique: ``"error"`` raises naming duplicates, ``"sum"`` adds their columns,
    ``"first"`` keeps the first column of each symbol (the output keeps first-appearance order either way)."""
    if policy not in DUPLICATE_POLICIES:
        raise DataError(path, f"duplicate_genes must be one of {DUPLICATE_POLICIES}, got {policy!r}")
    index = pd.Index([str(g) for g in genes])
    if index.is_unique:
        return counts, list(index)
    dups = index[index.duplicated()].unique()
    if policy == "error":
        shown = ", ".join(map(show, dups[:5])) + (" ..." if len(dups) > 5 else "")
        raise DataError(path, f"{len(dups)} duplicate gene symbols ({shown}); pass duplicate_genes='sum' "
                              "(--duplicate-genes sum) to add their counts, or 'first' to keep the first")
    if policy == "first":
        first = np.flatnonzero(~index.duplicated())
        log.warning("%s: kept the first of each of %d duplicate gene symbols", path, len(dups))
        return counts[:, first].tocsr(), list(index[first])
    codes, uniques = pd.factorize(index)  # keeps first-appearance order
    # Column j of the input goes to column codes[j]: a 0/1 indicator matrix sums duplicates.
    merge = sp.csr_matrix((np.ones(len(codes), np.int32), (np.arange(len(codes)), codes)),
                          shape=(len(codes), len(uniques)))
    log.warning("%s: summed the counts of %d duplicate gene symbols", path, len(dups))
    return (counts @ merge).tocsr().astype(np.int32), list(uniques)


def names_of_kept_genes(genes: Sequence[str], names: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Other names per gene (e.g. ``gene_ids``) of the genes :func:`resolve_duplicate_genes` keeps.

    Every policy keeps each symbol's first column, in first-appearance order: its names follow it.
    """
    firsts = np.flatnonzero(~pd.Index([str(g) for g in genes]).duplicated())
    return {k: np.asarray(v, dtype=str)[firsts] for k, v in names.items()}


def check_unique_barcodes(barcodes: Iterable[str], path: Path | str) -> None:
    index = pd.Index(list(barcodes))
    if not index.is_unique:
        dups = index[index.duplicated()].unique()
        shown = ", ".join(map(show, dups[:5]))
        raise DataError(path, f"{len(dups)} duplicate spot barcodes ({shown})")


def check_pixels(pixels: np.ndarray, barcodes: np.ndarray, path: Path | str) -> None:
    bad = ~np.isfinite(pixels).all(axis=1)
    if bad.any():
        raise DataError(path, f"{int(bad.sum())} spots lack finite pixel coordinates "
                              f"(e.g. {barcodes[bad][:3].tolist()})")


def single_image(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> Path | None:
    """The one image file directly in ``folder``; None if none; DataError if ambiguous."""
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if len(found) > 1:
        raise DataError(folder, f"{len(found)} candidate images ({[p.name for p in found]}); "
                                "pass --image to choose one")
    return found[0] if found else None


def read_json(path: Path, what: str) -> Any:
    """A required JSON file (``what`` names it in errors)."""
    require_file(path, what)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(path, f"cannot read the {what} JSON: {err}") from err


def positive_float(value: Any, path: Path, key: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(path, f"{key} must be a number, got {show(value)}") from None
    if not np.isfinite(out) or out <= 0:
        raise DataError(path, f"{key} must be positive, got {show(value)}")
    return out


def decode_strings(values: np.ndarray) -> np.ndarray:
    flat = np.asarray(values).reshape(len(values), -1)[:, 0] if np.ndim(values) > 1 else np.asarray(values)
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat], dtype=str)


def read_h5ad_file(path: Path) -> ad.AnnData:
    require_file(path, "AnnData file")
    try:
        return ad.read_h5ad(path)
    except Exception as err:  # anndata/h5py raise many types for damaged files
        raise DataError(path, f"cannot read the AnnData file: {type(err).__name__}: {err}") from err


def raw_counts_of(adata: ad.AnnData, path: Path) -> tuple[Any, str]:
    """Raw counts of an AnnData: layers["counts"] if present, else X (which must be integer)."""
    if "counts" in adata.layers:
        return adata.layers["counts"], "layers['counts']"
    if adata.X is None:
        raise DataError(path, "no counts: X is empty and there is no layers['counts']")
    return adata.X, "X"


def open_text(path: Path) -> Any:
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"  # gzip by content: suffixes lie
    return gzip.open(path, "rt") if gz else open(path)


def open_binary(path: Path) -> Any:
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def first_file(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- assembly


def assemble(slides: Sequence[SlideData]) -> ad.AnnData:
    """Stack slides into one canonical AnnData, intersecting differing gene sets."""
    if not slides:
        raise DataError(None, "no slides to read")
    ids = [s.slide_id for s in slides]
    if len(set(ids)) != len(ids):
        raise DataError(None, f"duplicate slide ids {show(sorted({i for i in ids if ids.count(i) > 1}))}")
    common = pd.Index(slides[0].genes)
    for s in slides[1:]:
        common = common[common.isin(s.genes)]  # keeps the first slide's order
    if len(common) == 0:
        raise DataError(slides[0].source or None, "the slides share no gene symbols")
    blocks, uns, obs_parts = [], {}, []
    for s in slides:
        dropped = len(s.genes) - len(common)
        if dropped:
            log.warning("%s: slide %s has %d genes that other slides lack; dropped them "
                        "(%d genes kept)", s.source or s.slide_id, s.slide_id, dropped, len(common))
        cols = pd.Index(s.genes).get_indexer(common)
        blocks.append(s.counts if np.array_equal(cols, np.arange(len(s.genes))) else s.counts[:, cols])
        meta = dict(s.meta)
        meta["dropped_genes"] = int(dropped)
        meta["n_spots"] = int(s.counts.shape[0])
        uns[s.slide_id] = meta
        obs = pd.DataFrame({
            schema.OBS_SLIDE: s.slide_id,
            schema.OBS_BARCODE: s.barcodes.astype(str),
            schema.OBS_PX: s.pixels[:, 0].astype(np.float64),
            schema.OBS_PY: s.pixels[:, 1].astype(np.float64),
            **s.obs_extra,
        })
        obs.index = [schema.spot_index(s.slide_id, b) for b in obs[schema.OBS_BARCODE]]
        obs_parts.append(obs)
    obs = pd.concat(obs_parts)
    obs[schema.OBS_SLIDE] = pd.Categorical(obs[schema.OBS_SLIDE], categories=ids)
    X = sp.vstack(blocks, format="csr", dtype=np.int32)
    # other names of the genes (agl.data.genes.ALIAS_COLUMNS), as the first slide lists them
    at = pd.Index(slides[0].genes).get_indexer(common)
    var = pd.DataFrame({k: np.asarray(v, dtype=str)[at] for k, v in slides[0].var_extra.items()},
                       index=pd.Index(common, dtype=str))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm[schema.OBSM_SPATIAL] = obs[[schema.OBS_PX, schema.OBS_PY]].to_numpy(np.float64)
    adata.uns[schema.UNS_SLIDES] = uns
    schema.validate_canonical(adata, "reader output")
    return adata


def join_spots(count_ids: pd.Index, pos_ids: pd.Index, counts_path: Path, pos_path: Path,
                strict: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows of counts and positions that share a spot id; warn about (or refuse) the rest."""
    only_counts = count_ids.difference(pos_ids, sort=False)
    only_pos = pos_ids.difference(count_ids, sort=False)
    for path, other, extra in ((counts_path, pos_path, only_counts), (pos_path, counts_path, only_pos)):
        if len(extra):
            problem = (f"{len(extra)} spots have no match in {other.name} "
                       f"(e.g. {list(extra[:3])})")
            if strict:
                raise DataError(path, problem)
            log.warning("%s: %s; dropped them", path, problem)
    keep = count_ids.isin(pos_ids)
    rows = np.flatnonzero(keep)
    pos_rows = pos_ids.get_indexer(count_ids[rows])
    return rows, pos_rows, len(only_counts) + len(only_pos)


# --------------------------------------------------------------------------- downscaled images (Visium, scanpy)


def spots_outside(pixels: np.ndarray, size: tuple[int, int]) -> int:
    return int(((pixels < 0) | (pixels >= np.asarray(size, dtype=np.float64))).any(axis=1).sum())


@dataclass(frozen=True)
class ScaledImage:
    """A downscaled image that comes with a Visium slide, and the factor from full-resolution pixels to it.

    Space Ranger writes them as ``spatial/tissue_{hires,lowres}_image.png``; scanpy keeps them as
    arrays in ``uns['spatial'][library]['images']``. ``size`` and ``file`` are only called for the
    image chosen, so a file holding one that is not used is never decoded or written out.
    """

    label: str  # how messages name it: tissue_hires_image.png, uns['spatial']['A1']['images']['hires']
    key: str  # its scale factor: tissue_hires_scalef or tissue_lowres_scalef
    kind: str  # recorded as image_kind: tissue_hires_image or tissue_lowres_image
    where: Path  # the file errors about it name
    size: Callable[[], tuple[int, int]]  # (width, height)
    file: Callable[[], Path]  # the image file patches are cut from


def choose_image(where: Path, image_path: str | Path | None, pixels: np.ndarray, candidates: Sequence[ScaledImage],
                 scalefactors: dict[str, Any], sf_where: Path, sf_label: str, full_mpp: float,
                 missing: DataError) -> tuple[Path, float, str]:
    """The image to cut patches from, the factor from full-resolution pixels to it, and its kind.

    ``image_path`` (``--image``) is taken as full resolution (spots must fall inside it; if they
    fit a downscaled image instead, the error says so); without it, the first of ``candidates``
    (hires before lowres) with its factor from ``scalefactors``, checked against its size, and a
    warning stating the resulting microns per pixel. ``missing`` is raised when there is neither.
    """
    from agl.data.patches import image_size

    if image_path is not None:
        image = require_file(Path(image_path), "full-resolution image (--image)")
        size = image_size(image)
        n_out = spots_outside(pixels, size)
        if n_out:
            fits = [c for c in candidates if c.key in scalefactors
                    and not spots_outside(pixels * float(scalefactors[c.key]), size)]
            hint = (f"its size fits {fits[0].label} (spots scaled by {fits[0].key}): omit --image to use that "
                    "image with its scale factor, or pass the full-resolution image" if fits else
                    "pass the full-resolution image of this slide with --image")
            raise DataError(image, f"{n_out} of {len(pixels)} spot centres (full-resolution pixels) lie "
                                   f"outside this {size[0]}x{size[1]} image given with --image: {hint}")
        return image, 1.0, "full-resolution"
    for c in candidates:
        if c.key not in scalefactors:
            raise DataError(sf_where, f"{sf_label} lacks {c.key}, needed to use {c.label}")
        scale = positive_float(scalefactors[c.key], sf_where, f"{sf_label} {c.key}")
        size = c.size()
        n_out = spots_outside(pixels * scale, size)
        if n_out:
            raise DataError(c.where, f"{n_out} of {len(pixels)} spot centres fall outside this {size[0]}x{size[1]} "
                                     f"image after scaling by {c.key}={scale:g} (from {sf_label}): the scale "
                                     f"factors do not belong to {c.label}")
        log.warning("%s: no --image given: patches come from %s, %s=%g, i.e. %.3g um per pixel (the "
                    "full-resolution image has %.3g); pass the full-resolution image with --image for full detail",
                    where, c.label, c.key, scale, full_mpp / scale, full_mpp)
        return c.file(), scale, c.kind
    raise missing


# --------------------------------------------------------------------------- pseudo-spots (Visium HD bins, Xenium)


def square_index(xy_um: np.ndarray, side_um: float) -> tuple[np.ndarray, np.ndarray]:
    """The square pseudo-spot (``side_um`` wide, a grid anchored at 0) of each point, as (squares [m, 2] of
    integer (column, row) indices in first-appearance order, each point's square number)."""
    cells = np.floor(np.asarray(xy_um, dtype=np.float64) / side_um).astype(np.int64)
    squares, which = np.unique(cells, axis=0, return_inverse=True)
    return squares, which.ravel()


def pool_rows(which: np.ndarray, n_squares: int, counts: sp.csr_matrix) -> sp.csr_matrix:
    """Sum the rows of ``counts`` that share a square (``which``): exact integer sums, int64 then checked."""
    member = sp.csr_matrix((np.ones(len(which), np.int64), (which, np.arange(len(which)))),
                           shape=(n_squares, len(which)))
    return (member @ counts.astype(np.int64)).tocsr()


def pseudo_spot_id(squares: np.ndarray, side_um: float) -> np.ndarray:
    """Barcodes of square pseudo-spots: their size and grid position (``sq112um_c00012_r00034``)."""
    return np.array([f"sq{side_um:g}um_c{c:05d}_r{r:05d}" for c, r in squares], dtype=str)


def check_side(side_um: float, step_um: float, flag: str, step_flag: str) -> int:
    """How many ``step_um`` units make one ``side_um`` square; DataError naming the flags if not a whole number."""
    k = side_um / step_um
    if not (np.isfinite(k) and k >= 1 and abs(k - round(k)) < 1e-9):
        raise DataError(None, f"{flag} {side_um:g} is not a whole multiple of {step_flag} {step_um:g}: pseudo-spots "
                              f"pool whole bins; choose e.g. {flag} {max(1, round(k)) * step_um:g}")
    return int(round(k))
