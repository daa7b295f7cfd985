"""A generic ``.h5ad`` (``obsm['spatial']``), a canonical agl AnnData, or scanpy's Visium layout
(``uns['spatial']``); registered as ``anndata`` and ``h5ad``."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import anndata as ad
import numpy as np

from agl.data import schema
from agl.data.genes import alias_columns
from agl.data.readers.common import (ScaledImage, SlideData, check_pixels, check_unique_barcodes, raw_counts_of,
                                     positive_float, read_h5ad_file, assemble, choose_image, counts_to_csr,
                                     names_of_kept_genes, resolve_duplicate_genes)
from agl.data.readers.registry import register_reader
from agl.data.readers.visium import VISIUM_SPOT_UM
from agl.errors import DataError, show

log = logging.getLogger(__name__)


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
    check_pixels(pixels, barcodes[rows], path)
    library = library if isinstance(library, Mapping) else {}
    scalefactors = _plain(dict(library.get("scalefactors") or {}))
    spot_um = VISIUM_SPOT_UM if spot_diameter_um is None else positive_float(spot_diameter_um, path,
                                                                               "--spot-diameter-um")
    if microns_per_pixel is not None:
        full_mpp = positive_float(microns_per_pixel, path, "--microns-per-pixel")
    elif "spot_diameter_fullres" in scalefactors:
        full_mpp = spot_um / positive_float(scalefactors["spot_diameter_fullres"], path,
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


@register_reader("anndata", aliases=("h5ad",), help="an .h5ad with obsm['spatial'] (scanpy's Visium layout too)")
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
    adata = read_h5ad_file(path)
    if "spatial" not in adata.obsm:
        raise DataError(path, "no obsm['spatial'] spot positions")
    values, where = raw_counts_of(adata, path)
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
        meta["microns_per_pixel"] = positive_float(meta["microns_per_pixel"], path, "microns_per_pixel")
        if meta.get("image_path") is not None:
            meta["image_path"] = str(Path(meta["image_path"]).absolute())
        meta.setdefault("spot_diameter_um", None)
        meta.setdefault("source_format", "anndata")
        meta["source_files"] = list(meta.get("source_files") or []) or [str(path.absolute())]
        barcodes = barcodes_all[rows]
        check_unique_barcodes(barcodes, path)
        check_pixels(pixels_all[rows], barcodes, path)
        extra = {c: adata.obs[c].to_numpy()[rows] for c in ("array_row", "array_col") if c in adata.obs}
        slides.append(SlideData(sid, counts_all[rows], genes, barcodes, pixels_all[rows] * scale_of.get(sid, 1.0),
                                meta, extra, var_extra=var_extra, source=str(path)))
    return assemble(slides)
