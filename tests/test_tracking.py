"""MLflow tracking: run artifacts from a real fit, and a sweep logged to an `mlflow server`
checked through MLflow's own REST API (child runs, gene-set artifact + hash, champion alias)."""
from __future__ import annotations

import hashlib
import json
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agl.distributed import tracking
from agl.errors import ConfigError
from servers import MlflowServer, free_port  # noqa: F401  (free_port: used by other test modules)

SPLIT = "kfold-s0-f0"


def test_gene_set_hash_ignores_order() -> None:
    assert tracking.gene_set_hash(["B", "A"]) == tracking.gene_set_hash(["A", "B"])
    assert tracking.gene_set_hash(["A"]) != tracking.gene_set_hash(["A", "B"])
    assert tracking.gene_set_hash([]) == hashlib.sha256(b"").hexdigest()


def test_file_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file store"):
        tracking.check_tracking_uri(str(tmp_path / "mlruns"))
    assert tracking.check_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert tracking.default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_run_artifacts_of_a_real_fit(demo_store: Path, tmp_path: Path) -> None:
    from agl.training.bundles import make_bundle
    from agl.training.loop import TrainConfig, fit

    cfg = TrainConfig.from_dict({"method": "topk", "k": 40, "epochs": 2, "trunk": [32]})
    data = make_bundle(demo_store, SPLIT, cfg)
    result = fit(cfg, data, out_dir=tmp_path / "run")
    summary = tracking.finalize_checkpoint(result, data, tmp_path / "final")
    table = pd.read_csv(tmp_path / "final" / tracking.GENES_CSV)
    aux = data.genes.iloc[data.n_primary:].reset_index(drop=True)
    # top-k by prior: exactly the 40 best-ranked auxiliary genes, weight 1, sorted by prior rank
    assert len(table) == 40 == summary["n_selected"]
    assert set(table["name"]) == set(aux.sort_values("rank_hvg")["gene"].iloc[:40])
    assert np.all(np.diff(table["prior_rank"]) >= 0) and np.allclose(table["weight"], 1.0)
    assert summary["gene_set_sha256"] == tracking.gene_set_hash(table["name"])
    assert (tmp_path / "final" / tracking.K_PLOT).read_bytes()[:4] == b"\x89PNG"
    assert {"test_pcc", "test_scc", "test_mse", "best_val_pcc"} <= set(summary["metrics"])
    # the folder is still a loadable checkpoint
    from agl.training.checkpoint import load_model

    model, gate, cfg2, genes = load_model(tmp_path / "final")
    assert cfg2.k == 40 and gate.k() == 40


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


def test_sweep_logged_to_server(mlflow_server: str, ray_local, demo_store: Path, tmp_path: Path) -> None:
    from agl.distributed.tune import SweepOptions, run_sweep

    summary = run_sweep(SweepOptions(space="tiny", store=str(demo_store), out=str(tmp_path / "sweep"),
                                     num_samples=2, tracking_uri=mlflow_server, experiment="agl-rest"))
    api = f"{mlflow_server}/api/2.0/mlflow"
    exp = rest(api, "/experiments/get-by-name", experiment_name="agl-rest")["experiment"]
    runs = rest(api, "/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags) if t.get("agl.kind") == "sweep"]
    children = [(r, t) for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == summary.parent_run_id]
    assert len(parents) == 1 and len(children) == 2  # one child run per trial
    for run, tag in children:
        run_id = run["info"]["run_id"]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert {"method", "k", "lr", "epochs", "trunk"} <= set(params)
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"val_pcc", "train_loss", "test_pcc", "test_scc", "test_mse"} <= metrics
        history = rest(api, "/metrics/get-history", run_id=run_id, metric_key="val_pcc")["metrics"]
        assert sorted(m["step"] for m in history) == [0, 1]  # per-epoch metrics
        files = {f["path"] for f in rest(api, "/artifacts/list", run_id=run_id).get("files", [])}
        assert {"selected_genes.csv", "k_trajectory.png", "checkpoint"} <= files
        # the artifact's content matches the gene-set hash tag
        url = f"{mlflow_server}/get-artifact?" + urllib.parse.urlencode({"path": "selected_genes.csv", "run_id": run_id})
        with urllib.request.urlopen(url, timeout=30) as resp:
            table = pd.read_csv(resp)
        assert tag["gene_set_sha256"] == tracking.gene_set_hash(table["name"])
        assert len(table) == int(float(tag["n_selected"]))
    alias = rest(api, "/registered-models/alias", name="agl-model", alias="champion")["model_version"]
    assert alias["run_id"] == summary.best["mlflow_run_id"]
    assert alias["run_id"] in {r["info"]["run_id"] for r, _ in children}
    # predict's loader pulls the champion's checkpoint through the server
    folder = tracking.download_model(mlflow_server, "agl-model", "champion", dst=tmp_path / "dl")
    assert (folder / "best.safetensors").is_file() and (folder / "config.json").is_file()
