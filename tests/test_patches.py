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
