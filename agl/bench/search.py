"""``agl bench search``: does the sweep find the answer, and at what compute? A known-answer benchmark of the
whole search (``launch/tune.py``'s code path, unchanged).

The problem is the one of ``agl bench selection`` (:func:`agl.bench.selection.plant`): the demo store's
real frozen MobileNetV2 features, planted primary / helpful / conflict / noise genes, a prior that ranks
the helpful genes mostly first. Here it is written as a store with the demo's five slides
(:func:`write_planted_store`; its feature cache is the demo's, linked under the new store's key), so
that :func:`agl.distributed.tune.run_sweep` runs on it as on any store: Ray Tune, the Optuna searcher,
ASHA, the leave-one-slide-out objective on the four non-test slides, the refit of the best
configuration scored once on slide B4 (never seen by the search), MLflow.

Per run (seed x budget x searcher x ASHA on/off):

- the champion's test PCC (the refit on B4) and its method and k against the planted k;
- regret: the oracle's test PCC minus the champion's; the oracle is the best top-k on that seed's own
  test curve (top-k refit at several multiples of the planted k, each at the ends and middle of the
  searched lr range, scored on B4: no search can see it). A champion can still beat it (negative
  regret: another lr, or PGL when few epochs leave no auxiliary gene helpful); the JSON also gives
  the regret against the better of it and PGL;
- compute: trial-epochs (epochs run, summed over every trial's folds), trial CPU-seconds (each trial's own
  CPU time, reported by the trial: one torch thread each, so the machine's load does not inflate it), the
  sweep's CPU-seconds (every process of the sweep: Tune, MLflow, Ray, trials, the refit) and its wall time.

Trials reuse warm Ray workers (``reuse_actors``; ``--no-reuse-actors`` for a fresh process per trial, the
sweep's default): the process start and imports were most of a trial's CPU on this problem (measured in
docs/benchmarks.md), and reusing a process changes nothing a trial computes.

Searchers: ``tpe`` (the sweep's default, :mod:`agl.distributed.searcher`), ``random`` (Optuna's
RandomSampler through the same code), ``grid`` (top-k at ``budget`` values of k spaced evenly in
log k: the pinned trials of a space with no sampled trial; run without ASHA, as pinned trials are never
stopped), and ``tpe-plain`` (the searcher before 2026-12-07: Optuna's TPE with its defaults, stopped trials
scored as complete; the A/B of the sweep's searcher set-up). Writes ``OUT/bench_search.json`` after every sweep
(``complete`` false until the last; a failed sweep is listed and skipped) and ``OUT/bench_search.png`` (regret
against compute per searcher).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from agl.errors import ConfigError
from agl.fileio import atomic_write_json

log = logging.getLogger(__name__)

SEARCHERS = ("tpe", "random", "grid", "tpe-plain")
SPLIT = "loso-B4"              # the sweep's test slide, as in the default space
K_LOW = 8                      # the smallest k the space searches
CURVE = (0.25, 0.5, 1.0, 2.0, 4.0)   # the oracle's top-k curve: multiples of the planted k
QUICK = {"n_aux": 300, "seeds": 1, "budgets": [3], "searchers": ["tpe", "grid"], "asha": ["on"], "epochs": 2,
         "max_folds": 2, "curve": (1.0, 2.0)}


# --------------------------------------------------------------------------- the planted store
def write_planted_store(demo: Any, planted: Any, out: Path) -> Path:
    """The demo store with planted expression and gene sets (every split: the planted gene table), its
    spots, slides, splits and patches unchanged; the demo's feature cache linked in (same patches)."""
    from agl.data.store import open_store, write_store
    from agl.models.features import cache_target

    genes = planted.genes
    expression = planted.targets
    names = pd.DataFrame({"name": genes["gene"].astype(str), "mean": expression.mean(axis=0).astype(np.float64),
                          "n_spots": np.full(len(genes), expression.shape[0], dtype=np.int64)})
    splits = pd.DataFrame({name: demo.split(name).to_numpy() for name in demo.split_names})
    table = genes.copy()
    manifest = {k: v for k, v in demo.manifest.items() if k.startswith("patch")}
    manifest["planted"] = dict(planted.settings)
    write_store(out, spots=demo.spots, patches=np.asarray(demo.patches), expression=expression, genes=names,
                splits=splits, gene_sets={name: table for name in demo.split_names}, manifest=manifest)
    store = open_store(out)
    from agl.config import TrainConfig

    cfg = TrainConfig()
    source = cache_target(demo, cfg.backbone, cfg.weights, 8, "float32")[3]
    target = cache_target(store, cfg.backbone, cfg.weights, 8, "float32")[3]
    if not source.is_file():
        from agl.models import feature_cache

        feature_cache(demo, cfg.backbone, cfg.weights)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)          # the features depend on the patches only: the same file
    except OSError:
        shutil.copyfile(source, target)
    sidecar = source.with_suffix(".json")
    if sidecar.is_file():
        shutil.copyfile(sidecar, target.with_suffix(".json"))
    return out


# --------------------------------------------------------------------------- the space per searcher
def grid_ks(n_aux: int, budget: int, low: int = K_LOW) -> list[int]:
    """``budget`` values of k spaced evenly in log k over [low, n_aux] (distinct, rounded)."""
    ks = np.unique(np.round(np.geomspace(low, n_aux, max(budget, 1))).astype(int))
    return [int(k) for k in ks]


def bench_space(searcher: str, budget: int, n_aux: int, seed: int, asha: bool, epochs: int,
                max_folds: int | None) -> dict[str, Any]:
    """The search space (as a space file's mapping) of one run: the default space's shape on the planted store."""
    fixed = {"mode": "features", "epochs": epochs, "patience": epochs, "batch_size": 128, "trunk": [64],
             "prior": "planted", "prior_weight": 1.0, "val_outer_fraction": 0.5, "outer_val": "full"}
    params: dict[str, Any] = {
        "method": {"type": "categorical", "choices": ["dkgsb", "topk", "pgl"]},
        "k": {"type": "int", "low": K_LOW, "high": n_aux - 1, "log": True, "when": {"method": ["dkgsb", "topk"]}},
        "tau": {"type": "float", "low": 0.003, "high": 0.1, "log": True, "when": {"method": "dkgsb"}},
        "outer_lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True, "when": {"method": "dkgsb"}},
        "lr": {"type": "float", "low": 3.0e-4, "high": 3.0e-3, "log": True},
    }
    start_with: list[dict[str, Any]] = []
    if searcher == "grid":
        ks = grid_ks(n_aux - 1, budget)   # k < n_aux: keeping every gene is AGL-all
        start_with = [{"method": "topk", "k": k} for k in ks]
        budget = len(ks)
    cv: dict[str, Any] = {"kind": "loso"}
    if max_folds:
        cv["max_folds"] = max_folds
    use_asha = asha and searcher != "grid"
    return {"description": f"agl bench search: {searcher}, budget {budget}, ASHA {'on' if use_asha else 'off'}",
            "split": SPLIT, "cv": cv, "metric": "cv_pcc", "direction": "max", "num_samples": budget, "seed": seed,
            "scheduler": ({"name": "asha", "grace_period": 1, "reduction_factor": 2} if use_asha else {"name": "fifo"}),
            "resources": {"cpu": 1}, "fixed": fixed, "params": params, "start_with": start_with}


# --------------------------------------------------------------------------- one run
def trial_compute(ray_folder: Path) -> dict[str, float]:
    """Trial-epochs, trial CPU-seconds and trial wall-seconds of a finished sweep, from Tune's per-trial result.json.

    CPU: each trial reports its own thread's CPU time (``trial_cpu_s``: one torch thread computes in it), which
    does not grow with the machine's load; wall: the sum of the trials' Tune ``time_total_s``, which does."""
    epochs = cpu = wall = 0.0
    trials = 0
    for result in ray_folder.glob("*/*/result.json"):   # ray/<experiment>/<trial>/ (not the checkpoints' own)
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if not lines:
            continue
        trials += 1
        last = lines[-1]
        # epochs_run is the folds' mean: times folds_done is every epoch the trial trained
        epochs += float(last.get("epochs_run", 0) or 0) * float(last.get("folds_done", 1) or 1)
        cpu += float(last.get("trial_cpu_s", 0) or 0)
        wall += float(last.get("time_total_s", 0) or 0)
    return {"trial_epochs": epochs, "trial_cpu_s": round(cpu, 1), "trial_wall_s": round(wall, 1), "trials": trials}


class TreeCpu:
    """CPU-seconds of this process and every process under it (Tune and MLflow in the driver, Ray's raylet, GCS
    and workers, the refit) while it runs: each process is sampled every ``interval_s`` seconds and counted from
    its first to its last sample (Ray workers that end are not reaped into their parent's times, so a before/after
    reading of the tree misses them; a sampled process loses at most its last interval)."""

    def __init__(self, interval_s: float = 0.5):
        import threading

        self.interval_s = interval_s
        self.first: dict[tuple[int, float], float] = {}
        self.last: dict[tuple[int, float], float] = {}
        self._started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agl-tree-cpu", daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        for proc in [me] + me.children(recursive=True):
            try:
                key, t = (proc.pid, proc.create_time()), proc.cpu_times()
            except psutil.Error:   # ended between the listing and the read
                continue
            used = t.user + t.system
            # a process that started after the first sample counts from zero: all its CPU is the sweep's
            self.first.setdefault(key, 0.0 if self._started else used)
            self.last[key] = used
        self._started = True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "TreeCpu":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def seconds(self) -> float:
        return float(sum(self.last[k] - self.first[k] for k in self.last))


def run_one(store: Path, work: Path, searcher: str, budget: int, seed: int, asha: bool, n_aux: int,
            epochs: int, max_folds: int | None, num_cpus: int, reuse_actors: bool = True) -> dict[str, Any]:
    """One sweep on the planted store; its champion, table and compute."""
    import yaml

    from agl.distributed.tune import SweepOptions, run_sweep

    name = f"{searcher}-b{budget}-s{seed}-{'asha' if asha else 'fifo'}"
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    space_file = folder / "space.yaml"
    space_file.write_text(yaml.safe_dump(bench_space(searcher, budget, n_aux, seed, asha, epochs, max_folds),
                                         sort_keys=False))
    started = time.perf_counter()
    with TreeCpu() as meter:
        summary = run_sweep(SweepOptions(space=str(space_file), store=str(store), out=str(folder / "sweep"),
                                         name=name, num_cpus=num_cpus,
                                         searcher="tpe" if searcher == "grid" else searcher,
                                         reuse_actors=reuse_actors))
    wall, sweep_cpu = time.perf_counter() - started, meter.seconds
    champion = summary.champion or {}
    config = champion.get("config", {})
    table = summary.table
    return {"searcher": searcher, "budget": budget, "seed": seed, "asha": bool(asha and searcher != "grid"),
            "trials": int(len(table)), "stopped": int((table["status"] == "stopped").sum()) if len(table) else 0,
            "champion_method": config.get("method"), "champion_k": champion.get("metrics", {}).get("final_k"),
            "champion_config": config, "champion_cv_pcc": (summary.best or {}).get("cv_pcc"),
            "champion_test_pcc": champion.get("metrics", {}).get("test_pcc"),
            **trial_compute(folder / "sweep" / "ray"), "sweep_cpu_s": round(sweep_cpu, 1), "wall_s": round(wall, 1),
            "consensus_size": (summary.consensus or {}).get("size")}


ORACLE_LRS = (3.0e-4, 1.0e-3, 3.0e-3)   # the searched lr range: its ends and its middle


def oracle_curve(store: Path, work: Path, k_planted: int, n_aux: int, epochs: int, seed: int,
                 multiples: Sequence[float], lrs: Sequence[float] = ORACLE_LRS
                 ) -> tuple[dict[Any, float], list[dict[str, Any]]]:
    """The seed's test curve: top-k at multiples of the planted k (and PGL), each at every lr of ``lrs``,
    refit on every non-test spot and scored on B4; returns (best test PCC per k and for "pgl", every point)."""
    from agl.distributed.cv import refit
    from agl.distributed.spaces import parse_space

    space = parse_space(bench_space("tpe", 1, n_aux, seed, False, epochs, None), source="bench search oracle")
    ks: list[Any] = sorted({min(n_aux - 1, max(K_LOW, int(round(m * k_planted)))) for m in multiples})
    points = []
    for k in ks + ["pgl"]:   # PGL beside the curve: with few epochs no auxiliary gene may help
        for lr in lrs:       # the search tunes lr: an oracle at one lr would be beaten by a better lr alone
            config = {"method": "pgl", "lr": lr} if k == "pgl" else {"method": "topk", "k": k, "lr": lr}
            summary = refit(space, config, str(store), work / "oracle", threads=1)
            points.append({"k": k, "lr": lr, "test_pcc": float(summary["metrics"]["test_pcc"])})
            shutil.rmtree(work / "oracle", ignore_errors=True)
    best = {k: max(p["test_pcc"] for p in points if p["k"] == k) for k in ks + ["pgl"]}
    return best, points


# --------------------------------------------------------------------------- the benchmark
def summarise(runs: list[dict[str, Any]], target: float = 0.005) -> dict[str, Any]:
    """Per searcher x ASHA x budget: mean regret, share of runs within ``target``, mean compute; the issue's
    target (TPE + ASHA at regret <= target with at most half random search's compute) where both ran."""
    frame = pd.DataFrame(runs)
    rows = []
    for (searcher, asha, budget), group in frame.groupby(["searcher", "asha", "budget"], sort=True):
        rows.append({"searcher": searcher, "asha": bool(asha), "budget": int(budget), "runs": int(len(group)),
                     "regret_mean": float(group["regret"].mean()),
                     "regret_sd": float(group["regret"].std(ddof=1)) if len(group) > 1 else 0.0,
                     "within_target": int((group["regret"] <= target).sum()),
                     "trial_epochs_mean": float(group["trial_epochs"].mean()),
                     "trial_cpu_s_mean": float(group["trial_cpu_s"].mean()),
                     "trial_wall_s_mean": float(group["trial_wall_s"].mean()) if "trial_wall_s" in group else math.nan,
                     "sweep_cpu_s_mean": float(group["sweep_cpu_s"].mean()) if "sweep_cpu_s" in group else math.nan,
                     "wall_s_mean": float(group["wall_s"].mean()),
                     "champion_test_pcc_mean": float(group["champion_test_pcc"].mean()),
                     "champion_methods": group["champion_method"].astype(str).value_counts().to_dict()})
    verdict = None
    tpe = [r for r in rows if r["searcher"] == "tpe" and r["asha"] and r["regret_mean"] <= target]
    rnd = [r for r in rows if r["searcher"] == "random" and r["regret_mean"] <= target]
    if tpe or rnd:
        best_tpe = min(tpe, key=lambda r: r["trial_cpu_s_mean"]) if tpe else None
        best_rnd = min(rnd, key=lambda r: r["trial_cpu_s_mean"]) if rnd else None
        # random never reaching the target tells only that it needs more than the most it spent
        random_spent = max((r["trial_cpu_s_mean"] for r in rows if r["searcher"] == "random"), default=math.nan)
        random_needs = best_rnd["trial_cpu_s_mean"] if best_rnd else random_spent
        met = bool(best_tpe and best_tpe["trial_cpu_s_mean"] <= 0.5 * random_needs)
        verdict = {"target_regret": target, "tpe_asha_cpu_s": best_tpe and best_tpe["trial_cpu_s_mean"],
                   "random_cpu_s": best_rnd and best_rnd["trial_cpu_s_mean"], "random_reached": best_rnd is not None,
                   "random_max_cpu_s": random_spent, "met": met}
    return {"rows": rows, "target": verdict, "target_regret": target, "paired": paired_differences(frame)}


PAIRS = (("tpe", "random"), ("tpe", "tpe-plain"))   # (a, b): a minus b on the same seeds


def paired_differences(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """TPE minus random (and minus tpe-plain) on the same seeds (same planted store, same oracle), per budget and
    ASHA setting: mean difference in regret and in trial CPU-s with their standard errors (above the seed noise?)."""
    out: list[dict[str, Any]] = []
    if "seed" not in frame:
        return out
    for a, b in PAIRS:
        for (budget, asha), group in frame[frame["searcher"].isin([a, b])].groupby(["budget", "asha"]):
            wide = group.pivot_table(index="seed", columns="searcher", values=["regret", "trial_cpu_s"])
            wide = wide.dropna()
            if a not in wide["regret"] or b not in wide["regret"] or not len(wide):
                continue
            row: dict[str, Any] = {"a": a, "b": b, "budget": int(budget), "asha": bool(asha), "seeds": int(len(wide))}
            for value in ("regret", "trial_cpu_s"):
                diff = (wide[value][a] - wide[value][b]).to_numpy(dtype=np.float64)
                row[f"{value}_diff_mean"] = float(diff.mean())
                row[f"{value}_diff_se"] = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
                if value == "regret":
                    row["p_t"] = _paired_p(diff)
            out.append(row)
    return out


def _paired_p(diff: np.ndarray) -> float:
    """Two-sided one-sample t-test of paired differences (nan below 2 pairs or with no spread)."""
    from scipy import stats

    if len(diff) < 2 or not np.std(diff) > 0:
        return math.nan
    return float(stats.ttest_1samp(diff, 0.0).pvalue)


def format_rows(summary: dict[str, Any]) -> str:
    lines = [f"{'searcher':<10}{'ASHA':>5}{'budget':>7}{'runs':>5}{'regret':>18}{'<=tgt':>6}"
             f"{'trial-epochs':>13}{'CPU-s':>8}{'sweep CPU-s':>12}{'wall s':>8}  champions"]
    for r in summary["rows"]:
        lines.append(f"{r['searcher']:<10}{'on' if r['asha'] else 'off':>5}{r['budget']:>7}{r['runs']:>5}"
                     f"{r['regret_mean']:>10.4f} +- {r['regret_sd']:.4f}{r['within_target']:>6}"
                     f"{r['trial_epochs_mean']:>13.0f}{r['trial_cpu_s_mean']:>8.0f}"
                     f"{r.get('sweep_cpu_s_mean', math.nan):>12.0f}{r['wall_s_mean']:>8.0f}  "
                     + ", ".join(f"{m} x{n}" for m, n in r["champion_methods"].items()))
    for p in summary.get("paired", []):
        lines.append(f"{p.get('a', 'tpe')} - {p.get('b', 'random')}, budget {p['budget']}, ASHA "
                     f"{'on' if p['asha'] else 'off'}, {p['seeds']} paired seeds: regret {p['regret_diff_mean']:+.4f} "
                     f"+- {p['regret_diff_se']:.4f} (s.e., t-test p {p.get('p_t', math.nan):.2g}), trial CPU-s "
                     f"{p['trial_cpu_s_diff_mean']:+.0f} +- {p['trial_cpu_s_diff_se']:.0f}")
    verdict = summary.get("target")
    if verdict:
        random_part = (f"random {verdict['random_cpu_s']:.0f}" if verdict.get("random_reached", True) else
                       f"random never reached it, up to {verdict.get('random_max_cpu_s', math.nan):.0f} CPU-s")
        tpe_part = (f"TPE+ASHA {verdict['tpe_asha_cpu_s']:.0f}" if verdict["tpe_asha_cpu_s"] is not None
                    else "TPE+ASHA never reached it")
        lines.append(f"target (TPE + ASHA at mean regret <= {verdict['target_regret']} with <= half of random "
                     f"search's CPU-s): {'met' if verdict['met'] else 'not met'} ({tpe_part}; {random_part})")
    else:
        lines.append(f"neither TPE + ASHA nor random reached a mean regret <= {summary['target_regret']} at any "
                     "budget: the target is not met")
    return "\n".join(lines)


def _plot(runs: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agl.fileio import atomic_savefig

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"tpe": "tab:blue", "random": "tab:orange", "grid": "tab:green", "tpe-plain": "tab:purple"}
    try:
        for (searcher, asha), group in pd.DataFrame(runs).groupby(["searcher", "asha"]):
            ax.scatter(group["trial_cpu_s"], group["regret"], color=colours.get(searcher, "k"),
                       marker="o" if asha else "s", alpha=0.7, label=f"{searcher}, ASHA {'on' if asha else 'off'}")
            means = group.groupby("budget")[["trial_cpu_s", "regret"]].mean().sort_index()
            ax.plot(means["trial_cpu_s"], means["regret"], color=colours.get(searcher, "k"),
                    ls="-" if asha else "--", lw=1)
        ax.axhline(0.005, color="grey", ls=":", lw=1, label="target regret 0.005")
        ax.set_xlabel("compute: trial CPU-seconds (each trial's own CPU, summed over the sweep)")
        ax.set_ylabel("regret: oracle top-k test PCC - champion test PCC")
        ax.set_title("agl bench search: regret against compute (lines: mean per budget)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return atomic_savefig(fig, path, dpi=110)
    finally:
        plt.close(fig)


def sweep_plan(seeds: Sequence[int], budgets: Sequence[int], searchers: Sequence[str],
               asha: Sequence[str]) -> list[tuple[int, str, bool, int]]:
    """(budget, searcher, ASHA, seed) in the order they run, so that a run cut short has the comparison that
    matters most: TPE and random with ASHA first (the same seed one after the other), then the grid, then
    ASHA off; smaller budgets first within each."""
    combos = [(s, m == "on") for m in asha for s in searchers if s != "grid"]
    if "grid" in searchers:
        combos.append(("grid", False))
    phase = {True: 0, False: 2}
    plan = [(b, s, a, seed) for b in budgets for s, a in combos for seed in seeds]
    return sorted(plan, key=lambda p: (1 if p[1] == "grid" else phase[p[2]], p[0], p[3],
                                       [c[0] for c in combos].index(p[1])))


def bench_search(demo: Any, out_dir: str | Path = "results", *, n_aux: int = 2000, seeds: int = 2,
                 first_seed: int = 0, budgets: Sequence[int] = (8,), searchers: Sequence[str] = ("tpe", "random"),
                 asha: Sequence[str] = ("on",), epochs: int = 6, max_folds: int | None = 2,
                 curve: Sequence[float] = CURVE, num_cpus: int = 2, keep: bool = False,
                 reuse_actors: bool = True, max_minutes: float | None = None,
                 echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Every (budget, searcher, ASHA, seed) sweep (:func:`sweep_plan`'s order) on its seed's planted store;
    OUT/bench_search.json is rewritten after every sweep (``complete`` false until the last), so an interrupted
    run keeps what it measured; ``max_minutes``: start no sweep after that long (the JSON says which were left)."""
    import ray

    from agl.bench.selection import plant
    from agl.distributed.runtime import init_ray
    from agl.models import feature_cache
    from agl.config import TrainConfig

    bad = [s for s in searchers if s not in SEARCHERS]
    if bad:
        raise ConfigError("--searchers", f"unknown searcher(s) {bad}; known: {list(SEARCHERS)}")
    if not set(asha) <= {"on", "off"} or not asha:
        raise ConfigError("--asha", f"must be on, off or on,off; got {','.join(asha)!r}")
    if not budgets or min(budgets) < 1:
        raise ConfigError("--budgets", f"must be positive trial counts, got {list(budgets)}")
    if seeds < 1:
        raise ConfigError("--seeds", f"must be >= 1, got {seeds}")
    if max_minutes is not None and max_minutes <= 0:
        raise ConfigError("--max-minutes", f"must be > 0, got {max_minutes}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "bench_search_work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    cfg = TrainConfig()
    features = feature_cache(demo, cfg.backbone, cfg.weights)
    plan = sweep_plan(range(first_seed, first_seed + seeds), budgets, searchers, asha)
    settings = {"benchmark": "search", "n_aux": n_aux, "seeds": seeds, "first_seed": first_seed,
                "budgets": list(budgets), "searchers": list(searchers), "asha": list(asha), "epochs": epochs,
                "max_folds": max_folds, "split": SPLIT, "num_cpus": num_cpus, "reuse_actors": reuse_actors,
                "max_minutes": max_minutes,
                "compute_note": "trial CPU-s: the sum over the sweep's trials of each trial's own CPU time (its "
                                "thread: one torch thread each), independent of the machine's load; trial wall-s: "
                                "the sum of Tune's time_total_s; sweep CPU-s: every process of the sweep (driver, "
                                "Tune, MLflow, Ray, trials, the champion's refit). The oracle curve is not counted."}
    owns_ray = not ray.is_initialized()
    init_ray(None, num_cpus=num_cpus)
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    oracles: dict[int, dict[str, Any]] = {}
    stores: dict[int, tuple[Path, Any]] = {}
    left: list[tuple[int, str, bool, int]] = []
    failed: list[dict[str, Any]] = []

    def write(complete: bool) -> dict[str, Any]:
        summary = summarise(runs) if runs else {"rows": [], "target": None, "target_regret": 0.005, "paired": []}
        result = {**settings, "complete": complete, "oracle": oracles, "summary": summary,
                  "table": format_rows(summary), "runs": runs, "failed": failed, "not_run": [
                      {"budget": b, "searcher": s, "asha": a, "seed": seed} for b, s, a, seed in left],
                  "wall_s": round(time.perf_counter() - started, 1)}
        atomic_write_json(out_dir / "bench_search.json", result, indent=1, default=str)
        if runs:
            _plot(runs, out_dir / "bench_search.png")
        return result

    try:
        for i, (budget, searcher, use_asha, seed) in enumerate(plan):
            if max_minutes is not None and time.perf_counter() - started > 60 * max_minutes:
                left = plan[i:]
                echo(f"--max-minutes {max_minutes} reached: {len(left)} sweep(s) not started")
                break
            if seed not in stores:   # the seed's planted store and its oracle, when its first sweep comes
                planted = plant(features, n_aux=n_aux, seed=seed)
                store = write_planted_store(demo, planted, work / f"store-s{seed}")
                stores[seed] = (store, planted)
                t0 = time.perf_counter()
                points, grid = oracle_curve(store, work, planted.k_planted, n_aux, epochs, seed, curve)
                pgl = points.pop("pgl")
                best_k = max(points, key=points.get)
                oracles[seed] = {"k_planted": planted.k_planted, "curve": points, "points": grid, "oracle_k": best_k,
                                 "oracle_test_pcc": points[best_k], "pgl_test_pcc": pgl,
                                 "wall_s": round(time.perf_counter() - t0, 1)}
                echo(f"seed {seed}: planted k {planted.k_planted}; oracle top-k curve on B4 "
                     + ", ".join(f"k {k}: {v:.4f}" for k, v in points.items()) + f"; PGL {pgl:.4f}")
            store, planted = stores[seed]
            oracle = oracles[seed]
            try:
                r = run_one(store, work, searcher, budget, seed, use_asha, n_aux, epochs, max_folds, num_cpus,
                            reuse_actors)
            except Exception as err:  # one sweep lost (e.g. Ray's memory monitor on a full machine): note it, go on
                failed.append({"budget": budget, "searcher": searcher, "asha": use_asha, "seed": seed,
                               "error": f"{type(err).__name__}: {str(err)[:300]}"})
                echo(f"seed {seed} {searcher} budget {budget} ASHA {'on' if use_asha else 'off'}: FAILED ({err!r:.200})")
                left = plan[i + 1:]
                write(complete=False)
                continue
            pcc = r["champion_test_pcc"]
            best = oracle["oracle_test_pcc"]
            r.update({"k_planted": planted.k_planted, "oracle_test_pcc": best,
                      "regret": (best - pcc) if pcc is not None else math.nan,
                      "regret_vs_best_of_topk_and_pgl": (max(best, oracle["pgl_test_pcc"]) - pcc
                                                         if pcc is not None else math.nan),
                      "k_rel_error": ((r["champion_k"] - planted.k_planted) / planted.k_planted
                                      if r["champion_k"] is not None else math.nan)})
            runs.append(r)
            left = plan[i + 1:]
            write(complete=False)   # after every sweep: an interrupted benchmark keeps what it measured
            echo(f"seed {seed} {searcher:<6} budget {budget:>3} ASHA {'on ' if r['asha'] else 'off'}: "
                 f"champion {r['champion_method']} k {r['champion_k']} test PCC {pcc:.4f} "
                 f"(regret {r['regret']:+.4f}); {r['trial_epochs']:.0f} trial-epochs, "
                 f"{r['trial_cpu_s']:.0f} trial CPU-s, sweep {r['sweep_cpu_s']:.0f} CPU-s, wall {r['wall_s']:.0f} s")
    finally:
        if owns_ray:
            ray.shutdown()
    result = write(complete=not left and not failed)
    echo(result["table"])
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    echo(f"wrote {out_dir / 'bench_search.json'} and {out_dir / 'bench_search.png'} ({result['wall_s']:.0f} s)")
    return result
