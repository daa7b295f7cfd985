"""``agl bench core``: what a DkGSB outer step costs, and what the feature cache buys.

Measured in one run, reported as ratios (absolute seconds depend on the machine):

- ``outer_vs_plain``: time of one DkGSB outer step (hypergradient through H unrolled
  inner steps, then the threshold update) divided by the time of H plain training steps
  on the same batch. The physical floor is about 3x: every unrolled step keeps its graph
  and the backward pass runs through all of them plus the second-order terms.
- peak memory of each operation, as the growth of ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
  in a fresh process (so the peak is that operation's, not an earlier one's). tracemalloc
  would miss tensors, which torch allocates outside Python's allocator.
- both in features mode (cached frozen features -> trunk -> head over all genes) and in
  fine-tuning mode (a small backbone on patches resized to ``patch_px``).
- ``feature_cache_speedup``: time of one ordinary training epoch by fine-tuning divided by
  the time of the same epoch on cached features (the one-off cache build is reported separately).
- ``feature_cache_vs_plain_loop``: images/s of the feature cache's computation against a plain
  ``torch.inference_mode()`` channels-last loop over the same patches (target: within 10%).
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FEATURE_BATCH = 64
FINETUNE_BATCH = 16
FINETUNE_BACKBONE = "torchvision/mobilenet_v2"


def _maxrss_mb() -> float:
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # Linux reports KiB, macOS bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _setup(store_path: str, split: str, mode: str, patch_px: int, inner_steps: int,
           inner_optimizer: str = "adam", backbone: str = FINETUNE_BACKBONE, batch: int | None = None,
           threads: int = 1) -> dict[str, Any]:
    """Model, gate, optimisers and one training + one validation batch of the real store."""
    import torch
    import torch.nn.functional as F

    from agl.training.bundles import make_bundle
    from agl.data.store import open_store
    from agl.training.loop import TrainConfig, Trainer

    torch.set_num_threads(threads)
    cfg = TrainConfig(method="dkgsb", mode=mode, backbone=backbone if mode == "finetune" else FINETUNE_BACKBONE,
                      device="cpu", seed=0,
                      inner_steps=inner_steps, inner_optimizer=inner_optimizer,
                      weights="imagenet" if mode == "features" else None)
    data = make_bundle(open_store(store_path), split, cfg)
    tr = Trainer(cfg, data)
    batch = batch or (FEATURE_BATCH if mode == "features" else FINETUNE_BATCH)

    def resize(x: torch.Tensor) -> torch.Tensor:
        if mode == "finetune" and x.shape[-1] != patch_px:
            return F.interpolate(x, size=(patch_px, patch_px), mode="bilinear", align_corners=False, antialias=True)
        return x

    xt, yt = next(iter(data.train_batches(batch, 0)))
    xv, yv = next(iter(data.val_batches(batch, 0)))
    return {"cfg": cfg, "data": data, "tr": tr, "train": (resize(xt), yt), "val": (resize(xv), yv),
            "resize": resize, "batch": batch}


def _plain_step(s: dict[str, Any]) -> None:
    tr = s["tr"]
    x, y = s["train"]
    tr.model.train()
    tr.opt.zero_grad(set_to_none=True)
    tr.objective(tr.model(x), y, all_genes=False).backward()
    tr.opt.step()


def _outer_step(s: dict[str, Any]) -> None:
    from agl.training.bilevel import hypergradient

    tr, cfg = s["tr"], s["cfg"]
    (xt, yt), (xv, yv) = s["train"], s["val"]
    tr.outer_opt.zero_grad(set_to_none=True)
    hypergradient(tr.model, tr.gate, tr.loss_fn, (xt, yt), (xv, yv), tr.n_primary, inner_steps=cfg.inner_steps,
                  inner_lr=cfg.lr, inner_optimizer=cfg.inner_optimizer, first_order=cfg.first_order, optimizer=tr.opt)
    tr.outer_opt.step()
    tr.gate.project_()


def _epoch(s: dict[str, Any]) -> None:
    tr, cfg, data = s["tr"], s["cfg"], s["data"]
    tr.model.train()
    for x, y in data.train_batches(cfg.batch_size, 0):  # the same batches in both modes
        tr.opt.zero_grad(set_to_none=True)
        tr.objective(tr.model(s["resize"](x)), y, all_genes=False).backward()
        tr.opt.step()


OPERATIONS = {"plain": _plain_step, "outer": _outer_step, "epoch": _epoch}


def _measure(store_path: str, split: str, mode: str, op: str, repeats: int, patch_px: int, inner_steps: int,
             inner_optimizer: str = "adam") -> dict[str, Any]:
    """Run in a fresh process: median wall time of ``op`` and the ru_maxrss growth it caused."""
    s = _setup(store_path, split, mode, patch_px, inner_steps, inner_optimizer)
    OPERATIONS["plain"](s)  # warm-up (allocator, Adam state) so the timed runs are steady state
    rss_before = _maxrss_mb()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        OPERATIONS[op](s)
        times.append(time.perf_counter() - t0)
    return {"mode": mode, "op": op, "seconds_median": statistics.median(times), "seconds_all": times,
            "peak_rss_growth_mb": max(0.0, _maxrss_mb() - rss_before), "rss_before_mb": rss_before,
            "batch": s["batch"], "n_outputs": int(s["tr"].n_out), "n_train": int(len(s["data"].parts["train"])),
            "input_shape": list(s["train"][0].shape[1:])}


def _fresh(*args: Any) -> dict[str, Any]:
    """One measurement in a new process (ru_maxrss is a process-lifetime peak)."""
    return run_fresh(_measure, *args)


def run_bench_core(store: Any, out: Path, repeats: int = 3, patch_px: int = 112, inner_steps: int = 2,
                   split: str | None = None, cache_patches: int = 128) -> dict[str, Any]:
    """Measure, print progress, write ``out/bench_core.json`` and return the report."""
    import torch

    from agl.fileio import atomic_write_json
    from agl.models import feature_cache

    if split is None:
        split = next((n for n in store.split_names if n.startswith("kfold")), None) or store.split_names[0]
    t0 = time.perf_counter()
    feature_cache(store, FINETUNE_BACKBONE, "imagenet")  # built once (or reused) before timing anything
    cache_s = time.perf_counter() - t0
    built = [json.loads(f.read_text()) for f in sorted((Path(store.cache_dir) / "features").glob("*.json"))]
    build_s = next((m.get("seconds") for m in built if m.get("backbone") == FINETUNE_BACKBONE), None)
    results: dict[str, dict[str, Any]] = {}
    # (name, mode, operation, repeats, inner optimiser); the SGD outer step shows what unrolling Adam adds
    plan = [("features_plain", "features", "plain", repeats, "adam"),
            ("features_outer", "features", "outer", repeats, "adam"),
            ("features_outer_sgd", "features", "outer", repeats, "sgd"),
            ("features_epoch", "features", "epoch", repeats, "adam"),
            ("finetune_plain", "finetune", "plain", repeats, "adam"),
            ("finetune_outer", "finetune", "outer", max(1, repeats - 1), "adam"),
            ("finetune_epoch", "finetune", "epoch", 1, "adam")]
    for i, (name, mode, op, n, inner) in enumerate(plan, 1):
        log.info("bench core %d/%d: %s (%d repeats)", i, len(plan), name, n)
        results[name] = _fresh(str(store.path), split, mode, op, n, patch_px, inner_steps, inner)
        log.info("  -> %.3f s median, peak RSS +%.0f MB", results[name]["seconds_median"],
                 results[name]["peak_rss_growth_mb"])
    report: dict[str, Any] = {
        "store": str(store.path), "split": split, "inner_steps_H": inner_steps,
        "memory_method": "growth of resource.getrusage(RUSAGE_SELF).ru_maxrss during the operation, in a fresh process",
        "threads": 1, "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "feature_cache_load_s": cache_s,
        "feature_cache_build_s": build_s,  # the one-off cost of computing the 8-view cache (its sidecar JSON) "finetune_backbone": FINETUNE_BACKBONE, "finetune_patch_px": patch_px,
    }
    for mode in ("features", "finetune"):
        plain, outer = results[f"{mode}_plain"], results[f"{mode}_outer"]
        report[mode] = {
            "outer_vs_plain": outer["seconds_median"] / (inner_steps * plain["seconds_median"]),
            "outer_step_s": outer["seconds_median"], "plain_step_s": plain["seconds_median"],
            "outer_peak_rss_growth_mb": outer["peak_rss_growth_mb"], "plain_peak_rss_growth_mb": plain["peak_rss_growth_mb"],
            "outer_vs_plain_memory": outer["peak_rss_growth_mb"] / max(plain["peak_rss_growth_mb"], 1.0),
            "epoch_s": results[f"{mode}_epoch"]["seconds_median"], "batch": plain["batch"],
            "n_outputs": plain["n_outputs"], "input_shape": plain["input_shape"], "n_train": plain["n_train"],
        }
    report["features"]["outer_sgd_vs_plain"] = results["features_outer_sgd"]["seconds_median"] / (
        inner_steps * results["features_plain"]["seconds_median"])
    report["feature_cache_speedup_per_epoch"] = report["finetune"]["epoch_s"] / report["features"]["epoch_s"]
    report["raw"] = results
    if cache_patches:
        report["feature_cache_vs_plain_loop"] = bench_feature_cache(store, cache_patches, repeats=repeats)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench_core.json", report)
    for mode in ("features", "finetune"):
        r = report[mode]
        print(f"{mode:9s} outer step (inner Adam) / {inner_steps} plain steps: {r['outer_vs_plain']:.2f}x  "
              f"({r['outer_step_s']:.3f} s vs {r['plain_step_s']:.3f} s per plain step; "
              f"peak RSS +{r['outer_peak_rss_growth_mb']:.0f} MB vs +{r['plain_peak_rss_growth_mb']:.0f} MB)")
    print(f"features  outer step (inner SGD) / {inner_steps} plain steps: {report['features']['outer_sgd_vs_plain']:.2f}x")
    print(f"feature cache speed-up per epoch: {report['feature_cache_speedup_per_epoch']:.1f}x "
          f"({report['finetune']['epoch_s']:.1f} s fine-tuning vs {report['features']['epoch_s']:.2f} s on features)")
    print(f"written: {out / 'bench_core.json'}")
    return report


# --------------------------------------------------------------------------- feature cache vs a plain loop
def bench_feature_cache(store: Any, n_patches: int = 128, views: int = 2, repeats: int = 3, batch_size: int = 64,
                        backbone: str = FINETUNE_BACKBONE, threads: int = 2) -> dict[str, Any]:
    """Images/s of the feature cache's own computation (``agl.models.features.compute_cache_file``: uint8 ->
    normalised float, dihedral views, channels-last encoder, written to a memory-mapped ``.npy`` then
    renamed) against a plain ``torch.inference_mode()`` channels-last loop over the same patches and
    views with the same encoder, in this process, alternating order, medians of ``repeats``.
    The issue's target: the cache within 10% of the plain loop (ratio >= 0.9)."""
    import tempfile

    import numpy as np
    import torch

    from agl.data.augment import dihedral
    from agl.models.features import cache_target, compute_cache_file
    from agl.normalisation import IMAGENET_MEAN, IMAGENET_STD

    torch.set_num_threads(threads)
    patches = np.array(store.patches[:n_patches])  # in memory (a writable copy), so neither side reads the disk
    module, key, fields, _, (_, _, dim) = cache_target(store, backbone, "imagenet", views, "float32")
    module = module.eval().to(memory_format=torch.channels_last)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def cache(folder: Path) -> None:
        compute_cache_file(module, patches, folder, key, fields, (views, len(patches), dim), "float32", batch_size, "cpu")

    def plain_loop() -> None:
        out = torch.empty(views, len(patches), dim)
        with torch.inference_mode():
            for start in range(0, len(patches), batch_size):
                x = torch.from_numpy(patches[start:start + batch_size]).permute(0, 3, 1, 2).float().div_(255.0)
                x = x.sub_(mean).div_(std)
                for v in range(views):
                    out[v, start:start + x.shape[0]] = module(dihedral(x, v).contiguous(memory_format=torch.channels_last))

    times: dict[str, list[float]] = {"feature_cache": [], "plain_inference_mode": []}
    with tempfile.TemporaryDirectory(prefix="agl-bench-cache-") as tmp:
        plain_loop()  # warm-up (oneDNN primitives, allocator)
        for r in range(repeats):
            for name in (("feature_cache", "plain_inference_mode") if r % 2 == 0 else
                         ("plain_inference_mode", "feature_cache")):
                folder = Path(tmp) / f"{name}-{r}"
                folder.mkdir()
                t0 = time.perf_counter()
                cache(folder) if name == "feature_cache" else plain_loop()
                times[name].append(time.perf_counter() - t0)
    images = views * len(patches)
    rates = {name: images / statistics.median(ts) for name, ts in times.items()}
    result = {"images": images, "patches": len(patches), "views": views, "batch": batch_size, "threads": threads,
              "backbone": backbone, "patch_shape": list(patches.shape[1:]), "repeats": repeats,
              "seconds_all": times, "images_per_s": rates,
              "cache_vs_plain_loop": rates["feature_cache"] / rates["plain_inference_mode"],
              "target": "feature cache >= 0.9x the plain loop"}
    print(f"feature cache {rates['feature_cache']:.1f} images/s vs plain inference_mode channels-last loop "
          f"{rates['plain_inference_mode']:.1f} images/s: {result['cache_vs_plain_loop']:.2f}x "
          f"({images} images = {len(patches)} patches x {views} views, {threads} threads, medians of {repeats})")
    return result


# --------------------------------------------------------------------------- hypergradient estimators vs H
def _estimators() -> list[str]:
    """Every registered estimator (the first-order approximation among them)."""
    from agl.training.bilevel import ESTIMATORS

    return ESTIMATORS.names()


def _hyper_step(s: dict[str, Any], method: str, horizon: int) -> None:
    """One outer step (hypergradient through ``horizon`` inner steps, then the gate update) with ``method``."""
    from agl.training.bilevel import hypergradient

    tr, cfg = s["tr"], s["cfg"]
    tr.model.train()
    tr.outer_opt.zero_grad(set_to_none=True)
    hypergradient(tr.model, tr.gate, tr.loss_fn, s["train"], s["val"], tr.n_primary, inner_steps=horizon,
                  inner_lr=cfg.lr, inner_optimizer=cfg.inner_optimizer, optimizer=tr.opt, method=method)
    tr.outer_opt.step()
    tr.gate.project_()


class _PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms by a thread (psutil).

    ``ru_maxrss`` is a process-lifetime peak and would hide an operation that peaks below an
    earlier one (the warm-up step); sampling sees each operation's own peak.
    """

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = self.base = 0

    def __enter__(self) -> "_PeakRSS":
        import threading

        self.base = self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _memory_of(store_path: str, split: str, mode: str, method: str, horizon: int, patch_px: int,
               backbone: str, batch: int, threads: int) -> dict[str, Any]:
    """In a fresh process: peak RSS growth of one plain step (``method == "plain"``) or one outer step."""
    s = _setup(store_path, split, mode, patch_px, horizon, "adam", backbone, batch, threads)
    _plain_step(s)  # Adam state exists (the inner Adam starts warm from it), allocator warmed up
    with _PeakRSS() as peak:
        t0 = time.perf_counter()
        _plain_step(s) if method == "plain" else _hyper_step(s, method, horizon)
        seconds = time.perf_counter() - t0
    return {"peak_growth_mb": peak.growth_mb, "seconds": seconds}


# glibc keeps freed heap memory and fragments it, so RSS overstates live tensors by a varying amount
# (+-150 MB between fresh processes at batch 64, 224 px). With every allocation of 64 KiB or more its
# own mapping, returned on free, RSS tracks the live tensors (the CPU analogue of CUDA's allocated peak).
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _fresh_memory(*args: Any, live: bool = False) -> dict[str, Any]:
    """``_memory_of`` in a new process; ``live``: under ``LIVE_MEMORY_ENV``."""
    return run_fresh(_memory_of, *args, env=LIVE_MEMORY_ENV if live else None)


def run_fresh(fn: Any, *args: Any, env: dict[str, str] | None = None) -> Any:
    """``fn(*args)`` in a new (spawned) process, with ``env`` added to its environment only (the C
    library reads its settings at process start, so they must be in place before the spawn)."""
    import os

    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
            return pool.submit(fn, *args).result()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench_hypergradients(store_path: str, split: str, mode: str, horizons: list[int], repeats: int = 3,
                         patch_px: int = 224, backbone: str = FINETUNE_BACKBONE, batch: int | None = None,
                         threads: int = 1, methods: list[str] | None = None,
                         skip: dict[str, int] | None = None,
                         memory_horizons: list[int] | None = None,
                         repeats_at: dict[int, int] | None = None, live_memory: bool = False) -> dict[str, Any]:
    """Time of the plain step and of each estimator's outer step for each ``H``, in this process.

    Per ``H`` and repeat, the plain step and every estimator run once, in an order rotated
    (and reversed on odd repeats) from one repeat to the next, so drift of a shared machine
    does not favour one of them; medians over repeats. Then the peak memory of each, one fresh
    process per measurement (only at ``memory_horizons`` if given: each costs a process start and
    a model set-up). ``skip[method] = H0`` leaves out ``method`` for ``H >= H0`` (the
    reverse unroll at large ``H`` does not fit in memory); its row is then a projection from a
    straight-line fit of its measured time and memory against ``H`` (``projected: True``).
    ``repeats_at[H]`` overrides ``repeats`` at that ``H``; 0 means no in-process timing: the one
    call timed in the fresh memory process is the figure (for calls of minutes each). ``live_memory``:
    the memory processes run under ``LIVE_MEMORY_ENV``, so their RSS follows the live tensors.
    """
    import os

    methods = methods or _estimators()
    skip = skip or {}
    load_start = os.getloadavg()  # a shared machine: the load goes into the report with the figures
    batch = batch or (FEATURE_BATCH if mode == "features" else FINETUNE_BATCH)
    s = _setup(store_path, split, mode, patch_px, max(horizons), "adam", backbone, batch, threads)
    _plain_step(s)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for horizon in horizons:
        todo = ["plain", *[m for m in methods if horizon < skip.get(m, 10**9)]]
        times: dict[str, list[float]] = {name: [] for name in todo}
        n_repeats = (repeats_at or {}).get(horizon, repeats)
        for r in range(n_repeats):
            order = todo[r % len(todo):] + todo[:r % len(todo)]
            for name in (order if r % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                _plain_step(s) if name == "plain" else _hyper_step(s, name, horizon)
                times[name].append(time.perf_counter() - t0)
            log.info("bench hypergrad %s H=%d repeat %d/%d done (%.0f s elapsed)", mode, horizon, r + 1, n_repeats,
                     time.perf_counter() - started)
        for name in todo:
            rows.append({"mode": mode, "H": horizon, "method": name, "repeats": n_repeats, "seconds_all": times[name],
                         "seconds_median": statistics.median(times[name]) if times[name] else None})
    for row in rows:  # peak memory, each in a fresh process
        if row["repeats"] and memory_horizons is not None and row["H"] not in memory_horizons:
            row["peak_rss_growth_mb"] = None
            continue
        mem = _fresh_memory(store_path, split, mode, row["method"], row["H"], patch_px, backbone, batch, threads,
                            live=live_memory)
        row["peak_rss_growth_mb"] = mem["peak_growth_mb"]
        row["seconds_fresh_process"] = mem["seconds"]
        if not row["repeats"]:  # no in-process timing at this H: the fresh process's one call is the figure
            row["seconds_median"], row["seconds_all"] = mem["seconds"], [mem["seconds"]]
        log.info("bench hypergrad %s H=%d %s: %.2f s median, peak RSS +%.0f MB", mode, row["H"], row["method"],
                 row["seconds_median"], row["peak_rss_growth_mb"])
    for method, h0 in skip.items():
        rows.extend(_projected(rows, mode, method, [h for h in horizons if h >= h0]))
    for row in rows:
        plain = next(r for r in rows if r["H"] == row["H"] and r["method"] == "plain")
        row["vs_H_plain"] = row["seconds_median"] / (row["H"] * plain["seconds_median"])
        measured = row["peak_rss_growth_mb"] is not None and plain["peak_rss_growth_mb"] is not None
        row["vs_plain_memory"] = row["peak_rss_growth_mb"] / max(plain["peak_rss_growth_mb"], 1.0) if measured else None
    return {"mode": mode, "horizons": horizons, "repeats": repeats, "batch": batch, "threads": threads,
            "backbone": backbone if mode == "finetune" else None, "patch_px": patch_px if mode == "finetune" else None,
            "input_shape": list(s["train"][0].shape[1:]), "n_outputs": int(s["tr"].n_out),
            "skipped": {m: f"H >= {h}" for m, h in skip.items()},
            "memory_allocator": f"glibc with {LIVE_MEMORY_ENV} (RSS follows live tensors)" if live_memory
            else "the C library's defaults (RSS as a user sees it, freed heap included)",
            "load_average_1_5_15min": {"start": list(load_start), "end": list(os.getloadavg())}, "rows": rows}


def _projected(rows: list[dict[str, Any]], mode: str, method: str, horizons: list[int]) -> list[dict[str, Any]]:
    """Rows for a skipped ``method`` at ``horizons``: least-squares lines of its measured time and memory vs H."""
    import numpy as np

    measured = [r for r in rows if r["method"] == method and r["seconds_median"] is not None]
    if len(measured) < 2:
        return []
    hs = np.array([r["H"] for r in measured], dtype=float)
    seconds = np.polyfit(hs, [r["seconds_median"] for r in measured], 1)
    with_mb = [r for r in measured if r["peak_rss_growth_mb"] is not None]
    mb = np.polyfit([r["H"] for r in with_mb], [r["peak_rss_growth_mb"] for r in with_mb], 1) if len(with_mb) >= 2 else None
    return [{"mode": mode, "H": h, "method": method, "repeats": 0, "seconds_all": [], "projected": True,
             "seconds_median": float(np.polyval(seconds, h)),
             "peak_rss_growth_mb": float(np.polyval(mb, h)) if mb is not None else None,
             "projection": f"not run; straight line through the measured H = {', '.join(str(int(x)) for x in hs)}"}
            for h in horizons]


def plot_hypergradients(sections: list[dict[str, Any]], path: Path) -> None:
    """Time (x H plain steps) and peak memory against H, one column per mode, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(sections), figsize=(5.5 * len(sections), 7), squeeze=False)
    for col, section in enumerate(sections):
        methods = list(dict.fromkeys(r["method"] for r in section["rows"]))
        for i, method in enumerate(methods):
            style = {"marker": "o", "label": method, "color": f"C{i}"}  # one colour per method in both panels
            rows = sorted((r for r in section["rows"] if r["method"] == method), key=lambda r: r["H"])
            hs = [r["H"] for r in rows]
            if method != "plain":
                axes[0, col].plot(hs, [r["vs_H_plain"] for r in rows], **style)
            measured = [r for r in rows if r["peak_rss_growth_mb"] is not None]
            axes[1, col].plot([r["H"] for r in measured], [r["peak_rss_growth_mb"] / 1024 for r in measured],
                              **style)
            for r in rows:  # projected (not run) points: open markers
                if r.get("projected"):
                    axes[0, col].plot([r["H"]], [r["vs_H_plain"]], marker="o", mfc="none", color=style["color"])
                    if r["peak_rss_growth_mb"] is not None:
                        axes[1, col].plot([r["H"]], [r["peak_rss_growth_mb"] / 1024], marker="o", mfc="none",
                                          color=style["color"])
        model = f"{section['backbone']} {section['patch_px']} px, " if section["backbone"] else ""
        title = f"{section['mode']} ({model}batch {section['batch']}, {section['n_outputs']} outputs)"
        axes[0, col].set_title(title, fontsize=9)
        axes[0, col].set_ylabel("outer step / (H x plain step)")
        live = str(section.get("memory_allocator", "")).startswith("glibc with")
        axes[1, col].set_ylabel("peak RSS growth (GiB)" + (", live tensors (--live-memory)" if live else ""))
        for ax in axes[:, col]:
            ax.set_xlabel("H (unrolled inner steps)")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def print_hypergradients(section: dict[str, Any]) -> None:
    print(f"{section['mode']}: outer step / (H x plain), peak RSS growth (MB)")
    for row in section["rows"]:
        memory = ("not measured" if row["peak_rss_growth_mb"] is None
                  else f"+{row['peak_rss_growth_mb']:.0f} MB ({row['vs_plain_memory']:.2f}x plain)")
        how = " (projected, not run)" if row.get("projected") else f" ({row.get('repeats', 1) or 'fresh-process'} x)"
        print(f"  H={row['H']:<3d} {row['method']:13s} {row['seconds_median']:8.3f} s  {row['vs_H_plain']:6.2f}x  "
              f"{memory}{how}")


def run_bench_hypergrad(store: Any, out: Path, horizons: list[int], finetune_horizons: list[int], repeats: int = 3,
                        finetune_repeats: int = 1, finetune_backbone: str = "torchvision/resnet18",
                        finetune_batch: int = 64, patch_px: int = 224, threads: int = 2,
                        skip: dict[str, int] | None = None, split: str | None = None,
                        memory_horizons: list[int] | None = None, finetune_repeats_at: dict[int, int] | None = None,
                        finetune_methods: list[str] | None = None, feature_methods: list[str] | None = None,
                        features: bool = True, cache_patches: int = 128,
                        repeats_at: dict[int, int] | None = None, live_memory: bool = False) -> dict[str, Any]:
    """Estimators vs H in features and fine-tune mode; adds ``hypergrad`` to ``out/bench_core.json``
    (other keys of an existing file are kept) and writes ``out/bench_core_hypergrad.png``."""
    import torch

    from agl.fileio import atomic_write_json

    if split is None:
        split = next((n for n in store.split_names if n.startswith("kfold")), None) or store.split_names[0]
    sections = []
    if horizons:
        sections.append(bench_hypergradients(str(store.path), split, "features", horizons, repeats, threads=threads,
                                             memory_horizons=memory_horizons, methods=feature_methods, skip=skip,
                                             repeats_at=repeats_at, live_memory=live_memory))
        print_hypergradients(sections[-1])
    if finetune_horizons:
        sections.append(bench_hypergradients(str(store.path), split, "finetune", finetune_horizons, finetune_repeats,
                                             patch_px, finetune_backbone, finetune_batch, threads, skip=skip,
                                             memory_horizons=memory_horizons, methods=finetune_methods,
                                             repeats_at=finetune_repeats_at, live_memory=live_memory))
        print_hypergradients(sections[-1])
    path = out / "bench_core.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    kept = [x for x in report.get("hypergrad", {}).get("sections", []) if x["mode"] not in {y["mode"] for y in sections}]
    sections = kept + sections  # a run of one mode keeps the other mode's section
    if cache_patches:
        report["feature_cache_vs_plain_loop"] = bench_feature_cache(store, cache_patches, threads=threads)
    report["hypergrad"] = {"sections": sections, "torch": torch.__version__, "machine": platform.machine(),
                           "memory_method": "peak of psutil RSS sampled every 2 ms during the one step, above the "
                                            "RSS before it, in a fresh process after one warm-up plain step",
                           "timing": "one process per mode, order rotated per repeat, medians"}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report)
    plot_hypergradients(sections, out / "bench_core_hypergrad.png")
    print(f"written: {path}, {out / 'bench_core_hypergrad.png'}")
    return report["hypergrad"]
