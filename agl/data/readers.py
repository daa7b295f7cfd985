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
        return f"{int(mask.sum())} values, first at spot {spot!r}, gene {gene!r}: {data[k]!r}"

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
    rows, pos_rows, n_dropped = _join_spots(pd.Index(count_ids), pos_ids, counts_path, spot_path, strict)
    # Matched spots without a pixel position are dropped too: there is nowhere to cut a patch.
    no_pixel = ~np.isfinite(pos[["pixel_x", "pixel_y", "new_x", "new_y"]].to_numpy(float)[pos_rows]).all(axis=1)
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
    array_xy = pos[["new_x", "new_y"]].to_numpy(np.float64)
    if len(rows) < 3:
        raise DataError(spot_path, f"only {len(rows)} spots: too few to estimate the pixel size")
    mpp, rms = estimate_mpp_from_grid(array_xy, pixels)
    meta = {
        "image_path": str(image.absolute()) if image is not None else None,
        "microns_per_pixel": mpp,
        "spot_diameter_um": ST_SPOT_UM,
        "source_format": "her2st",
        "source_files": [str(p.absolute()) for p in (counts_path, spot_path, image) if p is not None],
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
        raise DataError(path, f"{key} must be a number, got {value!r}") from None
    if not np.isfinite(out) or out <= 0:
        raise DataError(path, f"{key} must be positive, got {value!r}")
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


def read_10x_h5(path: Path, feature_type: str = "Gene Expression") -> tuple[sp.csr_matrix, list[str], np.ndarray]:
    """Counts (barcodes x genes, int32 CSR), gene symbols and barcodes of a 10x HDF5 matrix."""
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
            types = _decode(m["features/feature_type"][:]) if "feature_type" in m["features"] else None
    except DataError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise DataError(path, f"cannot read the 10x HDF5 matrix: {type(err).__name__}: {err}") from err
    if types is not None:
        keep = np.flatnonzero(types == feature_type)
        if len(keep) == 0:
            raise DataError(path, f"no {feature_type!r} features")
        mat, names = mat[:, keep], names[keep]
    return counts_to_csr(mat, path, barcodes, names), list(names), barcodes


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


def read_visium(outs_dir: str | Path, image_path: str | Path | None = None, *,
                slide_id: str | None = None, duplicate_genes: str = "error",
                strict: bool = False) -> ad.AnnData:
    """Read a Space Ranger ``outs/`` folder (filtered matrix, spatial/ positions and scale factors).

    The full-resolution image is ``image_path`` or the single image in ``outs_dir`` or its
    parent. ``microns_per_pixel = 55 / spot_diameter_fullres``.
    """
    outs = Path(outs_dir)
    h5 = outs / "filtered_feature_bc_matrix.h5"
    counts, genes, barcodes = read_10x_h5(h5)
    _check_unique_barcodes(barcodes, h5)
    counts, genes = resolve_duplicate_genes(counts, genes, h5, duplicate_genes)
    pos, pos_path = _read_positions(outs / "spatial")
    pos_ids = pd.Index(pos["barcode"].astype(str))
    _check_unique_barcodes(pos_ids, pos_path)
    # Positions list every spot on the slide; only barcodes of the matrix without a position matter.
    missing = pd.Index(barcodes).difference(pos_ids, sort=False)
    if len(missing):
        problem = f"{len(missing)} barcodes have no position in {pos_path.name} (e.g. {list(missing[:3])})"
        if strict:
            raise DataError(h5, problem)
        log.warning("%s: %s; dropped them", h5, problem)
    rows = np.flatnonzero(pd.Index(barcodes).isin(pos_ids))
    if len(rows) == 0:
        raise DataError(h5, f"no barcode has a position in {pos_path.name}")
    pos = pos.iloc[pos_ids.get_indexer(barcodes[rows])]
    pixels = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    _check_pixels(pixels, barcodes[rows], pos_path)

    sf_path = _require_file(outs / "spatial" / "scalefactors_json.json", "scale factors")
    try:
        scalefactors = json.loads(sf_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(sf_path, f"cannot read the scale factors JSON: {err}") from err
    if "spot_diameter_fullres" not in scalefactors:
        raise DataError(sf_path, "lacks spot_diameter_fullres")
    diameter_px = _positive_float(scalefactors["spot_diameter_fullres"], sf_path, "spot_diameter_fullres")

    if image_path is None:
        image = _single_image(outs) or _single_image(outs.parent)
        if image is None:
            raise DataError(outs, "missing full-resolution image: none found in the folder or its "
                                  "parent; pass image_path")
    else:
        image = _require_file(Path(image_path), "full-resolution image")
    sid = slide_id or (outs.parent.name if outs.name == "outs" else outs.name)
    info = {
        "image_path": str(image.absolute()),
        "microns_per_pixel": VISIUM_SPOT_UM / diameter_px,
        "spot_diameter_um": VISIUM_SPOT_UM,
        "source_format": "visium",
        "source_files": [str(p.absolute()) for p in (h5, pos_path, sf_path, image)],
        "dropped_spots": int(len(missing)),
    }
    extra = {"array_row": pos["array_row"].to_numpy(np.int64), "array_col": pos["array_col"].to_numpy(np.int64)}
    return assemble([SlideData(sid, counts[rows], genes, barcodes[rows], pixels, info, extra, str(h5))])


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


def read_anndata(path: str | Path, *, image_path: str | Path | None = None, slide_id: str | None = None,
                 microns_per_pixel: float | None = None, spot_diameter_um: float | None = None,
                 duplicate_genes: str = "error") -> ad.AnnData:
    """Read a generic ``.h5ad`` with ``obsm["spatial"]`` (or a canonical agl AnnData).

    Raw counts come from ``layers["counts"]`` if present, else ``X`` (must be integer-valued).
    A file that already has ``obs["slide_id"]`` and ``uns["slides"]`` keeps its slides; any
    other file is one slide whose image and pixel size come from the arguments or from
    ``uns`` (``image_path``, ``microns_per_pixel``, ``spot_diameter_um``).
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
    if schema.OBS_SLIDE in adata.obs and uns_slides:  # already canonical: keep its slides
        slide_of = adata.obs[schema.OBS_SLIDE].astype(str).to_numpy()
        order = list(dict.fromkeys(slide_of))
        if slide_id is not None:
            if len(order) != 1:
                raise DataError(path, f"slide_id given but the file holds {len(order)} slides {order}")
            uns_slides = {slide_id: uns_slides.get(order[0], {})}
            slide_of, order = np.full(adata.n_obs, slide_id), [slide_id]
    else:
        sid = slide_id or path.stem
        slide_of, order = np.full(adata.n_obs, sid), [sid]
        uns = _plain(dict(adata.uns))
        uns_slides = {sid: {
            "image_path": image_path if image_path is not None else uns.get("image_path"),
            "microns_per_pixel": microns_per_pixel if microns_per_pixel is not None else
            uns.get("microns_per_pixel", uns.get("pixel_size_um_estimated")),
            "spot_diameter_um": spot_diameter_um if spot_diameter_um is not None else uns.get("spot_diameter_um"),
        }}
    counts_all = counts_to_csr(values, path, barcodes_all, genes, where)
    counts_all, genes = resolve_duplicate_genes(counts_all, genes, path, duplicate_genes)
    slides = []
    for sid in order:
        rows = np.flatnonzero(slide_of == sid)
        meta = dict(uns_slides.get(sid, {}))
        if image_path is not None:
            meta["image_path"] = str(image_path)
        if microns_per_pixel is not None:
            meta["microns_per_pixel"] = microns_per_pixel
        if spot_diameter_um is not None:
            meta["spot_diameter_um"] = spot_diameter_um
        if meta.get("microns_per_pixel") is None:
            raise DataError(path, f"slide {sid!r}: unknown pixel size; pass microns_per_pixel "
                                  "or store uns['microns_per_pixel']")
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
        slides.append(SlideData(sid, counts_all[rows], genes, barcodes, pixels_all[rows], meta, extra, str(path)))
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
