"""DkGSB: differentiable prior-based top-k auxiliary gene selection (Shiku et al., AAAI 2026).

Auxiliary genes are ordered by a prior (blended, re-ranked to ``r_j`` in [0, 1], 0 =
best). One scalar threshold ``t`` gives the soft mask ``m_j = sigmoid((t - r_j) / tau)``,
a soft top-k: genes ranked before ``t`` weigh about 1, later ones about 0. ``t`` is an
outer parameter, learned by hypergradient (``agl.training.bilevel``) on the validation loss of the
primary genes.

Read-out convention (used by ``k()``, ``selected()`` and export alike): the kept genes are
those with ``m_j > 0.5``, i.e. ``r_j < t``, so ``k = #{j : r_j < t}``. With evenly spaced
ranks this equals the paper's ``round(t * (A - 1))`` up to one gene. As ``t`` is kept in
[0, 1], at most ``A - 1`` genes can be kept (the last-ranked gene sits at ``r = 1``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from agl.checks import boolean, int_at_least, num_in, optional, positive, setting
from agl.errors import ConfigError
from agl.selection.base import Gate, PriorOptions, register_gate
from agl.selection.fixed import K_HELP


@register_gate("dkgsb")
class DkGSBGate(Gate):
    """DkGSB: a soft top-k of the prior ranking whose threshold t is learned by hypergradient."""

    bilevel = True
    help = "soft top-k by the prior, threshold learned by hypergradient (DkGSB)"

    @dataclass
    class Options(PriorOptions):
        t_init: float = setting(0.5, num_in(0.0, 1.0), "dkgsb: initial threshold t in [0, 1] (unless k is set)")
        k: int | None = setting(None, optional(int_at_least(0)), K_HELP)
        # ``tau`` is the temperature the run starts with; the per-epoch metric ``tau`` (and the
        # gate buffer of that name) is the current one, equal to it unless tau_final anneals it.
        tau: float = setting(0.01, positive, "dkgsb: mask temperature at the start (the metric tau is the current one)")
        tau_final: float | None = setting(None, optional(positive), "dkgsb: temperature after annealing (off: None)")
        hard: bool = setting(False, boolean, "dkgsb: straight-through hard top-k mask in the forward pass")

    def __init__(self, n_aux: int, prior_ranks: Mapping | None = None, **options: Any):
        super().__init__(n_aux, prior_ranks, **options)
        opts = self.options
        gap = 1.0 / max(n_aux - 1, 1)
        t_init = opts.t_init
        if opts.k is not None:
            if not 0 <= int(opts.k) <= n_aux:
                raise ConfigError("k", f"dkgsb: k={opts.k} is outside 0..{n_aux}")
            # midway between the k-th and (k+1)-th rank, so the read-out starts at exactly k genes
            t_init = (int(opts.k) - 0.5) * gap
        self.t = nn.Parameter(torch.tensor(min(max(float(t_init), 0.0), 1.0)))
        self.tau_start = float(opts.tau)
        self.tau_final = None if opts.tau_final is None else float(opts.tau_final)
        self.hard = bool(opts.hard)
        self.register_buffer("tau", torch.tensor(float(opts.tau)))  # current temperature, saved with the gate

    def soft_weights(self) -> Tensor:
        """``sigmoid((t - r) / tau)``, differentiable in ``t``."""
        return torch.sigmoid((self.t - self.ranks) / self.tau)

    def hard_mask(self) -> Tensor:
        return (self.ranks < self.t).to(self.ranks.dtype)

    def weights(self) -> Tensor:
        soft = self.soft_weights()
        if not self.hard:
            return soft
        # straight-through: the forward value is the hard top-k mask, the gradient the soft one's
        return (soft - soft.detach()) + self.hard_mask()  # exact 0/1 values: the bracket is exactly 0

    def k(self) -> int:
        return int((self.ranks < self.t.detach()).sum())

    def selected(self) -> Tensor:
        return torch.argsort(self.ranks, stable=True)[: self.k()]

    def outer_parameters(self) -> list[nn.Parameter]:
        return [self.t]

    @torch.no_grad()
    def project_(self) -> None:
        self.t.clamp_(0.0, 1.0)

    def on_outer_step(self, progress: float) -> None:
        """Geometric annealing from ``tau`` to ``tau_final`` by outer step: ``progress`` 1 reaches it.

        The loop drives ``progress`` by outer steps over a horizon that ends before early
        stopping can stop a run (``agl.training.loop.tau_horizon``), so a stopped run has
        trained at ``tau_final``. The current value is a buffer, saved with checkpoints.
        """
        if self.tau_final is None:
            return
        frac = min(max(float(progress), 0.0), 1.0)
        self.tau.fill_(self.tau_start * (self.tau_final / self.tau_start) ** frac)

    def summary(self) -> dict[str, float]:
        return {
            "k": float(self.k()),
            "t": float(self.t.detach()),
            "tau": float(self.tau),
            "soft_k": float(self.soft_weights().detach().sum()),
        }
