"""Sub-commands ``agl train``, ``agl evaluate`` and ``agl study``."""
from __future__ import annotations

import argparse
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

from agl.cli import LazyHelp, add_list_arg
from agl.data.locate import add_store_arg, open_store_arg, store_path
from agl.errors import ConfigError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- shared helpers
def read_config_file(path: str | None) -> dict[str, Any]:
    """Settings from a YAML or JSON file (a mapping)."""
    if path is None:
        return {}
    import yaml

    from agl.checks import load_yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(file, "config file not found")
    try:
        values = load_yaml(file.read_text())  # JSON is a subset of YAML; 1e-4 is a number
    except yaml.YAMLError as err:
        raise ConfigError(file, f"not valid YAML/JSON: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(file, "must hold a mapping of settings (key: value)")
    return values


def parse_sets(items: Sequence[str] | None) -> dict[str, Any]:
    """``--set key=value`` pairs (values read as YAML scalars/lists)."""
    from agl.evaluation.protocol import parse_key_values

    return parse_key_values(items or [], "--set")


def base_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Config file settings overridden by ``--set``; validated against TrainConfig."""
    from agl.training.loop import TrainConfig

    from_file = read_config_file(args.config)
    if from_file:
        TrainConfig.from_dict(from_file, source=args.config)  # fail fast, naming the file and the key
    values = {**from_file, **parse_sets(args.set)}
    if getattr(args, "val_outer_fraction", None) is not None:
        TrainConfig.from_dict({"val_outer_fraction": args.val_outer_fraction}, source="--val-outer-fraction")
        values["val_outer_fraction"] = args.val_outer_fraction
    TrainConfig.from_dict(values, source="--set")  # ... or the flag the user typed
    return values


def int_list(text: str, name: str) -> list[int]:
    """Comma-separated integers of option ``name`` (an empty text gives [])."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(name, f"{text!r} must be comma-separated integers, e.g. 0,1,2") from None


# --------------------------------------------------------------------------- agl train
def write_run_outputs(out: Path, result: Any, data: Any, split: str, label: str) -> dict[str, Any]:
    """The run record of one ``agl train`` run (result.json, gene_set.csv, plots: see agl.runs)."""
    from agl.runs import write_run_record

    return write_run_record(out, result, data, split, label)


def cmd_train(args: argparse.Namespace) -> int:
    from agl.data.integrity import check_store_files
    from agl.errors import NonFiniteLossError, OutputExistsError
    from agl.fileio import check_output_folder, check_output_location, swap_folder, write_output_marker
    from agl.evaluation.protocol import parse_method
    from agl.service import run_config
    from agl.training.loop import TrainConfig
    from agl.training.resume import check_unfinished_run, checkpoint_progress, train_command

    out = Path(args.out)
    store_dir = store_path(args.store)
    # never over the store or a folder of someone else's files; an earlier run is checked just below
    check_output_folder(out, "train", inputs=[store_dir], overwrite=args.overwrite, reuse=True)
    if (out / "result.json").exists() and not args.overwrite and not args.resume:
        raise OutputExistsError(out / "result.json", "exists; pass --overwrite to replace this run (or use another --out)")
    label, overrides = parse_method(args.method, flag="--method")
    # base settings are checked (naming --set / --config) before the method's options (naming --method)
    cfg = TrainConfig.from_dict({**base_settings(args), **overrides}, source=f"--method {label}")
    resume = None
    if args.resume:
        resume = out / "checkpoint"
        if not resume.is_dir():
            raise ConfigError(resume, "--resume needs a checkpoint folder from an earlier run in --out")
    check_unfinished_run(out, args, cfg, args.split)  # an interrupted run is resumed or replaced, never restarted
    check_output_location(out)  # writable, with room, before any work
    store = open_store_arg(store_dir)
    check_store_files(store, full=args.verify)  # sizes, dates and samples (full sha256 with --verify)
    # a new run goes straight into --out (so --resume can continue it after a crash); a replacement
    # is built beside it and swapped in at the end, so the earlier run stays whole until then
    replace = args.overwrite and not args.resume and out.is_dir() and any(out.iterdir())
    work = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}" if replace else out
    try:
        # a crashed run is known by its checkpoint/ (fit creates the folder with it; a bad split creates none)
        run = run_config(cfg, store, args.split, resume_from=resume, out_dir=work)
        work.mkdir(parents=True, exist_ok=True)  # a closed-form fit (the probe) writes no checkpoint
        write_output_marker(work, "train", store=str(store_dir), split=args.split, method=args.method)
        record = write_run_outputs(work, run.result, run.data, args.split, label)
        if replace:
            check_output_folder(out, "train", overwrite=True)
            swap_folder(work, out)
    except BaseException as err:
        if replace:
            shutil.rmtree(work, ignore_errors=True)
        elif work.is_dir() and not any(work.iterdir()):
            work.rmdir()  # nothing was written: leave no empty folder behind
        kept = (work / "checkpoint").is_dir() and not replace
        if isinstance(err, NonFiniteLossError):
            outcome = (f"no result was written; the last good checkpoint ({checkpoint_progress(work / 'checkpoint')}) "
                       f"is kept in {work / 'checkpoint'}" if kept else
                       f"no result was written; {'the earlier run in ' + str(out) + ' is unchanged' if replace else 'no epoch finished'}")
            raise err.with_outcome(outcome) from None
        if isinstance(err, KeyboardInterrupt):
            err.add_note(f"the run is kept in {out} (checkpoint after {checkpoint_progress(work / 'checkpoint')}); "
                         f"continue it with: {train_command(args, '--resume')}" if kept else
                         f"{'the earlier run in ' + str(out) + ' is unchanged' if replace else 'no epoch finished, nothing kept'}")
        raise
    print(f"{label} on {args.split} (seed {cfg.seed}): test PCC {_metric(record['pcc'])}  SCC {_metric(record['scc'])}  "
          f"MSE {_metric(record['mse'])}  k {record['k']}/{record['n_aux']}  epochs {record['epochs']}  "
          f"{record['wall_time_s']:.0f} s -> {out}")
    return 0


def _metric(value: float | None) -> str:
    """A metric as the summary prints it: 4 decimals, or "undefined" (a NaN stored as null)."""
    return "undefined" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------- agl evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from agl.data.integrity import check_store_files
    from agl.fileio import check_output_folder, check_output_location
    from agl.evaluation.protocol import evaluate, results_markdown, split_methods

    seeds, folds = list(args.seeds), args.folds
    methods = split_methods(",".join(args.methods))
    store_dir = store_path(args.store)
    # the grid resumes in --out: an earlier evaluate output is reused, anything else is refused
    check_output_folder(args.out, "evaluate", inputs=[store_dir], reuse=True)
    check_output_location(args.out)  # writable, with room, before any work
    store = open_store_arg(store_dir)
    check_store_files(store, full=args.verify)
    try:
        summary = evaluate(store, args.protocol, seeds, methods, args.out, base=base_settings(args),
                           jobs=args.jobs, folds=folds)
    except KeyboardInterrupt as err:  # grid runs keep no partial state: a finished run is whole, the rest rerun
        err.add_note(f"finished grid runs are kept in {args.out}; the same command continues the grid")
        raise
    print(results_markdown(summary["table"], summary["wilcoxon"]))
    print(f"written: {', '.join(str(p) for p in summary['paths'].values())}")
    return 0


# --------------------------------------------------------------------------- agl study
def cmd_study(args: argparse.Namespace) -> int:
    from agl.evaluation.study import FULL, QUICK, StudyPlan, run_study

    size = QUICK if args.quick else FULL
    pick = lambda value, key: size[key] if value is None else value  # noqa: E731
    folds = pick(args.folds, "folds")
    plan = StudyPlan(panels=tuple(args.panels), protocols=tuple(args.protocols),
                     seeds=tuple(pick(args.seeds, "seeds")), kfold_seeds=tuple(pick(args.kfold_seeds, "kfold_seeds")),
                     folds=None if folds is None else tuple(folds), slides=None if args.slides is None else tuple(args.slides),
                     ks=tuple(pick(args.ks, "ks")), epochs=pick(args.epochs, "epochs"),
                     patience=pick(args.patience, "patience"), min_detection=args.min_detection,
                     settings=base_settings(args))
    result = run_study(plan, args.out, args.work, jobs=args.jobs, overwrite=args.overwrite, quick=args.quick,
                       figures=args.figures, report_only=args.report_only)
    print("\n".join(result["verdicts"]))
    print(f"written: {result['page']} and {len(result['figures'])} figure(s); {result['n_runs']} runs, "
          f"{result['wall_s'] / 60:.1f} min")
    return 0


def method_help() -> str:
    """The ``--method`` help, read from the gate registry when shown (so building the parser imports no torch)."""
    from agl.selection import GATES, gate_help

    gates = "; ".join(f"{name}: {gate_help(cls)}" for name, cls in GATES.items())
    return f"a registered gate, optionally with options: topk:k=100 ({gates})".replace("%", "%%")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON file of TrainConfig settings")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable)")
    p.add_argument("--val-outer-fraction", type=float, default=None, metavar="FRACTION",
                   help="share of each slide's validation spots kept for the gate's outer objective (val_outer); "
                        "the rest select the model (same as --set val_outer_fraction=FRACTION)")


def _add_verify_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify", action="store_true", help="check every store file's sha256 against its manifest "
                   "before training (by default: sizes, dates and sampled blocks; files changed since the last "
                   "check are hashed in full)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``evaluate``."""
    p = sub.add_parser("train", help="train one method on one split of a store",
                       description="Train one run; writes result.json, checkpoint/, gene_set.csv and plots.")
    add_store_arg(p, required=True)
    p.add_argument("--method", required=True, help=LazyHelp(method_help))
    p.add_argument("--split", required=True, help="split name, e.g. kfold-s0-f0 (see `agl info`)")
    p.add_argument("--out", required=True, help="output folder")
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier `agl train` run in --out (never the store, "
                   "nor a folder of other files)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint (an interrupted run: "
                   "same --method and settings; more epochs, patience or another device are allowed)")
    _add_verify_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="protocol x seeds x methods grid with tables, Wilcoxon tests and plots",
                       description="Run a resumable evaluation grid; finished runs in --out are skipped.")
    add_store_arg(p, required=True)
    p.add_argument("--protocol", required=True, choices=["kfold", "spatial", "loso"])
    add_list_arg(p, "--seeds", item=int, default=[0], help="seeds (split seed and training seed), as 0 1 2 or 0,1,2")
    add_list_arg(p, "--folds", item=int, default=None, help="only these folds of kfold/spatial (default: all)")
    add_list_arg(p, "--methods", required=True, metavar="METHOD",
                 help="method specs, options after ':', e.g. pgl agl_all topk:k=100 dkgsb:hard=true (or comma-separated)")
    p.add_argument("--out", required=True, help="output folder (reused to resume)")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (one core each)")
    _add_config_args(p)
    _add_verify_arg(p)
    p.set_defaults(func=cmd_evaluate)

    from agl.evaluation.study_options import add_study_args  # no numpy/pandas at parser build time

    p = sub.add_parser("study", help="the real-data study on the her2st demo, regenerated into docs/results.md",
                       description="PGL, AGL-all, DkGSB and the top-k / random-k curve over k, leave-one-slide-out "
                                   "and 5-fold, two primary-gene panels, paired tests; writes one Markdown page and "
                                   "its figures. Resumable: finished runs in --work are reused.")
    add_study_args(p)
    _add_config_args(p)
    p.set_defaults(func=cmd_study)
