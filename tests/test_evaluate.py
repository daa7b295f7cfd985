"""Evaluation grids on the real demo store: table, Wilcoxon against scipy, plots, resumption."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from agl.data.store import open_store
from agl.errors import ConfigError, OutputExistsError
from agl.evaluation.protocol import (build_grid, evaluate, parse_method, protocol_splits, split_methods, summary_table,
                          wilcoxon_table)
from trainkit import use_cheap_features

BASE = {"epochs": 2, "patience": 5, "trunk": [16], "batch_size": 128, "bilevel_batch_size": 256,
        "device": "cpu", "weights": None}


def test_method_specs():
    assert parse_method("topk:k=100") == ("topk:k=100", {"method": "topk", "k": 100})
    assert parse_method("dkgsb:hard=true:prior_weight=0.5")[1] == {"method": "dkgsb", "hard": True, "prior_weight": 0.5}
    assert split_methods("pgl, agl_all,topk:k=5") == ["pgl", "agl_all", "topk:k=5"]
    with pytest.raises(ConfigError, match="key=value"):
        parse_method("topk:100")
    with pytest.raises(ConfigError, match="twice"):
        split_methods("pgl,pgl")


def test_protocol_splits_and_bad_options(demo_store):
    names = open_store(demo_store).split_names
    assert protocol_splits(names, "kfold", 1) == [f"kfold-s1-f{f}" for f in range(5)]
    assert protocol_splits(names, "spatial", 0, folds=[2]) == ["spatial-s0-f2"]
    assert all(n.startswith("loso-") for n in protocol_splits(names, "loso", 0))
    with pytest.raises(ConfigError, match="no kfold splits for seed 7"):
        protocol_splits(names, "kfold", 7)
    with pytest.raises(ConfigError, match="--methods topk:k=-3: k: must be"):
        build_grid(names, "kfold", [0], ["topk:k=-3"], BASE, folds=[0])
    with pytest.raises(ConfigError, match="unknown setting"):
        build_grid(names, "kfold", [0], ["pgl:kk=3"], BASE, folds=[0])


def test_tiny_grid_writes_table_wilcoxon_plots_and_resumes(demo_store, tmp_path, monkeypatch, caplog):
    use_cheap_features(monkeypatch)
    monkeypatch.setattr("agl.evaluation.protocol.prepare_inputs", lambda store, specs: None)  # no CNN cache in tests
    store = open_store(demo_store)
    methods = ["pgl", "topk:k=200", "dkgsb"]
    summary = evaluate(store, "kfold", [0, 1], methods, tmp_path, base=BASE, jobs=1, folds=[0])
    records = summary["records"]
    assert len(records) == 6
    table = pd.read_csv(tmp_path / "table.csv")
    assert list(table["method"]) == methods and (table["n_runs"] == 2).all()
    pgl = [r["pcc"] for r in records if r["method"] == "pgl"]
    assert table.loc[0, "pcc_mean"] == pytest.approx(np.mean(pgl))
    assert table.loc[0, "pcc_std"] == pytest.approx(np.std(pgl, ddof=1))
    md = (tmp_path / "table.md").read_text()
    assert "± " in md and "Wilcoxon" in md
    for png in ("pcc_bars.png", "gene_scatter_vs_pgl.png", "k_trajectories.png"):
        assert (tmp_path / png).stat().st_size > 1000

    # Wilcoxon: per-gene PCC averaged over the two matched runs, tested with scipy directly
    wil = pd.read_csv(tmp_path / "wilcoxon.csv")
    assert list(wil["method"]) == ["topk:k=200", "dkgsb"]
    by = lambda label: pd.concat([pd.Series(r["per_gene_pcc"]) for r in records if r["method"] == label], axis=1).mean(axis=1)
    both = pd.concat([by("topk:k=200").rename("m"), by("pgl").rename("r")], axis=1).dropna()
    expected = wilcoxon(both["m"], both["r"])
    row = wil.iloc[0]
    assert row["n_genes"] == len(both) and row["p_value"] == pytest.approx(expected.pvalue)
    assert row["statistic"] == pytest.approx(expected.statistic)
    assert row["wins"] + row["losses"] <= len(both)

    # rerun: everything is found finished, nothing retrains
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/**/result.json")}
    caplog.set_level("INFO", logger="agl.evaluation.protocol")
    again = evaluate(store, "kfold", [0, 1], methods, tmp_path, base=BASE, jobs=1, folds=[0])
    assert len(again["records"]) == 6 and "6 already finished" in caplog.text
    assert mtimes == {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/**/result.json")}
    # the same folder with another configuration is refused rather than mixed
    with pytest.raises(OutputExistsError, match="different configuration"):
        evaluate(store, "kfold", [0], ["pgl"], tmp_path, base={**BASE, "epochs": 3}, jobs=1, folds=[0])


def test_summaries_from_records():
    recs = [{"method": m, "split": "s", "seed": s, "k": 1, "epochs": 2, "wall_time_s": 1.0, "pcc": p, "scc": p,
             "mse": 1 - p, "per_gene_pcc": {"A": p, "B": p + 0.1, "C": p - 0.05}}
            for m, s, p in [("pgl", 0, 0.2), ("pgl", 1, 0.3), ("x", 0, 0.25), ("x", 1, 0.35)]]
    table = summary_table(recs, ["pgl", "x"])
    assert table["pcc_mean"].tolist() == pytest.approx([0.25, 0.30])
    wil = wilcoxon_table(recs, ["pgl", "x"])
    assert wil.loc[0, "wins"] == 3 and wil.loc[0, "mean_diff"] == pytest.approx(0.05)
    json.dumps(recs)  # records are plain JSON
