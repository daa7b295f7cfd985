"""MLflow tracking of sweeps and runs: a parent run per sweep, a child run per trial.

All MLflow writes happen in the Tune *driver* (:class:`MlflowSweepCallback`), never in
trial processes: one writer keeps a SQLite backend safe, and trials on other nodes of a
cluster need no access to the tracking store. (This replaces Ray's
``MLflowLoggerCallback``; ``setup_mlflow`` is not used, so nothing logs twice.)

Each trial's final checkpoint folder carries its run artifacts, written by the trial
with :func:`write_run_artifacts`:

- ``selected_genes.csv``: the selected auxiliary genes (name, prior_rank, weight);
  the sha256 of the sorted names is the ``gene_set_sha256`` tag;
- ``k_trajectory.png``: k (kept auxiliary genes) and validation PCC per epoch;
- ``result.json``: final metrics and the history.

The checkpoint itself (safetensors + JSON, loadable without unpickling) is logged under
the artifact path ``checkpoint``; the best trial's checkpoint is registered as a model
version with alias ``champion``, which :mod:`agl.predict` pulls.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from agl.errors import CheckpointError, ConfigError
from agl.fileio import atomic_savefig, atomic_write_json, atomic_write_text, jsonable

log = logging.getLogger(__name__)

ARTIFACT_CHECKPOINT = "checkpoint"
GENES_CSV = "selected_genes.csv"
K_PLOT = "k_trajectory.png"
RESULT_JSON = "result.json"
RUN_FILES = (GENES_CSV, K_PLOT, RESULT_JSON)
CHAMPION = "champion"
DEFAULT_EXPERIMENT = "agl-sweep"
DEFAULT_MODEL_NAME = "agl-model"
TEST_METRICS = ("pcc", "scc", "mse")


def default_tracking_uri(out: str | Path) -> str:
    """``sqlite:///<out>/mlflow.db`` (file stores need MLFLOW_ALLOW_FILE_STORE; SQLite does not)."""
    return f"sqlite:///{(Path(out).resolve() / 'mlflow.db')}"


def client(tracking_uri: str):
    """An :class:`mlflow.MlflowClient` for one tracking URI (no global state touched)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def get_or_create_experiment(tracking_uri: str, name: str, artifact_root: str | Path | None = None) -> str:
    """Experiment id by name; new experiments on a local backend keep artifacts beside it."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_root is not None and not tracking_uri.startswith(("http://", "https://", "databricks")):
        location = Path(artifact_root).resolve().as_uri()  # else MLflow would use ./mlruns of the CWD
    return c.create_experiment(name, artifact_location=location)


# --------------------------------------------------------------------------- run artifacts
def gene_set_hash(names: Iterable[str]) -> str:
    """sha256 of the sorted gene names, one per line: identifies a selected set regardless of order."""
    return hashlib.sha256("\n".join(sorted(map(str, names))).encode()).hexdigest()


def selected_genes_table(result: Any, genes: pd.DataFrame, prior_rank: np.ndarray, n_primary: int) -> pd.DataFrame:
    """The selected auxiliary genes of a FitResult: name, prior_rank, weight (best prior rank first)."""
    aux = genes["gene"].iloc[n_primary:].astype(str).to_numpy()
    weights = np.asarray(result.weights, dtype=np.float64).reshape(-1)
    ranks = np.asarray(prior_rank, dtype=np.float64).reshape(-1)
    idx = np.asarray(result.selected, dtype=np.int64).reshape(-1)
    if idx.dtype == bool or (len(idx) == len(aux) and set(np.unique(idx)) <= {0, 1} and len(aux) > 2):
        idx = np.flatnonzero(idx)
    table = pd.DataFrame({
        "name": aux[idx],
        "prior_rank": ranks[idx] if len(ranks) == len(aux) else np.nan,
        "weight": weights[idx] if len(weights) == len(aux) else np.nan,
    })
    return table.sort_values(["prior_rank", "name"], kind="stable").reset_index(drop=True)


def final_metrics(result: Any) -> dict[str, float]:
    """Scalar end-of-run metrics of a FitResult (test_* from the best epoch's model)."""
    out = {"best_val_pcc": float(result.best_val_pcc), "val_pcc": float(result.best_val_pcc),
           "best_epoch": float(result.best_epoch), "epochs_run": float(result.epochs_run),
           "final_k": float(result.k), "n_selected": float(len(np.atleast_1d(result.selected))),
           "wall_time_s": float(result.wall_time_s)}
    for key in TEST_METRICS:
        value = result.test.get(key) if isinstance(result.test, Mapping) else None
        if isinstance(value, (int, float, np.floating, np.integer)):
            out[f"test_{key}"] = float(value)
    return out


def plot_k_trajectory(history: list[Mapping[str, float]], path: str | Path, title: str = "") -> None:
    """PNG of k (kept auxiliary genes) and validation PCC per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(h["epoch"]) + 1 for h in history]
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
    ax.plot(epochs, [h.get("k", np.nan) for h in history], "o-", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("k (auxiliary genes kept)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h.get("val_pcc", np.nan) for h in history], "s--", color="tab:red")
    ax2.set_ylabel("validation PCC", color="tab:red")
    ax.set_title(title or "k trajectory")
    fig.tight_layout()
    try:
        atomic_savefig(fig, path, format="png")
    finally:
        plt.close(fig)


def write_run_artifacts(result: Any, genes: pd.DataFrame, prior_rank: np.ndarray, n_primary: int,
                        dest: str | Path, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write selected_genes.csv, k_trajectory.png and result.json into ``dest``; return the summary."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    table = selected_genes_table(result, genes, prior_rank, n_primary)
    atomic_write_text(dest / GENES_CSV, table.to_csv(index=False))
    plot_k_trajectory(result.history, dest / K_PLOT, title=f"{result.config.method}: k per epoch")
    summary = {
        "metrics": final_metrics(result),
        "gene_set_sha256": gene_set_hash(table["name"]),
        "n_selected": int(len(table)),
        "config": result.config.to_dict(),
        "history": jsonable(list(result.history)),
        **(dict(extra) if extra else {}),
    }
    atomic_write_json(dest / RESULT_JSON, summary, indent=1)
    return summary


def finalize_checkpoint(result: Any, data: Any, dest: str | Path) -> dict[str, Any]:
    """Copy fit's checkpoint folder to ``dest`` and add the run artifacts; return the summary."""
    from agl.selection.base import blend_ranks

    dest = Path(dest)
    if result.checkpoint_dir is not None:
        shutil.copytree(result.checkpoint_dir, dest, dirs_exist_ok=True)
    cfg = result.config
    n_aux = len(data.genes) - int(data.n_primary)
    prior = blend_ranks(data.prior_ranks, n_aux, cfg.prior, cfg.second_prior, cfg.prior_weight).numpy()
    return write_run_artifacts(result, data.genes, prior, int(data.n_primary), dest)


# --------------------------------------------------------------------------- logging helpers
def _params(values: Mapping[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(str(k), json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in values.items()]


def _metrics(values: Mapping[str, Any], step: int) -> list:
    """MLflow metrics for every finite scalar (NaN k/t for gates without a threshold are skipped)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = []
    for key, value in values.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            continue
        if math.isfinite(float(value)):
            out.append(Metric(str(key), float(value), now, int(step)))
    return out


def log_history(c: Any, run_id: str, history: Iterable[Mapping[str, Any]]) -> None:
    """Per-epoch metrics with step = epoch."""
    for row in history:
        metrics = _metrics({k: v for k, v in row.items() if k != "epoch"}, int(row.get("epoch", 0)))
        if metrics:
            c.log_batch(run_id, metrics=metrics)


def log_run_folder(c: Any, run_id: str, folder: str | Path) -> dict[str, Any]:
    """Log a finished run's folder: artifacts at the root, the checkpoint under ``checkpoint/``; tags."""
    folder = Path(folder)
    summary = json.loads((folder / RESULT_JSON).read_text()) if (folder / RESULT_JSON).is_file() else {}
    for name in RUN_FILES:
        if (folder / name).is_file():
            c.log_artifact(run_id, str(folder / name))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / ARTIFACT_CHECKPOINT
        shutil.copytree(folder, ckpt, ignore=shutil.ignore_patterns(*RUN_FILES, ".*"))
        c.log_artifacts(run_id, str(ckpt), ARTIFACT_CHECKPOINT)
    if summary.get("metrics"):
        final = {k: v for k, v in summary["metrics"].items() if k != "val_pcc"}  # val_pcc is the per-epoch series
        c.log_batch(run_id, metrics=_metrics(final, int(summary["metrics"].get("best_epoch", 0))))
    if "gene_set_sha256" in summary:
        c.set_tag(run_id, "gene_set_sha256", summary["gene_set_sha256"])
        c.set_tag(run_id, "n_selected", str(summary.get("n_selected", "")))
    c.set_tag(run_id, "has_checkpoint", "true")
    return summary


def log_single_run(tracking_uri: str, experiment: str, cfg: Any, history: list[Mapping[str, Any]],
                   folder: str | Path, run_name: str, tags: Mapping[str, str] | None = None,
                   artifact_root: str | Path | None = None) -> str:
    """One MLflow run for a finished ``launch/train.py`` / ``agl train`` run; returns its run id."""
    c = client(tracking_uri)
    exp_id = get_or_create_experiment(tracking_uri, experiment, artifact_root)
    run = c.create_run(exp_id, run_name=run_name, tags={"agl.kind": "train", **(tags or {})})
    c.log_batch(run.info.run_id, params=_params(cfg.to_dict()))
    log_history(c, run.info.run_id, history)
    log_run_folder(c, run.info.run_id, folder)
    c.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


# --------------------------------------------------------------------------- model registry
def register_champion(tracking_uri: str, run_id: str, model_name: str = DEFAULT_MODEL_NAME,
                      alias: str = CHAMPION) -> str:
    """Register ``run_id``'s checkpoint artifacts as a new model version and point ``alias`` at it."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        c.create_registered_model(model_name, description="agl checkpoints (safetensors + JSON), see agl.predict")
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(getattr(err, "error_code", "")) + str(err):
            raise
    run = c.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_CHECKPOINT}"
    version = c.create_model_version(model_name, source=source, run_id=run_id,
                                     tags={"gene_set_sha256": run.data.tags.get("gene_set_sha256", "")})
    c.set_registered_model_alias(model_name, alias, version.version)
    log.info("registered %s version %s (run %s) with alias %r", model_name, version.version, run_id, alias)
    return str(version.version)


def download_model(tracking_uri: str, model_name: str = DEFAULT_MODEL_NAME, alias: str = CHAMPION,
                   dst: str | Path | None = None) -> Path:
    """Download the checkpoint folder of ``model_name@alias``; raise CheckpointError if none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    check_reachable(check_tracking_uri(tracking_uri))
    c = client(tracking_uri)
    try:
        version = c.get_model_version_by_alias(model_name, alias)
    except MlflowException as err:
        raise CheckpointError(f"{tracking_uri} models:/{model_name}@{alias}",
                              f"no such registered model version ({err.message if hasattr(err, 'message') else err})") from None
    dst = Path(dst or tempfile.mkdtemp(prefix="agl-champion-"))
    path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=ARTIFACT_CHECKPOINT,
                                               dst_path=str(dst), tracking_uri=tracking_uri)
    return Path(path)


def start_parent_run(tracking_uri: str, experiment: str, name: str, params: Mapping[str, Any],
                     artifact_root: str | Path | None = None) -> tuple[str, str]:
    """Create the sweep's parent run; returns (experiment_id, run_id)."""
    exp_id = get_or_create_experiment(tracking_uri, experiment, artifact_root)
    c = client(tracking_uri)
    run = c.create_run(exp_id, run_name=name, tags={"agl.kind": "sweep"})
    c.log_batch(run.info.run_id, params=_params(params))
    return exp_id, run.info.run_id


def child_run_objects(tracking_uri: str, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """trial id -> MLflow Run (info, params, tags) of a sweep's child runs (the oldest run per trial)."""
    c = client(tracking_uri)
    runs = c.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                         max_results=10000, order_by=["attributes.start_time DESC"])
    return {r.data.tags.get("trial_id", ""): r for r in runs}  # later (older) entries win


def child_runs(tracking_uri: str, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """trial id -> MLflow run id of a sweep's child runs."""
    return {k: r.info.run_id for k, r in child_run_objects(tracking_uri, experiment_id, parent_run_id).items()}


def finish_parent_run(tracking_uri: str, run_id: str, files: Iterable[str | Path], status: str = "FINISHED",
                      metrics: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None) -> None:
    """Attach the sweep's table/plot (and the best trial's metrics/tags) to the parent run and close it."""
    c = client(tracking_uri)
    if metrics:
        c.log_batch(run_id, metrics=_metrics(metrics, 0))
    for key, value in (tags or {}).items():
        c.set_tag(run_id, key, str(value))
    for path in files:
        if Path(path).is_file():
            c.log_artifact(run_id, str(path))
    c.set_terminated(run_id, status)


class TrackingUnavailable(ConfigError):
    """The MLflow tracking server cannot be reached (or refused the request)."""


def check_reachable(uri: str, timeout_s: float = 5.0) -> str:
    """Fail fast, naming the URI, when an http(s) tracking server does not answer its /health check.

    Without this, MLflow's own retries make a mistyped or stopped server look like a hang.
    """
    if not uri.startswith(("http://", "https://")):
        return uri
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as resp:
            resp.read(64)
    except (OSError, urllib.error.URLError) as err:  # refused, timed out, DNS, HTTP 5xx
        raise TrackingUnavailable("--tracking-uri", f"MLflow tracking server {uri} is unreachable "
                                                    f"({getattr(err, 'reason', err)}); start it "
                                                    f"(mlflow server --host 127.0.0.1 ...) or fix the URI") from None
    return uri


def quick_failure_env() -> None:
    """Short MLflow HTTP retries for a sweep driver (unless the user set them): an outage should be
    noticed in seconds and handled (results kept, synced later), not retried for minutes per call."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def check_tracking_uri(uri: str) -> str:
    """Refuse the file store (needs MLFLOW_ALLOW_FILE_STORE in MLflow 3) with a clear message."""
    if uri.startswith("file:") or (not uri.startswith(("sqlite:", "http:", "https:", "postgresql", "mysql", "databricks"))
                                   and "://" not in uri):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise ConfigError("--tracking-uri", f"{uri!r} is an MLflow file store, which MLflow 3 disables; "
                              f"use sqlite:///path/mlflow.db or an http:// tracking server")
    return uri
