"""The MLflow tracker: :class:`agl.tracking.base.Tracker` over an :class:`mlflow.MlflowClient`.

What a user sees in the MLflow UI:

- experiments tagged ``mlflow.experimentKind = custom_model_development`` (MLflow 3.17's UI opens
  an experiment by its sidebar's GenAI / model-training switch instead, so ``agl tune`` links
  ``#/experiments/<id>/runs?workflowType=machine_learning``: docs/distributed.md);
- a run per trial named like ``dkgsb-k1000-92df`` (method, k where the method uses it, trial
  id), its params, per-epoch metrics with step = epoch (1-based, as in the plots and
  result.json), fold metrics with step = folds done, and at the end its run record:
  ``gene_set`` as a table the UI renders (gene, role, prior rank, final weight, selected),
  ``gene_set.csv``, the k plot, ``result.json``, the checkpoint under ``checkpoint/``, tags
  ``gene_set_sha256``, ``n_selected``, ``first_genes``; the store and split as its dataset input;
- a trial stopped early by the scheduler ends FINISHED with tag ``agl.stopped_early = true``
  (the UI draws KILLED with the same red icon as FAILED);
- the champion as a pyfunc model (agl.tracking.pyfunc: models-from-code, safetensors weights,
  signature and input example), registered with alias ``champion``, so
  ``mlflow.pyfunc.load_model("models:/agl-model@champion")`` predicts.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from agl.errors import CheckpointError, ConfigError
from agl.tracking.base import (CHAMPION, DEFAULT_MODEL_NAME, FAILED, FINISHED, RECORD_TAG, RUNNING, STOPPED,
                               DatasetRef, RunView, scalar_metrics)

log = logging.getLogger(__name__)

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
STOPPED_TAG = "agl.stopped_early"
ARTIFACT_CHECKPOINT = "checkpoint"
ARTIFACT_MODEL = "model"
GENE_TABLE_ARTIFACT = "gene_set.json"     # mlflow.log_table: the UI's artifact view renders it as a table
MLFLOW_STATUS = {FINISHED: "FINISHED", FAILED: "FAILED", STOPPED: "FINISHED", RUNNING: "RUNNING"}


class TrackingUnavailable(ConfigError):
    """The MLflow tracking server cannot be reached (or refused the request)."""


def default_tracking_uri(out: str | Path) -> str:
    """``sqlite:///<out>/mlflow.db`` (file stores need MLFLOW_ALLOW_FILE_STORE; SQLite does not)."""
    return f"sqlite:///{(Path(out).resolve() / 'mlflow.db')}"


def check_tracking_uri(uri: str) -> str:
    """Refuse the file store (needs MLFLOW_ALLOW_FILE_STORE in MLflow 3) with a clear message."""
    if uri.startswith("file:") or (not uri.startswith(("sqlite:", "http:", "https:", "postgresql", "mysql", "databricks"))
                                   and "://" not in uri):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise ConfigError("--tracking-uri", f"{uri!r} is an MLflow file store, which MLflow 3 disables; "
                              f"use sqlite:///path/mlflow.db or an http:// tracking server")
    return uri


def sqlite_database(uri: str) -> Path | None:
    """The database file a ``sqlite:`` URI names (None for other URIs and in-memory SQLite)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return None if not database or database == ":memory:" else Path(database)


def check_database(uri: str, must_exist: bool) -> str:
    """Refuse a SQLite URI whose database is missing (``must_exist``: commands that only read it) or whose
    folder is missing (any command): MLflow would create both, so a typo would give an empty new database."""
    db = sqlite_database(uri)
    if db is None:
        return uri
    if must_exist and not db.is_file():
        raise ConfigError("--tracking-uri", f"the MLflow database {db} does not exist ({uri}); give the mlflow.db "
                                            f"of the sweep (sqlite:///OUT/mlflow.db, OUT being `agl tune --out`)")
    if not db.parent.is_dir():
        raise ConfigError("--tracking-uri", f"the folder {db.parent} of the MLflow database {db} does not exist "
                                            f"({uri}); create it or fix the path")
    return uri


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


# where a local MLflow SQLite database records artifact locations (MLflow 3)
_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("model_versions", "source"),
                     ("model_versions", "storage_location"), ("logged_models", "artifact_location"))


def relocate_sqlite(db: Path, old_root: Path, new_root: Path) -> int:
    """Point every artifact location under ``old_root`` in the SQLite backend ``db`` at ``new_root``
    (a sweep folder moved or copied with its mlflow.db and mlartifacts/); returns the rows changed.

    MLflow records absolute artifact locations and has no API to change them; this rewrites
    only the prefix, in one transaction, in the database inside the moved folder."""
    import sqlite3

    changed = 0
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for old, new in ((old_root.as_uri() + "/", new_root.as_uri() + "/"), (f"{old_root}/", f"{new_root}/")):
            for table, column in _LOCATION_COLUMNS:
                if table in tables:
                    changed += conn.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                        (new, len(old) + 1, len(old), old)).rowcount
    return changed


def _artifact_location(source: str, tracker: "MlflowTracker") -> str:
    """Where ``source`` (``runs:/<id>/model`` or a URI) lies on disk or on the server, for messages."""
    if source.startswith("runs:/"):
        run_id, _, path = source[len("runs:/"):].partition("/")
        try:
            return f"{tracker.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"
        except Exception:  # the message still names the runs:/ URI
            return source
    return source


class MlflowTracker:
    """MLflow behind the tracking interface (no global MLflow state touched)."""

    def __init__(self, uri: str, must_exist: bool = False):
        """``must_exist``: a SQLite database must be there already (reading commands never create one)."""
        self.uri = check_database(check_tracking_uri(uri), must_exist)
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:  # MLflow clients hold sessions: rebuild after unpickling
        return {"uri": self.uri, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    # -- writing -------------------------------------------------------------------------------
    def experiment(self, name: str, artifact_root: str | Path | None = None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
                self.client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
            return exp.experiment_id
        location = None
        if artifact_root is not None and not self.uri.startswith(("http://", "https://", "databricks")):
            location = (str(artifact_root) if "://" in str(artifact_root)  # a bucket (s3://...): as given
                        else Path(artifact_root).resolve().as_uri())  # else MLflow would use ./mlruns of the CWD
        return self.client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))

    def _params(self, run_id: str, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(str(k), json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in values.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=params[start:start + 100])

    def _dataset(self, run_id: str, dataset: DatasetRef | None) -> None:
        if dataset is None:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        entity = Dataset(name=dataset.name, digest=dataset.digest, source_type="local",
                         source=json.dumps({"uri": dataset.source}), profile=json.dumps(dataset.profile))
        self.client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context",
                                                                                      "training")])])

    def start_sweep(self, experiment_id: str, name: str, params: Mapping[str, Any],
                    tags: Mapping[str, str] | None = None, files: Iterable[Path] = (),
                    dataset: DatasetRef | None = None) -> str:
        run_id = self.client.create_run(experiment_id, run_name=name,
                                        tags={"agl.kind": "sweep", **(tags or {})}).info.run_id
        self._params(run_id, params)
        self._dataset(run_id, dataset)
        for path in files:
            self.client.log_artifact(run_id, str(path))
        return run_id

    def start_trial(self, experiment_id: str, parent_run_id: str | None, trial_id: str, name: str,
                    params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
                    dataset: DatasetRef | None = None) -> str:
        base = {"trial_id": trial_id, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        run_id = self.client.create_run(experiment_id, run_name=name, tags={**base, **(tags or {})}).info.run_id
        self._params(run_id, params)
        self._dataset(run_id, dataset)
        return run_id

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, int(step)) for k, v in scalar_metrics(metrics).items()]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def log_record(self, run_id: str, folder: Path) -> dict[str, Any]:
        """The run record of ``folder`` (agl.runs): gene-set table, files, checkpoint, final metrics, tags."""
        from agl.runs import RECORD_FILES, read_gene_table, read_record
        from agl.training.checkpoint import CHECKPOINT_FILES, export_weights

        folder = Path(folder)
        record = read_record(folder) or {}
        table = read_gene_table(folder)
        if table is not None:
            self.client.log_table(run_id, data=table, artifact_file=GENE_TABLE_ARTIFACT)
        for name in RECORD_FILES:
            if (folder / name).is_file():
                self.client.log_artifact(run_id, str(folder / name))
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / ARTIFACT_CHECKPOINT
            shutil.copytree(folder, ckpt, ignore=shutil.ignore_patterns(*RECORD_FILES, *CHECKPOINT_FILES, ".*"))
            if (folder / "state.json").is_file():  # the run's weights for serving; resuming reads Tune's checkpoint
                export_weights(folder, ckpt)
            if any(ckpt.iterdir()):
                self.client.log_artifacts(run_id, str(ckpt), ARTIFACT_CHECKPOINT)
        metrics = record.get("metrics", {})
        self.log_metrics(run_id, metrics, int(metrics.get("best_epoch", metrics.get("folds_done", 0)) or 0))
        if "gene_set_sha256" in record:
            self.client.set_tag(run_id, "gene_set_sha256", record["gene_set_sha256"])
            self.client.set_tag(run_id, "n_selected", str(record.get("n_selected", "")))
            self.client.set_tag(run_id, "first_genes", ", ".join(record.get("first_genes", []))[:4000] or "-")
        self.client.set_tag(run_id, RECORD_TAG, "true")
        return record

    def end_trial(self, run_id: str, folder: Path | None, status: str | None = FINISHED,
                  tags: Mapping[str, str] | None = None) -> None:
        if folder is not None:
            self.log_record(run_id, folder)
        for key, value in (tags or {}).items():
            self.client.set_tag(run_id, key, str(value))
        if status == STOPPED:
            self.client.set_tag(run_id, STOPPED_TAG, "true")
        if status is not None:
            self.client.set_terminated(run_id, MLFLOW_STATUS[status])

    def end_sweep(self, run_id: str, files: Iterable[Path] = (), metrics: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None, status: str = FINISHED) -> None:
        self.log_metrics(run_id, metrics or {}, 0)
        for key, value in (tags or {}).items():
            self.client.set_tag(run_id, key, str(value))
        for path in files:
            if Path(path).is_file():
                self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, MLFLOW_STATUS[status])

    def log_table(self, run_id: str, table: Any, artifact_file: str, files: Iterable[Path] = ()) -> None:
        self.client.log_table(run_id, data=table, artifact_file=artifact_file)
        for path in files:
            if Path(path).is_file():
                self.client.log_artifact(run_id, str(path))

    # -- the model registry ----------------------------------------------------------------------
    def register_model(self, run_id: str, folder: Path, model_name: str = DEFAULT_MODEL_NAME,
                       alias: str = CHAMPION, input_example: np.ndarray | None = None) -> str:
        """Log ``folder`` as the pyfunc model ``model/`` of ``run_id``, register it, point ``alias`` at it."""
        from mlflow.exceptions import MlflowException

        from agl.tracking.pyfunc import save_pyfunc

        with tempfile.TemporaryDirectory() as tmp:
            save_pyfunc(Path(folder), Path(tmp) / ARTIFACT_MODEL, input_example)
            self.client.log_artifacts(run_id, str(Path(tmp) / ARTIFACT_MODEL), ARTIFACT_MODEL)
        try:
            self.client.create_registered_model(model_name, description="agl models (pyfunc; safetensors checkpoint)")
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(getattr(err, "error_code", "")) + str(err):
                raise
        run = self.client.get_run(run_id)
        source = f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_MODEL}"
        version = self.client.create_model_version(model_name, source=source, run_id=run_id,
                                                   tags={"gene_set_sha256": run.data.tags.get("gene_set_sha256", "")})
        self.client.set_registered_model_alias(model_name, alias, version.version)
        log.info("registered %s version %s (run %s) with alias %r", model_name, version.version, run_id, alias)
        return str(version.version)

    def load_pyfunc(self, model_name: str = DEFAULT_MODEL_NAME, alias: str = CHAMPION,
                    dst: Path | None = None) -> Any:
        """The pyfunc model ``models:/<model_name>@<alias>`` of this tracker, loaded by ``mlflow.pyfunc``.

        The version's files are downloaded through this tracker's URI and loaded from there, so no
        global MLflow URI is set (``mlflow.set_registry_uri`` would also leak into the environment)."""
        import mlflow
        from mlflow.exceptions import MlflowException

        check_reachable(self.uri)
        try:
            version = self.client.get_model_version_by_alias(model_name, alias)
        except MlflowException as err:
            raise CheckpointError(f"{self.uri} models:/{model_name}@{alias}",
                                  f"no such registered model version ({getattr(err, 'message', err)})") from None
        dst = Path(dst or tempfile.mkdtemp(prefix="agl-champion-"))
        dst.mkdir(parents=True, exist_ok=True)
        where = f"{self.uri} models:/{model_name}@{alias} (version {version.version}, run {version.run_id})"
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dst),
                                                        tracking_uri=self.uri)
        except (MlflowException, OSError) as err:  # the artifact folder was moved or deleted since logging
            reason = [line for line in str(err).splitlines() if line.strip()][-1:] or [type(err).__name__]
            raise CheckpointError(where, f"its model files are missing at {_artifact_location(version.source, self)}"
                                         f" ({reason[0][:200]}). Was the sweep folder moved? `agl tune-sync --out "
                                         f"NEW_FOLDER` points its mlflow.db at the new place") from None
        try:
            return mlflow.pyfunc.load_model(local)
        except (MlflowException, OSError) as err:
            raise CheckpointError(where, f"cannot load the model downloaded from {version.source} "
                                         f"({type(err).__name__}: {str(err)[:300]})") from None

    def fetch_champion(self, model_name: str = DEFAULT_MODEL_NAME, alias: str = CHAMPION,
                       dst: Path | None = None) -> Path:
        """The checkpoint folder inside the champion's pyfunc model, loaded as ``mlflow.pyfunc`` loads it."""
        return Path(self.load_pyfunc(model_name, alias, dst).unwrap_python_model().checkpoint)

    # -- reading -----------------------------------------------------------------------------------
    @staticmethod
    def _view(run: Any) -> RunView:
        tags = dict(run.data.tags)
        status = run.info.status
        if status == "FINISHED" and tags.get(STOPPED_TAG) == "true":
            status = STOPPED
        elif status == "KILLED":  # runs written by earlier agl versions
            status = STOPPED
        elif status == "SCHEDULED":
            status = RUNNING
        return RunView(run.info.run_id, status, tags)

    def get_run(self, run_id: str) -> RunView:
        return self._view(self.client.get_run(run_id))

    def trial_runs(self, experiment_id: str, parent_run_id: str) -> dict[str, RunView]:
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                       max_results=10000, order_by=["attributes.start_time DESC"])
        return {r.data.tags.get("trial_id", ""): self._view(r) for r in runs}  # later (older) entries win

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        return {int(m.step) for m in self.client.get_metric_history(run_id, key)}
