"""Patch extraction on the real her2st images: geometry, resampling, borders, HEST .h5 reuse."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from agl.data import extract_patches, read_her2st
from agl.data.patches import RESAMPLE, open_image


@pytest.fixture(scope="module")
def c2(her2st_dir):
    return read_her2st(her2st_dir, "C2")


@pytest.fixture(scope="module")
def c2_image(c2):
    return open_image(c2.uns["slides"]["C2"]["image_path"])


@pytest.fixture(scope="module")
def c2_patches(c2):
    return extract_patches(c2[:40].copy(), progress=False)


def reference_patch(img, cx, cy, side, px):
    """Independent reference: Pillow resizing the sub-pixel box straight from the whole image."""
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    return np.asarray(img.resize((px, px), RESAMPLE, box=box))


def test_shape_dtype_and_report(c2_patches, c2):
    patches, keep, report = c2_patches
    assert patches.shape == (40, 224, 224, 3) and patches.dtype == np.uint8
    assert keep.all() and keep.dtype == bool
    info = report["slides"]["C2"]
    mpp = c2.uns["slides"]["C2"]["microns_per_pixel"]
    assert info["crop_px"] == pytest.approx(112.0 / mpp)
    assert info["n_spots"] == 40 and info["n_padded"] == 0 and info["n_dropped"] == 0
    # Real tissue, not blank padding: H&E patches vary and are not white.
    assert patches.reshape(40, -1).std(axis=1).min() > 10
    assert patches.mean() < 230


@pytest.mark.parametrize("i", [0, 17])
def test_patch_equals_direct_crop_and_resize(c2_patches, c2, c2_image, i):
    patches, _, report = c2_patches
    cx, cy = c2.obs[["pixel_x", "pixel_y"]].to_numpy()[i]
    ref = reference_patch(c2_image, cx, cy, report["slides"]["C2"]["crop_px"], 224)
    diff = np.abs(patches[i].astype(int) - ref.astype(int))
    assert diff.max() <= 1  # fixed-point filter rounding at most
    assert diff.mean() < 0.01


def test_patch_is_centred_on_the_spot(c2_patches, c2, c2_image):
    """A plain integer crop around the spot, scaled down, matches the patch scaled down."""
    patches, _, report = c2_patches
    cx, cy = c2.obs[["pixel_x", "pixel_y"]].to_numpy()[3]
    half = report["slides"]["C2"]["crop_px"] / 2
    crop = c2_image.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
    small_ref = np.asarray(crop.resize((16, 16), Image.Resampling.BOX), dtype=float)
    small_got = np.asarray(Image.fromarray(patches[3]).resize((16, 16), Image.Resampling.BOX), dtype=float)
    assert np.abs(small_ref - small_got).mean() < 3.0


def test_physical_size_sets_the_crop(c2, c2_image):
    sub = c2[:2].copy()
    patches, _, report = extract_patches(sub, patch_um=56.0, patch_px=112, progress=False)
    side = report["slides"]["C2"]["crop_px"]
    assert side == pytest.approx(56.0 / c2.uns["slides"]["C2"]["microns_per_pixel"])
    cx, cy = sub.obs[["pixel_x", "pixel_y"]].to_numpy()[1]
    ref = reference_patch(c2_image, cx, cy, side, 112)
    assert np.abs(patches[1].astype(int) - ref.astype(int)).max() <= 1


@pytest.fixture()
def near_border(c2):
    """Two real spots; the first moved 20 px from the left edge of the real image."""
    sub = c2[:2].copy()
    sub.obs.iloc[0, sub.obs.columns.get_loc("pixel_x")] = 20.0
    sub.obsm["spatial"] = sub.obs[["pixel_x", "pixel_y"]].to_numpy()
    return sub


def test_border_pad_fills_white(near_border, c2_image):
    patches, keep, report = extract_patches(near_border, border="pad", progress=False)
    assert keep.all()
    assert report["slides"]["C2"]["n_padded"] == 1
    side = report["slides"]["C2"]["crop_px"]
    # The crop starts side/2 - 20 px left of the image: that share of the patch is white.
    white_cols = int((side / 2 - 20) / side * 224) - 3
    assert white_cols > 50
    assert (patches[0][:, :white_cols] == 255).all()
    assert (patches[0][:, white_cols + 10:] != 255).any()
    # Equals the reference cut from the image laid on a white canvas 200 px wider on the left.
    cy = near_border.obs["pixel_y"].iloc[0]
    top = int(cy) - 200
    canvas = Image.new("RGB", (600, 400), (255, 255, 255))
    canvas.paste(c2_image.crop((0, top, 400, top + 400)), (200, 0))
    ref = reference_patch(canvas, 220.0, cy - top, side, 224)
    assert np.abs(patches[0].astype(int) - ref.astype(int)).max() <= 1


def test_border_drop_marks_spot(near_border):
    patches, keep, report = extract_patches(near_border, border="drop", progress=False)
    assert keep.tolist() == [False, True]
    assert report["slides"]["C2"]["n_dropped"] == 1 and report["n_dropped"] == 1
    assert patches[1].std() > 10


def test_bad_border_argument(c2):
    with pytest.raises(ValueError, match="border"):
        extract_patches(c2[:1].copy(), border="mirror", progress=False)


def test_upsampling_more_than_2x_warns(c2, caplog):
    """A patch cut from too few image pixels (a coarse scale) is enlarged: the user is told."""
    import logging

    sub = c2[:2].copy()
    with caplog.at_level(logging.WARNING, logger="agl.data.patches"):
        _, _, report = extract_patches(sub, patch_um=112.0, patch_px=224, progress=False)
    assert report["slides"]["C2"]["upsample"] < 2 and not caplog.records
    coarse = c2[:2].copy()
    coarse.uns["slides"]["C2"]["microns_per_pixel"] *= 8  # as if the 2k array were read as 1k, and more
    with caplog.at_level(logging.WARNING, logger="agl.data.patches"):
        _, _, report = extract_patches(coarse, patch_um=112.0, patch_px=224, progress=False)
    up = report["slides"]["C2"]["upsample"]
    assert up == pytest.approx(224 * coarse.uns["slides"]["C2"]["microns_per_pixel"] / 112.0)
    assert any("upsampled" in r.message and f"{up:.1f}x" in r.message for r in caplog.records)


# --------------------------------------------------------------------------- whole-slide TIFFs read by region


@pytest.fixture(scope="module")
def c2_tiff(c2_image, tmp_path_factory):
    """The real C2 H&E written as a tiled pyramidal TIFF (3 levels, lossless)."""
    from layouts import write_pyramid_tiff

    return write_pyramid_tiff(c2_image, tmp_path_factory.mktemp("wsi") / "C2.tif")


def _on_image(adata, path):
    out = adata.copy()
    out.uns["slides"]["C2"]["image_path"] = str(path)
    return out


def test_tiff_patches_equal_decoded_image(c2, c2_tiff, c2_patches):
    from agl.data.patches import TiffImage, open_slide_image

    with open_slide_image(c2_tiff) as img:
        assert isinstance(img, TiffImage) and len(img.sizes) == 3
        assert img.sizes[0] == (9274, 9911) and img.sizes[1] == (4637, 4956)  # Pillow reduce rounds up
    patches, keep, report = extract_patches(_on_image(c2[:40], c2_tiff), progress=False)
    assert keep.all() and report["slides"]["C2"]["image_level"] == 0
    np.testing.assert_array_equal(patches, c2_patches[0])  # lossless tiles: the very same pixels


def test_tiff_coarse_patches_come_from_a_pyramid_level(c2, c2_tiff, c2_image):
    """112 um at 32 px spans ~5 image px per output px: level 1 (2x) keeps 2.5, so it is read."""
    sub = _on_image(c2[:6], c2_tiff)
    patches, _, report = extract_patches(sub, patch_um=112.0, patch_px=32, progress=False)
    info = report["slides"]["C2"]
    assert info["image_level"] == 1 and info["image_levels"] == 3
    level1 = c2_image.reduce(2)
    dx, dy = c2_image.width / level1.width, c2_image.height / level1.height
    from_full, _, _ = extract_patches(c2[:6].copy(), patch_um=112.0, patch_px=32, progress=False)
    for i, (cx, cy) in enumerate(sub.obs[["pixel_x", "pixel_y"]].to_numpy()):
        half = info["crop_px"] / 2
        box = (cx / dx - half / dx, cy / dy - half / dy, cx / dx + half / dx, cy / dy + half / dy)
        ref = np.asarray(level1.resize((32, 32), RESAMPLE, box=box))
        assert np.abs(patches[i].astype(int) - ref.astype(int)).max() <= 1
        # and close to the patch cut from full resolution (the pyramid's own 2x filter differs)
        assert np.abs(patches[i].astype(float) - from_full[i].astype(float)).mean() < 4.0


@pytest.mark.reliability(kind="layout", case="whole-slide pyramidal TIFF (C2's 9274 x 9911 H&E, 3 levels, "
                         "256 px tiles) read by region",
                         outcome="numpy's peak while cutting 20 patches stays below 5% of the decoded image")
def test_tiff_region_reads_keep_memory_small(c2, c2_tiff):
    """Cutting patches decodes tiles, not the slide: numpy's peak stays far below the decoded image."""
    import tracemalloc

    sub = _on_image(c2[:20], c2_tiff)
    whole = 9274 * 9911 * 3
    tracemalloc.start()
    try:
        patches, _, _ = extract_patches(sub, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert patches.std() > 10
    assert peak < 0.05 * whole, f"peak {peak / 1e6:.1f} MB of numpy memory for a {whole / 1e6:.0f} MB image"


def test_strip_tiff_and_corrupt_tiff(c2, c2_image, tmp_path):
    from agl.errors import DataError
    from layouts import write_pyramid_tiff

    sub = c2[:3].copy()
    x0, y0 = (sub.obs[["pixel_x", "pixel_y"]].to_numpy().min(axis=0) - 300).astype(int)
    x1, y1 = (sub.obs[["pixel_x", "pixel_y"]].to_numpy().max(axis=0) + 300).astype(int)
    crop = c2_image.crop((x0, y0, x1, y1))  # a small real region, stored as strips (not tiled)
    path = write_pyramid_tiff(crop, tmp_path / "strips.tif", levels=1, tile=None)
    xy = sub.obs[["pixel_x", "pixel_y"]].to_numpy() - [x0, y0]
    moved = sub.copy()
    moved.obs["pixel_x"], moved.obs["pixel_y"] = xy[:, 0], xy[:, 1]
    moved.obsm["spatial"] = xy
    got, _, _ = extract_patches(_on_image(moved, path), progress=False)
    want, _, _ = extract_patches(sub, progress=False)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    bad = tmp_path / "bad.tif"
    bad.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=rf"^{bad}: (unreadable or corrupt TIFF|cannot decode TIFF)"):
        extract_patches(_on_image(moved, bad), progress=False)
