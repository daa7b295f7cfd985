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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from agl.data import schema
from agl.errors import DataError

log = logging.getLogger(__name__)

# Legacy ST (her2st): spot centres 200 um apart on the array grid, spots 100 um wide.
ST_GRID_UM = 200.0
ST_SPOT_UM = 100.0
# 10x Visium: spots 55 um wide.
VISIUM_SPOT_UM = 55.0
IMAGE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".svs", ".btf")
DUPLICATE_POLICIES = ("error", "sum")
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


# --------------------------------------------------------------------------- shared checks


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(path, f"missing {what}")
    return path


def counts_to_csr(values: Any, path: Path | str, barcodes: Sequence[str] | None = None,
                  genes: Sequence[str] | None = None) -> sp.csr_matrix:
    """Check raw counts (dense array or sparse matrix) and return them as int32 CSR.

    Raises DataError on NaN/inf, negative, non-integer or int32-overflowing values, naming
    the first offending spot and gene when the labels are given.
    """
    mat = sp.csr_matrix(values) if not sp.issparse(values) else values.tocsr()
    if mat.dtype.kind not in "biuf":
        raise DataError(path, f"counts must be numeric, got dtype {mat.dtype}")
    data = mat.data

    def where(mask: np.ndarray) -> str:
        k = int(np.flatnonzero(mask)[0])
        row = int(np.searchsorted(mat.indptr, k, side="right") - 1)
        col = int(mat.indices[k])
        spot = barcodes[row] if barcodes is not None else f"row {row}"
        gene = genes[col] if genes is not None else f"column {col}"
        return f"{int(mask.sum())} values, first at spot {spot!r}, gene {gene!r}: {data[k]!r}"

    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise DataError(path, f"NaN or infinite counts ({where(bad)})")
        bad = data != np.round(data)
        if bad.any():
            raise DataError(path, f"counts are not integers (raw UMI counts expected; {where(bad)})")
    bad = data < 0
    if bad.any():
        raise DataError(path, f"negative counts ({where(bad)})")
    bad = data > _INT32_MAX
    if bad.any():
        raise DataError(path, f"counts overflow int32 ({where(bad)})")
    out = sp.csr_matrix((data.astype(np.int32), mat.indices, mat.indptr), shape=mat.shape)
    out.eliminate_zeros()
    out.sort_indices()
    return out


def resolve_duplicate_genes(counts: sp.csr_matrix, genes: Sequence[str], path: Path | str,
                            policy: str = "error") -> tuple[sp.csr_matrix, list[str]]:
    """Make gene symbols unique: ``"error"`` raises naming duplicates, ``"sum"`` adds their columns."""
    if policy not in DUPLICATE_POLICIES:
        raise DataError(path, f"duplicate_genes must be one of {DUPLICATE_POLICIES}, got {policy!r}")
    index = pd.Index([str(g) for g in genes])
    if index.is_unique:
        return counts, list(index)
    dups = index[index.duplicated()].unique()
    if policy == "error":
        shown = ", ".join(map(repr, dups[:5])) + (" ..." if len(dups) > 5 else "")
        raise DataError(path, f"{len(dups)} duplicate gene symbols ({shown}); "
                              "pass duplicate_genes='sum' to add their counts")
    codes, uniques = pd.factorize(index)  # keeps first-appearance order
    # Column j of the input goes to column codes[j]: a 0/1 indicator matrix sums duplicates.
    merge = sp.csr_matrix((np.ones(len(codes), np.int32), (np.arange(len(codes)), codes)),
                          shape=(len(codes), len(uniques)))
    log.warning("%s: summed the counts of %d duplicate gene symbols", path, len(dups))
    return (counts @ merge).tocsr().astype(np.int32), list(uniques)


def _check_unique_barcodes(barcodes: Iterable[str], path: Path | str) -> None:
    index = pd.Index(list(barcodes))
    if not index.is_unique:
        dups = index[index.duplicated()].unique()
        shown = ", ".join(map(repr, dups[:5]))
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
                                "pass image_path to choose one")
    return found[0] if found else None


# --------------------------------------------------------------------------- assembly


def assemble(slides: Sequence[SlideData]) -> ad.AnnData:
    """Stack slides into one canonical AnnData, intersecting differing gene sets."""
    if not slides:
        raise DataError(None, "no slides to read")
    ids = [s.slide_id for s in slides]
    if len(set(ids)) != len(ids):
        raise DataError(None, f"duplicate slide ids {sorted({i for i in ids if ids.count(i) > 1})}")
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
        blocks.append(s.counts[:, cols] if dropped or not np.array_equal(cols, np.arange(len(cols)))
                      else s.counts)
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
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(common, dtype=str)))
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


# --------------------------------------------------------------------------- her2st


def _read_count_table(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Values, gene symbols (exact header, duplicates kept) and spot ids of a her2st counts table."""
    try:
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as fh:
            header = fh.readline().rstrip("\r\n").split("\t")
        # The header is parsed by hand so duplicate symbols are seen, not silently mangled.
        table = pd.read_csv(path, sep="\t", header=None, skiprows=1, index_col=0, engine="c",
                            low_memory=False)
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise DataError(path, f"cannot read the counts table: {err}") from err
    except pd.errors.EmptyDataError as err:
        raise DataError(path, "the counts table has no spots") from err
    genes = header[1:]
    if table.shape[1] != len(genes):
        raise DataError(path, f"header names {len(genes)} genes but rows hold {table.shape[1]} values")
    nonnum = [i for i, dt in enumerate(table.dtypes) if dt.kind not in "biuf"]
    if nonnum:
        col = table.iloc[:, nonnum[0]]
        bad = col[pd.to_numeric(col, errors="coerce").isna() & col.notna()]
        raise DataError(path, f"non-numeric counts in {len(nonnum)} gene columns "
                              f"(first: gene {genes[nonnum[0]]!r}, spot {bad.index[0]!r}, "
                              f"value {bad.iloc[0]!r})")
    return table.to_numpy(), genes, table.index.astype(str).to_numpy()


def estimate_mpp_from_grid(array_xy: np.ndarray, pixel_xy: np.ndarray,
                           grid_um: float = ST_GRID_UM) -> tuple[float, float]:
    """Microns per pixel from spots on a regular array grid ``grid_um`` apart.

    Least-squares affine fit ``pixel = A @ array + b``; the lengths of A's columns are
    the pixel distances of one array step along x and y. Returns (mpp, rms residual px).
    """
    design = np.column_stack([array_xy, np.ones(len(array_xy))])
    coef, *_ = np.linalg.lstsq(design, pixel_xy, rcond=None)  # (3, 2): rows = x step, y step, offset
    px_per_step = float(np.mean(np.linalg.norm(coef[:2], axis=1)))
    rms = float(np.sqrt(np.mean(np.sum((design @ coef - pixel_xy) ** 2, axis=1))))
    return grid_um / px_per_step, rms


def _her2st_image(root: Path, section: str) -> Path | None:
    return _single_image(root / "ST-imgs" / section[0] / section, (".jpg", ".jpeg", ".tif", ".tiff", ".png"))


def _her2st_sections(root: Path, require_image: bool) -> list[str]:
    counts = {p.name[: -len(".tsv.gz")] for p in (root / "ST-cnts").glob("*.tsv.gz")}
    spots = {p.name[: -len("_selection.tsv")] for p in (root / "ST-spotfiles").glob("*_selection.tsv")}
    found = sorted(counts & spots)
    if require_image:
        found = [s for s in found if _her2st_image(root, s) is not None]
    return found


def read_her2st_section(root: str | Path, section: str, *, require_image: bool = True,
                        strict: bool = False, duplicate_genes: str = "error") -> SlideData:
    """One her2st section (counts + spot file [+ image]) as :class:`SlideData`."""
    root = Path(root)
    counts_path = _require_file(root / "ST-cnts" / f"{section}.tsv.gz", "counts file")
    spot_path = _require_file(root / "ST-spotfiles" / f"{section}_selection.tsv", "spot file")
    image = _her2st_image(root, section)
    if image is None and require_image:
        raise DataError(root / "ST-imgs" / section[:1] / section, "missing image (no .jpg found)")

    values, genes, count_ids = _read_count_table(counts_path)
    _check_unique_barcodes(count_ids, counts_path)
    try:
        pos = pd.read_csv(spot_path, sep="\t", engine="c")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(spot_path, f"cannot read the spot file: {err}") from err
    need = ["x", "y", "new_x", "new_y", "pixel_x", "pixel_y"]
    missing = [c for c in need if c not in pos.columns]
    if missing:
        raise DataError(spot_path, f"spot file lacks columns {missing}")
    if "selected" in pos.columns:
        pos = pos[pd.to_numeric(pos["selected"], errors="coerce").fillna(0) != 0]
    pos = pos.reset_index(drop=True)
    for c in need:
        pos[c] = pd.to_numeric(pos[c], errors="coerce")
    if pos[["x", "y"]].isna().any().any():
        raise DataError(spot_path, "non-numeric array coordinates x/y")
    pos_ids = pd.Index(pos["x"].round().astype(int).astype(str) + "x" + pos["y"].round().astype(int).astype(str))
    _check_unique_barcodes(pos_ids, spot_path)
    # Spots without a pixel position count as unmatched (there is nowhere to cut a patch).
    no_pixel = ~np.isfinite(pos[["pixel_x", "pixel_y", "new_x", "new_y"]].to_numpy(float)).all(axis=1)
    if no_pixel.any():
        problem = f"{int(no_pixel.sum())} spots lack pixel coordinates (e.g. {list(pos_ids[no_pixel][:3])})"
        if strict:
            raise DataError(spot_path, problem)
        log.warning("%s: %s; dropped them", spot_path, problem)
        pos, pos_ids = pos[~no_pixel].reset_index(drop=True), pos_ids[~no_pixel]

    rows, pos_rows, n_dropped = _join_spots(pd.Index(count_ids), pos_ids, counts_path, spot_path, strict)
    n_dropped += int(no_pixel.sum())
    if len(rows) == 0:
        raise DataError(counts_path, f"no spots left after joining with {spot_path.name}")
    barcodes = count_ids[rows]
    counts = counts_to_csr(values[rows], counts_path, barcodes, genes)
    counts, genes = resolve_duplicate_genes(counts, genes, counts_path, duplicate_genes)
    pos = pos.iloc[pos_rows]
    pixels = pos[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    array_xy = pos[["new_x", "new_y"]].to_numpy(np.float64)
    if len(rows) < 3:
        raise DataError(spot_path, f"only {len(rows)} spots: too few to estimate the pixel size")
    mpp, rms = estimate_mpp_from_grid(array_xy, pixels)
    meta = {
        "image_path": str(image.resolve()) if image is not None else None,
        "microns_per_pixel": mpp,
        "spot_diameter_um": ST_SPOT_UM,
        "source_format": "her2st",
        "source_files": [str(p.resolve()) for p in (counts_path, spot_path, image) if p is not None],
        "dropped_spots": int(n_dropped),
        "mpp_fit_rms_px": rms,  # how well the spots sit on a regular grid
    }
    return SlideData(
        slide_id=section, counts=counts, genes=genes, barcodes=np.asarray(barcodes, dtype=str),
        pixels=pixels, meta=meta, source=str(counts_path),
        obs_extra={"array_col": pos["x"].to_numpy(np.int64), "array_row": pos["y"].to_numpy(np.int64)},
    )


def read_her2st(root: str | Path, sections: Sequence[str] | str | None = None, *,
                require_image: bool = True, strict: bool = False,
                duplicate_genes: str = "error") -> ad.AnnData:
    """Read sections of the her2st release (``ST-cnts``, ``ST-spotfiles``, ``ST-imgs``).

    ``sections=None`` reads every section with a counts and spot file (and an image if
    ``require_image``). Spots only in the counts or only in the spot file are dropped with
    a warning (their number goes to ``uns["slides"][sid]["dropped_spots"]``), or raise
    DataError when ``strict``. The pixel size is estimated from the 200 um spot grid.
    """
    root = Path(root)
    if not (root / "ST-cnts").is_dir():
        raise DataError(root / "ST-cnts", "missing folder: not a her2st release")
    if isinstance(sections, str):
        sections = [sections]
    if sections is None:
        sections = _her2st_sections(root, require_image)
        if not sections:
            raise DataError(root, "no section has counts, a spot file"
                                  + (" and an image" if require_image else ""))
    slides = [read_her2st_section(root, s, require_image=require_image, strict=strict,
                                  duplicate_genes=duplicate_genes) for s in sections]
    return assemble(slides)


READERS: dict[str, Callable[..., ad.AnnData]] = {"her2st": read_her2st}


def read_slides(fmt: str, path: str | Path, **kw: Any) -> ad.AnnData:
    """Read ``path`` with the reader registered under ``fmt`` (see :data:`READERS`)."""
    try:
        reader = READERS[fmt]
    except KeyError:
        raise DataError(path, f"unknown format {fmt!r}; known: {sorted(READERS)}") from None
    return reader(path, **kw)
