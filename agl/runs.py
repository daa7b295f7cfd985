"""The run record: one writer for every run folder, whoever trained it.

``agl train``, each ``agl evaluate`` grid run, each sweep trial (and each fold of a
cross-validated trial), the sweep's refit champion and ``agl tune-sync`` all write and read
the same files, in the same schema:

- ``result.json`` (:data:`SCHEMA_VERSION`): what was run (method, split, seed, config), the
  test metrics and per-slide/per-gene detail, ``metrics`` (the scalars a tracker logs:
  ``best_val_pcc``, ``best_epoch``, ``epochs_run``, ``final_k``, ``n_selected``, ``test_*``),
  the gene set's hash and first genes, and the history. Epochs are 1-based everywhere a user
  reads them (history rows, ``best_epoch``, plots, tracker steps);
- ``gene_set.csv``: one row per gene of the run's gene set: ``gene, role, prior_rank,
  final_weight, selected`` (primary genes first, then auxiliary genes by prior rank;
  ``prior_rank`` is 1 for the best-ranked auxiliary gene);
- ``k_trajectory.png`` (k and validation PCC per epoch) and ``per_gene_pcc.png``.

``result.json`` is written last: its presence marks a finished record.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from agl.errors import DataError
from agl.fileio import atomic_write_json, atomic_write_text, jsonable

SCHEMA_VERSION = 1
RESULT_JSON = "result.json"
GENE_SET_CSV = "gene_set.csv"
K_PLOT = "k_trajectory.png"
PER_GENE_PLOT = "per_gene_pcc.png"
RECORD_FILES = (GENE_SET_CSV, K_PLOT, PER_GENE_PLOT, RESULT_JSON)
GENE_COLUMNS = ["gene", "role", "prior_rank", "final_weight", "selected"]
TEST_METRICS = ("pcc", "scc", "mse")
FIRST_GENES = 10      # selected genes named in the record (and as tracker tags), best prior rank first


def gene_set_hash(names: Iterable[str]) -> str:
    """sha256 of the sorted gene names, one per line: identifies a selected set regardless of order."""
    return hashlib.sha256("\n".join(sorted(map(str, names))).encode()).hexdigest()


def prior_ranks(result: Any, data: Any) -> np.ndarray:
    """The auxiliary genes' prior rank as the run's gate used it (its blended ``ranks``), else the
    blend of the config's priors; 1 = best. NaN where the gene set has no such prior."""
    from agl.selection.base import blend_ranks
    from agl.errors import ConfigError

    n_aux = len(data.genes) - int(data.n_primary)
    ranks = getattr(result.gate, "ranks", None)
    if ranks is not None and ranks.numel() == n_aux and n_aux:
        scores = ranks.detach().cpu().double().numpy()
    else:
        cfg = result.config
        try:
            scores = blend_ranks(data.prior_ranks, n_aux, cfg.prior, cfg.second_prior, cfg.prior_weight).numpy()
        except ConfigError:
            return np.full(n_aux, np.nan)
    order = np.argsort(scores, kind="stable")
    out = np.empty(n_aux, dtype=np.float64)
    out[order] = np.arange(1, n_aux + 1)
    return out


def gene_table(result: Any, data: Any) -> pd.DataFrame:
    """gene, role, prior_rank, final_weight, selected for every gene of the run (see the module doc)."""
    genes = data.genes["gene"].astype(str).to_numpy()
    n_primary = int(data.n_primary)
    n_aux = len(genes) - n_primary
    weights = np.asarray(result.weights, dtype=np.float64).reshape(-1)
    if len(weights) != n_aux:
        weights = np.full(n_aux, np.nan)
    selected = np.zeros(n_aux, dtype=bool)
    selected[np.asarray(result.selected, dtype=np.int64).reshape(-1)] = True
    primary = pd.DataFrame({"gene": genes[:n_primary], "role": "primary", "prior_rank": np.nan,
                            "final_weight": 1.0, "selected": True})
    aux = pd.DataFrame({"gene": genes[n_primary:], "role": "auxiliary", "prior_rank": prior_ranks(result, data),
                        "final_weight": weights, "selected": selected})
    aux = aux.sort_values(["prior_rank", "gene"], kind="stable")
    return pd.concat([primary, aux], ignore_index=True)[GENE_COLUMNS]


def selected_aux(table: pd.DataFrame) -> pd.DataFrame:
    """The selected auxiliary genes of a gene table, best prior rank first."""
    return table[(table["role"] == "auxiliary") & table["selected"].astype(bool)]


def gene_set_fields(table: pd.DataFrame) -> dict[str, Any]:
    """The record's summary of a gene table: hash, size and first genes of the selected auxiliary set."""
    chosen = selected_aux(table)["gene"].astype(str)
    return {"gene_set_sha256": gene_set_hash(chosen), "n_selected": int(len(chosen)),
            "first_genes": chosen.iloc[:FIRST_GENES].tolist()}


def one_based(history: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """History rows with 1-based ``epoch`` (fit counts from 0)."""
    return [{**row, "epoch": int(row["epoch"]) + 1} if "epoch" in row else dict(row) for row in history]


def final_metrics(result: Any) -> dict[str, float]:
    """The scalars of a FitResult a tracker logs at the end of a run (test_* from the best epoch's model)."""
    out = {"best_val_pcc": float(result.best_val_pcc), "best_epoch": float(result.best_epoch + 1),
           "epochs_run": float(result.epochs_run), "final_k": float(result.k),
           "n_selected": float(len(np.atleast_1d(result.selected))), "wall_time_s": float(result.wall_time_s)}
    test = result.test if isinstance(result.test, Mapping) else {}
    for key in TEST_METRICS:
        value = test.get(key)
        if isinstance(value, (int, float, np.floating, np.integer)):
            out[f"test_{key}"] = float(value)
    return out


def run_record(result: Any, data: Any, split: str, label: str | None, table: pd.DataFrame) -> dict[str, Any]:
    """The result.json of one fit (see the module doc)."""
    test = result.test if isinstance(result.test, Mapping) else {}
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "kind": "run",
        "method": label or result.config.method, "method_name": result.config.method, "split": split,
        "seed": result.config.seed, "metrics": final_metrics(result),
        "k": result.k, "n_aux": int(len(data.genes) - data.n_primary), "selected_aux_genes": int(len(result.selected)),
        "epochs": result.epochs_run, "best_epoch": result.best_epoch + 1, "best_val_pcc": result.best_val_pcc,
        "stopped_early": result.stopped_early, "wall_time_s": result.wall_time_s,
        **gene_set_fields(table),
    }
    for key in TEST_METRICS:
        if key in test:
            record[key] = test[key]
    if "per_slide" in test:
        record["per_slide"] = test["per_slide"]
    if "per_gene_pcc" in test and "genes" in test:
        record["per_gene_pcc"] = dict(zip(test["genes"], np.asarray(test["per_gene_pcc"], dtype=float).tolist()))
    record["history"] = one_based(result.history)
    record["config"] = result.config.to_dict()
    return jsonable(record)


def write_record(folder: str | Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``result.json`` (with the schema version), atomically; return what was written."""
    record = {"schema_version": SCHEMA_VERSION, **record}
    atomic_write_json(Path(folder) / RESULT_JSON, record, indent=1)
    return record


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The run record in ``folder`` (None if there is none); an unknown schema is a DataError."""
    path = Path(folder) / RESULT_JSON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(path, f"not valid JSON: {err}") from None
    if not isinstance(record, dict) or record.get("schema_version") != SCHEMA_VERSION:
        raise DataError(path, f"schema_version {record.get('schema_version') if isinstance(record, dict) else None!r} "
                              f"is not the run-record schema this agl reads ({SCHEMA_VERSION})")
    return record


def read_gene_table(folder: str | Path) -> pd.DataFrame | None:
    path = Path(folder) / GENE_SET_CSV
    return pd.read_csv(path) if path.is_file() else None


def write_plots(folder: Path, history: list[Mapping[str, Any]], test: Mapping[str, Any], title: str) -> None:
    """k_trajectory.png (k and validation PCC per 1-based epoch) and, with test detail, per_gene_pcc.png."""
    from agl import plotting

    plotting.plot_k_and_val_pcc(history, folder / K_PLOT, title=f"{title}: k per epoch")
    if "per_gene_pcc" in test and "genes" in test:
        plotting.plot_per_gene_pcc(test["per_gene_pcc"], test["genes"], folder / PER_GENE_PLOT,
                                   title=f"{title}: test PCC per primary gene")


def write_run_record(folder: str | Path, result: Any, data: Any, split: str, label: str | None = None,
                     extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """gene_set.csv, the plots and (last) result.json of one fit in ``folder``; returns the record."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = gene_table(result, data)
    atomic_write_text(folder / GENE_SET_CSV, table.to_csv(index=False))
    record = run_record(result, data, split, label, table)
    test = result.test if isinstance(result.test, Mapping) else {}
    write_plots(folder, record["history"], test, f"{record['method']} on {split}")
    return write_record(folder, {**record, **(dict(extra) if extra else {})})


def finalize_run(result: Any, data: Any, dest: str | Path, split: str, label: str | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Copy fit's checkpoint folder to ``dest`` and write the run record beside it; return the record."""
    dest = Path(dest)
    if result.checkpoint_dir is not None:
        shutil.copytree(result.checkpoint_dir, dest, dirs_exist_ok=True)
    return write_run_record(dest, result, data, split, label, extra)


__all__ = ["FIRST_GENES", "GENE_COLUMNS", "GENE_SET_CSV", "K_PLOT", "PER_GENE_PLOT", "RECORD_FILES", "RESULT_JSON",
           "SCHEMA_VERSION", "final_metrics", "finalize_run", "gene_set_fields", "gene_set_hash", "gene_table",
           "one_based", "read_gene_table", "read_record", "run_record", "selected_aux", "write_plots", "write_record",
           "write_run_record"]
