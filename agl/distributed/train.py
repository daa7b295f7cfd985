"""Ray Train: the core ``agl.training.loop.fit`` loop in every worker of a ``TorchTrainer``.

``train_func`` runs ``fit`` unchanged. Ray Train has already set up torch.distributed
(gloo on CPU, NCCL on GPU), so ``fit`` all-reduces the model gradients and, by hand, the
gate's hypergradients (DDP does not sync double backward). Every rank reports every
epoch (``ray.train.report`` is a barrier); rank 0 attaches fit's checkpoint folder.
After a worker dies, Ray Train restarts the group and ``fit`` resumes from
``ray.train.get_checkpoint()``.

Two ways a worker gets its training spots (``data``):

- ``"bundle"``: ``make_bundle(store, split, cfg, rank, world_size)`` slices the seeded
  shuffled order per rank (every worker memory-maps the Arrow store);
- ``"ray_data"``: the training spots of the store's Parquet spot table are read through Ray
  Data (``row`` and the split's gene columns of ``expression``, decoded per batch) and split
  by Ray Train: ``get_dataset_shard("train")`` is this worker's part of
  ``Dataset.streaming_split(world_size, equal=True)``, so a worker receives only its share of
  the rows, block by block, and no process materialises the table. A batch's targets come
  from the shard's ``expression`` column and its inputs (memory-mapped cached features, or
  patches) by the shard's ``row``. Validation and test use the per-batch path of every other
  run (``StoreTargets`` + streamed ``StreamingMetrics``, ``agl.training.streaming``; all ranks
  evaluate the same spots). A store given as a storage URI (``s3://...``) is staged once per
  node for those (:func:`agl.distributed.storage.node_store`), while the training table is read
  from the URI itself through its pyarrow filesystem, so Ray Data's read tasks run on any node.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from agl.distributed.storage import node_store
from agl.errors import ConfigError
from agl.fileio import atomic_write_text

log = logging.getLogger(__name__)

DATA_SOURCES = ("bundle", "ray_data")
SHUFFLE_BUFFER = 512


class RayReporter:
    """``agl.training.loop.Reporter`` for a Train worker: every rank reports; only rank 0 has a checkpoint."""

    def __init__(self, extra: Mapping[str, Any] | None = None):
        self.extra = dict(extra or {})

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report({**metrics, **self.extra}, checkpoint=checkpoint)


@dataclass
class ShardBundle:
    """A bundle whose training batches come from this worker's Ray Data shard.

    Everything else (gene set, priors, streamed validation and test) is the base bundle's, whose
    targets are read per batch. The shard's ``expression`` holds the split's genes in the base
    bundle's order (``read_train_part``'s ``gene_columns``).
    """

    base: Any
    shard: Any                   # ray.data.DataIterator
    columns: np.ndarray          # gene-set columns of the store's expression vector
    rank: int = 0

    def __getattr__(self, name: str) -> Any:  # genes, n_primary, prior_ranks, input_dim, eval_arrays, ...
        return getattr(self.base, name)

    def train_batches(self, batch_size: int, epoch: int) -> Iterator[tuple[Any, Any]]:
        import torch

        from agl.training.bundles import N_VIEWS

        rng = np.random.default_rng([self.base.seed, epoch, 2, self.rank])
        # Ray Train splits with equal=True: equal shard lengths give every rank the same number of
        # batches, so the per-step all-reduce stays in step (drop_last would empty small shards)
        for batch in self.shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False,
                                             local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                             local_shuffle_seed=int(rng.integers(2**31))):
            rows = np.asarray(batch["row"], dtype=np.int64)
            expression = np.stack(batch["expression"]).astype(np.float32, copy=False)  # a 2-D column or rows
            if expression.shape != (len(rows), len(self.columns)):
                raise ValueError(f"a Ray Data batch holds {expression.shape[1:]} genes, the split has "
                                 f"{len(self.columns)}: build the dataset with read_train_part")
            views = rng.integers(0, N_VIEWS, size=len(rows))
            yield self.base.inputs.batch(rows, views), torch.from_numpy(np.ascontiguousarray(expression))


def read_train_part(store: str | Path, split: str) -> Any:
    """The training spots of ``split`` as a Ray Dataset of (row, the split's gene columns of expression).

    ``store``: a local store folder, or a storage URI (``s3://bucket/stores/NAME``) whose Parquet files
    Ray Data then reads in place through the URI's pyarrow filesystem (the split's rows and gene set come
    from this node's staged copy, :func:`agl.distributed.storage.node_store`)."""
    from agl.data.loaders import ray_dataset
    from agl.data.store import open_store
    from agl.distributed.storage import is_uri

    opened = open_store(node_store(str(store)))
    columns = opened.gene_set(split)["column"].to_numpy()
    return ray_dataset(opened, split, "train", columns=("row", "expression"), gene_columns=columns,
                       uri=str(store) if is_uri(store) else None)


def train_func(config: dict[str, Any]) -> None:
    """The Ray Train loop: one ``fit`` per worker, resumed from the latest checkpoint after a failure.

    ``config``: ``train`` (TrainConfig dict), ``store``, ``split``, ``data`` ("bundle" | "ray_data"),
    ``threads``, optionally ``pid_dir`` (each worker writes its PID there; used by failure drills) and
    ``report_divergence`` (a sweep trial: a NonFiniteLossError ends the run with a ``diverged`` report
    instead of failing it, so neither Train nor Tune retries it).
    """
    import ray.train

    from agl import runs
    from agl.distributed.results import diverged_report
    from agl.errors import NonFiniteLossError
    from agl.service import run_config

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("pid_dir"):
        _write_pid(Path(config["pid_dir"]), rank)

    def shard(base: Any) -> Any:
        return ShardBundle(base, ray.train.get_dataset_shard("train"), base.genes["column"].to_numpy(), rank)

    work = Path(tempfile.mkdtemp(prefix=f"agl-train-r{rank}-"))
    previous = ray.train.get_checkpoint()
    resumed_from = -1
    try:
        with (previous.as_directory() if previous else nullcontext(None)) as resume_from:
            if resume_from is not None:
                resumed_from = int(json.loads((Path(resume_from) / "state.json").read_text()).get("next_epoch", 0))
                log.info("rank %d resumes from %s (epoch %d)", rank, previous.path, resumed_from)
            # this node's copy of the store (workers may run on nodes that share no files with the driver)
            try:
                run = run_config(config["train"], node_store(config["store"]), config["split"],
                                 threads=int(config.get("threads", 1)), rank=rank, world_size=world,
                                 wrap_data=shard if config.get("data", "bundle") == "ray_data" else None,
                                 reporter=RayReporter({"resumed_from_epoch": resumed_from}),
                                 resume_from=resume_from, out_dir=work)
            except NonFiniteLossError as err:  # every rank stops on it together
                if not config.get("report_divergence"):
                    raise
                ray.train.report(diverged_report(err, "val_pcc"))  # a sweep trial: end it, failed, no restart
                return
            result, base = run.result, run.data
        final_metrics: dict[str, Any] = {"final": True, "resumed_from_epoch": resumed_from}
        checkpoint = None
        if rank == 0:
            # in-process mode (num_workers=0) does not copy checkpoints to storage: write it there directly
            final = Path(config["final_dir"]) if config.get("final_dir") else work / "final"
            summary = runs.finalize_run(result, base, final, split=config["split"])
            final_metrics.update(summary["metrics"], val_pcc=result.best_val_pcc, epoch=result.epochs_run - 1)
            checkpoint = ray.train.Checkpoint.from_directory(str(final))
        else:
            final_metrics.update(runs.final_metrics(result), val_pcc=result.best_val_pcc, epoch=result.epochs_run - 1)
        ray.train.report(final_metrics, checkpoint=checkpoint)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_pid(folder: Path, rank: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank{rank}-{os.getpid()}.pid"
    atomic_write_text(path, str(os.getpid()))


def scaling_config(scaling: Mapping[str, Any]) -> Any:
    """``ScalingConfig`` from a plain dict: num_workers (0 = in-process), use_gpu, resources_per_worker."""
    from ray.train import ScalingConfig

    known = {"num_workers", "use_gpu", "resources_per_worker", "placement_strategy"}
    unknown = sorted(set(scaling) - known)
    if unknown:
        raise ConfigError("scaling", f"unknown key(s) {unknown}; allowed: {sorted(known)}")
    n = scaling.get("num_workers", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError("scaling.num_workers", f"must be an integer >= 0, got {n!r}")
    return ScalingConfig(**{k: v for k, v in scaling.items() if v is not None})


def build_trainer(cfg: Any, store_path: str | Path, split: str, scaling: Mapping[str, Any],
                  storage_path: str | Path, name: str = "agl-train", failure_max: int = 1,
                  data: str = "bundle", callbacks: list | None = None, pid_dir: str | Path | None = None,
                  threads: int = 1, num_to_keep: int = 2, report_divergence: bool = False) -> Any:
    """A ``TorchTrainer`` running :func:`train_func` for one TrainConfig (dict or TrainConfig)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    if data not in DATA_SOURCES:
        raise ConfigError("data", f"must be one of {DATA_SOURCES}, got {data!r}")
    cfg_dict = cfg if isinstance(cfg, dict) else cfg.to_dict()
    loop_config = {"train": cfg_dict, "store": str(store_path), "split": split, "data": data,
                   "threads": threads, "pid_dir": str(pid_dir) if pid_dir else None,
                   "report_divergence": report_divergence}
    if scaling.get("num_workers", 1) == 0:
        if "://" in str(storage_path):
            raise ConfigError("scaling.num_workers", "in-process mode (0 workers) needs a local storage_path")
        loop_config["final_dir"] = str(Path(storage_path) / name / "final_checkpoint")
    datasets = {"train": read_train_part(str(store_path), split)} if data == "ray_data" else None
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=scaling_config(scaling),
        run_config=RunConfig(
            name=name, storage_path=str(storage_path), callbacks=callbacks,
            failure_config=FailureConfig(max_failures=failure_max),
            # the latest checkpoints suffice: each holds the best epoch's weights (best.safetensors)
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
        ),
        datasets=datasets,
    )


def run_train(cfg: Any, store: str | Path, split: str, scaling: Mapping[str, Any], storage_path: str | Path,
              failure_max: int = 1, **kwargs: Any) -> Any:
    """Fit one TrainConfig with Ray Train; returns the ``ray.train.Result`` (metrics, checkpoint, path)."""
    trainer = build_trainer(cfg, store, split, scaling, storage_path, failure_max=failure_max, **kwargs)
    started = time.perf_counter()
    result = trainer.fit()
    log.info("Ray Train run finished in %.1f s: val PCC %.4f, test PCC %s", time.perf_counter() - started,
             float(result.metrics.get("best_val_pcc", float("nan"))), result.metrics.get("test_pcc"))
    return result
