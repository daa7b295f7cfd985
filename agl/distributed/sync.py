"""Bring the tracker up to date with a sweep's local results, after an outage or at the end of a sweep.

Ray Tune keeps every trial's reports (one row per epoch or fold, plus the final one), its
config and its checkpoints in the experiment folder, so the local results are the record and
the tracker is a view of them that can always be rebuilt. :func:`reconcile` compares the two
and sends what the tracker lacks: missing child runs (with their params), per-epoch metrics of
epochs not yet logged, the run record (gene set, k plot, checkpoint), the run status, and,
once the sweep is complete, the champion model version and the closed parent run. It is
idempotent: on a sweep that the tracker saw whole it sends nothing but the champion.

Everything here goes through :class:`agl.tracking.Tracker`. While the tracker is unreachable,
the sweep driver writes ``OUT/mlflow-pending.json`` (what was missed and the command to send
it); ``agl tune-sync --out OUT`` or the next ``--resume`` sends it and removes the file.
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from agl.distributed.results import (SPACE_COPY, SWEEP_JSON, best_trial, is_diverged, join_path, summary_table,
                                     sweep_complete, trial_config, trial_error, trial_run_name, write_table)
from agl.errors import ConfigError
from agl.fileio import atomic_write_json
from agl.tracking import FAILED, FINISHED, STOPPED, TERMINAL, Tracker

log = logging.getLogger(__name__)

PENDING_FILE = "mlflow-pending.json"
EPOCH_KEYS = ("train_loss", "val_loss", "val_pcc", "best_val_pcc", "k", "t", "tau", "epoch_time_s")
# a cross-validated trial reports once per fold (step = folds_done), see agl.distributed.cv
FOLD_KEYS = ("cv_pcc", "cv_pcc_se", "fold_pcc", "final_k")


def report_step(row: Mapping[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """(tracker step, metrics) of one Tune report: an epoch of a single-split trial (step = epoch,
    1-based, as in the plots and result.json), a fold of a cross-validated one (step = folds done);
    None for the final report of a single-split trial (its record carries the end-of-run metrics)."""
    if "folds_done" in row and not _missing(row.get("folds_done")):
        return int(row["folds_done"]), {k: v for k, v in row.items() if k in FOLD_KEYS}
    if _flag(row.get("final")) or "epoch" not in row or _missing(row.get("epoch")):
        return None
    return int(row["epoch"]) + 1, {k: v for k, v in row.items() if k in EPOCH_KEYS}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _flag(value: Any) -> bool:
    """A boolean report field as read back from Tune's results (True, numpy True; NaN where absent)."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


def sync_command(out: str | Path) -> str:
    return f"agl tune-sync --out {out}"


def mark_pending(out: str | Path, tracking_uri: str, reason: str, trial_ids: Iterable[str] = ()) -> Path:
    """Record (atomically) that the tracker missed part of the sweep in ``out``, and how to send it later."""
    path = Path(out) / PENDING_FILE
    previous = read_pending(out) or {}
    trials = sorted(set(previous.get("trials", [])) | set(trial_ids))
    atomic_write_json(path, {"tracking_uri": tracking_uri, "since": previous.get("since") or time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "reason": reason, "trials": trials, "sync_with": sync_command(out)})
    return path


def read_pending(out: str | Path) -> dict[str, Any] | None:
    path = Path(out) / PENDING_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def final_checkpoint(last: Mapping[str, Any], tune_checkpoint: Any, filesystem: Any = None) -> Any:
    """A finished trial's run folder: Tune's checkpoint, or the Train checkpoint a nested
    TorchTrainer reported (TuneReportCallback puts its path in the result).

    That path is relative to the sweep's storage filesystem (``bucket/key`` for s3://, no scheme), so it is
    opened with ``filesystem`` (the trial's or result's storage filesystem), else Tune's checkpoint's."""
    from ray.tune import Checkpoint

    if not last.get("checkpoint_path"):
        return tune_checkpoint
    path = str(last["checkpoint_path"])
    if "://" in path:
        return Checkpoint(path)
    filesystem = filesystem or getattr(tune_checkpoint, "filesystem", None)
    if filesystem is None:
        import pyarrow.fs

        filesystem = pyarrow.fs.LocalFileSystem()
    return Checkpoint(path, filesystem=filesystem)


@dataclass
class TrialView:
    """One trial as the local results record it (from a Tune ``Result``)."""

    trial_id: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]          # per-epoch (or per-fold) reports, in order
    final: bool                         # the trial reported its final metrics and run folder
    failed: bool
    checkpoint: Any                     # ray.tune.Checkpoint of the run folder, or None
    error: str = ""                     # why it failed (a diverged trial's NonFiniteLossError, Tune's error)

    @classmethod
    def from_result(cls, result: Any) -> "TrialView":
        metrics = dict(result.metrics or {})
        frame = result.metrics_dataframe
        rows = [] if frame is None else [
            {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
            for row in frame.to_dict("records")]
        final = bool(metrics.get("final"))
        checkpoint = final_checkpoint(metrics, result.checkpoint, getattr(result, "filesystem", None))
        trial_id = metrics.get("trial_id") or (Path(result.path).name if result.path else "")
        # a cross-validated trial's checkpoint is its run folder after every fold, stopped or not
        keep = final or "folds_done" in metrics
        return cls(trial_id=str(trial_id), config=dict(result.config or {}), rows=rows, final=final,
                   failed=result.error is not None or is_diverged(metrics), checkpoint=checkpoint if keep else None,
                   error=trial_error(result))


@dataclass
class SyncReport:
    runs: dict[str, str] = field(default_factory=dict)   # trial id -> tracker run id
    created: int = 0
    epochs_logged: int = 0
    folders_logged: int = 0
    closed: int = 0
    champion: str | None = None


def send_trial(tracker: Tracker, run_id: str, trial: TrialView, logged_steps: set[int], has_record: bool) -> tuple[int, bool]:
    """Log a trial's epochs not in ``logged_steps`` and, if it has a run folder the run lacks, its
    record; returns (epochs sent, record sent)."""
    sent = 0
    for row in trial.rows:
        found = report_step(row)
        if found is None or found[0] < 1 or found[0] in logged_steps:
            continue
        tracker.log_metrics(run_id, found[1], found[0])
        sent += 1
    folder = False
    if trial.checkpoint is not None and not has_record:
        with trial.checkpoint.as_directory() as local:
            tracker.end_trial(run_id, Path(local), status=None)
        folder = True
    return sent, folder


def trial_status(trial: TrialView, complete: bool) -> str | None:
    """The status a trial's run should end in; None while the sweep may still continue it."""
    if trial.failed:
        return FAILED
    if trial.final:
        return FINISHED
    return STOPPED if complete else None  # stopped by the scheduler, or cut short by an interrupt


def reconcile(tracker: Tracker, experiment_id: str, parent_run_id: str, trials: list[TrialView],
              space: Any, complete: bool, dataset: Any = None) -> SyncReport:
    """Send the tracker whatever the local trial records hold that it lacks (see the module docstring)."""
    existing = tracker.trial_runs(experiment_id, parent_run_id)
    report = SyncReport()
    for trial in trials:
        run = existing.get(trial.trial_id)
        status = trial_status(trial, complete)
        if run is not None:
            done = run.status in TERMINAL and (trial.checkpoint is None or run.has_record)
            report.runs[trial.trial_id] = run.run_id
            if done:
                continue
            run_id = run.run_id
            logged = tracker.logged_steps(run_id, "cv_pcc" if space.cv else "val_pcc")
        else:
            run_id = tracker.start_trial(experiment_id, parent_run_id, trial.trial_id,
                                         trial_run_name(space, trial.trial_id, trial.config),
                                         trial_config(space, trial.config), tags={"agl.kind": "trial"},
                                         dataset=dataset)
            report.runs[trial.trial_id], report.created, logged = run_id, report.created + 1, set()
        sent, folder = send_trial(tracker, run_id, trial, logged, run is not None and run.has_record)
        report.epochs_logged += sent
        report.folders_logged += int(folder)
        if status is not None:
            tracker.end_trial(run_id, None, status, tags={"error": trial.error[:4000]} if trial.error else None)
            report.closed += 1
    return report


def finish_parent(tracker: Tracker, parent_run_id: str, best: Mapping[str, Any] | None, files: Iterable[Path],
                  model_name: str, champion_folder: Path | None, refit: Mapping[str, Any] | None = None,
                  input_example: np.ndarray | None = None) -> str | None:
    """Register the champion and close the parent run, unless that was done already.

    The champion is the refit of the best configuration when the sweep made one (cross-validated
    spaces: ``refit["run_id"]``, folder ``refit["folder"]``), else the best trial's own run."""
    parent = tracker.get_run(parent_run_id)
    if parent.status in TERMINAL and "champion_version" in parent.tags:
        return parent.tags["champion_version"] or None
    champion = None
    source_run = refit.get("run_id") if refit else (best.get("mlflow_run_id") if best else None)
    if source_run and champion_folder is not None:
        champion = tracker.register_model(source_run, champion_folder, model_name, input_example=input_example)
    metrics = {f"best_{k}": best[k] for k in ("val_pcc", "test_pcc", "test_scc", "final_k", "cv_pcc", "cv_pcc_se")
               if best and best.get(k) is not None}
    if refit:
        metrics.update({f"champion_{k}": v for k, v in refit["metrics"].items() if k.startswith("test_")})
    tracker.end_sweep(parent_run_id, files, metrics=metrics,
                      tags={"best_trial": best["trial_id"] if best else "", "champion_version": champion or "",
                            "champion_run_id": source_run or ""})
    return champion


def finish_tracking(grid: Any, space: Any, out: Path, tracker: Tracker, experiment_id: str,
                    parent_run_id: str, complete: bool, model_name: str,
                    champion: Mapping[str, Any] | None = None, dataset: Any = None,
                    input_example: np.ndarray | None = None) -> tuple[Any, Any, SyncReport, Exception | None]:
    """Send the tracker whatever it missed, write the trial table, register the champion of a complete
    sweep. With the tracker unreachable the table is still written and OUT/mlflow-pending.json says
    how to send the rest later.

    Returns (table, best trial, what was sent (with the champion version), the error if one stopped it)."""
    trials = [TrialView.from_result(r) for r in grid]
    report, problem = SyncReport(), None
    try:
        report = reconcile(tracker, experiment_id, parent_run_id, trials, space, complete, dataset)
    except Exception as err:  # tracker unreachable or failing: keep the local results, say how to sync
        problem = err
    table = summary_table(grid, space, report.runs)
    paths = write_table(table, out, space, champion)
    best = best_trial(table, space)
    if champion is not None and not champion.get("run_id") and problem is None:
        problem = RuntimeError("the refit champion was not logged to the tracker")
    if problem is None and complete:
        try:
            if champion is not None:
                report.champion = finish_parent(tracker, parent_run_id, best, paths.values(), model_name,
                                                Path(champion["folder"]), refit=champion, input_example=input_example)
            else:
                view = next((t for t in trials if best and t.trial_id == best["trial_id"]), None)
                with (view.checkpoint.as_directory() if view is not None and view.checkpoint is not None
                      else nullcontext(None)) as local:
                    report.champion = finish_parent(tracker, parent_run_id, best, paths.values(), model_name,
                                                    Path(local) if local else None, input_example=input_example)
        except Exception as err:
            problem = err
    if problem is not None:
        mark_pending(out, tracker.uri, f"{type(problem).__name__}: {str(problem)[:300]}", [t.trial_id for t in trials])
        log.warning("the tracker at %s is unreachable or failed (%s). Every trial's results are kept in %s; send "
                    "them once it is back with: %s", tracker.uri, type(problem).__name__, out, sync_command(out))
    else:
        (out / PENDING_FILE).unlink(missing_ok=True)
    return table, best, report, problem


def log_refit(tracker: Tracker, experiment_id: str, parent_run_id: str, space: Any, champion: Mapping[str, Any],
              dataset: Any = None) -> str:
    """The refit champion's child run (trial id ``refit``; found again on a re-run, so logged once)."""
    existing = tracker.trial_runs(experiment_id, parent_run_id).get("refit")
    if existing is not None and existing.has_record:
        return existing.run_id
    config = champion["config"]
    run_id = existing.run_id if existing is not None else tracker.start_trial(
        experiment_id, parent_run_id, "refit", "refit-" + trial_run_name(space, champion["trial_id"], config),
        trial_config(space, config), tags={"agl.kind": "refit", "refit_of": champion["trial_id"], "split": space.split},
        dataset=dataset)
    tracker.end_trial(run_id, Path(champion["folder"]), FINISHED)
    return run_id


def example_patch(store_path: str | Path) -> np.ndarray | None:
    """One real H&E patch of the store: the champion model's input example."""
    from agl.data.store import open_store

    try:
        return np.asarray(open_store(store_path).patches[:1], dtype=np.uint8)
    except Exception as err:  # the example is a convenience: never fail the sweep over it
        log.warning("no input example for the champion model (%s)", err)
        return None


def relocate(out: str | Path) -> dict[str, Any]:
    """The state of the sweep in ``out``, after pointing it at ``out`` if the folder was moved or copied.

    sweep.json records the folder it was written in; when that is not ``out``, the local MLflow
    database (``out/mlflow.db``, the default backend), Ray's results path and the champion's
    folder are rewritten to the new place, so MLflow's artifact links work again. A sweep
    tracked on an http(s) server keeps its artifacts there and needs only the paths."""
    from agl.tracking import default_tracking_uri, relocate_sqlite

    out = Path(out).resolve()
    state_file = out / SWEEP_JSON
    state = json.loads(state_file.read_text())
    old = Path(state.get("out") or out)
    if old == out:
        return state

    def moved(path: str) -> str:
        return str(out / Path(path).relative_to(old)) if Path(path).is_relative_to(old) else path

    if state["tracking_uri"] == default_tracking_uri(old):
        rows = relocate_sqlite(out / "mlflow.db", old, out)
        state["tracking_uri"] = default_tracking_uri(out)
        log.info("%s was moved from %s: %d artifact locations in its mlflow.db now point here", out, old, rows)
    if "://" not in state["storage_path"]:
        state["storage_path"] = moved(state["storage_path"])
    if state.get("champion"):
        state["champion"] = {**state["champion"], "folder": moved(state["champion"]["folder"])}
    state["out"] = str(out)
    atomic_write_json(state_file, state, indent=1, default=str)
    return state


def sync_sweep(out: str | Path, tracking_uri: str | None = None) -> SyncReport:
    """``agl tune-sync``: send the tracker what a sweep in ``out`` holds locally and the tracker missed."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    from agl.distributed.spaces import SearchSpace, load_space
    from agl.distributed.storage import node_store
    from agl.distributed.results import dataset_ref
    from agl.tracking import (DEFAULT_MODEL_NAME, TrackingUnavailable, check_database, check_reachable,
                              check_tracking_uri, make_tracker)

    out = Path(out).resolve()
    state_file = out / SWEEP_JSON
    if not state_file.is_file():
        raise ConfigError(out, f"holds no sweep ({SWEEP_JSON} missing)")
    state = relocate(out)
    # the sweep's runs must be in that tracker already: a mistyped SQLite path is refused, not created
    uri = check_reachable(check_database(check_tracking_uri(tracking_uri or state["tracking_uri"]), must_exist=True))
    options = state.get("options", {})
    space = load_space(out / SPACE_COPY if (out / SPACE_COPY).is_file() else options.get("space", "default"))
    if options.get("num_samples"):
        space = SearchSpace(**{**space.__dict__, "num_samples": int(options["num_samples"])})
    exp_path = join_path(state["storage_path"], state["name"])
    try:
        grid = ResultGrid(ExperimentAnalysis(exp_path, default_metric=space.metric, default_mode=space.mode))
    except Exception as err:  # Tune's own errors for a missing or damaged experiment folder
        raise ConfigError(exp_path, f"cannot read the sweep's Tune results: {err}") from None
    store_path = node_store(options.get("store"))  # a store in the bucket is staged here
    tracker, dataset = make_tracker(uri), dataset_ref(store_path, space.split)
    champion = dict(state["champion"]) if state.get("champion") else None
    if champion is not None:  # the refit of a cross-validated sweep, logged now if the tracker missed it
        champion["run_id"] = log_refit(tracker, state["experiment_id"], state["parent_run_id"], space, champion,
                                       dataset)
    _, _, report, problem = finish_tracking(grid, space, out, tracker, state["experiment_id"],
                                            state["parent_run_id"], sweep_complete(grid, space),
                                            options.get("model_name", DEFAULT_MODEL_NAME), champion=champion,
                                            dataset=dataset, input_example=example_patch(store_path))
    if problem is not None:
        raise TrackingUnavailable(uri, f"the tracker failed during the sync ({type(problem).__name__}: "
                                       f"{str(problem)[:300]}); nothing is lost, run it again")
    log.info("%s is up to date with %s: %d runs created, %d epochs and %d run folders sent, %d runs closed",
             uri, out, report.created, report.epochs_logged, report.folders_logged, report.closed)
    return report


__all__ = ["PENDING_FILE", "SyncReport", "TrialView", "example_patch", "final_checkpoint", "finish_parent",
           "finish_tracking", "log_refit", "mark_pending", "read_pending", "reconcile", "relocate", "report_step", "sync_command", "sync_sweep"]
