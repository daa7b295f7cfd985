"""The GPU path's decisions, checked on CPU: trial concurrency and encoder actors on an autoscaling
cluster (a CPU:0 head), the space's GPU request honoured by nested trainers, device resolution."""
from __future__ import annotations

import pytest

from agl.distributed.features import actor_gpus
from agl.distributed.spaces import load_space, parse_space
from agl.distributed.tune import SweepOptions, _max_concurrent, _trial_gpus
from agl.errors import ConfigError

# cluster.yaml at start-up: the head only (CPU: 0, no trials there), GPU workers at min_workers: 0
HEAD_ONLY = {"CPU": 0.0, "memory": 8e9, "object_store_memory": 2e9, "node:__internal_head__": 1.0}


def _gpu_space(**extra):
    raw = {"num_samples": 6, "resources": {"cpu": 4, "gpu": 1}, "fixed": {"mode": "features"},
           "params": {"lr": {"type": "float", "low": 1e-4, "high": 1e-3}}, **extra}
    return parse_space(raw, source="gpu.yaml")


def test_concurrency_on_an_autoscaling_cluster_is_not_read_from_its_start_up_resources():
    space = _gpu_space()
    assert _max_concurrent(SweepOptions(), space, HEAD_ONLY, joined_cluster=True) == 6  # all trials may queue
    assert _max_concurrent(SweepOptions(), _gpu_space(max_concurrent=3), HEAD_ONLY, joined_cluster=True) == 3
    assert _max_concurrent(SweepOptions(max_concurrent=2), space, HEAD_ONLY, joined_cluster=True) == 2
    assert load_space("finetune-gpu").max_concurrent == 4  # cluster.yaml's GPU workers


def test_concurrency_on_a_local_ray_follows_its_resources():
    space = _gpu_space()
    assert _max_concurrent(SweepOptions(), space, {"CPU": 16.0, "GPU": 2.0}) == 2
    # nested trainers of a space that asks for GPUs hold GPUs, so GPUs (not CPUs) bound them
    train = SweepOptions(trainer="train", workers_per_trial=1)
    assert _trial_gpus(train, space) and not _trial_gpus(train, parse_space(
        {"params": {"lr": {"type": "float", "low": 1e-4, "high": 1e-3}}}, source="cpu.yaml"))
    assert _max_concurrent(train, space, {"CPU": 16.0, "GPU": 2.0}) == 2


def test_space_rejects_a_bad_max_concurrent():
    with pytest.raises(ConfigError, match="max_concurrent"):
        _gpu_space(max_concurrent=0)


def test_encoder_actors_on_an_autoscaling_cluster_need_the_flag():
    with pytest.raises(ConfigError, match="--num-gpus"):
        actor_gpus(None, HEAD_ONLY, joined_cluster=True)
    assert actor_gpus(1, HEAD_ONLY, joined_cluster=True) == 1.0
    assert actor_gpus(None, {"CPU": 4.0, "GPU": 1.0}, joined_cluster=True) == 1.0
    assert actor_gpus(None, {"CPU": 4.0}, joined_cluster=False) == 0.0  # a local Ray without GPUs
