"""What a sweep's best trials agree on: the gene-consensus table of the parent run.

For each auxiliary gene: in how many of the top-n finished trials (ranked by the sweep's objective)
it was selected, and its mean final weight over those trials. The consensus set is the genes
selected by at least half of them (the same majority rule a cross-validated trial applies to its
folds, :func:`agl.distributed.cv.consensus_genes`). Written as ``OUT/gene_consensus.csv`` and
``OUT/gene_consensus.png`` and logged to the sweep's parent run (CSV, PNG, and the table through
the tracker's ``log_table``, which MLflow's UI renders as a table).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from agl.fileio import atomic_savefig, atomic_write_text

log = logging.getLogger(__name__)

CONSENSUS_CSV = "gene_consensus.csv"
CONSENSUS_PNG = "gene_consensus.png"
CONSENSUS_TABLE_ARTIFACT = "gene_consensus.json"   # the tracker's table view of the CSV
CONSENSUS_COLUMNS = ["gene", "prior_rank", "trials_selected", "top_trials", "fraction_selected",
                     "mean_final_weight", "in_consensus"]
DEFAULT_TOP = 5


def top_trials(table: pd.DataFrame, metric: str, mode: str, top: int) -> list[str]:
    """The ids of the ``top`` best finished trials with a finite objective, best first."""
    if not len(table) or metric not in table:
        return []
    done = table[(table["status"] == "finished") & pd.to_numeric(table[metric], errors="coerce").notna()]
    return done.sort_values(metric, ascending=mode == "min", kind="stable")["trial_id"].astype(str).head(top).tolist()


def gene_consensus(gene_tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The consensus table of the given trials' gene tables (agl.runs.GENE_COLUMNS), one row per auxiliary gene,
    most often selected first (then by mean final weight, then prior rank)."""
    rows = []
    for trial_id, genes in gene_tables.items():
        aux = genes[genes["role"] == "auxiliary"]
        rows.append(pd.DataFrame({"gene": aux["gene"].astype(str).to_numpy(), "trial_id": trial_id,
                                  "prior_rank": pd.to_numeric(aux["prior_rank"], errors="coerce").to_numpy(),
                                  "selected": aux["selected"].astype(bool).to_numpy(),
                                  "final_weight": pd.to_numeric(aux["final_weight"], errors="coerce").to_numpy()}))
    if not rows:
        return pd.DataFrame(columns=CONSENSUS_COLUMNS)
    every = pd.concat(rows, ignore_index=True)
    grouped = every.groupby("gene", sort=False)
    n = len(gene_tables)
    table = pd.DataFrame({
        "prior_rank": grouped["prior_rank"].min(),
        "trials_selected": grouped["selected"].sum().astype(int),
        "top_trials": n,
        "mean_final_weight": grouped["final_weight"].mean(),   # NaN weights (gates without them) left out
    })
    table["fraction_selected"] = table["trials_selected"] / n
    table["in_consensus"] = table["trials_selected"] * 2 >= n
    table = table.reset_index().sort_values(["trials_selected", "mean_final_weight", "prior_rank"],
                                            ascending=[False, False, True], na_position="last", kind="stable")
    return table[CONSENSUS_COLUMNS].reset_index(drop=True)


def write_consensus(consensus: pd.DataFrame, out: Path, trial_ids: list[str], show: int = 40) -> dict[str, str]:
    """OUT/gene_consensus.csv and a PNG: the ``show`` most often selected genes, selection count and mean weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv, png = out / CONSENSUS_CSV, out / CONSENSUS_PNG
    atomic_write_text(csv, consensus.to_csv(index=False))
    head = consensus[consensus["trials_selected"] > 0].head(show)
    n = len(trial_ids)
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.22 * len(head) + 1.2)))
    try:
        if len(head):
            y = np.arange(len(head))[::-1]
            colors = ["tab:blue" if c else "tab:gray" for c in head["in_consensus"]]
            ax.barh(y, head["trials_selected"], color=colors)
            ax.set_yticks(y, head["gene"], fontsize=7)
            ax.axvline(n / 2, color="k", lw=0.8, ls="--")
            for yi, (count, weight) in zip(y, zip(head["trials_selected"], head["mean_final_weight"])):
                if not (isinstance(weight, float) and math.isnan(weight)):
                    ax.text(count, yi, f" w={weight:.2f}", va="center", fontsize=6)
        else:
            ax.text(0.5, 0.5, "no auxiliary gene selected by the top trials", ha="center", transform=ax.transAxes)
        ax.set_xlim(0, max(n, 1) * 1.15)
        ax.set_xlabel(f"selected in how many of the top {n} trials (dashed: half; blue: consensus)")
        ax.set_title(f"gene consensus of the sweep's top {n} trials: {int(consensus['in_consensus'].sum())} genes")
        fig.tight_layout()
        atomic_savefig(fig, png, dpi=110)
    finally:
        plt.close(fig)
    return {"consensus_csv": str(csv), "consensus_png": str(png)}


def sweep_consensus(grid: Any, table: pd.DataFrame, metric: str, mode: str, out: Path, top: int = DEFAULT_TOP
                    ) -> dict[str, Any] | None:
    """The consensus of a finished sweep's top trials, read from their checkpoints (gene_set.csv);
    written to OUT; returns {trials, size, paths, table} or None when no top trial holds a gene table."""
    from agl.distributed.results import trial_id_of
    from agl.runs import read_gene_table

    wanted = top_trials(table, metric, mode, top)
    by_id = {trial_id_of(r): r for r in grid}
    gene_tables: dict[str, pd.DataFrame] = {}
    for trial_id in wanted:
        result = by_id.get(trial_id)
        if result is None or result.checkpoint is None:
            continue
        with result.checkpoint.as_directory() as local:
            genes = read_gene_table(local)
        if genes is not None:
            gene_tables[trial_id] = genes
    if not gene_tables:
        log.warning("no gene table in the sweep's top trials; no gene consensus")
        return None
    consensus = gene_consensus(gene_tables)
    paths = write_consensus(consensus, out, list(gene_tables))
    return {"trials": list(gene_tables), "size": int(consensus["in_consensus"].sum()), "paths": paths,
            "table": consensus}


def log_consensus(tracker: Any, parent_run_id: str, found: Mapping[str, Any]) -> None:
    """The consensus CSV/PNG as artifacts of the parent run and the table through the tracker's log_table."""
    tracker.log_table(parent_run_id, found["table"], CONSENSUS_TABLE_ARTIFACT,
                      files=[Path(p) for p in found["paths"].values()])


__all__ = ["CONSENSUS_CSV", "CONSENSUS_PNG", "gene_consensus", "log_consensus", "sweep_consensus", "top_trials",
           "write_consensus"]
