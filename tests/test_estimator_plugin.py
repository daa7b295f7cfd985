"""A new hypergradient estimator with an option is one function plus its registration, in one file.

The estimator below is registered with its options dataclass; from then on ``hypergrad=toy_push``
and its option ``toy_push`` are run settings that ``agl train --set`` accepts, checks and hands to
the estimator through ``fit`` (the real command line, in-process, on the her2st demo store).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from agl.checks import positive, setting
from agl.cli import main
from agl.config import TrainConfig, describe_settings, list_hypergradients
from agl.errors import ConfigError
from agl.training.bilevel import ESTIMATORS, HypergradProblem, register_estimator
from trainkit import first_split, use_cheap_features

CALLS: list[float] = []


@pytest.fixture
def toy_estimator():
    """Everything a new estimator needs: its options and @register_estimator."""

    @dataclass
    class PushOptions:
        toy_push: float = setting(1.0, positive, "toy_push: size of the constant hypergradient (towards a larger t)")

    @register_estimator("toy_push", options=PushOptions)
    def push(problem: HypergradProblem, *, toy_push: float = 1.0) -> tuple[float, list[float], list[torch.Tensor]]:
        """A constant hypergradient ``-toy_push`` for every outer scalar (no inner steps)."""
        CALLS.append(toy_push)
        return float("nan"), [], [torch.full_like(p, -toy_push) for p in problem.outer]

    CALLS.clear()
    try:
        yield push
    finally:
        ESTIMATORS.unregister("toy_push")


def test_toy_estimator_trains_through_fit_via_set(toy_estimator, demo_store, tmp_path, monkeypatch) -> None:
    use_cheap_features(monkeypatch)
    # the registry is what config checks and the generated help read
    assert "toy_push" in list_hypergradients() and "toy_push: size of the constant" in describe_settings()
    out = tmp_path / "run"
    args = ["train", "--store", str(demo_store), "--method", "dkgsb", "--split", first_split(demo_store),
            "--out", str(out), "--set", "epochs=2", "--set", "trunk=[16]", "--set", "device=cpu",
            "--set", "weights=null", "--set", "bilevel_batch_size=256", "--set", "hypergrad=toy_push",
            "--set", "toy_push=0.25"]
    assert main(args) == 0
    assert CALLS and set(CALLS) == {0.25}  # the option reached the estimator on every outer step
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["hypergrad"] == "toy_push" and result["config"]["toy_push"] == 0.25
    t = [row["t"] for row in result["history"]]
    assert t[-1] > 0.5  # a negative hypergradient raised the threshold from t_init
    # the option is checked by its own declaration, and a misspelt one stays an error
    with pytest.raises(ConfigError, match=r"toy_push: must be a number in \(0.0, inf\)"):
        TrainConfig.from_dict({"hypergrad": "toy_push", "toy_push": -1.0})
    with pytest.raises(ConfigError, match="unknown setting"):
        TrainConfig.from_dict({"hypergrad": "toy_push", "toy_puhs": 1.0})


def test_unregistered_estimator_is_an_error_naming_the_known_ones(toy_estimator) -> None:
    ESTIMATORS.unregister("toy_push")
    with pytest.raises(ConfigError, match="hypergrad: must be one of the registered hypergradient estimators: unroll"):
        TrainConfig.from_dict({"hypergrad": "toy_push"})
    with pytest.raises(ConfigError, match=r"hypergrad: unknown hypergradient estimator 'toy_push'; known: unroll, "):
        ESTIMATORS.get("toy_push")
