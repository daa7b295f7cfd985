"""Gates with fixed auxiliary weights: PGL, AGL (all), fixed top-k by prior, random k."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from agl.checks import int_at_least, optional, setting
from agl.errors import ConfigError
from agl.selection.base import Gate, PriorOptions, register_gate

K_HELP = "number of auxiliary genes to keep (topk, random_k: required; dkgsb: start with exactly k, instead of t_init)"


class FixedMaskGate(Gate):
    """A 0/1 mask over auxiliary genes held in a buffer (saved with the gate's state)."""

    def _set_mask(self, mask: Tensor) -> None:
        self.register_buffer("mask", mask.float())

    def weights(self) -> Tensor:
        return self.mask


def _check_k(k: int | None, n_aux: int, name: str) -> int:
    if k is None:
        raise ConfigError("k", f"gate {name!r} needs k (the number of auxiliary genes to keep)")
    if not 0 <= int(k) <= n_aux:
        raise ConfigError("k", f"gate {name!r}: k={k} is outside 0..{n_aux} (the number of auxiliary genes)")
    return int(k)


@register_gate("pgl")
class PrimaryOnlyGate(FixedMaskGate):
    """Primary genes only: every auxiliary weight is 0 (the paper's PGL baseline)."""

    predicts_auxiliary = False  # the paper's 50-output baseline: its model has no auxiliary outputs
    reference = True
    help = "primary genes only (the paper's PGL baseline)"

    def __init__(self, n_aux: int, prior_ranks: Mapping | None = None, **options: Any):
        super().__init__(n_aux, prior_ranks, **options)
        self._set_mask(torch.zeros(n_aux))


@register_gate("agl_all")
class AllGenesGate(FixedMaskGate):
    """Every auxiliary gene with weight 1 (the paper's AGL (all) baseline)."""

    help = "every auxiliary gene with weight 1 (AGL-all)"

    def __init__(self, n_aux: int, prior_ranks: Mapping | None = None, **options: Any):
        super().__init__(n_aux, prior_ranks, **options)
        self._set_mask(torch.ones(n_aux))


@register_gate("topk")
class TopKGate(FixedMaskGate):
    """The ``k`` best auxiliary genes by the (blended) prior rank, weight 1; the rest 0."""

    help = "the k best auxiliary genes by the prior (needs k)"

    @dataclass
    class Options(PriorOptions):
        k: int | None = setting(None, optional(int_at_least(0)), K_HELP)

    def __init__(self, n_aux: int, prior_ranks: Mapping | None = None, **options: Any):
        super().__init__(n_aux, prior_ranks, **options)
        k = _check_k(self.options.k, n_aux, "topk")
        mask = torch.zeros(n_aux)
        mask[torch.argsort(self.ranks, stable=True)[:k]] = 1.0
        self._set_mask(mask)


@register_gate("random_k")
class RandomKGate(FixedMaskGate):
    """``k`` auxiliary genes drawn uniformly at random with ``seed`` (a prior-free control)."""

    help = "k auxiliary genes drawn at random (needs k)"

    @dataclass
    class Options:
        k: int | None = setting(None, optional(int_at_least(0)), K_HELP)
        seed: int = setting(0, int_at_least(0), "random seed (the run's seed)")

    def __init__(self, n_aux: int, prior_ranks: Mapping | None = None, **options: Any):
        super().__init__(n_aux, prior_ranks, **options)
        k = _check_k(self.options.k, n_aux, "random_k")
        chosen = np.random.default_rng(self.options.seed).choice(n_aux, size=k, replace=False)
        mask = torch.zeros(n_aux)
        mask[torch.as_tensor(chosen, dtype=torch.long)] = 1.0
        self._set_mask(mask)
