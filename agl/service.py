"""One run service: settings -> data bundle -> ``fit`` -> run record, for every entry point.

``agl train`` (agl/commands.py), the evaluation grid (agl/evaluation/protocol.py), a Tune trial
(agl/distributed/tune.py), a cross-validated trial and its refit (agl/distributed/cv.py) and a
Ray Train worker (agl/distributed/train.py) all call :func:`run_config`; what differs between
them (threads, resume, reporter, where the record goes) are its arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from agl.config import TrainConfig
    from agl.training.loop import FitResult, Reporter


@dataclass
class RunOutcome:
    """What one run produced: the fit, the bundle it trained on, and the record written (if any)."""

    config: "TrainConfig"
    result: "FitResult"
    data: Any
    record: dict[str, Any] | None


def run_config(settings: "TrainConfig | Mapping[str, Any]", store: Any, split: str, *,
               source: str | Path | None = None, threads: int | None = None, rank: int | None = None,
               world_size: int | None = None, roles: Any = None, wrap_data: Callable[[Any], Any] | None = None,
               reporter: "Reporter | None" = None, resume_from: str | Path | None = None,
               out_dir: str | Path | None = None, record_to: str | Path | None = None,
               record_split: str | None = None, label: str | None = None,
               copy_checkpoint: bool = False, bundle: Any = None) -> RunOutcome:
    """Train one run of ``settings`` on ``split`` of ``store`` (an opened Store or its path).

    ``source``: named in errors about ``settings`` when they are a mapping. ``threads``: torch's
    intra-op threads (None: leave as is). ``rank``/``world_size``/``roles``: passed to
    ``make_bundle``; ``wrap_data`` wraps the bundle before ``fit`` (a Ray Data shard), the record
    reads the bundle itself. ``reporter``, ``resume_from``, ``out_dir``: passed to ``fit``.
    ``bundle``: the split's data already built for these roles (cross-validation folds share one
    through ``with_roles``), instead of ``make_bundle``. ``record_to``: write the run record there (gene_set.csv, plots, result.json; with
    ``copy_checkpoint`` the fit's checkpoint folder is copied there first, as sweeps keep it),
    under ``record_split`` (default ``split``) and ``label``.
    """
    from agl import runs
    from agl.config import TrainConfig
    from agl.training.bundles import make_bundle
    from agl.training.loop import fit

    if threads:
        import torch

        torch.set_num_threads(int(threads))
    cfg = settings if isinstance(settings, TrainConfig) else TrainConfig.from_dict(dict(settings), source=source)
    data = bundle if bundle is not None else make_bundle(store, split, cfg, rank=rank, world_size=world_size,
                                                         roles=roles)
    result = fit(cfg, wrap_data(data) if wrap_data is not None else data, reporter=reporter,
                 resume_from=resume_from, out_dir=out_dir)
    record = None
    if record_to is not None:
        if copy_checkpoint:
            record = runs.finalize_run(result, data, record_to, record_split or split, label)
        else:
            record = runs.write_run_record(record_to, result, data, record_split or split, label)
    return RunOutcome(cfg, result, data, record)


__all__ = ["RunOutcome", "run_config"]
