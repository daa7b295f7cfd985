"""``agl ingest`` and ``agl info`` end to end on real her2st files, including failure paths."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agl.cli import main
from agl.data.store import open_store

FAST = ["--patch-px", "32", "--seeds", "0", "--splits", "kfold", "loso"]


def _layout(her2st_dir: Path, root: Path, sections: list[str], images: bool = True) -> Path:
    """A her2st-layout folder of symlinks to the real files (optionally without images)."""
    for s in sections:
        for rel in (f"ST-cnts/{s}.tsv.gz", f"ST-spotfiles/{s}_selection.tsv"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(her2st_dir / rel, root / rel)
        if images:
            (root / "ST-imgs" / s[0]).mkdir(parents=True, exist_ok=True)
            os.symlink(her2st_dir / "ST-imgs" / s[0] / s, root / "ST-imgs" / s[0] / s)
    return root


def _no_temp_left(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_ingest_then_info(her2st_dir, tmp_path, capsys):
    out = tmp_path / "store"
    rc = main(["ingest", "her2st", str(her2st_dir), "--sections", "C2", "C3", "--out", str(out),
               "--n-primary", "20", "--normalize-total", "10000", "--prior-sections", "A1", *FAST])
    assert rc == 0
    store = open_store(out)
    store.verify()
    assert store.manifest["slides"] == {"C2": 185, "C3": 179}
    assert store.manifest["preprocessing"]["normalize_total"] == 10000.0
    assert store.split_names == [f"kfold-s0-f{f}" for f in range(5)] + ["loso-C2", "loso-C3"]
    assert (store.gene_set("loso-C2")["role"] == "primary").sum() == 20
    assert store.manifest["preprocessing"]["prior_slides"] == ["A1"]
    assert store.gene_set("loso-C2")["rank_coexpr"].notna().sum() > 10000  # co-expression prior from A1
    capsys.readouterr()
    assert main(["info", str(out), "--split", "loso-C3", "--verify"]) == 0
    text = capsys.readouterr().out
    primary = store.gene_set("loso-C3").query("role == 'primary'")["gene"].tolist()
    assert "C2 185, C3 179" in text and f"genes      {store.manifest['n_genes']}" in text
    assert " ".join(primary) in text and "32 x 32 x 3" in text and "kfold x5, loso x2" in text


def test_missing_image_exits_1_and_writes_nothing(her2st_dir, tmp_path, capsys):
    root = _layout(her2st_dir, tmp_path / "her2st", ["C2"], images=False)
    out = tmp_path / "out"
    assert main(["ingest", "her2st", str(root), "--sections", "C2", "--out", str(out), *FAST]) == 1  # runtime failure (DataError)
    err = capsys.readouterr().err
    assert str(root / "ST-imgs" / "C" / "C2") in err and "missing image" in err
    assert not out.exists()
    _no_temp_left(tmp_path)


def test_existing_output_is_not_overwritten(her2st_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = ["ingest", "her2st", str(her2st_dir), "--sections", "C2", "--out", str(out), *FAST]
    assert main(args) == 1  # runtime failure (DataError)
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 1  # runtime failure: a folder that is not a store is never replaced
    assert "not an agl store" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"


@pytest.mark.reliability(kind="fault", case="ingest is interrupted midway (KeyboardInterrupt while writing)",
                         outcome="no store and no temporary folder left; re-running completes a verified store")
def test_interrupted_ingest_leaves_nothing_and_rerun_completes(her2st_dir, tmp_path, monkeypatch, capsys):
    import agl.data.store as store_mod

    real = store_mod._write_ipc
    calls = []

    def interrupted(*a, **k):  # the patches array is written, then Ctrl-C arrives
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(store_mod, "_write_ipc", interrupted)
    out = tmp_path / "out"
    args = ["ingest", "her2st", str(her2st_dir), "--sections", "C2", "--out", str(out), *FAST]
    assert main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()
    _no_temp_left(tmp_path)

    monkeypatch.setattr(store_mod, "_write_ipc", real)
    assert main(args) == 0
    open_store(out).verify()
    # a second ingest over a finished store is refused, then replaced with --overwrite
    assert main(args) == 1  # runtime failure (DataError)
    assert main(args + ["--overwrite", "--n-primary", "10"]) == 0
    assert (open_store(out).gene_set("kfold-s0-f0")["role"] == "primary").sum() == 10
    _no_temp_left(tmp_path)


def test_bad_arguments(her2st_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["ingest", "her2st", str(her2st_dir), "--sections", "C2", "--out", str(out),
                 "--priors", "hvg", "bogus", *FAST]) == 2
    assert "unknown priors ['bogus']" in capsys.readouterr().err and not out.exists()
    assert main(["info", str(tmp_path)]) == 1  # runtime failure: not a store
    assert "manifest.json: missing" in capsys.readouterr().err


@pytest.mark.parametrize("stream", [False, True])
def test_primary_min_detection_flag(her2st_dir, tmp_path, capsys, stream):
    """--primary-min-detection: every split's panel is detected in that fraction of its training spots."""
    out = tmp_path / "store"
    args = ["ingest", "her2st", str(her2st_dir), "--sections", "C2", "C3", "--out", str(out),
            *FAST, *(["--stream"] if stream else [])]
    assert main(args + ["--primary-min-detection", "0.3"]) == 0
    store = open_store(out)
    assert store.manifest["preprocessing"]["primary_min_detection"] == 0.3
    for split in store.split_names:
        gs = store.gene_set(split)
        cols = gs.loc[gs["role"] == "primary", "column"].to_numpy()
        train = (store.split(split) == "train").to_numpy()
        assert len(cols) == 50
        assert ((np.asarray(store.expression)[train][:, cols] > 0).mean(axis=0) >= 0.3).all()
    capsys.readouterr()
    bad = tmp_path / "bad"
    args[args.index(str(out))] = str(bad)
    assert main(args + ["--primary-min-detection", "0.999"]) == 1  # too few genes that common: runtime
    err = capsys.readouterr().err
    assert "split kfold-s0-f0" in err and "fewer than --n-primary 50" in err and not bad.exists()
    assert main(args + ["--primary-min-detection", "1.5"]) == 2 and not bad.exists()
    assert "--primary-min-detection" in capsys.readouterr().err


def test_bench_data_writes_json(small_store, tmp_path, capsys):
    """A smoke run of ``agl bench data`` (figures are printed and saved, never asserted)."""
    import json

    assert main(["bench", "data", "--store", str(small_store), "--out", str(tmp_path), "--batch-size", "16",
                 "--batches", "2"]) == 0
    result = json.loads((tmp_path / "bench_data.json").read_text())
    assert {"timestamp", "machine", "naive", "batched", "batched_uint8", "ratio"} <= set(result)
    assert result["naive"]["patches"] == result["batched"]["patches"] == 32
    assert result["ratio_cpu"] > 0 and all("what" in result[k] for k in ("naive", "batched", "batched_uint8"))
    assert "ratio" in capsys.readouterr().out


# --------------------------------------------------------------------------- the other input formats
# Real her2st section C2 written into each format's layout (tests/layouts.py), ingested by the CLI,
# must give the same store as ingesting the her2st release itself.
ONE = ["--patch-px", "32", "--seeds", "0", "--splits", "kfold", "--n-primary", "20"]


@pytest.fixture(scope="module")
def c2(her2st_dir):
    from agl.data.readers import read_her2st

    return read_her2st(her2st_dir, ["C2"])


@pytest.fixture(scope="module")
def c2_store(her2st_dir, tmp_path_factory):
    """The reference: her2st C2 ingested from the original release."""
    out = tmp_path_factory.mktemp("ref") / "store"
    assert main(["ingest", "her2st", str(her2st_dir), "--sections", "C2", "--out", str(out), *ONE]) == 0
    return open_store(out)


def _hest(c2, root: Path) -> list[str]:
    from layouts import write_hest

    write_hest(c2, root / "hest", "C2")  # with HEST's pre-extracted 224 px patches (patches/C2.h5)
    return ["hest", str(root / "hest"), "--sections", "C2"]


def _visium(c2, root: Path) -> list[str]:
    from layouts import write_visium

    # the full-resolution image lies beside outs/, as Space Ranger users keep it: named with --image
    write_visium(c2, root / "C2" / "outs")
    return ["visium", str(root / "C2" / "outs"), "--image", c2.uns["slides"]["C2"]["image_path"]]


def _anndata(c2, root: Path) -> list[str]:
    """A plain scanpy-style file: counts in X, obsm['spatial'], pixel size in uns, image on the command line."""
    import anndata as ad

    meta = c2.uns["slides"]["C2"]
    plain = ad.AnnData(X=c2.X.copy(), obs=pd.DataFrame(index=c2.obs["barcode"].astype(str).to_numpy()),
                       var=pd.DataFrame(index=c2.var_names.copy()),
                       uns={"microns_per_pixel": meta["microns_per_pixel"],
                            "spot_diameter_um": meta["spot_diameter_um"]})
    plain.obsm["spatial"] = c2.obs[["pixel_x", "pixel_y"]].to_numpy()
    plain.write_h5ad(root / "C2.h5ad")
    return ["anndata", str(root / "C2.h5ad"), "--image", meta["image_path"]]


LAYOUTS = {"hest": _hest, "visium": _visium, "anndata": _anndata}


@pytest.mark.reliability(kind="layout", case="agl ingest of C2 as a HEST-1k sample (st/, metadata/, patches/, "
                         "wsis/), as Space Ranger outs/ (--image), and as a plain .h5ad (--image, um/px in uns)",
                         outcome="the store of the her2st release: same 185 spots, expression, pixels and gene sets; "
                                 "patches equal (HEST: resampled from its 224 px patches, mean difference < 2 grey "
                                 "levels)")
@pytest.mark.parametrize("fmt", LAYOUTS)
def test_ingest_other_formats_gives_the_her2st_store(fmt, c2, c2_store, tmp_path, capsys):
    args = LAYOUTS[fmt](c2, tmp_path)
    out = tmp_path / "store"
    assert main(["ingest", *args, "--out", str(out), *ONE]) == 0
    store = open_store(out)
    store.verify()
    assert store.manifest["slides"] == c2_store.manifest["slides"] == {"C2": 185}
    assert store.gene_names == c2_store.gene_names
    # the same spots with the same preprocessed expression (rows matched by barcode)
    ref = c2_store.spots.set_index("barcode")["row"]
    rows = ref.loc[store.spots["barcode"]].to_numpy()
    np.testing.assert_array_equal(store.expression, c2_store.expression[rows])
    np.testing.assert_array_equal(store.spots[["pixel_x", "pixel_y"]].to_numpy(),
                                  c2_store.spots[["pixel_x", "pixel_y"]].to_numpy()[rows])
    assert store.gene_set("kfold-s0-f0")["gene"].tolist() == c2_store.gene_set("kfold-s0-f0")["gene"].tolist()
    patches, want = np.asarray(store.patches, dtype=np.int16), np.asarray(c2_store.patches, dtype=np.int16)[rows]
    if fmt == "hest":  # resampled from HEST's 224 px patches instead of cut from the slide: close, not equal
        assert np.abs(patches - want).mean() < 2  # measured 0.34 grey levels
    else:
        np.testing.assert_array_equal(patches, want)
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "C2 185" in text and "32 x 32 x 3" in text and "kfold x5" in text


def _break_hest(c2, root: Path) -> tuple[list[str], Path]:
    args = _hest(c2, root)
    bad = root / "hest" / "st" / "C2.h5ad"
    bad.write_bytes(b"not an HDF5 file")
    return args, bad


def _break_visium(c2, root: Path) -> tuple[list[str], Path]:
    args = _visium(c2, root)
    bad = root / "C2" / "outs" / "spatial" / "scalefactors_json.json"
    bad.write_text('{"tissue_hires_scalef": 0.1}')  # no spot_diameter_fullres: the pixel size is unknown
    return args, bad


def _break_anndata(c2, root: Path) -> tuple[list[str], Path]:
    """A readable file whose image is damaged: fails while cutting patches, after reading."""
    args = _anndata(c2, root)
    bad = root / "damaged.jpg"
    bad.write_bytes(Path(args[-1]).read_bytes()[:20000])  # a truncated JPEG
    return [*args[:-1], str(bad)], bad


BROKEN = {"hest": _break_hest, "visium": _break_visium, "anndata": _break_anndata}


@pytest.mark.parametrize("fmt", BROKEN)
def test_bad_input_in_each_format_exits_2_and_writes_nothing(fmt, c2, tmp_path, capsys):
    args, bad = BROKEN[fmt](c2, tmp_path)
    out = tmp_path / "store"
    assert main(["ingest", *args, "--out", str(out), *ONE]) == 1  # runtime failure (DataError)
    err = capsys.readouterr().err
    assert str(bad) in err, err
    assert "Traceback" not in err
    assert not out.exists()
    _no_temp_left(tmp_path)


# --------------------------------------------------------------------------- generic AnnData from the CLI
def _plain_h5ad(c2, path: Path, genes=None):
    """Real C2 counts + obsm['spatial'] in a plain .h5ad with no pixel size and no image path."""
    import anndata as ad

    plain = ad.AnnData(X=c2.X.copy(), obs=pd.DataFrame(index=c2.obs["barcode"].astype(str).to_numpy()),
                       var=pd.DataFrame(index=list(genes) if genes is not None else c2.var_names.copy()))
    plain.obsm["spatial"] = c2.obs[["pixel_x", "pixel_y"]].to_numpy()
    plain.write_h5ad(path)
    return path


@pytest.mark.reliability(kind="bad input", case="slide data: a plain .h5ad (counts + obsm['spatial']) with no pixel size",
                         outcome="exit 1 naming the file and --microns-per-pixel; with the flag it ingests")
def test_plain_h5ad_needs_and_takes_microns_per_pixel(c2, c2_store, tmp_path, capsys):
    meta = c2.uns["slides"]["C2"]
    src = _plain_h5ad(c2, tmp_path / "C2.h5ad")
    out = tmp_path / "store"
    base = ["ingest", "anndata", str(src), "--image", meta["image_path"], "--out", str(out), *ONE]
    assert main(base) == 1
    err = capsys.readouterr().err
    assert str(src) in err and "microns_per_pixel" in err and not out.exists()
    assert main([*base, "--microns-per-pixel", str(meta["microns_per_pixel"]),
                 "--spot-diameter-um", "100"]) == 0
    store = open_store(out)
    assert store.manifest["slides"] == {"C2": 185} and store.gene_names == c2_store.gene_names
    ref = c2_store.spots.set_index("barcode")["row"]
    np.testing.assert_array_equal(store.expression, c2_store.expression[ref.loc[store.spots["barcode"]].to_numpy()])
    # a flag the reader has no use for is a usage error naming the flag
    assert main(["ingest", "hest", str(tmp_path), "--microns-per-pixel", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "--microns-per-pixel: only for formats" in capsys.readouterr().err


@pytest.mark.reliability(kind="bad input", case="slide data: a .h5ad whose var repeats gene symbols (as 10x human references)",
                         outcome="default: exit 1 naming the file and the symbols; --duplicate-genes sum/first ingest")
def test_duplicate_gene_symbols_from_the_cli(c2, tmp_path, capsys):
    meta = c2.uns["slides"]["C2"]
    genes = list(c2.var_names)
    totals = np.asarray(c2.X.sum(axis=0)).ravel()
    ia = 2 + int(np.argmax(totals[2:]))  # a well-counted gene appears twice: column 1 (gene b) renamed to it
    a, b = genes[ia], genes[1]
    genes[1] = a
    src = _plain_h5ad(c2, tmp_path / "dup.h5ad", genes)
    base = ["ingest", "anndata", str(src), "--image", meta["image_path"],
            "--microns-per-pixel", str(meta["microns_per_pixel"]), *ONE]
    assert main([*base, "--out", str(tmp_path / "err")]) == 1
    err = capsys.readouterr().err
    assert str(src) in err and f"1 duplicate gene symbols ('{a}')" in err and "--duplicate-genes sum" in err
    from agl.data.readers import read_anndata

    x = c2.X.tocsc()
    for policy, expected in (("sum", x[:, ia] + x[:, 1]), ("first", x[:, 1])):
        adata = read_anndata(src, image_path=meta["image_path"], microns_per_pixel=meta["microns_per_pixel"],
                             duplicate_genes=policy)
        assert b not in adata.var_names and list(adata.var_names).count(a) == 1
        np.testing.assert_array_equal(adata[:, a].X.toarray(), expected.toarray())
        assert main([*base, "--duplicate-genes", policy, "--out", str(tmp_path / policy)]) == 0
        assert a in open_store(tmp_path / policy).gene_names


def test_one_list_syntax_for_every_command():
    """Spaces or commas (or both) for lists of sections, seeds, folds, methods, priors."""
    from agl.cli import build_parser

    parser = build_parser()
    a = parser.parse_args(["ingest", "her2st", "x", "--out", "o", "--sections", "A1,B2", "C3", "--seeds", "1,2"])
    assert a.sections == ["A1", "B2", "C3"] and a.seeds == [1, 2] and a.priors == ["hvg", "mean"]
    b = parser.parse_args(["ingest", "her2st", "x", "--out", "o", "--sections", "A1", "B2", "C3", "--seeds", "1", "2"])
    assert (b.sections, b.seeds) == (a.sections, a.seeds)
    p = parser.parse_args(["predict", "--input", "x", "--out", "o", "--sections", "A1", "B2"])
    assert p.sections == parser.parse_args(["predict", "--input", "x", "--out", "o", "--sections", "A1,B2"]).sections
    e = parser.parse_args(["evaluate", "--store", "demo", "--protocol", "kfold", "--out", "o",
                           "--methods", "pgl,topk:k=3", "dkgsb", "--seeds", "0", "1", "--folds", "0,2"])
    assert e.methods == ["pgl", "topk:k=3", "dkgsb"] and e.seeds == [0, 1] and e.folds == [0, 2]
    with pytest.raises(SystemExit):
        parser.parse_args(["ingest", "her2st", "x", "--out", "o", "--seeds", "1,two"])


# --------------------------------------------------------------------------- scanpy's Visium layout
def _store_rows(store, ref) -> np.ndarray:
    """Rows of ``ref`` holding the spots of ``store``, matched by barcode."""
    return ref.spots.set_index("barcode")["row"].loc[store.spots["barcode"]].to_numpy()


@pytest.mark.reliability(kind="layout", case="agl ingest anndata of a scanpy .h5ad (outs/ read by "
                         "scanpy.read_visium, write_h5ad): uns['spatial'] scale factors and hires image, no --image",
                         outcome="the store agl ingest visium gives on the outs/: same spots, um/px, pixels and "
                                 "patches; the hires PNG goes to the agl cache, not beside the input; with --image "
                                 "the her2st release's store")
def test_scanpy_visium_h5ad_ingests_like_its_outs_folder(c2, c2_store, tmp_path, monkeypatch, caplog):
    """Real C2 as Space Ranger outs/, read by scanpy.read_visium and saved: uns['spatial'] is read directly.

    Without --image the hires image kept in the file (scanpy's float copy of tissue_hires_image.png) with
    tissue_hires_scalef gives the store the Visium reader gives on the outs/ folder: same spots, pixel
    size and patches. With --image (full resolution) it is the her2st store of the same section.
    """
    import json
    import logging

    from layouts import write_scanpy_visium

    monkeypatch.setenv("AGL_CACHE_DIR", str(tmp_path / "cache"))  # where the hires PNG taken out of the file goes
    h5ad, outs = write_scanpy_visium(c2, tmp_path / "in")
    before = sorted(p.relative_to(tmp_path / "in") for p in (tmp_path / "in").rglob("*"))
    sf = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())
    mpp = 55.0 / (sf["spot_diameter_fullres"] * sf["tissue_hires_scalef"])
    with caplog.at_level(logging.WARNING):
        assert main(["ingest", "anndata", str(h5ad), "--out", str(tmp_path / "a"), *ONE]) == 0
    assert any(f"{h5ad}: no --image given" in r.message and "uns['spatial']['C2']['images']['hires']" in r.message
               and f"{mpp:.3g} um per pixel" in r.message for r in caplog.records)
    assert main(["ingest", "visium", str(outs), "--out", str(tmp_path / "v"), *ONE]) == 0
    a, v = open_store(tmp_path / "a"), open_store(tmp_path / "v")
    a.verify()
    assert a.manifest["slides"] == v.manifest["slides"] == {"C2": 185}
    meta = a.manifest["slide_meta"]["C2"]
    assert meta["microns_per_pixel"] == pytest.approx(mpp, rel=1e-12)
    assert meta["microns_per_pixel"] == pytest.approx(v.manifest["slide_meta"]["C2"]["microns_per_pixel"], rel=1e-12)
    assert meta["image_kind"] == "tissue_hires_image" and meta["library_id"] == "C2"
    assert Path(meta["image_path"]).parent == tmp_path / "cache" / "images"  # never beside the input
    assert sorted(p.relative_to(tmp_path / "in") for p in (tmp_path / "in").rglob("*")) == before
    rows = _store_rows(a, v)
    np.testing.assert_array_equal(np.asarray(a.patches), np.asarray(v.patches)[rows])
    np.testing.assert_array_equal(a.expression, v.expression[rows])
    np.testing.assert_allclose(a.spots[["pixel_x", "pixel_y"]].to_numpy(),
                               v.spots[["pixel_x", "pixel_y"]].to_numpy()[rows], rtol=1e-12)
    # the full-resolution image on the command line: the store of the her2st release itself
    image = c2.uns["slides"]["C2"]["image_path"]
    assert main(["ingest", "anndata", str(h5ad), "--image", image, "--out", str(tmp_path / "f"), *ONE]) == 0
    f = open_store(tmp_path / "f")
    rows = _store_rows(f, c2_store)
    assert f.manifest["slide_meta"]["C2"]["microns_per_pixel"] == pytest.approx(
        c2_store.manifest["slide_meta"]["C2"]["microns_per_pixel"], rel=1e-9)
    np.testing.assert_array_equal(np.asarray(f.patches), np.asarray(c2_store.patches)[rows])
    np.testing.assert_array_equal(f.expression, c2_store.expression[rows])


@pytest.mark.reliability(kind="bad input", case="slide data: a scanpy .h5ad whose uns['spatial'] holds two libraries, "
                         "or whose spot_diameter_fullres is NaN",
                         outcome="exit 1 naming the file and the libraries (--library-id chooses one, which ingests), "
                                 "or the bad scale factor printed as a plain number; nothing written")
def test_scanpy_visium_h5ad_libraries_and_bad_scale_factors(c2, tmp_path, monkeypatch, capsys):
    import anndata as ad

    from layouts import write_scanpy_visium

    monkeypatch.setenv("AGL_CACHE_DIR", str(tmp_path / "cache"))
    h5ad, _ = write_scanpy_visium(c2, tmp_path / "in")
    one = ad.read_h5ad(h5ad)
    # two libraries in one file, as scanpy/squidpy concatenation leaves them: obs['library_id'] says whose spot
    half = one.n_obs // 2
    one.obs["library_id"] = ["C2"] * half + ["C2b"] * (one.n_obs - half)
    one.uns["spatial"]["C2b"] = one.uns["spatial"]["C2"]
    one.write_h5ad(tmp_path / "two.h5ad")
    out = tmp_path / "store"
    assert main(["ingest", "anndata", str(tmp_path / "two.h5ad"), "--out", str(out), *ONE]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'two.h5ad'}: uns['spatial'] holds 2 libraries (C2, C2b); choose one with --library-id" in err
    assert not out.exists()
    assert main(["ingest", "anndata", str(tmp_path / "two.h5ad"), "--library-id", "C2b", "--out", str(out),
                 *ONE]) == 0
    from agl.data.readers import read_anndata

    assert read_anndata(tmp_path / "two.h5ad", library_id="C2b").obs["barcode"].tolist() == list(one.obs_names[half:])
    kept = set(open_store(out).spots["barcode"])  # spots of C2b only (less those preprocessing filters)
    assert kept <= set(one.obs_names[half:]) and len(kept) > 0.9 * (one.n_obs - half)
    # a NaN scale factor is named with its value as a number, not numpy's repr
    one = ad.read_h5ad(h5ad)
    one.uns["spatial"]["C2"]["scalefactors"]["spot_diameter_fullres"] = np.float64("nan")
    one.write_h5ad(tmp_path / "nan.h5ad")
    assert main(["ingest", "anndata", str(tmp_path / "nan.h5ad"), "--out", str(tmp_path / "n"), *ONE]) == 1
    err = capsys.readouterr().err
    assert (f"{tmp_path / 'nan.h5ad'}: uns['spatial']['C2']['scalefactors']['spot_diameter_fullres'] must be "
            "positive, got nan") in err, err
    assert "np.float64" not in err and not (tmp_path / "n").exists()
