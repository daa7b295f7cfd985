"""An unfinished ``agl train`` run in ``--out``: refused, or resumed only with the settings it was started with.

A run writes ``checkpoint/`` every epoch and ``result.json`` last, so a folder with a checkpoint
and no result is an interrupted (or diverged) run. Starting over there would overwrite the only
copy of its epochs, so the command asks the user to choose, naming both command lines.
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from agl.errors import CheckpointError, OutputExistsError
from agl.fileio import jsonable

# Settings a resumed run may change: more epochs or patience, another device; anything else
# (the method, its options, lr, seed, ...) would make the continued run a different experiment.
MAY_CHANGE_ON_RESUME = frozenset({"epochs", "patience", "device"})


def train_command(args: argparse.Namespace, flag: str) -> str:
    """The ``agl train`` command line of ``args`` (as the user gave it) with ``flag`` added."""
    parts = ["agl", "train", "--store", str(args.store), "--method", str(args.method), "--split", str(args.split),
             "--out", str(args.out)]
    if getattr(args, "config", None):
        parts += ["--config", str(args.config)]
    for item in getattr(args, "set", None) or []:
        parts += ["--set", item]
    if getattr(args, "val_outer_fraction", None) is not None:
        parts += ["--val-outer-fraction", str(args.val_outer_fraction)]
    return shlex.join([*parts, flag])


def _read_json(file: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def checkpoint_progress(checkpoint: Path) -> str:
    """``"epoch 3 of 20 of dkgsb"`` from a checkpoint's state.json and config.json ("" if unreadable)."""
    state, config = _read_json(checkpoint / "state.json"), _read_json(checkpoint / "config.json")
    if not state or not config:
        return ""
    return f"epoch {state.get('next_epoch', '?')} of {config.get('epochs', '?')} of {config.get('method', '?')}"


def is_unfinished(out: Path) -> bool:
    """``out`` holds a train run that never finished: a checkpoint folder and no result.json."""
    return (out / "checkpoint").is_dir() and not (out / "result.json").exists()


def check_unfinished_run(out: Path, args: argparse.Namespace, cfg: Any, split: str) -> None:
    """Refuse to start a new run over an unfinished one unless ``--overwrite``; with ``--resume`` refuse
    settings that differ from the checkpoint's (except :data:`MAY_CHANGE_ON_RESUME`) or another split."""
    if args.resume:
        check_same_run(out / "checkpoint", jsonable(cfg.to_dict()), split, args)  # as config.json holds it
        return
    if args.overwrite or not is_unfinished(out):
        return
    progress = checkpoint_progress(out / "checkpoint")
    raise OutputExistsError(out, f"holds an unfinished `agl train` run (checkpoint after {progress or 'an epoch'}); "
                                 f"nothing was changed. Continue it with:\n  {train_command(args, '--resume')}\n"
                                 f"or start again, replacing it, with:\n  {train_command(args, '--overwrite')}")


def check_same_run(checkpoint: Path, settings: dict[str, Any], split: str, args: argparse.Namespace) -> None:
    """``--resume`` continues the same run: the checkpoint's settings and split must be this command's."""
    config_file, store_file = checkpoint / "config.json", checkpoint / "store.json"
    saved = _read_json(config_file)
    if saved is None:
        raise CheckpointError(config_file, "missing or unreadable; this checkpoint cannot be resumed "
                                           f"(start again with --overwrite: {train_command(args, '--overwrite')})")
    differ = sorted(k for k in set(saved) | set(settings)
                    if k not in MAY_CHANGE_ON_RESUME and saved.get(k) != settings.get(k))
    saved_split = (_read_json(store_file) or {}).get("split")
    if saved_split is not None and saved_split != split:
        differ.insert(0, "split")
    if differ:
        shown = "; ".join(
            f"split is {saved_split!r} there but {split!r} here" if key == "split"
            else f"{key} is {saved.get(key)!r} there but {settings.get(key)!r} here" for key in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise CheckpointError(config_file, f"--resume continues the run this checkpoint was started as, but the "
                                           f"settings differ: {shown}{more}. Repeat that run's --method/--set "
                                           f"to continue it, or start a new run with --overwrite: "
                                           f"{train_command(args, '--overwrite')}")
