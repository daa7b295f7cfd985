"""Bring MLflow up to date with a sweep's local results, after an outage or at the end of a sweep.

Ray Tune keeps every trial's reports (one row per epoch plus the final one), its config and
its checkpoints in the experiment folder, so the local results are the record and MLflow
is a view of them that can always be rebuilt. :func:`reconcile` compares the two and sends
what MLflow lacks: missing child runs (with their params), per-epoch metrics of epochs not
yet logged, the final run folder (gene set, k plot, checkpoint), the run status, and, once
the sweep is complete, the champion model version and the closed parent run. It is
idempotent: on a sweep that MLflow saw whole it sends nothing but the champion.

While MLflow is unreachable, the sweep driver writes ``OUT/mlflow-pending.json`` (what was
missed and the command to send it); ``agl tune-sync --out OUT`` or the next ``--resume``
sends it and removes the file.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from agl.distributed import tracking
from agl.errors import ConfigError
from agl.fileio import atomic_write_json

log = logging.getLogger(__name__)

PENDING_FILE = "mlflow-pending.json"
EPOCH_KEYS = ("train_loss", "val_loss", "val_pcc", "best_val_pcc", "k", "t", "tau", "epoch_time_s")
# a cross-validated trial reports once per fold (step = folds_done), see agl.distributed.cv
FOLD_KEYS = ("cv_pcc", "cv_pcc_se", "fold_pcc", "final_k")


def report_step(row: Mapping[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """(MLflow step, metrics) of one Tune report: an epoch of a single-split trial, a fold of a
    cross-validated one; None for the final report of a single-split trial (logged from result.json)."""
    if "folds_done" in row and not _missing(row.get("folds_done")):
        return int(row["folds_done"]), {k: v for k, v in row.items() if k in FOLD_KEYS}
    if _flag(row.get("final")) or "epoch" not in row:
        return None
    return int(row["epoch"]), {k: v for k, v in row.items() if k in EPOCH_KEYS}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
_TERMINAL = ("FINISHED", "FAILED", "KILLED")


def sync_command(out: str | Path) -> str:
    return f"agl tune-sync --out {out}"


def mark_pending(out: str | Path, tracking_uri: str, reason: str, trial_ids: Iterable[str] = ()) -> Path:
    """Record (atomically) that MLflow missed part of the sweep in ``out``, and how to send it later."""
    path = Path(out) / PENDING_FILE
    previous = read_pending(out) or {}
    trials = sorted(set(previous.get("trials", [])) | set(trial_ids))
    atomic_write_json(path, {"tracking_uri": tracking_uri, "since": previous.get("since") or time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "reason": reason, "trials": trials, "sync_with": sync_command(out)})
    return path


def read_pending(out: str | Path) -> dict[str, Any] | None:
    path = Path(out) / PENDING_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _flag(value: Any) -> bool:
    """A boolean report field as read back from Tune's results (True, numpy True; NaN where absent)."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


def final_checkpoint(last: Mapping[str, Any], tune_checkpoint: Any) -> Any:
    """A finished trial's run folder: Tune's checkpoint, or the Train checkpoint a nested
    TorchTrainer reported (TuneReportCallback puts its path in the result)."""
    from ray.tune import Checkpoint

    return Checkpoint(last["checkpoint_path"]) if last.get("checkpoint_path") else tune_checkpoint


@dataclass
class TrialView:
    """One trial as the local results record it (from a Tune ``Result``)."""

    trial_id: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]          # per-epoch reports, in order
    final: bool                         # the trial reported its final metrics and run folder
    failed: bool
    checkpoint: Any                     # ray.tune.Checkpoint of the run folder, or None

    @classmethod
    def from_result(cls, result: Any) -> "TrialView":
        metrics = dict(result.metrics or {})
        frame = result.metrics_dataframe
        rows = [] if frame is None else [
            {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
            for row in frame.to_dict("records")]
        final = bool(metrics.get("final"))
        checkpoint = final_checkpoint(metrics, result.checkpoint)
        trial_id = metrics.get("trial_id") or (Path(result.path).name if result.path else "")
        # a cross-validated trial's checkpoint is its run folder after every fold, stopped or not
        keep = final or "folds_done" in metrics
        return cls(trial_id=str(trial_id), config=dict(result.config or {}), rows=rows, final=final,
                   failed=result.error is not None, checkpoint=checkpoint if keep else None)


@dataclass
class SyncReport:
    runs: dict[str, str] = field(default_factory=dict)   # trial id -> MLflow run id
    created: int = 0
    epochs_logged: int = 0
    folders_logged: int = 0
    closed: int = 0
    champion: str | None = None


def send_trial(c: Any, run_id: str, trial: TrialView, logged_steps: set[int], has_folder: bool) -> tuple[int, bool]:
    """Log a trial's epochs not in ``logged_steps`` and, if it finished and the run lacks it, its run
    folder; returns (epochs sent, folder sent)."""
    sent = 0
    for row in trial.rows:
        found = report_step(row)
        if found is None or found[0] < 0 or found[0] in logged_steps:
            continue
        metrics = tracking._metrics(found[1], found[0])
        if metrics:
            c.log_batch(run_id, metrics=metrics)
            sent += 1
    folder = False
    if trial.checkpoint is not None and not has_folder:
        with trial.checkpoint.as_directory() as local:
            tracking.log_run_folder(c, run_id, local)
        folder = True
    return sent, folder


def trial_status(trial: TrialView, complete: bool) -> str | None:
    """The MLflow status a trial's run should end in; None while the sweep may still continue it."""
    if trial.failed:
        return "FAILED"
    if trial.final:
        return "FINISHED"
    return "KILLED" if complete else None  # stopped by the scheduler, or cut short by an interrupt


def reconcile(tracking_uri: str, experiment_id: str, parent_run_id: str, trials: list[TrialView],
              space: Any, complete: bool) -> SyncReport:
    """Send MLflow whatever the local trial records hold that it lacks (see the module docstring)."""
    from agl.distributed.tune import trial_config

    c = tracking.client(tracking_uri)
    existing = tracking.child_run_objects(tracking_uri, experiment_id, parent_run_id)
    report = SyncReport()
    for trial in trials:
        run = existing.get(trial.trial_id)
        status = trial_status(trial, complete)
        if run is not None:
            done = run.info.status in _TERMINAL and (not trial.final or run.data.tags.get("has_checkpoint") == "true")
            report.runs[trial.trial_id] = run.info.run_id
            if done:
                continue
            run_id = run.info.run_id
            logged = {int(m.step) for m in c.get_metric_history(run_id, "cv_pcc" if space.cv else "val_pcc")}
        else:
            run_id = c.create_run(experiment_id, run_name=f"trial-{trial.trial_id}", tags={
                "mlflow.parentRunId": parent_run_id, "agl.kind": "trial", "trial_id": trial.trial_id}).info.run_id
            c.log_batch(run_id, params=tracking._params(trial_config(space, trial.config)))
            report.runs[trial.trial_id], report.created, logged = run_id, report.created + 1, set()
        has_folder = run is not None and run.data.tags.get("has_checkpoint") == "true"
        sent, folder = send_trial(c, run_id, trial, logged, has_folder)
        report.epochs_logged += sent
        report.folders_logged += int(folder)
        if status is not None:
            if status == "KILLED":
                c.set_tag(run_id, "agl.stopped_by", "scheduler")
            c.set_terminated(run_id, status)
            report.closed += 1
    return report


def finish_parent(tracking_uri: str, parent_run_id: str, best: Mapping[str, Any] | None, files: Iterable[Path],
                  model_name: str, refit: Mapping[str, Any] | None = None) -> str | None:
    """Register the champion and close the parent run, unless that was done already.

    The champion is the refit of the best configuration when the sweep made one (cross-validated
    spaces: ``refit["run_id"]``), else the best trial's own run."""
    c = tracking.client(tracking_uri)
    parent = c.get_run(parent_run_id)
    if parent.info.status in _TERMINAL and "champion_version" in parent.data.tags:
        return parent.data.tags["champion_version"] or None
    champion = None
    source_run = refit.get("run_id") if refit else (best.get("mlflow_run_id") if best else None)
    if source_run:
        champion = tracking.register_champion(tracking_uri, source_run, model_name)
    metrics = {f"best_{k}": best[k] for k in ("val_pcc", "test_pcc", "test_scc", "final_k", "cv_pcc", "cv_pcc_se")
               if best and best.get(k) is not None}
    if refit:
        metrics.update({f"champion_{k}": v for k, v in refit["metrics"].items() if k.startswith("test_")})
    tracking.finish_parent_run(
        tracking_uri, parent_run_id, files, metrics=metrics,
        tags={"best_trial": best["trial_id"] if best else "", "champion_version": champion or "",
              "champion_run_id": source_run or ""})
    return champion


def finish_tracking(grid: Any, space: Any, out: Path, tracking_uri: str, experiment_id: str,
                    parent_run_id: str, complete: bool, model_name: str,
                    champion: Mapping[str, Any] | None = None) -> tuple[Any, Any, SyncReport, Exception | None]:
    """Send MLflow whatever it missed (see agl.distributed.sync), write the trial table, register the
    champion of a complete sweep. With MLflow unreachable the table is still written and
    OUT/mlflow-pending.json says how to send the rest later.

    Returns (table, best trial, what was sent (with the champion version), the MLflow error if one stopped it)."""
    from agl.distributed.tune import best_trial, summary_table, write_table

    trials = [TrialView.from_result(r) for r in grid]
    report, problem = SyncReport(), None
    try:
        report = reconcile(tracking_uri, experiment_id, parent_run_id, trials, space, complete)
    except Exception as err:  # MLflow unreachable or failing: keep the local results, say how to sync
        problem = err
    table = summary_table(grid, space, report.runs)
    paths = write_table(table, out, space, champion)
    best = best_trial(table, space)
    if champion is not None and not champion.get("run_id") and problem is None:
        problem = RuntimeError("the refit champion was not logged to MLflow")
    if problem is None and complete:
        try:
            report.champion = finish_parent(tracking_uri, parent_run_id, best, paths.values(), model_name,
                                            refit=champion)
        except Exception as err:
            problem = err
    if problem is not None:
        mark_pending(out, tracking_uri, f"{type(problem).__name__}: {str(problem)[:300]}", [t.trial_id for t in trials])
        log.warning("MLflow at %s is unreachable (%s). Every trial's results are kept in %s; send them to MLflow "
                    "once it is back with: %s", tracking_uri, type(problem).__name__, out, sync_command(out))
    else:
        (out / PENDING_FILE).unlink(missing_ok=True)
    return table, best, report, problem


def sync_sweep(out: str | Path, tracking_uri: str | None = None) -> SyncReport:
    """``agl tune-sync``: send MLflow what a sweep in ``out`` holds locally and MLflow missed."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    from agl.distributed.spaces import SearchSpace, load_space
    from agl.distributed.tune import SWEEP_JSON, _join, sweep_complete

    out = Path(out).resolve()
    state_file = out / SWEEP_JSON
    if not state_file.is_file():
        raise ConfigError(out, f"holds no sweep ({SWEEP_JSON} missing)")
    state = json.loads(state_file.read_text())
    uri = tracking.check_reachable(tracking.check_tracking_uri(tracking_uri or state["tracking_uri"]))
    options = state.get("options", {})
    space = load_space(options.get("space", "default"))
    if options.get("num_samples"):
        space = SearchSpace(**{**space.__dict__, "num_samples": int(options["num_samples"])})
    exp_path = _join(state["storage_path"], state["name"])
    try:
        grid = ResultGrid(ExperimentAnalysis(exp_path, default_metric=space.metric, default_mode=space.mode))
    except Exception as err:  # Tune's own errors for a missing or damaged experiment folder
        raise ConfigError(exp_path, f"cannot read the sweep's Tune results: {err}") from None
    _, _, report, problem = finish_tracking(grid, space, out, uri, state["experiment_id"], state["parent_run_id"],
                                            sweep_complete(grid, space),
                                            options.get("model_name", tracking.DEFAULT_MODEL_NAME))
    if problem is not None:
        raise tracking.TrackingUnavailable(uri, f"MLflow failed during the sync ({type(problem).__name__}: "
                                                f"{str(problem)[:300]}); nothing is lost, run it again")
    log.info("MLflow %s is up to date with %s: %d runs created, %d epochs and %d run folders sent, %d runs closed",
             uri, out, report.created, report.epochs_logged, report.folders_logged, report.closed)
    return report


__all__ = ["PENDING_FILE", "SyncReport", "TrialView", "final_checkpoint", "finish_parent", "mark_pending", "read_pending",
           "reconcile", "sync_command", "sync_sweep"]
