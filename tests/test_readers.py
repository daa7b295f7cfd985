"""Readers on the real her2st release, and exact round trips through HEST, Visium and h5ad layouts."""
from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from agl.data import extract_patches, schema
from agl.data.readers import (READERS, estimate_mpp_from_grid, read_anndata, read_her2st, read_hest,
                              read_slides, read_visium)
from agl.errors import DataError
from layouts import write_hest, write_st_2k, write_st_folder, write_visium


@pytest.fixture(scope="module")
def b4_c2(her2st_dir):
    return read_her2st(her2st_dir, ["B4", "C2"])


def _tsv_counts(her2st_dir, section):
    return pd.read_csv(her2st_dir / "ST-cnts" / f"{section}.tsv.gz", sep="\t", index_col=0)


def test_her2st_spot_counts_and_schema(b4_c2):
    schema.validate_canonical(b4_c2)
    n = b4_c2.obs["slide_id"].value_counts()
    assert n["B4"] == 283 and n["C2"] == 187  # the data README's numbers after the join
    assert b4_c2.uns["slides"]["B4"]["dropped_spots"] == 1  # 18x20 has no counts row
    assert b4_c2.uns["slides"]["C2"]["dropped_spots"] == 0
    assert isinstance(b4_c2.X, sp.csr_matrix)
    assert b4_c2.X.dtype == np.int32


@pytest.mark.reliability(kind="layout", case="her2st release (legacy ST, 1k array): ST-cnts/*.tsv.gz, "
                         "ST-spotfiles/*_selection.tsv, ST-imgs/ (B4, C2)",
                         outcome="every count of the shared genes equals the gzip TSV, spot by spot")
def test_her2st_counts_equal_tsv(b4_c2, her2st_dir):
    for section in ("B4", "C2"):
        table = _tsv_counts(her2st_dir, section)
        sub = b4_c2[b4_c2.obs["slide_id"] == section]
        barcodes = sub.obs["barcode"].tolist()
        genes = ["ERBB2", "GAPDH", "ACTB", "KRT19", str(b4_c2.var_names[7])]
        got = sub[:, genes].X.toarray()
        want = table.loc[barcodes, genes].to_numpy()
        np.testing.assert_array_equal(got, want)
        assert got.sum() > 0
        # Whole matrix of the shared genes, not only a few columns.
        np.testing.assert_array_equal(sub.X.toarray(), table.loc[barcodes, list(b4_c2.var_names)].to_numpy())


def test_her2st_pixels_equal_selection_file(b4_c2, her2st_dir):
    sel = pd.read_csv(her2st_dir / "ST-spotfiles" / "C2_selection.tsv", sep="\t")
    sel.index = sel["x"].astype(str) + "x" + sel["y"].astype(str)
    sub = b4_c2.obs[b4_c2.obs["slide_id"] == "C2"]
    np.testing.assert_array_equal(sub["pixel_x"].to_numpy(), sel.loc[sub["barcode"], "pixel_x"].to_numpy())
    np.testing.assert_array_equal(sub["pixel_y"].to_numpy(), sel.loc[sub["barcode"], "pixel_y"].to_numpy())
    np.testing.assert_array_equal(b4_c2.obsm["spatial"][b4_c2.obs["slide_id"].to_numpy() == "C2"],
                                  sub[["pixel_x", "pixel_y"]].to_numpy())


def test_her2st_mpp_and_metadata(b4_c2, her2st_dir):
    for sid in ("B4", "C2"):
        meta = b4_c2.uns["slides"][sid]
        assert 0.55 <= meta["microns_per_pixel"] <= 0.8  # README: about 0.69 um/px
        assert meta["spot_diameter_um"] == 100.0
        assert meta["source_format"] == "her2st"
        assert meta["image_path"].endswith(".jpg")
        assert len(meta["source_files"]) == 3


def test_her2st_gene_intersection(b4_c2, her2st_dir):
    header_b4 = gzip.open(her2st_dir / "ST-cnts" / "B4.tsv.gz", "rt").readline().rstrip("\n").split("\t")[1:]
    header_c2 = gzip.open(her2st_dir / "ST-cnts" / "C2.tsv.gz", "rt").readline().rstrip("\n").split("\t")[1:]
    common = set(header_b4) & set(header_c2)
    assert set(b4_c2.var_names) == common
    assert b4_c2.uns["slides"]["B4"]["dropped_genes"] == len(header_b4) - len(common)
    assert b4_c2.uns["slides"]["C2"]["dropped_genes"] == len(header_c2) - len(common)


def test_her2st_default_sections_need_images(her2st_dir):
    from agl.data.readers import _her2st_sections

    assert _her2st_sections(her2st_dir, require_image=True) == ["B4", "C2", "C3", "C4", "C5"]
    assert len(_her2st_sections(her2st_dir, require_image=False)) == 35


def test_her2st_expression_only_section(her2st_dir):
    a = read_her2st(her2st_dir, "A1", require_image=False)
    assert a.uns["slides"]["A1"]["image_path"] is None
    assert a.n_obs > 100


def test_mpp_grid_fit_recovers_known_scale():
    # Synthetic rotated grid: 290 px per 200 um step -> 0.6897 um/px.
    xy = np.array([[i, j] for i in range(5) for j in range(4)], dtype=float)
    theta = 0.03
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    px = xy @ rot.T * 290.0 + [100.0, 250.0]
    mpp, rms = estimate_mpp_from_grid(xy, px)
    assert mpp == pytest.approx(200 / 290, rel=1e-9)
    assert rms < 1e-6


def test_read_slides_dispatch(her2st_dir):
    assert "her2st" in READERS
    a = read_slides("her2st", her2st_dir, sections=["C2"])
    assert a.n_obs == 187


# --------------------------------------------------------------------------- round trips


@pytest.fixture(scope="module")
def c3(her2st_dir):
    return read_her2st(her2st_dir, "C3")


def assert_same_spots(got, want, slide_id=None, mpp_rel=1e-12):
    """Same counts, genes, barcodes, pixel positions and pixel size (slide ids may be renamed)."""
    schema.validate_canonical(got)
    assert list(got.var_names) == list(want.var_names)
    assert got.obs["barcode"].tolist() == want.obs["barcode"].tolist()
    assert got.X.dtype == np.int32
    assert (got.X != want.X).nnz == 0
    np.testing.assert_array_equal(got.obs[["pixel_x", "pixel_y"]].to_numpy(), want.obs[["pixel_x", "pixel_y"]].to_numpy())
    np.testing.assert_array_equal(got.obsm["spatial"], want.obsm["spatial"])
    (sid,) = got.obs["slide_id"].unique()
    (want_sid,) = want.obs["slide_id"].unique()
    assert sid == (slide_id or want_sid)
    assert got.uns["slides"][sid]["microns_per_pixel"] == pytest.approx(
        want.uns["slides"][want_sid]["microns_per_pixel"], rel=mpp_rel)


@pytest.fixture(scope="module")
def hest_root(c3, tmp_path_factory):
    return write_hest(c3, tmp_path_factory.mktemp("hest"), "C3")


def test_hest_round_trip(c3, hest_root):
    got = read_hest(hest_root)
    assert_same_spots(got, c3)
    meta = got.uns["slides"]["C3"]
    assert meta["source_format"] == "hest"
    assert meta["patches_h5"].endswith("C3.h5")
    assert meta["image_path"].endswith("C3.jpg")
    assert got.obs["array_row"].tolist() == c3.obs["array_row"].tolist()
    # Patches for 112 um at 224 px come straight from the .h5 (matched by barcode) ...
    order = np.random.default_rng(0).permutation(got.n_obs)
    shuffled = got[order].copy()
    from_h5, keep, report = extract_patches(shuffled, progress=False)
    assert report["slides"]["C3"]["n_from_h5"] == got.n_obs and keep.all()
    # ... and equal the patches cut from the whole-slide image.
    direct, _, rep2 = extract_patches(c3[order[:30]].copy(), progress=False)
    assert rep2["slides"]["C3"]["n_from_h5"] == 0
    np.testing.assert_array_equal(from_h5[:30], direct)
    # A different physical size ignores the .h5 and cuts from the image.
    _, _, rep3 = extract_patches(got[:5].copy(), patch_um=100.0, patch_px=64, progress=False)
    assert rep3["slides"]["C3"]["n_from_h5"] == 0
    # A different pixel count with the same physical size resamples the .h5 patches.
    small, _, rep4 = extract_patches(got[:5].copy(), patch_um=112.0, patch_px=112, progress=False)
    assert rep4["slides"]["C3"]["n_from_h5"] == 5 and small.shape == (5, 112, 112, 3)


def test_hest_coords_are_top_left(hest_root, tmp_path):
    import h5py

    with h5py.File(hest_root / "patches" / "C3.h5") as f:
        coords, barcodes = f["coords"][:], f["barcode"][:, 0].astype(str)
    # The same sample without its whole-slide image: patches only.
    root = tmp_path / "hest"
    for sub, name in (("st", "C3.h5ad"), ("metadata", "C3.json"), ("patches", "C3.h5")):
        (root / sub).mkdir(parents=True)
        (root / sub / name).symlink_to(hest_root / sub / name)
    got = read_hest(root)
    side = 112.0 / got.uns["slides"]["C3"]["microns_per_pixel"]
    centres = got.obs.set_index("barcode").loc[barcodes, ["pixel_x", "pixel_y"]].to_numpy()
    assert np.abs(coords + side // 2 - centres).max() < 1.0
    assert got.uns["slides"]["C3"]["image_path"] is None


@pytest.mark.reliability(kind="layout", case="Space Ranger outs/ with the full-resolution JPEG as --image: "
                         "h5 matrix + tissue_positions.csv, or filtered_feature_bc_matrix/ + headerless "
                         "tissue_positions_list.csv",
                         outcome="exact round trip of counts, barcodes, pixels and um/px; antibody features left "
                                 "out; Ensembl IDs kept as var['gene_ids']")
@pytest.mark.parametrize("legacy, matrix", [(False, "h5"), (True, "mtx")])
def test_visium_round_trip_with_full_resolution_image(c3, tmp_path, legacy, matrix):
    outs = write_visium(c3, tmp_path / "C3" / "outs", legacy_positions=legacy, matrix=matrix)
    image = c3.uns["slides"]["C3"]["image_path"]
    got = read_visium(outs, image_path=image)
    assert_same_spots(got, c3, slide_id="C3", mpp_rel=1e-9)
    meta = got.uns["slides"]["C3"]
    assert meta["spot_diameter_um"] == 55.0 and meta["source_format"] == "visium"
    assert meta["image_path"] == image and meta["image_kind"] == "full-resolution" and meta["image_scalef"] == 1.0
    assert "CD3_TotalSeqB" not in got.var_names  # antibody features left out
    # the Ensembl IDs (features "id") stay beside the symbols: a model trained on either finds the genes
    assert got.var["gene_ids"].tolist() == [f"ENSG{i:011d}" for i in range(c3.n_vars)]
    assert meta["dropped_spots"] == 0  # off-tissue positions are not spots of the matrix


@pytest.mark.reliability(kind="layout", case="Space Ranger outs/ as written: no full-resolution image inside, "
                         "spatial/tissue_hires_image.png + scalefactors_json.json (the JPEG lies beside outs/)",
                         outcome="hires PNG used with tissue_hires_scalef, um/px = 55 / (spot_diameter_fullres x "
                                 "scalef) stated in a warning; the image beside outs/ not taken; patches show the "
                                 "same tissue; lowres used without hires")
def test_visium_outs_as_space_ranger_writes_it(c3, tmp_path, caplog):
    """No --image: the hires PNG with tissue_hires_scalef; never the full-res image lying beside outs/."""
    outs = write_visium(c3, tmp_path / "C3" / "outs")
    assert (outs.parent / Path(c3.uns["slides"]["C3"]["image_path"]).name).exists()  # beside outs/: ignored
    sf = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())
    scalef, full_mpp = sf["tissue_hires_scalef"], c3.uns["slides"]["C3"]["microns_per_pixel"]
    with caplog.at_level(logging.WARNING):
        got = read_visium(outs)
    meta = got.uns["slides"]["C3"]
    assert meta["image_path"] == str((outs / "spatial" / "tissue_hires_image.png").absolute())
    assert meta["image_kind"] == "tissue_hires_image" and meta["image_scalef"] == scalef
    # 55 um / (spot_diameter_fullres * tissue_hires_scalef): the full-resolution scale over the factor
    mpp = 55.0 / (sf["spot_diameter_fullres"] * scalef)
    assert meta["microns_per_pixel"] == pytest.approx(mpp, rel=1e-12)
    assert meta["microns_per_pixel"] == pytest.approx(full_mpp / scalef, rel=1e-9)
    np.testing.assert_allclose(got.obsm["spatial"], c3.obsm["spatial"] * scalef, rtol=1e-12)
    assert (got.X != c3.X).nnz == 0
    assert any("tissue_hires_image.png" in r.message and f"{mpp:.3g} um per pixel" in r.message
               for r in caplog.records)
    # Patches from the hires image show the same tissue as those from full resolution (at 32 px).
    hires, _, rep = extract_patches(got[:8].copy(), patch_um=112.0, patch_px=32, progress=False)
    full, _, _ = extract_patches(c3[:8].copy(), patch_um=112.0, patch_px=32, progress=False)
    assert rep["slides"]["C3"]["crop_px"] == pytest.approx(112.0 / mpp)
    diff = np.abs(hires.astype(float) - full.astype(float)).mean()
    other = np.abs(hires.astype(float) - full[::-1].astype(float)).mean()  # patches of other spots
    assert diff < 10 and diff < other / 2, (diff, other)
    # Without the hires PNG Space Ranger's lowres one is used, with its own factor.
    (outs / "spatial" / "tissue_hires_image.png").unlink()
    low = read_visium(outs).uns["slides"]["C3"]
    assert low["image_kind"] == "tissue_lowres_image"
    assert low["microns_per_pixel"] == pytest.approx(55.0 / (sf["spot_diameter_fullres"] * sf["tissue_lowres_scalef"]))


@pytest.mark.reliability(kind="layout", case="Space Ranger outs/ with a pyramidal tiled TIFF (2 levels, zlib) "
                         "as --image", outcome="patches equal those cut from the JPEG, pixel for pixel")
def test_visium_full_resolution_tiff(c3, tmp_path):
    """A whole-slide TIFF given with --image is the full-resolution image: patches equal the JPEG's."""
    from PIL import Image

    from layouts import write_pyramid_tiff

    outs = write_visium(c3, tmp_path / "C3" / "outs", images=False)
    sub = c3[:4].copy()
    with Image.open(c3.uns["slides"]["C3"]["image_path"]) as img:
        tiff = write_pyramid_tiff(img.convert("RGB"), tmp_path / "C3.tif", levels=2)
    got = read_visium(outs, image_path=tiff)
    assert got.uns["slides"]["C3"]["image_path"] == str(tiff.absolute())
    assert_same_spots(got, c3, slide_id="C3", mpp_rel=1e-9)
    a, _, _ = extract_patches(got[:4].copy(), progress=False)
    b, _, _ = extract_patches(sub, progress=False)
    np.testing.assert_array_equal(a, b)


def test_visium_explicit_image_and_slide_id(c3, tmp_path):
    outs = write_visium(c3, tmp_path / "run" / "outs")
    image = c3.uns["slides"]["C3"]["image_path"]
    got = read_visium(outs, image_path=image, slide_id="mine")
    assert got.uns["slides"]["mine"]["image_path"] == image
    assert read_slides("visium", outs).obs["slide_id"].iloc[0] == "run"


def test_anndata_round_trip_canonical(b4_c2, tmp_path):
    path = tmp_path / "both.h5ad"
    b4_c2.write_h5ad(path)
    got = read_anndata(path)
    schema.validate_canonical(got)
    assert got.obs_names.tolist() == b4_c2.obs_names.tolist()
    assert (got.X != b4_c2.X).nnz == 0 and list(got.var_names) == list(b4_c2.var_names)
    np.testing.assert_array_equal(got.obsm["spatial"], b4_c2.obsm["spatial"])
    for sid in ("B4", "C2"):
        want = b4_c2.uns["slides"][sid]
        meta = got.uns["slides"][sid]
        for key in ("image_path", "microns_per_pixel", "spot_diameter_um", "source_format", "source_files"):
            assert meta[key] == want[key], key
    # One slide of a canonical file can be renamed; several cannot be merged under one id.
    b4_c2[b4_c2.obs["slide_id"] == "C2"].copy().write_h5ad(tmp_path / "c2.h5ad")
    renamed = read_anndata(tmp_path / "c2.h5ad", slide_id="C2b")
    assert renamed.uns["slides"]["C2b"]["microns_per_pixel"] == b4_c2.uns["slides"]["C2"]["microns_per_pixel"]
    assert renamed.obs_names[0].startswith("C2b_")
    with pytest.raises(DataError, match="2 slides"):
        read_anndata(path, slide_id="x")


def test_anndata_plain_file(c3, tmp_path):
    image = c3.uns["slides"]["C3"]["image_path"]
    plain = ad_plain(c3, layer=True)
    plain.uns["microns_per_pixel"] = 0.7
    path = tmp_path / "plain.h5ad"
    plain.write_h5ad(path)
    got = read_anndata(path, image_path=image, spot_diameter_um=100.0)
    assert got.obs["slide_id"].iloc[0] == "plain"
    assert got.uns["slides"]["plain"]["microns_per_pixel"] == 0.7
    assert got.uns["slides"]["plain"]["image_path"] == image
    assert (got.X != c3.X).nnz == 0
    assert read_anndata(path, microns_per_pixel=0.5, slide_id="s").uns["slides"]["s"]["microns_per_pixel"] == 0.5


def ad_plain(c3, layer=False):
    """C3 as a plain scanpy-style AnnData: normalised X, raw counts in layers['counts'] if asked."""
    import anndata as ad

    X = sp.csr_matrix(c3.X, dtype=np.float32)
    plain = ad.AnnData(X=X.multiply(1.0 / X.sum(axis=1)).tocsr() if layer else X,
                       obs=pd.DataFrame(index=c3.obs["barcode"].astype(str).to_numpy()),
                       var=pd.DataFrame(index=c3.var_names.copy()))
    if layer:
        plain.layers["counts"] = sp.csr_matrix(c3.X)
    plain.obsm["spatial"] = c3.obsm["spatial"].copy()
    return plain


# --------------------------------------------------------------------------- legacy ST layouts and arrays


@pytest.fixture(scope="module")
def c2(her2st_dir):
    return read_her2st(her2st_dir, "C2")


@pytest.mark.reliability(kind="layout", case="legacy ST on the 2k array (100 um pitch): C2 with its array "
                         "coordinates doubled, same image",
                         outcome="2k detected from the coordinates; um/px equals the 1k reading (~0.69, not twice "
                                 "it); --array 1k refused naming the coordinates; C2 forced to 2k halves the scale")
def test_2k_array_gives_the_same_scale(c2, her2st_dir, tmp_path):
    """The real C2 rewritten as a 2k-array layout (coordinates doubled, same pixels): same um/px."""
    root = write_st_2k(her2st_dir, tmp_path / "st2k", "C2")
    got = read_her2st(root, "C2")
    meta, want = got.uns["slides"]["C2"], c2.uns["slides"]["C2"]
    assert want["st_array"] == "1k" and meta["st_array"] == "2k"
    assert meta["array_pitch_um"] == 100.0 and want["array_pitch_um"] == 200.0
    assert meta["microns_per_pixel"] == pytest.approx(want["microns_per_pixel"], rel=1e-9)
    assert 0.6 < meta["microns_per_pixel"] < 0.8  # the README's ~0.69 um/px, not twice it
    np.testing.assert_array_equal(got.obsm["spatial"], c2.obsm["spatial"])
    assert (got.X != c2.X).nnz == 0
    assert got.obs["array_col"].max() > 40  # the 2k coordinates are kept
    # Forcing the array: 2k coordinates do not fit the 1k array; the 1k section read as 2k halves the scale.
    with pytest.raises(DataError, match=r"C2_selection.tsv: array coordinates reach .* beyond the 1k array"):
        read_her2st(root, "C2", array="1k")
    forced = read_her2st(her2st_dir, "C2", array="2k").uns["slides"]["C2"]["microns_per_pixel"]
    assert forced == pytest.approx(want["microns_per_pixel"] / 2, rel=1e-9)


@pytest.mark.reliability(kind="layout", case="legacy ST run folder outside the her2st names: {s}_stdata.tsv "
                         "plain (spots as rows) or gzip (genes as rows), ST spot detector table with or without "
                         "header, HE.jpg",
                         outcome="same spots, counts, pixels and um/px (rel 1e-12) as the her2st reader; the counts "
                                 "table alone reads too")
@pytest.mark.parametrize("genes_as_rows, gzip_counts, spot_header", [(False, False, True), (True, True, False)])
def test_st_pipeline_folder(c2, her2st_dir, tmp_path, caplog, genes_as_rows, gzip_counts, spot_header):
    """An ST Pipeline folder (plain or gzip TSV, spots or genes as rows, spot detector table): same slide."""
    folder = write_st_folder(her2st_dir, tmp_path / "run1", "C2", genes_as_rows=genes_as_rows,
                             gzip_counts=gzip_counts, spot_header=spot_header)
    got = read_her2st(folder)
    assert got.obs["slide_id"].iloc[0] == "run1"
    assert_same_spots(got, c2, slide_id="run1", mpp_rel=1e-12)
    meta = got.uns["slides"]["run1"]
    assert meta["image_path"] == str((folder / "HE.jpg").absolute())
    assert meta["source_format"] == "legacy_st" and meta["st_array"] == "1k"
    # The counts table itself, with the section name as slide id.
    counts = next(folder.glob("C2_stdata.tsv*"))
    assert read_her2st(counts).obs["slide_id"].iloc[0] == "C2_stdata"


@pytest.mark.reliability(kind="layout", case="ST spot detector table with selected = 0 for 3 spots",
                         outcome="those 3 spots left out and counted as unselected_spots; no mismatch warning, even "
                                 "with strict=True")
def test_st_unselected_spots_are_left_out(c2, her2st_dir, tmp_path, caplog):
    folder = write_st_folder(her2st_dir, tmp_path / "run", "C2", unselect=3)
    with caplog.at_level(logging.WARNING):
        got = read_her2st(folder, strict=True)  # unselected spots are no mismatch, even when strict
    assert got.n_obs == c2.n_obs - 3
    assert got.uns["slides"]["run"]["unselected_spots"] == 3
    assert got.uns["slides"]["run"]["dropped_spots"] == 0
    assert not [r for r in caplog.records if "no match" in r.message]


def test_st_explicit_paths_and_plain_release(c2, her2st_dir, tmp_path):
    folder = write_st_folder(her2st_dir, tmp_path / "a", "C2")
    image = c2.uns["slides"]["C2"]["image_path"]
    (folder / "HE.jpg").unlink()
    moved = tmp_path / "elsewhere" / "spots.tsv"
    moved.parent.mkdir()
    (folder / "spots_C2.txt").rename(moved)
    got = read_her2st(folder / "C2_stdata.tsv", spots_path=moved, image_path=image, sections="C2")
    assert_same_spots(got, c2)
    assert got.uns["slides"]["C2"]["image_path"] == image
    # A her2st-style release whose counts are plain .tsv.
    root = tmp_path / "release"
    for sub in ("ST-cnts", "ST-spotfiles"):
        (root / sub).mkdir(parents=True)
    _tsv_counts(her2st_dir, "C2").to_csv(root / "ST-cnts" / "C2.tsv", sep="\t")
    (root / "ST-spotfiles" / "C2_selection.tsv").symlink_to(her2st_dir / "ST-spotfiles" / "C2_selection.tsv")
    from agl.data.readers import _her2st_sections

    assert _her2st_sections(root, require_image=False) == ["C2"]
    assert_same_spots(read_her2st(root, "C2", image_path=image), c2)


def test_cli_array_flag_reaches_the_reader(her2st_dir, tmp_path):
    from agl.cli import build_parser
    from agl.data.commands import reader_kwargs
    from agl.errors import ConfigError

    args = build_parser().parse_args(["ingest", "her2st", str(her2st_dir), "--out", str(tmp_path / "s"),
                                      "--array", "2k"])
    assert reader_kwargs("her2st", args)["array"] == "2k"
    args = build_parser().parse_args(["ingest", "visium", str(tmp_path), "--out", str(tmp_path / "s"),
                                      "--array", "1k"])
    with pytest.raises(ConfigError, match="--array"):
        reader_kwargs("visium", args)
