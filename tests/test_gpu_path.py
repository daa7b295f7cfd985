"""The GPU path's decisions, checked on CPU: trial concurrency and encoder actors on an autoscaling
cluster (a CPU:0 head), the space's GPU request honoured by nested trainers, device resolution."""
from __future__ import annotations

import pytest

from agl.distributed.spaces import load_space, parse_space
from agl.distributed.tune import SweepOptions, _max_concurrent
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
    from agl.distributed.tune import _trial_gpus

    # nested trainers of a space that asks for GPUs hold GPUs, so GPUs (not CPUs) bound them
    train = SweepOptions(trainer="train", workers_per_trial=1)
    assert _trial_gpus(train, space) and not _trial_gpus(train, parse_space(
        {"params": {"lr": {"type": "float", "low": 1e-4, "high": 1e-3}}}, source="cpu.yaml"))
    assert _max_concurrent(train, space, {"CPU": 16.0, "GPU": 2.0}) == 2


def test_a_trial_uses_the_cpus_it_reserves():
    from agl.distributed.tune import _trial_threads

    assert _trial_threads(SweepOptions(), load_space("finetune-gpu")) == 4
    assert _trial_threads(SweepOptions(threads_per_trial=2), load_space("tiny")) == 2


def test_space_rejects_a_bad_max_concurrent():
    with pytest.raises(ConfigError, match="max_concurrent"):
        _gpu_space(max_concurrent=0)


def test_encoder_actors_on_an_autoscaling_cluster_need_the_flag():
    from agl.distributed.features import actor_gpus

    with pytest.raises(ConfigError, match="--num-gpus"):
        actor_gpus(None, HEAD_ONLY, joined_cluster=True)
    assert actor_gpus(1, HEAD_ONLY, joined_cluster=True) == 1.0
    assert actor_gpus(None, {"CPU": 4.0, "GPU": 1.0}, joined_cluster=True) == 1.0
    assert actor_gpus(None, {"CPU": 4.0}, joined_cluster=False) == 0.0  # a local Ray without GPUs


# --------------------------------------------------------------------------- devices: no silent CPU fallback
@pytest.fixture
def ray_reserved_one_gpu(monkeypatch):
    """This process looks like a Ray worker that Ray reserved GPU 0 for, on a machine without CUDA."""
    import ray
    import torch

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.reliability(kind="bad input", case="a Ray worker holds a reserved GPU but torch sees no CUDA",
                         outcome="ConfigError naming the setting 'device' and the reserved GPU ids; no silent CPU run")
def test_a_ray_reserved_gpu_without_cuda_is_an_error(ray_reserved_one_gpu):
    from agl.training.loop import resolve_device

    with pytest.raises(ConfigError, match="Ray reserved GPU"):
        resolve_device("auto")


def test_the_resolved_device_is_logged_at_the_start_of_a_run(demo_store, caplog):
    import logging

    from agl.training.loop import fit
    from trainkit import cheap_bundle, small_config

    cfg = small_config(method="topk", k=50, epochs=1, device="auto")
    with cheap_bundle(demo_store) as data, caplog.at_level(logging.INFO):
        fit(cfg, data)
    assert any(r.getMessage().startswith("device: auto -> cpu (") for r in caplog.records)


def test_the_feature_cache_runs_on_the_configured_device(demo_store, monkeypatch):
    import numpy as np

    from agl import models
    from agl.training.bundles import make_bundle
    from trainkit import first_split, small_config

    calls = []

    def recording_cache(store, backbone, weights, **kw):
        calls.append(kw.get("device", "cpu"))
        return np.zeros((8, len(store.spots), 4), dtype=np.float32)

    monkeypatch.setattr(models, "feature_cache", recording_cache)
    make_bundle(demo_store, first_split(demo_store), small_config(device="cuda:1"))
    assert calls == ["cuda:1"]


def _features_pyfunc(device: str):
    """The pyfunc champion of a features-mode model (random MobileNetV2 encoder), as load_context leaves it."""
    from agl.config import TrainConfig
    from agl.models import Estimator
    from agl.tracking.pyfunc import AglPyfuncModel

    return AglPyfuncModel().serve(Estimator(1280, 5, trunk=(8,), dropout=0.0),
                                  TrainConfig(mode="features", backbone="torchvision/mobilenet_v2", weights=None,
                                              device=device),
                                  [f"gene{i}" for i in range(5)])


def test_the_pyfunc_model_builds_its_encoder_once(demo_store, monkeypatch):
    import numpy as np

    from agl import models
    from agl.data.store import open_store

    built = []
    real = models.create_backbone
    monkeypatch.setattr(models, "create_backbone", lambda *a, **kw: built.append(a) or real(*a, **kw))
    served = _features_pyfunc("cpu")
    patches = np.asarray(open_store(demo_store).patches[:2])
    outs = [served.predict(None, patches) for _ in range(3)]
    assert len(built) == 1 and outs[0].shape == (2, 5) and all(np.array_equal(outs[0], o) for o in outs)


def test_the_pyfunc_model_predicts_on_the_runs_device(demo_store, monkeypatch):
    import numpy as np
    import torch

    from agl.data.store import open_store

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    patches = np.asarray(open_store(demo_store).patches[:2])
    # a CUDA run's model on a host without CUDA: the host's device (with a warning), as asking for the CPU does
    model = _features_pyfunc("cuda")  # one model: its encoder is random
    on_host = model.predict(None, patches)
    asked = model.predict(None, patches, params={"device": "cpu"})
    assert on_host.shape == asked.shape == (2, 5)
    np.testing.assert_allclose(on_host.to_numpy(), asked.to_numpy())


# --------------------------------------------------------------------------- feature cache
def test_the_eight_views_in_one_pass_are_the_views_one_at_a_time(demo_store):
    import numpy as np
    import torch

    from agl.data.store import open_store
    from agl.models import create_backbone
    from agl.models.features import encode_views

    torch.manual_seed(0)
    encoder, _ = create_backbone("torchvision/mobilenet_v2", None)
    encoder = encoder.eval().to(memory_format=torch.channels_last)
    patches = np.asarray(open_store(demo_store).patches[:3, :64, :64])
    one = encode_views(encoder, patches, 8, "cpu", one_pass=True)
    each = encode_views(encoder, patches, 8, "cpu", one_pass=False)
    assert one.shape == each.shape == (8, 3, 1280)
    np.testing.assert_allclose(one, each, rtol=1e-4, atol=1e-4)  # same view order, same patch order


def test_the_cache_key_records_bf16_features_only(demo_store):
    from agl.data.store import open_store
    from agl.models.features import encoding_precision, feature_cache_key

    store = open_store(demo_store)
    fp32, _ = feature_cache_key(store, "torchvision/mobilenet_v2", "random")
    bf16, fields = feature_cache_key(store, "torchvision/mobilenet_v2", "random", precision="bf16")
    assert fp32 != bf16 and fields["precision"] == "bf16"
    assert encoding_precision("cpu", "bf16") == "fp32" and encoding_precision("cuda", "bf16") == "bf16"
