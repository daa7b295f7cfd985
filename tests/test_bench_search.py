"""`agl bench search --quick`: the plumbing of the known-answer search benchmark on a tiny budget (the real sweep
code path on a planted store with the demo's slides), and the pieces it is built from."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agl.bench.search import bench_space, grid_ks, summarise
from agl.distributed.spaces import parse_space


def test_grid_over_k_and_the_spaces_are_valid_sweep_spaces() -> None:
    assert grid_ks(1999, 8) == [8, 18, 39, 85, 188, 413, 908, 1999]
    for searcher in ("tpe", "random", "grid"):
        space = parse_space(bench_space(searcher, 8, 2000, 3, True, 6, 2), source=searcher)
        assert space.split == "loso-B4" and space.cv["max_folds"] == 2 and space.seed == 3
        assert space.fixed["prior"] == "planted"
        if searcher == "grid":   # all pinned top-k trials, never stopped: FIFO
            assert [p["k"] for p in space.start_with] == grid_ks(1999, 8) and space.scheduler == {"name": "fifo"}
        else:
            assert not space.start_with and space.scheduler["name"] == "asha"


def test_target_verdict_compares_tpe_asha_with_random_compute() -> None:
    runs = [{"searcher": "tpe", "asha": True, "budget": 8, "regret": 0.002, "trial_epochs": 40, "trial_cpu_s": 100,
             "wall_s": 60, "champion_test_pcc": 0.5, "champion_method": "topk"},
            {"searcher": "random", "asha": True, "budget": 8, "regret": 0.004, "trial_epochs": 90, "trial_cpu_s": 250,
             "wall_s": 120, "champion_test_pcc": 0.5, "champion_method": "dkgsb"}]
    verdict = summarise(runs)["target"]
    assert verdict["met"] and verdict["tpe_asha_cpu_s"] == 100 and verdict["random_cpu_s"] == 250
    runs[1]["trial_cpu_s"] = 150
    assert not summarise(runs)["target"]["met"]


def test_bench_search_quick_runs_the_real_sweep_on_a_planted_store(demo_store: Path, tmp_path: Path) -> None:
    from agl.cli import main

    assert main(["bench", "search", "--quick", "--store", str(demo_store), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_search.json").read_text())
    assert (tmp_path / "bench_search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "bench_search_work").exists()          # planted stores and sweeps cleaned up
    oracle = result["oracle"]["0"]
    assert oracle["oracle_test_pcc"] == max(oracle["curve"].values()) and oracle["k_planted"] == 45
    assert len(oracle["points"]) == 3 * (len(oracle["curve"]) + 1)          # every k and PGL at 3 lrs
    assert not (tmp_path / "bench_search.partial.json").exists()
    runs = {r["searcher"]: r for r in result["runs"]}
    assert set(runs) == {"tpe", "grid"} and runs["tpe"]["asha"] and not runs["grid"]["asha"]
    for r in runs.values():
        assert r["trials"] == 3 and -1 < r["champion_test_pcc"] < 1
        assert r["regret"] == pytest.approx(oracle["oracle_test_pcc"] - r["champion_test_pcc"])
        assert r["champion_method"] in ("dkgsb", "topk", "pgl") and r["trial_epochs"] > 0 and r["trial_cpu_s"] > 0
    assert runs["grid"]["champion_method"] == "topk" and runs["grid"]["champion_k"] in (8, 49, 299)
    assert np.isfinite([row["regret_mean"] for row in result["summary"]["rows"]]).all()
