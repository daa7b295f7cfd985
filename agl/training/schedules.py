"""Schedules: when a run's bi-level passes happen (the ``schedule`` setting), defined once.

A schedule maps ``(epoch, cfg)`` to an :class:`EpochPlan`; register a new one with
``@SCHEDULES.register("name")``. The loop (``agl.training.loop``), the annealing horizon
(``tau_horizon``) and the search-space budget check (``agl.distributed.spaces``) all read
``first_bilevel_epoch`` from here. Imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from agl.registry import Registry

# the run's settings (an agl.config.TrainConfig); not imported, as agl.config lists SCHEDULES' names
RunSettings = Any

# Fraction of the epochs that the "warmstart" schedule trains AGL-all style before selecting.
WARMUP_FRACTION = 0.2


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch does: a bi-level pass before training, and whether gate weights are forced to 1."""

    bilevel: bool
    all_genes: bool


SCHEDULES: Registry[Callable[[int, RunSettings], EpochPlan]] = Registry("schedule", setting="schedule")


@SCHEDULES.register("interleaved")
def _interleaved(epoch: int, cfg: RunSettings) -> EpochPlan:
    # The public release: every epoch after the first starts with a bi-level pass.
    return EpochPlan(bilevel=epoch >= 1, all_genes=False)


@SCHEDULES.register("warmstart")
def _warmstart(epoch: int, cfg: RunSettings) -> EpochPlan:
    # Submission-time code: AGL-all warm-up stage, then alternate bi-level and normal stages.
    warmup = warmup_epochs(cfg)
    return EpochPlan(bilevel=epoch >= warmup, all_genes=epoch < warmup)


def warmup_epochs(cfg: RunSettings) -> int:
    """Length of the AGL-all stage of the warmstart schedule."""
    return max(1, int(round(WARMUP_FRACTION * cfg.epochs)))


def first_bilevel_epoch(cfg: RunSettings) -> int:
    """The first (0-based) epoch of ``cfg.schedule`` with a bi-level pass; ``cfg.epochs`` if none has one."""
    schedule = SCHEDULES.get(cfg.schedule)
    return next((e for e in range(cfg.epochs) if schedule(e, cfg).bilevel), cfg.epochs)
