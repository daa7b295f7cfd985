"""Experiment tracking behind one small interface (:class:`Tracker`).

``agl.tracking.base`` declares the interface, :class:`MlflowTracker` implements it over
MLflow, :class:`InMemoryTracker` in memory (tests). The sweep, its outage fallback and sync
(:mod:`agl.distributed.sync`), ``agl train-ray`` and ``agl predict`` use only the interface.
"""
from __future__ import annotations

from agl.tracking.base import (CHAMPION, DEFAULT_EXPERIMENT, DEFAULT_MODEL_NAME, FAILED, FINISHED, RUNNING,
                               STOPPED, TERMINAL, DatasetRef, RunView, Tracker, log_finished_run, scalar_metrics)
from agl.tracking.memory import InMemoryTracker
from agl.tracking.mlflow_backend import (MlflowTracker, TrackingUnavailable, check_database, check_reachable,
                                         check_tracking_uri, default_tracking_uri, quick_failure_env, relocate_sqlite)


def make_tracker(uri: str, must_exist: bool = False) -> Tracker:
    """The tracker for ``uri`` (an MLflow tracking URI; ``memory://`` for an in-memory one); ``must_exist``:
    refuse a SQLite database that is not there yet (commands that only read the tracker)."""
    return InMemoryTracker(uri) if uri.startswith("memory:") else MlflowTracker(uri, must_exist=must_exist)


__all__ = ["CHAMPION", "DEFAULT_EXPERIMENT", "DEFAULT_MODEL_NAME", "FAILED", "FINISHED", "RUNNING", "STOPPED",
           "TERMINAL", "DatasetRef", "InMemoryTracker", "MlflowTracker", "RunView", "Tracker", "TrackingUnavailable",
           "check_database", "check_reachable", "check_tracking_uri", "default_tracking_uri", "log_finished_run", "make_tracker",
           "quick_failure_env", "relocate_sqlite", "scalar_metrics"]
