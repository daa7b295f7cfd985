"""A tracker that keeps everything in memory: for tests of the sweep's tracking and its outage fallback.

``down = True`` makes every call raise ConnectionError, as an unreachable server would.
"""
from __future__ import annotations

import itertools
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from agl.errors import CheckpointError
from agl.tracking.base import (CHAMPION, DEFAULT_MODEL_NAME, FINISHED, RECORD_TAG, RUNNING, DatasetRef, RunView,
                               scalar_metrics)


@dataclass
class MemoryRun:
    run_id: str
    experiment_id: str
    name: str
    status: str = RUNNING
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)   # key -> [(step, value)]
    files: dict[str, Path] = field(default_factory=dict)                         # artifact path -> local copy
    datasets: list[DatasetRef] = field(default_factory=list)


class InMemoryTracker:
    """The :class:`agl.tracking.base.Tracker` interface over dictionaries (files copied to a temp folder)."""

    def __init__(self, uri: str = "memory://"):
        self.uri = uri
        self.down = False
        self.experiments: dict[str, str] = {}
        self.runs: dict[str, MemoryRun] = {}
        self.models: dict[str, dict[str, str]] = {}     # name -> version -> run id
        self.aliases: dict[tuple[str, str], str] = {}
        self._ids = itertools.count(1)
        self._root = Path(tempfile.mkdtemp(prefix="agl-memtracker-"))

    def _check(self) -> None:
        if self.down:
            raise ConnectionError(f"tracker {self.uri} is down")

    def _new_run(self, experiment_id: str, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None,
                 dataset: DatasetRef | None) -> str:
        run_id = f"run{next(self._ids)}"
        self.runs[run_id] = MemoryRun(run_id, experiment_id, name, params={k: str(v) for k, v in params.items()},
                                      tags=dict(tags or {}), datasets=[dataset] if dataset else [])
        return run_id

    def _copy(self, run_id: str, path: Path, as_name: str) -> None:
        dest = self._root / run_id / as_name
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(path, dest, dirs_exist_ok=True) if path.is_dir() else shutil.copyfile(path, dest))
        self.runs[run_id].files[as_name] = dest

    # -- the interface -------------------------------------------------------------------------
    def experiment(self, name: str, artifact_root: str | Path | None = None) -> str:
        self._check()
        return self.experiments.setdefault(name, str(len(self.experiments) + 1))

    def start_sweep(self, experiment_id: str, name: str, params: Mapping[str, Any],
                    tags: Mapping[str, str] | None = None, files: Iterable[Path] = (),
                    dataset: DatasetRef | None = None) -> str:
        self._check()
        run_id = self._new_run(experiment_id, name, params, {"agl.kind": "sweep", **(tags or {})}, dataset)
        for path in files:
            self._copy(run_id, Path(path), Path(path).name)
        return run_id

    def start_trial(self, experiment_id: str, parent_run_id: str | None, trial_id: str, name: str,
                    params: Mapping[str, Any], tags: Mapping[str, str] | None = None,
                    dataset: DatasetRef | None = None) -> str:
        self._check()
        base = {"trial_id": trial_id, **({"parent_run_id": parent_run_id} if parent_run_id else {})}
        return self._new_run(experiment_id, name, params, {**base, **(tags or {})}, dataset)

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        self._check()
        for key, value in scalar_metrics(metrics).items():
            self.runs[run_id].metrics.setdefault(key, []).append((int(step), value))

    def end_trial(self, run_id: str, folder: Path | None, status: str | None = FINISHED,
                  tags: Mapping[str, str] | None = None) -> None:
        self._check()
        from agl.runs import read_record

        run = self.runs[run_id]
        if folder is not None:
            record = read_record(folder) or {}
            self._copy(run_id, Path(folder), "record")
            self.log_metrics(run_id, record.get("metrics", {}), int(record.get("metrics", {}).get("best_epoch", 0)))
            run.tags.update({"gene_set_sha256": str(record.get("gene_set_sha256", "")),
                             "n_selected": str(record.get("n_selected", "")), RECORD_TAG: "true"})
        run.tags.update(tags or {})
        if status is not None:
            run.status = status

    def end_sweep(self, run_id: str, files: Iterable[Path] = (), metrics: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None, status: str = FINISHED) -> None:
        self._check()
        for path in files:
            if Path(path).is_file():
                self._copy(run_id, Path(path), Path(path).name)
        self.log_metrics(run_id, metrics or {}, 0)
        self.runs[run_id].tags.update({k: str(v) for k, v in (tags or {}).items()})
        self.runs[run_id].status = status

    def log_table(self, run_id: str, table: Any, artifact_file: str, files: Iterable[Path] = ()) -> None:
        self._check()
        dest = self._root / run_id / artifact_file
        dest.parent.mkdir(parents=True, exist_ok=True)
        table.to_json(dest, orient="split", index=False)
        self.runs[run_id].files[artifact_file] = dest
        for path in files:
            if Path(path).is_file():
                self._copy(run_id, Path(path), Path(path).name)

    def register_model(self, run_id: str, folder: Path, model_name: str = DEFAULT_MODEL_NAME,
                       alias: str = CHAMPION, input_example: np.ndarray | None = None) -> str:
        self._check()
        versions = self.models.setdefault(model_name, {})
        version = str(len(versions) + 1)
        self._copy(run_id, Path(folder), "model")
        versions[version] = run_id
        self.aliases[(model_name, alias)] = version
        return version

    def fetch_champion(self, model_name: str = DEFAULT_MODEL_NAME, alias: str = CHAMPION,
                       dst: Path | None = None) -> Path:
        self._check()
        version = self.aliases.get((model_name, alias))
        if version is None:
            raise CheckpointError(f"{self.uri} models:/{model_name}@{alias}", "no such registered model version")
        return self.runs[self.models[model_name][version]].files["model"]

    def get_run(self, run_id: str) -> RunView:
        self._check()
        run = self.runs[run_id]
        return RunView(run_id, run.status, dict(run.tags))

    def trial_runs(self, experiment_id: str, parent_run_id: str) -> dict[str, RunView]:
        self._check()
        out: dict[str, RunView] = {}
        for run in self.runs.values():  # in creation order: the oldest run of a trial id wins
            if run.tags.get("parent_run_id") == parent_run_id and run.tags.get("trial_id", "") not in out:
                out[run.tags.get("trial_id", "")] = RunView(run.run_id, run.status, dict(run.tags))
        return out

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        self._check()
        return {step for step, _ in self.runs[run_id].metrics.get(key, [])}
