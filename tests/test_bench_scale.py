"""agl bench scale's verdicts and memory sampler (the ingest runs themselves are the benchmark, not a test)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from agl.bench.scale import RayMemory, hest_estimate, linear_fit, verdicts


def _row(n: int, layout: str, seconds: float, driver: float, worker: float, expr: int) -> dict:
    return {"copies": n, "layout": layout, "seconds": seconds, "peak_rss_mb": driver, "worker_peak_rss_mb": worker,
            "ray_peak_total_rss_mb": 2 * worker, "spots": 1000 * n, "slides": 5 * n, "genes": 14000,
            "spots_per_s": 1000 * n / seconds, "expression_array_bytes": expr * n, "expression_partition_bytes": n,
            "store_bytes": 100 * expr * n, "patch_partition_bytes": 10 * n, "patch_array_bytes": 10 * n}


def test_verdicts_say_met_and_not_met():
    ns = (1, 2, 4, 8, 16)
    flat = [_row(n, "sparse", 10 + 5 * n, 1000, 800, 24) for n in ns] + [_row(n, "dense", 10 + 5 * n, 1000, 800, 100)
                                                                         for n in (1, 2)]
    v = verdicts(flat)
    assert v["memory_flat_n2_to_max"]["peak_rss_mb"]["flat_within_20pct"]
    assert v["time_linear"]["linear"] and v["time_linear"]["slope"] == pytest.approx(5)
    assert v["sparse_over_dense"][1]["expression_arrays"] == pytest.approx(0.24)
    assert v["sparse_at_most_0.3x_dense_expression"] is True
    growing = [_row(n, "sparse", 10 + n * n, 1000 + 50 * n, 800, 40) for n in ns] + [_row(1, "dense", 10, 1000, 800, 100)]
    v = verdicts(growing)
    assert not v["memory_flat_n2_to_max"]["peak_rss_mb"]["flat_within_20pct"]   # 1100 -> 1800 MB
    assert v["memory_flat_n2_to_max"]["worker_peak_rss_mb"]["flat_within_20pct"]
    assert not v["time_linear"]["linear"]                                        # quadratic
    assert v["sparse_at_most_0.3x_dense_expression"] is False                    # 0.4x
    hest = hest_estimate(flat, {"in_process": 30.0, "ray_1_workers": 20.0}, workers=2)
    assert hest["from_n"] == 16 and hest["ingest_hours"]["8"] == pytest.approx(hest["ingest_hours"]["1"] / 8)
    assert hest["feature_hours_8_views"]["1 CPU workers (measured rate)"] == pytest.approx(2_100_000 * 8 / 20 / 3600)
    assert "ingest_hours_from_cpu" not in hest  # rows without CPU seconds
    timed = [{**r, "cpu_s": 30.0 * r["copies"], "cpu_s_driver": 6.0 * r["copies"], "cpu_s_ray": 24.0 * r["copies"]}
             for r in flat]
    hours = hest_estimate(timed, None, workers=2)["ingest_hours_from_cpu"]  # 1000 spots: 6 s driver + 24 s Ray
    assert hours["8"] == pytest.approx(2100 * (6 + 24 / 8) / 3600) and hours["1"] == pytest.approx(2100 * 30 / 3600)


def test_linear_fit_of_a_line():
    fit = linear_fit([1, 2, 4], [3, 5, 9])
    assert fit["slope"] == pytest.approx(2) and fit["intercept"] == pytest.approx(1) and fit["r2"] == pytest.approx(1)


def test_ray_memory_sees_a_child_process_peak():
    code = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); del b; time.sleep(2)"
    with RayMemory(interval_s=0.1) as memory:
        child = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(1.5)  # the 300 MB were touched and freed by now; VmHWM keeps the peak
        memory.sample()
        child.wait(timeout=30)
    peaks = [mb for _kind, mb in memory.hwm_mb.values()]
    assert max(peaks) >= 300
    assert memory.summary()["ray_workers"] == 0  # a plain python child is not a Ray worker


def test_ray_memory_counts_a_child_process_cpu_time():
    """A child that burns 0.6 s of CPU, then idles: the sampler keeps its CPU seconds (Ray workers are never reaped
    into RUSAGE_CHILDREN, so sampling is how the bench sees their time); its own time is kept apart."""
    code = "import time; t = time.process_time(); exec('while time.process_time() - t < 0.6: pass'); time.sleep(1.5)"
    with RayMemory(interval_s=0.1) as memory:
        child = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(1.2)
        child.wait(timeout=30)
    assert memory.cpu_s[child.pid] >= 0.6
    assert memory.summary()["cpu_s_ray"] >= 0.6
    assert 0 < memory.sampler_cpu_s < 1.0
