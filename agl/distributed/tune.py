"""The gene-subset sweep: Ray Tune + Optuna over TrainConfig, tracked in MLflow.

Two ways to run a trial, chosen so that scheduling cannot deadlock:

- ``trainer="function"`` (default): each trial calls :func:`agl.training.loop.fit` in its own
  process (1 CPU, or 1 GPU); ASHA may stop trials early on ``val_pcc``.
- ``trainer="train"``: each trial runs a nested Ray Train ``TorchTrainer`` (data
  parallel over several workers/GPUs). A stopped trial's nested placement group can stay
  allocated and starve the next trial, so this mode never uses ASHA: trials stop early
  inside the loop (``patience``) and run under FIFO.

Sweeps are resumable (``resume=True`` restores the Tune experiment, errored trials from
their latest checkpoint) and log, through :class:`agl.tracking.Tracker` (MLflow by default), a
parent run with one child run per trial; the champion (the refit of the best cross-validated
configuration, else the best finished trial) becomes the registered model version ``champion``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from agl import runs, tracking
from agl.distributed.results import (SPACE_COPY, SUMMARY_MD, SWEEP_JSON, TABLE_CSV, TABLE_PNG, best_trial,
                                     compare_with_pgl, dataset_ref, diverged_report, format_table, is_diverged,
                                     join_path, summary_table, sweep_complete, trial_config, trial_id_of,
                                     trial_run_name, write_table)
from agl.distributed.spaces import SearchSpace, load_space, resolve_space_path
from agl.distributed.storage import (check_storage_path, fetch_from_storage, is_uri, mirror_to_storage, node_store,
                                     prepare_nodes, state_uri, trial_nodes, trial_store_spec)
from agl.distributed.sync import (PENDING_FILE, example_patch, final_checkpoint, finish_tracking, log_refit,
                                  mark_pending, relocate, report_step, sync_command)
from agl.errors import ConfigError, NonFiniteLossError, OutputExistsError, ResourceError
from agl.fileio import atomic_write_json, atomic_write_text, check_output_folder, write_output_marker

log = logging.getLogger(__name__)

TRAINERS = ("function", "train")
CHAMPION_DIR = "champion"          # the refit of the best configuration (cross-validated sweeps)
__all__ = ["CHAMPION_DIR", "FairASHA", "SUMMARY_MD", "SWEEP_JSON", "SweepOptions", "SweepSummary", "TABLE_CSV",
           "TABLE_PNG", "TrackingCallback", "best_trial", "compare_with_pgl", "fit_surviving_memory_kills",
           "format_table", "run_sweep", "summary_table", "sweep_complete", "trial_config", "write_table"]


@dataclass
class SweepOptions:
    """Everything ``launch/tune.py`` / ``agl tune`` pass to :func:`run_sweep`."""

    space: str = "default"
    store: str | None = None               # None: the bundled her2st demo store
    out: str = "results/sweep"
    name: str = "agl-sweep"
    num_samples: int | None = None         # None: the space's num_samples
    address: str | None = None             # None: start Ray locally; "auto": join a cluster
    num_cpus: int | None = None
    tracking_uri: str | None = None        # None: sqlite:///<out>/mlflow.db
    experiment: str = tracking.DEFAULT_EXPERIMENT
    model_name: str = tracking.DEFAULT_MODEL_NAME
    resume: bool = False
    trainer: str = "function"
    workers_per_trial: int | None = None   # trainer="train" only; None: 1 with GPUs (one node per trial), else 2
    use_gpu: bool = False                  # trainer="train" only (function trials use resources.gpu)
    max_concurrent: int | None = None
    storage_path: str | None = None        # None: <out>/ray (use s3:// or a shared mount on a cluster)
    dashboard: bool = False
    threads_per_trial: int | None = None   # None: the CPUs the space gives a trial (resources.cpu)
    warm_start_from: str | None = None     # an earlier sweep's --out or its MLflow parent run (runs:/<id>)
    warm_start_top: int = 3                # how many of its best configurations to enqueue
    consensus_top: int = 5                 # the gene consensus counts selections in this many best trials
    searcher: str = "tpe"                  # tpe, random or tpe-plain (agl.distributed.searcher.SAMPLERS)
    checkpoint_every: int | None = None    # None: every epoch on a local storage path, every 5th on s3:// etc.
    trial_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources each trial needs
    max_failures: int = 3                  # retries of a trial from its last checkpoint (spot nodes get reclaimed)
    reuse_actors: bool = False             # run the next trial in a finished trial's warm process (no start-up, no imports)


@dataclass
class SweepSummary:
    """The outcome of a sweep: one row per trial, the best one, where things were written."""

    table: pd.DataFrame
    best: dict[str, Any] | None
    champion_version: str | None
    tracking_uri: str
    parent_run_id: str
    paths: dict[str, str] = field(default_factory=dict)
    complete: bool = True                  # False: interrupted, resume with resume=True
    tracking_pending: bool = False         # True: MLflow missed results; `agl tune-sync` sends them
    champion: dict[str, Any] | None = None # cross-validated sweeps: the refit (folder, test metrics, run id)
    text: str = ""                         # the printed summary (also OUT/summary.md)
    consensus: dict[str, Any] | None = None  # gene consensus of the top trials: trials, size, paths


# --------------------------------------------------------------------------- trial bodies
class TuneReporter:
    """``agl.training.loop.Reporter`` for a function trial: every epoch to Tune, with fit's checkpoint every
    ``every``-th epoch (each one is uploaded to the storage path: on S3, the cost of a restart vs. its upload)."""

    def __init__(self, every: int = 1):
        self.every = max(1, int(every))

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        from ray import tune

        due = (int(metrics.get("epoch", 0)) + 1) % self.every == 0
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir and due else None
        tune.report(dict(metrics), checkpoint=checkpoint)


def agl_trial(config: dict[str, Any], *, space: SearchSpace, store_path: str, threads: int = 1,
              checkpoint_every: int = 1) -> None:
    """One trial in-process: fit() with a TuneReporter, then a final report with the run artifacts."""
    from ray import tune

    from agl.service import run_config

    work = Path(tempfile.mkdtemp(prefix="agl-trial-"))
    try:
        previous = tune.get_checkpoint()
        final = work / "final"
        with (previous.as_directory() if previous else nullcontext(None)) as resume_from:
            # this node's copy of the store: the demo built here, a store URI staged here, else the same path
            try:
                run = run_config(space.train_config(config), node_store(store_path), space.split,
                                 source=space.source, threads=threads, rank=0, world_size=1,
                                 reporter=TuneReporter(checkpoint_every), resume_from=resume_from, out_dir=work,
                                 record_to=final, copy_checkpoint=True)
            except NonFiniteLossError as err:  # ends the trial, failed, without a retry
                tune.report(diverged_report(err, space.metric))
                return
        result, summary = run.result, run.record
        # val_pcc: the single-split objective, the best epoch's (Tune checks every report has it)
        tune.report({**summary["metrics"], "val_pcc": result.best_val_pcc, "epoch": result.epochs_run - 1, "final": True,
                     "resumed": resume_from is not None, "node_id": _node_id()},
                    checkpoint=tune.Checkpoint.from_directory(str(final)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _node_id() -> str:
    """The Ray node this runs on (in the final report: which node ran the trial)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def agl_train_trial(config: dict[str, Any], *, space: SearchSpace, store_path: str, workers: int,
                use_gpu: bool, storage_path: str) -> None:
    """One trial as a nested TorchTrainer; TuneReportCallback forwards rank 0's reports to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from agl.distributed.train import build_trainer

    cfg = trial_config(space, config)
    trial_id = tune.get_context().get_trial_id()
    # the same name + storage path lets a restored sweep resume the nested run from its checkpoint
    trainer = build_trainer(cfg, store_path, space.split, {"num_workers": workers, "use_gpu": use_gpu},
                            storage_path=storage_path, name=f"train-{trial_id}",
                            failure_max=1, callbacks=[TuneReportCallback()], report_divergence=True)
    trainer.fit()


# --------------------------------------------------------------------------- tracking callback
def _callback_base() -> type:
    from ray.tune import Callback

    return Callback


class TrackingCallback(_callback_base()):
    """Driver-side Tune callback: a child run per trial under the sweep's parent run.

    Logs the trial's TrainConfig as params, every epoch (step = epoch, 1-based) or fold
    (step = folds done) as metrics, and when the trial ends its run record (gene set table,
    k plot, result.json, checkpoint) and status: FINISHED, FAILED, or STOPPED when the
    scheduler ended it. Its state (trial -> run id) is saved with the Tune experiment, so a
    restored sweep keeps logging into the same runs. All writes happen here, in the driver:
    one writer keeps a SQLite backend safe, and trials on other nodes need no tracker access.

    Tracking never stops the sweep: when a tracker call fails (server stopped, network gone)
    the callback says so once, writes ``OUT/mlflow-pending.json`` and sends nothing for
    ``retry_s`` seconds, then tries again; what it missed stays in Tune's folder and
    :mod:`agl.distributed.sync` sends it at the end of the sweep, or later with ``agl tune-sync``.

    The writes run in order on one background thread (one writer still), never on Tune's event loop:
    finishing a run downloads the trial's checkpoint and uploads its record, which on a bucket takes
    seconds per trial; the loop only queues it. ``on_experiment_end`` waits for the queue.
    """

    retry_s = 60.0

    def __init__(self, tracker: tracking.Tracker, experiment_id: str, parent_run_id: str, space: SearchSpace,
                 out: str | Path | None = None, dataset: tracking.DatasetRef | None = None):
        self.tracker = tracker
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.space = space
        self.out = None if out is None else str(out)
        self.dataset = dataset
        self.runs: dict[str, str] = {}
        self._looked_up = False            # child runs of a restored sweep read from the tracker once
        self.offline: str | None = None    # why the tracker was given up on, while it is
        self._offline_at = 0.0
        self._warned = False
        self._pool: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "offline": None, "_warned": False, "_looked_up": False, "_pool": None}

    def _queue(self, trial: Any, what: str, send: Callable[[], None]) -> None:
        """Run ``_send`` on the callback's writer thread (created on first use, also after a restore)."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agl-tracking")
        self._pool.submit(self._send, trial, what, send)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # every queued write done before the sweep's summary reads the tracker
            self._pool = None

    def get_state(self) -> dict[str, Any]:
        return {"runs": dict(self.runs)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.runs.update(state.get("runs", {}))

    def _send(self, trial: Any, what: str, send: Callable[[], None]) -> None:
        """Run one tracker write for ``trial``; on failure go offline (warn once) and record the trial."""
        if self.offline is not None and time.monotonic() - self._offline_at >= self.retry_s:
            self.offline = None  # try again: the server may be back
        if self.offline is None:
            try:
                send()
                return
            except Exception as err:  # any tracking failure: the sweep goes on, results stay local
                self.offline, self._offline_at = f"{type(err).__name__}: {str(err)[:300]}", time.monotonic()
                report = log.info if self._warned else log.warning
                self._warned = True
                report("MLflow at %s failed while %s of trial %s (%s). The sweep goes on and its results "
                       "stay in %s; they are sent at the end of the sweep if MLflow is back, else run: %s",
                       self.tracker.uri, what, trial.trial_id, self.offline, self.out or "the sweep folder",
                       sync_command(self.out or "OUT"))
        if self.out is not None:
            mark_pending(self.out, self.tracker.uri, self.offline or "", [trial.trial_id])

    def run_id(self, trial: Any) -> str:
        """The child run of a trial: known, found by its trial_id tag (a restored sweep), or created."""
        if trial.trial_id not in self.runs and not self._looked_up:
            # runs created after the last experiment snapshot (driver killed) are not in the saved state
            found = self.tracker.trial_runs(self.experiment_id, self.parent_run_id)
            self.runs = {**{k: v.run_id for k, v in found.items()}, **self.runs}
            self._looked_up = True
        if trial.trial_id not in self.runs:
            self.runs[trial.trial_id] = self.tracker.start_trial(
                self.experiment_id, self.parent_run_id, trial.trial_id,
                trial_run_name(self.space, trial.trial_id, trial.config), trial_config(self.space, trial.config),
                tags={"agl.kind": "trial"}, dataset=self.dataset)
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._queue(trial, "creating the run", lambda: self.run_id(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        found = report_step(result)  # an epoch, or a fold of a cross-validated trial
        if found is None:
            return  # end-of-run metrics come with the run record at completion
        self._queue(trial, "logging an epoch", lambda: self.tracker.log_metrics(self.run_id(trial), found[1], found[0]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._queue(trial, "finishing the run", lambda: self._finish(trial, failed=False))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._queue(trial, "finishing the run", lambda: self._finish(trial, failed=True))

    def _finish(self, trial: Any, failed: bool) -> None:
        run_id = self.run_id(trial)
        last = trial.last_result or {}
        finished = bool(last.get("final"))
        if is_diverged(last):  # ended by its own NonFiniteLossError: failed, with the message
            self.tracker.end_trial(run_id, None, tracking.FAILED, tags={"error": str(last.get("error", ""))[:4000]})
            return
        status = tracking.FAILED if failed else (tracking.FINISHED if finished else tracking.STOPPED)
        # a cross-validated trial's folder (gene set, k, fold metrics) is logged even when stopped early
        keep = finished or "folds_done" in last
        storage = getattr(trial, "storage", None)  # the sweep's storage filesystem: s3 paths come without a scheme
        checkpoint = (final_checkpoint(last, trial.checkpoint, getattr(storage, "storage_filesystem", None))
                      if keep else None)
        if checkpoint is None:
            self.tracker.end_trial(run_id, None, status)
            return
        with checkpoint.as_directory() as local:
            self.tracker.end_trial(run_id, Path(local), status)


# --------------------------------------------------------------------------- the sweep
def _asha_base() -> type:
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler


class FairASHA(_asha_base()):
    """ASHA that never stops the pinned first trials (``start_with``: DkGSB and its baselines run their
    whole budget, so the demo's comparison is like for like); their results still set the rungs."""

    def __init__(self, *args: Any, protected: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.protected = protected
        self._order: list[str] = []

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if trial.trial_id not in self._order:
            self._order.append(trial.trial_id)
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if trial.trial_id in self._order[:self.protected]:
            return self.CONTINUE
        return decision


def _scheduler(space: SearchSpace, trainer: str, max_t: int) -> Any:
    """ASHA (or FIFO) deciding on the space's metric, never before the minimum budget.

    Cross-validated spaces count folds (``folds_done``): a trial is compared with the others on
    the mean over the same first folds. Single-split spaces count epochs; the grace period is raised
    so that DkGSB has had ``min_bilevel_epochs`` bi-level epochs (+1: the interleaved schedule's first
    epoch has none) before any stop.
    """
    from ray.tune.schedulers import FIFOScheduler

    spec = dict(space.scheduler)
    if spec.get("name") == "asha" and trainer == "train":
        log.warning("%s: ASHA is not used with nested TorchTrainer trials (a stopped trial's placement group "
                    "can block the next one); trials stop early in the loop (patience) under FIFO", space.source)
        spec = {"name": "fifo"}
    if spec.get("name") == "asha":
        grace = spec.get("grace_period", 1)
        if space.cv is None:
            grace = max(grace, space.min_bilevel_epochs + 1)
        return FairASHA(time_attr="folds_done" if space.cv is not None else "training_iteration",
                        metric=space.metric, mode=space.mode, max_t=max_t, grace_period=min(grace, max_t),
                        reduction_factor=spec.get("reduction_factor", 2), protected=len(space.start_with))
    return FIFOScheduler()


def _searcher(space: SearchSpace, concurrency: int = 1, warm_points: list[dict[str, Any]] | None = None,
              sampler: str = "tpe") -> Any:
    """Optuna TPE for parallel, conditional, pruned trials (see :mod:`agl.distributed.searcher`)."""
    from agl.distributed.searcher import build_searcher

    return build_searcher(space, concurrency, warm_points or (), sampler)


def _trainable(opts: SweepOptions, space: SearchSpace, store_path: str, storage_path: str) -> Any:
    """The Tune trainable for ``opts.trainer``, with its per-trial resources."""
    from ray import tune

    if opts.trainer == "function":
        from agl.distributed.cv import agl_cv_trial

        every = {} if space.cv is not None else {"checkpoint_every": _checkpoint_every(opts, storage_path)}
        body = tune.with_parameters(agl_cv_trial if space.cv is not None else agl_trial, space=space,
                                    store_path=store_path, threads=_trial_threads(opts, space), **every)
        resources = _trial_resources(opts, space)
    else:
        body = tune.with_parameters(agl_train_trial, space=space, store_path=store_path,
                                    workers=_workers_per_trial(opts, space), use_gpu=_trial_gpus(opts, space),
                                    storage_path=storage_path)
        # the trial only drives its TorchTrainer, whose workers hold the real resources
        # (Tune cannot place an empty resource request, hence a sliver of a CPU)
        resources = {"cpu": 0.1, **opts.trial_resources}
    return tune.with_resources(body, resources)


def _trial_resources(opts: SweepOptions, space: SearchSpace) -> dict[str, float]:
    """What a function trial (and the champion's refit) reserves: the space's cpu/gpu and ``--trial-resource``."""
    return {"cpu": space.resources.get("cpu", 1), "gpu": space.resources.get("gpu", 0), **opts.trial_resources}


def _trial_threads(opts: SweepOptions, space: SearchSpace) -> int:
    """Torch threads per trial: as given, else the CPUs Ray reserves for the trial (at least 1)."""
    return int(opts.threads_per_trial or max(1, int(space.resources.get("cpu", 1))))


def _checkpoint_every(opts: SweepOptions, storage_path: str) -> int:
    """Epochs between checkpoints handed to Tune: each is uploaded to the storage path, so fewer on a bucket."""
    if opts.checkpoint_every is not None:
        if opts.checkpoint_every < 1:
            raise ConfigError("--checkpoint-every", f"must be >= 1, got {opts.checkpoint_every}")
        return opts.checkpoint_every
    return 5 if is_uri(storage_path) else 1


def _trial_request(opts: SweepOptions, space: SearchSpace) -> dict[str, float]:
    """What one trial needs of a node, in Ray's resource names (the nodes that get the store ready)."""
    if opts.trainer == "train":
        base = {"GPU": 1.0} if opts.use_gpu else {"CPU": 1.0}
    else:
        base = {"CPU": float(space.resources.get("cpu", 1)), "GPU": float(space.resources.get("gpu", 0))}
    return {**base, **{k: float(v) for k, v in opts.trial_resources.items()}}


def _max_concurrent(opts: SweepOptions, space: SearchSpace, resources: Mapping[str, float],
                    joined_cluster: bool = False) -> int:
    """How many trials run at once: ``--max-concurrent``, else the space's ``max_concurrent``, else
    what fits in a local Ray (nested trainers: whole worker groups, so no trial waits half-placed).

    A joined cluster (``--address``) may autoscale: its resources at start-up (e.g. ``cluster.yaml``'s
    ``CPU: 0`` head with GPU workers at ``min_workers: 0``) say nothing about what it will have, so
    there every trial is let in (``num_samples``) and Tune's pending trials make the autoscaler add nodes.
    """
    if opts.max_concurrent:
        return opts.max_concurrent
    if space.max_concurrent:
        return space.max_concurrent
    if joined_cluster:
        log.info("joined cluster: up to %d trials at once (the space's num_samples; set max_concurrent in the "
                 "space or --max-concurrent to cap it)", space.num_samples)
        return space.num_samples
    cpus = max(1.0, float(resources.get("CPU", 1)))
    if opts.trainer == "train":
        workers = _workers_per_trial(opts, space)
        per_trial = workers * 1.0 + 1.0  # workers + the Train controller
        if _trial_gpus(opts, space):
            return max(1, int(float(resources.get("GPU", 0)) // max(1, workers)))
        return max(1, int(cpus // per_trial))
    if space.resources.get("gpu"):
        return max(1, int(float(resources.get("GPU", 0)) // space.resources["gpu"]))
    return max(1, int(cpus // max(space.resources.get("cpu", 1), 1e-9)))


def _workers_per_trial(opts: SweepOptions, space: SearchSpace) -> int:
    """TorchTrainer workers per ``--trainer train`` trial: as given, else 1 on GPUs (cloud GPU nodes have one GPU
    each, so a second worker would sit on another node, maybe in another zone, all-reducing over its network),
    else 2 (CPU data parallel on one machine)."""
    if opts.workers_per_trial is not None:
        if opts.workers_per_trial < 0:
            raise ConfigError("--workers-per-trial", f"must be >= 0 (0: in-process), got {opts.workers_per_trial}")
        return opts.workers_per_trial
    return 1 if _trial_gpus(opts, space) else 2


def _trial_gpus(opts: SweepOptions, space: SearchSpace) -> bool:
    """Whether trials train on GPUs: ``--use-gpu``, or a space that asks for GPUs (``resources.gpu``)."""
    return bool(opts.use_gpu or space.resources.get("gpu"))


def run_sweep(opts: SweepOptions) -> SweepSummary:
    """Run (or resume) a sweep; write the trial table CSV/PNG; register the champion; return the summary."""
    import ray
    from ray import tune

    from agl.data.locate import store_path
    from agl.distributed.runtime import init_ray

    if opts.trainer not in TRAINERS:
        raise ConfigError("--trainer", f"must be one of {TRAINERS}, got {opts.trainer!r}")
    space = _sweep_space(opts)
    from agl.distributed.searcher import SAMPLERS

    if opts.searcher not in SAMPLERS:
        raise ConfigError("--searcher", f"must be one of {', '.join(SAMPLERS)}; got {opts.searcher!r}")
    if opts.consensus_top < 1:
        raise ConfigError("--consensus-top", f"must be >= 1, got {opts.consensus_top}")
    _workers_per_trial(opts, space)  # a bad --workers-per-trial fails before anything is written
    out = Path(opts.out).resolve()
    # a sweep resumes in --out: an earlier sweep is left to the --resume check below, anything else refused
    # (a --resume without --store takes the sweep's own store, never the demo built here just for this check)
    local_store = not is_uri(opts.store) and not (opts.resume and _unset(opts, "store"))
    check_output_folder(out, "tune", inputs=[space.source] + ([store_path(opts.store)] if local_store else []),
                        reuse=True)
    warm_points, warm_source = _warm_start(opts, space)  # a bad --warm-start-from fails before anything is written
    storage_path = opts.storage_path or str(out / "ray")
    state_file = out / SWEEP_JSON
    if opts.resume and not state_file.is_file() and is_uri(storage_path):
        fetch_from_storage(out, storage_path, opts.name, SWEEP_JSON)  # a fresh head: the sweep's files come from the bucket
    state = json.loads(state_file.read_text()) if state_file.is_file() else None
    if state and not opts.resume:
        raise OutputExistsError(out, f"already holds sweep {state.get('name')!r}; pass --resume to continue it "
                               f"or choose another --out")
    if opts.resume and not state:
        where = f" nor {state_uri(storage_path, opts.name)}/{SWEEP_JSON}" if is_uri(storage_path) else ""
        raise ConfigError("--resume", f"no sweep to resume: neither {state_file}{where} exists (a sweep on another "
                                      f"head: pass its --storage-path s3://... and --name); nothing was started")
    if state:  # a sweep folder moved or copied since: its paths and MLflow artifact links follow it
        state = relocate(out)
        if opts.storage_path is None:
            storage_path = state["storage_path"]
        opts = resumed_options(opts, state, out)  # the sweep's own space, store, trainer... unless given
        space = _sweep_space(opts)
    exp_path = join_path(storage_path, opts.name)
    if state and not tune.Tuner.can_restore(exp_path):  # never a silent new sweep in place of the one asked for
        raise ConfigError(exp_path, f"--resume: Ray Tune finds no experiment state to restore here (sweep.json says "
                                    f"storage {state['storage_path']}); nothing was started. Pass the sweep's "
                                    f"--storage-path, or start a new sweep with another --out")
    # an unreachable tracking server is refused before anything is written; a resumed sweep keeps its own
    tracking_uri = tracking.check_tracking_uri(opts.tracking_uri or (state or {}).get("tracking_uri")
                                               or tracking.default_tracking_uri(out))
    tracking.check_reachable(tracking_uri)
    tracking.quick_failure_env()
    out.mkdir(parents=True, exist_ok=True)
    write_output_marker(out, "tune", name=opts.name)
    store_path = node_store(opts.store)  # the driver's copy: dataset record, input example, caches, refit
    trial_store = trial_store_spec(opts.store, store_path)  # each trial locates it on its own node
    # num_to_keep forces an experiment snapshot per checkpoint; harmless at this scale, so no warning spam
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    owns_ray = not ray.is_initialized()  # shut down at the end only what this call started
    resources = init_ray(opts.address, num_cpus=opts.num_cpus, dashboard=opts.dashboard)
    warm_caches(store_path, space)
    if opts.address not in (None, "", "local"):  # a cluster: nodes share no disk unless told otherwise
        check_storage_path(storage_path, opts.address, len(trial_nodes({})))
        prepare_nodes(trial_store, _trial_request(opts, space), warm=functools.partial(warm_caches, space=space))
    tracker = tracking.make_tracker(tracking_uri)
    dataset = dataset_ref(store_path, space.split)

    if state:
        parent_run_id, experiment_id = state["parent_run_id"], state["experiment_id"]
        log.info("resuming sweep %s from %s (MLflow parent run %s)", opts.name, exp_path, parent_run_id)
        tuner = tune.Tuner.restore(exp_path, trainable=_trainable(opts, space, trial_store, storage_path),
                                   resume_errored=True)
        _retarget_tracking(tuner, tracker, out)
        if tracking_uri != state.get("tracking_uri"):  # the server moved: later syncs and resumes go to the new one
            state = {**json.loads(state_file.read_text()), "tracking_uri": tracking_uri}
            atomic_write_json(state_file, state, indent=1, default=str)
            mirror_to_storage(out, storage_path, opts.name, [SWEEP_JSON])
    else:
        # artifacts beside the sweep's storage when that is a bucket: a lost head loses none of them
        artifact_root = (f"{state_uri(storage_path, opts.name)}/mlartifacts" if is_uri(storage_path)
                         else out / "mlartifacts")
        experiment_id = tracker.experiment(opts.experiment, artifact_root=artifact_root)
        parent_run_id = tracker.start_sweep(
            experiment_id, opts.name,
            {"space": space.source, "split": space.split, "num_samples": space.num_samples,
             "trainer": opts.trainer, "store": store_path, "metric": space.metric, "mode": space.mode,
             "searcher": opts.searcher,
             **{f"fixed.{k}": v for k, v in space.fixed.items()},
             **({"warm_start_from": warm_source, "warm_start_points": len(warm_points)} if warm_source else {})},
            files=[resolve_space_path(opts.space)], dataset=dataset)
        atomic_write_json(state_file, {"name": opts.name, "out": str(out), "parent_run_id": parent_run_id,
                                       "experiment_id": experiment_id, "tracking_uri": tracking_uri,
                                       "storage_path": storage_path, "options": asdict(opts)},
                          indent=1, default=str)
        atomic_write_text(out / SPACE_COPY, Path(space.source).read_text())
        mirror_to_storage(out, storage_path, opts.name, [SPACE_COPY, SWEEP_JSON])
        max_t = (len(_fold_names(store_path, space)) if space.cv is not None
                 else int(space.train_config({}).get("epochs", 100)) + 1)  # +1: the final report after the last epoch
        callback = TrackingCallback(tracker, experiment_id, parent_run_id, space, out=out, dataset=dataset)
        concurrency = _max_concurrent(opts, space, resources, joined_cluster=opts.address is not None)
        tuner = tune.Tuner(
            _trainable(opts, space, trial_store, storage_path),
            tune_config=tune.TuneConfig(search_alg=_searcher(space, concurrency, warm_points, opts.searcher),
                                        scheduler=_scheduler(space, opts.trainer, max_t),
                                        num_samples=space.num_samples, max_concurrent_trials=concurrency,
                                        reuse_actors=opts.reuse_actors),
            run_config=tune.RunConfig(name=opts.name, storage_path=storage_path, callbacks=[callback],
                                      # the latest only: it alone carries the optimiser state a restart needs
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      failure_config=tune.FailureConfig(max_failures=opts.max_failures), verbose=1),
        )
    started = time.perf_counter()

    def restore() -> Any:  # the sweep again from the state Tune saved, its tracking pointed at this head
        restored = tune.Tuner.restore(exp_path, trainable=_trainable(opts, space, trial_store, storage_path),
                                      resume_errored=True)
        _retarget_tracking(restored, tracker, out)
        return restored

    grid = fit_surviving_memory_kills(tuner, restore, opts.max_failures, opts.name)
    wall = time.perf_counter() - started
    # interrupted (Ctrl-C / SIGINT): Tune saved its state; keep the parent run open for --resume
    grid, complete = _interrupted_as_saved(grid, space, exp_path)
    refit_run = None
    if complete and space.cv is not None:
        refit_run = _refit_champion(grid, space, trial_store, out, tracker, experiment_id, parent_run_id,
                                    _trial_threads(opts, space), _trial_resources(opts, space), dataset)
        if refit_run is not None:  # kept in sweep.json, so that `agl tune-sync` registers this champion
            state = json.loads(state_file.read_text())
            atomic_write_json(state_file, {**state, "champion": {k: v for k, v in refit_run.items() if k != "run_id"}},
                              indent=1, default=str)
    table, best, sent, problem = finish_tracking(grid, space, out, tracker, experiment_id, parent_run_id,
                                           complete, opts.model_name, champion=refit_run, dataset=dataset,
                                           input_example=example_patch(store_path) if complete else None)
    champion = sent.champion
    consensus = _gene_consensus(grid, table, space, out, tracker, parent_run_id, opts.consensus_top,
                                tracked=problem is None) if complete else None
    mirror_to_storage(out, storage_path, opts.name, [SWEEP_JSON, TABLE_CSV, TABLE_PNG, SUMMARY_MD, CHAMPION_DIR])
    if not complete:
        elsewhere = (f"; on another head: --resume --storage-path {storage_path} --name {opts.name}"
                     if is_uri(storage_path) else "")
        log.warning("sweep %s interrupted after %d of %d trials; continue it with --resume (same --out%s)",
                    opts.name, grid.num_terminated + grid.num_errors, space.num_samples, elsewhere)
    log.info("sweep %s: %d trials in %.0f s (%.1f trials/h)", opts.name, len(table), wall,
             len(table) / max(wall, 1e-9) * 3600)
    if owns_ray:
        ray.shutdown()
    return SweepSummary(table=table, best=best, champion_version=champion, tracking_uri=tracking_uri,
                        parent_run_id=parent_run_id, paths={"table_csv": str(out / TABLE_CSV),
                                                            "table_png": str(out / TABLE_PNG),
                                                            "summary_md": str(out / SUMMARY_MD)},
                        complete=complete, tracking_pending=(out / PENDING_FILE).is_file(), champion=refit_run,
                        text=format_table(table, best, space, refit_run),
                        consensus={k: v for k, v in consensus.items() if k != "table"} if consensus else None)


def _memory_kill(err: BaseException) -> BaseException | None:
    """Ray's OutOfMemoryError behind ``err``, if Ray's memory monitor killed a trial's worker: Tune 2.60's actor
    manager handles only RayActorError and RayTaskError, and stops the whole sweep with a RuntimeError on this one
    instead of counting it as the trial's failure (so FailureConfig's max_failures never applies)."""
    from ray.exceptions import OutOfMemoryError

    cause = err.__cause__ if isinstance(err, RuntimeError) else None
    return cause if isinstance(cause, OutOfMemoryError) else None


def fit_surviving_memory_kills(tuner: Any, restore: Callable[[], Any], max_restores: int, name: str) -> Any:
    """``tuner.fit()``; when Ray's memory monitor kills a trial's worker (which stops Tune), the sweep is restored
    from its saved state and continued, up to ``max_restores`` times (``--max-failures``): on a node short of
    memory the killed trial is retried as any failed trial would be. More kills than that: a ResourceError
    that says how to continue (``--resume``) and what to change."""
    restores = 0
    while True:
        try:
            return tuner.fit()
        except RuntimeError as err:
            killed = _memory_kill(err)
            if killed is None:
                raise
            first_line = str(killed).splitlines()[0]
            advice = ("continue it with --resume (same --out) after freeing memory on the node, with fewer trials "
                      "at once (max_concurrent in the space), or with RAY_memory_usage_threshold raised when Ray starts")
            if restores >= max_restores:
                raise ResourceError(f"sweep {name}: Ray's memory monitor killed trial workers {restores + 1} time(s) "
                                    f"({first_line}); the sweep's state is saved: {advice}") from err
            restores += 1
            log.warning("sweep %s: Ray's memory monitor killed trial workers (%s), which stops Tune; restoring the "
                        "sweep from its saved state and continuing (restore %d of at most %d, --max-failures)",
                        name, first_line, restores, max_restores)
            try:
                tuner = restore()
            except Exception as restore_err:  # e.g. killed before Tune saved any state
                raise ResourceError(f"sweep {name}: Ray's memory monitor killed trial workers ({first_line}) and the "
                                    f"sweep could not be restored ({restore_err}); {advice}") from err


def _interrupted_as_saved(grid: Any, space: SearchSpace, exp_path: str) -> tuple[Any, bool]:
    """(the sweep's results, whether every trial ended), with the trial states Tune saved to the storage path.

    After Ctrl-C, Tune saves the experiment, then stops its pending and running trials, which the grid it returns
    reports as TERMINATED: an interrupted sweep whose trials had all been created would pass for a complete one
    (champion registered from a partial search, parent run closed, exit 0). The saved state still says PENDING or
    RUNNING for them, and a resume runs them."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    if not sweep_complete(grid, space):
        return grid, False
    try:
        saved = ResultGrid(ExperimentAnalysis(exp_path, default_metric=space.metric, default_mode=space.mode))
    except Exception as err:  # Tune's own errors reading its state back; the sweep's results are in the grid
        log.warning("could not read the sweep's saved state back from %s (%s); taking it as complete", exp_path, err)
        return grid, True
    return (grid, True) if sweep_complete(saved, space) else (saved, False)


def _retarget_tracking(tuner: Any, tracker: tracking.Tracker, out: Path) -> None:
    """Point a restored sweep's TrackingCallback at this head's tracker and --out: Tuner.restore brings the callback
    as pickled when the sweep started, with the first head's tracking URI and folder (gone, or moved since)."""
    internal = getattr(tuner, "_local_tuner", None)  # Ray 2.60 keeps the restored RunConfig there; no public setter
    callbacks = internal.get_run_config().callbacks if internal is not None else None
    for callback in callbacks or []:
        if isinstance(callback, TrackingCallback):
            callback.tracker, callback.out = tracker, str(out)


def _sweep_space(opts: SweepOptions) -> SearchSpace:
    """The space ``opts`` names, checked against the trainer, with ``num_samples`` as given."""
    space = load_space(opts.space)
    if space.cv is not None and opts.trainer != "function":
        raise ConfigError(space.source, "cv: cross-validated trials run as function trials; "
                                        "use --trainer function or a space without 'cv'")
    if opts.num_samples is not None:
        if opts.num_samples < 1:
            raise ConfigError("--num-samples", f"must be >= 1, got {opts.num_samples}")
        space = SearchSpace(**{**space.__dict__, "num_samples": opts.num_samples})
    return space


# what a sweep keeps for life (its trials were drawn and run with it): a resume takes it from sweep.json
FIXED_ON_RESUME = {"space": "--space", "num_samples": "--num-samples", "trainer": "--trainer",
                   "workers_per_trial": "--workers-per-trial", "use_gpu": "--use-gpu", "searcher": "--searcher",
                   "trial_resources": "--trial-resource", "checkpoint_every": "--checkpoint-every",
                   "threads_per_trial": "threads_per_trial"}
# what a resume takes from sweep.json unless given again (the store may have moved on a new head)
KEPT_ON_RESUME = ("store", "model_name", "consensus_top")


def resumed_options(opts: SweepOptions, state: Mapping[str, Any], out: Path) -> SweepOptions:
    """``opts`` of a ``--resume``, completed from the sweep's own (``sweep.json``'s "options"), so that a fresh head
    needs only ``--storage-path`` (and ``--name``) to continue it; a setting given with another value than the
    sweep's own is refused (ConfigError naming the flag), as the restored trials and searcher could not follow it."""
    saved = state.get("options") or {}
    changes: dict[str, Any] = {}
    copy = out / SPACE_COPY
    for key, flag in FIXED_ON_RESUME.items():
        if key not in saved:
            continue
        given, own = getattr(opts, key), saved[key]
        same = (_same_space(given, str(copy) if copy.is_file() else own) if key == "space" else given == own)
        if not same and not _unset(opts, key):
            raise ConfigError(flag, f"{given!r} is not this sweep's own {own!r} (in {out / SWEEP_JSON}): a resumed "
                                    f"sweep keeps its settings; leave the flag out, or start a new sweep with "
                                    f"another --out")
        changes[key] = own
    changes.update({key: saved[key] for key in KEPT_ON_RESUME if key in saved and _unset(opts, key)})
    if copy.is_file():  # the file as the sweep started, wherever (and however changed) the original is now
        changes["space"] = str(copy)
    taken = {k: v for k, v in changes.items() if v != getattr(opts, k)}
    if taken:
        log.info("resume: the sweep's own settings %s", ", ".join(f"{k}={v}" for k, v in taken.items()))
    return dataclasses.replace(opts, **changes)


def _unset(opts: SweepOptions, key: str) -> bool:
    """Whether ``opts.key`` is its default, i.e. not given (``--store`` defaults to ``demo`` on the command line)."""
    from agl.data.locate import DEMO

    value = getattr(opts, key)
    return value == getattr(SweepOptions(), key) or (key == "store" and value == DEMO)


def _same_space(given: str, own: str) -> bool:
    """Whether two space names/paths define the same search (the file's content, not its name)."""
    try:
        first, second = load_space(given), load_space(own)
    except ConfigError:
        return False
    return {**first.__dict__, "source": ""} == {**second.__dict__, "source": ""}


def _warm_start(opts: SweepOptions, space: SearchSpace) -> tuple[list[dict[str, Any]], str | None]:
    """The earlier sweep's best configurations to enqueue after the pinned trials (none on --resume)."""
    from agl.distributed.searcher import read_earlier_trials, warm_start_points

    if not opts.warm_start_from:
        return [], None
    if opts.resume:
        log.warning("--warm-start-from is ignored with --resume: the restored search keeps its own trials")
        return [], None
    if opts.warm_start_top < 1:
        raise ConfigError("--warm-start-top", f"must be >= 1, got {opts.warm_start_top}")
    table, source = read_earlier_trials(opts.warm_start_from, opts.tracking_uri)
    room = space.num_samples - len(space.start_with)
    points = warm_start_points(table, space, min(opts.warm_start_top, max(room, 0)), source)
    if not points:
        log.warning("%s: no configuration of the earlier sweep fits this space (or no trial room after the "
                    "%d pinned ones); nothing enqueued", source, len(space.start_with))
    else:
        log.info("warm start: %d configuration(s) of %s enqueued after the pinned trials", len(points), source)
    return points, source


def _gene_consensus(grid: Any, table: pd.DataFrame, space: SearchSpace, out: Path, tracker: tracking.Tracker,
                    parent_run_id: str, top: int, tracked: bool) -> dict[str, Any] | None:
    """OUT/gene_consensus.csv/png of the top trials, logged to the parent run (when the tracker is up)."""
    from agl.distributed.consensus import log_consensus, sweep_consensus

    found = sweep_consensus(grid, table, space.metric, space.mode, out, top)
    if found is not None and tracked:
        try:
            log_consensus(tracker, parent_run_id, found)
        except Exception as err:  # the files stay in OUT; tracking never fails a finished sweep
            log.warning("MLflow failed while logging the gene consensus (%s); it stays in %s", err, out)
    return found


def _fold_names(store_path: str, space: SearchSpace) -> list[str]:
    from agl.data.store import open_store
    from agl.distributed.cv import fold_roles

    return list(fold_roles(open_store(store_path), space))


def _refit_champion(grid: Any, space: SearchSpace, store_spec: str, out: Path, tracker: tracking.Tracker,
                    experiment_id: str, parent_run_id: str, threads: int, resources: Mapping[str, float],
                    dataset: tracking.DatasetRef | None = None) -> dict[str, Any] | None:
    """Refit the best cross-validated configuration on every non-test spot (OUT/champion), score it
    once on the test part and log it as the sweep's ``refit`` child run; returns that record.

    The refit is a Ray task with a trial's ``resources`` (:func:`agl.distributed.cv.remote_refit`): it runs
    where trials run (a GPU node, the nodes of ``--trial-resource``), not on the head's CPU; ``store_spec``
    is located on that node as a trial locates it."""
    from agl.distributed.cv import remote_refit

    table = summary_table(grid, space)
    best = best_trial(table, space)
    if best is None:
        log.warning("no trial finished every fold; no champion to refit")
        return None
    config = next(dict(r.config) for r in grid if trial_id_of(r) == best["trial_id"])
    dest = out / CHAMPION_DIR
    summary = runs.read_record(dest)
    if summary is None or summary.get("refit_of") != best["trial_id"]:
        summary, ran_on = remote_refit(space, config, store_spec, dest, resources, threads=threads)
        log.info("refit of %s ran on node %s (pid %s)", best["trial_id"], ran_on["node_id"], ran_on["pid"])
        summary = runs.write_record(dest, {**summary, "refit_of": best["trial_id"], "split": space.split})
    record = {"trial_id": best["trial_id"], "folder": str(dest), "metrics": summary["metrics"], "run_id": None,
              "config": config}
    try:
        record["run_id"] = log_refit(tracker, experiment_id, parent_run_id, space, record, dataset)
    except Exception as err:  # tracker down: the folder is kept; finish_tracking marks the sweep pending
        log.warning("MLflow failed while logging the refit champion (%s); it stays in %s", err, dest)
    return record


def warm_caches(store_path: str, space: SearchSpace) -> None:
    """Compute the frozen-feature cache once in the driver, so concurrent trials only read it."""
    from agl.training.loop import TrainConfig

    cfg = TrainConfig.from_dict(space.train_config({}), source=space.source)
    if cfg.mode == "features":
        from agl.data.store import open_store
        from agl.models import feature_cache

        feature_cache(open_store(store_path), cfg.backbone, cfg.weights, dtype=cfg.feature_dtype)
