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
           inner_optimizer: str = "adam") -> dict[str, Any]:
    """Model, gate, optimisers and one training + one validation batch of the real store."""
    import torch
    import torch.nn.functional as F

    from agl.training.bundles import make_bundle
    from agl.data.store import open_store
    from agl.training.loop import TrainConfig, _Trainer

    torch.set_num_threads(1)
    cfg = TrainConfig(method="dkgsb", mode=mode, backbone=FINETUNE_BACKBONE, device="cpu", seed=0,
                      inner_steps=inner_steps, inner_optimizer=inner_optimizer,
                      weights="imagenet" if mode == "features" else None)
    data = make_bundle(open_store(store_path), split, cfg)
    tr = _Trainer(cfg, data)
    batch = FEATURE_BATCH if mode == "features" else FINETUNE_BATCH

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
    hypergradient(tr.model, tr.gate, tr.loss_fn, (xt, yt), (xv, yv), tr.n_primary,
                  cfg.inner_steps, cfg.lr, cfg.inner_optimizer, cfg.first_order, optimizer=tr.opt)
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
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
        return pool.submit(_measure, *args).result()


def run_bench_core(store: Any, out: Path, repeats: int = 3, patch_px: int = 112, inner_steps: int = 2,
                   split: str | None = None) -> dict[str, Any]:
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
