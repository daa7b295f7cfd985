"""``agl train`` and ``agl evaluate`` through the real command line entry point (in-process)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from agl.cli import main
from trainkit import first_split, use_cheap_features

FAST = ["--set", "epochs=2", "--set", "trunk=[16]", "--set", "device=cpu", "--set", "weights=null",
        "--set", "bilevel_batch_size=256"]


@pytest.fixture
def cheap(monkeypatch):
    use_cheap_features(monkeypatch)
    monkeypatch.setattr("agl.evaluation.protocol.prepare_inputs", lambda store, specs: None)


def test_train_writes_outputs_and_refuses_overwrite(demo_store, tmp_path, cheap, capsys):
    out = tmp_path / "run"
    split = first_split(demo_store)
    args = ["train", "--store", str(demo_store), "--method", "dkgsb", "--split", split, "--out", str(out), *FAST]
    assert main(args) == 0
    result = json.loads((out / "result.json").read_text())
    for key in ("method", "split", "seed", "k", "pcc", "scc", "mse", "per_slide", "epochs", "wall_time_s",
                "selected_aux_genes", "per_gene_pcc"):
        assert key in result, key
    assert result["method"] == "dkgsb" and result["split"] == split and result["epochs"] == 2
    assert set(result["per_slide"]) and all("pcc" in v for v in result["per_slide"].values())
    from agl import runs

    table = pd.read_csv(out / "gene_set.csv")
    assert list(table.columns) == runs.GENE_COLUMNS and result["schema_version"] == runs.SCHEMA_VERSION
    selected = runs.selected_aux(table)
    assert len(selected) == result["k"] == result["selected_aux_genes"] == result["n_selected"]
    assert selected["prior_rank"].is_monotonic_increasing
    assert (out / "checkpoint" / "best.safetensors").is_file()
    for png in ("k_trajectory.png", "per_gene_pcc.png"):
        assert (out / png).stat().st_size > 1000
    assert "test PCC" in capsys.readouterr().out

    from agl.fileio import output_owner

    assert output_owner(out) == "train"
    before = (out / "result.json").read_text()
    assert main(args) == 1  # an existing output is a runtime failure
    assert "result.json: exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "result.json").read_text() == before
    assert main([*args, "--overwrite", "--set", "seed=1"]) == 0  # its own earlier run: replaced whole
    assert json.loads((out / "result.json").read_text())["seed"] == 1
    assert output_owner(out) == "train" and (out / "checkpoint" / "best.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary run was swapped in


def test_train_rejects_bad_settings(demo_store, tmp_path, cheap, capsys):
    base = ["train", "--store", str(demo_store), "--split", first_split(demo_store), "--out", str(tmp_path / "x")]
    assert main([*base, "--method", "dkgsb", "--set", "tua=0.1"]) == 2
    assert "unknown setting(s) tua" in capsys.readouterr().err
    assert main([*base, "--method", "topk:k=-5"]) == 2
    assert "k: must be an integer >= 0" in capsys.readouterr().err
    bad = tmp_path / "cfg.yaml"
    bad.write_text("lr: [1, 2\n")
    assert main([*base, "--method", "pgl", "--config", str(bad)]) == 2
    assert "cfg.yaml: not valid YAML/JSON" in capsys.readouterr().err
    assert not (tmp_path / "x" / "result.json").exists()


def test_config_file_and_set_precedence(demo_store, tmp_path, cheap):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"epochs": 5, "trunk": [16], "lr": 0.002}))
    out = tmp_path / "run"
    assert main(["train", "--store", str(demo_store), "--method", "topk:k=50", "--split", first_split(demo_store),
                 "--out", str(out), "--config", str(cfg), *FAST]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["epochs"] == 2 and result["config"]["lr"] == 0.002 and result["k"] == 50


def test_evaluate_cli_tiny_grid(demo_store, tmp_path, cheap, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--store", str(demo_store), "--protocol", "kfold", "--seeds", "0", "--folds", "0",
                 "--methods", "pgl,agl_all", "--out", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert "| pgl |" in text and "Wilcoxon" in text
    assert (out / "table.csv").is_file() and (out / "wilcoxon.csv").is_file()


def test_val_outer_fraction_flag(tmp_path, capsys):
    from agl.cli import build_parser
    from agl.commands import base_settings

    for cmd in (["train", "--method", "dkgsb", "--split", "kfold-s0-f0", "--out", str(tmp_path / "r")],
                ["evaluate", "--protocol", "kfold", "--methods", "dkgsb", "--out", str(tmp_path / "e")]):
        args = build_parser().parse_args([cmd[0], "--store", "demo", *cmd[1:], "--val-outer-fraction", "0.4"])
        assert base_settings(args)["val_outer_fraction"] == 0.4
    assert main(["train", "--store", "demo", "--method", "dkgsb", "--split", "kfold-s0-f0", "--out",
                 str(tmp_path / "bad"), "--val-outer-fraction", "1.5"]) == 2
    assert "--val-outer-fraction" in capsys.readouterr().err and not (tmp_path / "bad").exists()
