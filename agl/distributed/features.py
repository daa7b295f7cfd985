"""The frozen-feature cache computed on Ray Data: ``map_batches`` over an actor pool, one encoder per actor.

The result is the same file as :func:`agl.models.features.feature_cache` writes (same key,
same ``[views, N, D]`` layout, same sidecar), so training cannot tell how it was made. Work is
done slide by slide into ``features/{key}.parts/{slide}.npy``: a run that is interrupted
keeps its finished slides and a rerun computes only the rest (resumable per slide). When every
slide is done the parts are assembled into the cache file (temporary name, then rename) and
removed. Actors ask for one GPU each when the cluster has GPUs (``num_gpus=None``: auto; on a
joined cluster, which may autoscale, ``--num-gpus`` decides), else one CPU.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from agl.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class FeatureEncoder:
    """A Ray Data actor: opens the store read-only, builds the encoder once, encodes batches of spot rows.

    A batch is ``{"data": rows}``; the answer is ``{"row": rows, "features": [B, views, D]}``.
    """

    def __init__(self, store_path: str, backbone: str, weights: Any, sha256: str | None, views: int,
                 use_gpu: bool, threads: int | None = None):
        import torch

        from agl.data.store import open_store
        from agl.models.backbones import create_backbone

        if threads:
            torch.set_num_threads(threads)
        self.patches = open_store(store_path).patches  # memory-mapped: each actor reads only its rows
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # as the in-process cache: weights=None is a reproducible random encoder
            module, _ = create_backbone(backbone, weights, sha256=sha256)
        self.module = module.to(self.device).eval().to(memory_format=torch.channels_last)
        self.views = views

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from agl.models.features import encode_views

        rows = np.asarray(batch["data"], dtype=np.int64)
        feats = encode_views(self.module, self.patches[np.sort(rows)], self.views, self.device)  # [V, B, D]
        return {"row": np.sort(rows), "features": np.ascontiguousarray(feats.transpose(1, 0, 2))}  # [B, V, D]


def actor_gpus(num_gpus: float | None, resources: dict[str, float], joined_cluster: bool) -> float:
    """GPUs per encoder actor: ``num_gpus`` when given; else 1 on a Ray that has GPUs.

    A joined cluster without GPUs at start-up may still autoscale GPU workers (``cluster.yaml``:
    ``min_workers: 0``), so its start-up resources cannot decide: there ``--num-gpus`` is required.
    """
    if num_gpus is not None:
        if num_gpus < 0:
            raise ConfigError("--num-gpus", f"must be >= 0, got {num_gpus}")
        return float(num_gpus)
    if float(resources.get("GPU", 0.0)) > 0:
        return 1.0
    if joined_cluster:
        raise ConfigError("--num-gpus", "the joined Ray cluster shows no GPU now but may autoscale GPU workers; "
                                        "pass --num-gpus 1 (GPU actors) or --num-gpus 0 (CPU actors)")
    return 0.0


def feature_cache_ray(
    store: Any,
    backbone: str = "torchvision/mobilenet_v2",
    weights: Any = "imagenet",
    views: int | None = None,
    *,
    num_workers: int = 2,
    batch_size: int = 64,
    num_gpus: float | None = None,
    dtype: str = "float32",
    sha256: str | None = None,
    threads_per_worker: int | None = 1,
    joined_cluster: bool = False,
) -> np.ndarray:
    """The feature cache of ``store`` computed by ``num_workers`` Ray Data actors (Ray must be initialised).

    Returns the memory-mapped cache, as :func:`agl.models.features.feature_cache` does; a
    cache that already exists is reused without starting an actor. ``num_gpus`` per actor:
    ``None`` takes 1 when the cluster has GPUs, else 0 (an error on a ``joined_cluster``: see ``actor_gpus``).
    """
    import ray

    from agl.data.augment import N_VIEWS
    from agl.models.features import cache_target, cached_or_computed, converted_from_float32

    views = N_VIEWS if views is None else views
    if not 1 <= views <= N_VIEWS:
        raise ConfigError("views", f"must be in 1..{N_VIEWS}, got {views}")
    if num_workers < 1:
        raise ConfigError("num_workers", f"must be >= 1, got {num_workers}")
    if not ray.is_initialized():
        raise ConfigError("ray", "feature_cache_ray needs a running Ray (agl.distributed.runtime.init_ray)")
    module, key, fields, path, shape = cache_target(store, backbone, weights, views, dtype, sha256)
    folder = path.parent

    def compute() -> None:
        if converted_from_float32(store, module, backbone, path, key, fields, shape, dtype):
            return
        gpus = actor_gpus(num_gpus, ray.cluster_resources(), joined_cluster)
        _compute_parts(store, folder / f"{key}.parts", backbone, weights, sha256, shape,
                       num_workers, batch_size, gpus, threads_per_worker)
        _assemble(folder, key, fields, shape, dtype, store)

    return cached_or_computed(module, path, shape, dtype, compute)


def _slide_rows(store: Any) -> dict[str, np.ndarray]:
    slides = store.spots["slide_id"].astype(str).to_numpy()
    return {sid: np.flatnonzero(slides == sid) for sid in dict.fromkeys(slides)}


def _part_path(parts: Path, slide: str) -> Path:
    return parts / f"{slide}.npy"  # slide ids are file-name safe (agl.data.store.SAFE_NAME, checked at ingest)


def _compute_parts(store: Any, parts: Path, backbone: str, weights: Any, sha256: str | None,
                   shape: tuple[int, int, int], num_workers: int, batch_size: int, num_gpus: float,
                   threads: int | None) -> None:
    """Encode every slide without a finished part, on an actor pool, writing one part per slide."""
    import ray
    from tqdm.auto import tqdm

    views, _, dim = shape
    parts.mkdir(parents=True, exist_ok=True)
    by_slide = _slide_rows(store)
    todo = {sid: rows for sid, rows in by_slide.items()
            if not _part_ok(_part_path(parts, sid), (len(rows), views, dim))}
    if len(todo) < len(by_slide):
        log.info("feature cache: %d of %d slides already done in %s (resuming)", len(by_slide) - len(todo),
                 len(by_slide), parts)
    if not todo:
        return
    rows = np.concatenate(list(todo.values()))
    owner = np.empty(shape[1], dtype=object)
    for sid, r in todo.items():
        owner[r] = sid
    position = np.empty(shape[1], dtype=np.int64)
    for r in todo.values():
        position[r] = np.arange(len(r))
    # blocks of a few batches, slide by slide (column "data": spot rows): every actor gets work, and the
    # slides' parts finish roughly in order
    chunk = batch_size * 4
    ds = ray.data.from_numpy([np.asarray(r[i:i + chunk], dtype=np.int64)
                              for r in todo.values() for i in range(0, len(r), chunk)])
    encoded = ds.map_batches(
        FeatureEncoder, batch_size=batch_size, concurrency=num_workers, num_gpus=num_gpus or None,
        num_cpus=0 if num_gpus else (threads or 1),
        fn_constructor_kwargs={"store_path": str(store.path), "backbone": backbone, "weights": weights,
                               "sha256": sha256, "views": views, "use_gpu": bool(num_gpus), "threads": threads})
    buffers: dict[str, Any] = {}
    filled = {sid: 0 for sid in todo}
    started = time.perf_counter()
    with tqdm(total=len(rows) * views, unit="img", desc="features (ray)", mininterval=2.0) as bar:
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            for sid in dict.fromkeys(owner[batch["row"]]):
                mask = owner[batch["row"]] == sid
                if sid not in buffers:
                    tmp = parts / f".{_part_path(parts, sid).stem}.tmp-{uuid.uuid4().hex[:8]}.npy"
                    buffers[sid] = (tmp, np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                                    shape=(len(todo[sid]), views, dim)))
                buffers[sid][1][position[batch["row"][mask]]] = batch["features"][mask]
                filled[sid] += int(mask.sum())
                if filled[sid] == len(todo[sid]):  # a finished slide is published at once: resumable
                    tmp, arr = buffers.pop(sid)
                    arr.flush()
                    del arr
                    os.replace(tmp, _part_path(parts, sid))
            bar.update(len(batch["row"]) * views)
    for tmp, _ in buffers.values():  # pragma: no cover - only if Ray returned fewer rows than asked
        tmp.unlink(missing_ok=True)
    missing = [sid for sid, n in filled.items() if n != len(todo[sid])]
    if missing:
        raise DataError(parts, f"Ray Data returned incomplete features for slides {missing}")
    seconds = time.perf_counter() - started
    log.info("feature cache on Ray: %d images in %.1f s (%.1f img/s, %d workers)", len(rows) * views, seconds,
             len(rows) * views / max(seconds, 1e-9), num_workers)


def _part_ok(path: Path, shape: tuple[int, int, int]) -> bool:
    if not path.is_file():
        return False
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return arr.shape == shape and arr.dtype == np.float32


def _assemble(folder: Path, key: str, fields: dict[str, Any], shape: tuple[int, int, int], dtype: str,
              store: Any) -> None:
    """Write the ``[views, N, D]`` cache from the per-slide parts (temporary names, then rename), drop the parts."""
    import shutil

    from agl.models.features import write_cache_file

    parts = folder / f"{key}.parts"

    def fill(out: np.ndarray) -> None:
        for sid, rows in _slide_rows(store).items():
            out[:, rows] = np.load(_part_path(parts, sid), mmap_mode="r").transpose(1, 0, 2).astype(dtype, copy=False)

    write_cache_file(folder, key, fields, shape, dtype, fill, computed_by="ray-data")
    shutil.rmtree(parts, ignore_errors=True)
