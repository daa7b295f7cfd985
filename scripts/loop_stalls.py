"""Driver event-loop stalls of a demo sweep: MLflow writes inline on Tune's loop ("before") vs queued on
the tracking callback's writer thread ("after", the sweep's behaviour).

Each mode runs the tiny space (``--trials`` trials, ``--epochs`` epochs, one at a time, local MLflow
SQLite + file artifacts) in its own process, with two probes in the driver:

- Tune's loop: a callback records when each ``TuneController.step`` begins and ends; a step's
  duration and the gap between two step starts are how long the loop went without looking at its
  trials (callbacks run inside the step, so an inline MLflow upload lengthens it);
- a probe thread that sleeps 50 ms and records how late it woke (the driver holding the GIL).

"before" is made by running the callback's queued writes inline (``TrackingCallback._queue`` calls
``_send`` directly), as the callback did before it had a writer thread.

    python scripts/loop_stalls.py [--trials 2] [--epochs 4]

Prints max / p95 per mode and writes results/bench_loop_stalls.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from agl.distributed import tune as sweep

HERE = Path(__file__).resolve().parents[1]
PROBE_S = 0.05
MODES = ("inline", "queued")


def stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    if not len(arr):
        return {"n": 0}
    return {"n": int(len(arr)), "max_s": round(float(arr.max()), 4), "p95_s": round(float(np.percentile(arr, 95)), 4),
            "median_s": round(float(np.median(arr)), 4)}


class Probed(sweep.TrackingCallback):
    """The sweep's tracking callback, timing Tune's steps and its own writes ("inline": no writer thread)."""

    mode = "queued"
    steps: list[tuple[float, float]] = []   # (start, end) of each TuneController.step
    writes: list[float] = []                # seconds per tracker write

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        Probed.steps.append((time.perf_counter(), float("nan")))

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if Probed.steps:
            Probed.steps[-1] = (Probed.steps[-1][0], time.perf_counter())

    def _send(self, trial, what, send) -> None:  # noqa: ANN001
        started = time.perf_counter()
        super()._send(trial, what, send)
        Probed.writes.append(time.perf_counter() - started)

    def _queue(self, trial, what, send) -> None:  # noqa: ANN001
        if Probed.mode == "inline":
            self._send(trial, what, send)   # the callback before its writer thread: on Tune's loop
        else:
            super()._queue(trial, what, send)


def run_one(mode: str, trials: int, epochs: int) -> dict:
    """One sweep in this process with the probes; returns the figures."""
    from agl.distributed.spaces import resolve_space_path

    Probed.mode = mode
    sweep.TrackingCallback = Probed
    steps, writes = Probed.steps, Probed.writes
    lags: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            due = time.perf_counter() + PROBE_S
            time.sleep(PROBE_S)
            lags.append(max(0.0, time.perf_counter() - due))

    work = Path(tempfile.mkdtemp(prefix=f"agl-stalls-{mode}-"))
    space = yaml.safe_load(resolve_space_path("tiny").read_text())
    space["fixed"].update(epochs=epochs, patience=epochs)
    space["num_samples"] = trials
    (work / "space.yaml").write_text(yaml.safe_dump(space))
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    started = time.perf_counter()
    summary = sweep.run_sweep(sweep.SweepOptions(space=str(work / "space.yaml"), out=str(work / "sweep"),
                                                 num_cpus=1, max_concurrent=1))
    wall = time.perf_counter() - started
    stop.set()
    thread.join()
    shutil.rmtree(work, ignore_errors=True)
    done = [(a, b) for a, b in steps if b == b]
    return {"mode": mode, "trials": len(summary.table), "epochs": epochs, "wall_s": round(wall, 1),
            "step_duration": stats([b - a for a, b in done]),
            "gap_between_steps": stats([b[0] - a[0] for a, b in zip(steps, steps[1:])]),
            "probe_thread_lag": stats(lags), "tracking_writes": {**stats(writes), "total_s": round(sum(writes), 2)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "bench_loop_stalls.json"))
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.trials, args.epochs)))
        return 0
    rows = []
    for mode in MODES:  # each in its own process: its own Ray, its own MLflow client
        done = subprocess.run([sys.executable, __file__, "--one", mode, "--trials", str(args.trials),
                               "--epochs", str(args.epochs)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"})
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            print((done.stdout + done.stderr)[-4000:], file=sys.stderr)
            return done.returncode or 1
        rows.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(rows[-1]))
    result = {"what": "Tune driver event-loop stalls during a tiny demo sweep (local MLflow: SQLite + file "
                      "artifacts), MLflow writes inline on the loop (before) vs on the callback's writer thread (after)",
              "command": f"python scripts/loop_stalls.py --trials {args.trials} --epochs {args.epochs}",
              "before": rows[0], "after": rows[1]}
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    for row in rows:
        print(f"{row['mode']:>7}: step max {row['step_duration']['max_s']:.3f} s p95 {row['step_duration']['p95_s']:.3f} s;"
              f" gap max {row['gap_between_steps']['max_s']:.3f} s p95 {row['gap_between_steps']['p95_s']:.3f} s;"
              f" probe lag max {row['probe_thread_lag']['max_s']:.3f} s; writes {row['tracking_writes']['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
