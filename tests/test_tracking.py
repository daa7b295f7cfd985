"""Tracking: the run record of a real fit, the sync against an in-memory tracker (and one that is
down), and a cross-validated sweep logged to a real `mlflow server` checked through its REST API:
every child run (stopped or finished) has its gene set table, final k and fold metrics, and the
champion loads with mlflow.pyfunc.load_model and predicts."""
from __future__ import annotations

import hashlib
import json
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agl import runs
from agl.errors import ConfigError
from agl.tracking import (FINISHED, STOPPED, InMemoryTracker, MlflowTracker, check_tracking_uri,
                          default_tracking_uri)
from servers import MlflowServer, free_port  # noqa: F401  (free_port: used by other test modules)
from trainkit import cv_space

SPLIT = "kfold-s0-f0"


def test_gene_set_hash_ignores_order() -> None:
    assert runs.gene_set_hash(["B", "A"]) == runs.gene_set_hash(["A", "B"])
    assert runs.gene_set_hash(["A"]) != runs.gene_set_hash(["A", "B"])
    assert runs.gene_set_hash([]) == hashlib.sha256(b"").hexdigest()


def test_file_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file store"):
        check_tracking_uri(str(tmp_path / "mlruns"))
    assert check_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


@pytest.fixture(scope="module")
def record(demo_store: Path, tmp_path_factory) -> tuple[Path, object]:
    from agl.training.bundles import make_bundle
    from agl.training.loop import TrainConfig, fit

    root = tmp_path_factory.mktemp("record")
    cfg = TrainConfig.from_dict({"method": "topk", "k": 40, "epochs": 2, "trunk": [32]})
    data = make_bundle(demo_store, SPLIT, cfg)
    result = fit(cfg, data, out_dir=root / "run")
    runs.finalize_run(result, data, root / "final", split=SPLIT)
    return root / "final", data


def test_run_record_of_a_real_fit(record) -> None:
    folder, data = record
    summary = runs.read_record(folder)
    table = pd.read_csv(folder / runs.GENE_SET_CSV)
    assert list(table.columns) == runs.GENE_COLUMNS and len(table) == len(data.genes)
    assert list(table["gene"].iloc[:data.n_primary]) == list(data.genes["gene"].iloc[:data.n_primary])
    aux = data.genes.iloc[data.n_primary:].reset_index(drop=True)
    chosen = runs.selected_aux(table)
    # top-k by prior: exactly the 40 best-ranked auxiliary genes, prior ranks 1..40, weight 1
    assert len(chosen) == 40 == summary["n_selected"] == summary["metrics"]["final_k"]
    assert set(chosen["gene"]) == set(aux.sort_values("rank_hvg")["gene"].iloc[:40])
    assert sorted(chosen["prior_rank"]) == list(range(1, 41)) and np.allclose(chosen["final_weight"], 1.0)
    assert summary["gene_set_sha256"] == runs.gene_set_hash(chosen["gene"])
    assert summary["first_genes"] == list(chosen["gene"].iloc[:runs.FIRST_GENES])
    assert summary["schema_version"] == runs.SCHEMA_VERSION
    # epochs are 1-based everywhere: history rows, best_epoch
    assert [row["epoch"] for row in summary["history"]] == [1, 2] and summary["best_epoch"] in (1, 2)
    assert summary["metrics"]["best_epoch"] == summary["best_epoch"]
    assert (folder / runs.K_PLOT).read_bytes()[:4] == b"\x89PNG"
    assert {"test_pcc", "test_scc", "test_mse", "best_val_pcc"} <= set(summary["metrics"])
    from agl.training.checkpoint import load_model  # the folder is still a loadable checkpoint

    _, gate, cfg2, _ = load_model(folder)
    assert cfg2.k == 40 and gate.k() == 40


def test_a_record_of_another_schema_is_refused(tmp_path: Path) -> None:
    from agl.errors import DataError

    (tmp_path / runs.RESULT_JSON).write_text(json.dumps({"metrics": {}}))
    with pytest.raises(DataError, match="schema_version"):
        runs.read_record(tmp_path)


# --------------------------------------------------------------------------- sync, in memory
class _Checkpoint:
    def __init__(self, folder: Path):
        self.folder = folder

    @contextmanager
    def as_directory(self):
        yield str(self.folder)


def test_reconcile_against_an_in_memory_tracker(record) -> None:
    """The outage fallback's sync is written against the interface: it sends what is missing, once."""
    from agl.distributed.spaces import load_space
    from agl.distributed.sync import TrialView, reconcile

    folder, _ = record
    space = load_space("tiny")
    rows = [{"epoch": 0, "val_pcc": 0.1, "train_loss": 1.0}, {"epoch": 1, "val_pcc": 0.2, "train_loss": 0.9}]
    trials = [TrialView("t1", {"method": "topk", "k": 40}, rows, final=True, failed=False,
                        checkpoint=_Checkpoint(folder)),
              TrialView("t2", {"method": "dkgsb", "k": 12}, rows[:1], final=False, failed=False, checkpoint=None)]
    tracker = InMemoryTracker()
    exp = tracker.experiment("agl-sweep")
    parent = tracker.start_sweep(exp, "sweep", {"space": "tiny"})
    tracker.down = True
    with pytest.raises(ConnectionError):
        reconcile(tracker, exp, parent, trials, space, complete=True)
    tracker.down = False
    report = reconcile(tracker, exp, parent, trials, space, complete=True)
    assert report.created == 2 and report.folders_logged == 1 and report.epochs_logged == 3
    t1, t2 = (tracker.runs[report.runs[t]] for t in ("t1", "t2"))
    assert t1.name == "topk-k40-t1" and t2.name == "dkgsb-k12-t2"
    assert [s for s, _ in t1.metrics["val_pcc"]] == [1, 2]  # step = epoch, 1-based
    assert t1.status == FINISHED and t1.tags["gene_set_sha256"] == runs.read_record(folder)["gene_set_sha256"]
    assert t2.status == STOPPED  # stopped by the scheduler: not a failure
    again = reconcile(tracker, exp, parent, trials, space, complete=True)
    assert again.created == again.epochs_logged == again.folders_logged == again.closed == 0


def test_best_trial_respects_mode_min() -> None:
    from agl.distributed.results import best_trial
    from agl.distributed.spaces import parse_space

    raw = {"split": SPLIT, "metric": "val_loss", "direction": "min",
           "params": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2}}}
    space = parse_space(raw)
    table = pd.DataFrame([{"trial_id": "a", "status": "finished", "val_loss": 0.9},
                          {"trial_id": "b", "status": "finished", "val_loss": 0.3},
                          {"trial_id": "c", "status": "stopped", "val_loss": 0.1},  # not a finished trial
                          {"trial_id": "d", "status": "finished", "val_loss": 0.5}])
    assert best_trial(table, space)["trial_id"] == "b"
    assert best_trial(table, parse_space({**raw, "direction": "max"}))["trial_id"] == "a"


# --------------------------------------------------------------------------- against a real server
def rest(base: str, path: str, body: dict | None = None, **query) -> dict:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"{}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts), stopped by its process group id."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server.url
    finally:
        server.stop()


CV_SPACE = cv_space('tracking test sweep (2 leave-one-slide-out folds, 2 epochs; ASHA may stop the third trial)', trunk=32, start_with='  - {method: topk, k: 64}')


def test_sweep_logged_to_server(mlflow_server: str, ray_local, demo_store: Path, tmp_path: Path) -> None:
    import mlflow

    from agl.data.store import open_store
    from agl.distributed.tune import SweepOptions, run_sweep

    space_file = tmp_path / "cv.yaml"
    space_file.write_text(CV_SPACE)
    summary = run_sweep(SweepOptions(space=str(space_file), store=str(demo_store), out=str(tmp_path / "sweep"),
                                     tracking_uri=mlflow_server, experiment="agl-rest", max_concurrent=1))
    api = f"{mlflow_server}/api/2.0/mlflow"
    exp = rest(api, "/experiments/get-by-name", experiment_name="agl-rest")["experiment"]
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    runs_ = rest(api, "/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs_]
    parents = [r for r, t in zip(runs_, tags) if t.get("agl.kind") == "sweep"]
    children = [(r, t) for r, t in zip(runs_, tags) if t.get("mlflow.parentRunId") == summary.parent_run_id]
    assert len(parents) == 1 and len(children) == 3 + 1  # one child run per trial, and the refit
    parent_files = {f["path"] for f in rest(api, "/artifacts/list", run_id=parents[0]["info"]["run_id"])["files"]}
    assert {"cv.yaml", "trials.csv", "trials.png", "summary.md"} <= parent_files  # the space YAML too
    status = dict(zip(summary.table["trial_id"], summary.table["status"]))
    for run, tag in children:
        run_id, trial_id = run["info"]["run_id"], tag["trial_id"]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert {"method", "lr", "epochs", "trunk"} <= set(params)
        method = params["method"]
        name = run["info"]["run_name"]
        assert name.startswith(("refit-" if trial_id == "refit" else "") + method)
        assert ("-k" in name) == (method == "topk") and name.endswith(summary.best["trial_id"][-4:]
                                                                      if trial_id == "refit" else trial_id[-4:])
        # not shown as failed: a scheduler stop is FINISHED with agl.stopped_early
        assert run["info"]["status"] == "FINISHED"
        assert (tag.get("agl.stopped_early") == "true") == (status.get(trial_id) == "stopped")
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert "final_k" in metrics
        if trial_id != "refit":
            folds = rest(api, "/metrics/get-history", run_id=run_id, metric_key="fold_pcc")["metrics"]
            assert sorted(m["step"] for m in folds) == list(range(1, len(folds) + 1)) and folds
            # the s.e. needs two folds: a trial ASHA stops after its first fold logs none (NaN is not sent)
            assert "cv_pcc" in metrics and ("cv_pcc_se" in metrics) == (len(folds) >= 2)
        else:
            assert {"test_pcc", "best_val_pcc"} <= metrics
            history = rest(api, "/metrics/get-history", run_id=run_id, metric_key="best_epoch")["metrics"]
            assert history and 1 <= history[0]["value"] <= 2  # 1-based, as in result.json
        files = {f["path"] for f in rest(api, "/artifacts/list", run_id=run_id).get("files", [])}
        assert {"gene_set.csv", "gene_set.json", "k_trajectory.png", "result.json"} <= files
        # the rendered table (mlflow.log_table) and the tags agree with the record
        url = f"{mlflow_server}/get-artifact?" + urllib.parse.urlencode({"path": "gene_set.json", "run_id": run_id})
        with urllib.request.urlopen(url, timeout=30) as resp:
            logged = json.loads(resp.read())
        table = pd.DataFrame(logged["data"], columns=logged["columns"])
        assert runs.GENE_COLUMNS == list(table.columns)[:5]
        chosen = runs.selected_aux(table)
        assert tag["gene_set_sha256"] == runs.gene_set_hash(chosen["gene"])
        assert int(tag["n_selected"]) == len(chosen) and (method != "pgl" or len(chosen) == 0)
        assert tag["first_genes"] == (", ".join(chosen["gene"].iloc[:runs.FIRST_GENES]) or "-")
        inputs = rest(api, "/runs/get", run_id=run_id)["run"]["inputs"]["dataset_inputs"]
        assert inputs[0]["dataset"]["name"].endswith(":loso-B4")
    # the champion: the refit, a pyfunc model that mlflow itself loads from the registry and that predicts
    alias = rest(api, "/registered-models/alias", name="agl-model", alias="champion")["model_version"]
    assert alias["run_id"] == summary.champion["run_id"]
    mlflow.set_tracking_uri(mlflow_server)
    try:
        model = mlflow.pyfunc.load_model("models:/agl-model@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert model.metadata.signature is not None and model.metadata.saved_input_example_info is not None
    patches = np.asarray(open_store(demo_store).patches[:3])
    pred = model.predict(patches)
    genes = json.loads(model.metadata.metadata["genes"])
    assert pred.shape == (3, len(genes)) and list(pred.columns) == genes and np.isfinite(pred.to_numpy()).all()
    # agl predict's loader goes the same way and finds the checkpoint inside the model
    folder = MlflowTracker(mlflow_server).fetch_champion("agl-model", "champion", dst=tmp_path / "dl")
    assert (folder / "best.safetensors").is_file() and runs.read_record(folder)["refit_of"] == summary.best["trial_id"]
