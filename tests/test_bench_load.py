"""``agl bench load`` in small: a real sweep on the demo store under the memory sampler.

``bench_load`` starts its own local Ray when none is running (and shuts it down afterwards), the
code path of ``agl bench load``; so this module uses no ``ray_local`` fixture.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agl.bench.sweep import BENCH_LOAD_JSON, BENCH_LOAD_PNG, bench_load


@pytest.mark.reliability(
    kind="load",
    case="agl bench load with 3 trials x 1 epoch on 2 CPUs (demo store, frozen features), memory sampled "
         "every 0.5 s",
    outcome="all 3 trials finish, none fails; the JSON reports peak memory > 0 and a non-empty series, the "
            "PNG is written, and the temporary sweep (Ray results, MLflow DB) is removed from --out",
)
def test_bench_load_small(demo_store: Path, tmp_path: Path) -> None:
    import ray

    already = ray.is_initialized()  # e.g. a session-wide Ray of another module: bench_load then joins it
    out = tmp_path / "results"
    report = bench_load(store=str(demo_store), out=out, trials=3, epochs=1, num_cpus=2, interval_s=0.5)
    saved = json.loads((out / BENCH_LOAD_JSON).read_text())
    assert saved["trials"]["finished"] == 3 and saved["trials"]["failed"] == 0
    assert saved["trials"]["in_table"] == 3 and saved["trials"]["retried"] == 0
    assert saved["memory"]["peak_total_rss_mb"] > 0 and saved["memory"]["peak_driver_rss_mb"] > 0
    assert saved["memory"]["peak_total_rss_mb"] >= saved["memory"]["peak_driver_rss_mb"]
    assert saved["series"] and saved["series"][-1]["trials_finished"] == 3
    assert saved["memory"]["peak_processes"] > 1  # Ray's processes were found, not only the driver
    assert saved["sweep"]["complete"] and saved["time"]["wall_s"] > 0
    assert (out / BENCH_LOAD_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["written"] == [str(out / BENCH_LOAD_JSON), str(out / BENCH_LOAD_PNG)]
    # the sweep ran in a temporary folder under --out that is gone now; no results/sweep* appeared
    assert sorted(p.name for p in out.iterdir()) == [BENCH_LOAD_JSON, BENCH_LOAD_PNG]
    assert ray.is_initialized() == already  # a Ray it started is shut down, one it found is left running
