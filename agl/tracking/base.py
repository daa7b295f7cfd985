"""The tracking seam: what agl asks of an experiment tracker, whatever the backend.

A sweep is a parent run with one child run per trial (and one for the refit champion); a
single training run is a run without parent. The driver of a sweep is the only writer.
Statuses are agl's: ``RUNNING``, ``FINISHED``, ``FAILED`` and ``STOPPED`` (ended early by the
scheduler: not a failure; a backend shows it however its UI renders "not failed").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

import numpy as np

RUNNING, FINISHED, FAILED, STOPPED = "RUNNING", "FINISHED", "FAILED", "STOPPED"
TERMINAL = (FINISHED, FAILED, STOPPED)
CHAMPION = "champion"
DEFAULT_EXPERIMENT = "agl-sweep"
DEFAULT_MODEL_NAME = "agl-model"
RECORD_TAG = "agl.record_logged"     # the run holds its run record (gene set, k, metrics, checkpoint)


@dataclass
class RunView:
    """What agl reads back about one run."""

    run_id: str
    status: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def has_record(self) -> bool:
        return self.tags.get(RECORD_TAG) == "true"


@dataclass(frozen=True)
class DatasetRef:
    """The data a run trained on: a store and a split (logged as the run's dataset input)."""

    name: str                 # e.g. "her2st-demo:loso-B4"
    source: str               # the store folder
    digest: str               # changes when the store or the split's roles change
    profile: dict[str, Any] = field(default_factory=dict)   # spot counts per role, genes


@runtime_checkable
class Tracker(Protocol):
    """An experiment tracker (MLflow, or in memory for tests)."""

    uri: str

    def experiment(self, name: str, artifact_root: str | Path | None = None) -> str:
        """The id of experiment ``name``, created (as a model-training experiment) if new."""

    def start_sweep(self, experiment_id: str, name: str, params: Mapping[str, Any],
                    tags: Mapping[str, str] | None = None, files: Iterable[Path] = (),
                    dataset: DatasetRef | None = None) -> str:
        """Open a sweep's parent run (params, tags, files such as the space YAML); its run id."""

    def start_trial(self, experiment_id: str, parent_run_id: str | None, trial_id: str, name: str,
                    params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
                    dataset: DatasetRef | None = None) -> str:
        """Open a trial's run under ``parent_run_id`` (None: a run of its own); its run id."""

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Finite scalar metrics at ``step`` (an epoch, 1-based, or a fold count)."""

    def end_trial(self, run_id: str, folder: Path | None, status: str | None = FINISHED,
                  tags: Mapping[str, str] | None = None) -> None:
        """Attach the run record in ``folder`` (agl.runs) if given, then close with ``status`` (None: leave open)."""

    def end_sweep(self, run_id: str, files: Iterable[Path] = (), metrics: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None, status: str = FINISHED) -> None:
        """Attach the sweep's summary files, metrics and tags to its parent run and close it."""

    def log_table(self, run_id: str, table: Any, artifact_file: str, files: Iterable[Path] = ()) -> None:
        """A table (a pandas DataFrame) as ``artifact_file`` in the UI's table view, and ``files`` beside it
        (also on a closed run: the sweep's gene consensus is logged after the parent run ends)."""

    def register_model(self, run_id: str, folder: Path, model_name: str = DEFAULT_MODEL_NAME,
                       alias: str = CHAMPION, input_example: np.ndarray | None = None) -> str:
        """Register the checkpoint in ``folder`` (logged with ``run_id``) as a new model version; alias it; its version."""

    def fetch_champion(self, model_name: str = DEFAULT_MODEL_NAME, alias: str = CHAMPION,
                       dst: Path | None = None) -> Path:
        """A local checkpoint folder of ``model_name@alias``; CheckpointError when there is none."""

    def get_run(self, run_id: str) -> RunView:
        """Status and tags of one run."""

    def trial_runs(self, experiment_id: str, parent_run_id: str) -> dict[str, RunView]:
        """trial id -> run of a sweep's child runs (the oldest run per trial id)."""

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        """The steps at which metric ``key`` was logged."""


def scalar_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of ``values`` (NaN k/t for gates without a threshold are dropped)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            continue
        if math.isfinite(float(value)):
            out[str(key)] = float(value)
    return out


def log_finished_run(tracker: Tracker, experiment: str, name: str, params: Mapping[str, Any], folder: Path,
                     tags: Mapping[str, str] | None = None, artifact_root: Path | None = None) -> str:
    """One run (no parent) for a finished run folder: params, per-epoch history, its record; its run id."""
    from agl.runs import read_record

    record = read_record(folder) or {}
    exp_id = tracker.experiment(experiment, artifact_root)
    run_id = tracker.start_trial(exp_id, None, name, name, params, tags={"agl.kind": "train", **(tags or {})})
    for row in record.get("history", []):
        tracker.log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"}, int(row["epoch"]))
    tracker.end_trial(run_id, Path(folder), FINISHED)
    return run_id
