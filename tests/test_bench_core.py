"""agl bench core's estimator comparison: its memory probe and its plot (the timings are the benchmark's)."""
from __future__ import annotations

import numpy as np

from agl.bench.core import _PeakRSS, plot_hypergradients, print_hypergradients


def test_peak_rss_sees_a_transient_allocation() -> None:
    with _PeakRSS() as peak:
        block = np.ones(256 * 2**20 // 8)  # 256 MiB, touched, then freed before the probe stops
        del block
    assert 200 < peak.growth_mb < 1024, peak.growth_mb


def test_plot_and_table_of_a_section(tmp_path, capsys) -> None:
    rows = [{"mode": "features", "H": h, "method": m, "seconds_median": s * h, "seconds_all": [s * h],
             "vs_H_plain": s, "peak_rss_growth_mb": None if h == 2 else 100.0 * s, "vs_plain_memory": None if h == 2 else s}
            for h in (1, 2, 4) for m, s in (("plain", 1.0), ("forward", 2.5))]
    section = {"mode": "features", "backbone": None, "patch_px": None, "batch": 64, "n_outputs": 13949, "rows": rows}
    plot_hypergradients([section], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    print_hypergradients(section)
    out = capsys.readouterr().out
    assert "H=4   forward" in out and "not measured" in out and "2.50x plain" in out


def test_feature_cache_and_plain_loop_measured_side_by_side(demo_store, capsys) -> None:
    """Both sides run on the same patches and views; the ratio is the ratio of the two rates (not a timing target)."""
    from agl.bench.core import bench_feature_cache
    from agl.data.store import open_store

    result = bench_feature_cache(open_store(demo_store), n_patches=4, views=2, repeats=1, batch_size=2, threads=1)
    rates = result["images_per_s"]
    assert result["images"] == 8 and set(rates) == {"feature_cache", "plain_inference_mode"}
    assert all(len(ts) == 1 and ts[0] > 0 for ts in result["seconds_all"].values())
    assert result["cache_vs_plain_loop"] == rates["feature_cache"] / rates["plain_inference_mode"]
    assert "images/s vs plain inference_mode" in capsys.readouterr().out


def test_live_memory_setting_reaches_only_the_fresh_process(monkeypatch):
    """--live-memory: the allocator setting is in the spawned process's environment (glibc reads it at
    start) and the parent's environment is as it was."""
    import os

    from agl.bench.core import LIVE_MEMORY_ENV, run_fresh

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    assert run_fresh(os.getenv, "MALLOC_MMAP_THRESHOLD_", env=LIVE_MEMORY_ENV) == "65536"
    assert run_fresh(os.getenv, "MALLOC_TRIM_THRESHOLD_", env=LIVE_MEMORY_ENV) == "0"
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ and os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"
    assert run_fresh(os.getenv, "MALLOC_MMAP_THRESHOLD_") is None
