"""``agl bench ray``: trials per hour of a frozen-feature sweep, and Ray Train throughput with 1 vs 2 workers.

``agl bench load``: a sweep with many more trials than cores, its memory sampled over time.
"""
from __future__ import annotations

import json
import logging
import math
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

    from agl.data.locate import resolve_store
    from agl.distributed.runtime import init_ray
    from agl.distributed.train import run_train
    from agl.distributed.tune import SweepOptions, run_sweep
    from agl.training.loop import TrainConfig

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


# --------------------------------------------------------------------------- agl bench load
BENCH_LOAD_JSON = "bench_load.json"
BENCH_LOAD_PNG = "bench_load.png"
LOAD_SWEEP_NAME = "agl-bench-load"
BOUNDED_FRACTION = 0.01  # bounded: memory grows per finished trial by < 1% of the peak
PROGRESS_EVERY_S = 30.0
MAX_SERIES_ROWS = 400   # rows of the time series kept in the JSON
PSS_COST_WINDOW = 5     # PSS/USS are dropped when reading them takes > half the interval over this many samples


def _load_space_file(space: str, epochs: int, trials: int, path: Path) -> Path:
    """The space file as written, with frozen features, a fixed epoch count (no early stop), FIFO and
    ``trials`` samples; written to ``path`` (the YAML is patched, so every key of the space is kept)."""
    import yaml

    from agl.checks import load_yaml
    from agl.distributed.spaces import load_space, resolve_space_path

    load_space(space)  # a bad name or file fails here, naming it
    raw = load_yaml(resolve_space_path(space).read_text())
    raw["fixed"] = {**(raw.get("fixed") or {}), "mode": "features", "epochs": epochs, "patience": epochs}
    raw.update(num_samples=trials, scheduler={"name": "fifo"})
    if raw.get("start_with"):
        raw["start_with"] = raw["start_with"][:trials]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_space(path)  # the patched space is valid before Ray starts
    return path


class _MemorySampler:
    """A daemon thread that samples, every ``interval_s``, the memory of the driver and of Ray's
    processes: the driver's descendants (a local ``ray.init`` starts GCS and the raylet, which
    start the workers) plus any process whose command line names this Ray session's folder.

    RSS counts shared pages (libraries, the object store) once per process, so the total
    over-counts; PSS splits shared pages between their users and sums to real use. PSS/USS come
    from ``/proc/PID/smaps_rollup`` through psutil and are dropped (from the whole series) if
    reading them takes more than half the interval over ``PSS_COST_WINDOW`` samples.
    """

    def __init__(self, interval_s: float, finished: Any, session_dir: str | None, total: int):
        import threading

        import psutil

        self.interval_s = max(0.05, float(interval_s))
        self.finished = finished                  # () -> trials finished so far
        self.session_dir = session_dir
        self.total = total
        self.samples: list[dict[str, Any]] = []
        self.pss = True
        self._costs: list[float] = []             # seconds per sample of the last samples (with PSS)
        self.errors = 0
        self.session_only = 0                     # most processes found by the session folder alone
        self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="agl-bench-load-memory", daemon=True)
        self._t0 = time.perf_counter()
        self._last_progress = self._t0

    def start(self) -> "_MemorySampler":
        self._t0 = self._last_progress = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.sample()  # one last point after the sweep returned

    def _processes(self) -> list[Any]:
        import psutil

        procs = {self._me.pid: self._me}
        try:
            for child in self._me.children(recursive=True):
                procs.setdefault(child.pid, child)
        except psutil.Error:
            pass
        if self.session_dir:  # read-only look-up: Ray processes of this session that are not descendants
            extra = 0
            for proc in psutil.process_iter(["cmdline"]):
                if proc.pid not in procs and any(self.session_dir in part for part in (proc.info["cmdline"] or ())):
                    procs[proc.pid] = proc
                    extra += 1
            self.session_only = max(self.session_only, extra)
        return list(procs.values())

    def sample(self) -> dict[str, Any]:
        import psutil

        started = time.perf_counter()
        mb = 1024 ** 2
        driver = rss = pss = uss = 0
        count = 0
        for proc in self._processes():
            try:
                if self.pss:
                    info = proc.memory_full_info()
                    pss += getattr(info, "pss", 0)
                    uss += info.uss
                else:
                    info = proc.memory_info()
            except psutil.AccessDenied:
                try:
                    info = proc.memory_info()
                except psutil.Error:
                    continue
            except psutil.Error:  # ended between listing and reading
                continue
            count += 1
            rss += info.rss
            if proc.pid == self._me.pid:
                driver = info.rss
        try:
            done = int(self.finished())
        except OSError:
            done = self.samples[-1]["trials_finished"] if self.samples else 0
        cost = time.perf_counter() - started
        row = {"t_s": round(started - self._t0, 2), "driver_rss_mb": round(driver / mb, 1),
               "total_rss_mb": round(rss / mb, 1), "processes": count, "trials_finished": done}
        if self.pss:
            row.update(total_pss_mb=round(pss / mb, 1), total_uss_mb=round(uss / mb, 1))
            self._costs = (self._costs + [cost])[-PSS_COST_WINDOW:]
            if len(self._costs) == PSS_COST_WINDOW and sum(self._costs) / PSS_COST_WINDOW > 0.5 * self.interval_s:
                self._drop_pss()
        self.samples.append(row)
        return row

    def _drop_pss(self) -> None:
        """Not cheap here: sample RSS only from now on, and drop the PSS/USS already sampled so the
        series and the figures never mix a partial PSS record with a full RSS one."""
        self.pss = False
        for row in self.samples:
            row.pop("total_pss_mb", None)
            row.pop("total_uss_mb", None)
        log.info("bench load: reading PSS/USS took %.2f s per sample; sampling RSS only",
                 sum(self._costs) / len(self._costs))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                row = self.sample()
            except Exception as err:  # a sampler fault must not kill the sweep; count it
                self.errors += 1
                log.debug("bench load: memory sample failed: %s", err)
                continue
            now = time.perf_counter()
            if now - self._last_progress >= PROGRESS_EVERY_S:
                self._last_progress = now
                self._progress(row, now - self._t0)

    def _progress(self, row: dict[str, Any], elapsed: float) -> None:
        done = row["trials_finished"]
        rate = done / max(elapsed, 1e-9) * 3600
        eta = (self.total - done) / (done / elapsed) if done else float("nan")
        log.info("bench load: %d/%d trials finished, %.0f s elapsed, %.0f trials/h, ETA %s, total RSS %.0f MB "
                 "(driver %.0f MB, %d processes)", done, self.total, elapsed, rate,
                 f"{eta:.0f} s" if done else "?", row["total_rss_mb"], row["driver_rss_mb"], row["processes"])


def _finished_trials(exp: Path) -> int:
    """Trials whose final checkpoint (the only one carrying result.json) is in the experiment folder."""
    return len({p.parent.parent for p in exp.glob("agl_trial_*/checkpoint_*/result.json")})


def _thin(samples: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most about ``limit`` samples, evenly spaced, always with the first, the last and the peaks."""
    if len(samples) <= limit:
        return list(samples)
    step = len(samples) / limit
    keep = {int(i * step) for i in range(limit)} | {0, len(samples) - 1}
    for key in ("total_rss_mb", "driver_rss_mb"):
        keep.add(max(range(len(samples)), key=lambda i: samples[i][key]))
    return [samples[i] for i in sorted(keep)]


def _slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys on xs (None with fewer than two distinct xs)."""
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _at_fraction(samples: list[dict[str, Any]], trials: int, fraction: float, key: str) -> float | None:
    """``key`` of the first sample at which at least ``fraction`` of the trials had finished."""
    need = max(1, math.ceil(fraction * trials))
    return next((s[key] for s in samples if s["trials_finished"] >= need), None)


def _retries(exp: Path) -> dict[str, Any]:
    """Failures and retries per trial from Tune's own records.

    ``Trial.num_failures`` (restored by ``tune.ExperimentAnalysis`` from the experiment state)
    counts every failure of a trial; with ``FailureConfig(max_failures=1)`` Tune restarts a
    failed trial from its checkpoint until its failures exceed max_failures, then marks it
    ERROR, so restarts = failures minus one per errored trial. ``error.txt`` files in the trial
    folders (written by Tune on every failure) are counted as a cross-check.
    """
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(exp)).trials
    failures = {t.trial_id: int(getattr(t, "num_failures", 0) or 0) for t in trials}
    errored = {t.trial_id for t in trials if t.status == "ERROR"}
    restarts = sum(n - (1 if tid in errored else 0) for tid, n in failures.items())
    errors = list(exp.glob("agl_trial_*/error.txt"))  # Tune appends "Failure # N ..." per failure
    return {"failures_total": sum(failures.values()),
            "trials_with_failures": sum(1 for n in failures.values() if n),
            "retried": sum(1 for tid, n in failures.items() if n - (1 if tid in errored else 0) > 0),
            "restarts_total": restarts,
            "error_txt_files": len(errors),
            "error_txt_failures": sum(e.read_text(errors="replace").count("Failure # ") for e in errors),
            "source": "ray.tune.ExperimentAnalysis(exp).trials[*].num_failures (Tune's experiment state); "
                      "restarts = failures - 1 per trial that ended in ERROR (FailureConfig(max_failures=1))"}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("ray", "torch", "optuna", "mlflow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    import psutil

    found["psutil"] = psutil.__version__
    return found


def bench_load(store: str | None = "demo", out: str | Path = "results", trials: int = 64, epochs: int = 2,
               num_cpus: int = 2, space: str = "tiny", interval_s: float = 1.0,
               keep_sweep: bool = False) -> dict[str, Any]:
    """A sweep with many more trials than cores, under a memory sampler.

    One real sweep through :func:`run_sweep` (function trainer, frozen MobileNetV2 features,
    FIFO, ``trials`` samples, ``epochs`` epochs each with no early stop) into a temporary folder
    under ``out`` (its Ray results and MLflow DB included), removed afterwards unless
    ``keep_sweep``. Writes ``OUT/bench_load.json`` and ``OUT/bench_load.png`` (atomically) and
    returns the report.
    """
    import shutil

    import psutil
    import ray

    from agl.data.locate import resolve_store
    from agl.distributed.runtime import init_ray
    from agl.distributed.spaces import load_space
    from agl.distributed.tune import SweepOptions, warm_caches, run_sweep
    from agl.errors import ConfigError

    for name, value in (("--trials", trials), ("--epochs", epochs), ("--num-cpus", num_cpus)):
        if value < 1:
            raise ConfigError(name, f"must be >= 1, got {value}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store_path = resolve_store(store)
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-tmp-", dir=out)).resolve()
    sweep_out = tmp / "sweep"
    exp = sweep_out / "ray" / LOAD_SWEEP_NAME
    try:
        space_file = _load_space_file(space, epochs, trials, tmp / "bench_load_space.yaml")
        # the feature cache is built (first run only) before the clock starts
        warm_caches(str(store_path), load_space(space_file))
        owns_ray = not ray.is_initialized()  # shut down at the end only a Ray this call started
        load_before = os.getloadavg()
        driver_before_mb = psutil.Process().memory_info().rss / 1024 ** 2
        try:
            resources = init_ray(None, num_cpus=num_cpus)
            node = getattr(ray._private.worker, "_global_node", None)  # read-only: this session's folder
            session_dir = node.get_session_dir_path() if node is not None else None
            sampler = _MemorySampler(interval_s, lambda: _finished_trials(exp), session_dir, trials)
            log.info("bench load: %d trials x %d epochs on %s CPUs (Ray session %s); sweep in %s",
                     trials, epochs, resources.get("CPU"), session_dir, sweep_out)
            sampler.start()
            sampler.sample()
            started = time.perf_counter()
            try:
                summary = run_sweep(SweepOptions(space=str(space_file), store=str(store_path), out=str(sweep_out),
                                                 name=LOAD_SWEEP_NAME, num_cpus=num_cpus))
            finally:
                wall = time.perf_counter() - started
                sampler.stop()
            statuses = summary.table["status"].value_counts().to_dict() if len(summary.table) else {}
            retries = _retries(exp)
        finally:
            if owns_ray and ray.is_initialized():
                ray.shutdown()
    finally:
        if keep_sweep:
            log.info("bench load: sweep kept in %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    samples = sampler.samples
    report: dict[str, Any] = {
        "question": f"does a sweep of {trials} trials on {num_cpus} CPUs (frozen-feature cache) complete with "
                    "bounded memory?",
        "machine": {"cpus": os.cpu_count(), "ray_cpus": num_cpus,
                    "memory_total_gb": round(psutil.virtual_memory().total / 1024 ** 3, 1),
                    "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
                    "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
                    "platform": platform.platform(), **_versions()},
        "store": str(store_path),
        "sweep": {"space": space, "mode": "features", "trainer": "function", "scheduler": "fifo",
                  "trials": trials, "epochs_per_trial": epochs, "complete": summary.complete,
                  "kept_in": str(tmp) if keep_sweep else None},
        "trials": {"finished": int(statuses.get("finished", 0)), "stopped": int(statuses.get("stopped", 0)),
                   "failed": int(statuses.get("error", 0)), "in_table": int(len(summary.table)), **retries},
        "time": {"wall_s": round(wall, 2), "trials_per_hour": round(len(summary.table) / max(wall, 1e-9) * 3600, 1),
                 "note": "wall time of run_sweep (Optuna, Tune, MLflow and table included); Ray start-up and "
                         "the feature-cache build excluded"},
        "memory": _memory_verdict(samples, trials, driver_before_mb),
        "sampling": {"interval_s": interval_s, "samples": len(samples), "sampler_errors": sampler.errors,
                     "session_dir": session_dir, "max_processes_found_by_session_dir_only": sampler.session_only,
                     "processes": "the driver, its descendants (GCS, raylet, workers of the local ray.init) and "
                                  "processes whose command line names the Ray session folder",
                     "pss_uss": "sampled throughout" if sampler.pss else "not recorded (reading it was too slow)"},
        "series_note": f"every sample if at most {MAX_SERIES_ROWS}, else evenly thinned (peaks kept); the "
                       "figures above use every sample",
        "series": _thin(samples, MAX_SERIES_ROWS),
    }
    path = out / BENCH_LOAD_JSON
    png = _plot_load(report, out / BENCH_LOAD_PNG)
    atomic_write_json(path, report, indent=1)
    report["written"] = [str(path), str(png)]
    mem = report["memory"]
    log.info("bench load: %d finished, %d failed, %d retried in %.0f s (%.0f trials/h); peak total RSS %.0f MB, "
             "growth %s MB/trial: %s", report["trials"]["finished"], report["trials"]["failed"],
             report["trials"]["retried"], wall, report["time"]["trials_per_hour"], mem["peak_total_rss_mb"],
             mem["growth_mb_per_trial"], "bounded" if mem["bounded"] else "NOT bounded")
    return report


def _memory_verdict(samples: list[dict[str, Any]], trials: int, driver_before_mb: float) -> dict[str, Any]:
    """Peaks, memory at 25% and 100% of trials finished, growth per trial over the second half, verdict."""
    peak = max((s["total_rss_mb"] for s in samples), default=0.0)
    half = [s for s in samples if s["trials_finished"] >= max(1, math.ceil(trials / 2))]
    running = [s for s in half if s["trials_finished"] < trials]
    if len({s["trials_finished"] for s in running}) >= 2:
        half = running  # the tear-down after the last trial (workers exiting) would bias the slope down
    growth = _slope([s["trials_finished"] for s in half], [s["total_rss_mb"] for s in half])
    growth_pss = _slope([s["trials_finished"] for s in half if "total_pss_mb" in s],
                        [s["total_pss_mb"] for s in half if "total_pss_mb" in s])
    growth_driver = _slope([s["trials_finished"] for s in half], [s["driver_rss_mb"] for s in half])
    limit = BOUNDED_FRACTION * peak
    first = [s for s in samples if s["trials_finished"] < math.ceil(trials / 2)]
    second = [s for s in samples if s["trials_finished"] >= math.ceil(trials / 2)]

    def _peak(rows: list[dict[str, Any]], key: str) -> float | None:
        return max((r[key] for r in rows if key in r), default=None)
    at = {f"{name}_at_{int(f * 100)}pct_mb": _at_fraction(samples, trials, f, key)
          for f in (0.25, 0.5, 1.0) for name, key in (("total_rss", "total_rss_mb"), ("driver_rss", "driver_rss_mb"))}
    return {
        "peak_total_rss_mb": peak,
        "peak_driver_rss_mb": max((s["driver_rss_mb"] for s in samples), default=0.0),
        "peak_total_pss_mb": _peak(samples, "total_pss_mb"),
        "peak_total_uss_mb": _peak(samples, "total_uss_mb"),
        "peak_processes": max((s["processes"] for s in samples), default=0),
        "driver_rss_before_ray_mb": round(driver_before_mb, 1),
        **at,
        "peak_total_rss_first_half_mb": _peak(first, "total_rss_mb"),
        "peak_total_rss_second_half_mb": _peak(second, "total_rss_mb"),
        "peak_total_pss_first_half_mb": _peak(first, "total_pss_mb"),
        "peak_total_pss_second_half_mb": _peak(second, "total_pss_mb"),
        "halves": "first half: samples with fewer than half of the trials finished; second half: the rest. Single "
                  "samples (at 25/50/100%) follow the saw-tooth of the trials (each trial's worker grows, then "
                  "exits); the half peaks compare like with like",
        "growth_mb_per_trial": None if growth is None else round(growth, 3),
        "growth_pss_mb_per_trial": None if growth_pss is None else round(growth_pss, 3),
        "growth_driver_mb_per_trial": None if growth_driver is None else round(growth_driver, 3),
        "growth_over_second_half_mb": None if growth is None else round(growth * (trials - math.ceil(trials / 2)), 1),
        "bounded_limit_mb_per_trial": round(limit, 3),
        "bounded": None if growth is None else bool(growth < limit),
        "bounded_rule": "growth_mb_per_trial = least-squares slope of total RSS (MB, sum over sampled processes) on "
                        "trials finished, over the samples with at least half but not all of the trials finished "
                        "(all of them only if that leaves fewer than two distinct counts); bounded = "
                        f"growth_mb_per_trial < {BOUNDED_FRACTION:g} x peak_total_rss_mb (null: fewer than two "
                        "distinct finished counts in the second half)",
    }


def _plot_load(report: dict[str, Any], path: Path) -> Path:
    """Memory over time (total RSS/PSS, driver RSS) with trials finished on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agl.fileio import atomic_savefig

    s = report["series"]
    t = [r["t_s"] / 60 for r in s]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    ax.plot(t, [r["total_rss_mb"] for r in s], color="tab:blue", label="total RSS (driver + Ray processes)")
    pss = [(r["t_s"] / 60, r["total_pss_mb"]) for r in s if "total_pss_mb" in r]
    if pss:
        ax.plot(*zip(*pss), color="tab:cyan", label="total PSS")
    ax.plot(t, [r["driver_rss_mb"] for r in s], color="tab:orange", label="driver RSS")
    ax.set_xlabel("minutes since the sweep started")
    ax.set_ylabel("memory (MB)")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.step(t, [r["trials_finished"] for r in s], where="post", color="tab:green", label="trials finished")
    ax2.set_ylabel("trials finished")
    ax2.set_ylim(0, report["sweep"]["trials"] * 1.05 + 0.5)
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower right")
    mem, tr = report["memory"], report["trials"]
    verdict = {True: "bounded", False: "NOT bounded", None: "undetermined"}[mem["bounded"]]
    ax.set_title(f"{report['sweep']['trials']} trials on {report['machine']['ray_cpus']} CPUs: {tr['finished']} "
                 f"finished, {tr['failed']} failed, {tr['retried']} retried; growth {mem['growth_mb_per_trial']} "
                 f"MB/trial ({verdict})", fontsize=8)
    fig.tight_layout()
    try:
        atomic_savefig(fig, path, format="png")
    finally:
        plt.close(fig)
    return path
