"""``agl ingest`` and ``agl info`` end to end on real her2st files, including failure paths."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from agl.cli import main
from agl.data.store import open_store

FAST = ["--patch-px", "32", "--seeds", "0", "--splits", "kfold", "loso"]


def _layout(her2st_dir: Path, root: Path, sections: list[str], images: bool = True) -> Path:
    """A her2st-layout folder of symlinks to the real files (optionally without images)."""
    for s in sections:
        for rel in (f"ST-cnts/{s}.tsv.gz", f"ST-spotfiles/{s}_selection.tsv"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(her2st_dir / rel, root / rel)
        if images:
            (root / "ST-imgs" / s[0]).mkdir(parents=True, exist_ok=True)
            os.symlink(her2st_dir / "ST-imgs" / s[0] / s, root / "ST-imgs" / s[0] / s)
    return root


def _no_temp_left(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_ingest_then_info(her2st_dir, tmp_path, capsys):
    out = tmp_path / "store"
    rc = main(["ingest", "her2st", str(her2st_dir), "--sections", "C2", "C3", "--out", str(out),
               "--n-primary", "20", "--normalize-total", "10000", "--prior-sections", "A1", *FAST])
    assert rc == 0
    store = open_store(out)
    store.verify()
    assert store.manifest["slides"] == {"C2": 185, "C3": 179}
    assert store.manifest["preprocessing"]["normalize_total"] == 10000.0
    assert store.split_names == [f"kfold-s0-f{f}" for f in range(5)] + ["loso-C2", "loso-C3"]
    assert (store.gene_set("loso-C2")["role"] == "primary").sum() == 20
    assert store.manifest["preprocessing"]["prior_slides"] == ["A1"]
    assert store.gene_set("loso-C2")["rank_coexpr"].notna().sum() > 10000  # co-expression prior from A1
    capsys.readouterr()
    assert main(["info", str(out), "--split", "loso-C3", "--verify"]) == 0
    text = capsys.readouterr().out
    primary = store.gene_set("loso-C3").query("role == 'primary'")["gene"].tolist()
    assert "C2 185, C3 179" in text and f"genes      {store.manifest['n_genes']}" in text
    assert " ".join(primary) in text and "32 x 32 x 3" in text and "kfold x5, loso x2" in text


def test_missing_image_exits_2_and_writes_nothing(her2st_dir, tmp_path, capsys):
    root = _layout(her2st_dir, tmp_path / "her2st", ["C2"], images=False)
    out = tmp_path / "out"
    assert main(["ingest", "her2st", str(root), "--sections", "C2", "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert str(root / "ST-imgs" / "C" / "C2") in err and "missing image" in err
    assert not out.exists()
    _no_temp_left(tmp_path)


def test_existing_output_is_not_overwritten(her2st_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = ["ingest", "her2st", str(her2st_dir), "--sections", "C2", "--out", str(out), *FAST]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 2  # a folder that is not a store is never replaced
    assert "not an agl store" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"


def test_interrupted_ingest_leaves_nothing_and_rerun_completes(her2st_dir, tmp_path, monkeypatch, capsys):
    import agl.data.store as store_mod

    real = store_mod._write_ipc
    calls = []

    def interrupted(*a, **k):  # the patches array is written, then Ctrl-C arrives
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(store_mod, "_write_ipc", interrupted)
    out = tmp_path / "out"
    args = ["ingest", "her2st", str(her2st_dir), "--sections", "C2", "--out", str(out), *FAST]
    assert main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()
    _no_temp_left(tmp_path)

    monkeypatch.setattr(store_mod, "_write_ipc", real)
    assert main(args) == 0
    open_store(out).verify()
    # a second ingest over a finished store is refused, then replaced with --overwrite
    assert main(args) == 2
    assert main(args + ["--overwrite", "--n-primary", "10"]) == 0
    assert (open_store(out).gene_set("kfold-s0-f0")["role"] == "primary").sum() == 10
    _no_temp_left(tmp_path)


def test_bad_arguments(her2st_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["ingest", "her2st", str(her2st_dir), "--sections", "C2", "--out", str(out),
                 "--priors", "hvg", "bogus", *FAST]) == 2
    assert "unknown priors ['bogus']" in capsys.readouterr().err and not out.exists()
    assert main(["info", str(tmp_path)]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err


def test_bench_data_writes_json(small_store, tmp_path, capsys):
    """A smoke run of ``agl bench data`` (figures are printed and saved, never asserted)."""
    import json

    assert main(["bench", "data", "--store", str(small_store), "--out", str(tmp_path), "--batch-size", "16",
                 "--batches", "2"]) == 0
    result = json.loads((tmp_path / "bench_data.json").read_text())
    assert {"timestamp", "machine", "naive", "batched", "batched_uint8", "ratio"} <= set(result)
    assert result["naive"]["patches"] == result["batched"]["patches"] == 32
    assert "ratio" in capsys.readouterr().out
