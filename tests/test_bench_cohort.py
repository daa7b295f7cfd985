"""agl bench cohort's bookkeeping: smaps_rollup reading, verdicts and the markdown table (no benchmark run)."""
from __future__ import annotations

import os

import numpy as np

from agl.bench.cohort import markdown_table, read_rollup, verdicts


def _run(spots, path, anon, epoch_s, kind="train", trials=1):
    row = {"uss_mb": anon * 2, "pss_mb": anon * 1.5, "pss_anon_mb": anon, "rss_mb": anon * 3, "pss_file_mb": 1.0,
           "median_epoch_s": epoch_s, "spots_per_s": spots / epoch_s}
    return {"spots": spots, "path": path, "kind": kind, "trials": trials, "rows": [dict(row) for _ in range(trials)]}


def test_rollup_of_this_process_has_the_fields_the_bench_reads():
    r = read_rollup(os.getpid())
    assert r["Rss"] > 0 and r["Pss"] > 0 and "Private_Dirty" in r and "Pss_Anon" in r


def test_verdicts_flag_memory_that_grows_with_the_cohort():
    flat = {"runs": [_run(n, "after", 500 + n / 1000, 1e-4 * n) for n in (1000, 4000, 16000)]}
    grows = {"runs": [_run(n, "after", 0.2 * n, 1e-4 * n) for n in (1000, 4000, 16000)]}
    assert verdicts(flat)["anon_flat_within_20pct"] and not verdicts(grows)["anon_flat_within_20pct"]
    assert verdicts(flat)["epoch_s_linear_fit"]["r2"] > 0.99


def test_table_lists_before_then_after_per_size():
    result = {"runs": [_run(4000, "after", 500, 1.0), _run(1000, "before", 700, 0.1),
                       _run(1000, "after", 500, 0.3), _run(1000, "after", 520, 2.0, kind="cv", trials=2)]}
    lines = markdown_table(result).splitlines()[2:]
    assert [ln.split("|")[1:4] for ln in lines] == [[" 1,000 ", " train x1 ", " before "],
                                                    [" 1,000 ", " train x1 ", " after "],
                                                    [" 1,000 ", " cv x2 ", " after "],
                                                    [" 4,000 ", " train x1 ", " after "]]
    assert np.isclose(float(lines[2].split("|")[8]), 2.0)


def test_tree_sampler_finds_trial_processes_below_the_driver(tmp_path):
    """The sweep phase's sampler: a process whose title holds Ray's trial marker, two levels below the root,
    is reported as a trial with its own peaks; the root is the driver; the tree's PSS covers both."""
    import subprocess
    import sys
    import time

    from agl.bench.cohort import TRIAL_MARKER, TreeSampler, descendants

    # the root starts a grandchild whose argv (its /proc cmdline) carries the marker, as Ray's trial actors do
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
            "'import time, numpy; a = numpy.ones(40 * 2**20 // 8); time.sleep(3)', " + repr(TRIAL_MARKER) + "]); "
            "p.wait()")
    root = subprocess.Popen([sys.executable, "-c", code])
    sampler = TreeSampler(root.pid, interval_s=0.2)
    deadline = time.time() + 30
    while time.time() < deadline and len(descendants(root.pid)) < 1:
        time.sleep(0.1)
    root.wait(timeout=60)
    peaks = sampler.stop()
    assert len(peaks["trials"]) == 1, peaks
    trial = peaks["trials"][0]
    assert trial["pss_anon_mb"] >= 35  # the 40 MB array it allocated, measured in the trial itself
    assert peaks["driver"]["rss_mb"] > 0 and peaks["tree_pss_peak_mb"] >= trial["pss_mb"]


def test_sweep_line_and_no_sizes_refused():
    """The sweep phase's printed line names each trial's peaks; a bench with no cohort sizes is refused."""
    import argparse

    import pytest

    from agl.bench.cohort import sweep_line
    from agl.bench.commands import add_bench_cohort_args, cmd_bench_cohort
    from agl.errors import ConfigError

    run = {"spots": 127488, "trials_done": 2, "complete": True, "wall_s": 900.0, "tree_pss_peak_mb": 5000.0, "driver": {"pss_mb": 700.0},
           "trials": [{"pid": 1, "uss_mb": 900.0, "pss_mb": 2000.0, "pss_anon_mb": 600.0, "rss_mb": 4000.0,
                       "alive_s": 800.0}]}
    assert "USS 900 MB, PSS 2,000 (anon 600)" in sweep_line(run) and "127,488 spots" in sweep_line(run)
    parser = argparse.ArgumentParser()
    add_bench_cohort_args(parser)
    with pytest.raises(ConfigError, match="--copies"):
        cmd_bench_cohort(parser.parse_args(["--copies", "", "--sweep-copies", ""]))
