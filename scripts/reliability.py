#!/usr/bin/env python
"""Regenerate docs/reliability.md: run every reliability test, then the load benchmark.

    .venv/bin/python scripts/reliability.py                 # tests + 64-trial load benchmark (~25 min on 2 cores)
    .venv/bin/python scripts/reliability.py --skip-load     # tests only; reuse results/bench_load.json

Tests carry ``@pytest.mark.reliability(kind=..., case=..., outcome=...)``; pytest runs them
with AGL_RELIABILITY_JSON set and tests/conftest.py records each case and its result in
results/bench_reliability.json. The load figures come from ``agl bench load``
(results/bench_load.json and .png). The page is written atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES_JSON = REPO / "results" / "bench_reliability.json"
LOAD_JSON = REPO / "results" / "bench_load.json"
LOAD_PNG = REPO / "results" / "bench_load.png"
PAGE = REPO / "docs" / "reliability.md"
FIGURE = REPO / "docs" / "figures" / "bench_load.png"
KIND_ORDER = ("layout", "bad input", "use", "fault", "secure default", "load")
HEADINGS = {"layout": "Slide layouts as users have them (real her2st sections written in each layout)",
            "bad input": "Bad input",
            "use": "Using a trained model: predictions, maps, the served champion, the MLflow UI", "fault": "Faults, with recovery", "secure default": "Secure defaults",
            "load": "Load"}


def run_tests(python: str) -> int:
    """pytest -m reliability, recording every case into CASES_JSON; returns pytest's exit code."""
    env = {**os.environ, "AGL_RELIABILITY_JSON": str(CASES_JSON)}
    CASES_JSON.unlink(missing_ok=True)
    print("[reliability] running the reliability tests (pytest -m reliability)", flush=True)
    return subprocess.run([python, "-m", "pytest", "-q", "-m", "reliability", "-p", "no:cacheprovider"],
                          cwd=REPO, env=env).returncode


def run_load(python: str, trials: int, epochs: int) -> int:
    agl = str(Path(python).with_name("agl"))
    print(f"[reliability] load benchmark: agl bench load --trials {trials} --epochs {epochs}", flush=True)
    return subprocess.run([agl, "bench", "load", "--trials", str(trials), "--epochs", str(epochs),
                           "--out", str(REPO / "results")], cwd=REPO).returncode


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _test_name(nodeid: str) -> str:
    """``tests/x.py::test_y[id]`` -> ``test_x.py::test_y[id]`` (short, still findable with pytest -k)."""
    return nodeid.removeprefix("tests/")


def render(cases: list[dict], load: dict | None, tests_rc: int) -> str:
    status = Counter(c["outcome_status"] for c in cases)
    by_kind: dict[str, list[dict]] = {k: [] for k in KIND_ORDER}
    for c in cases:
        by_kind.setdefault(c["kind"], []).append(c)
    faults = by_kind.get("fault", [])
    lost = sum(c["outcome_status"] != "passed" for c in faults)
    lines = [
        "# Reliability: slide layouts, bad input, faults, load and secure defaults",
        "",
        "What `agl` survives, each row a test that can fail. Regenerate this page (tests, then the",
        "load benchmark) with one command:",
        "",
        "```bash",
        ".venv/bin/python scripts/reliability.py            # about 25 minutes on 2 cores",
        ".venv/bin/python scripts/reliability.py --skip-load  # tests only, keeps the load figures",
        "```",
        "",
        f"Last run: {time.strftime('%Y-%m-%d')}, {len(cases)} cases: "
        + ", ".join(f"{n} {s}" for s, n in sorted(status.items()))
        + (f" (pytest exit {tests_rc})" if tests_rc else "") + ".",
        "",
        "| | count |",
        "|---|---|",
        f"| slide layouts read and checked against the her2st release they were written from | "
        f"{sum(c['outcome_status'] == 'passed' for c in by_kind.get('layout', []))} of {len(by_kind.get('layout', []))} |",
        f"| bad inputs tried (each: exit != 0, the file/field and problem named, nothing written) | "
        f"{len(by_kind.get('bad input', []))}, {sum(c['outcome_status'] == 'passed' for c in by_kind.get('bad input', []))} refused cleanly |",
        f"| uses of a trained model checked (predict, maps, serving, UI links) | "
        f"{sum(c['outcome_status'] == 'passed' for c in by_kind.get('use', []))} of {len(by_kind.get('use', []))} |",
        f"| faults injected and survived | {sum(c['outcome_status'] == 'passed' for c in faults)} of {len(faults)} |",
        f"| faults that lost data (a failed fault test) | {lost} |",
        f"| secure defaults checked | {sum(c['outcome_status'] == 'passed' for c in by_kind.get('secure default', []))} "
        f"of {len(by_kind.get('secure default', []))} |",
        "",
    ]
    for kind in [k for k in by_kind if by_kind[k]]:
        lines += [f"## {HEADINGS.get(kind, kind)}", "", "| case | what happens | test | result |", "|---|---|---|---|"]
        for c in by_kind[kind]:
            lines.append(f"| {_cell(c['case'])} | {_cell(c['outcome'])} | `{_cell(_test_name(c['test']))}` | "
                         f"{c['outcome_status']} ({c['seconds']:.0f} s) |")
        lines.append("")
        if kind == "bad input":
            lines += ["The reader-level tests (`tests/test_bad_input_readers.py`, `tests/test_checkpoint.py`,",
                      "`tests/test_spaces.py`) check the same messages on more variants through the Python API.", ""]
    lines += load_section(load)
    return "\n".join(lines) + "\n"


LOAD_ROWS = (  # (section, key, label) of results/bench_load.json shown on the page
    ("sweep", "trials", "trials in one sweep"), ("machine", "ray_cpus", "CPUs given to Ray"),
    ("sweep", "epochs_per_trial", "epochs per trial (fixed, no early stop)"),
    ("trials", "finished", "trials finished"), ("trials", "failed", "trials failed"),
    ("trials", "retried", "trials retried"), ("time", "wall_s", "wall time (s)"),
    ("time", "trials_per_hour", "trials per hour"), ("memory", "peak_total_rss_mb", "peak RSS, driver + all Ray processes (MB)"),
    ("memory", "peak_total_pss_mb", "peak PSS, driver + all Ray processes (MB)"),
    ("memory", "peak_driver_rss_mb", "peak driver RSS (MB)"),
    ("memory", "driver_rss_before_ray_mb", "driver RSS before Ray started (MB)"),
    ("memory", "growth_mb_per_trial", "memory growth per finished trial, second half (MB)"),
    ("memory", "growth_driver_mb_per_trial", "driver growth per finished trial (MB)"),
    ("memory", "bounded_limit_mb_per_trial", "bounded if growth per trial is below (MB, 1% of the peak)"),
    ("memory", "bounded", "bounded"),
)


def load_section(load: dict | None) -> list[str]:
    if not load:
        return ["## Load figures", "", "No load benchmark yet: run `agl bench load`.", ""]
    lines = ["## Load figures (`agl bench load`)", "",
             "One real sweep of many more trials than cores (frozen MobileNetV2 feature cache, the her2st",
             "demo store, FIFO), with the memory of the driver and of every Ray process sampled each second.",
             "RSS counts shared pages once per process; PSS splits them, so it sums to real use.", "",
             "| figure | value |", "|---|---|"]
    for section, key, label in LOAD_ROWS:
        value = (load.get(section) or {}).get(key)
        if value is not None:
            lines.append(f"| {label} | {_cell(value)} |")
    rule = (load.get("memory") or {}).get("bounded_rule")
    lines += ["", "![memory over the sweep](figures/bench_load.png)", ""]
    if rule:
        lines += [f"How growth is measured: {rule}.", ""]
    lines += ["Raw figures and the sampled series: `results/bench_load.json`.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-load", action="store_true", help="reuse results/bench_load.json")
    parser.add_argument("--skip-tests", action="store_true", help="reuse results/bench_reliability.json")
    parser.add_argument("--load-trials", type=int, default=64)
    parser.add_argument("--load-epochs", type=int, default=2)
    args = parser.parse_args(argv)
    python = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
    tests_rc = 0 if args.skip_tests else run_tests(python)
    if not args.skip_load and run_load(python, args.load_trials, args.load_epochs) != 0:
        print("[reliability] the load benchmark failed; the page keeps the previous load figures", file=sys.stderr)
    if not CASES_JSON.is_file():
        print(f"[reliability] {CASES_JSON} is missing: no reliability test ran", file=sys.stderr)
        return 1
    cases = json.loads(CASES_JSON.read_text())
    load = json.loads(LOAD_JSON.read_text()) if LOAD_JSON.is_file() else None
    if LOAD_PNG.is_file():
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(LOAD_PNG, FIGURE)
    sys.path.insert(0, str(REPO))
    from agl.fileio import atomic_write_text

    atomic_write_text(PAGE, render(cases, load, tests_rc))
    print(f"[reliability] wrote {PAGE.relative_to(REPO)} ({len(cases)} cases)")
    return 0 if tests_rc == 0 else tests_rc


if __name__ == "__main__":
    sys.exit(main())
