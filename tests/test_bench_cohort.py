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
