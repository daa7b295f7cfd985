"""Stain normalisation at patch extraction (``agl ingest --stain``), on real her2st patches.

Stores of sections C2 + C3 at 64 px (the transforms are per pixel; small patches keep the
Macenko fits cheap): the normalised patches differ from the raw ones, are the same on every
ingest, the reference is recorded and checked, and ``agl predict`` and the champion's pyfunc
apply the same transform to a new slide.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agl.cli import main
from agl.data import stain
from agl.data.store import open_store
from agl.errors import DataError

SECTIONS = ["C2", "C3"]
PX = 64


def _build(her2st_dir: Path, out: Path, method: str, **kw) -> Path:
    from agl.data.ingest import build_store
    from agl.data.readers import read_her2st

    return build_store(read_her2st(her2st_dir, SECTIONS), out, patch_px=PX, seeds=(0,), split_kinds=("loso",),
                       n_primary=20, stain=method, **kw)


@pytest.fixture(scope="module")
def stores(her2st_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stain")
    return {m: _build(her2st_dir, root / m, m) for m in ("none", "macenko", "reinhard")}


def _by_barcode(store) -> dict[tuple[str, str], np.ndarray]:
    spots = store.spots
    return {(s, b): store.patches[i] for i, (s, b) in enumerate(zip(spots["slide_id"], spots["barcode"]))}


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalised_patches_differ_from_raw_and_follow_the_recorded_reference(stores, method) -> None:
    raw, done = open_store(stores["none"]), open_store(stores[method])
    assert list(raw.spots["spot_id"]) == list(done.spots["spot_id"])  # same spots, only the pixels change
    raw_p, done_p = np.asarray(raw.patches), np.asarray(done.patches)
    assert done_p.shape == raw_p.shape and done_p.dtype == np.uint8
    changed = np.abs(done_p.astype(np.int16) - raw_p).mean(axis=(1, 2, 3))
    assert (changed > 1.0).mean() > 0.95  # nearly every patch is visibly recoloured
    record = stain.store_record(done)
    assert record["method"] == method and record["reference_from"]["slides"] == SECTIONS
    assert record["reference_from"]["n_patches"] == len(raw_p) - record["n_kept_as_cut"]
    assert record["library"] == "torchstain 1.4.1"
    # the reference is the median of the raw patches' own fits, and the store holds exactly the record's transform
    again = stain.fit_reference(raw_p, method, raw.spots["slide_id"].to_numpy())
    assert again["reference"] == record["reference"]
    assert np.array_equal(stain.normalise_patches(raw_p, record)[0], done_p)
    # the record is a listed, hashed store file equal to the manifest's
    assert "stain.json" in done.manifest["files"]
    assert json.loads((Path(done.path) / "stain.json").read_text()) == done.manifest["patch"]["stain"]
    assert "stain" not in raw.manifest["patch"] and stain.store_record(raw) == {"method": "none"}


def test_ingest_is_deterministic(stores, her2st_dir: Path, tmp_path: Path) -> None:
    first = open_store(stores["macenko"])
    second = open_store(_build(her2st_dir, tmp_path / "again", "macenko"))
    for name in ("arrays/patches.arrow", "stain.json"):
        assert first.manifest["files"][name] == second.manifest["files"][name]


def test_feature_cache_keys_differ_with_the_stain(stores) -> None:
    from agl.models.features import feature_cache_key

    keys = {m: feature_cache_key(open_store(p), "torchvision/mobilenet_v2", "imagenet")[0] for m, p in stores.items()}
    assert len(set(keys.values())) == 3  # a normalised store never reads an un-normalised feature cache


def test_reference_from_named_slides(stores, her2st_dir: Path) -> None:
    raw = open_store(stores["none"])
    only = stain.fit_reference(np.asarray(raw.patches), "macenko", raw.spots["slide_id"].to_numpy(), ["C3"])
    assert only["reference_from"]["slides"] == ["C3"]
    assert only["reference"] != stain.store_record(open_store(stores["macenko"]))["reference"]


@pytest.mark.reliability(kind="bad input", case="store: stain.json edited after ingest",
                         outcome="DataError naming stain.json before training reads the store")
def test_a_changed_stain_record_is_refused(stores, tmp_path: Path) -> None:
    import shutil

    from agl.data.integrity import check_store_files

    copy = Path(shutil.copytree(stores["macenko"], tmp_path / "store"))
    record = json.loads((copy / "stain.json").read_text())
    record["reference"]["maxCRef"][0] *= 1.5
    (copy / "stain.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    with pytest.raises(DataError, match="stain.json"):
        check_store_files(open_store(copy))


@pytest.mark.reliability(kind="bad input", case="stain normalisation of an all-background (white) patch",
                         outcome="patch kept as cut and counted; no crash (torchstain alone raises)")
def test_background_patches_are_kept_as_cut(stores) -> None:
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    tissue = np.asarray(open_store(stores["none"]).patches[:1])
    white = np.full((1, PX, PX, 3), 250, np.uint8)
    specks = white.copy()
    specks[0, :2] = tissue[0, :2]  # 2 of 64 rows of tissue: 3% < the 5% needed
    batch = np.concatenate([white, specks, tissue])
    with pytest.raises(np.linalg.LinAlgError), np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        NumpyMacenkoNormalizer().normalize(white[0])  # why agl has to handle it
    for method in ("macenko", "reinhard"):
        record = stain.store_record(open_store(stores[method]))
        out, kept = stain.normalise_patches(batch, record)
        assert kept == 2
        assert np.array_equal(out[:2], batch[:2]) and not np.array_equal(out[2], batch[2])
        with pytest.raises(DataError, match="no patch with tissue"):
            stain.fit_reference(np.concatenate([white, specks]), method)


@pytest.mark.reliability(kind="bad input", case="agl ingest --stain with an unknown method",
                         outcome="exit 2 (usage), message lists macenko/reinhard/none; nothing written")
def test_unknown_stain_is_a_usage_error(her2st_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "store"
    with pytest.raises(SystemExit) as exit_:
        main(["ingest", "her2st", str(her2st_dir), "--sections", "C2", "--out", str(out), "--stain", "vahadane"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--stain" in err and "macenko" in err and "reinhard" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.reliability(kind="bad input", case="agl ingest --stain-reference-slides naming a slide not ingested",
                         outcome="exit 2, message names the flag and the store's slides; nothing written")
def test_reference_slide_not_in_the_store(her2st_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "store"
    rc = main(["ingest", "her2st", str(her2st_dir), "--sections", "C2", "--out", str(out), "--patch-px", "32",
               "--seeds", "0", "--splits", "kfold", "--stain", "reinhard", "--stain-reference-slides", "B4"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--stain-reference-slides" in err and "B4" in err and "C2" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.reliability(kind="bad input", case="agl ingest --stain with --stream",
                         outcome="exit 2 naming --stain (not available streaming yet); nothing written")
def test_stain_with_streaming_is_refused(her2st_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "store"
    rc = main(["ingest", "her2st", str(her2st_dir), "--sections", "C2", "--out", str(out), "--stream",
               "--stain", "macenko"])
    assert rc == 2 and "--stain" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def checkpoint(stores, tmp_path_factory) -> Path:
    """A short real run (MobileNetV2 features of the 64 px patches) on the Macenko store's loso-C3 split."""
    from agl.training.bundles import make_bundle
    from agl.training.loop import TrainConfig, fit

    out = tmp_path_factory.mktemp("ckpt")
    cfg = TrainConfig.from_dict({"method": "topk", "k": 16, "epochs": 1, "trunk": [16], "device": "cpu"})
    fit(cfg, make_bundle(open_store(stores["macenko"]), "loso-C3", cfg), out_dir=out)
    return out / "checkpoint"


@pytest.mark.reliability(kind="use", case="agl predict of C3 with a model trained on a Macenko-normalised store (C2 + C3)",
                         outcome="the patches given to the model equal the store's normalised C3 patches, spot by spot; "
                                 "the .h5ad records stain=macenko")
def test_predict_applies_the_stores_normalisation(stores, checkpoint: Path, her2st_dir: Path, tmp_path: Path,
                                                  monkeypatch) -> None:
    import agl.predict as predict_module
    from agl.predict import PredictOptions, predict_slides

    record = json.loads((checkpoint / "store.json").read_text())["stain"]
    assert record == stain.store_record(open_store(stores["macenko"]))
    seen: list[np.ndarray] = []
    real = predict_module.run_model
    monkeypatch.setattr(predict_module, "run_model",
                        lambda model, cfg, patches, *a, **k: seen.append(np.array(patches)) or real(model, cfg, patches, *a, **k))
    out = tmp_path / "pred"
    predict_slides(PredictOptions(out=str(out), input=str(her2st_dir), format="her2st",
                                  reader_args={"sections": ["C3"]}, checkpoint=str(checkpoint), top_genes=0))
    import anndata as ad

    result = ad.read_h5ad(out / "predictions.h5ad")
    assert result.uns["agl_predict"]["stain"] == "macenko"
    stored = _by_barcode(open_store(stores["macenko"]))
    pairs = [(seen[0][i], stored[("C3", b)]) for i, b in enumerate(result.obs["barcode"]) if ("C3", b) in stored]
    assert len(pairs) == 179  # every C3 spot the store kept
    assert all(np.array_equal(a, b) for a, b in pairs)  # predict cut and normalised them exactly as ingest did


@pytest.mark.reliability(kind="use", case="the champion's pyfunc of a model trained on a Macenko-normalised store, "
                         "given raw patches", outcome="normalises them with the store's reference: the same predictions "
                                                     "as the model given the store's normalised patches")
def test_pyfunc_applies_the_stores_normalisation(stores, checkpoint: Path) -> None:
    from types import SimpleNamespace

    from agl.data.stain import checkpoint_stain
    from agl.tracking.pyfunc import ARTIFACT, AglPyfuncModel

    raw = np.asarray(open_store(stores["none"]).patches[:6])
    done = np.asarray(open_store(stores["macenko"]).patches[:6])
    served = AglPyfuncModel()
    served.load_context(SimpleNamespace(artifacts={ARTIFACT: str(checkpoint)}))
    assert checkpoint_stain(checkpoint)["method"] == "macenko"
    plain = AglPyfuncModel().serve(served.model, served.cfg, served.columns)  # the same model, no stain record
    assert np.allclose(served.predict(None, raw).to_numpy(), plain.predict(None, done).to_numpy(), atol=1e-5)
    assert not np.allclose(served.predict(None, raw).to_numpy(), plain.predict(None, raw).to_numpy(), atol=1e-3)


def test_info_shows_the_stain(stores, capsys) -> None:
    capsys.readouterr()
    assert main(["info", str(stores["macenko"])]) == 0
    assert "stain=macenko (reference from" in capsys.readouterr().out
    assert main(["info", str(stores["none"])]) == 0
    assert "stain=none" in capsys.readouterr().out


@pytest.mark.reliability(kind="bad input", case="agl predict with a checkpoint whose store.json stain record has no "
                         "usable reference (edited or truncated)",
                         outcome="DataError naming store.json before any patch is cut; no output folder")
def test_predict_refuses_a_broken_stain_record(checkpoint: Path, her2st_dir: Path, tmp_path: Path) -> None:
    import shutil

    from agl.predict import PredictOptions, predict_slides

    broken = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    record = json.loads((broken / "store.json").read_text())
    del record["stain"]["reference"]["HERef"]
    (broken / "store.json").write_text(json.dumps(record))
    out = tmp_path / "pred"
    with pytest.raises(DataError, match="store.json"):
        predict_slides(PredictOptions(out=str(out), input=str(her2st_dir), format="her2st",
                                      reader_args={"sections": ["C3"]}, checkpoint=str(broken), top_genes=0))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".pred")]
