"""Bad input: every reader error names the file and the problem (real her2st sections, corrupted)."""
from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from agl.data import extract_patches, read_anndata, read_her2st, read_hest, read_visium
from agl.errors import DataError
from layouts import cut_her2st, write_counts, write_hest, write_visium

SECTION = "C2"


@pytest.fixture(scope="module")
def small_src(her2st_dir, tmp_path_factory):
    """A pristine small copy of C2 and C3 (30 spots, 300 genes each, real values)."""
    root = tmp_path_factory.mktemp("small_her2st")
    cut_her2st(her2st_dir, root, "C2")
    cut_her2st(her2st_dir, root, "C3")
    return root


@pytest.fixture()
def small(small_src, tmp_path):
    """A fresh, writable copy to corrupt (images stay symlinks to the real JPEGs)."""
    dst = tmp_path / "her2st"
    shutil.copytree(small_src, dst, symlinks=True)
    return dst


def counts_path(root, section=SECTION):
    return root / "ST-cnts" / f"{section}.tsv.gz"


def spots_path(root, section=SECTION):
    return root / "ST-spotfiles" / f"{section}_selection.tsv"


def load_counts(root, section=SECTION):
    return pd.read_csv(counts_path(root, section), sep="\t", index_col=0)


def load_spots(root, section=SECTION):
    return pd.read_csv(spots_path(root, section), sep="\t")


def raises_naming(path, problem):
    """pytest.raises for a DataError whose message starts with ``path`` and mentions ``problem``."""
    return pytest.raises(DataError, match=rf"^{re.escape(str(path))}: .*{problem}")


def test_small_copy_reads(small):
    a = read_her2st(small, SECTION)
    assert a.shape == (30, 300)
    assert a.uns["slides"][SECTION]["dropped_spots"] == 0


def test_missing_counts_file(small):
    counts_path(small).unlink()
    with raises_naming(counts_path(small), "missing counts file"):
        read_her2st(small, SECTION)


def test_missing_spot_file(small):
    spots_path(small).unlink()
    with raises_naming(spots_path(small), "missing spot file"):
        read_her2st(small, SECTION)


def test_missing_image(small):
    folder = small / "ST-imgs" / "C" / SECTION
    for jpg in folder.glob("*.jpg"):
        jpg.unlink()
    with raises_naming(folder, "missing image"):
        read_her2st(small, SECTION)
    # Without an explicit section list the image-less section is skipped; or read it expression-only.
    assert read_her2st(small).obs["slide_id"].unique().tolist() == ["C3"]
    assert read_her2st(small, SECTION, require_image=False).uns["slides"][SECTION]["image_path"] is None


def test_spots_without_counts(small, caplog):
    table = load_counts(small)
    write_counts(table.iloc[3:], counts_path(small))
    with raises_naming(spots_path(small), "3 spots have no match in C2.tsv.gz"):
        read_her2st(small, SECTION, strict=True)
    with caplog.at_level(logging.WARNING):
        a = read_her2st(small, SECTION)
    assert a.n_obs == 27 and a.uns["slides"][SECTION]["dropped_spots"] == 3
    assert any(str(spots_path(small)) in r.message and "3 spots" in r.message for r in caplog.records)


def test_counts_without_spot_rows(small, caplog):
    spots = load_spots(small)
    spots.iloc[2:].to_csv(spots_path(small), sep="\t", index=False)
    with raises_naming(counts_path(small), "2 spots have no match in C2_selection.tsv"):
        read_her2st(small, SECTION, strict=True)
    with caplog.at_level(logging.WARNING):
        assert read_her2st(small, SECTION).n_obs == 28
    assert any(str(counts_path(small)) in r.message for r in caplog.records)


def test_spots_without_pixels(small, caplog):
    spots = load_spots(small)
    spots.loc[[0, 5], "pixel_x"] = np.nan
    spots.to_csv(spots_path(small), sep="\t", index=False)
    with raises_naming(spots_path(small), "2 spots lack pixel coordinates"):
        read_her2st(small, SECTION, strict=True)
    with caplog.at_level(logging.WARNING):
        a = read_her2st(small, SECTION)
    assert a.n_obs == 28 and a.uns["slides"][SECTION]["dropped_spots"] == 2
    assert np.isfinite(a.obsm["spatial"]).all()


def test_spots_outside_image(small):
    spots = load_spots(small)
    spots.loc[[1, 2], "pixel_x"] += 50_000
    spots.to_csv(spots_path(small), sep="\t", index=False)
    a = read_her2st(small, SECTION)
    image = a.uns["slides"][SECTION]["image_path"]
    with raises_naming(image, "2 spot centres .* outside the"):
        extract_patches(a, progress=False)


def test_duplicate_barcodes(small):
    table = load_counts(small)
    write_counts(pd.concat([table, table.iloc[[4]]]), counts_path(small))
    with raises_naming(counts_path(small), "1 duplicate spot barcodes"):
        read_her2st(small, SECTION)


def test_duplicate_barcodes_in_spot_file(small):
    spots = load_spots(small)
    pd.concat([spots, spots.iloc[[0]]]).to_csv(spots_path(small), sep="\t", index=False)
    with raises_naming(spots_path(small), "1 duplicate spot barcodes"):
        read_her2st(small, SECTION)


def test_duplicate_gene_symbols(small):
    table = load_counts(small)
    genes = list(table.columns)
    table.columns = [genes[0]] + [genes[0]] + genes[2:]
    write_counts(table, counts_path(small))
    with raises_naming(counts_path(small), f"1 duplicate gene symbols \\('{genes[0]}'\\)"):
        read_her2st(small, SECTION)
    summed = read_her2st(small, SECTION, duplicate_genes="sum")
    assert summed.n_vars == 299
    np.testing.assert_array_equal(summed[:, genes[0]].X.toarray().ravel(),
                                  table.iloc[:, 0].to_numpy() + table.iloc[:, 1].to_numpy())


@pytest.mark.reliability(kind="bad input", case="legacy ST counts holding a NaN, a negative or a fractional value",
                         outcome="DataError naming the file, spot, gene and the value as a plain number (nan, not "
                                 "numpy's np.float64(nan))")
@pytest.mark.parametrize("value, problem, shown", [(-3, "negative counts", "-3.0"),
                                                   (np.nan, "NaN or infinite counts", "nan"),
                                                   (2.5, "counts are not integers", "2.5")])
def test_bad_count_values(small, value, problem, shown):
    table = load_counts(small).astype(float)
    table.iloc[4, 7] = value
    write_counts(table, counts_path(small))
    spot, gene = table.index[4], table.columns[7]
    with raises_naming(counts_path(small), f"{problem} .*spot '{spot}', gene '{gene}': {re.escape(shown)}\\)$") as err:
        read_her2st(small, SECTION)
    assert "np." not in str(err.value)  # numpy 2's repr of a scalar would read np.float64(nan)


def test_non_numeric_counts(small):
    table = load_counts(small).astype(object)
    table.iloc[6, 2] = "abc"
    write_counts(table, counts_path(small))
    with raises_naming(counts_path(small), f"non-numeric counts .*gene '{table.columns[2]}'.*'abc'"):
        read_her2st(small, SECTION)


def test_empty_slide_after_join(small):
    spots = load_spots(small)
    spots["x"] += 100  # no spot id matches the counts any more
    spots.to_csv(spots_path(small), sep="\t", index=False)
    with raises_naming(counts_path(small), "no spots left after joining with C2_selection.tsv"):
        read_her2st(small, SECTION)


def test_corrupt_image(small, tmp_path):
    folder = small / "ST-imgs" / "C" / SECTION
    (jpg,) = folder.glob("*.jpg")
    data = jpg.read_bytes()
    jpg.unlink()
    jpg.write_bytes(data[: len(data) // 3])  # truncated JPEG
    a = read_her2st(small, SECTION)
    with raises_naming(jpg.absolute(), "unreadable or corrupt image"):
        extract_patches(a[:2].copy(), progress=False)
    jpg.write_bytes(b"not an image at all")
    with raises_naming(jpg.absolute(), "unreadable or corrupt image"):
        extract_patches(a[:2].copy(), progress=False)


def test_gene_sets_differ_across_slides(small, caplog):
    g2 = set(load_counts(small, "C2").columns)
    g3 = set(load_counts(small, "C3").columns)
    common = g2 & g3
    assert 0 < len(common) < 300  # the real top-300 gene lists of C2 and C3 differ
    with caplog.at_level(logging.WARNING):
        a = read_her2st(small, ["C2", "C3"])
    assert set(a.var_names) == common
    for sid, genes in (("C2", g2), ("C3", g3)):
        dropped = len(genes) - len(common)
        assert a.uns["slides"][sid]["dropped_genes"] == dropped
        assert any(f"slide {sid} has {dropped} genes that other slides lack" in r.message for r in caplog.records)


# --------------------------------------------------------------------------- other formats


def test_visium_duplicate_genes_and_missing_positions(small, tmp_path, caplog):
    a = read_her2st(small, SECTION)
    a.var_names = [a.var_names[1]] + list(a.var_names[1:])
    outs = write_visium(a, tmp_path / "s" / "outs")
    h5 = outs / "filtered_feature_bc_matrix.h5"
    with raises_naming(h5, f"duplicate gene symbols \\('{a.var_names[1]}'\\)"):
        read_visium(outs)
    assert read_visium(outs, duplicate_genes="sum").n_vars == 299
    pos = pd.read_csv(outs / "spatial" / "tissue_positions.csv")
    pos[pos["barcode"] != a.obs["barcode"].iloc[0]].to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    with raises_naming(h5, "1 barcodes have no position in tissue_positions.csv"):
        read_visium(outs, duplicate_genes="sum", strict=True)
    with caplog.at_level(logging.WARNING):
        assert read_visium(outs, duplicate_genes="sum").n_obs == 29


def test_visium_missing_files(small, tmp_path):
    a = read_her2st(small, SECTION)
    outs = write_visium(a, tmp_path / "s" / "outs")
    (outs / "spatial" / "scalefactors_json.json").unlink()
    with raises_naming(outs / "spatial" / "scalefactors_json.json", "missing scale factors"):
        read_visium(outs)
    (outs / "filtered_feature_bc_matrix.h5").write_bytes(b"garbage")
    with raises_naming(outs / "filtered_feature_bc_matrix.h5", "cannot read the 10x HDF5 matrix"):
        read_visium(outs)


def test_hest_missing_pixel_size(small, tmp_path):
    a = read_her2st(small, SECTION)
    root = write_hest(a, tmp_path / "hest", "S1", patches=False)
    meta = root / "metadata" / "S1.json"
    meta.write_text('{"spot_diameter": 100.0}')
    with raises_naming(meta, "no pixel size"):
        read_hest(root)
    (root / "st" / "S1.h5ad").write_bytes(b"broken")
    with raises_naming(root / "st" / "S1.h5ad", "cannot read the AnnData file"):
        read_hest(root)


def test_anndata_normalised_x_without_counts(small, tmp_path):
    a = read_her2st(small, SECTION)
    a.X = a.X.astype(np.float32).multiply(0.1).tocsr()
    path = tmp_path / "norm.h5ad"
    a.write_h5ad(path)
    with raises_naming(path, "X are not integers"):
        read_anndata(path)
    a.obsm.pop("spatial")
    a.write_h5ad(path)
    with raises_naming(path, "no obsm\\['spatial'\\]"):
        read_anndata(path)


# --------------------------------------------------------------------------- legacy ST scale and layouts


@pytest.mark.reliability(kind="bad input", case="legacy ST spot file whose pixel_x/pixel_y belong to a 20x smaller "
                         "thumbnail, read with the full-resolution image",
                         outcome="DataError naming the spot file and the implausible um/px (outside 0.1-5)")
def test_implausible_pixel_size_is_refused(small):
    spots = load_spots(small)
    spots[["pixel_x", "pixel_y"]] /= 20.0  # ~14 um/px: no H&E scan is that coarse
    spots.to_csv(spots_path(small), sep="\t", index=False)
    with raises_naming(spots_path(small), r"gives 1\d\.\d+ um per pixel, implausible for an H&E scan"):
        read_her2st(small, SECTION)
    # Without an image (expression only) the scale matters less: a warning, not a refusal.
    for jpg in (small / "ST-imgs" / "C" / SECTION).glob("*.jpg"):
        jpg.unlink()
    assert read_her2st(small, SECTION, require_image=False).n_obs == 30


@pytest.mark.reliability(kind="bad input", case="legacy ST folder holding two counts tables (two sections, as "
                         "STUtility keeps them) and one spot table named for neither",
                         outcome="DataError naming the folder, the section without a spot table and the spot tables "
                                 "found; counts_path still picks one table")
def test_ambiguous_st_folder(small, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    table = load_counts(small)
    table.to_csv(folder / "a_stdata.tsv", sep="\t")
    table.to_csv(folder / "b_stdata.tsv", sep="\t")
    load_spots(small).to_csv(folder / "spots.tsv", sep="\t", index=False)
    (folder / "HE.jpg").symlink_to(next((small / "ST-imgs" / "C" / SECTION).glob("*.jpg")).resolve())
    # two counts tables: two sections side by side (as STUtility keeps them); the spot table names neither
    with raises_naming(folder, r"section a: no spot table named for it \(spot tables here: \['spots.tsv'\]\)"):
        read_her2st(folder)
    got = read_her2st(folder, counts_path=folder / "b_stdata.tsv")
    assert got.n_obs == 30
    (folder / "spots.tsv").unlink()
    with raises_naming(folder, "no spot tables"):
        read_her2st(folder, counts_path=folder / "b_stdata.tsv")


def test_counts_table_without_spot_ids(small, tmp_path):
    table = load_counts(small)
    table.index = [f"spot{i}" for i in range(len(table))]
    path = tmp_path / "odd.tsv"
    table.to_csv(path, sep="\t")
    with raises_naming(path, "neither the row nor the column labels are spot ids"):
        read_her2st(path, spots_path=spots_path(small), require_image=False)


@pytest.mark.reliability(kind="bad input", case="Space Ranger outs/ with its tissue_hires_image.png passed as --image "
                         "(the full-resolution image expected)",
                         outcome="DataError naming the image: spots outside it, its size fits tissue_hires_image.png, "
                         "omit --image")
def test_visium_hires_image_given_as_full_resolution(small, tmp_path):
    a = read_her2st(small, SECTION)
    outs = write_visium(a, tmp_path / "s" / "outs")
    hires = outs / "spatial" / "tissue_hires_image.png"
    with raises_naming(hires, r"spot centres \(full-resolution pixels\) lie outside this \d+x\d+ image given "
                              r"with --image: its size fits tissue_hires_image.png .*omit --image"):
        read_visium(outs, image_path=hires)


@pytest.mark.reliability(kind="bad input", case="Space Ranger outs/ without spatial/ images and no --image, the "
                         "full-resolution image lying beside outs/",
                         outcome="DataError naming outs/spatial and --image; the image outside outs/ is not taken")
def test_visium_without_images_never_picks_one_outside(small, tmp_path):
    a = read_her2st(small, SECTION)
    outs = write_visium(a, tmp_path / "s" / "outs", images=False)
    assert any(p.suffix == ".jpg" for p in outs.parent.iterdir())  # there, but not ours to pick
    with raises_naming(outs / "spatial", "no image: .*--image"):
        read_visium(outs)


def test_visium_scale_factors_that_do_not_fit_the_image(small, tmp_path):
    a = read_her2st(small, SECTION)
    outs = write_visium(a, tmp_path / "s" / "outs")
    sf_path = outs / "spatial" / "scalefactors_json.json"
    sf = json.loads(sf_path.read_text())
    sf["tissue_hires_scalef"] *= 3  # as if the JSON came from another run
    sf_path.write_text(json.dumps(sf))
    with raises_naming(outs / "spatial" / "tissue_hires_image.png", "fall outside this .* image after scaling "
                                                                     "by tissue_hires_scalef"):
        read_visium(outs)
    del sf["tissue_hires_scalef"]
    sf_path.write_text(json.dumps(sf))
    with raises_naming(sf_path, "lacks tissue_hires_scalef"):
        read_visium(outs)


def test_visium_matrix_folder_damaged(small, tmp_path):
    a = read_her2st(small, SECTION)
    outs = write_visium(a, tmp_path / "s" / "outs", matrix="mtx")
    assert read_visium(outs).n_obs == 30
    (outs / "filtered_feature_bc_matrix" / "barcodes.tsv.gz").unlink()
    with raises_naming(outs / "filtered_feature_bc_matrix" / "barcodes.tsv.gz", "missing file of the 10x"):
        read_visium(outs)
    (outs / "filtered_feature_bc_matrix").rename(tmp_path / "elsewhere")
    with raises_naming(outs / "filtered_feature_bc_matrix.h5", "missing 10x feature-barcode matrix"):
        read_visium(outs)


def test_messages_show_numbers_plainly():
    """agl.errors.show: what messages interpolate (numpy 2's repr would print np.float64(nan), np.str_('a'))."""
    from agl.errors import show

    assert show(np.float64("nan")) == "nan" and show(np.float32(0.1)) == "0.1" and show(np.int64(3)) == "3"
    assert show((np.float64(1.0), np.float64(2.5))) == "(1.0, 2.5)" and show(np.array([0.5, np.inf])) == "[0.5, inf]"
    assert show(np.str_("12x7")) == "'12x7'" and show(pd.Index(["a", "b"])) == "['a', 'b']" and show(None) == "None"
