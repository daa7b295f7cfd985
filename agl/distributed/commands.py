"""Sub-commands ``agl tune``, ``agl tune-sync``, ``agl train-ray`` and ``agl predict``.

``launch/tune.py``, ``launch/train.py`` and ``launch/predict.py`` are thin wrappers
around the same parsers and handlers.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from agl.data.commands import add_reader_args
from agl.data.locate import add_store_arg

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- agl tune
def add_tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", default="default",
                   help="search space: a bundled name (default, tiny, large, finetune-gpu) or a YAML path")
    add_store_arg(p)
    p.add_argument("--out", default=None,
                   help="output folder (trial table, MLflow DB, Ray results); default: results/sweep, or the "
                        "next free results/sweep-N when that holds an earlier sweep (never overwritten)")
    p.add_argument("--name", default="agl-sweep", help="experiment name in Ray Tune")
    p.add_argument("--num-samples", type=int, default=None, help="number of trials (default: the space's)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto' on a cluster node); default: start Ray locally")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db)")
    p.add_argument("--experiment", default="agl-sweep", help="MLflow experiment name")
    p.add_argument("--model-name", default="agl-model", help="MLflow registered model for the champion")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --out (errored trials resume)")
    p.add_argument("--trainer", choices=("function", "train"), default="function",
                   help="function: fit() in-process per trial (ASHA allowed); train: a TorchTrainer per trial "
                        "(data parallel, FIFO + in-loop early stopping)")
    p.add_argument("--workers-per-trial", type=int, default=None,
                   help="TorchTrainer workers per trial (--trainer train; default 1 with GPUs, so a trial's workers "
                        "never span two 1-GPU nodes, else 2)")
    p.add_argument("--use-gpu", action="store_true", help="GPU workers (--trainer train)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what fits)")
    p.add_argument("--storage-path", default=None,
                   help="Ray results/checkpoints (default OUT/ray; on a multi-node cluster use s3://... or a shared mount)")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard on 127.0.0.1 (local Ray only)")
    p.add_argument("--warm-start-from", default=None, metavar="SWEEP",
                   help="enqueue the best configurations of an earlier sweep first: its --out folder, or its MLflow "
                        "parent run as runs:/<run_id> (on --tracking-uri)")
    p.add_argument("--warm-start-top", type=int, default=3, metavar="N",
                   help="how many of the earlier sweep's best configurations to enqueue")
    p.add_argument("--searcher", choices=("tpe", "random", "tpe-plain"), default="tpe",  # searcher.SAMPLERS (tested)
                   help="Optuna sampler after the pinned/warm-start trials: tpe; random (a baseline); tpe-plain "
                        "(TPE with Optuna's defaults and stopped trials scored as complete: the searcher before "
                        "2026-12-07, a baseline)")
    p.add_argument("--consensus-top", type=int, default=5, metavar="N",
                   help="the gene consensus counts how often each auxiliary gene is selected in the N best "
                        "finished trials")
    p.add_argument("--trial-resource", action="append", default=[], metavar="NAME=AMOUNT",
                   help="a custom Ray resource each trial needs (repeatable), e.g. trial_node=1 to keep trials on "
                        "nodes started with --resources '{\"trial_node\": 4}'")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="hand Tune a checkpoint every N epochs (each is uploaded to --storage-path; a restarted trial "
                        "loses up to N-1 epochs); default: 1 on a local storage path, 5 on s3:// or another URI")
    p.add_argument("--max-failures", type=int, default=3,
                   help="times a trial is retried from its last checkpoint after its node or process died (default 3: "
                        "spot instances get reclaimed)")


def parse_resources(items: list[str] | None, flag: str = "--trial-resource") -> dict[str, float]:
    """``["name=1", ...]`` -> ``{"name": 1.0}``; a clear error naming the flag for anything else."""
    from agl.errors import ConfigError

    found: dict[str, float] = {}
    for item in items or []:
        name, sep, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or value <= 0 or name.strip() in ("CPU", "GPU", "memory"):
            raise ConfigError(flag, f"expected NAME=AMOUNT with a custom resource name and an amount > 0, got {item!r}")
        found[name.strip()] = value
    return found


def default_sweep_out(resume: bool, base: Path = Path("results/sweep")) -> str:
    """Where a sweep goes without --out: ``base``, or with earlier sweeps there, the next free
    ``base-N``, so re-running the main job starts a new sweep and keeps the old ones (with
    --resume: the newest existing one)."""
    from agl.distributed.tune import SWEEP_JSON

    taken = [base] + [base.with_name(f"{base.name}-{n}") for n in range(2, 10_000)]
    used = [p for p in taken if (p / SWEEP_JSON).is_file()]
    if resume:
        return str(used[-1] if used else base)
    path = next(p for p in taken if not (p / SWEEP_JSON).is_file() and (p == base or not p.exists()))
    if path != base:
        log.info("%s holds an earlier sweep; this one goes to %s", base, path)
    return str(path)


def cmd_tune(args: argparse.Namespace) -> int:
    from agl import tracking
    from agl.distributed.tune import SweepOptions, format_table, run_sweep

    if args.tracking_uri:  # a typo must not leave a new database (or folder) behind: its folder must exist
        tracking.check_database(tracking.check_tracking_uri(args.tracking_uri), must_exist=False)
    opts = SweepOptions(space=args.space, store=args.store, out=args.out or default_sweep_out(args.resume),
                        name=args.name,
                        num_samples=args.num_samples, address=args.address, num_cpus=args.num_cpus,
                        tracking_uri=args.tracking_uri, experiment=args.experiment, model_name=args.model_name,
                        resume=args.resume, trainer=args.trainer, workers_per_trial=args.workers_per_trial,
                        use_gpu=args.use_gpu, max_concurrent=args.max_concurrent, storage_path=args.storage_path,
                        dashboard=args.dashboard, warm_start_from=args.warm_start_from,
                        warm_start_top=args.warm_start_top, consensus_top=args.consensus_top,
                        searcher=args.searcher, trial_resources=parse_resources(args.trial_resource),
                        max_failures=args.max_failures, checkpoint_every=args.checkpoint_every)
    if opts.max_failures < 0:
        from agl.errors import ConfigError

        raise ConfigError("--max-failures", f"must be >= 0, got {opts.max_failures}")
    summary = run_sweep(opts)
    print(summary.text or format_table(summary.table, summary.best))
    print(f"\ntrial table: {summary.paths.get('table_csv')}\nplot: {summary.paths.get('table_png')}")
    print(f"MLflow: {summary.tracking_uri} (parent run {summary.parent_run_id}); "
          f"champion: {args.model_name} version {summary.champion_version or '-'}")
    if summary.consensus:
        found = summary.consensus
        print(f"gene consensus: {found['size']} auxiliary genes selected in at least half of the top "
              f"{len(found['trials'])} trials ({found['paths']['consensus_csv']})")
    experiment_id = _sweep_experiment(Path(opts.out))
    if experiment_id is not None:
        print(ui_hint(summary.tracking_uri, experiment_id))
    if summary.tracking_pending:
        from agl.distributed.sync import sync_command

        print(f"\nwarning: MLflow at {summary.tracking_uri} missed part of this sweep; every result is kept in "
              f"{opts.out}. Send it once MLflow is back: {sync_command(opts.out)}", file=sys.stderr)
    if not summary.complete:
        print(f"\ninterrupted: continue with the same command plus --resume", file=sys.stderr)
        return 130
    return 0 if summary.best is not None else 1


UI_PORT = 5000


def ui_hint(tracking_uri: str, experiment_id: str) -> str:
    """How to open the sweep's runs in the MLflow UI: the server to start (local SQLite) and the runs page.

    MLflow 3.17's UI picks the experiment page's tabs from the sidebar's GenAI / machine-learning
    switch (kept in the browser, GenAI by default), not from the ``mlflow.experimentKind`` tag, so a
    fresh browser opens a GenAI overview; ``#/experiments/<id>/runs?workflowType=machine_learning``
    opens the training runs table directly."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"UI: {tracking_uri.rstrip('/')}/{page}"
    return (f"UI: mlflow server --host 127.0.0.1 --port {UI_PORT} --backend-store-uri {tracking_uri}\n"
            f"    then open http://127.0.0.1:{UI_PORT}/{page}")


def _sweep_experiment(out: Path) -> str | None:
    """The MLflow experiment id a sweep in ``out`` recorded (sweep.json), if any."""
    from agl.distributed.tune import SWEEP_JSON

    try:
        return str(json.loads((out / SWEEP_JSON).read_text())["experiment_id"])
    except (OSError, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------- agl tune-sync
def add_sync_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the sweep's output folder (holds sweep.json)")
    p.add_argument("--tracking-uri", default=None,
                   help="send to this MLflow instead of the sweep's own (e.g. the server moved)")


def cmd_tune_sync(args: argparse.Namespace) -> int:
    from agl.distributed.sync import sync_sweep

    report = sync_sweep(args.out, args.tracking_uri)
    print(json.dumps({"runs": len(report.runs), "created": report.created, "epochs_logged": report.epochs_logged,
                      "run_folders_logged": report.folders_logged, "closed": report.closed,
                      "champion_version": report.champion}, indent=1))
    return 0


# --------------------------------------------------------------------------- agl train-ray
def add_train_args(p: argparse.ArgumentParser) -> None:
    add_store_arg(p)
    p.add_argument("--split", default="kfold-s0-f0", help="split name")
    p.add_argument("--config", help="YAML or JSON file of TrainConfig settings")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one TrainConfig setting")
    p.add_argument("--num-workers", type=int, default=2, help="Train workers (0 = in-process, for debugging)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                   help="the run's device setting; cuda also reserves one GPU per worker (--use-gpu)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs per worker (with --data ray_data leave CPUs for Ray Data readers)")
    p.add_argument("--data", choices=("bundle", "ray_data"), default="bundle",
                   help="bundle: each worker slices the memory-mapped store; ray_data: Ray Data shards of the Parquet store")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from (from the last checkpoint)")
    p.add_argument("--storage-path", default="results/ray", help="Ray Train results and checkpoints")
    p.add_argument("--name", default=None, help="run name (same name + storage path resumes a run)")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto'); default: local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI to log the run to (optional)")
    p.add_argument("--experiment", default="agl-train", help="MLflow experiment name")


def cmd_train_ray(args: argparse.Namespace) -> int:
    from agl.commands import parse_sets, read_config_file
    from agl import tracking
    from agl.data.locate import resolve_store
    from agl.distributed.runtime import init_ray
    from agl.distributed.train import run_train
    from agl.training.loop import TrainConfig

    device = {"device": args.device} if args.device else {}
    cfg = TrainConfig.from_dict({**read_config_file(args.config), **parse_sets(args.set), **device},
                                source=args.config or "--set")
    use_gpu = args.use_gpu or cfg.device.startswith("cuda")
    if args.tracking_uri:  # refuse an unreachable server before training, not after
        tracking.check_reachable(tracking.check_database(tracking.check_tracking_uri(args.tracking_uri), False))
    from agl.distributed.storage import is_uri

    # a storage URI is staged on each worker's node (and its training table read in place by --data ray_data)
    store = args.store if is_uri(args.store) else resolve_store(args.store)
    init_ray(args.address, num_cpus=args.num_cpus)
    scaling: dict[str, Any] = {"num_workers": args.num_workers, "use_gpu": use_gpu}
    if args.cpus_per_worker is not None:
        scaling["resources_per_worker"] = {"CPU": args.cpus_per_worker}
    name = args.name or f"agl-train-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = str(Path(args.storage_path).resolve()) if "://" not in args.storage_path else args.storage_path
    result = run_train(cfg, store, args.split, scaling, storage, failure_max=args.max_failures,
                       name=name, data=args.data)
    if result.error:
        raise result.error
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    print(json.dumps({"run": name, "checkpoint": result.checkpoint.path if result.checkpoint else None,
                      **metrics}, indent=1))
    if args.tracking_uri and result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            run_id = tracking.log_finished_run(tracking.make_tracker(args.tracking_uri), args.experiment, name,
                                               cfg.to_dict(), Path(folder), tags={"agl.split": args.split})
        print(f"MLflow run {run_id} in {args.tracking_uri}")
    return 0


# --------------------------------------------------------------------------- agl predict
def add_predict_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (a checkpoint folder, or the MLflow champion)")
    src.add_argument("--checkpoint", default=None, help="checkpoint folder (safetensors + JSON)")
    src.add_argument("--tracking-uri", default=None, help="MLflow tracking URI holding the registered model")
    src.add_argument("--model-name", default="agl-model", help="registered model name")
    src.add_argument("--alias", default="champion", help="model version alias")
    p.add_argument("--input", required=True, help="slide data: her2st root, HEST root, Visium outs/, or .h5ad")
    p.add_argument("--format", default="her2st", help="reader: her2st | hest | visium | anndata")
    add_reader_args(p)
    p.add_argument("--reader-arg", action="append", metavar="KEY=VALUE", help="extra reader argument (repeatable)")
    p.add_argument("--out", required=True, help="output folder (predictions.h5ad + maps/)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier `agl predict` output in --out (never the input, "
                        "nor a folder of other files)")
    p.add_argument("--patch-um", type=float, default=None, help="patch size in um (default: as in training)")
    p.add_argument("--patch-px", type=int, default=None, help="patch size in px (default: as in training)")
    p.add_argument("--top-genes", type=int, default=6,
                   help="genes to map (PNG): the best-predicted primary genes when the slide has measured "
                        "expression, else the first primary genes")
    p.add_argument("--genes", default=None, metavar="GENE,GENE",
                   help="map these genes instead, e.g. markers: --genes ERBB2,ESR1,PGR (any gene the model outputs)")
    p.add_argument("--no-clip", action="store_true",
                   help="maps show predictions as the model gives them (default: below 0 on the log1p scale shown as 0)")
    p.add_argument("--min-gene-fraction", type=float, default=0.5, metavar="F",
                   help="refuse a slide holding fewer than this fraction of the model's genes (by symbol or ID)")
    p.add_argument("--warn-gene-fraction", type=float, default=0.9, metavar="F",
                   help="warn when the slide holds fewer than this fraction of the model's genes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def cmd_predict(args: argparse.Namespace) -> int:
    from agl.commands import parse_sets
    from agl.data.commands import reader_kwargs
    from agl.predict import PredictOptions, predict_slides

    reader_args = {**parse_sets(args.reader_arg), **reader_kwargs(args.format, args)}
    summary = predict_slides(PredictOptions(
        out=args.out, input=args.input, format=args.format, reader_args=reader_args, checkpoint=args.checkpoint,
        tracking_uri=args.tracking_uri, model_name=args.model_name, alias=args.alias, patch_um=args.patch_um,
        patch_px=args.patch_px, top_genes=args.top_genes, genes=_gene_list(args.genes), device=args.device,
        overwrite=args.overwrite,
        clip_maps=not args.no_clip, min_gene_fraction=args.min_gene_fraction, warn_gene_fraction=args.warn_gene_fraction))
    print(json.dumps(summary, indent=1))
    return 0


def _gene_list(text: str | None) -> list[str] | None:
    """``--genes ERBB2,GRB7`` as a list (None when not given)."""
    genes = [g.strip() for g in (text or "").split(",") if g.strip()]
    return genes or None


# --------------------------------------------------------------------------- agl features
def add_features_args(p: argparse.ArgumentParser) -> None:
    add_store_arg(p)
    p.add_argument("--backbone", default="torchvision/mobilenet_v2", help="frozen encoder (agl.models registry name)")
    p.add_argument("--weights", default="imagenet", help="'imagenet', a hub name, or a weights file")
    p.add_argument("--views", type=int, default=8, help="dihedral views per patch (training draws one per epoch)")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Data actors, one encoder each")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (default: 1 if the local Ray has GPUs; required with --address on a "
                        "cluster that shows no GPU yet)")
    p.add_argument("--batch-size", type=int, default=64, help="patches per batch")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="cache file dtype (float16: half the disk and page cache; train with feature_dtype: float16 "
                        "to use it; cast from the float32 cache when that exists)")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto'); default: local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray")


def cmd_features(args: argparse.Namespace) -> int:
    from agl.data.locate import open_store_arg
    from agl.distributed.features import feature_cache_ray
    from agl.distributed.runtime import init_ray

    store = open_store_arg(args.store)
    init_ray(args.address, num_cpus=args.num_cpus)
    feats = feature_cache_ray(store, args.backbone, args.weights, views=args.views, num_workers=args.num_workers,
                              batch_size=args.batch_size, num_gpus=args.num_gpus, dtype=args.dtype,
                              joined_cluster=args.address is not None)
    print(f"feature cache {getattr(feats, 'filename', '')}: {feats.shape[0]} views x {feats.shape[1]} spots x "
          f"{feats.shape[2]} dims, {feats.dtype}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tune``, ``tune-sync``, ``train-ray``, ``predict`` and ``features`` to the ``agl`` parser."""
    commands = (
        (sub, "tune", "gene-subset sweep: Ray Tune + Optuna, tracked in MLflow", add_tune_args, cmd_tune),
        (sub, "tune-sync", "send MLflow the results a sweep kept locally while MLflow was unreachable",
         add_sync_args, cmd_tune_sync),
        (sub, "train-ray", "one training run with Ray Train (data parallel, fault tolerant)",
         add_train_args, cmd_train_ray),
        (sub, "predict", "predict expression of a new slide: .h5ad + PNG maps", add_predict_args, cmd_predict),
        (sub, "features", "compute a store's frozen-feature cache on Ray Data (an actor pool; resumable per slide)",
         add_features_args, cmd_features),
    )
    for parent, name, help_text, add_args, handler in commands:
        p = parent.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(func=handler)
