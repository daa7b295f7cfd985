"""Visium HD: a real her2st section's counts split into 2/8/16 um bins of a Space Ranger 3- and 4-style outs/,
pooled back into square pseudo-spots exactly (issue 30)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from agl.cli import main
from agl.data import extract_patches
from agl.data.readers import read_her2st, read_visium_hd
from agl.data.store import open_store
from agl.errors import DataError
from layouts import hd_square_of_spots, pseudo_spot_rows, write_visium_hd

SPOT_UM = 112.0


@pytest.fixture(scope="module")
def c3(her2st_dir):
    return read_her2st(her2st_dir, "C3")


@pytest.fixture(scope="module")
def hd_outs(c3, tmp_path_factory):
    return write_visium_hd(c3, tmp_path_factory.mktemp("hd") / "C3" / "outs", bins_um=(8, 16), spot_um=SPOT_UM,
                           hires=True)


def expected_centres(c3, spot_um):
    """Full-resolution pixel centres of the squares holding each source spot (grid anchored at pixel 0)."""
    mpp = c3.uns["slides"]["C3"]["microns_per_pixel"]
    return (hd_square_of_spots(c3, spot_um) + 0.5) * spot_um / mpp


def assert_pools_back(got, c3, spot_um):
    """Each pseudo-spot holds exactly one source spot's counts, at the centre of that spot's square."""
    order = pseudo_spot_rows(got, hd_square_of_spots(c3, spot_um), spot_um, expected_centres(c3, spot_um))
    assert list(got.var_names) == list(c3.var_names)
    assert (got.X[order] != c3.X).nnz == 0
    return order


@pytest.mark.reliability(kind="layout", case="Visium HD outs/ (Space Ranger 3): C3's counts split over the 8 um and "
                         "16 um bins of binned_outputs/square_XXXum (h5 matrix, tissue_positions.parquet, "
                         "scalefactors_json.json), --image the full-resolution JPEG",
                         outcome="112 um pseudo-spots: pooled counts equal each source spot's counts; centres at the "
                                 "squares' centres; um/px = microns_per_pixel; patches pixel-identical to the JPEG's")
@pytest.mark.parametrize("bin_um", [8, 16])
def test_visium_hd_pools_bins_back_into_spots(c3, hd_outs, bin_um):
    image = c3.uns["slides"]["C3"]["image_path"]
    got = read_visium_hd(hd_outs, image, bin_um=bin_um, spot_um=SPOT_UM)
    order = assert_pools_back(got, c3, SPOT_UM)
    meta = got.uns["slides"]["C3"]
    assert meta["microns_per_pixel"] == pytest.approx(c3.uns["slides"]["C3"]["microns_per_pixel"], rel=1e-12)
    assert meta["image_kind"] == "full-resolution" and meta["bin_um"] == bin_um
    assert not meta["segmented_outputs"]
    assert (got.obs["n_bins"].to_numpy() == (SPOT_UM / bin_um) ** 2).all()
    want = c3.copy()
    want.obs[["pixel_x", "pixel_y"]] = expected_centres(c3, SPOT_UM)
    patches, _, _ = extract_patches(got[order], patch_um=SPOT_UM, patch_px=64, progress=False)
    reference, _, _ = extract_patches(want, patch_um=SPOT_UM, patch_px=64, progress=False)
    np.testing.assert_array_equal(patches, reference)


@pytest.mark.reliability(kind="layout", case="Visium HD outs/ (Space Ranger 4: segmented_outputs/ beside "
                         "binned_outputs/), 2 um bins (3,136 per pseudo-spot), 30 spots of C3",
                         outcome="the bins read, segmented_outputs noted and not read; pooled counts equal the spots'")
def test_visium_hd_space_ranger_4_two_micron_bins(c3, tmp_path):
    part = c3[:30].copy()
    outs = write_visium_hd(part, tmp_path / "C3" / "outs", bins_um=(2,), spot_um=SPOT_UM, space_ranger=4)
    got = read_visium_hd(outs, part.uns["slides"]["C3"]["image_path"], bin_um=2, spot_um=SPOT_UM)
    assert_pools_back(got, part, SPOT_UM)
    assert got.uns["slides"]["C3"]["segmented_outputs"]


@pytest.mark.reliability(kind="layout", case="Visium HD outs/ as Space Ranger writes it: no full-resolution image, "
                         "spatial/tissue_hires_image.png (6000 px) and its scale factor",
                         outcome="the hires PNG used with tissue_hires_scalef, a warning stating the um/px")
def test_visium_hd_without_image_uses_hires(c3, hd_outs, caplog):
    with caplog.at_level(logging.WARNING):
        got = read_visium_hd(hd_outs, bin_um=16, spot_um=SPOT_UM)
    meta = got.uns["slides"]["C3"]
    sf = json.loads((hd_outs / "binned_outputs/square_016um/spatial/scalefactors_json.json").read_text())
    assert meta["image_kind"] == "tissue_hires_image"
    assert meta["microns_per_pixel"] == pytest.approx(sf["microns_per_pixel"] / sf["tissue_hires_scalef"])
    assert any("no --image given" in r.message for r in caplog.records)


@pytest.mark.reliability(kind="bad input", case="Visium HD: scale factors whose bin_size_um / spot_diameter_fullres "
                         "disagrees with microns_per_pixel (10%)",
                         outcome="DataError naming scalefactors_json.json and both values; nothing read")
def test_visium_hd_scale_disagreement(c3, tmp_path):
    outs = write_visium_hd(c3[:20].copy(), tmp_path / "C3" / "outs", bins_um=(16,))
    sf_path = outs / "binned_outputs/square_016um/spatial/scalefactors_json.json"
    sf = json.loads(sf_path.read_text())
    sf["microns_per_pixel"] *= 1.1
    sf_path.write_text(json.dumps(sf))
    with pytest.raises(DataError, match=r"scalefactors_json.json.*disagrees with microns_per_pixel"):
        read_visium_hd(outs, bin_um=16, image_path=c3.uns["slides"]["C3"]["image_path"])


@pytest.mark.reliability(kind="bad input", case="Visium HD: --spot-um not a whole number of bins (100 um of 8 um "
                         "bins), or --bin-um whose folder the outs/ lacks",
                         outcome="DataError naming --spot-um and --bin-um (and a size that works), or the bin "
                                 "folders the outs/ has")
def test_visium_hd_bad_sizes(c3, hd_outs):
    image = c3.uns["slides"]["C3"]["image_path"]
    with pytest.raises(DataError, match=r"--spot-um 100 is not a whole multiple of --bin-um 8.*--spot-um 96"):
        read_visium_hd(hd_outs, image, bin_um=8, spot_um=100)
    with pytest.raises(DataError, match=r"--bin-um 2.*square_008um, square_016um"):
        read_visium_hd(hd_outs, image, bin_um=2)


def test_visium_hd_ingest_cli(c3, hd_outs, tmp_path):
    out = tmp_path / "store"
    assert main(["ingest", "visium-hd", str(hd_outs), "--bin-um", "16", "--image", c3.uns["slides"]["C3"]["image_path"],
                 "--out", str(out), "--patch-px", "32", "--seeds", "0", "--splits", "kfold"]) == 0
    store = open_store(out)
    assert store.manifest["slide_meta"]["C3"]["spot_diameter_um"] == 112.0  # --spot-um defaults to --patch-um
    assert store.manifest["slides"]["C3"] >= 175
