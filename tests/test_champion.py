"""Using a champion as a user does: a moved artifact folder or a mistyped database is named; a slide the
model trained on is flagged; the maps show the genes that matter; the served pyfunc answers with gene names;
the tune summary links the MLflow runs page. A short real fit on the demo store's loso-B4 split, as the
demo sweep's champion."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from agl import runs
from agl.cli import main
from agl.predict import PredictOptions, predict_slides

REPO = Path(__file__).resolve().parents[1]
SPLIT = "loso-B4"
MODEL = "agl-test-model"


@pytest.fixture(scope="module")
def champion(demo_store: Path, tmp_path_factory) -> Path:
    """A short real run on the demo store's loso-B4 split (trained on C2-C5, B4 held out), finalised as a sweep's."""
    from trainkit import finalised_run

    return finalised_run(demo_store, SPLIT, tmp_path_factory.mktemp("champion"), epochs=2)


def register(folder: Path, root: Path, demo_store: Path) -> tuple[str, str]:
    """Log ``folder`` as a run of a SQLite MLflow under ``root`` and register it as ``MODEL@champion``."""
    from agl.data.store import open_store
    from agl.tracking import MlflowTracker, default_tracking_uri, log_finished_run

    root.mkdir(parents=True, exist_ok=True)
    uri = default_tracking_uri(root)
    tracker = MlflowTracker(uri)
    run_id = log_finished_run(tracker, "agl-sweep", "champion", runs.read_record(folder)["config"], folder,
                              artifact_root=root / "mlartifacts")
    tracker.register_model(run_id, folder, MODEL, input_example=np.asarray(open_store(demo_store).patches[:1]))
    return uri, run_id


@pytest.fixture(scope="module")
def c5_prediction(champion: Path, tmp_path_factory) -> tuple[Path, dict]:
    """C5 predicted by the champion (a slide it trained on), 3 maps, with the warnings it logged."""
    her2st = os.environ.get("AGL_HER2ST_DIR", str(REPO.parent / "shared" / "data" / "her2st"))
    out = tmp_path_factory.mktemp("c5") / "pred"
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("agl.predict").addHandler(handler)
    try:
        summary = predict_slides(PredictOptions(out=str(out), input=her2st, reader_args={"sections": ["C5"]},
                                                checkpoint=str(champion), top_genes=3))
    finally:
        logging.getLogger("agl.predict").removeHandler(handler)
    return out, {**summary, "warnings": [r.getMessage() for r in records if r.levelno == logging.WARNING]}


def _predict_args(her2st_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--input", str(her2st_dir), "--sections", "B4", "--out", str(out), *extra]


# --------------------------------------------------------------------------- item 3: moved artifacts
@pytest.mark.reliability(kind="bad input", case="MLflow champion whose artifact folder (mlartifacts/) was moved after "
                         "registration: agl predict and launch/predict.py",
                         outcome="exit 1; the message names models:/NAME@champion, its run id and the missing artifact "
                         "location, and `agl tune-sync`; no MlflowException traceback, no output folder")
def test_a_champion_whose_artifacts_moved_is_named(champion: Path, demo_store: Path, her2st_dir: Path,
                                                   tmp_path: Path, capsys) -> None:
    root = tmp_path / "sweep"
    uri, run_id = register(champion, root, demo_store)
    (root / "mlartifacts").rename(tmp_path / "moved-away")
    out = tmp_path / "pred"
    args = ["--tracking-uri", uri, "--model-name", MODEL, *_predict_args(her2st_dir, out)]
    assert main(["predict", *args]) == 1
    err = capsys.readouterr().err
    launched = subprocess.run([sys.executable, str(REPO / "launch" / "predict.py"), *args], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert launched.returncode == 1, launched.stderr[-2000:]
    for text in (err, launched.stderr):
        assert f"models:/{MODEL}@champion" in text and f"run {run_id}" in text, text
        assert f"model files are missing at file://{root / 'mlartifacts'}" in text and "agl tune-sync" in text, text
        assert "Traceback" not in text and "MlflowException" not in text.replace("(MlflowException:", "")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- item 4: missing database
@pytest.mark.reliability(kind="bad input", case="a mistyped --tracking-uri sqlite:////TMP/nonexistent/dir/mlflow.db: "
                         "agl predict, agl tune-sync, agl tune; and a missing mlflow.db in an existing folder",
                         outcome="exit 2; the message says the database (or its folder) does not exist and names the "
                         "path; no folder and no database created; a writing command creates one only in an existing "
                         "folder")
def test_a_mistyped_database_is_named_never_created(her2st_dir: Path, tmp_path: Path, capsys) -> None:
    from agl.tracking import MlflowTracker

    missing = tmp_path / "nonexistent" / "dir" / "mlflow.db"
    uri = f"sqlite:///{missing}"
    assert uri.startswith("sqlite:////")
    assert main(["predict", "--tracking-uri", uri, *_predict_args(her2st_dir, tmp_path / "pred")]) == 2
    err = capsys.readouterr().err
    assert f"--tracking-uri: the MLflow database {missing} does not exist" in err and "Traceback" not in err, err
    here = tmp_path / "here"
    here.mkdir()
    assert main(["predict", "--tracking-uri", f"sqlite:///{here / 'mlflow.db'}",
                 *_predict_args(her2st_dir, tmp_path / "pred")]) == 2  # reading never creates it, folder or not
    assert f"the MLflow database {here / 'mlflow.db'} does not exist" in capsys.readouterr().err
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"out": str(sweep), "tracking_uri": uri}))
    assert main(["tune-sync", "--out", str(sweep)]) == 2
    assert f"the MLflow database {missing} does not exist" in capsys.readouterr().err
    assert main(["tune", "--tracking-uri", uri, "--out", str(tmp_path / "tune")]) == 2
    assert f"the folder {missing.parent} of the MLflow database {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nonexistent").exists() and not (tmp_path / "tune").exists()
    assert not (tmp_path / "pred").exists() and [p.name for p in here.iterdir()] == []
    # a writing command may create a database, in an existing folder
    MlflowTracker(f"sqlite:///{here / 'new.db'}").experiment("agl-sweep")
    assert (here / "new.db").is_file()


# --------------------------------------------------------------------------- item 8: in-sample slides
@pytest.mark.reliability(kind="use", case="agl predict of C5 with a champion trained on loso-B4 (C2-C5 its "
                         "training slides; B4 held out), from a new checkpoint and from one of earlier agl "
                         "(no slides in store.json)",
                         outcome="a warning names C5 as a training slide, its PCC as in-sample and B4 as the split's "
                         "test slide; the summary and the .h5ad list C5 as in-sample; B4 is not flagged")
def test_predict_warns_on_a_slide_the_model_trained_on(champion: Path, c5_prediction, tmp_path: Path) -> None:
    from agl.predict import in_sample_slides, training_slides

    slides = json.loads((champion / "store.json").read_text())["slides"]
    assert slides["test"] == ["B4"] and slides["train"] == ["C2", "C3", "C4", "C5"]
    out, summary = c5_prediction
    assert summary["in_sample_slides"] == ["C5"]
    (warning,) = [w for w in summary["warnings"] if "training slides" in w]
    assert warning.startswith("slide C5 was among the model's training slides (split loso-B4; train: C2, C3, C4, C5")
    assert "in-sample" in warning and "(the split's test slides: B4)" in warning
    uns = ad.read_h5ad(out / "predictions.h5ad").uns["agl_predict"]
    assert json.loads(uns["in_sample_slides"]) == ["C5"] and json.loads(uns["training_slides"]) == slides
    assert in_sample_slides(["B4"], slides) == []
    # a checkpoint of earlier agl records only the split and the store's hash: the cached demo store tells
    old = tmp_path / "old"
    shutil.copytree(champion, old)
    record = json.loads((old / "store.json").read_text())
    del record["slides"]
    (old / "store.json").write_text(json.dumps(record))
    assert training_slides(old) == {part: slides[part] for part in training_slides(old)}
    assert set(training_slides(old)) == set(slides)


# --------------------------------------------------------------------------- item 13: maps
def _blank_rows(png: Path) -> tuple[int, int]:
    """(rows above the first non-white row, the longest run of all-white rows) of an image."""
    grey = np.asarray(Image.open(png).convert("L"))
    blank = (grey > 250).all(axis=1)
    runs_of_blank, longest, first = 0, 0, int(np.argmin(blank))
    for row in blank:
        runs_of_blank = runs_of_blank + 1 if row else 0
        longest = max(longest, runs_of_blank)
    return first, longest


@pytest.mark.reliability(kind="use", case="agl predict maps of C5 (measured expression present), with "
                         "--genes ERBB2,GRB7, and with --genes erbb2 (wrong case)",
                         outcome="the maps show the primary genes of highest PCC vs measured, or the named genes; no "
                         "white band above or between the panels; an unknown gene exits 2 naming --genes and the "
                         "likely match, no output")
def test_maps_show_the_best_predicted_or_named_genes(c5_prediction, her2st_dir: Path, champion: Path,
                                                     tmp_path: Path, capsys) -> None:
    out, summary = c5_prediction
    result = ad.read_h5ad(out / "predictions.h5ad")
    n_primary = int((pd.read_parquet(champion / "genes.parquet")["role"] == "primary").sum())
    shown = np.maximum(np.asarray(result.X[:, :n_primary]), 0)
    measured = result.layers["measured"][:, :n_primary]
    pcc = pd.Series([np.corrcoef(shown[:, j], measured[:, j])[0, 1] if shown[:, j].std() > 0 else np.nan
                     for j in range(n_primary)], index=result.var_names[:n_primary])
    assert summary["map_genes"] == list(pcc.dropna().sort_values(ascending=False).index[:3])
    assert summary["map_genes"] != list(result.var_names[:3])  # not simply the first primary genes
    png = out / "maps" / "C5.png"
    first, longest = _blank_rows(png)
    height = Image.open(png).height
    assert first <= 0.03 * height and longest <= 0.04 * height, (first, longest, height)  # main: a 7% band on top
    # named markers
    named = tmp_path / "named"
    args = ["predict", "--checkpoint", str(champion), "--input", str(her2st_dir), "--sections", "C5"]
    assert main([*args, "--out", str(named), "--genes", "ERBB2,GRB7"]) == 0
    assert json.loads(capsys.readouterr().out)["map_genes"] == ["ERBB2", "GRB7"]
    assert main([*args, "--out", str(tmp_path / "bad"), "--genes", "erbb2"]) == 2
    assert "--genes: erbb2 (did you mean ERBB2?): not among the model's" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- item 10: the served pyfunc
@pytest.mark.reliability(kind="use", case="the champion's pyfunc model: an empty batch, two real patches, and "
                         "`mlflow models serve --env-manager local` on 127.0.0.1 answering a REST /invocations call",
                         outcome="(0, n_genes) for the empty batch; a DataFrame with the model's gene names as columns "
                         "(also in the signature); the REST answer's records are keyed by gene name")
def test_the_served_champion_answers_with_gene_names(champion: Path, demo_store: Path, tmp_path: Path) -> None:
    import mlflow

    from agl.data.store import open_store
    from agl.tracking.pyfunc import save_pyfunc
    from servers import free_port

    genes = pd.read_parquet(champion / "genes.parquet")["gene"].astype(str).tolist()
    patches = np.asarray(open_store(demo_store).patches[:2])
    folder = save_pyfunc(champion, tmp_path / "model", patches)
    model = mlflow.pyfunc.load_model(str(folder))
    assert model.metadata.signature.outputs.input_names() == genes
    empty = model.predict(np.zeros((0, *patches.shape[1:]), dtype=np.uint8))
    assert isinstance(empty, pd.DataFrame) and empty.shape == (0, len(genes)) and list(empty.columns) == genes
    local = model.predict(patches)
    assert local.shape == (2, len(genes)) and list(local.columns) == genes and np.isfinite(local.to_numpy()).all()
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", str(folder),
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              # the venv's bin/ first: mlflow starts `uvicorn` by name
                              env={**os.environ, "PYTHONPATH": str(REPO),
                                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": patches.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers, by our own process group id
        server.wait(timeout=30)
    records = answer["predictions"]
    assert len(records) == 2 and list(records[0]) == genes
    assert np.allclose([records[1][g] for g in genes[:50]], local.iloc[1, :50].to_numpy(), atol=1e-5)


# --------------------------------------------------------------------------- item 14: the runs page
@pytest.mark.reliability(kind="use", case="agl tune's summary and the MLflow UI link of a sweep's experiment "
                         "(SQLite tracking of a real run)",
                         outcome="the summary gives `mlflow server ...` and the runs page "
                         "http://127.0.0.1:5000/#/experiments/ID/runs?workflowType=machine_learning of the experiment "
                         "that holds the run")
def test_the_tune_summary_links_the_runs_page(champion: Path, demo_store: Path, tmp_path: Path) -> None:
    from agl.distributed.commands import ui_hint
    from agl.tracking import MlflowTracker

    uri, run_id = register(champion, tmp_path / "sweep", demo_store)
    experiment_id = MlflowTracker(uri).client.get_run(run_id).info.experiment_id
    text = ui_hint(uri, experiment_id)
    assert f"mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri {uri}" in text
    assert f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning" in text
    served = "http://127.0.0.1:8080"
    assert f"{served}/#/experiments/{experiment_id}/runs?workflowType=machine_learning" in ui_hint(served, experiment_id)


# --------------------------------------------------------------------------- issue 27: weights-only model, host device
def _folder_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_the_registered_model_and_run_checkpoint_hold_no_optimiser_state(champion: Path, demo_store: Path,
                                                                          tmp_path: Path) -> None:
    """The MLflow artifacts serve predictions (best weights + config + gene set): no optimiser state, no
    last-epoch weights; the same predictions as the full checkpoint; a clear error if one is used to resume."""
    import mlflow
    import torch

    from agl.data.store import open_store
    from agl.errors import CheckpointError
    from agl.tracking import MlflowTracker
    from agl.training import checkpoint as ckpt
    from agl.training.inference import Predictor

    root = tmp_path / "sweep"
    uri, run_id = register(champion, root, demo_store)
    client = MlflowTracker(uri).client
    local = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    served = {"best.safetensors", "config.json", "genes.parquet", "state.json", "store.json"}
    # the run's checkpoint/ beside its record files; the model's folder carries the record too (kilobytes)
    record = {name for name in runs.RECORD_FILES if (champion / name).is_file()}
    assert "result.json" in record
    expected = {"checkpoint": served, "model/artifacts/checkpoint": served | record}
    for name, files in expected.items():
        folder = local / name
        assert set(_folder_files(folder)) == files, folder
        assert json.loads((folder / "state.json").read_text())["weights_only"] is True
        assert "optimizer" not in json.loads((folder / "state.json").read_text())
    full = sum(size for name, size in _folder_files(champion).items() if name.endswith(".safetensors"))
    assert (local / "checkpoint" / "best.safetensors").stat().st_size < full / 2  # 1 of the 4 tensor files' worth
    patches = np.asarray(open_store(demo_store).patches[:3])
    model = mlflow.pyfunc.load_model(str(local / "model"))  # as downloaded from the run
    reference, _gate, cfg, _genes = ckpt.load_model(champion)
    expected = Predictor(reference, cfg, "cpu").predict(patches, 8)
    np.testing.assert_allclose(model.predict(patches, params={"device": "cpu"}).to_numpy(), expected, atol=1e-6)
    with pytest.raises(CheckpointError, match="cannot resume training") as err:
        ckpt.restore(local / "checkpoint", trainer=None, cfg=cfg)
    assert "state.json" in str(err.value)


@pytest.mark.reliability(kind="use", case="a champion trained with device 'cuda' served by its pyfunc model on a host "
                         "without CUDA, with no device parameter",
                         outcome="predicts on the CPU with a warning naming the training device; the same numbers as "
                         "params={'device': 'cpu'}")
def test_a_cuda_champion_predicts_on_a_host_without_cuda(champion: Path, demo_store: Path, tmp_path: Path,
                                                       monkeypatch, caplog) -> None:
    import mlflow
    import torch

    from agl.data.store import open_store
    from agl.tracking.pyfunc import save_pyfunc

    cuda = tmp_path / "cuda-champion"
    shutil.copytree(champion, cuda)
    config = json.loads((cuda / "config.json").read_text())
    (cuda / "config.json").write_text(json.dumps({**config, "device": "cuda"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this host: no CUDA, whatever the machine has
    patches = np.asarray(open_store(demo_store).patches[:2])
    model = mlflow.pyfunc.load_model(str(save_pyfunc(cuda, tmp_path / "model")))
    with caplog.at_level(logging.WARNING, logger="agl.tracking.pyfunc"):
        default = model.predict(patches)   # raised "cuda requested but CUDA is not available" before
    assert any("trained with device 'cuda'" in r.getMessage() and "CPU" in r.getMessage() for r in caplog.records)
    on_cpu = model.predict(patches, params={"device": "cpu"})
    np.testing.assert_allclose(default.to_numpy(), on_cpu.to_numpy(), atol=1e-6)
