"""Prediction on a real her2st section: from a checkpoint folder and from the MLflow champion."""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from agl import runs
from agl.errors import CheckpointError, DataError
from agl.predict import PredictOptions, predict_slides

SPLIT = "kfold-s0-f0"
SECTION = "C5"


@pytest.fixture(scope="module")
def trained(demo_store: Path, tmp_path_factory) -> Path:
    """A short real run on the demo store, finalised like a sweep trial (checkpoint + artifacts)."""
    from trainkit import finalised_run

    return finalised_run(demo_store, SPLIT, tmp_path_factory.mktemp("trained"))


def options(her2st_dir: Path, out: Path, **kw) -> PredictOptions:
    return PredictOptions(out=str(out), input=str(her2st_dir), format="her2st",
                          reader_args={"sections": [SECTION]}, top_genes=3, **kw)


def test_predict_from_checkpoint(trained: Path, her2st_dir: Path, tmp_path: Path) -> None:
    from agl.data.readers import read_her2st

    out = tmp_path / "pred"
    summary = predict_slides(options(her2st_dir, out, checkpoint=str(trained)))
    result = ad.read_h5ad(out / "predictions.h5ad")
    source = read_her2st(her2st_dir, [SECTION])
    # every spot kept with its obs/obsm; one output per model gene
    assert list(result.obs_names) == list(source.obs_names)
    assert np.allclose(result.obsm["spatial"], source.obsm["spatial"])
    assert (result.obs["slide_id"] == SECTION).all()
    import pandas as pd

    genes = pd.read_parquet(trained / "genes.parquet")
    assert list(result.var_names) == list(genes["gene"])
    assert result.X.shape == (source.n_obs, len(genes)) and np.isfinite(result.X).all()
    # measured expression (log1p counts) of the same genes, aligned by gene name
    gene = result.var_names[0]
    j = list(source.var_names).index(gene)
    expected = np.log1p(np.asarray(source.X[:, j].todense()).ravel())
    assert np.allclose(result.layers["measured"][:, 0], expected, atol=1e-5)
    assert result.var["measured"].all()
    # the model learned something transferable: positive mean PCC over primary genes on this section
    assert summary["mean_pcc_primary_measured"] > 0
    maps = list((out / "maps").glob("*.png"))
    assert [m.name for m in maps] == [f"{SECTION}.png"] and maps[0].read_bytes()[:4] == b"\x89PNG"


def test_no_silent_overwrite_and_atomic(trained: Path, her2st_dir: Path, tmp_path: Path) -> None:
    from agl.fileio import OUTPUT_MARKER, output_owner

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("user data")
    for overwrite in (False, True):  # a folder of the user's files is never replaced, --overwrite or not
        with pytest.raises(DataError, match="is not an `agl predict` output"):
            predict_slides(options(her2st_dir, mine, checkpoint=str(trained), overwrite=overwrite))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "user data"
    with pytest.raises(CheckpointError):
        predict_slides(options(her2st_dir, tmp_path / "other", checkpoint=str(tmp_path / "missing")))
    assert not (tmp_path / "other").exists() and not list(tmp_path.glob(".other.tmp-*"))
    out = tmp_path / "pred"
    predict_slides(options(her2st_dir, out, checkpoint=str(trained)))
    assert output_owner(out) == "predict" and (out / OUTPUT_MARKER).is_file()
    first = (out / "predictions.h5ad").stat().st_mtime_ns
    with pytest.raises(DataError, match="pass --overwrite"):
        predict_slides(options(her2st_dir, out, checkpoint=str(trained)))
    predict_slides(options(her2st_dir, out, checkpoint=str(trained), overwrite=True))  # its own output: replaced
    assert (out / "predictions.h5ad").stat().st_mtime_ns != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_predict_pulls_the_champion(trained: Path, her2st_dir: Path, demo_store: Path, tmp_path: Path) -> None:
    from agl.data.store import open_store
    from agl.tracking import MlflowTracker, default_tracking_uri, log_finished_run

    uri = default_tracking_uri(tmp_path)
    tracker = MlflowTracker(uri)
    config = runs.read_record(trained)["config"]
    run_id = log_finished_run(tracker, "agl-predict", "one", config, trained, artifact_root=tmp_path / "artifacts")
    example = np.asarray(open_store(demo_store).patches[:1])
    tracker.register_model(run_id, trained, "agl-test-model", input_example=example)
    summary = predict_slides(options(her2st_dir, tmp_path / "pred", tracking_uri=uri, model_name="agl-test-model"))
    assert summary["n_spots"] > 100


def test_cli_reports_errors(her2st_dir: Path, tmp_path: Path, capsys) -> None:
    from agl.cli import main

    code = main(["predict", "--checkpoint", str(tmp_path / "nope"), "--input", str(her2st_dir),
                 "--sections", SECTION, "--out", str(tmp_path / "o")])
    assert code == 1 and "checkpoint folder not found" in capsys.readouterr().err


def test_patch_size_comes_from_the_checkpoint(trained: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from agl.predict import patch_settings

    # the checkpoint records the training store's patch size (fit writes it; test_checkpoint checks that)
    assert json.loads((trained / "store.json").read_text())["patch"]["patch_px"] == 224
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    record = json.loads((ckpt / "store.json").read_text())
    record["patch"] = {"patch_um": 80.0, "patch_px": 160, "border": "pad"}  # not the defaults
    (ckpt / "store.json").write_text(json.dumps(record))
    opts = PredictOptions(out=str(tmp_path / "p"), input="unused", checkpoint=str(ckpt))
    assert patch_settings(ckpt, opts) == (80.0, 160)
    opts.patch_px = 96  # an explicit option wins over the checkpoint's record
    assert patch_settings(ckpt, opts) == (80.0, 96)


def _section_h5ad(her2st_dir: Path, path: Path, var_names, **columns) -> Path:
    """Real section C5 as a plain .h5ad (counts, obsm['spatial'], pixel size and image in uns) with var renamed."""
    import pandas as pd

    from agl.data.readers import read_her2st

    source = read_her2st(her2st_dir, [SECTION])
    meta = source.uns["slides"][SECTION]
    plain = ad.AnnData(X=source.X.copy(), obs=pd.DataFrame(index=source.obs["barcode"].astype(str).to_numpy()),
                       var=pd.DataFrame(columns, index=list(var_names)),
                       uns={"microns_per_pixel": meta["microns_per_pixel"], "spot_diameter_um": meta["spot_diameter_um"],
                            "image_path": meta["image_path"]})
    plain.obsm["spatial"] = source.obsm["spatial"]
    plain.write_h5ad(path)
    return path


@pytest.mark.reliability(kind="layout", case="agl predict on a .h5ad whose var names are versioned Ensembl IDs "
                         "(var['gene_symbols'] beside them), model trained on symbols",
                         outcome="every model gene measured, values equal the symbol-named slide's")
def test_genes_named_by_ensembl_id_map_back_through_gene_symbols(trained: Path, her2st_dir: Path,
                                                                 tmp_path: Path) -> None:
    from agl.data.readers import read_her2st

    source = read_her2st(her2st_dir, [SECTION])
    symbols = list(source.var_names)
    ids = [f"ENSG{i:011d}.7" for i in range(len(symbols))]  # versioned Ensembl-style IDs as var names
    h5ad = _section_h5ad(her2st_dir, tmp_path / "ids.h5ad", ids, gene_ids=ids, gene_symbols=symbols)
    predict_slides(PredictOptions(out=str(tmp_path / "pred"), input=str(h5ad), format="anndata",
                                  checkpoint=str(trained), top_genes=0))
    result = ad.read_h5ad(tmp_path / "pred" / "predictions.h5ad")
    assert result.var["measured"].all()  # every model gene found through var['gene_symbols']
    gene = result.var_names[3]
    expected = np.log1p(np.asarray(source[:, gene].X.todense()).ravel())
    np.testing.assert_allclose(result.layers["measured"][:, 3], expected, atol=1e-5)


@pytest.mark.reliability(kind="layout", case="agl predict on Space Ranger outs/ (genes by symbol) with a model "
                         "whose genes are Ensembl IDs",
                         outcome="every model gene measured through var['gene_ids'] (features 'id'), values equal "
                                 "the symbol's counts")
def test_visium_symbols_match_a_model_trained_on_ensembl_ids(trained: Path, her2st_dir: Path, tmp_path: Path) -> None:
    """Space Ranger outs/ names genes by symbol and keeps their Ensembl IDs (features "id"): a model whose genes
    are Ensembl IDs (trained on a store of ID-named slides) measures every one of them on it."""
    import shutil

    import pandas as pd

    from agl.data.readers import read_her2st, read_visium
    from layouts import write_visium

    source = read_her2st(her2st_dir, [SECTION])
    outs = write_visium(source, tmp_path / SECTION / "outs", images=False)
    image = source.uns["slides"][SECTION]["image_path"]
    slide = read_visium(outs, image_path=image)
    assert list(slide.var_names) == list(source.var_names)  # symbols
    id_of = dict(zip(slide.var_names, slide.var["gene_ids"]))
    ckpt = tmp_path / "ensembl-model"
    shutil.copytree(trained, ckpt)
    genes = pd.read_parquet(ckpt / "genes.parquet")
    genes["gene"] = genes["gene"].map(id_of)  # the same model, its genes named by Ensembl ID
    assert genes["gene"].str.startswith("ENSG").all()
    genes.to_parquet(ckpt / "genes.parquet")
    predict_slides(PredictOptions(out=str(tmp_path / "pred"), input=str(outs), format="visium",
                                  reader_args={"image_path": image}, checkpoint=str(ckpt), top_genes=0))
    result = ad.read_h5ad(tmp_path / "pred" / "predictions.h5ad")
    assert list(result.var_names) == genes["gene"].tolist() and result.var["measured"].all()
    symbol = {v: k for k, v in id_of.items()}[result.var_names[3]]
    expected = np.log1p(np.asarray(source[:, symbol].X.todense()).ravel())
    np.testing.assert_allclose(result.layers["measured"][:, 3], expected, atol=1e-5)


@pytest.mark.reliability(kind="bad input", case="slide data: agl predict on a slide whose genes are another species' "
                         "symbols (Erbb2, not ERBB2)",
                         outcome="exit 1 naming the slide, how many of the model's genes it holds and examples; "
                                 "nothing written")
def test_predict_refuses_a_slide_without_the_models_genes(trained: Path, her2st_dir: Path, tmp_path: Path,
                                                          capsys) -> None:
    from agl.cli import main
    from agl.data.readers import read_her2st

    symbols = list(read_her2st(her2st_dir, [SECTION]).var_names)
    mouse_like = [s.capitalize() for s in symbols]  # what a mouse slide's symbols look like
    h5ad = _section_h5ad(her2st_dir, tmp_path / "mouse.h5ad", mouse_like)
    out = tmp_path / "pred"
    code = main(["predict", "--checkpoint", str(trained), "--input", str(h5ad), "--format", "anndata",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    n_genes = len(__import__("pandas").read_parquet(trained / "genes.parquet"))
    assert f"{h5ad}: " in err and f"of the model's {n_genes} genes" in err and "missing e.g." in err, err
    assert "--min-gene-fraction 0.5" in err and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_maps_share_one_scale_over_the_he_and_clip_at_zero(trained: Path, her2st_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    from agl.predict import plot_maps

    summary = predict_slides(options(her2st_dir, tmp_path / "pred", checkpoint=str(trained)))
    assert summary["maps"] == [str(tmp_path / "pred" / "maps" / f"{SECTION}.png")]
    result = ad.read_h5ad(tmp_path / "pred" / "predictions.h5ad")
    genes = list(result.var_names[:2])
    result.X[:, 0] = result.X[:, 0] - result.X[:, 0].mean()  # some predictions below 0, as an untrained head gives
    for clip in (True, False):
        (fig,) = plot_maps(result, genes, tmp_path / f"maps-{clip}", clip=clip)
        assert fig.path.read_bytes()[:4] == b"\x89PNG"
        for j, gene in enumerate(genes):
            pred = np.asarray(result.X[:, j], dtype=float)
            pred = np.maximum(pred, 0) if clip else pred
            both = np.concatenate([pred, result.layers["measured"][:, j]])
            # one colour range for the predicted and the measured panel of each gene
            assert fig.scales[gene] == pytest.approx(tuple(np.percentile(both[np.isfinite(both)], [1, 99])))
            assert fig.pcc[gene] == pytest.approx(np.corrcoef(pred, result.layers["measured"][:, j])[0, 1])
        assert (fig.scales[genes[0]][0] >= 0) == clip
    # the H&E lies underneath: without the image the same figure is (mostly white) different
    del result.uns["slides"][SECTION]["image_path"]
    (bare,) = plot_maps(result, genes, tmp_path / "maps-bare")
    with_he = np.asarray(Image.open(tmp_path / "maps-True" / f"{SECTION}.png").convert("L"), dtype=float)
    without = np.asarray(Image.open(bare.path).convert("L"), dtype=float)
    assert with_he.shape == without.shape and without.mean() > with_he.mean() + 5
