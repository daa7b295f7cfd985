"""Readers from real spatial-transcriptomics layouts into the canonical AnnData.

Every reader returns one AnnData that passes :func:`agl.data.schema.validate_canonical`
and raises :class:`agl.errors.DataError` naming the offending file and the problem.
Formats: the her2st release (legacy ST), HEST-1k, 10x Space Ranger ``outs/`` and a
generic ``.h5ad``. :data:`READERS` maps a format name to its reader;
:func:`read_slides` dispatches through it.
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from agl.data import schema
from agl.data.genes import alias_columns
from agl.errors import DataError, show

log = logging.getLogger(__name__)

# Legacy ST (her2st): spot centres 200 um apart on the array grid, spots 100 um wide.
ST_GRID_UM = 200.0
ST_SPOT_UM = 100.0
# 10x Visium: spots 55 um wide.
VISIUM_SPOT_UM = 55.0
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


def _require_file(path: Path, what: str) -> Path:
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


def _check_unique_barcodes(barcodes: Iterable[str], path: Path | str) -> None:
    index = pd.Index(list(barcodes))
    if not index.is_unique:
        dups = index[index.duplicated()].unique()
        shown = ", ".join(map(show, dups[:5]))
        raise DataError(path, f"{len(dups)} duplicate spot barcodes ({shown})")


def _check_pixels(pixels: np.ndarray, barcodes: np.ndarray, path: Path | str) -> None:
    bad = ~np.isfinite(pixels).all(axis=1)
    if bad.any():
        raise DataError(path, f"{int(bad.sum())} spots lack finite pixel coordinates "
                              f"(e.g. {barcodes[bad][:3].tolist()})")


def _single_image(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> Path | None:
    """The one image file directly in ``folder``; None if none; DataError if ambiguous."""
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if len(found) > 1:
        raise DataError(folder, f"{len(found)} candidate images ({[p.name for p in found]}); "
                                "pass --image to choose one")
    return found[0] if found else None


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


def _join_spots(count_ids: pd.Index, pos_ids: pd.Index, counts_path: Path, pos_path: Path,
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


# --------------------------------------------------------------------------- legacy ST (her2st, ST Pipeline)

# The two legacy ST arrays (Stahl et al. 2016; ST Pipeline / ST spot detector): centre-to-centre
# pitch, spot diameter (None: not fixed by the pitch) and the largest array coordinates.
@dataclass(frozen=True)
class STArray:
    """One legacy Spatial Transcriptomics array design."""

    name: str
    pitch_um: float
    spot_um: float | None
    max_xy: tuple[int, int]


ST_ARRAYS = {"1k": STArray("1k", ST_GRID_UM, ST_SPOT_UM, (33, 35)), "2k": STArray("2k", 100.0, None, (67, 64))}
ST_ARRAY_CHOICES = ("auto", *ST_ARRAYS)
_ARRAY_SLACK = 2  # coordinates a spot detector may place just beyond the printed grid
# H&E scans: 40x ~0.25, 20x ~0.5, 10x ~1 um/px; outside this range the pixel columns are wrong.
PLAUSIBLE_MPP = (0.1, 5.0)
_SPOT_ID = re.compile(r"^\s*-?\d+(\.\d+)?x-?\d+(\.\d+)?\s*$")
_SPOT_COLUMNS = ["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"]  # ST spot detector order
TABLE_SUFFIXES = (".tsv", ".tsv.gz", ".txt", ".txt.gz", ".csv", ".csv.gz")


def _open_text(path: Path) -> Any:
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"  # gzip by content: suffixes lie
    return gzip.open(path, "rt") if gz else open(path)


def _is_spot_ids(labels: Sequence[Any]) -> bool:
    return len(labels) > 0 and all(_SPOT_ID.match(str(s)) for s in labels)


def _read_count_table(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Values (spots x genes), gene symbols (duplicates kept) and spot ids of a legacy ST counts table.

    Tab-separated, plain or gzip; spot ids ``"{x}x{y}"`` label the rows (her2st, ST Pipeline
    >= 1.5) or the columns (older ST Pipeline: genes as rows); the corner cell may be absent.
    """
    try:
        with _open_text(path) as fh:
            header = fh.readline().rstrip("\r\n").split("\t")
        # The header is parsed by hand so duplicate symbols are seen, not silently mangled.
        table = pd.read_csv(path, sep="\t", header=None, skiprows=1, index_col=0, engine="c",
                            low_memory=False)
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise DataError(path, f"cannot read the counts table: {err}") from err
    except pd.errors.EmptyDataError as err:
        raise DataError(path, "the counts table has no spots") from err
    if len(header) == table.shape[1] + 1:
        labels = header[1:]
    elif len(header) == table.shape[1]:  # R's write.table leaves out the corner cell
        labels = header
    else:
        raise DataError(path, f"header names {len(header) - 1} columns but rows hold {table.shape[1]} values")
    row_labels = table.index.astype(str).to_numpy()
    if _is_spot_ids(row_labels):
        spots_are_rows, genes, spot_ids = True, labels, row_labels
    elif _is_spot_ids(labels):
        spots_are_rows, genes, spot_ids = False, list(row_labels), np.asarray(labels, dtype=str)
    else:
        raise DataError(path, "neither the row nor the column labels are spot ids like '12x7' "
                              f"(rows start {list(row_labels[:2])}, columns {labels[:2]})")
    nonnum = [i for i, dt in enumerate(table.dtypes) if dt.kind not in "biuf"]
    if nonnum:
        col = table.iloc[:, nonnum[0]]
        bad = col[pd.to_numeric(col, errors="coerce").isna() & col.notna()]
        gene, spot = (labels[nonnum[0]], bad.index[0]) if spots_are_rows else (bad.index[0], labels[nonnum[0]])
        raise DataError(path, f"non-numeric counts in {len(nonnum)} {'gene' if spots_are_rows else 'spot'} "
                              f"columns (first: gene {str(gene)!r}, spot {str(spot)!r}, value {show(bad.iloc[0])})")
    values = table.to_numpy()
    return (values if spots_are_rows else values.T), [str(g) for g in genes], spot_ids


def _read_spot_table(path: Path) -> pd.DataFrame:
    """An ST spot detector table (``x y new_x new_y pixel_x pixel_y [selected]``), header or not."""
    try:
        with _open_text(path) as fh:
            first = fh.readline()
        sep = "\t" if "\t" in first else r"\s+"
        cells = first.split()
        headerless = bool(cells) and all(_is_number(c) for c in cells)
        kw: dict[str, Any] = {"header": None, "names": _SPOT_COLUMNS[:len(cells)]} if headerless else {}
        if headerless and len(cells) not in (6, 7):
            raise DataError(path, f"a spot table without header needs 6 or 7 columns "
                                  f"({' '.join(_SPOT_COLUMNS)}), got {len(cells)}")
        pos = pd.read_csv(path, sep=sep, engine="c" if sep == "\t" else "python", **kw)
    except (OSError, EOFError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(path, f"cannot read the spot file: {err}") from err
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in pos.columns]
    if missing:
        raise DataError(path, f"spot file lacks columns {missing} (an ST spot detector table has "
                              f"{' '.join(_SPOT_COLUMNS)})")
    return pos


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def estimate_mpp_from_grid(array_xy: np.ndarray, pixel_xy: np.ndarray,
                           grid_um: float = ST_GRID_UM) -> tuple[float, float]:
    """Microns per pixel from spots on a regular array grid ``grid_um`` apart.

    Least-squares affine fit ``pixel = A @ array + b``; the lengths of A's columns are
    the pixel distances of one array step along x and y. Spots far off the first fit (a
    misplaced pixel position) are left out and the fit repeated. Returns (mpp, rms residual px
    of the spots kept); mpp is ``inf`` when the spots do not span two directions.
    """
    design = np.column_stack([array_xy, np.ones(len(array_xy))])
    if np.linalg.matrix_rank(design) < 3:
        return math.inf, math.nan
    keep = np.ones(len(design), dtype=bool)
    for _ in range(5):  # trimmed least squares: a few wild positions must not set the scale
        coef, *_ = np.linalg.lstsq(design[keep], pixel_xy[keep], rcond=None)  # rows: x step, y step, offset
        resid = np.linalg.norm(design @ coef - pixel_xy, axis=1)
        inliers = resid <= max(3.0 * float(np.median(resid[keep])), 1e-6 * float(np.abs(pixel_xy).max() + 1))
        if np.array_equal(inliers, keep) or np.linalg.matrix_rank(design[inliers]) < 3:
            break
        keep = inliers
    steps = np.linalg.norm(coef[:2], axis=1)
    rms = float(np.sqrt(np.mean(resid[keep] ** 2)))
    if not np.all(steps > 0):
        return math.inf, rms
    return grid_um / float(np.mean(steps)), rms


def detect_st_array(array_xy: np.ndarray, path: Path | str, array: str = "auto") -> STArray:
    """The legacy ST array of these spots: ``array`` if given (checked), else from the coordinate range."""
    if array not in ST_ARRAY_CHOICES:
        raise DataError(path, f"array must be one of {ST_ARRAY_CHOICES}, got {array!r}")
    top = float(np.max(array_xy)) if len(array_xy) else 0.0
    fits = [a for a in ST_ARRAYS.values() if top <= max(a.max_xy) + _ARRAY_SLACK]
    span = "x".join(f"{v:g}" for v in np.max(array_xy, axis=0))
    if array != "auto":
        chosen = ST_ARRAYS[array]
        if chosen not in fits:
            raise DataError(path, f"array coordinates reach {span}, beyond the {array} array "
                                  f"(up to {chosen.max_xy[0]}x{chosen.max_xy[1]}); check --array")
        return chosen
    if not fits:
        raise DataError(path, f"array coordinates reach {span}, beyond both legacy ST arrays "
                              "(1k up to 33x35, 2k up to 67x64)")
    chosen = min(fits, key=lambda a: max(a.max_xy))
    log.info("%s: array coordinates up to %s: the %s array (%g um pitch); pass --array to override",
             path, span, chosen.name, chosen.pitch_um)
    return chosen


def check_plausible_mpp(mpp: float, path: Path | str, how: str) -> float:
    """Refuse a pixel size no H&E scan has (outside :data:`PLAUSIBLE_MPP`), saying how it was found."""
    lo, hi = PLAUSIBLE_MPP
    if not (np.isfinite(mpp) and lo <= mpp <= hi):
        raise DataError(path, f"{how} gives {mpp:.4g} um per pixel, implausible for an H&E scan "
                              f"({lo:g}-{hi:g} um/px): the pixel positions do not match this array or image")
    return float(mpp)


@dataclass
class STFiles:
    """The files of one legacy ST section."""

    slide_id: str
    counts: Path
    spots: Path
    image: Path | None


def _her2st_image(root: Path, section: str) -> Path | None:
    return _single_image(root / "ST-imgs" / section[0] / section, (".jpg", ".jpeg", ".tif", ".tiff", ".png"))


def _her2st_file(folder: Path, stem: str, suffixes: Sequence[str], what: str) -> Path:
    found = [folder / f"{stem}{s}" for s in suffixes if (folder / f"{stem}{s}").is_file()]
    if len(found) > 1:
        raise DataError(folder, f"both {found[0].name} and {found[1].name}: which {what}?")
    return found[0] if found else folder / f"{stem}{suffixes[0]}"


def _her2st_counts(root: Path, section: str) -> Path:
    return _her2st_file(root / "ST-cnts", section, (".tsv.gz", ".tsv"), "counts table")


def _her2st_spots(root: Path, section: str) -> Path:
    return _her2st_file(root / "ST-spotfiles", f"{section}_selection", (".tsv", ".tsv.gz"), "spot file")


def _stems(folder: Path, tail: str, suffixes: Sequence[str]) -> set[str]:
    return {p.name[: -len(tail + s)] for s in suffixes for p in folder.glob(f"*{tail}{s}")}


def _her2st_sections(root: Path, require_image: bool) -> list[str]:
    counts = _stems(root / "ST-cnts", "", (".tsv.gz", ".tsv"))
    spots = _stems(root / "ST-spotfiles", "_selection", (".tsv", ".tsv.gz"))
    found = sorted(counts & spots)
    if require_image:
        found = [s for s in found if _her2st_image(root, s) is not None]
    return found


def _sniff_table(path: Path) -> str | None:
    """``"spots"`` for an ST spot detector table, ``"counts"`` for a counts table with XxY ids, else None."""
    try:
        with _open_text(path) as fh:
            first, second = fh.readline(), fh.readline()
    except (OSError, EOFError, UnicodeDecodeError):
        return None
    head = first.split()
    if {"x", "y", "pixel_x", "pixel_y"} <= set(head) or (len(head) in (6, 7) and all(map(_is_number, head))):
        return "spots"
    cells = first.rstrip("\r\n").split("\t")
    row = second.split("\t")[0] if second else ""
    if (len(cells) > 2 and _is_spot_ids([c for c in cells[1:3] if c])) or _SPOT_ID.match(row):
        return "counts"
    return None


def _one(found: list[Path], what: str, folder: Path, hint: str) -> Path:
    if len(found) != 1:
        names = [p.name for p in found]
        raise DataError(folder, f"{'no' if not found else len(found)} {what}" + (f" {names}" if found else "")
                                + f"; {hint}")
    return found[0]


def st_section_files(path: str | Path, *, counts_path: str | Path | None = None,
                     spots_path: str | Path | None = None, image_path: str | Path | None = None,
                     slide_id: str | None = None) -> STFiles:
    """The counts table, spot table and image of one legacy ST section outside the her2st layout.

    ``path`` is a folder holding one counts table, one spot table and (at most) one image, or
    the counts table itself; explicit paths override what is found. Tables are recognised by
    content (a spot detector header, XxY spot ids), not by name.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        raise DataError(path, "missing: not a legacy ST folder or counts table")
    tables = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name.lower().endswith(TABLE_SUFFIXES)]
    kinds = {p: _sniff_table(p) for p in tables if p not in (counts_path, spots_path)}
    if counts_path is not None:
        counts = _require_file(Path(counts_path), "counts table")
    elif path.is_file():
        counts = path
    else:
        counts = _one([p for p, k in kinds.items() if k == "counts"], "counts tables with XxY spot ids",
                      folder, "pass counts_path")
    if spots_path is not None:
        spots = _require_file(Path(spots_path), "spot file")
    else:
        spots = _one([p for p, k in kinds.items() if k == "spots" and p != counts],
                     "spot tables (x y new_x new_y pixel_x pixel_y selected)", folder, "pass spots_path")
    image = _require_file(Path(image_path), "image") if image_path is not None else _single_image(folder)
    sid = slide_id or (folder.name if path.is_dir() else counts.name.split(".")[0])
    return STFiles(sid, counts, spots, image)


def read_st_section(files: STFiles, *, require_image: bool = True, strict: bool = False,
                    duplicate_genes: str = "error", array: str = "auto",
                    source_format: str = "legacy_st") -> SlideData:
    """One legacy ST section (counts table + spot detector table [+ image]) as :class:`SlideData`.

    Spots the spot table marks ``selected == 0`` (off the tissue) are left out; the pixel
    size is fitted on the array grid with the pitch of the detected (or given) array.
    """
    counts_path, spot_path, image = files.counts, files.spots, files.image
    _require_file(counts_path, "counts file")
    _require_file(spot_path, "spot file")
    if image is None and require_image:
        raise DataError(spot_path.parent, "missing image (no H&E image found); pass --image")
    values, genes, count_ids = _read_count_table(counts_path)
    _check_unique_barcodes(count_ids, counts_path)
    pos = _read_spot_table(spot_path)
    for c in [c for c in _SPOT_COLUMNS if c in pos.columns]:
        pos[c] = pd.to_numeric(pos[c], errors="coerce")
    if pos[["x", "y"]].isna().any().any():
        raise DataError(spot_path, "non-numeric array coordinates x/y")
    all_ids = pd.Index(pos["x"].round().astype(int).astype(str) + "x" + pos["y"].round().astype(int).astype(str))
    n_unselected = 0
    if "selected" in pos.columns:
        chosen = pos["selected"].fillna(0).to_numpy() != 0
        # Counted spots the detector left unselected lie off the tissue: dropped, not mismatched.
        off = pd.Index(count_ids).isin(all_ids[~chosen]) & ~pd.Index(count_ids).isin(all_ids[chosen])
        n_unselected = int(off.sum())
        if n_unselected:
            log.info("%s: %d spots not selected (off the tissue) left out", spot_path, n_unselected)
            values, count_ids = values[~off], count_ids[~off]
        pos = pos[chosen]
    pos = pos.reset_index(drop=True)
    pos_ids = pd.Index(pos["x"].round().astype(int).astype(str) + "x" + pos["y"].round().astype(int).astype(str))
    _check_unique_barcodes(pos_ids, spot_path)
    rows, pos_rows, n_dropped = _join_spots(pd.Index(count_ids), pos_ids, counts_path, spot_path, strict)
    grid_cols = ["new_x", "new_y"] if {"new_x", "new_y"} <= set(pos.columns) else ["x", "y"]
    # Matched spots without a pixel position are dropped too: there is nowhere to cut a patch.
    no_pixel = ~np.isfinite(pos[["pixel_x", "pixel_y", *grid_cols]].to_numpy(float)[pos_rows]).all(axis=1)
    if no_pixel.any():
        problem = f"{int(no_pixel.sum())} spots lack pixel coordinates (e.g. {list(pos_ids[pos_rows[no_pixel]][:3])})"
        if strict:
            raise DataError(spot_path, problem)
        log.warning("%s: %s; dropped them", spot_path, problem)
        rows, pos_rows, n_dropped = rows[~no_pixel], pos_rows[~no_pixel], n_dropped + int(no_pixel.sum())
    if len(rows) == 0:
        raise DataError(counts_path, f"no spots left after joining with {spot_path.name}")
    barcodes = count_ids[rows]
    counts = counts_to_csr(values[rows], counts_path, barcodes, genes)
    counts, genes = resolve_duplicate_genes(counts, genes, counts_path, duplicate_genes)
    pos = pos.iloc[pos_rows]
    pixels = pos[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    if len(rows) < 3:
        raise DataError(spot_path, f"only {len(rows)} spots: too few to estimate the pixel size")
    st_array = detect_st_array(pos[["x", "y"]].to_numpy(np.float64), spot_path, array)
    mpp, rms = estimate_mpp_from_grid(pos[grid_cols].to_numpy(np.float64), pixels, st_array.pitch_um)
    how = f"fitting pixel_x/pixel_y to the {st_array.name} array grid ({st_array.pitch_um:g} um pitch)"
    if image is not None:
        check_plausible_mpp(mpp, spot_path, how)
    elif not (np.isfinite(mpp) and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]):
        log.warning("%s: %s gives %.4g um per pixel, implausible for an H&E scan", spot_path, how, mpp)
    if np.isfinite(mpp) and rms > 0.25 * st_array.pitch_um / mpp:
        log.warning("%s: the spots sit %.1f px (rms) off a regular %s grid: pixel positions may be wrong",
                    spot_path, rms, st_array.name)
    meta = {
        "image_path": str(image.absolute()) if image is not None else None,
        "microns_per_pixel": float(mpp),
        "spot_diameter_um": st_array.spot_um,
        "source_format": source_format,
        "source_files": [str(p.absolute()) for p in (counts_path, spot_path, image) if p is not None],
        "dropped_spots": int(n_dropped),
        "unselected_spots": n_unselected,
        "st_array": st_array.name,
        "array_pitch_um": st_array.pitch_um,
        "mpp_fit_rms_px": rms,  # how well the spots sit on a regular grid
    }
    return SlideData(
        slide_id=files.slide_id, counts=counts, genes=genes, barcodes=np.asarray(barcodes, dtype=str),
        pixels=pixels, meta=meta, source=str(counts_path),
        obs_extra={"array_col": pos["x"].round().to_numpy(np.int64), "array_row": pos["y"].round().to_numpy(np.int64)},
    )


def read_her2st_section(root: str | Path, section: str, *, require_image: bool = True,
                        strict: bool = False, duplicate_genes: str = "error", array: str = "auto") -> SlideData:
    """One section of a her2st-style release (``ST-cnts``, ``ST-spotfiles``, ``ST-imgs``)."""
    root = Path(root)
    files = STFiles(section, _her2st_counts(root, section), _her2st_spots(root, section), _her2st_image(root, section))
    if files.image is None and require_image:
        raise DataError(root / "ST-imgs" / section[:1] / section, "missing image (no .jpg found)")
    return read_st_section(files, require_image=require_image, strict=strict, duplicate_genes=duplicate_genes,
                           array=array, source_format="her2st")


def read_her2st(root: str | Path, sections: Sequence[str] | str | None = None, *,
                require_image: bool = True, strict: bool = False, duplicate_genes: str = "error",
                array: str = "auto", image_path: str | Path | None = None,
                counts_path: str | Path | None = None, spots_path: str | Path | None = None) -> ad.AnnData:
    """Read legacy ST sections: a her2st-style release, or one section's folder or counts table.

    A release (``ST-cnts/{s}.tsv[.gz]``, ``ST-spotfiles/{s}_selection.tsv``, ``ST-imgs/{P}/{s}/``):
    ``sections=None`` reads every section with a counts and spot file (and an image if
    ``require_image``). Anything else is one section (:func:`st_section_files`): a folder with
    one counts table, one spot detector table and one image, or the counts table itself, with
    ``counts_path`` / ``spots_path`` / ``image_path`` to name files explicitly.
    Spots only in the counts or only in the spot file are dropped with a warning (their number
    goes to ``uns["slides"][sid]["dropped_spots"]``), or raise DataError when ``strict``. The pixel
    size is fitted on the array grid: 200 um pitch (1k array) or 100 um (2k), detected from the
    array coordinates unless ``array`` is ``"1k"`` or ``"2k"``.
    """
    root = Path(root)
    if isinstance(sections, str):
        sections = [sections]
    kw = {"require_image": require_image, "strict": strict, "duplicate_genes": duplicate_genes, "array": array}
    if not (root / "ST-cnts").is_dir() or counts_path is not None or spots_path is not None:
        if sections is not None and len(sections) != 1:
            raise DataError(root, f"holds one legacy ST section, not a release: cannot select {list(sections)}")
        files = st_section_files(root, counts_path=counts_path, spots_path=spots_path, image_path=image_path,
                                 slide_id=sections[0] if sections else None)
        return assemble([read_st_section(files, **kw)])
    if sections is None:
        sections = _her2st_sections(root, require_image)
        if not sections:
            raise DataError(root, "no section has counts, a spot file"
                                  + (" and an image" if require_image else ""))
    if image_path is not None:
        if len(sections) != 1:
            raise DataError(root, f"--image names one image but {len(sections)} sections are read")
        files = STFiles(sections[0], _her2st_counts(root, sections[0]), _her2st_spots(root, sections[0]),
                        _require_file(Path(image_path), "image"))
        return assemble([read_st_section(files, **kw, source_format="her2st")])
    return assemble([read_her2st_section(root, s, **kw) for s in sections])



# --------------------------------------------------------------------------- HEST-1k

# HEST-1k (mahmoodlab/HEST, src/hest/HESTData.py, HESTData.dump_patches): patches are cut
# around adata.obsm["spatial"] at 0.5 um/px, 224 px wide; the .h5 holds "img" [N,224,224,3]
# uint8, "coords" = the patch's TOP-LEFT corner in full-resolution pixels
# (coords_center - patch_size_src // 2) and "barcode" [N,1] bytes (adata.obs index).
HEST_PATCH_PX = 224
HEST_PATCH_MPP = 0.5


def _decode(values: np.ndarray) -> np.ndarray:
    flat = np.asarray(values).reshape(len(values), -1)[:, 0] if np.ndim(values) > 1 else np.asarray(values)
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat], dtype=str)


def _read_h5ad(path: Path) -> ad.AnnData:
    _require_file(path, "AnnData file")
    try:
        return ad.read_h5ad(path)
    except Exception as err:  # anndata/h5py raise many types for damaged files
        raise DataError(path, f"cannot read the AnnData file: {type(err).__name__}: {err}") from err


def _counts_of(adata: ad.AnnData, path: Path) -> tuple[Any, str]:
    """Raw counts of an AnnData: layers["counts"] if present, else X (which must be integer)."""
    if "counts" in adata.layers:
        return adata.layers["counts"], "layers['counts']"
    if adata.X is None:
        raise DataError(path, "no counts: X is empty and there is no layers['counts']")
    return adata.X, "X"


def _hest_meta(path: Path) -> dict[str, Any]:
    _require_file(path, "HEST metadata file")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(path, f"cannot read the metadata JSON: {err}") from err


def _positive_float(value: Any, path: Path, key: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(path, f"{key} must be a number, got {show(value)}") from None
    if not np.isfinite(out) or out <= 0:
        raise DataError(path, f"{key} must be positive, got {show(value)}")
    return out


def read_hest_sample(root: str | Path, sample_id: str, *, duplicate_genes: str = "error") -> SlideData:
    """One HEST-1k sample: ``st/{id}.h5ad``, ``metadata/{id}.json``, optional patches and WSI."""
    root = Path(root)
    st_path = root / "st" / f"{sample_id}.h5ad"
    meta_path = root / "metadata" / f"{sample_id}.json"
    adata = _read_h5ad(st_path)
    meta = _hest_meta(meta_path)
    key = next((k for k in ("pixel_size_um_estimated", "pixel_size_um_embedded") if meta.get(k)), None)
    if key is None:
        raise DataError(meta_path, "no pixel size (pixel_size_um_estimated / pixel_size_um_embedded)")
    mpp = _positive_float(meta[key], meta_path, key)
    spot_um = meta.get("spot_diameter")
    spot_um = _positive_float(spot_um, meta_path, "spot_diameter") if spot_um is not None else None

    barcodes = np.asarray(adata.obs_names, dtype=str)
    _check_unique_barcodes(barcodes, st_path)
    if "spatial" in adata.obsm:
        pixels = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    elif {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(adata.obs.columns):
        pixels = adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    else:
        raise DataError(st_path, "no spot positions (obsm['spatial'] or obs pxl_col/row_in_fullres)")
    _check_pixels(pixels, barcodes, st_path)
    values, where = _counts_of(adata, st_path)
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


# --------------------------------------------------------------------------- 10x Visium

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
    _require_file(path, "10x feature-barcode matrix")
    try:
        with h5py.File(path, "r") as f:
            if "matrix" not in f:
                raise DataError(path, "no 'matrix' group: not a Space Ranger v3+ HDF5 matrix")
            m = f["matrix"]
            n_features, n_barcodes = (int(v) for v in m["shape"][:])
            # 10x stores features x barcodes in CSC, i.e. barcodes x features in CSR.
            data = m["data"][:]
            mat = sp.csr_matrix((data, m["indices"][:], m["indptr"][:]), shape=(n_barcodes, n_features))
            barcodes = _decode(m["barcodes"][:])
            names = _decode(m["features/name"][:])
            # probe-based runs (FFPE, CytAssist) list probes in "id" and the gene's ID in "gene_id"
            ids = _decode(m["features/gene_id" if "gene_id" in m["features"] else "features/id"][:])
            types = _decode(m["features/feature_type"][:]) if "feature_type" in m["features"] else None
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


def _first_file(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def read_10x_mtx(folder: Path, feature_type: str = "Gene Expression") -> TenXMatrix:
    """Counts, gene symbols, gene IDs and barcodes of a 10x Matrix Market folder (``filtered_feature_bc_matrix/``).

    Space Ranger >= 1 / Cell Ranger >= 3 write ``matrix.mtx.gz``, ``features.tsv.gz`` (id, name,
    feature type) and ``barcodes.tsv.gz``; older runs ``genes.tsv`` (id, name) and plain files.
    """
    import scipy.io

    mtx = _first_file(folder, ("matrix.mtx.gz", "matrix.mtx"))
    feats = _first_file(folder, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
    bcs = _first_file(folder, ("barcodes.tsv.gz", "barcodes.tsv"))
    for found, name in ((mtx, "matrix.mtx.gz"), (feats, "features.tsv.gz"), (bcs, "barcodes.tsv.gz")):
        if found is None:
            raise DataError(folder / name, "missing file of the 10x feature-barcode matrix")
    try:
        with _open_binary(mtx) as fh:
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


def _open_binary(path: Path) -> Any:
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


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


def _spots_outside(pixels: np.ndarray, size: tuple[int, int]) -> int:
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
        image = _require_file(Path(image_path), "full-resolution image (--image)")
        size = image_size(image)
        n_out = _spots_outside(pixels, size)
        if n_out:
            fits = [c for c in candidates if c.key in scalefactors
                    and not _spots_outside(pixels * float(scalefactors[c.key]), size)]
            hint = (f"its size fits {fits[0].label} (spots scaled by {fits[0].key}): omit --image to use that "
                    "image with its scale factor, or pass the full-resolution image" if fits else
                    "pass the full-resolution image of this slide with --image")
            raise DataError(image, f"{n_out} of {len(pixels)} spot centres (full-resolution pixels) lie "
                                   f"outside this {size[0]}x{size[1]} image given with --image: {hint}")
        return image, 1.0, "full-resolution"
    for c in candidates:
        if c.key not in scalefactors:
            raise DataError(sf_where, f"{sf_label} lacks {c.key}, needed to use {c.label}")
        scale = _positive_float(scalefactors[c.key], sf_where, f"{sf_label} {c.key}")
        size = c.size()
        n_out = _spots_outside(pixels * scale, size)
        if n_out:
            raise DataError(c.where, f"{n_out} of {len(pixels)} spot centres fall outside this {size[0]}x{size[1]} "
                                     f"image after scaling by {c.key}={scale:g} (from {sf_label}): the scale "
                                     f"factors do not belong to {c.label}")
        log.warning("%s: no --image given: patches come from %s, %s=%g, i.e. %.3g um per pixel (the "
                    "full-resolution image has %.3g); pass the full-resolution image with --image for full detail",
                    where, c.label, c.key, scale, full_mpp / scale, full_mpp)
        return c.file(), scale, c.kind
    raise missing


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
    _check_unique_barcodes(barcodes, matrix)
    names = names_of_kept_genes(tenx.genes, {"gene_ids": tenx.gene_ids})
    counts, genes = resolve_duplicate_genes(tenx.counts, tenx.genes, matrix, duplicate_genes)
    pos, pos_path = _read_positions(outs / "spatial")
    pos_ids = pd.Index(pos["barcode"].astype(str))
    _check_unique_barcodes(pos_ids, pos_path)
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
    _check_pixels(pixels, barcodes[rows], pos_path)

    sf_path = _require_file(outs / "spatial" / "scalefactors_json.json", "scale factors")
    try:
        scalefactors = json.loads(sf_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(sf_path, f"cannot read the scale factors JSON: {err}") from err
    if not isinstance(scalefactors, dict) or "spot_diameter_fullres" not in scalefactors:
        raise DataError(sf_path, "lacks spot_diameter_fullres")
    diameter_px = _positive_float(scalefactors["spot_diameter_fullres"], sf_path, "spot_diameter_fullres")
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


# --------------------------------------------------------------------------- generic .h5ad


def _plain(value: Any) -> Any:
    """uns values as plain Python (h5ad turns lists into arrays and floats into numpy scalars)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# scanpy's uns['spatial'][library]['images'] keys, the scale factor of each and the image_kind recorded
SCANPY_IMAGES = (("hires", "tissue_hires_scalef", "tissue_hires_image"),
                 ("lowres", "tissue_lowres_scalef", "tissue_lowres_image"))
_PLAIN_UNS_KEYS = ("image_path", "microns_per_pixel", "pixel_size_um_estimated", "spot_diameter_um")


def _array_size(image: Any, where: Path, label: str) -> tuple[int, int]:
    shape = np.shape(image)
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)) or 0 in shape:
        raise DataError(where, f"{label} is not an image: shape {show(shape)} (height x width [x 3 or 4] expected)")
    return int(shape[1]), int(shape[0])


def _rgb_uint8(image: Any, where: Path, label: str) -> np.ndarray:
    """An image array as stored in a file (scanpy: float32 in [0, 1] as matplotlib reads a PNG) as RGB uint8."""
    _array_size(image, where, label)
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    pixels = pixels[:, :, :3] if pixels.shape[2] >= 3 else np.repeat(pixels, 3, axis=2)  # alpha dropped
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    if pixels.dtype == np.uint16:
        return (pixels >> 8).astype(np.uint8)
    if pixels.dtype.kind == "f":
        finite = np.isfinite(pixels).all()
        top = float(pixels.max()) if finite else math.nan
        if finite and float(pixels.min()) >= 0 and top <= 255:
            # matplotlib/scanpy store a PNG as value / 255: round back to the exact 8-bit pixels
            return np.round(pixels * 255 if top <= 1 else pixels).astype(np.uint8)
        raise DataError(where, f"{label} holds values outside 0-1 (or 0-255): min {show(np.nanmin(pixels))}, "
                               f"max {show(np.nanmax(pixels))}" + ("" if finite else ", or NaN/inf"))
    raise DataError(where, f"{label} has pixels of type {pixels.dtype}; uint8, uint16 or float expected")


def image_array_file(image: Any, where: Path, label: str) -> Path:
    """An image held in an AnnData (scanpy's ``uns['spatial']`` images) as a PNG file patches can be cut from.

    Written once per content (named by its sha256) under ``agl``'s cache folder
    (:func:`agl.fileio.default_cache_dir`, ``images/``), atomically, and never beside the input:
    the cache can be deleted, the file is written again from the .h5ad when needed.
    """
    import hashlib

    from PIL import Image

    from agl.fileio import atomic_write, default_cache_dir

    pixels = _rgb_uint8(image, where, label)
    digest = hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).hexdigest()[:32]
    out = default_cache_dir() / "images" / f"{digest}.png"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
        log.info("%s: %s written to %s to cut patches from", where, label, out)
    return out


def _uns_image(array: Any, label: str, key: str, kind: str, path: Path) -> ScaledImage:
    """An image array of ``uns['spatial'][library]['images']`` as a candidate for :func:`choose_image`."""
    return ScaledImage(label, key, kind, path, size=lambda: _array_size(array, path, label),
                       file=lambda: image_array_file(array, path, label))


def _scanpy_library(adata: ad.AnnData, path: Path, library_id: str | None) -> tuple[str, Any, np.ndarray]:
    """The library of ``uns['spatial']`` to read, its entry and its spots (rows of ``adata``)."""
    spatial = adata.uns["spatial"]
    libs = [str(k) for k in spatial]
    if library_id is not None:
        if library_id not in spatial:
            raise DataError(path, f"--library-id {library_id}: uns['spatial'] holds no such library "
                                  f"(it holds {', '.join(libs)})")
        lib = library_id
    elif len(libs) == 1:
        lib = libs[0]
    else:
        raise DataError(path, f"uns['spatial'] holds {len(libs)} libraries ({', '.join(libs)}); choose one "
                              "with --library-id")
    rows = np.arange(adata.n_obs)
    if len(libs) > 1:  # several slides in one file (scanpy/squidpy concatenation): obs says whose spot is whose
        if "library_id" not in adata.obs:
            raise DataError(path, f"uns['spatial'] holds {len(libs)} libraries but obs has no 'library_id' column "
                                  f"saying which spots belong to {lib}")
        rows = np.flatnonzero(adata.obs["library_id"].astype(str).to_numpy() == lib)
        if len(rows) == 0:
            raise DataError(path, f"no spot has obs['library_id'] == {lib!r}")
    return lib, spatial[lib], rows


def _scanpy_slide(adata: ad.AnnData, path: Path, pixels: np.ndarray, barcodes: np.ndarray, *,
                  library_id: str | None, image_path: str | Path | None, microns_per_pixel: float | None,
                  spot_diameter_um: float | None) -> tuple[np.ndarray, dict[str, Any], float]:
    """Spots (rows), slide record and image scale of a file in scanpy's Visium layout (``uns['spatial']``).

    ``obsm['spatial']`` holds full-resolution pixels; their size is ``--microns-per-pixel`` if
    given, else the spot diameter (``--spot-diameter-um``, default Visium's 55 um) over
    ``scalefactors['spot_diameter_fullres']``. The image is ``--image`` (full resolution), else the
    library's ``images['hires']`` (else ``'lowres'``) with its scale factor, exactly as
    :func:`read_visium` treats Space Ranger's PNGs (:func:`choose_image`).
    """
    lib, library, rows = _scanpy_library(adata, path, library_id)
    label = f"uns['spatial'][{lib!r}]"
    pixels = pixels[rows]
    _check_pixels(pixels, barcodes[rows], path)
    library = library if isinstance(library, Mapping) else {}
    scalefactors = _plain(dict(library.get("scalefactors") or {}))
    spot_um = VISIUM_SPOT_UM if spot_diameter_um is None else _positive_float(spot_diameter_um, path,
                                                                               "--spot-diameter-um")
    if microns_per_pixel is not None:
        full_mpp = _positive_float(microns_per_pixel, path, "--microns-per-pixel")
    elif "spot_diameter_fullres" in scalefactors:
        full_mpp = spot_um / _positive_float(scalefactors["spot_diameter_fullres"], path,
                                             f"{label}['scalefactors']['spot_diameter_fullres']")
    else:
        raise DataError(path, f"{label}['scalefactors'] lacks spot_diameter_fullres, which sets the pixel size; "
                              "pass --microns-per-pixel")
    images = library.get("images") or {}
    candidates = [_uns_image(images[res], f"{label}['images'][{res!r}]", key, kind, path)
                  for res, key, kind in SCANPY_IMAGES if res in images]
    image, scale, kind = choose_image(
        path, image_path, pixels, candidates, scalefactors, path, f"{label}['scalefactors']", full_mpp,
        missing=DataError(path, f"no image: {label} holds no images ('hires' or 'lowres') and no --image was "
                                "given; pass the full-resolution image with --image"))
    meta = {
        "image_path": str(image.absolute()),
        "microns_per_pixel": full_mpp / scale,
        "spot_diameter_um": spot_um,
        "source_format": "anndata",
        "source_files": [str(path.absolute())],
        "library_id": lib,
        "image_kind": kind,  # full-resolution, tissue_hires_image or tissue_lowres_image
        "image_scalef": scale,  # image pixels per full-resolution pixel
    }
    if kind != "full-resolution":
        meta["image_from"] = next(c.label for c in candidates if c.kind == kind)  # the PNG is a copy of it
    return rows, meta, scale


def read_anndata(path: str | Path, *, image_path: str | Path | None = None, slide_id: str | None = None,
                 microns_per_pixel: float | None = None, spot_diameter_um: float | None = None,
                 duplicate_genes: str = "error", library_id: str | None = None) -> ad.AnnData:
    """Read a generic ``.h5ad`` with ``obsm["spatial"]`` (or a canonical agl AnnData).

    Raw counts come from ``layers["counts"]`` if present, else ``X`` (must be integer-valued).
    A file that already has ``obs["slide_id"]`` and ``uns["slides"]`` keeps its slides. A file in
    scanpy's Visium layout (``uns["spatial"][library]``: ``scalefactors``, ``images``; as
    ``scanpy.read_visium`` writes it) is one slide read like a Space Ranger ``outs/``
    (:func:`_scanpy_slide`; ``library_id`` chooses among several libraries). Any other file is
    one slide whose image and pixel size come from the arguments or from ``uns``
    (``image_path``, ``microns_per_pixel``, ``spot_diameter_um``). Other names of the genes in
    ``var`` (``gene_ids``, ``gene_symbols``, ...) are kept for gene matching.
    """
    path = Path(path)
    adata = _read_h5ad(path)
    if "spatial" not in adata.obsm:
        raise DataError(path, "no obsm['spatial'] spot positions")
    values, where = _counts_of(adata, path)
    genes = [str(g) for g in adata.var_names]
    pixels_all = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    barcodes_all = (adata.obs[schema.OBS_BARCODE].astype(str).to_numpy() if schema.OBS_BARCODE in adata.obs
                    else np.asarray(adata.obs_names, dtype=str))
    uns_slides = _plain(dict(adata.uns.get(schema.UNS_SLIDES, {})))
    spatial = adata.uns.get("spatial")
    scanpy_layout = isinstance(spatial, Mapping) and len(spatial) > 0
    if library_id is not None and not scanpy_layout:
        raise DataError(path, "--library-id given but the file has no uns['spatial'] libraries")
    overrides = {k: v for k, v in (("image_path", image_path), ("microns_per_pixel", microns_per_pixel),
                                   ("spot_diameter_um", spot_diameter_um)) if v is not None}
    scale_of: dict[str, float] = {}  # image pixels per obsm['spatial'] pixel
    if schema.OBS_SLIDE in adata.obs and uns_slides:  # already canonical: keep its slides
        slide_of = adata.obs[schema.OBS_SLIDE].astype(str).to_numpy()
        order = list(dict.fromkeys(slide_of))
        if slide_id is not None:
            if len(order) != 1:
                raise DataError(path, f"slide_id given but the file holds {len(order)} slides {order}")
            uns_slides = {slide_id: uns_slides.get(order[0], {})}
            slide_of, order = np.full(adata.n_obs, slide_id), [slide_id]
        rows_of = {sid: np.flatnonzero(slide_of == sid) for sid in order}
        uns_slides = {sid: {**uns_slides.get(sid, {}), **overrides} for sid in order}
    elif scanpy_layout:
        sid = slide_id or path.stem
        rows, meta, scale_of[sid] = _scanpy_slide(
            adata, path, pixels_all, barcodes_all, library_id=library_id, image_path=image_path,
            microns_per_pixel=microns_per_pixel, spot_diameter_um=spot_diameter_um)
        rows_of, uns_slides = {sid: rows}, {sid: meta}
    else:
        sid = slide_id or path.stem
        uns = {k: _plain(adata.uns[k]) for k in _PLAIN_UNS_KEYS if k in adata.uns}  # not every array in uns
        meta = {"image_path": uns.get("image_path"),
                "microns_per_pixel": uns.get("microns_per_pixel", uns.get("pixel_size_um_estimated")),
                "spot_diameter_um": uns.get("spot_diameter_um")}
        rows_of, uns_slides = {sid: np.arange(adata.n_obs)}, {sid: {**meta, **overrides}}
    counts_all = counts_to_csr(values, path, barcodes_all, genes, where)
    var_extra = names_of_kept_genes(genes, alias_columns(adata.var))
    counts_all, genes = resolve_duplicate_genes(counts_all, genes, path, duplicate_genes)
    slides = []
    for sid, rows in rows_of.items():
        meta = dict(uns_slides[sid])
        if meta.get("microns_per_pixel") is None:
            raise DataError(path, f"slide {sid!r}: unknown pixel size; pass --microns-per-pixel "
                                  "(or store uns['microns_per_pixel'])")
        meta["microns_per_pixel"] = _positive_float(meta["microns_per_pixel"], path, "microns_per_pixel")
        if meta.get("image_path") is not None:
            meta["image_path"] = str(Path(meta["image_path"]).absolute())
        meta.setdefault("spot_diameter_um", None)
        meta.setdefault("source_format", "anndata")
        meta["source_files"] = list(meta.get("source_files") or []) or [str(path.absolute())]
        barcodes = barcodes_all[rows]
        _check_unique_barcodes(barcodes, path)
        _check_pixels(pixels_all[rows], barcodes, path)
        extra = {c: adata.obs[c].to_numpy()[rows] for c in ("array_row", "array_col") if c in adata.obs}
        slides.append(SlideData(sid, counts_all[rows], genes, barcodes, pixels_all[rows] * scale_of.get(sid, 1.0),
                                meta, extra, var_extra=var_extra, source=str(path)))
    return assemble(slides)


READERS: dict[str, Callable[..., ad.AnnData]] = {
    "her2st": read_her2st,
    "hest": read_hest,
    "visium": read_visium,
    "anndata": read_anndata,
    "h5ad": read_anndata,
}


def read_slides(fmt: str, path: str | Path, **kw: Any) -> ad.AnnData:
    """Read ``path`` with the reader registered under ``fmt`` (see :data:`READERS`)."""
    try:
        reader = READERS[fmt]
    except KeyError:
        raise DataError(path, f"unknown format {fmt!r}; known: {sorted(READERS)}") from None
    return reader(path, **kw)
