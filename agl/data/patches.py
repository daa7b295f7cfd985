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
LEVEL_OVERSAMPLE = 2.0  # read a pyramid level with at least this many pixels per output pixel
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


def is_tiff(path: str | Path) -> bool:
    """Whether ``path`` is a TIFF (classic or BigTIFF; SVS, OME-TIFF, BTF), by its first bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class SlideImage:
    """An H&E image read by region: ``region(level, x0, y0, x1, y1)`` -> uint8 RGB, white outside.

    ``sizes[level]`` is (width, height); level 0 is full resolution. Subclasses read the pixels.
    """

    path: Path
    sizes: list[tuple[int, int]]

    @property
    def width(self) -> int:
        return self.sizes[0][0]

    @property
    def height(self) -> int:
        return self.sizes[0][1]

    def downsample(self, level: int) -> tuple[float, float]:
        """Full-resolution pixels per pixel of ``level`` along x and y."""
        w, h = self.sizes[level]
        return self.width / w, self.height / h

    def level_for(self, px_per_out: float) -> int:
        """The coarsest level that keeps :data:`LEVEL_OVERSAMPLE` pixels per output pixel.

        Resampling from at least 2 source pixels per output pixel keeps the patch close to one cut
        from full resolution (the antialiasing filter, not the pyramid's, sets what survives).
        """
        ok = [lv for lv in range(len(self.sizes))
              if max(self.downsample(lv)) * LEVEL_OVERSAMPLE <= px_per_out * (1 + 1e-6)]
        return max(ok, key=lambda lv: max(self.downsample(lv))) if ok else 0

    def region(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of ``level`` as (h, w, 3) uint8; outside the image: white."""
        w, h = self.sizes[level]
        out = np.full((y1 - y0, x1 - x0, 3), PAD_VALUE, dtype=np.uint8)
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if ix0 < ix1 and iy0 < iy1:
            out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = self._read(level, ix0, iy0, ix1, iy1)
        return out

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file (no-op for a decoded image)."""

    def __enter__(self) -> "SlideImage":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PillowImage(SlideImage):
    """A PNG/JPEG (or small TIFF Pillow reads) decoded whole: fine for images of a few hundred MB."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.img = open_image(self.path)
        self.sizes = [self.img.size]

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return np.asarray(self.img.crop((x0, y0, x1, y1)), dtype=np.uint8)


_WHOLE_CHUNK = 0.25  # a TIFF whose chunks hold this share of the image is not tiled: decode it once


class TiffImage(SlideImage):
    """A (pyramidal, tiled) TIFF read through tifffile + zarr: a region decodes only its tiles.

    Every level of the first series (SubIFDs, SVS/OME pyramids) is a zarr array; memory holds
    the tiles of one patch, not the slide. A TIFF stored as one strip is decoded once instead.
    """

    def __init__(self, path: str | Path):
        import tifffile
        import zarr

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(self.path, "missing image file")
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            self._levels, self._axes, self.sizes = [], [], []
            for i, level in enumerate(series.levels):
                arr = zarr.open(series.aszarr(level=i), mode="r")
                axes = level.axes
                if "Y" not in axes or "X" not in axes:
                    raise DataError(self.path, f"TIFF level {i} has axes {axes!r}, no Y/X image plane")
                self._levels.append(arr)
                self._axes.append(axes)
                self.sizes.append((int(arr.shape[axes.index("X")]), int(arr.shape[axes.index("Y")])))
        except DataError:
            self.close()
            raise
        except Exception as err:  # tifffile raises TiffFileError, ValueError, KeyError... for damaged files
            self.close()
            raise DataError(self.path, f"unreadable or corrupt TIFF: {type(err).__name__}: {err}") from err
        self._whole: dict[int, np.ndarray] = {}
        dtype = self._levels[0].dtype
        if dtype not in (np.uint8, np.uint16):
            self.close()
            raise DataError(self.path, f"TIFF pixels are {dtype}; an RGB H&E image of uint8 (or uint16) expected")

    def _plane(self, level: int, data: np.ndarray, axes: str) -> np.ndarray:
        """(h, w, 3) uint8 from an array with ``axes`` (Y, X, optional S/C, other axes already indexed)."""
        order = [axes.index(a) for a in "YX"] + [axes.index(a) for a in axes if a in "SC"]
        data = np.transpose(data, order + [i for i in range(data.ndim) if i not in order])
        data = data.reshape(data.shape[0], data.shape[1], -1)
        if data.dtype == np.uint16:  # 16-bit scans: keep the top byte
            data = (data >> 8).astype(np.uint8)
        if data.shape[2] == 1:
            data = np.repeat(data, 3, axis=2)
        return np.ascontiguousarray(data[:, :, :3])

    def _index(self, level: int, y: slice, x: slice) -> tuple[tuple[Any, ...], str]:
        axes = self._axes[level]
        index = tuple(y if a == "Y" else x if a == "X" else slice(None) if a in "SC" else 0 for a in axes)
        return index, "".join(a for a in axes if a in "YXSC")

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        try:
            if level in self._whole:
                return self._whole[level][y0:y1, x0:x1]
            arr = self._levels[level]
            w, h = self.sizes[level]
            chunk = arr.chunks
            axes = self._axes[level]
            chunk_px = chunk[axes.index("Y")] * chunk[axes.index("X")]
            if chunk_px >= _WHOLE_CHUNK * w * h:
                log.info("%s: level %d is stored in %d px chunks (not tiled): decoding it whole", self.path,
                         level, chunk_px)
                index, kept = self._index(level, slice(None), slice(None))
                self._whole[level] = self._plane(level, arr[index], kept)
                return self._whole[level][y0:y1, x0:x1]
            index, kept = self._index(level, slice(y0, y1), slice(x0, x1))
            return self._plane(level, arr[index], kept)
        except DataError:
            raise
        except Exception as err:  # codec errors (e.g. JPEG tiles without imagecodecs), truncated tiles
            raise DataError(self.path, f"cannot decode TIFF level {level} at x {x0}-{x1}, y {y0}-{y1}: "
                                       f"{type(err).__name__}: {err}") from err

    def close(self) -> None:
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
            self._tif = None


def open_slide_image(path: str | Path) -> SlideImage:
    """The image at ``path`` for reading by region: TIFFs through tifffile + zarr, others through Pillow."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "missing image file")
    return TiffImage(path) if is_tiff(path) else PillowImage(path)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the full-resolution image at ``path``, read from its header only."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "missing image file")
    if is_tiff(path):
        with TiffImage(path) as img:
            return img.width, img.height
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(path, f"unreadable or corrupt image: {err}") from err


def _crop_resized(img: SlideImage, level: int, cx: float, cy: float, side: float,
                  out_px: int) -> tuple[np.ndarray, bool]:
    """A ``side``-pixel square centred on (cx, cy) (full-resolution pixels), cut from ``level`` and
    resized to ``out_px``; whether it crosses the image border (padded white)."""
    half = side / 2.0
    crosses = cx - half < 0 or cy - half < 0 or cx + half > img.width or cy + half > img.height
    dx, dy = img.downsample(level)
    lx, ly, hx, hy = cx / dx, cy / dy, half / dx, half / dy  # the box in the level's pixels
    margin = math.ceil(_SUPPORT * max(1.0, 2 * max(hx, hy) / out_px)) + 1  # filter support beyond the box
    x0, y0 = math.floor(lx - hx) - margin, math.floor(ly - hy) - margin
    x1, y1 = math.ceil(lx + hx) + margin, math.ceil(ly + hy) + margin
    box = (lx - hx - x0, ly - hy - y0, lx + hx - x0, ly + hy - y0)
    region = Image.fromarray(img.region(level, x0, y0, x1, y1))
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
    with open_slide_image(path) as img:
        xy = centres[rows]
        outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= img.width) | (xy[:, 1] >= img.height)
        if outside.any():
            raise DataError(path, f"{int(outside.sum())} spot centres of slide {sid!r} lie outside the "
                                  f"{img.width}x{img.height} image")
        level = img.level_for(side / patch_px)
        info["image_level"], info["image_levels"] = level, len(img.sizes)
        for row, (cx, cy) in zip(tqdm(rows, desc=f"patches {sid}", unit="spot", disable=not progress,
                                      leave=False), xy):
            patch, crosses = _crop_resized(img, level, float(cx), float(cy), side, patch_px)
            if crosses and border == "drop":
                keep[row] = False
                info["n_dropped"] += 1
                continue
            info["n_padded"] += int(crosses)
            patches[row] = patch
