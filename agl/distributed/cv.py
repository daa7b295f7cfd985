"""The cross-validated trial objective of a sweep, and the refit of its best configuration.

A space with ``cv`` (see :mod:`agl.distributed.spaces`) names an outer split whose test part
(``loso-B4``: slide B4) the search never sees. A trial trains its configuration on each fold
:func:`agl.data.splits.inner_folds` cuts from the other spots, one fold after the other, and
after every fold reports to Tune:

- ``cv_pcc``: the mean over the folds done so far of the fold's held-out PCC (a fold's
  ``test`` part: in ``loso`` folds a whole slide the fold never trained on), the number Tune,
  Optuna and ASHA see; ``cv_pcc_se``: its standard error (sample sd / sqrt(folds));
- ``folds_done`` (ASHA's time attribute), ``fold_pcc`` (this fold), ``final_k`` (mean k);
- a small checkpoint folder: ``cv.json`` (every fold's metrics), ``folds/<fold>/`` (its run
  record, :mod:`agl.runs`) and, at the top, the trial's record: ``gene_set.csv`` (an auxiliary
  gene is ``selected`` when at least half of the folds selected it; ``final_weight`` is its mean
  over the folds, ``folds_selected`` how many), the last fold's k plot and ``result.json``
  (kind ``cv_trial``: the fold-level metrics).

So a trial stopped by the scheduler after some folds still has its gene set, k and fold
metrics, and a restored trial skips the folds its checkpoint holds. Fold model weights are
not kept; the champion's are: :func:`refit` trains the best configuration on every non-test
spot of the outer split (its own train/val roles) and scores it once on the test part.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from agl import runs
from agl.distributed.storage import node_store
from agl.fileio import atomic_write_json, atomic_write_text, swap_folder

log = logging.getLogger(__name__)

CV_JSON = "cv.json"
FOLDS_DIR = "folds"
CV_METRIC_KEYS = ("cv_pcc", "cv_pcc_se", "fold_pcc", "folds_done", "final_k")


def fold_roles(store: Any, space: Any) -> dict[str, np.ndarray]:
    """Fold name -> spot roles of a space's cross-validation folds (never the outer test part)."""
    from agl.data.splits import inner_folds

    cv = space.cv
    return inner_folds(store.spots, store.split(space.split).to_numpy(), kind=cv["kind"], n_folds=cv["folds"],
                       seed=cv["seed"], max_folds=cv.get("max_folds"))


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample sd / sqrt(n); NaN s.e. for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    if not len(arr):
        return math.nan, math.nan
    se = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else math.nan
    return float(arr.mean()), se


def consensus_genes(fold_tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The trial's gene table from its folds' (same genes in every fold): an auxiliary gene is selected
    when at least half of the folds selected it; final_weight is the mean over the folds;
    folds_selected counts the folds that selected it."""
    tables = list(fold_tables.values())
    if not tables:
        return pd.DataFrame(columns=runs.GENE_COLUMNS + ["folds_selected"])
    first = tables[0].set_index("gene")
    every = pd.concat([t.set_index("gene")[["final_weight", "selected"]] for t in tables])
    every["selected"] = every["selected"].astype(bool)
    grouped = every.groupby(level=0, sort=False)
    table = first[["role", "prior_rank"]].copy()
    table["final_weight"] = grouped["final_weight"].mean().reindex(table.index)
    table["folds_selected"] = grouped["selected"].sum().reindex(table.index).astype(int)
    table["selected"] = (table["role"] == "primary") | (table["folds_selected"] * 2 >= len(tables))
    return table.reset_index()[runs.GENE_COLUMNS + ["folds_selected"]]


def summarise(folds: Mapping[str, Mapping[str, float]], total: int) -> dict[str, float]:
    """The trial-level metrics after ``len(folds)`` of ``total`` folds."""
    pcc, se = mean_se([f["test_pcc"] for f in folds.values()])
    out = {"cv_pcc": pcc, "cv_pcc_se": se, "folds_done": len(folds), "folds_total": total,
           "final_k": float(np.mean([f["final_k"] for f in folds.values()])),
           "cv_val_pcc": float(np.mean([f["best_val_pcc"] for f in folds.values()])),
           "epochs_run": float(np.mean([f["epochs_run"] for f in folds.values()]))}
    for key in ("scc", "mse"):
        values = [f[f"test_{key}"] for f in folds.values() if f"test_{key}" in f]
        if values:
            out[f"cv_{key}"] = float(np.mean(values))
    return out


def write_trial_folder(folder: Path, folds: Mapping[str, Mapping[str, float]], total: int,
                       config: Mapping[str, Any]) -> dict[str, Any]:
    """cv.json and the trial's run record (gene_set.csv, k plot, result.json) from folds/<fold>/."""
    tables = {name: runs.read_gene_table(folder / FOLDS_DIR / name) for name in folds}
    genes = consensus_genes(tables)
    atomic_write_text(folder / runs.GENE_SET_CSV, genes.to_csv(index=False))
    last = folder / FOLDS_DIR / list(folds)[-1] / runs.K_PLOT
    if last.is_file():
        shutil.copyfile(last, folder / runs.K_PLOT)
    metrics = summarise(folds, total)
    atomic_write_json(folder / CV_JSON, {"folds": dict(folds), "total": total}, indent=1)
    return runs.write_record(folder, {"kind": "cv_trial", "method": config.get("method"), "metrics": metrics,
                                      **runs.gene_set_fields(genes), "config": dict(config), "folds": dict(folds)})


def agl_cv_trial(config: dict[str, Any], *, space: Any, store_path: str, threads: int = 1) -> None:
    """One cross-validated trial: fit() on each fold in turn, a Tune report (and checkpoint) per fold."""
    import torch
    from ray import tune

    from agl.data.store import open_store
    from agl.distributed.results import diverged_report
    from agl.errors import NonFiniteLossError
    from agl.service import run_config
    from agl.training.loop import TrainConfig

    torch.set_num_threads(threads)
    cpu_started = time.thread_time()  # the trial's own CPU (one torch thread computes in this thread), not the load's
    cfg = TrainConfig.from_dict(space.train_config(config), source=space.source)
    store_path = node_store(store_path)  # this node's copy: the demo built here, a store URI staged here
    store = open_store(store_path)
    roles = fold_roles(store, space)
    work = Path(tempfile.mkdtemp(prefix="agl-cv-trial-"))
    try:
        done: dict[str, dict[str, float]] = {}
        previous = tune.get_checkpoint()
        with (previous.as_directory() if previous else nullcontext(None)) as restored:
            if restored is not None and (Path(restored) / CV_JSON).is_file():
                shutil.copytree(restored, work, dirs_exist_ok=True)
                done = json.loads((work / CV_JSON).read_text())["folds"]
        base = None  # built once: every fold shares its target reader and memory-mapped inputs
        for name, fold in roles.items():
            if name in done:
                continue  # restored trial: this fold is in the checkpoint
            shared = base.with_roles(fold, cfg.val_outer_fraction) if base is not None else None
            try:
                run = run_config(cfg, store, space.split, rank=0, world_size=1, roles=fold, bundle=shared,
                                 record_to=work / FOLDS_DIR / name, record_split=name, copy_checkpoint=True)
            except NonFiniteLossError as err:  # ends the trial, failed, without a retry
                tune.report({**diverged_report(err, space.metric), "fold": name})
                return
            base = base if base is not None else run.data
            summary = run.record
            done[name] = summary["metrics"]
            trial = write_trial_folder(work, done, len(roles), cfg.to_dict())
            log.info("fold %s (%d/%d) %s: held-out PCC %.4f, cv_pcc %.4f +- %.4f", name, len(done), len(roles),
                     cfg.method, done[name]["test_pcc"], trial["metrics"]["cv_pcc"], trial["metrics"]["cv_pcc_se"])
            tune.report({**trial["metrics"], "fold": name, "fold_pcc": done[name]["test_pcc"],
                         "final": len(done) == len(roles), "trial_cpu_s": time.thread_time() - cpu_started},
                        checkpoint=tune.Checkpoint.from_directory(str(work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def refit(space: Any, config: Mapping[str, Any], store_path: str, dest: str | Path,
          threads: int | None = None) -> dict[str, Any]:
    """Train ``config`` (a trial's sampled values) on the outer split (every non-test spot: its train
    and val roles) and score it once on the test part; write the run folder (checkpoint, gene set,
    k plot, result.json with test_* metrics) to ``dest``; return its summary."""
    from agl.service import run_config

    work = Path(tempfile.mkdtemp(prefix="agl-refit-"))
    try:
        run = run_config(space.train_config(config), store_path, space.split, source=space.source, threads=threads,
                         rank=0, world_size=1, out_dir=work, record_to=work / "final", copy_checkpoint=True)
        cfg, summary = run.config, run.record
        dest = Path(dest)
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(work / "final", tmp)
        swap_folder(tmp, dest)  # a previous refit of the same sweep (resume) is replaced only once this one is in place
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("refit %s on %s (all non-test spots): test PCC %.4f, k %d", cfg.method, space.split,
             summary["metrics"].get("test_pcc", math.nan), int(summary["metrics"]["final_k"]))
    return summary


def _refit_task(space: Any, config: Mapping[str, Any], store_spec: str, threads: int | None) -> dict[str, Any]:
    """The body of the refit's Ray task: :func:`refit` on this node's copy of the store; the champion folder
    comes back as a tar archive (the driver's node may share no disk with this one)."""
    import io
    import os
    import tarfile

    import ray

    work = Path(tempfile.mkdtemp(prefix="agl-refit-task-"))
    try:
        summary = refit(space, config, node_store(store_spec), work / "champion", threads=threads)
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            tar.add(work / "champion", arcname=".")
        return {"summary": summary, "archive": archive.getvalue(),
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def remote_refit(space: Any, config: Mapping[str, Any], store_spec: str, dest: str | Path,
                 resources: Mapping[str, float], threads: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`refit` as a Ray task that holds a trial's ``resources`` (``cpu``, ``gpu`` and custom ones), so it
    runs where trials run, never on a head without CPUs; writes ``dest`` on this (the driver's) node as
    :func:`refit` does and returns (its summary, where it ran: node id and process id).

    An error in the task is raised here as itself (Ray's wrapper removed), as an in-process refit would."""
    import io
    import tarfile

    import ray
    from ray.exceptions import RayTaskError

    custom = {k: float(v) for k, v in resources.items() if k not in ("cpu", "gpu")}
    task = ray.remote(num_cpus=float(resources.get("cpu", 1)), num_gpus=float(resources.get("gpu", 0)),
                      resources=custom or None, max_retries=0)(_refit_task)
    try:
        found = ray.get(task.remote(space, dict(config), store_spec, threads))
    except RayTaskError as err:
        cause = getattr(err, "cause", None)
        raise (cause if isinstance(cause, Exception) else err) from None
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(found["archive"]), mode="r") as tar:
        tar.extractall(tmp, filter="data")  # refuses links and paths outside tmp
    swap_folder(tmp, dest)  # a previous refit of the same sweep (resume) is replaced only once this one is in place
    return found["summary"], {"node_id": found["node_id"], "pid": found["pid"]}


__all__ = ["CV_JSON", "agl_cv_trial", "consensus_genes", "fold_roles", "mean_se", "refit", "remote_refit", "summarise"]
