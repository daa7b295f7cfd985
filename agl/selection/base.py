"""The gate interface: how per-gene losses become the training objective.

A gate owns the auxiliary-gene weights. ``loss(l_primary, l_aux)`` combines per-gene
losses; ``inner_parameters()`` train with the model (e.g. uncertainty weights);
``outer_parameters()`` train by hypergradient on validation data (DkGSB's threshold).

A gate declares the options it reads as a nested dataclass ``Options`` whose fields are
:func:`agl.checks.setting` declarations (type, default, check, help). ``register_gate``
adds the class to ``GATES``; from then on its options are run settings
(:class:`agl.config.TrainConfig` accepts them, search spaces may search them, help texts
list them). Adding a gate is one class plus ``@register_gate("name")``, nothing else.
An option with the name of a run setting (``seed``) reads that setting.

A gate also carries its traits as class attributes, which the rest of agl queries instead of
naming methods (:func:`gates_with`): ``predicts_auxiliary`` (False: the model predicts the
primary genes only, as PGL), ``bilevel`` (outer parameters trained by hypergradient),
``fitter`` (``"module:function"`` fitting the method in closed form instead of the training
loop), ``reference`` (the baseline that evaluations compare every other method with) and
``help`` (the one line the ``--method`` help shows; the docstring's first line by default).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from agl.checks import declared, first_problem, non_empty_string, num_in, setting
from agl.errors import ConfigError
from agl.registry import Registry

GATES: Registry[type["Gate"]] = Registry("gate", setting="method")


def register_gate(name: str) -> Callable[[type["Gate"]], type["Gate"]]:
    """Class decorator adding a gate (with its ``Options`` dataclass) to the registry under ``name``."""

    def add(cls: type[Gate]) -> type[Gate]:
        if not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"gate {name!r}: {cls.__name__}.Options must be a dataclass of setting() fields")
        GATES.register(name, cls)
        cls.name = name
        return cls

    return add


def gates_with(**traits: Any) -> list[str]:
    """Names of the registered gates whose traits have the given values, e.g. ``gates_with(bilevel=True)``."""
    return [name for name, cls in GATES.items() if all(getattr(cls, t) == v for t, v in traits.items())]


def reference_gate() -> str:
    """The gate every other method is compared with (the one registered with ``reference = True``)."""
    names = gates_with(reference=True)
    if len(names) != 1:
        raise TypeError(f"exactly one gate must set reference = True; found {names}")
    return names[0]


def gate_help(cls: type["Gate"]) -> str:
    """The gate's one-line description: its ``help``, else its docstring's first line."""
    lines = (cls.__doc__ or "").strip().splitlines()
    return cls.help or (lines[0] if lines else "")


def gate_option_settings(cls: type["Gate"]) -> dict[str, Any]:
    """The :class:`agl.checks.Setting` of every option gate ``cls`` declares."""
    return declared(cls.Options)


def parse_options(cls: type["Gate"], values: Mapping[str, Any]) -> Any:
    """``cls.Options`` from plain values; an option the gate does not declare, or a bad value, is a ConfigError."""
    settings = gate_option_settings(cls)
    unknown = sorted(set(values) - set(settings))
    if unknown:
        raise ConfigError(unknown[0], f"gate {cls.name!r} has no option(s) {', '.join(unknown)}; "
                                      f"its options: {', '.join(settings) or 'none'}")
    bad = first_problem(settings, dict(values), owner=f"gate {cls.name!r}")
    if bad:
        raise ConfigError(*bad)
    return cls.Options(**values)


def ordinal_ranks(scores: Tensor) -> Tensor:
    """Re-rank ``scores`` (lower = better) to evenly spaced ranks in [0, 1]; ties keep input order."""
    n = scores.numel()
    order = torch.sort(scores, stable=True).indices
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    return ranks


def blend_ranks(
    prior_ranks: Mapping[str, Tensor | np.ndarray],
    n_aux: int,
    prior: str = "hvg",
    second_prior: str | None = "mean",
    prior_weight: float = 1.0,
) -> Tensor:
    """``normalise(w * rank[prior] + (1 - w) * rank[second_prior])``, re-ranked to [0, 1] (0 = best).

    With ``prior_weight == 1`` the second prior is not read, so it may be absent.
    """
    if not 0.0 <= prior_weight <= 1.0:
        raise ConfigError("prior_weight", f"must lie in [0, 1], got {prior_weight}")
    needed = [prior] + ([second_prior] if prior_weight < 1.0 else [])
    rows = []
    for name in needed:
        if name not in prior_ranks:
            raise ConfigError("prior", f"prior ranking {name!r} not available; the gene set has {sorted(prior_ranks)}")
        r = torch.as_tensor(np.asarray(prior_ranks[name]), dtype=torch.float64).reshape(-1)
        if r.numel() != n_aux:
            raise ConfigError("prior", f"prior {name!r} ranks {r.numel()} genes, but there are {n_aux} auxiliary genes")
        if not torch.isfinite(r).all():
            raise ConfigError("prior", f"prior {name!r} has non-finite ranks")
        rows.append(r)
    score = rows[0] if len(rows) == 1 else prior_weight * rows[0] + (1.0 - prior_weight) * rows[1]
    return ordinal_ranks(score)


@dataclass
class NoOptions:
    """A gate that reads no settings."""


@dataclass
class PriorOptions:
    """Options of a gate that orders auxiliary genes by a (blended) prior ranking."""

    prior: str = setting("hvg", non_empty_string, "prior ranking that orders auxiliary genes (a store prior: hvg, mean, ...)")
    second_prior: str = setting("mean", non_empty_string, "prior blended in when prior_weight < 1")
    prior_weight: float = setting(1.0, num_in(0.0, 1.0), "weight of prior against second_prior in [0, 1]")


class Gate(nn.Module):
    """Base gate: fixed auxiliary weights ``weights()`` combined by a weighted mean.

    Subclasses declare ``Options`` (a dataclass); with options derived from
    :class:`PriorOptions` the gate reads the blended prior rank (buffer ``ranks``, 0 = best).
    They override ``weights`` (and, for learnable gates, the parameter groups and ``summary``).
    The parsed options are ``self.options``.
    """

    name: str = "gate"
    Options: type = NoOptions
    # traits (see the module docstring); read through gates_with(), never by comparing names
    predicts_auxiliary: bool = True
    bilevel: bool = False
    fitter: str | None = None
    reference: bool = False
    help: str = ""

    def __init__(self, n_aux: int, prior_ranks: Mapping[str, Tensor | np.ndarray] | None = None, **options: Any):
        super().__init__()
        if n_aux < 0:
            raise ConfigError("n_aux", f"must be >= 0, got {n_aux}")
        self.n_aux = int(n_aux)
        self.options = parse_options(type(self), options)
        opts = self.options
        ranks = (
            blend_ranks(prior_ranks or {}, n_aux, opts.prior, opts.second_prior, opts.prior_weight)
            if self.needs_prior
            else torch.zeros(0, dtype=torch.float64)
        )
        self.register_buffer("ranks", ranks.float())

    @property
    def needs_prior(self) -> bool:
        """Whether the gate orders genes by the prior (its options derive from PriorOptions)."""
        return isinstance(self.options, PriorOptions)

    # -- objective -------------------------------------------------------------------------
    def weights(self) -> Tensor:
        """Auxiliary-gene loss weights ``[A]`` (primary genes always weigh 1)."""
        raise NotImplementedError

    def loss(self, l_primary: Tensor, l_aux: Tensor) -> Tensor:
        """``(sum l_primary + sum w * l_aux) / (P + sum w)``; the normaliser is a constant (no gradient)."""
        w = self.weights().to(l_aux)
        total = l_primary.sum() + (w * l_aux).sum()
        return total / (l_primary.numel() + w.sum()).detach()

    # -- read-out --------------------------------------------------------------------------
    def k(self) -> int:
        """Number of auxiliary genes in use."""
        return int(self.selected().numel())

    def selected(self) -> Tensor:
        """Indices (into the auxiliary genes) of the genes in use, best prior rank first."""
        idx = torch.nonzero(self.weights().detach() > 0.5).flatten()
        if self.ranks.numel():
            idx = idx[torch.argsort(self.ranks[idx], stable=True)]
        return idx

    # -- parameter groups ------------------------------------------------------------------
    def inner_parameters(self) -> list[nn.Parameter]:
        """Parameters trained together with the model on the training loss."""
        return []

    def outer_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by hypergradient on the validation primary loss."""
        return []

    def project_(self) -> None:
        """Put outer parameters back into their feasible set after an optimiser step."""

    def on_epoch_end(self, epoch: int, n_epochs: int) -> None:
        """Hook for epoch-indexed schedules; ``epoch`` is 0-based, the one that just ended."""

    def on_outer_step(self, progress: float) -> None:
        """Hook after each outer step; ``progress`` in [0, 1] runs over the annealing horizon
        (``agl.training.loop.tau_horizon``)."""

    def summary(self) -> dict[str, float]:
        """Scalars worth logging every epoch."""
        return {"k": float(self.k())}
