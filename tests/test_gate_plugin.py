"""A new gate is one class plus its registration: it then trains through ``fit`` from a plain config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from agl.checks import num_in, setting
from agl.config import TrainConfig, describe_settings, list_gates
from agl.errors import ConfigError
from agl.selection import GATES, Gate, register_gate
from agl.training.bundles import make_bundle
from agl.training.loop import fit
from trainkit import first_split, small_config, use_cheap_features


@pytest.fixture
def toy_gate():
    """Everything a new gate needs: one class with its Options, and @register_gate."""

    @register_gate("toy_constant")
    class ConstantWeightGate(Gate):
        """Every auxiliary gene weighs ``toy_weight``."""

        @dataclass
        class Options:
            toy_weight: float = setting(0.25, num_in(0.0, 1.0), "toy: weight of every auxiliary gene")

        def __init__(self, n_aux: int, prior_ranks: Any = None, **options: Any):
            super().__init__(n_aux, prior_ranks, **options)
            self.register_buffer("w", torch.full((n_aux,), float(self.options.toy_weight)))

        def weights(self) -> torch.Tensor:
            return self.w

    try:
        yield ConstantWeightGate
    finally:
        GATES.pop("toy_constant", None)


def test_toy_gate_trains_through_fit(toy_gate, demo_store, monkeypatch) -> None:
    use_cheap_features(monkeypatch)
    # the registry is what config checks, help texts and errors read
    assert "toy_constant" in list_gates() and "toy_weight" in describe_settings()
    cfg = TrainConfig.from_dict({**small_config().to_dict(), "method": "toy_constant", "toy_weight": 0.75,
                                 "epochs": 1, "mode": "features"})
    assert cfg.toy_weight == 0.75
    data = make_bundle(demo_store, first_split(demo_store), cfg)
    result = fit(cfg, data)
    assert isinstance(result.gate, toy_gate) and result.epochs_run == 1
    np.testing.assert_allclose(result.weights, 0.75)
    assert np.isfinite(result.test["pcc"])
    # the option is checked by its own declaration, and unknown keys stay errors
    with pytest.raises(ConfigError, match=r"toy_weight: must be a number in \[0.0, 1.0\]"):
        TrainConfig.from_dict({"method": "toy_constant", "toy_weight": 2.0})
    with pytest.raises(ConfigError, match="unknown setting"):
        TrainConfig.from_dict({"method": "toy_constant", "toy_wieght": 0.5})


def test_unregistered_gate_is_gone(toy_gate) -> None:
    GATES.pop("toy_constant")
    with pytest.raises(ConfigError, match="method: must be one of the registered gates"):
        TrainConfig.from_dict({"method": "toy_constant"})
