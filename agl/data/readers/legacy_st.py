"""Legacy ST: the her2st release (``ST-cnts``, ``ST-spotfiles``, ``ST-imgs``), one section's folder
(ST Pipeline counts + ST spot detector table + image), or several sections in one folder as STUtility
ships them; registered as ``her2st``."""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from agl.data.readers.common import (IMAGE_SUFFIXES, SlideData, check_unique_barcodes, is_number, join_spots,
                                     open_text, require_file, single_image, assemble, counts_to_csr,
                                     resolve_duplicate_genes)
from agl.data.readers.registry import register_reader
from agl.errors import DataError, show

log = logging.getLogger(__name__)

# Legacy ST (her2st): spot centres 200 um apart on the array grid, spots 100 um wide.
ST_GRID_UM = 200.0
ST_SPOT_UM = 100.0


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


def _is_spot_ids(labels: Sequence[Any]) -> bool:
    return len(labels) > 0 and all(_SPOT_ID.match(str(s)) for s in labels)


def _read_count_table(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Values (spots x genes), gene symbols (duplicates kept) and spot ids of a legacy ST counts table.

    Tab-separated, plain or gzip; spot ids ``"{x}x{y}"`` label the rows (her2st, ST Pipeline
    >= 1.5) or the columns (older ST Pipeline: genes as rows); the corner cell may be absent.
    """
    try:
        with open_text(path) as fh:
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
        with open_text(path) as fh:
            first = fh.readline()
        sep = "\t" if "\t" in first else r"\s+"
        cells = first.split()
        headerless = bool(cells) and all(is_number(c) for c in cells)
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
    return single_image(root / "ST-imgs" / section[0] / section, (".jpg", ".jpeg", ".tif", ".tiff", ".png"))


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


def her2st_sections(root: Path, require_image: bool) -> list[str]:
    counts = _stems(root / "ST-cnts", "", (".tsv.gz", ".tsv"))
    spots = _stems(root / "ST-spotfiles", "_selection", (".tsv", ".tsv.gz"))
    found = sorted(counts & spots)
    if require_image:
        found = [s for s in found if _her2st_image(root, s) is not None]
    return found


def _sniff_table(path: Path) -> str | None:
    """``"spots"`` for an ST spot detector table, ``"counts"`` for a counts table with XxY ids, else None."""
    try:
        with open_text(path) as fh:
            first, second = fh.readline(), fh.readline()
    except (OSError, EOFError, UnicodeDecodeError):
        return None
    head = first.split()
    if {"x", "y", "pixel_x", "pixel_y"} <= set(head) or (len(head) in (6, 7) and all(map(is_number, head))):
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
        counts = require_file(Path(counts_path), "counts table")
    elif path.is_file():
        counts = path
    else:
        counts = _one([p for p, k in kinds.items() if k == "counts"], "counts tables with XxY spot ids",
                      folder, "pass counts_path")
    if spots_path is not None:
        spots = require_file(Path(spots_path), "spot file")
    else:
        spots = _one([p for p, k in kinds.items() if k == "spots" and p != counts],
                     "spot tables (x y new_x new_y pixel_x pixel_y selected)", folder, "pass spots_path")
    image = require_file(Path(image_path), "image") if image_path is not None else single_image(folder)
    sid = slide_id or (folder.name if path.is_dir() else counts.name.split(".")[0])
    return STFiles(sid, counts, spots, image)


# what tools add to a section's name in a counts table's file name (ST Pipeline: {section}_stdata.tsv)
_COUNTS_DECORATION = re.compile(r"([_.-](stdata|counts))+$", re.IGNORECASE)


def _table_stem(name: str) -> str:
    return next((name[: -len(s)] for s in sorted(TABLE_SUFFIXES, key=len, reverse=True) if name.lower().endswith(s)),
                name)


def _names_section(section: str, file_name: str) -> bool:
    """``section`` appears in ``file_name`` as a whole token (``C2`` in ``spots_C2.tsv``, not in ``C21``)."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(section)}(?![A-Za-z0-9])", file_name) is not None


@dataclass
class FolderSections:
    """Several legacy ST sections side by side in one folder (as STUtility's users keep them): each counts
    table names a section; its spot table and image are the files whose names contain that name."""

    folder: Path
    counts: dict[str, Path]  # section -> counts table, in name order
    spots: dict[str, list[Path]]
    images: dict[str, list[Path]]
    spot_tables: list[Path]  # every spot table in the folder, named for a section or not

    def files(self, section: str) -> STFiles:
        """The section's files; DataError naming ``--sections`` for a section the folder lacks."""
        if section not in self.counts:
            raise DataError(self.folder, f"--sections {section}: this folder holds the legacy ST sections "
                                         f"{', '.join(self.counts)} (one counts table each), not {section}")
        found = self.spot_tables
        if len(self.spots[section]) != 1:
            what = "no spot table" if not self.spots[section] else f"{len(self.spots[section])} spot tables"
            raise DataError(self.folder, f"section {section}: {what} named for it (spot tables here: "
                                         f"{sorted(p.name for p in found) or 'none'}); name it {section} in its file")
        if len(self.images[section]) > 1:
            raise DataError(self.folder, f"section {section}: {len(self.images[section])} images named for it "
                                         f"({[p.name for p in self.images[section]]}); pass --image with --sections "
                                         f"{section}")
        image = self.images[section][0] if self.images[section] else None
        return STFiles(section, self.counts[section], self.spots[section][0], image)


def folder_sections(folder: Path) -> FolderSections | None:
    """The sections of a folder holding two or more legacy ST counts tables (by content), else None.

    A section is named by its counts table's file name without the table suffix and ``_stdata``;
    each spot table and image goes to the section whose name it contains (the longest if several).
    """
    if not folder.is_dir():
        return None
    tables = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name.lower().endswith(TABLE_SUFFIXES)]
    kinds = {p: _sniff_table(p) for p in tables}
    counts_files = [p for p, k in kinds.items() if k == "counts"]
    if len(counts_files) < 2:
        return None
    counts: dict[str, Path] = {}
    for p in counts_files:
        section = _COUNTS_DECORATION.sub("", _table_stem(p.name))
        if section in counts:
            raise DataError(folder, f"two counts tables name section {section}: {counts[section].name}, {p.name}")
        counts[section] = p
    spots: dict[str, list[Path]] = {s: [] for s in counts}
    images: dict[str, list[Path]] = {s: [] for s in counts}
    files = [(p, spots) for p, k in kinds.items() if k == "spots"]
    files += [(p, images) for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    for p, into in files:
        named = [s for s in counts if _names_section(s, p.name)]
        if named:
            into[max(named, key=len)].append(p)
        else:
            log.info("%s: names none of the sections %s; not used", p, list(counts))
    return FolderSections(folder, counts, spots, images, [p for p, k in kinds.items() if k == "spots"])


def read_st_section(files: STFiles, *, require_image: bool = True, strict: bool = False,
                    duplicate_genes: str = "error", array: str = "auto",
                    source_format: str = "legacy_st") -> SlideData:
    """One legacy ST section (counts table + spot detector table [+ image]) as :class:`SlideData`.

    Spots the spot table marks ``selected == 0`` (off the tissue) are left out; the pixel
    size is fitted on the array grid with the pitch of the detected (or given) array.
    """
    counts_path, spot_path, image = files.counts, files.spots, files.image
    require_file(counts_path, "counts file")
    require_file(spot_path, "spot file")
    if image is None and require_image:
        raise DataError(spot_path.parent, "missing image (no H&E image found); pass --image")
    values, genes, count_ids = _read_count_table(counts_path)
    check_unique_barcodes(count_ids, counts_path)
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
    check_unique_barcodes(pos_ids, spot_path)
    rows, pos_rows, n_dropped = join_spots(pd.Index(count_ids), pos_ids, counts_path, spot_path, strict)
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


def _read_folder_sections(several: FolderSections, sections: Sequence[str] | None, image_path: str | Path | None,
                          **kw: Any) -> ad.AnnData:
    """Sections of one folder holding several (``sections``, else every one: with an image if required)."""
    files = [several.files(s) for s in (several.counts if sections is None else sections)]
    if sections is None and kw["require_image"]:  # every section with an image, as in a her2st release
        files = [f for f in files if f.image is not None]
        if not files:
            raise DataError(several.folder, f"no image named for any of the sections {', '.join(several.counts)}; "
                                            "pass --sections and --image")
    if image_path is not None:
        if len(files) != 1:
            raise DataError(several.folder, f"--image names one image but {len(files)} sections are read; "
                                            "choose one with --sections")
        files[0].image = require_file(Path(image_path), "image")
    return assemble([read_st_section(f, **kw) for f in files])


def _legacy_st_units(root: Path, require_image: bool = True, **_: Any) -> list[str]:
    """Sections of a her2st release (every one with counts and a spot file, and an image if required), or of
    a folder holding several sections' tables; none (one unit) for a single section."""
    if (root / "ST-cnts").is_dir():
        return her2st_sections(root, require_image)
    several = folder_sections(root)
    if several is None:
        return []
    return [s for s in several.counts if several.images[s] or not require_image]


@register_reader("her2st", subset="sections", list_units=_legacy_st_units,
                 help="legacy ST: a her2st release, one section's folder, or STUtility's several sections in one folder")
def read_her2st(root: str | Path, sections: Sequence[str] | str | None = None, *,
                require_image: bool = True, strict: bool = False, duplicate_genes: str = "error",
                array: str = "auto", image_path: str | Path | None = None,
                counts_path: str | Path | None = None, spots_path: str | Path | None = None) -> ad.AnnData:
    """Read legacy ST sections: a her2st-style release, or one section's folder or counts table.

    A release (``ST-cnts/{s}.tsv[.gz]``, ``ST-spotfiles/{s}_selection.tsv``, ``ST-imgs/{P}/{s}/``):
    ``sections=None`` reads every section with a counts and spot file (and an image if
    ``require_image``). A folder with two or more counts tables holds as many sections side by side, as
    STUtility's users keep them (:func:`folder_sections`; ``sections`` picks among them, named after the
    counts tables). Anything else is one section (:func:`st_section_files`): a folder with
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
    explicit = counts_path is not None or spots_path is not None
    several = None if explicit or (root / "ST-cnts").is_dir() else folder_sections(root)
    if several is not None:
        return _read_folder_sections(several, sections, image_path, **kw)
    if not (root / "ST-cnts").is_dir() or counts_path is not None or spots_path is not None:
        if sections is not None and len(sections) != 1:
            raise DataError(root, f"holds one legacy ST section, not a release: cannot select {list(sections)}")
        files = st_section_files(root, counts_path=counts_path, spots_path=spots_path, image_path=image_path,
                                 slide_id=sections[0] if sections else None)
        return assemble([read_st_section(files, **kw)])
    if sections is None:
        sections = her2st_sections(root, require_image)
        if not sections:
            raise DataError(root, "no section has counts, a spot file"
                                  + (" and an image" if require_image else ""))
    if image_path is not None:
        if len(sections) != 1:
            raise DataError(root, f"--image names one image but {len(sections)} sections are read")
        files = STFiles(sections[0], _her2st_counts(root, sections[0]), _her2st_spots(root, sections[0]),
                        require_file(Path(image_path), "image"))
        return assemble([read_st_section(files, **kw, source_format="her2st")])
    return assemble([read_her2st_section(root, s, **kw) for s in sections])
