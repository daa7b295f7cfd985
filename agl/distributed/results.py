"""A sweep's results as a table: one row per trial, the best trial, the PGL comparison, the summary.

Read from Ray Tune's results (a ``ResultGrid``) by the sweep driver and by ``agl tune-sync``
alike; this module imports no Ray and no tracker.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from agl.distributed.spaces import SearchSpace
from agl.fileio import atomic_savefig, atomic_write_text

SWEEP_JSON = "sweep.json"
SPACE_COPY = "space.yaml"  # the space file as the sweep started: a resume on another head searches the same space
TABLE_CSV = "trials.csv"
TABLE_PNG = "trials.png"
SUMMARY_MD = "summary.md"


def trial_config(space: SearchSpace, sampled: Mapping[str, Any]) -> dict[str, Any]:
    """The validated TrainConfig values of one trial (used by the trial and for MLflow params)."""
    from agl.training.loop import TrainConfig

    return TrainConfig.from_dict(space.train_config(sampled), source=space.source).to_dict()


def trial_run_name(space: SearchSpace, trial_id: str, sampled: Mapping[str, Any]) -> str:
    """A run name a chart legend can tell apart: ``dkgsb-k1000-92df`` (k only where the method reads it)."""
    from agl.config import gate_options
    from agl.training.loop import TrainConfig

    cfg = TrainConfig.from_dict(space.train_config(sampled), source=space.source)
    parts = [cfg.method] + ([f"k{cfg.k}"] if "k" in gate_options(cfg) else [])
    return "-".join(parts + [str(trial_id)[-4:]])


def dataset_ref(store_path: str | Path, split: str) -> Any:
    """The store and split a sweep trains on, as the tracker's dataset input (digest: store manifest + roles)."""
    from agl.data.store import open_store
    from agl.tracking import DatasetRef

    store = open_store(store_path)
    roles = store.split(split).astype(str)
    counts = {str(k): int(v) for k, v in roles.value_counts().items()}
    digest = hashlib.sha256(json.dumps(store.manifest.get("files", {}), sort_keys=True).encode()
                            + split.encode() + roles.to_numpy().tobytes()).hexdigest()[:16]
    return DatasetRef(name=f"{Path(store.path).name}:{split}", source=str(Path(store.path).resolve()), digest=digest,
                      profile={"spots": int(len(roles)), **counts, "genes": int(store.manifest.get("n_genes", 0)),
                               "slides": list(store.manifest.get("slides", {}))})


DIVERGED = "diverged"   # the last report of a trial whose loss went non-finite (see diverged_report)


def diverged_report(err: Exception, metric: str) -> dict[str, Any]:
    """The last report of a trial that met a NonFiniteLossError: it ends there, without a retry (the same
    configuration diverges again; Tune's retries are for lost nodes), and the searcher records it as failed
    (``metric`` NaN, ``diverged``), the tracker as FAILED with ``error``."""
    return {metric: math.nan, DIVERGED: True, "error": f"{type(err).__name__}: {err}"[:1000], "final": False}


def is_diverged(metrics: Mapping[str, Any]) -> bool:
    """True for a trial whose last report is :func:`diverged_report`'s (numpy True as read back from Tune)."""
    value = metrics.get(DIVERGED)
    return isinstance(value, (bool, np.bool_)) and bool(value)


def trial_error(result: Any) -> str:
    """Why a trial failed: its diverged report's message, or the last line of the exception Tune kept; "" else."""
    metrics = dict(result.metrics or {})
    if is_diverged(metrics):
        return str(metrics.get("error", ""))
    if result.error is not None:
        lines = [line for line in str(result.error).splitlines() if line.strip()]
        # a worker killed by Ray's memory monitor: its last line is Ray's generic advice, the cause is further up
        oom = sorted((line.strip() for line in lines if "running low on memory" in line),
                     key=lambda line: "Memory on the node" not in line)  # the line with the node's figures first
        return (oom[0] if oom else lines[-1] if lines else type(result.error).__name__)[:1000]
    return ""


def trial_id_of(result: Any) -> str:
    metrics = dict(result.metrics or {})
    return str(metrics.get("trial_id") or (Path(result.path).name if result.path else ""))


def sweep_complete(grid: Any, space: SearchSpace) -> bool:
    """Every trial of the sweep ended (finished, stopped early or errored); False after an interrupt."""
    return grid.num_terminated + grid.num_errors >= space.num_samples


def join_path(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}" if "://" in storage_path else str(Path(storage_path) / name)


def summary_table(grid: Any, space: SearchSpace, runs: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per trial: status, searched params (blank where the trial's method does not use them),
    the objective (cv_pcc +- cv_pcc_se, or val_pcc), test metrics where a trial has them, final k,
    MLflow run id; sorted best first by the space's metric."""
    rows = []
    runs = runs or {}
    for result in grid:
        metrics = dict(result.metrics or {})
        config = dict(result.config or {})
        trial_id = trial_id_of(result)
        status = ("error" if result.error else DIVERGED if is_diverged(metrics)
                  else "finished" if metrics.get("final") else "stopped")
        row = {"trial_id": trial_id, "status": status, "error": trial_error(result),
               **{f"param.{k}": config.get(k) for k in space.params},
               "val_pcc": metrics.get("best_val_pcc", metrics.get("cv_val_pcc", metrics.get("val_pcc", math.nan))),
               "test_pcc": metrics.get("test_pcc", math.nan), "test_scc": metrics.get("test_scc", math.nan),
               "test_mse": metrics.get("test_mse", math.nan),
               "final_k": metrics.get("final_k", metrics.get("k", math.nan)),
               "epochs_run": metrics.get("epochs_run", metrics.get("training_iteration", math.nan)),
               "mlflow_run_id": runs.get(trial_id, "")}
        if space.cv is not None:
            row.update({"cv_pcc": metrics.get("cv_pcc", math.nan), "cv_pcc_se": metrics.get("cv_pcc_se", math.nan),
                        "folds_done": metrics.get("folds_done", 0), "fold_pcc": _fold_values(result)})
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        key = space.metric if space.metric in table.columns else "val_pcc"
        table = table.sort_values(key, ascending=space.mode == "min", na_position="last", kind="stable")
    return table.reset_index(drop=True)


def _fold_values(result: Any) -> str:
    """The trial's held-out PCC per fold, as JSON ({fold: pcc}) for the table and the paired test."""
    frame = result.metrics_dataframe
    if frame is None or "fold" not in frame or "fold_pcc" not in frame:
        return "{}"
    done = frame.dropna(subset=["fold", "fold_pcc"])
    return json.dumps({str(f): float(v) for f, v in zip(done["fold"], done["fold_pcc"])})


def best_trial(table: pd.DataFrame, space: SearchSpace) -> dict[str, Any] | None:
    """The best finished trial by the space's metric and mode (validation or folds, never test)."""
    key = space.metric if space.metric in table.columns else "val_pcc"
    done = table[(table["status"] == "finished") & table[key].notna()] if len(table) else table
    if not len(done):
        return None
    row = done.sort_values(key, ascending=space.mode == "min", kind="stable").iloc[0]
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.to_dict().items()}


def compare_with_pgl(table: pd.DataFrame, space: SearchSpace) -> dict[str, Any] | None:
    """Did the best auxiliary-gene trial beat the best PGL trial beyond the fold noise?

    Both ran the same folds, so the test is paired: a one-sided paired t-test
    (``agl.evaluation.metrics.paired_difference_tests(..., alternative="greater")``) on the per-fold
    held-out PCC; "beyond the fold noise" means p < 0.05. None when the table has no finished trial of
    either kind.
    """
    from agl.evaluation.metrics import paired_difference_tests
    from agl.selection import gates_with, reference_gate

    if space.cv is None or "param.method" not in table or not len(table):
        return None
    done = table[(table["status"] == "finished") & table["cv_pcc"].notna()]
    method = done["param.method"].astype(str)
    pgl = done[method == reference_gate()]
    aux = done[method.isin(gates_with(predicts_auxiliary=True))]  # not the probe: it predicts primary genes only
    if not len(pgl) or not len(aux):
        return None
    a, b = aux.iloc[0], pgl.iloc[0]   # tables are sorted best first
    fa, fb = json.loads(a["fold_pcc"]), json.loads(b["fold_pcc"])
    folds = sorted(set(fa) & set(fb))
    tests = paired_difference_tests([fa[f] - fb[f] for f in folds], alternative="greater")
    p, mean_diff, se_diff = tests["p_t"], tests["mean_diff"], tests["se_diff"]
    beyond = bool(p < 0.05)
    sign = "beat" if mean_diff > 0 else "did not beat"
    line = (f"best auxiliary-gene trial ({a['param.method']}, {a['trial_id']}: cv_pcc {a['cv_pcc']:.4f} +- "
            f"{a['cv_pcc_se']:.4f}) {sign} the best PGL trial ({b['trial_id']}: {b['cv_pcc']:.4f} +- "
            f"{b['cv_pcc_se']:.4f}) by {mean_diff:+.4f} +- {se_diff:.4f} over {len(folds)} paired folds "
            f"(one-sided paired t-test p = {p:.3g}): "
            + ("beyond the fold noise" if beyond else "within the fold noise"))
    return {"aux_trial": a["trial_id"], "pgl_trial": b["trial_id"], "mean_diff": mean_diff, "se_diff": se_diff,
            "n_folds": len(folds), "p_value": p, "beyond_noise": beyond, "line": line}


def write_table(table: pd.DataFrame, out: Path, space: SearchSpace,
                champion: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """trials.csv, trials.png and summary.md.

    The plot groups the trials by method: the objective of each trial with its fold standard error
    as error bars (cross-validated spaces), stopped trials hollow, the champion starred, the y axis
    fitted to the values so differences show; beside it final k against the objective.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv = out / TABLE_CSV
    atomic_write_text(csv, table.to_csv(index=False))
    png = out / TABLE_PNG
    key = space.metric if space.metric in table.columns else "val_pcc"
    err_key = f"{key}_se" if f"{key}_se" in table.columns else None
    best = best_trial(table, space) if len(table) else None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    if len(table):
        method = table["param.method"].astype(str) if "param.method" in table else pd.Series(["?"] * len(table))
        names = sorted(set(method))
        colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
        x, labels = 0, []
        for name in names:
            rows = table[method == name]
            for _, row in rows.iterrows():
                filled = row["status"] == "finished"
                ax1.errorbar([x], [row[key]], yerr=None if err_key is None else [[row[err_key]], [row[err_key]]],
                             fmt="o", color=colors[name], mfc=colors[name] if filled else "white", capsize=3)
                if best and row["trial_id"] == best["trial_id"]:
                    ax1.plot([x], [row[key]], marker="*", ms=18, color="gold", mec="black", zorder=5,
                             label="champion (refit on all non-test slides)" if space.cv else "champion")
                labels.append(f"{name}\n{str(row['trial_id'])[-4:]}")
                x += 1
            ax2.scatter(rows["final_k"], rows[key], color=colors[name], label=name)
        ax1.set_xticks(range(len(labels)), labels, fontsize=7)
        values = table[key].dropna()
        if len(values):
            spread = table[err_key].fillna(0) if err_key else 0
            low = float((table[key] - spread).min())
            high = float((table[key] + spread).max())
            pad = max(0.1 * (high - low), 1e-3)
            ax1.set_ylim(low - pad, high + pad)   # not from 0: the differences are what matters
        ax1.legend(fontsize=7, loc="lower right")
        ax2.legend(fontsize=7)
    what = "mean held-out-slide PCC over folds (+- s.e.)" if space.cv else "best validation PCC"
    ax1.set_ylabel(what, fontsize=8)
    ax1.set_title("trials by method (filled: finished, hollow: stopped early)", fontsize=9)
    ax2.set_xscale("symlog")
    ax2.set_xlabel("final k (auxiliary genes kept)")
    ax2.set_ylabel(key)
    ax2.set_title("k vs objective", fontsize=9)
    fig.tight_layout()
    try:
        atomic_savefig(fig, png, format="png")
    finally:
        plt.close(fig)
    md = out / SUMMARY_MD
    atomic_write_text(md, format_table(table, best, space, champion) + "\n")
    return {"table_csv": csv, "table_png": png, "summary_md": md}


def by_method(table: pd.DataFrame, space: SearchSpace) -> pd.DataFrame:
    """The best finished trial of each method (objective +- s.e., test metrics, k), best first."""
    key = space.metric if space.metric in table.columns else "val_pcc"
    if not len(table) or "param.method" not in table:
        return pd.DataFrame()
    done = table[table["status"] == "finished"]
    cols = ["param.method", "trial_id", key] + ([f"{key}_se"] if f"{key}_se" in table else []) + ["final_k"]
    best = done.groupby("param.method", sort=False).head(1)[cols]
    counts = table.groupby("param.method")["trial_id"].count().rename("trials")
    return best.join(counts, on="param.method").rename(columns={"param.method": "method"}).reset_index(drop=True)


def format_table(table: pd.DataFrame, best: Mapping[str, Any] | None, space: SearchSpace | None = None,
                 champion: Mapping[str, Any] | None = None) -> str:
    """The sweep summary for the terminal and summary.md: trials, best per method, the PGL comparison,
    the champion (and, for cross-validated sweeps, its refit score on the test part)."""
    if not len(table):
        return "no trials ran"
    key = space.metric if space is not None and space.metric in table.columns else "val_pcc"
    cols = ["trial_id", "status"] + [c for c in table.columns if c.startswith("param.")] + \
           ([key, f"{key}_se", "folds_done"] if key != "val_pcc" else ["val_pcc", "test_pcc"]) + ["final_k", "epochs_run"]
    view = table[[c for c in cols if c in table.columns]].rename(columns=lambda c: c.removeprefix("param."))
    text = view.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")
    if "error" in table:  # why each failed trial failed (a diverged one: its NonFiniteLossError)
        for _, row in table[table["error"].fillna("").astype(str) != ""].iterrows():
            text += f"\n{row['trial_id']} {row['status']}: {str(row['error'])[:300]}"
    if space is not None:
        methods = by_method(table, space)
        if len(methods):
            text += "\n\nbest finished trial per method:\n" + methods.to_string(
                index=False, float_format=lambda v: f"{v:.4f}")
        verdict = compare_with_pgl(table, space)
        if verdict:
            text += "\n\n" + verdict["line"]
    if best:
        params = ", ".join(f"{k.removeprefix('param.')}={v}" for k, v in best.items()
                           if k.startswith("param.") and v is not None)
        score = best.get(key)
        text += f"\n\nbest trial {best['trial_id']}: {key} {score:.4f}"
        if best.get(f"{key}_se") is not None:
            text += f" +- {best[f'{key}_se']:.4f}"
        if key == "val_pcc":
            text += f", test PCC {best.get('test_pcc') or float('nan'):.4f}"
        text += f", k {best.get('final_k')} ({params})"
    if champion:
        m = champion["metrics"]
        text += (f"\nchampion: refit of {champion['trial_id']} on every non-test spot of {space.split if space else ''}, "
                 f"scored once on its test part: test PCC {m.get('test_pcc', float('nan')):.4f}, "
                 f"k {int(m.get('final_k', 0))} ({champion['folder']})")
    return text
