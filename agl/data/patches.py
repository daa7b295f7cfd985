"""One H&E patch per spot, covering a fixed physical size (``patch_um`` micrometres).

The crop is ``patch_um / microns_per_pixel`` full-resolution pixels wide, centred on the spot
(sub-pixel exact: Pillow's ``resize(box=...)``), resampled with an antialiasing filter to
``patch_px`` pixels. HEST samples with pre-extracted patches of the same physical size are
read from their ``.h5`` instead of the whole-slide image.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from agl.data import schema
from agl.errors import DataError

log = logging.getLogger(__name__)

Image.MAX_IMAGE_PIXELS = None  # whole-slide H&E images exceed Pillow's decompression-bomb limit
BORDERS = ("pad", "drop")
PAD_VALUE = 255  # white, like glass without tissue
RESAMPLE = Image.Resampling.BICUBIC  # Pillow scales the filter support when shrinking: antialiased
MAX_UPSAMPLE = 2.0  # warn when a patch is enlarged more than this
_SUPPORT = 2.0  # bicubic filter half-width in output pixels; crops carry this margin


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an RGB image; DataError naming the file if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "missing image file")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated files fail here, not mid-way
            return img.convert("RGB") if img.mode != "RGB" else img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(path, f"unreadable or corrupt image: {err}") from err


def _crop_resized(img: Image.Image, cx: float, cy: float, side: float, out_px: int) -> tuple[np.ndarray, bool]:
    """A ``side``-pixel square centred on (cx, cy), resized to ``out_px``; whether it was padded."""
    half = side / 2.0
    margin = math.ceil(_SUPPORT * max(1.0, side / out_px)) + 1  # filter support beyond the box
    x0, y0 = math.floor(cx - half) - margin, math.floor(cy - half) - margin
    x1, y1 = math.ceil(cx + half) + margin, math.ceil(cy + half) + margin
    box = (cx - half - x0, cy - half - y0, cx + half - x0, cy + half - y0)
    crosses = cx - half < 0 or cy - half < 0 or cx + half > img.width or cy + half > img.height
    if x0 >= 0 and y0 >= 0 and x1 <= img.width and y1 <= img.height:
        region = img.crop((x0, y0, x1, y1))
    else:  # paste the part inside the image onto white
        region = Image.new("RGB", (x1 - x0, y1 - y0), (PAD_VALUE,) * 3)
        inner = (max(x0, 0), max(y0, 0), min(x1, img.width), min(y1, img.height))
        if inner[0] < inner[2] and inner[1] < inner[3]:
            region.paste(img.crop(inner), (inner[0] - x0, inner[1] - y0))
    out = region.resize((out_px, out_px), RESAMPLE, box=box)
    return np.asarray(out, dtype=np.uint8), crosses


def _resize_patch(patch: np.ndarray, out_px: int) -> np.ndarray:
    if patch.shape[0] == out_px:
        return patch
    return np.asarray(Image.fromarray(patch).resize((out_px, out_px), RESAMPLE), dtype=np.uint8)


def _from_hest_h5(h5_path: Path, barcodes: np.ndarray, out_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Pre-extracted HEST patches for ``barcodes`` (matched by barcode); mask of those found."""
    try:
        with h5py.File(h5_path, "r") as f:
            key = "barcode" if "barcode" in f else "barcodes"  # both spellings occur in HEST files
            raw = f[key][:]
            flat = raw.reshape(len(raw), -1)[:, 0] if raw.ndim > 1 else raw
            h5_barcodes = [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in flat]
            index = {b: i for i, b in enumerate(h5_barcodes)}
            rows = np.array([index.get(b, -1) for b in barcodes], dtype=np.int64)
            found = rows >= 0
            out = np.empty((len(barcodes), out_px, out_px, 3), np.uint8)
            if found.any():
                wanted = rows[found]
                order = np.argsort(wanted)  # h5py needs increasing indices
                imgs = f["img"][np.sort(wanted)]
                unsorted = np.empty_like(imgs)
                unsorted[order] = imgs
                if unsorted.ndim != 4 or unsorted.shape[-1] != 3:
                    raise DataError(h5_path, f"'img' must be [N, px, px, 3], got {unsorted.shape}")
                out[found] = np.stack([_resize_patch(p, out_px) for p in unsorted])
    except (OSError, KeyError) as err:
        raise DataError(h5_path, f"cannot read HEST patches: {type(err).__name__}: {err}") from err
    return out, found


def _h5_patch_um(h5_path: Path, um_per_px: float) -> float:
    try:
        with h5py.File(h5_path, "r") as f:
            return float(f["img"].shape[1]) * um_per_px
    except (OSError, KeyError) as err:
        raise DataError(h5_path, f"cannot read HEST patches: {type(err).__name__}: {err}") from err


def extract_patches(adata: Any, patch_um: float = 112.0, patch_px: int = 224, border: str = "pad",
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Cut one ``patch_px`` RGB patch covering ``patch_um`` micrometres around every spot.

    Returns ``(patches uint8 [n, patch_px, patch_px, 3], keep bool [n], report)``. A patch that
    crosses the image border is padded with white (``border="pad"``) or marked ``keep=False``
    (``"drop"``); a spot centre outside the image raises DataError. ``report["slides"][sid]``
    counts spots, padded/dropped spots and the source (image or HEST .h5) per slide.
    """
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    if patch_um <= 0 or patch_px <= 0:
        raise ValueError(f"patch_um and patch_px must be positive, got {patch_um}, {patch_px}")
    n = adata.n_obs
    patches = np.full((n, patch_px, patch_px, 3), PAD_VALUE, dtype=np.uint8)
    keep = np.ones(n, dtype=bool)
    report: dict[str, Any] = {"patch_um": float(patch_um), "patch_px": int(patch_px), "border": border,
                              "slides": {}}
    slide_of = adata.obs[schema.OBS_SLIDE].astype(str).to_numpy()
    barcodes = adata.obs[schema.OBS_BARCODE].astype(str).to_numpy()
    centres = adata.obs[[schema.OBS_PX, schema.OBS_PY]].to_numpy(np.float64)
    for sid in dict.fromkeys(slide_of):
        rows = np.flatnonzero(slide_of == sid)
        meta = adata.uns[schema.UNS_SLIDES][sid]
        mpp = float(meta["microns_per_pixel"])
        info = {"n_spots": int(len(rows)), "n_padded": 0, "n_dropped": 0, "n_from_h5": 0,
                "crop_px": patch_um / mpp, "upsample": patch_px * mpp / patch_um}
        todo = rows
        h5 = meta.get("patches_h5")
        if h5 and math.isclose(_h5_patch_um(Path(h5), float(meta.get("patches_um_per_px", 0.5))),
                               patch_um, rel_tol=1e-6):
            got, found = _from_hest_h5(Path(h5), barcodes[rows], patch_px)
            patches[rows[found]] = got[found]
            info["n_from_h5"] = int(found.sum())
            todo = rows[~found]
        if len(todo):
            if info["upsample"] > MAX_UPSAMPLE:
                log.warning("slide %s: a %g um patch spans %.1f image pixels at %.4g um/px and is upsampled "
                            "%.1fx to %d px: the image holds less detail than the model sees (check the pixel "
                            "size, or pass a full-resolution image)", sid, patch_um, info["crop_px"], mpp,
                            info["upsample"], patch_px)
            _from_image(meta, sid, todo, centres, patch_um / mpp, patch_px, border, patches, keep, info,
                        progress, h5)
        report["slides"][sid] = info
        log.info("patches %s: %d spots (%d from HEST h5, %d padded, %d dropped)", sid, info["n_spots"],
                 info["n_from_h5"], info["n_padded"], info["n_dropped"])
    report["n_dropped"] = int((~keep).sum())
    return patches, keep, report


def _from_image(meta: dict[str, Any], sid: str, rows: np.ndarray, centres: np.ndarray, side: float,
                patch_px: int, border: str, patches: np.ndarray, keep: np.ndarray, info: dict[str, Any],
                progress: bool, h5: str | None) -> None:
    """Cut patches for ``rows`` from the slide image, writing into ``patches`` / ``keep``."""
    path = meta.get("image_path")
    if not path:
        where = f"{len(rows)} spots are not in {h5} and the" if h5 else "the"
        source = (list(meta.get("source_files") or []) or [None])[0]
        raise DataError(source, f"slide {sid!r}: {where} slide has no image_path")
    img = open_image(path)
    xy = centres[rows]
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= img.width) | (xy[:, 1] >= img.height)
    if outside.any():
        raise DataError(path, f"{int(outside.sum())} spot centres of slide {sid!r} lie outside the "
                              f"{img.width}x{img.height} image")
    for row, (cx, cy) in zip(tqdm(rows, desc=f"patches {sid}", unit="spot", disable=not progress,
                                  leave=False), xy):
        patch, crosses = _crop_resized(img, float(cx), float(cy), side, patch_px)
        if crosses and border == "drop":
            keep[row] = False
            info["n_dropped"] += 1
            continue
        info["n_padded"] += int(crosses)
        patches[row] = patch
