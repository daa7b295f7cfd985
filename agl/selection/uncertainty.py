"""Homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018) as a gate.

Each task ``i`` has a learnable log-variance ``s_i`` and contributes
``exp(-s_i) * L_i + s_i``: a noisy task learns a large ``s_i`` and is down-weighted, and
the ``+ s_i`` term stops every ``s_i`` from growing without bound. Tasks here are the
primary genes (mean loss) and the auxiliary genes (mean loss, or one task per gene with
``per_gene=True``). The log-variances are inner parameters: they train with the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from agl.checks import boolean, setting
from agl.selection.base import Gate, register_gate


@register_gate("uncertainty")
class UncertaintyGate(Gate):
    """Homoscedastic uncertainty weighting (Kendall et al. 2018): learned log-variances weigh the tasks."""

    help = "learned task log-variances weigh primary and auxiliary genes (Kendall et al.)"

    @dataclass
    class Options:
        per_gene: bool = setting(False, boolean, "uncertainty: one log-variance per auxiliary gene (else one shared)")

    def __init__(self, n_aux: int, prior_ranks: Mapping | None = None, **options: Any):
        super().__init__(n_aux, prior_ranks, **options)
        self.per_gene = bool(self.options.per_gene)
        self.log_var_primary = nn.Parameter(torch.zeros(()))
        self.log_var_aux = nn.Parameter(torch.zeros(n_aux if self.per_gene else 1))

    def loss(self, l_primary: Tensor, l_aux: Tensor) -> Tensor:
        s_p = self.log_var_primary
        total = torch.exp(-s_p) * l_primary.mean() + s_p
        if l_aux.numel():
            if self.per_gene:
                total = total + (torch.exp(-self.log_var_aux) * l_aux + self.log_var_aux).mean()
            else:
                s_a = self.log_var_aux[0]
                total = total + torch.exp(-s_a) * l_aux.mean() + s_a
        return total

    def weights(self) -> Tensor:
        """Effective weight of each auxiliary gene relative to a primary gene (``exp(s_p - s_a)``)."""
        rel = torch.exp(self.log_var_primary - self.log_var_aux).detach()
        return rel.expand(self.n_aux) if rel.numel() == 1 else rel

    def selected(self) -> Tensor:
        return torch.arange(self.n_aux)  # weighting, not selection: every auxiliary gene stays in

    def inner_parameters(self) -> list[nn.Parameter]:
        return [self.log_var_primary, self.log_var_aux]

    def summary(self) -> dict[str, float]:
        return {
            "k": float(self.n_aux),
            "log_var_primary": float(self.log_var_primary.detach()),
            "log_var_aux": float(self.log_var_aux.detach().mean()),
            "aux_weight": float(self.weights().mean()) if self.n_aux else 0.0,
        }
