"""Xenium with its H&E: a real her2st section's counts written as transcripts (and cells) inside its spots, the real
H&E under a known affine; pooled back into square pseudo-spots exactly (issue 30)."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from agl.cli import main
from agl.data import extract_patches
from agl.data.readers import read_her2st, read_xenium
from agl.data.store import open_store
from agl.errors import DataError
from layouts import (XENIUM_PIXEL_SIZE, he_to_xenium_affine, pseudo_spot_rows, write_xenium,
                     xenium_square_of_spots)

SPOT_UM = 112.0
PANEL = 400  # a Xenium-sized panel: the section's most-counted genes


@pytest.fixture(scope="module")
def c3(her2st_dir):
    full = read_her2st(her2st_dir, "C3")
    top = np.argsort(-np.asarray(full.X.sum(axis=0)).ravel(), kind="stable")[:PANEL]
    panel = full[:, np.sort(top)]
    return panel[np.asarray(panel.X.sum(axis=1)).ravel() > 0].copy()  # a spot without a panel UMI has no transcript


@pytest.fixture(scope="module")
def affine(c3):
    return he_to_xenium_affine(c3.uns["slides"]["C3"]["microns_per_pixel"])


@pytest.fixture(scope="module")
def bundle(c3, affine, tmp_path_factory):
    return write_xenium(c3, tmp_path_factory.mktemp("xe") / "C3_xe", affine=affine, spot_um=SPOT_UM)


def he_centres(c3, affine, spot_um):
    """H&E pixel centres of the Xenium squares holding each spot: the inverse of the known affine."""
    um = (xenium_square_of_spots(c3, affine, spot_um) + 0.5) * spot_um
    px = np.column_stack([um / XENIUM_PIXEL_SIZE, np.ones(len(um))]) @ np.linalg.inv(affine).T
    return px[:, :2]


def assert_pools_back(got, c3, affine, spot_um):
    order = pseudo_spot_rows(got, xenium_square_of_spots(c3, affine, spot_um), spot_um, he_centres(c3, affine, spot_um))
    genes = list(got.var_names)
    assert set(genes) <= set(c3.var_names) and not [g for g in genes if g.startswith(("NegControl", "BLANK"))]
    want = c3[:, genes].X
    assert (got.X[order] != want).nnz == 0
    assert int(c3.X.sum()) == int(got.X.sum())  # every gene UMI of the panel, none of the others
    return order


@pytest.mark.reliability(kind="layout", case="Xenium bundle (experiment.xenium, transcripts.parquet with qv, "
                         "cells.parquet, cell_feature_matrix.h5) from C3 (400-gene panel) + the real H&E under a "
                         "rotated, scaled, shifted affine (*_he_imagealignment.csv)",
                         outcome="112 um pseudo-spots: gene transcripts with qv >= 20 summed equal each spot's counts "
                                 "(low-qv and control probes left out); centres = the inverse affine; um/px = the H&E's; "
                                 "patches pixel-identical to the H&E's at those centres")
def test_xenium_transcripts_pool_back_into_spots(c3, affine, bundle):
    image = next(bundle.parent.glob("C3_xe_he_image.*"))
    got = read_xenium(bundle, image, alignment_path=bundle.parent / "C3_xe_he_imagealignment.csv", spot_um=SPOT_UM)
    order = assert_pools_back(got, c3, affine, SPOT_UM)
    meta = got.uns["slides"]["C3_xe"]
    assert meta["microns_per_pixel"] == pytest.approx(c3.uns["slides"]["C3"]["microns_per_pixel"], rel=1e-9)
    assert meta["xenium_counts"] == "transcripts" and meta["min_qv"] == 20.0 and meta["low_qv_transcripts"] > 0
    want = c3.copy()
    want.obs[["pixel_x", "pixel_y"]] = he_centres(c3, affine, SPOT_UM)
    patches, _, _ = extract_patches(got[order], patch_um=SPOT_UM, patch_px=64, progress=False)
    reference, _, _ = extract_patches(want, patch_um=SPOT_UM, patch_px=64, progress=False)
    np.testing.assert_array_equal(patches, reference)
    # --min-qv 0 takes the low-quality transcripts too: exactly those written with qv < 20 are added
    table = pq.read_table(bundle / "transcripts.parquet").to_pandas()
    low = table[(table["qv"] < 20) & ~table["feature_name"].str.startswith(("NegControl", "BLANK"))]
    everything = read_xenium(bundle, image, alignment_path=bundle.parent / "C3_xe_he_imagealignment.csv",
                             spot_um=SPOT_UM, min_qv=0)
    assert int(everything.X.sum()) == int(got.X.sum()) + len(low)


@pytest.mark.reliability(kind="layout", case="Xenium bundle without transcripts.parquet (cells only), and the "
                         "alignment as a Xenium Explorer keypoints CSV (fixedX/fixedY morphology px, alignmentX/alignmentY H&E px)",
                         outcome="cells pooled by centroid give each spot's counts exactly (a warning says cells are "
                                 "used); the affine fitted to 5 keypoints places the squares as the matrix does")
def test_xenium_cells_only_with_keypoints(c3, affine, tmp_path):
    bundle = write_xenium(c3, tmp_path / "C3_cells", affine=affine, spot_um=SPOT_UM, transcripts=False, keypoints=True)
    image = next(tmp_path.glob("C3_cells_he_image.*"))
    got = read_xenium(bundle, image, alignment_path=tmp_path / "C3_cells_keypoints.csv", spot_um=SPOT_UM)
    assert_pools_back(got, c3, affine, SPOT_UM)
    assert got.uns["slides"]["C3_cells"]["xenium_counts"] == "cells"


@pytest.mark.reliability(kind="bad input", case="Xenium: no alignment (none in the bundle, no --alignment), a singular "
                         "alignment matrix, an H&E that does not cover the transcripts (alignment shifted off it)",
                         outcome="DataError naming --alignment / 'singular' / --he and --alignment with the count of "
                                 "pseudo-spots outside the image")
def test_xenium_bad_alignments(c3, affine, bundle, tmp_path):
    image = next(bundle.parent.glob("C3_xe_he_image.*"))
    with pytest.raises(DataError, match="--alignment"):
        read_xenium(bundle, image)  # the alignment lies beside the bundle, not in it
    singular = tmp_path / "singular.csv"
    np.savetxt(singular, np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 1.0]]), delimiter=",")
    with pytest.raises(DataError, match="singular"):
        read_xenium(bundle, image, alignment_path=singular)
    shifted = affine.copy()
    shifted[:2, 2] -= 60000.0  # the H&E now lies far from the transcripts
    off = tmp_path / "off.csv"
    np.savetxt(off, shifted, delimiter=",", fmt="%.17g")
    with pytest.raises(DataError, match=r"does not cover the transcripts; check --he and --alignment"):
        read_xenium(bundle, image, alignment_path=off)


@pytest.mark.reliability(kind="bad input", case="Xenium panel of 30 genes ingested with the default --n-primary 50",
                         outcome="exit 2; the message names --n-primary, the genes left and a value that works; "
                                 "nothing written")
def test_xenium_panel_too_small(c3, affine, tmp_path, capsys):
    small = c3[:, :30].copy()
    bundle = write_xenium(small, tmp_path / "small", affine=affine, spot_um=SPOT_UM)
    out = tmp_path / "store"
    rc = main(["ingest", "xenium", str(bundle), "--he", str(next(tmp_path.glob("small_he_image.*"))),
               "--alignment", str(tmp_path / "small_he_imagealignment.csv"), "--min-genes", "1",
               "--out", str(out), "--patch-px", "32", "--seeds", "0", "--splits", "kfold"])
    err = capsys.readouterr().err
    assert rc != 0 and "--n-primary" in err and "30 genes" in err
    assert not out.exists()


def test_xenium_ingest_cli(c3, bundle, tmp_path):
    out = tmp_path / "store"
    assert main(["ingest", "xenium", str(bundle), "--he", str(next(bundle.parent.glob("C3_xe_he_image.*"))),
                 "--alignment", str(bundle.parent / "C3_xe_he_imagealignment.csv"), "--spot-um", "112",
                 "--min-genes", "50", "--n-primary", "20", "--out", str(out), "--patch-px", "32", "--seeds", "0",
                 "--splits", "kfold"]) == 0
    assert open_store(out).manifest["slides"]["C3_xe"] >= 170
