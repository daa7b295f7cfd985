"""Figures of runs and evaluations (matplotlib, headless); every PNG is written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from agl.fileio import atomic_savefig  # noqa: E402


def _save(fig: "plt.Figure", path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    try:
        return atomic_savefig(fig, path, dpi=110)
    finally:
        plt.close(fig)


def plot_k_trajectories(trajectories: Mapping[str, Sequence[Sequence[float]]], path: str | Path,
                        n_aux: int | None = None, title: str = "Auxiliary genes kept (k) per epoch") -> Path:
    """One line per run, one colour per label: ``{label: [k per epoch, ...runs]}``."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(trajectories.items()):
        for j, ks in enumerate(runs):
            ax.plot(np.arange(1, len(ks) + 1), ks, color=colours[i % len(colours)], alpha=0.6, lw=1.2,
                    label=label if j == 0 else None)
    if n_aux:
        ax.axhline(n_aux, color="grey", ls=":", lw=1, label=f"all auxiliary genes ({n_aux})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("k (auxiliary genes with weight > 0.5)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_k_and_val_pcc(history: Sequence[Mapping[str, float]], path: str | Path, title: str = "k per epoch") -> Path:
    """One run: k (auxiliary genes kept) and validation PCC per epoch; rows carry 1-based ``epoch``."""
    epochs = [int(h["epoch"]) for h in history]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(epochs, [h.get("k", np.nan) for h in history], "o-", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("k (auxiliary genes kept)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h.get("val_pcc", np.nan) for h in history], "s--", color="tab:red")
    ax2.set_ylabel("validation PCC", color="tab:red")
    ax.set_title(title)
    return _save(fig, path)


def plot_per_gene_pcc(per_gene_pcc: Sequence[float], genes: Sequence[str], path: str | Path,
                      title: str = "Test PCC per primary gene") -> Path:
    """Sorted bar chart of the per-gene test PCC."""
    values = np.asarray(per_gene_pcc, dtype=float)
    order = np.argsort(-np.nan_to_num(values, nan=-2))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * len(values)), 4.0))
    ax.bar(np.arange(len(values)), values[order], color="#4c72b0")
    ax.set_xticks(np.arange(len(values)))
    ax.set_xticklabels([genes[i] for i in order], rotation=90, fontsize=6)
    ax.axhline(np.nanmean(values), color="k", ls="--", lw=1, label=f"mean {np.nanmean(values):.3f}")
    ax.set_ylabel("PCC")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_method_bars(table: pd.DataFrame, path: str | Path, metric: str = "pcc") -> Path:
    """Mean ± std of ``metric`` per method (rows of the evaluation table)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(table)), 4.0))
    x = np.arange(len(table))
    mean = table[f"{metric}_mean"].to_numpy(float)
    std = np.nan_to_num(table[f"{metric}_std"].to_numpy(float))  # one run: no spread to draw
    ax.bar(x, mean, yerr=std, capsize=3, color="#4c72b0")
    ax.set_xticks(x)
    ax.set_xticklabels(table["method"], rotation=35, ha="right", fontsize=8)
    ends = np.concatenate([mean - std, mean + std])
    ends = ends[np.isfinite(ends)]
    if len(ends):  # a method whose every run is undefined (NaN) has no bar and sets no limit
        low, high = float(ends.min()), float(ends.max())
        pad = 0.1 * (high - low) if high > low else 0.01
        ax.set_ylim(low - pad, high + pad)
    ax.set_ylabel(f"test {metric.upper()} (mean ± std over runs)")
    ax.set_title(f"Test {metric.upper()} of the primary genes per method")
    return _save(fig, path)


def plot_gene_scatter(reference: pd.Series, others: Mapping[str, pd.Series], path: str | Path,
                      reference_name: str = "reference") -> Path:
    """Per-gene PCC of each method (y) against the reference method (x); points above the diagonal win."""
    n = max(len(others), 1)
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (label, series) in zip(axes.flat, others.items()):
        both = pd.concat([reference.rename("ref"), series.rename("other")], axis=1).dropna()
        ax.scatter(both["ref"], both["other"], s=8, alpha=0.7)
        lo, hi = float(both.min().min()), float(both.max().max())
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
        wins = int((both["other"] > both["ref"]).sum())
        ax.set_title(f"{label}: {wins}/{len(both)} genes above", fontsize=8)
        ax.set_xlabel(f"{reference_name} PCC", fontsize=8)
        ax.set_ylabel(f"{label} PCC", fontsize=8)
    for ax in list(axes.flat)[len(others):]:
        ax.axis("off")
    return _save(fig, path)


def plot_k_curve(curves: Mapping[str, pd.DataFrame], path: str | Path, *, n_aux: int,
                 lines: Mapping[str, tuple[float, float]] = {}, points: Mapping[str, tuple[float, float, float, float]] = {},
                 title: str = "Test PCC against the number of auxiliary genes k",
                 ylabel: str = "test PCC, primary genes (mean ± std over runs)") -> Path:
    """PCC-vs-k curves (``{label: DataFrame(k, mean, std)}``, std as a band) on a log k axis.

    ``lines``: horizontal references ``{label: (mean, std)}`` (e.g. PGL; std is not drawn); ``points``: single
    methods placed on the curve ``{label: (k_mean, k_std, pcc_mean, pcc_std)}`` (e.g. DkGSB's learned k).
    """
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, df) in enumerate(curves.items()):
        df = df.sort_values("k")
        k, mean, std = (df[c].to_numpy(float) for c in ("k", "mean", "std"))
        std = np.nan_to_num(std)
        ax.plot(k, mean, "o-", color=colours[i % len(colours)], label=label, lw=1.5, ms=4)
        ax.fill_between(k, mean - std, mean + std, color=colours[i % len(colours)], alpha=0.15)
    styles = ["--", ":", "-."]
    for i, (label, (mean, std)) in enumerate(lines.items()):
        ax.axhline(mean, color="black", ls=styles[i % len(styles)], lw=1, label=f"{label} ({mean:.4f})")
    for i, (label, (k_mean, k_std, mean, std)) in enumerate(points.items()):
        ax.errorbar([k_mean], [mean], xerr=[np.nan_to_num(k_std)], yerr=[np.nan_to_num(std)], fmt="*", ms=12,
                    color=colours[(len(curves) + i) % len(colours)], capsize=3, label=f"{label} (k = {k_mean:.0f})")
    ax.axvline(n_aux, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel(f"k, auxiliary genes used (of {n_aux}; all = AGL-all)")
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)
