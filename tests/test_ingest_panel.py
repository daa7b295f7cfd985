"""`agl ingest` of a small targeted panel (100 genes of real her2st C2 written as Space Ranger outs/):
each refusal names the flag to change."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agl.cli import main

FAST = ["--patch-px", "32", "--seeds", "0", "--splits", "kfold"]


@pytest.fixture(scope="module")
def panel_outs(her2st_dir: Path, tmp_path_factory) -> list[str]:
    """`agl ingest visium` arguments for C2 cut to 100 genes (drawn among its detected genes, seed 0)."""
    from layouts import write_visium

    from agl.data.readers import read_her2st

    c2 = read_her2st(her2st_dir, ["C2"])
    detected = np.flatnonzero(np.asarray((c2.X > 0).sum(axis=0)).ravel() > 0)
    panel = c2[:, np.sort(np.random.default_rng(0).choice(detected, 100, replace=False))].copy()
    outs = tmp_path_factory.mktemp("panel") / "outs"
    write_visium(panel, outs)
    return ["ingest", "visium", str(outs), "--image", c2.uns["slides"]["C2"]["image_path"], *FAST]


@pytest.mark.reliability(kind="bad input", case="agl ingest visium of a 100-gene targeted panel (real C2 counts) with the "
                         "default --min-genes 200, then --min-genes 14 (the value it suggests) with --n-primary 100, in memory and --stream",
                         outcome="exit != 0; the message names --min-genes/--min-cells (with the panel's 100 genes, "
                         "the median spot's 28 and a value to try), then --n-primary and its range; no store written")
@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_a_small_panel_is_told_which_flag_to_change(panel_outs: list[str], stream: bool, tmp_path: Path,
                                                    capsys) -> None:
    out = tmp_path / "store"
    args = panel_outs + ["--out", str(out)] + (["--stream"] if stream else [])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "preprocessing left 0 spots x 0 genes" in err and "--min-genes 200" in err and "--min-cells 3" in err, err
    assert "the slides have 100 genes and their median spot detects 28" in err and "Lower --min-genes" in err, err
    assert not out.exists()
    # the suggested --min-genes works; too many primary genes for the panel names --n-primary
    assert main(args + ["--min-genes", "14", "--n-primary", "100"]) == 2
    err = capsys.readouterr().err
    assert "--n-primary: must be in 1..88" in err and "got 100" in err and "lower --n-primary" in err, err
    assert not out.exists() and "Traceback" not in err
    assert main(args + ["--min-genes", "14"]) == 0 and (out / "manifest.json").is_file()
