"""Frozen-backbone feature cache: features of every spot under all 8 dihedral views, computed once.

The cache file is ``STORE/cache/features/{key}.npy`` with shape ``[views, N, D]`` (float32
by default; ``dtype="float16"`` halves the size), where view ``k`` is
``agl.data.augment.dihedral(patch, k)``, so the training loader can draw a random view per
spot per epoch exactly as it would from images. ``key`` hashes everything the features depend
on: backbone name, the exact weights (file sha256 / hub name), the store's patch file
sha256 and patch shape, its gene-list hash, the encoder's input preprocessing (mean/std, and
input size / interpolation / crop when the encoder resizes: ``agl.models.backbones.Preprocessing``,
applied by the backbone itself), views and dtype. A JSON sidecar records those fields. Files are written to a temporary name and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from agl.data.augment import N_VIEWS, dihedral
from agl.data.loaders import IMAGENET_MEAN, IMAGENET_STD  # one definition for loader and cache
from agl.errors import ConfigError, DataError
from agl.fileio import exclusive_lock
from agl.models.backbones import create_backbone

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the way features are computed changes


def to_model_input(patches_uint8: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` patches -> float ``[B, 3, H, W]`` ImageNet-normalised on ``device``."""
    x = torch.from_numpy(np.array(patches_uint8, dtype=np.uint8)).to(device)  # copy: store memmaps are read-only
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def feature_cache_key(store: Any, backbone: str, weights_id: str, views: int = N_VIEWS, dtype: str = "float32",
                      preprocessing: dict[str, Any] | None = None, precision: str = "fp32") -> tuple[str, dict[str, Any]]:
    """The cache key for ``store`` features and the fields it hashes.

    ``preprocessing`` is the encoder's input (``agl.models.backbones.Preprocessing.to_dict()``,
    ImageNet as-is when None): its mean/std are the ``normalisation`` field, and an encoder that
    resizes or crops adds the field ``encoder_input`` (so ImageNet-as-is keys stay what they were);
    features encoded in bf16 (on CUDA) add ``precision`` (float32 keys stay what they were).
    """
    from agl.models.backbones import Preprocessing

    prep = Preprocessing.from_dict(preprocessing) if preprocessing else Preprocessing()
    manifest = dict(getattr(store, "manifest", {}) or {})
    files = manifest.get("files", {}) or {}
    fields = {
        "cache_version": CACHE_VERSION,
        "backbone": backbone,
        "weights": weights_id,
        "patches_sha256": files.get("arrays/patches.arrow"),
        "patch_shape": list(np.shape(store.patches)[1:]),
        "n_spots": int(np.shape(store.patches)[0]),
        "patch_settings": {k: v for k, v in manifest.items() if k.startswith("patch")},  # e.g. patch_um, border
        "gene_list_sha256": manifest.get("gene_list_sha256"),
        "normalisation": [list(prep.mean), list(prep.std)],
        "views": int(views),
        "dtype": dtype,
    }
    if prep.input_size is not None:
        fields["encoder_input"] = prep.to_dict()
    if precision != "fp32":
        fields["precision"] = precision
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    safe_name = backbone.replace("/", "-")
    return f"{safe_name}-{digest}", fields


def encoding_precision(device: str | torch.device, precision: str) -> str:
    """The precision features are really encoded in: bf16 only on CUDA (CPU encodes float32)."""
    from agl.training.precision import autocast_dtype

    return "bf16" if autocast_dtype(torch.device(device), precision) is not None else "fp32"


@torch.inference_mode()
def encode_views(module: nn.Module, patches_uint8: np.ndarray, views: int, device: str | torch.device = "cpu",
                 precision: str = "fp32", one_pass: bool | None = None) -> np.ndarray:
    """Features ``[views, B, D]`` (float32) of a batch of uint8 patches under the first ``views`` dihedral views.

    ``one_pass`` (default: on CUDA) sends all views through the encoder as one batch: one launch
    sequence and one copy back instead of ``views``. On CUDA the upload is pinned uint8 and, with
    ``precision="bf16"``, the encoder runs in bf16 autocast; the CPU encodes float32.
    """
    device = torch.device(device)
    one_pass = device.type == "cuda" if one_pass is None else one_pass
    if device.type == "cuda":
        from agl.data.loaders import normalise_uint8

        host = torch.from_numpy(np.ascontiguousarray(patches_uint8, dtype=np.uint8)).pin_memory()
        x = normalise_uint8(host.to(device, non_blocking=True).permute(0, 3, 1, 2))
    else:
        x = to_model_input(patches_uint8, device)
    bf16 = encoding_precision(device, precision) == "bf16"
    # channels_last: about 2x faster convolutions on CPU (oneDNN) for MobileNet-type nets, and cuDNN's bf16 layout
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if one_pass:
            stacked = torch.cat([dihedral(x, v) for v in range(views)]).contiguous(memory_format=torch.channels_last)
            return module(stacked).float().reshape(views, x.shape[0], -1).cpu().numpy()
        return np.stack([module(dihedral(x, v).contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
                         for v in range(views)])


def _encode(module: nn.Module, patches: np.ndarray, out: np.ndarray, views: int, batch_size: int, device: str,
            precision: str = "fp32") -> None:
    """Fill ``out[v, i]`` with the features of view ``v`` of patch ``i``, batch by batch."""
    from tqdm.auto import tqdm

    n = patches.shape[0]
    with tqdm(total=n * views, unit="img", desc="features", mininterval=2.0) as bar:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            out[:, start:stop] = encode_views(module, patches[start:stop], views, device,
                                              precision).astype(out.dtype, copy=False)
            bar.update((stop - start) * views)


def feature_cache(
    store: Any,
    backbone: str = "torchvision/mobilenet_v2",
    weights: str | Path | None = "imagenet",
    views: int = N_VIEWS,
    batch_size: int = 64,
    device: str = "cpu",
    dtype: str = "float32",
    sha256: str | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Frozen features ``[views, N, D]`` of every spot of ``store`` (memory-mapped, read-only).

    Computed on first use and saved under ``store.cache_dir / "features"``; later calls with
    the same backbone, weights and store reuse the file. The array's ``preprocessing``
    attribute is the encoder input the features were computed with. ``weights=None`` (random init) is
    seeded (``torch.manual_seed(0)``) so its cache is reproducible. ``precision="bf16"`` encodes in bf16
    autocast on CUDA (recorded in the key; on CPU features stay float32 and share the float32 key).
    """
    if not 1 <= views <= N_VIEWS:
        raise ConfigError("views", f"must be in 1..{N_VIEWS}, got {views}")
    if dtype not in ("float32", "float16"):
        raise ConfigError("dtype", f"feature cache dtype must be float32 or float16, got {dtype!r}")
    patches = store.patches
    if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
        raise DataError(getattr(store, "path", "store"), f"patches must be uint8 [N, H, W, 3], got {patches.dtype} {patches.shape}")

    precision = encoding_precision(device, precision)
    module, key, fields, path, shape = cache_target(store, backbone, weights, views, dtype, sha256, precision)

    def compute() -> None:
        if not converted_from_float32(store, module, backbone, path, key, fields, shape, dtype, precision):
            compute_cache_file(module, patches, path.parent, key, fields, shape, dtype, batch_size, device, precision)

    return cached_or_computed(module, path, shape, dtype, compute)


def converted_from_float32(store: Any, module: nn.Module, backbone: str, path: Path, key: str, fields: dict[str, Any],
                           shape: tuple[int, int, int], dtype: str, precision: str = "fp32") -> bool:
    """Write the ``dtype`` cache at ``path`` by casting the store's float32 cache of the same encoder, if it has one.

    ``compute_cache_file`` encodes in float32 and casts each batch to ``dtype``, so casting the float32
    file gives the same array without running the encoder again. Returns False when there is no such file.
    """
    if dtype == "float32":
        return False
    source_key, _ = feature_cache_key(store, backbone, module.weights_id, shape[0], "float32",
                                      preprocessing=getattr(module, "preprocessing", None), precision=precision)
    source = _load_cached(path.parent / f"{source_key}.npy", shape, "float32")
    if source is None:
        return False

    def cast(out: np.ndarray) -> None:
        for view in range(shape[0]):  # one view at a time: bounded memory on a large cache
            out[view] = source[view].astype(dtype)

    write_cache_file(path.parent, key, fields, shape, dtype, cast, converted_from=source_key)
    log.info("feature cache written: %s (%s, cast from %s.npy)", path, dtype, source_key)
    return True


def cached_or_computed(module: nn.Module, path: Path, shape: tuple[int, int, int], dtype: str,
                       compute: Callable[[], None]) -> np.ndarray:
    """The cache at ``path`` (memory-mapped), after ``compute()`` has written it if it was missing.

    One writer per key: concurrent runs (Tune trials, parallel tests) wait on a lock and then
    reuse its file. The array's ``preprocessing`` is the encoder input, recorded by checkpoints.
    """
    cached = _load_cached(path, shape, dtype)
    if cached is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(path.parent / f".{path.stem}.lock"):
            cached = _load_cached(path, shape, dtype)
            if cached is None:
                compute()
                cached = np.load(path, mmap_mode="r")
    cached.preprocessing = dict(module.preprocessing)
    return cached


def cache_target(store: Any, backbone: str, weights: str | Path | None, views: int, dtype: str,
                 sha256: str | None = None, precision: str = "fp32"
                 ) -> tuple[nn.Module, str, dict[str, Any], Path, tuple[int, int, int]]:
    """The encoder, cache key, hashed fields, file path and array shape of ``store``'s feature cache."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # only matters for weights=None: a reproducible random encoder
        module, dim = create_backbone(backbone, weights, sha256=sha256)
    key, fields = feature_cache_key(store, backbone, module.weights_id, views, dtype,
                                    preprocessing=getattr(module, "preprocessing", None), precision=precision)
    return module, key, fields, Path(store.cache_dir) / "features" / f"{key}.npy", (views, store.patches.shape[0], dim)


def _load_cached(path: Path, shape: tuple[int, int, int], dtype: str) -> np.ndarray | None:
    """The cached array (memory-mapped) if ``path`` holds one of the expected shape and dtype."""
    if not path.is_file():
        return None
    cached = np.load(path, mmap_mode="r")
    if cached.shape == shape and cached.dtype == np.dtype(dtype):
        log.info("feature cache hit: %s", path)
        return cached
    log.warning("feature cache %s has shape %s %s, expected %s; recomputing", path, cached.shape, cached.dtype, shape)
    return None


def write_cache_file(folder: Path, key: str, fields: dict[str, Any], shape: tuple[int, int, int], dtype: str,
                     fill: Callable[[np.ndarray], None], **meta: Any) -> Path:
    """``folder/{key}.npy`` filled by ``fill(out)`` and its JSON sidecar (``fields`` + ``meta``): temporary names, then
    renamed into place, so a reader never sees a half-written cache."""
    path = folder / f"{key}.npy"
    tmp = folder / f".{key}.tmp-{uuid.uuid4().hex[:8]}.npy"
    started = time.perf_counter()
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        fill(out)
        out.flush()
        del out
        sidecar = {**fields, "key": key, "dim": shape[2], "seconds": round(time.perf_counter() - started, 2), **meta}
        tmp_meta = folder / f".{key}.tmp-{uuid.uuid4().hex[:8]}.json"
        tmp_meta.write_text(json.dumps(sidecar, indent=1))
        os.replace(tmp, path)
        os.replace(tmp_meta, folder / f"{key}.json")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def compute_cache_file(module: nn.Module, patches: np.ndarray, folder: Path, key: str, fields: dict[str, Any],
             shape: tuple[int, int, int], dtype: str, batch_size: int, device: str, precision: str = "fp32") -> None:
    """Encode every patch and view into a temporary file, then rename it (and its JSON sidecar) into place."""
    module = module.to(device).eval().to(memory_format=torch.channels_last)
    started = time.perf_counter()
    path = write_cache_file(folder, key, fields, shape, dtype,
                            lambda out: _encode(module, patches, out, shape[0], batch_size, device, precision))
    seconds = time.perf_counter() - started
    log.info("feature cache written: %s (%d images in %.1f s, %.1f img/s)", path,
             shape[0] * patches.shape[0], seconds, shape[0] * patches.shape[0] / max(seconds, 1e-9))


def share_feature_cache(source: Any, target: Any) -> list[Path]:
    """Link ``source``'s cached feature files into ``target``'s cache when both stores give the same keys.

    Two stores ingested from the same spots and images with different gene-set settings (e.g. another
    primary panel) have the same patches and gene list, so every cache key, which hashes only those
    store fields, is the same: their features are identical. Returns the files linked (copied where
    hard links are not possible); nothing when the stores differ in what the features depend on.
    """
    import shutil

    probe = lambda store: feature_cache_key(store, "probe", "probe")[0]  # noqa: E731  (store-dependent part only)
    if probe(source) != probe(target):
        return []
    src_dir, dst_dir = Path(source.cache_dir) / "features", Path(target.cache_dir) / "features"
    linked = []
    for f in sorted(src_dir.glob("*")) if src_dir.is_dir() else []:
        if f.name.startswith(".") or not f.is_file() or (dst_dir / f.name).exists():
            continue
        dst_dir.mkdir(parents=True, exist_ok=True)
        tmp = dst_dir / f".{f.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            os.link(f, tmp)
        except OSError:
            shutil.copy2(f, tmp)
        os.replace(tmp, dst_dir / f.name)
        linked.append(dst_dir / f.name)
    return linked
