"""Gates: how auxiliary genes enter the training objective.

``create_gate(name, n_aux, prior_ranks, **cfg)`` builds one from the registry
``GATES`` (``pgl``, ``agl_all``, ``topk``, ``random_k``, ``uncertainty``, ``dkgsb``);
keys of ``cfg`` that the gate does not take are ignored, so a whole ``TrainConfig``
can be passed.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from torch import Tensor

from agl.errors import ConfigError
from agl.selection.base import GATES, Gate, blend_ranks, gate_kwargs, register_gate
# importing the gate modules registers them
from agl.selection.dkgsb import DkGSBGate
from agl.selection.fixed import AllGenesGate, PrimaryOnlyGate, RandomKGate, TopKGate
from agl.selection.uncertainty import UncertaintyGate

__all__ = [
    "GATES", "Gate", "register_gate", "create_gate", "blend_ranks",
    "PrimaryOnlyGate", "AllGenesGate", "TopKGate", "RandomKGate", "UncertaintyGate", "DkGSBGate",
]


def create_gate(name: str, n_aux: int, prior_ranks: Mapping[str, Tensor | np.ndarray] | None = None, **cfg: Any) -> Gate:
    """Build the gate registered as ``name``; irrelevant ``cfg`` keys are ignored."""
    try:
        cls = GATES[name]
    except KeyError:
        raise ConfigError("method", f"unknown gate {name!r}; choose one of {sorted(GATES)}") from None
    return cls(n_aux, prior_ranks or {}, **gate_kwargs(cls, cfg))
