"""DkGSB's features-mode defaults move its threshold on signal: on a small planted problem (real demo features,
45 helpful of 300 auxiliary genes, a prior that ranks them mostly first) k falls from its start (150) towards
the planted 45 within 15 epochs; with the earlier defaults (one 64-spot validation batch per outer step, one
outer step per training batch, outer_lr 0.003) t stays where it started."""
from __future__ import annotations

from pathlib import Path

import pytest

from agl.config import MODE_DEFAULTS, TrainConfig

EARLIER_DEFAULTS = {"outer_val": "batch", "bilevel_batch_size": 64, "outer_steps": None, "hypergrad_batches": 1,
                    "outer_lr": 3e-3}


@pytest.fixture(scope="module")
def planted_problem(demo_store: Path):
    from agl.bench.selection import PlantedStore, plant
    from agl.data.store import open_store
    from agl.models import feature_cache

    store = open_store(demo_store)
    features = feature_cache(store, TrainConfig().backbone, TrainConfig().weights)
    planted = plant(features, n_aux=300, seed=0)
    return PlantedStore(store, planted), planted


def learned_k(problem, **settings) -> tuple[int, list[int]]:
    import torch

    from agl.bench.selection import BASE_SETTINGS, PRIOR, run_method

    torch.set_num_threads(1)
    store, _ = problem
    run = run_method(store, "kfold-s0-f0", {**BASE_SETTINGS, "epochs": 15, "patience": 15, "method": "dkgsb",
                                            "prior": PRIOR, "t_init": 0.5, "seed": 0, **settings})
    return run["k"], [int(row["k"]) for row in run["history"]]


def test_features_mode_defaults_are_the_larger_outer_budget() -> None:
    cfg = TrainConfig(method="dkgsb")
    assert {key: getattr(cfg, key) for key in MODE_DEFAULTS["features"]} == MODE_DEFAULTS["features"]
    finetune = TrainConfig(method="dkgsb", mode="finetune")
    assert {key: getattr(finetune, key) for key in EARLIER_DEFAULTS} == EARLIER_DEFAULTS


def test_dkgsb_defaults_move_t_towards_the_planted_k(planted_problem) -> None:
    _, planted = planted_problem
    assert planted.k_planted == 45
    k, history = learned_k(planted_problem)            # the defaults: nothing about the outer loop given
    assert history[0] == 150 and k <= 0.85 * 150, history
    assert k > planted.k_planted                       # still on its way down after 15 epochs, not past it
    old_k, old_history = learned_k(planted_problem, **EARLIER_DEFAULTS)
    assert old_k >= 0.9 * 150, old_history             # the earlier defaults: t barely leaves t_init
