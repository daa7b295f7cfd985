"""Gates: how auxiliary genes enter the training objective.

``create_gate(name, n_aux, prior_ranks, **options)`` builds one from the registry
``GATES`` (``pgl``, ``agl_all``, ``topk``, ``random_k``, ``uncertainty``, ``dkgsb``, and
``probe``: HEST-Benchmark's PCA + ridge baseline, fitted in closed form by ``fit``);
an option the gate does not declare (in its ``Options``) is a ConfigError naming it.
Each gate carries its traits (``predicts_auxiliary``, ``bilevel``, ``fitter``, ``reference``,
``help``); code outside this package asks ``gates_with(...)`` instead of naming methods.
``agl.config.gate_options(cfg)`` picks a gate's options out of a whole ``TrainConfig``.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from torch import Tensor

from agl.selection.base import (GATES, Gate, PriorOptions, blend_ranks, gate_help, gate_option_settings, gates_with,
                                reference_gate, register_gate)
# importing the gate modules registers them
from agl.selection.dkgsb import DkGSBGate
from agl.selection.fixed import AllGenesGate, PrimaryOnlyGate, RandomKGate, TopKGate
from agl.selection.uncertainty import UncertaintyGate
from agl.selection.probe import ProbeGate  # noqa: E402  (after fixed: it extends PrimaryOnlyGate)

__all__ = [
    "GATES", "Gate", "PriorOptions", "register_gate", "create_gate", "blend_ranks", "gate_option_settings",
    "gates_with", "reference_gate", "gate_help",
    "PrimaryOnlyGate", "AllGenesGate", "TopKGate", "RandomKGate", "UncertaintyGate", "DkGSBGate", "ProbeGate",
]


def create_gate(name: str, n_aux: int, prior_ranks: Mapping[str, Tensor | np.ndarray] | None = None,
                **options: Any) -> Gate:
    """Build the gate registered as ``name`` with its options (an option it does not declare is an error)."""
    return GATES.get(name)(n_aux, prior_ranks or {}, **options)
