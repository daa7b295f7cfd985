"""``agl bench ray``: trials per hour of a frozen-feature sweep, and Ray Train throughput with 1 vs 2 workers."""
from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from agl.fileio import atomic_write_json

log = logging.getLogger(__name__)

BENCH_JSON = "bench_ray.json"


def _bench_space(epochs: int, trials: int) -> dict[str, Any]:
    """The tiny profile with a fixed epoch count (no early stop), so every trial does the same work."""
    from agl.distributed.spaces import load_space

    space = load_space("tiny")
    return {**space.__dict__, "fixed": {**space.fixed, "epochs": epochs, "patience": epochs},
            "num_samples": trials, "scheduler": {"name": "fifo"}}


def bench_ray(store: str | None = "demo", out: str | Path = "results", trials: int = 4, epochs: int = 4,
              num_cpus: int = 2, split: str = "kfold-s0-f0") -> dict[str, Any]:
    """Run both measurements on a local Ray; write ``OUT/bench_ray.json`` (atomically) and return it."""
    import ray
    import yaml

    from agl.distributed.runtime import init_ray, resolve_store
    from agl.distributed.train import run_train
    from agl.distributed.tune import SweepOptions, run_sweep
    from agl.train import TrainConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store_path = resolve_store(store)
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "ray_cpus": num_cpus, "python": platform.python_version(),
                                          "ray": ray.__version__}, "store": str(store_path)}
    with tempfile.TemporaryDirectory(prefix="agl-bench-ray-") as tmp:
        # 1. frozen-feature sweep: trials per hour (wall clock, Ray start-up excluded)
        space = _bench_space(epochs, trials)
        space_file = Path(tmp) / "bench.yaml"
        keep = ("split", "metric", "mode", "num_samples", "scheduler", "fixed", "resources", "seed")
        params = {k: {"type": d.type, **({"choices": list(d.choices)} if d.type == "categorical" else
                                         {"low": d.low, "high": d.high, "log": d.log})}
                  for k, d in space["params"].items()}
        space_file.write_text(yaml.safe_dump({**{k: space[k] for k in keep}, "params": params}))
        init_ray(None, num_cpus=num_cpus)
        started = time.perf_counter()
        summary = run_sweep(SweepOptions(space=str(space_file), store=str(store_path), out=str(Path(tmp) / "sweep"),
                                         num_cpus=num_cpus))
        sweep_s = time.perf_counter() - started
        done = int((summary.table["status"] == "finished").sum())
        report["sweep"] = {"trials": len(summary.table), "finished": done, "epochs_per_trial": epochs,
                           "wall_s": round(sweep_s, 2), "trials_per_hour": round(len(summary.table) / sweep_s * 3600, 1)}
        log.info("sweep: %d trials in %.1f s = %.0f trials/h", len(summary.table), sweep_s,
                 report["sweep"]["trials_per_hour"])
        # 2. Ray Train: samples/s with 1 vs 2 workers on the same data and config
        cfg = TrainConfig.from_dict({**space["fixed"], "method": "dkgsb", "k": 64})
        init_ray(None, num_cpus=num_cpus)
        report["train"] = {}
        for workers in (1, 2):
            result = run_train(cfg, store_path, split, {"num_workers": workers}, str(Path(tmp) / "train"),
                               failure_max=0, name=f"bench-{workers}w")
            history = _history(result)
            timed = history[1:] or history  # the first epoch includes worker warm-up
            train_spots = result.metrics.get("n_train_spots") or _n_train(store_path, split)
            seconds = sum(h["epoch_time_s"] for h in timed)
            rate = train_spots * len(timed) / max(seconds, 1e-9)
            report["train"][f"{workers}_workers"] = {"epochs_timed": len(timed), "epoch_s_mean": round(seconds / len(timed), 3),
                                                     "samples_per_s": round(rate, 1)}
            log.info("Ray Train, %d worker(s): %.0f samples/s", workers, rate)
        one, two = (report["train"][f"{w}_workers"]["samples_per_s"] for w in (1, 2))
        report["train"]["speedup_2_vs_1"] = round(two / max(one, 1e-9), 2)
        ray.shutdown()
    path = out / BENCH_JSON
    atomic_write_json(path, report, indent=1)
    report["written"] = str(path)
    return report


def _history(result: Any) -> list[dict[str, float]]:
    with result.checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / "result.json").read_text())["history"]


def _n_train(store_path: Path, split: str) -> int:
    import numpy as np

    from agl.data.store import open_store

    return int((np.asarray(open_store(store_path).split(split)) == "train").sum())
