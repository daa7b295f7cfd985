"""What a run trains: the estimator and the gate built from a :class:`agl.config.TrainConfig`.

Used by the loop (``agl.training.loop.fit``) and by checkpoint loading
(``agl.training.checkpoint.load_model``); it imports neither.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from agl.config import TrainConfig, gate_options
from agl.errors import ConfigError


def n_outputs(cfg: TrainConfig, n_genes: int, n_primary: int) -> int:
    """A gate without ``predicts_auxiliary`` (PGL: the paper's 50-output baseline) predicts the primary genes only."""
    from agl.selection import GATES

    return n_genes if GATES[cfg.method].predicts_auxiliary else n_primary


def build_model(cfg: TrainConfig, genes: pd.DataFrame, n_primary: int, prior_ranks: dict[str, np.ndarray],
                input_dim: int | None, pretrained: bool = True) -> tuple[torch.nn.Module, Any]:
    """The estimator and gate of a run (used by ``fit`` and by ``agl.training.checkpoint.load_model``).

    ``pretrained=False`` skips loading backbone weights (a checkpoint overwrites them anyway).
    """
    from agl.models import Estimator, create_backbone
    from agl.selection import create_gate

    torch.manual_seed(cfg.seed)
    backbone = None
    in_dim = input_dim
    if cfg.mode == "finetune":
        backbone, in_dim = create_backbone(cfg.backbone, weights=cfg.weights if pretrained else None)
    if in_dim is None:
        raise ConfigError(None, "mode: features mode needs the bundle's input_dim (feature size)")
    n_out = n_outputs(cfg, len(genes), n_primary)
    n_aux = n_out - n_primary  # a primary-only gate (PGL) sees no auxiliary genes: its model predicts none
    model = Estimator(in_dim, n_out, trunk=tuple(cfg.trunk), dropout=cfg.dropout, backbone=backbone)
    gate = create_gate(cfg.method, n_aux, {name: np.asarray(r)[:n_aux] for name, r in prior_ranks.items()},
                       **gate_options(cfg))
    return model, gate


def gate_state(gate: Any) -> dict[str, Tensor]:
    """The gate's tensors (empty for a gate that is not a module)."""
    return gate.state_dict() if hasattr(gate, "state_dict") else {}
