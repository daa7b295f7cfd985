"""``agl bench cohort``: training memory and speed against cohort size, before and after issue 26.

Cohorts of ``copies`` x the 5 real demo sections (about 1k spots per copy) are built by tiling
the demo store: each copy's spots keep their expression, roles (``kfold-s0-f0``/``-f1``) and
frozen MobileNetV2 features under new slide ids (``{section}-r{k}``, as
:class:`agl.bench.scale.RelabelledDemo` names them); patches are cut to 8 px (features mode
never reads them) and the feature cache is the demo's real cache tiled ``copies`` times, written
under the cohort store's own cache key, so nothing is recomputed. Expression is stored sparse.

Each measurement runs in a fresh process whose ``/proc/PID/smaps_rollup`` is sampled: peak RSS,
PSS, USS (private pages) and anonymous PSS (the process's own heap: what a trial holds beyond
the memory-mapped pages it touches, which the OS page cache shares between processes). Runs:
``train`` (make_bundle + fit of ``agl train``, features mode, method pgl, ``epochs``) and ``cv``
(2 concurrent trial processes, each fitting 2 folds as ``agl.distributed.cv.agl_cv_trial``
does, without Ray), with ``before`` = the in-memory bundle (``make_bundle(in_memory=True)``, a
bundle per fold) and ``after`` = the per-batch path (one bundle per trial, folds by
``with_roles``).

The sweep phase (``--sweep-copies``) runs ``agl tune``'s :func:`agl.distributed.tune.run_sweep` of a
cross-validated space (:data:`SWEEP_SPACE`: 2 trials at once, 2 inner kfold folds each, local Ray with 2
CPUs) on a cohort, in a fresh driver process; the driver's process tree is sampled every second: each
trial process's peaks (Ray's ``ray::ImplicitFunc`` actors), the driver's (it also refits the champion)
and the tree's summed PSS, with the wall time.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from agl.errors import ConfigError
from agl.fileio import atomic_write_json

log = logging.getLogger(__name__)

SPLITS = ("kfold-s0-f0", "kfold-s0-f1")
BACKBONE, WEIGHTS = "torchvision/mobilenet_v2", "imagenet"
PATCH_PX = 8


def build_cohort(copies: int, out: Path) -> Path:
    """A sparse store of ``copies`` x the demo store's spots, with its feature cache tiled from the demo's."""
    import pandas as pd
    import scipy.sparse as sp

    from agl.data.store import open_store, write_store
    from agl.datasets import her2st_demo_store
    from agl.models.features import cache_target, feature_cache

    if (out / "manifest.json").is_file():
        return out
    demo = open_store(her2st_demo_store())
    spots = demo.spots
    n = len(spots)
    tiles = []
    for k in range(copies):
        t = spots.copy()
        t["slide_id"] = t["slide_id"].astype(str) + f"-r{k}"
        t["spot_id"] = t["slide_id"] + "_" + t["barcode"].astype(str)
        t["row"] = t["row"] + k * n
        tiles.append(t)
    cohort = pd.concat(tiles, ignore_index=True)
    step = demo.patches.shape[1] // PATCH_PX
    small = np.ascontiguousarray(demo.patches[:, ::step, ::step][:, :PATCH_PX, :PATCH_PX])
    csr = sp.csr_matrix(np.asarray(demo.expression, dtype=np.float32))
    splits = pd.DataFrame({s: np.tile(np.asarray(demo.split(s)), copies) for s in SPLITS})
    write_store(out, spots=cohort, patches=np.tile(small, (copies, 1, 1, 1)),
                expression=sp.vstack([csr] * copies, format="csr").astype(np.float32), genes=demo.genes,
                splits=splits, gene_sets={s: demo.gene_set(s) for s in SPLITS},
                manifest={"bench": f"demo tiled x{copies}"}, expression_layout="sparse")
    store = open_store(out)
    source = feature_cache(demo, BACKBONE, WEIGHTS)
    _, key, fields, path, shape = cache_target(store, BACKBONE, WEIGHTS, source.shape[0], "float32")
    path.parent.mkdir(parents=True, exist_ok=True)
    tiled = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float32, shape=shape)
    for k in range(copies):
        tiled[:, k * n:(k + 1) * n] = source
    tiled.flush()
    del tiled
    os.replace(path.with_suffix(".tmp.npy"), path)
    (path.parent / f"{key}.json").write_text(json.dumps({**fields, "key": key, "tiled_from": str(demo.path)}))
    return out


def child(store_path: str, path: str, kind: str, epochs: int) -> dict[str, Any]:
    """One trial in this process: ``kind`` "train" (one split) or "cv" (2 folds); ``path`` "before"/"after"."""
    import torch

    from agl.data.store import open_store
    from agl.training.bundles import make_bundle
    from agl.training.loop import TrainConfig, fit

    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict({"method": "pgl", "mode": "features", "epochs": epochs, "patience": epochs,
                                 "batch_size": 256, "device": "cpu", "backbone": BACKBONE, "weights": WEIGHTS,
                                 "seed": 0}, source="bench cohort")
    store = open_store(store_path)
    in_memory = path == "before"
    started = time.perf_counter()
    epoch_s, build_s, pccs, n_train = [], 0.0, [], 0
    folds = [np.asarray(store.split(s)) for s in (SPLITS if kind == "cv" else SPLITS[:1])]
    base = None
    for roles in folds:
        t0 = time.perf_counter()
        if in_memory or base is None:
            data = make_bundle(store, SPLITS[0], cfg, rank=0, world_size=1, roles=roles, in_memory=in_memory)
            base = data
        else:
            data = base.with_roles(roles)
        build_s += time.perf_counter() - t0
        result = fit(cfg, data)
        epoch_s += [float(r["epoch_time_s"]) for r in result.history]
        pccs.append(float(result.test["pcc"]))
        n_train = len(data.parts["train"])
        del data
    steady = [s for i, s in enumerate(epoch_s) if i % epochs]  # a fit's first epoch also warms up
    median = float(np.median(steady or epoch_s))
    return {"seconds": time.perf_counter() - started, "build_s": build_s, "epoch_s": epoch_s,
            "median_epoch_s": median, "train_spots": n_train, "spots_per_s": n_train / median, "test_pcc": pccs}


def read_rollup(pid: int) -> dict[str, int]:
    """kB fields of ``/proc/PID/smaps_rollup`` (Rss, Pss, Pss_Anon, Pss_File, Private_*)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


class Sampler:
    """Peak RSS / PSS / USS / anonymous PSS (MB) of one process, sampled every ``interval_s``."""

    def __init__(self, pid: int, interval_s: float = 0.1):
        self.pid, self.interval_s = pid, interval_s
        self.peak = {"rss_mb": 0.0, "pss_mb": 0.0, "uss_mb": 0.0, "pss_anon_mb": 0.0, "pss_file_mb": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                r = read_rollup(self.pid)
            except (OSError, ValueError):
                break
            now = {"rss_mb": r.get("Rss", 0), "pss_mb": r.get("Pss", 0),
                   "uss_mb": r.get("Private_Clean", 0) + r.get("Private_Dirty", 0),
                   "pss_anon_mb": r.get("Pss_Anon", 0), "pss_file_mb": r.get("Pss_File", 0)}
            for k, v in now.items():
                self.peak[k] = max(self.peak[k], v / 1024)
            self._stop.wait(self.interval_s)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {k: round(v, 1) for k, v in self.peak.items()}


def niced() -> list[str]:
    """``nice -n 10`` for a measured child, unless this process already runs at niceness >= 10 (a bench started
    with ``nice -n 10`` would otherwise put its children at 19, behind every other job on a shared machine)."""
    return ["nice", "-n", "10"] if os.nice(0) < 10 else []


def measure(store: Path, path: str, kind: str, epochs: int, trials: int) -> dict[str, Any]:
    """``trials`` concurrent child processes (nice 10); their results and sampled peaks."""
    code = ("import json, sys; from agl.bench.cohort import child; "
            "print('RESULT ' + json.dumps(child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, samplers = [], []
    for _ in range(trials):
        p = subprocess.Popen([*niced(), sys.executable, "-c", code, str(store), path, kind, str(epochs)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        procs.append(p)
        samplers.append(Sampler(p.pid))
    rows = []
    for p, s in zip(procs, samplers):
        out, err = p.communicate()
        peak = s.stop()
        line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            rows.append({"failed": True, "returncode": p.returncode, "stderr": err[-800:], **peak})
        else:
            rows.append({**json.loads(line[len("RESULT "):]), **peak})
    return {"path": path, "kind": kind, "trials": trials, "rows": rows}


# --------------------------------------------------------------------------- the sweep phase
# A cross-validated space on the cohort's outer split: 2 trials at once (1 CPU and 1 torch thread each),
# every trial fitting 2 inner kfold folds. ``method``: pgl by default (the train phase's; cheapest on a loaded
# machine); dkgsb keeps its features-mode default outer_val: full (the whole outer-validation part in one batch).
SWEEP_SPACE = """\
description: agl bench cohort's sweep phase (2 concurrent CV trials on a tiled cohort)
split: {split}
metric: cv_pcc
direction: max
num_samples: 2
max_concurrent: 2
seed: 0
scheduler: {{name: fifo}}
resources: {{cpu: 1}}
cv: {{kind: kfold, folds: 3, max_folds: 2, seed: 0}}
fixed:
  method: {method}
  mode: features
  backbone: {backbone}
  weights: {weights}
  device: cpu
  epochs: {epochs}
  patience: {epochs}
  batch_size: 256
  trunk: [64]
params:
  lr: {{type: float, low: 5.0e-4, high: 3.0e-3, log: true}}
"""
SWEEP_RAY_MEMORY_THRESHOLD = "0.99"  # see measure_sweep
TRIAL_MARKER = "ImplicitFunc"  # Ray's process title of a function trial's actor (ray::ImplicitFunc.train)


def proc_children() -> dict[int, list[int]]:
    """Parent PID -> child PIDs of every process (``/proc/PID/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after the command name, which may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (the sweep's Ray: GCS, raylet, trial workers), not ``root`` itself."""
    tree, out, todo = proc_children(), [], [root]
    while todo:
        for child_pid in tree.get(todo.pop(), []):
            out.append(child_pid)
            todo.append(child_pid)
    return out


class TreeSampler:
    """Peak smaps_rollup figures of a process tree: the root (the sweep driver), each trial process (title
    holds :data:`TRIAL_MARKER`), and the whole tree's summed PSS (what the sweep costs the machine)."""

    def __init__(self, root: int, interval_s: float = 1.0):
        self.root, self.interval_s = root, interval_s
        self.driver: dict[str, float] = {}
        self.trials: dict[int, dict[str, Any]] = {}
        self.tree_pss_peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def _figures(pid: int) -> dict[str, float]:
        r = read_rollup(pid)
        return {"rss_mb": r.get("Rss", 0) / 1024, "pss_mb": r.get("Pss", 0) / 1024,
                "uss_mb": (r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)) / 1024,
                "pss_anon_mb": r.get("Pss_Anon", 0) / 1024, "pss_file_mb": r.get("Pss_File", 0) / 1024}

    @staticmethod
    def _raise(peak: dict[str, float], now: dict[str, float]) -> None:
        for k, v in now.items():
            peak[k] = max(peak.get(k, 0.0), v)

    def _loop(self) -> None:
        while not self._stop.is_set():
            total = 0.0
            for pid in [self.root, *descendants(self.root)]:
                try:
                    now = self._figures(pid)
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except (OSError, ValueError):
                    continue  # the process ended between the listing and the read
                total += now["pss_mb"]
                if pid == self.root:
                    self._raise(self.driver, now)
                elif TRIAL_MARKER in title:
                    seen = self.trials.setdefault(pid, {"first_s": time.time(), "peak": {}})
                    seen["last_s"] = time.time()
                    self._raise(seen["peak"], now)
            self.tree_pss_peak_mb = max(self.tree_pss_peak_mb, total)
            self._stop.wait(self.interval_s)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        trials = [{"pid": pid, "alive_s": round(t["last_s"] - t["first_s"], 1),
                   **{k: round(v, 1) for k, v in t["peak"].items()}} for pid, t in sorted(self.trials.items())]
        return {"driver": {k: round(v, 1) for k, v in self.driver.items()}, "trials": trials,
                "tree_pss_peak_mb": round(self.tree_pss_peak_mb, 1)}


def sweep_child(store_path: str, work: str, epochs: int, method: str = "pgl") -> dict[str, Any]:
    """The sweep phase in this process (the driver): ``agl tune``'s run_sweep of :data:`SWEEP_SPACE` on the cohort."""
    from agl.distributed.tune import SweepOptions, run_sweep

    work_dir = Path(work)
    space = work_dir / "cohort-sweep.yaml"
    space.write_text(SWEEP_SPACE.format(split=SPLITS[0], backbone=BACKBONE, weights=WEIGHTS, epochs=epochs,
                                        method=method))
    started = time.perf_counter()
    summary = run_sweep(SweepOptions(space=str(space), store=store_path, out=str(work_dir / "sweep"),
                                     name="cohort-sweep", num_cpus=2, max_concurrent=2, threads_per_trial=1))
    table = summary.table
    return {"seconds": time.perf_counter() - started, "complete": summary.complete, "trials_done": len(table),
            "cv_pcc": [float(v) for v in table.get("cv_pcc", [])],
            "trial_time_s": [float(v) for v in table.get("time_total_s", [])],
            "champion_test_pcc": float((summary.champion or {}).get("metrics", {}).get("test_pcc", float("nan")))}


def measure_sweep(store: Path, work: Path, epochs: int, method: str = "pgl") -> dict[str, Any]:
    """Run :func:`sweep_child` in a fresh process (nice 10) and sample its process tree."""
    code = ("import json, sys; from agl.bench.cohort import sweep_child; "
            "print('RESULT ' + json.dumps(sweep_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])))")
    work.mkdir(parents=True, exist_ok=True)
    # Ray kills trials when the whole machine's memory passes 95%; on a shared machine other users' jobs decide
    # that, so the bench lets the kernel decide instead unless told otherwise (the trials' own peaks are recorded)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_memory_usage_threshold":
           os.environ.get("RAY_memory_usage_threshold", SWEEP_RAY_MEMORY_THRESHOLD),
           # Ray starts workers 15 nicer than its raylet: trials at 19 would measure the machine's other jobs
           "RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0")}
    started = time.perf_counter()
    log_path = work / "sweep.log"  # the whole sweep's output (Ray, Tune, MLflow), kept for a failed run
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([*niced(), sys.executable, "-c", code, str(store), str(work), str(epochs), method],
                                stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env)
        sampler = TreeSampler(proc.pid)
        proc.wait()
    peaks = sampler.stop()
    text = log_path.read_text(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
    row: dict[str, Any] = {"wall_s": round(time.perf_counter() - started, 1), "log": str(log_path), **peaks}
    if proc.returncode != 0 or line is None:
        errors = [ln for ln in text.splitlines() if "Error" in ln or "error" in ln][-5:]
        row.update(failed=True, returncode=proc.returncode, stderr="\n".join(errors) + "\n" + text[-1500:])
    else:
        row.update(json.loads(line[len("RESULT "):]))
    return row


def bench_cohort(out_dir: str | Path = "results", copies: tuple[int, ...] = (1, 4, 16, 64),
                 before_max: dict[str, int] | None = None, epochs: int = 3, work: str | Path | None = None,
                 echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Build each cohort, then measure train (1 trial) and cv (2 concurrent trials), before and after."""
    before_max = before_max or {"train": 16, "cv": 4}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(work or tempfile.mkdtemp(prefix="agl-bench-cohort-"))
    result: dict[str, Any] = {"copies": list(copies), "epochs": epochs, "method": "pgl", "mode": "features",
                              "load_avg_1m_start": os.getloadavg()[0], "cpus": os.cpu_count(), "runs": []}
    for n in copies:
        t0 = time.perf_counter()
        store = build_cohort(n, work / f"cohort-x{n}")
        from agl.data.store import open_store

        spots = int(open_store(store).manifest["n_spots"])
        echo(f"cohort x{n}: {spots} spots (built in {time.perf_counter() - t0:.0f} s)")
        for kind, trials in (("train", 1), ("cv", 2)):
            for path in ("before", "after"):
                if path == "before" and n > before_max[kind]:
                    continue
                run = {"copies": n, "spots": spots, **measure(store, path, kind, epochs, trials),
                       "load_avg_1m": os.getloadavg()[0]}
                result["runs"].append(run)
                echo(f"  {kind:5s} {path:6s} x{trials}: " + "; ".join(
                    f"USS {r['uss_mb']:.0f} MB, PSS {r['pss_mb']:.0f} (anon {r['pss_anon_mb']:.0f}), RSS "
                    f"{r['rss_mb']:.0f}" + (f", {r['median_epoch_s']:.1f} s/epoch, {r['spots_per_s']:.0f} spots/s"
                                            if not r.get("failed") else " FAILED") for r in run["rows"]))
                atomic_write_json(out_dir / "bench_cohort.json", result, indent=1)
    result["verdicts"] = verdicts(result)
    atomic_write_json(out_dir / "bench_cohort.json", result, indent=1)
    _plot(result, out_dir / "bench_cohort.png")
    echo(json.dumps(result["verdicts"], indent=1))
    return result


SWEEP_METHODS = ("pgl", "dkgsb")  # the sweep phase's methods: the train phase's, and the bilevel one


def bench_cohort_sweep(out_dir: str | Path = "results", copies: tuple[int, ...] = (128,), epochs: int = 1,
                       work: str | Path | None = None, method: str = "pgl",
                       echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The sweep phase: for each cohort, a 2-trial cross-validated Tune sweep (``run_sweep``, local Ray, 2 CPUs);
    per-trial peak USS/PSS/anonymous PSS/RSS of the trial processes, the driver's, the tree's PSS, wall time."""
    if method not in SWEEP_METHODS:
        raise ConfigError("--sweep-method", f"must be one of {', '.join(SWEEP_METHODS)}, got {method!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(work or tempfile.mkdtemp(prefix="agl-bench-cohort-"))
    result: dict[str, Any] = {"copies": list(copies), "epochs": epochs, "method": method, "mode": "features",
                              "space": SWEEP_SPACE.format(split=SPLITS[0], backbone=BACKBONE, weights=WEIGHTS,
                                                          epochs=epochs, method=method),
                              "load_avg_1m_start": os.getloadavg()[0], "cpus": os.cpu_count(),
                              "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                              "ray_memory_usage_threshold": float(os.environ.get("RAY_memory_usage_threshold",
                                                                                 SWEEP_RAY_MEMORY_THRESHOLD)),
                              "runs": []}
    for n in copies:
        store = build_cohort(n, work / f"cohort-x{n}")
        from agl.data.store import open_store

        opened = open_store(store)
        spots = int(opened.manifest["n_spots"])
        roles = np.asarray(opened.split(SPLITS[0]))
        del opened
        sweep_work = work / f"sweep-x{n}"
        if sweep_work.exists():  # a sweep folder is never reused (agl tune refuses one): a fresh one per run
            import shutil

            shutil.rmtree(sweep_work)
        echo(f"cohort x{n}: {spots} spots; 2-trial CV sweep ...")
        row = measure_sweep(store, sweep_work, epochs, method)
        run = {"copies": n, "spots": spots, "outer_val_spots": int((roles == "val").sum()),
               "load_avg_1m": os.getloadavg()[0], **row}
        result["runs"].append(run)
        echo(sweep_line(run))
        atomic_write_json(out_dir / "bench_cohort_sweep.json", result, indent=1)
    _plot_sweep(result, out_dir / "bench_cohort_sweep.png")
    return result


def sweep_line(run: dict[str, Any]) -> str:
    """One line per sweep run: spots, outcome, wall time, per-trial peaks."""
    if run.get("failed"):
        return f"  {run['spots']:,} spots: sweep FAILED (exit {run.get('returncode')}): {run.get('stderr', '')[-300:]}"
    trials = "; ".join(f"trial {t['pid']}: USS {t['uss_mb']:,.0f} MB, PSS {t['pss_mb']:,.0f} (anon "
                       f"{t['pss_anon_mb']:,.0f}), RSS {t['rss_mb']:,.0f}, {t['alive_s']:.0f} s" for t in run["trials"])
    return (f"  {run['spots']:,} spots: {run.get('trials_done')} trials done, complete={run.get('complete')}, {run['wall_s']:.0f} s wall; {trials}; driver PSS "
            f"{run['driver'].get('pss_mb', 0):,.0f} MB; whole tree PSS peak {run['tree_pss_peak_mb']:,.0f} MB")


def _plot_sweep(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r.get("trials")]  # a failed sweep still has its trials' peaks until then
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = ("uss_mb", "pss_mb", "pss_anon_mb", "rss_mb")
    width = 0.8 / (len(keys))
    labels = []
    for i, run in enumerate(runs):
        for j, trial in enumerate(run["trials"]):
            x = i * (len(run["trials"]) + 1) + j
            labels.append((x, f"{run.get('label', str(run['spots']) + ' spots')}\ntrial {j + 1}"))
            for m, key in enumerate(keys):
                ax.bar(x + (m - 1.5) * width, trial[key], width, color=f"C{m}", label=key if not labels[1:] else None)
    ax.set_xticks([x for x, _ in labels], [t for _, t in labels], fontsize=8)
    ax.set_ylabel("peak per trial process (MB)")
    ax.legend(fontsize=8)
    ax.set_title("agl bench cohort: 2 concurrent CV trials (Ray Tune), per-trial peak memory", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdicts(result: dict[str, Any]) -> dict[str, Any]:
    """Anonymous PSS of the after-path flat within 20% from the smallest to the largest cohort; s/epoch linear."""
    from agl.bench.scale import linear_fit

    after = [r for r in result["runs"] if r["path"] == "after" and r["kind"] == "train"
             and not r["rows"][0].get("failed")]
    if len(after) < 2:
        return {}
    anon = [r["rows"][0]["pss_anon_mb"] for r in after]
    fit_ = linear_fit([r["spots"] for r in after], [r["rows"][0]["median_epoch_s"] for r in after])
    return {"after_train_pss_anon_mb": anon, "anon_growth_smallest_to_largest": anon[-1] / anon[0] - 1,
            "anon_flat_within_20pct": anon[-1] <= 1.2 * anon[0], "epoch_s_linear_fit": fit_,
            "largest_spots_after": after[-1]["spots"]}


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, marker in (("train", "o"), ("cv", "s")):
        for p, colour in (("before", "tab:red"), ("after", "tab:blue")):
            runs = [r for r in result["runs"] if r["kind"] == kind and r["path"] == p
                    and not any(x.get("failed") for x in r["rows"])]
            if not runs:
                continue
            xs = [r["spots"] for r in runs]
            axes[0].plot(xs, [max(x["uss_mb"] for x in r["rows"]) for r in runs], marker=marker, color=colour,
                         label=f"{kind} {p}: USS")
            axes[0].plot(xs, [max(x["pss_anon_mb"] for x in r["rows"]) for r in runs], marker=marker, color=colour,
                         linestyle=":", label=f"{kind} {p}: anon PSS")
            axes[1].plot(xs, [np.median([x["median_epoch_s"] for x in r["rows"]]) for r in runs], marker=marker,
                         color=colour, label=f"{kind} {p}")
    for ax, ylabel in zip(axes, ("peak per-trial memory (MB)", "seconds per epoch")):
        ax.set_xscale("log")
        ax.set_xlabel("spots in the cohort")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle("agl bench cohort: per-trial memory and epoch time, before/after the per-batch path")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(result: dict[str, Any]) -> str:
    """One row per (spots, run kind, path): per-trial peaks (the larger of concurrent trials) and speed."""
    lines = ["| spots | run | path | USS MB | PSS MB | anon PSS MB | RSS MB | s/epoch | spots/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["runs"], key=lambda r: (r["spots"], r["kind"] != "train", r["path"] != "before")):
        rows = r["rows"]
        if any(x.get("failed") for x in rows):
            lines.append(f"| {r['spots']:,} | {r['kind']} x{r['trials']} | {r['path']} | failed | | | | | |")
            continue
        peak = {k: max(x[k] for x in rows) for k in ("uss_mb", "pss_mb", "pss_anon_mb", "rss_mb")}
        lines.append(f"| {r['spots']:,} | {r['kind']} x{r['trials']} | {r['path']} | {peak['uss_mb']:,.0f} | "
                     f"{peak['pss_mb']:,.0f} | {peak['pss_anon_mb']:,.0f} | {peak['rss_mb']:,.0f} | "
                     f"{np.median([x['median_epoch_s'] for x in rows]):.1f} | "
                     f"{np.median([x['spots_per_s'] for x in rows]):,.0f} |")
    return "\n".join(lines)
