"""The sweep's gene consensus: on a constructed sweep with known selections, the counts, mean weights and the
consensus set are exact, the files are written and the parent run gets the table (memory and MLflow trackers)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from agl.distributed.consensus import CONSENSUS_CSV, CONSENSUS_PNG, log_consensus, sweep_consensus


def real_genes(demo_store: Path, n: int) -> list[str]:
    from agl.data.store import open_store

    return open_store(demo_store).genes["name"].astype(str).head(n).tolist()


def gene_table(primary: list[str], aux: list[str], selected: set[str], weights: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"gene": g, "role": "primary", "prior_rank": np.nan, "final_weight": 1.0, "selected": True} for g in primary]
        + [{"gene": g, "role": "auxiliary", "prior_rank": i + 1, "final_weight": weights.get(g, 0.0),
            "selected": g in selected} for i, g in enumerate(aux)])


def constructed_sweep(tmp_path: Path, genes: list[str]) -> tuple[list, pd.DataFrame, list[str]]:
    """Six trials: four finished (ranked t1 > t2 > t3 > t4 by cv_pcc), one stopped with the best score and
    one finished but ranked fifth; the last two select gene 5 and must not count."""
    from ray.tune import Checkpoint

    primary, aux = genes[:2], genes[2:8]
    a, b, c, d, e, f = aux
    picks = {  # trial -> (cv_pcc, status, selected, weights)
        "t1": (0.30, "finished", {a, b, c}, {a: 0.9, b: 0.6, c: 0.4}),
        "t2": (0.28, "finished", {a, b}, {a: 0.7, b: 0.5}),
        "t3": (0.25, "finished", {a, d}, {a: 0.8, d: 0.3}),
        "t4": (0.22, "finished", {a}, {a: 0.6}),
        "t5": (0.40, "stopped", {e}, {e: 1.0}),
        "t6": (0.10, "finished", {e, f}, {e: 1.0, f: 1.0}),
    }
    grid, rows = [], []
    for trial_id, (score, status, selected, weights) in picks.items():
        folder = tmp_path / trial_id
        folder.mkdir()
        gene_table(primary, aux, selected, weights).to_csv(folder / "gene_set.csv", index=False)
        grid.append(SimpleNamespace(metrics={"trial_id": trial_id, "cv_pcc": score}, path=str(folder),
                                    checkpoint=Checkpoint.from_directory(str(folder)), error=None))
        rows.append({"trial_id": trial_id, "status": status, "cv_pcc": score})
    return grid, pd.DataFrame(rows).sort_values("cv_pcc", ascending=False), aux


def test_consensus_counts_on_a_constructed_sweep(demo_store: Path, tmp_path: Path) -> None:
    grid, table, aux = constructed_sweep(tmp_path, real_genes(demo_store, 8))
    a, b, c, d, e, f = aux
    out = tmp_path / "out"
    out.mkdir()
    found = sweep_consensus(grid, table, "cv_pcc", "max", out, top=4)
    assert found["trials"] == ["t1", "t2", "t3", "t4"]          # finished trials only, best first
    got = found["table"].set_index("gene")
    assert got["trials_selected"].to_dict() == {a: 4, b: 2, c: 1, d: 1, e: 0, f: 0}
    assert got.loc[a, "mean_final_weight"] == pytest.approx((0.9 + 0.7 + 0.8 + 0.6) / 4)
    assert got.loc[b, "mean_final_weight"] == pytest.approx((0.6 + 0.5) / 4)
    assert set(got.index[got["in_consensus"]]) == {a, b} and found["size"] == 2   # >= half of 4
    assert list(found["table"]["gene"][:2]) == [a, b] and (got["top_trials"] == 4).all()
    assert set(got.index) == set(aux)                             # auxiliary genes only
    written = pd.read_csv(out / CONSENSUS_CSV)
    assert written["trials_selected"].tolist() == found["table"]["trials_selected"].tolist()
    assert (out / CONSENSUS_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # top 2: b is selected in both, so the set grows to the majority of 2 trials: a, b, c
    assert sweep_consensus(grid, table, "cv_pcc", "max", out, top=2)["size"] == 3


def test_consensus_goes_to_the_closed_parent_run(demo_store: Path, tmp_path: Path) -> None:
    from agl.tracking import InMemoryTracker, MlflowTracker

    grid, table, aux = constructed_sweep(tmp_path, real_genes(demo_store, 8))
    out = tmp_path / "out"
    out.mkdir()
    found = sweep_consensus(grid, table, "cv_pcc", "max", out, top=4)
    memory = InMemoryTracker()
    parent = memory.start_sweep(memory.experiment("x"), "sweep", {})
    memory.end_sweep(parent)
    log_consensus(memory, parent, found)
    assert {CONSENSUS_CSV, CONSENSUS_PNG, "gene_consensus.json"} <= set(memory.runs[parent].files)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri)
    parent = tracker.start_sweep(tracker.experiment("x", artifact_root=tmp_path / "art"), "sweep", {})
    tracker.end_sweep(parent)    # the consensus is logged after the parent run ends
    log_consensus(tracker, parent, found)
    names = {a.path for a in tracker.client.list_artifacts(parent)}
    assert {CONSENSUS_CSV, CONSENSUS_PNG, "gene_consensus.json"} <= names
    local = tracker.client.download_artifacts(parent, "gene_consensus.json", str(tmp_path / "dl"))
    logged = json.loads(Path(local).read_text())
    assert logged["columns"][:3] == ["gene", "prior_rank", "trials_selected"] and len(logged["data"]) == len(aux)
