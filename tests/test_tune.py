"""Ray Tune + Optuna sweep on the real demo store: trials run, the table/plot and MLflow runs exist,
the champion is registered, and an interrupted sweep resumes without duplicating trials."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from agl.distributed import tracking
from agl.distributed.spaces import load_space
from agl.distributed.tune import SweepOptions, _scheduler, run_sweep
from agl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_tiny_sweep_table_mlflow_and_champion(ray_local, demo_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    summary = run_sweep(SweepOptions(space="tiny", store=str(demo_store), out=str(out), num_samples=2))
    table = summary.table
    assert len(table) == 2 and set(table["status"]) == {"finished"}
    assert table["val_pcc"].between(-1, 1).all() and table["test_pcc"].between(-1, 1).all()
    assert set(table["param.method"]) <= {"dkgsb", "topk"}
    # table CSV and plot written
    csv = pd.read_csv(out / "trials.csv")
    assert len(csv) == 2 and {"val_pcc", "test_pcc", "final_k", "mlflow_run_id"} <= set(csv.columns)
    assert (out / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the best trial is the one with the highest validation PCC, and it is the champion
    assert summary.best["val_pcc"] == pytest.approx(table["val_pcc"].max())
    c = tracking.client(summary.tracking_uri)
    champion = c.get_model_version_by_alias("agl-model", "champion")
    assert champion.run_id == summary.best["mlflow_run_id"]
    children = tracking.child_runs(summary.tracking_uri, c.get_experiment_by_name("agl-sweep").experiment_id,
                                   summary.parent_run_id)
    assert len(children) == 2

    # restoring a finished sweep re-runs nothing and keeps one MLflow run per trial
    again = run_sweep(SweepOptions(space="tiny", store=str(demo_store), out=str(out), num_samples=2, resume=True))
    assert sorted(again.table["trial_id"]) == sorted(table["trial_id"])
    assert len(tracking.child_runs(summary.tracking_uri, c.get_experiment_by_name("agl-sweep").experiment_id,
                                   summary.parent_run_id)) == 2
    # a second sweep into the same folder without --resume is refused
    with pytest.raises(ConfigError, match="--resume"):
        run_sweep(SweepOptions(space="tiny", store=str(demo_store), out=str(out)))


def test_trials_as_nested_torch_trainers(ray_local, demo_store: Path, tmp_path: Path) -> None:
    """--trainer train: each trial drives a TorchTrainer; its final checkpoint reaches MLflow."""
    out = tmp_path / "nested"
    summary = run_sweep(SweepOptions(space="tiny", store=str(demo_store), out=str(out), num_samples=1,
                                     trainer="train", workers_per_trial=1))
    assert list(summary.table["status"]) == ["finished"]
    c = tracking.client(summary.tracking_uri)
    run_id = summary.best["mlflow_run_id"]
    files = {a.path for a in c.list_artifacts(run_id)}
    assert {"selected_genes.csv", "checkpoint"} <= files
    assert c.get_model_version_by_alias("agl-model", "champion").run_id == run_id


def test_nested_trainer_mode_never_uses_asha() -> None:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    space = load_space("default")
    assert space.scheduler["name"] == "asha"
    assert isinstance(_scheduler(space, "function", 7), ASHAScheduler)
    assert isinstance(_scheduler(space, "train", 7), FIFOScheduler)


@pytest.mark.reliability(kind="fault", case="the sweep driver is interrupted (SIGINT) mid-sweep",
                         outcome="exit 130 with a partial table; --resume finishes every trial once, one MLflow run per trial")
def test_interrupted_sweep_resumes(demo_store: Path, tmp_path: Path) -> None:
    """SIGINT the launcher mid-sweep (by its PID), then --resume: every trial finishes once."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "launch" / "tune.py"), "--space", "tiny", "--store", str(demo_store),
           "--out", str(out), "--num-samples", "3", "--num-cpus", "1", "--max-concurrent", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        exp = out / "ray" / "agl-sweep"
        # wait until the first trial has finished (its final checkpoint carries result.json)
        while time.time() < deadline and not list(exp.glob("agl_trial_*/checkpoint_*/result.json")):
            assert proc.poll() is None, "sweep ended before it could be interrupted"
            time.sleep(0.5)
        assert proc.poll() is None, "sweep finished before the interrupt; make the trials longer"
        proc.send_signal(signal.SIGINT)  # Tune saves the experiment state and exits
        assert proc.wait(timeout=120) == 130  # "interrupted: ... --resume"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    partial = pd.read_csv(out / "trials.csv")  # the partial table is written, no champion yet
    assert len(partial) < 3 or not set(partial["status"]) == {"finished"}
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 3 and set(table["status"]) == {"finished"}, table
    # one MLflow child run per trial, even across the restart
    uri = tracking.default_tracking_uri(out)
    c = tracking.client(uri)
    exp_id = c.get_experiment_by_name("agl-sweep").experiment_id
    runs = c.search_runs([exp_id], filter_string="tags.`agl.kind` = 'trial'")
    assert len(runs) == 3
    assert set(table["mlflow_run_id"]) == {r.info.run_id for r in runs}


def test_default_out_never_reuses_an_earlier_sweep(tmp_path: Path) -> None:
    from agl.distributed.commands import default_sweep_out
    from agl.distributed.tune import SWEEP_JSON

    base = tmp_path / "results" / "sweep"
    assert default_sweep_out(False, base) == str(base)  # first run
    base.mkdir(parents=True)
    (base / SWEEP_JSON).write_text("{}")
    assert default_sweep_out(False, base) == str(base.with_name("sweep-2"))  # re-run: a new folder
    assert default_sweep_out(True, base) == str(base)  # --resume: the newest sweep
    second = base.with_name("sweep-2")
    second.mkdir()
    (second / SWEEP_JSON).write_text("{}")
    assert default_sweep_out(False, base) == str(base.with_name("sweep-3"))
    assert default_sweep_out(True, base) == str(second)
