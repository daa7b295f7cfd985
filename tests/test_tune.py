"""Ray Tune + Optuna sweep on the real demo store: trials run, the table/plot and MLflow runs exist,
the champion is registered, and an interrupted sweep resumes without duplicating trials."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from agl.tracking import MlflowTracker, default_tracking_uri
from agl.distributed.spaces import load_space
from agl.distributed.tune import SweepOptions, _scheduler, run_sweep
from agl.errors import ConfigError, OutputExistsError
from trainkit import cv_space

REPO = Path(__file__).resolve().parents[1]


def client(uri: str):
    return MlflowTracker(uri).client


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    return {k: v.run_id for k, v in MlflowTracker(uri).trial_runs(experiment_id, parent_run_id).items()}


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
    c = client(summary.tracking_uri)
    champion = c.get_model_version_by_alias("agl-model", "champion")
    assert champion.run_id == summary.best["mlflow_run_id"]
    children = child_runs(summary.tracking_uri, c.get_experiment_by_name("agl-sweep").experiment_id,
                                   summary.parent_run_id)
    assert len(children) == 2

    # restoring a finished sweep re-runs nothing and keeps one MLflow run per trial
    again = run_sweep(SweepOptions(space="tiny", store=str(demo_store), out=str(out), num_samples=2, resume=True))
    assert sorted(again.table["trial_id"]) == sorted(table["trial_id"])
    assert len(child_runs(summary.tracking_uri, c.get_experiment_by_name("agl-sweep").experiment_id,
                                   summary.parent_run_id)) == 2
    # a second sweep into the same folder without --resume is refused (an existing output: exit 1 everywhere)
    with pytest.raises(OutputExistsError, match="--resume"):
        run_sweep(SweepOptions(space="tiny", store=str(demo_store), out=str(out)))

    # the sweep folder can be moved (or copied back from a cluster): tune-sync points MLflow's
    # artifact links at the new place, and nothing under the old path is needed any more
    import shutil

    from agl.cli import main
    from agl.tracking import MlflowTracker

    moved = tmp_path / "elsewhere" / "sweep"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    assert main(["tune-sync", "--out", str(moved)]) == 0
    tracker = MlflowTracker(default_tracking_uri(moved))
    run_id = summary.best["mlflow_run_id"]
    local = tracker.client.download_artifacts(run_id, "gene_set.csv", str(tmp_path))
    assert Path(local).is_file() and pd.read_csv(local)["selected"].any()
    assert tracker.client.get_run(run_id).info.artifact_uri.startswith(moved.as_uri())
    folder = tracker.fetch_champion(dst=tmp_path / "champion")
    assert (folder / "best.safetensors").is_file()
    assert json.loads((moved / "sweep.json").read_text())["out"] == str(moved)


def test_trials_as_nested_torch_trainers(ray_local, demo_store: Path, tmp_path: Path) -> None:
    """--trainer train: each trial drives a TorchTrainer; its final checkpoint reaches MLflow."""
    out = tmp_path / "nested"
    summary = run_sweep(SweepOptions(space="tiny", store=str(demo_store), out=str(out), num_samples=1,
                                     trainer="train", workers_per_trial=1))
    assert list(summary.table["status"]) == ["finished"]
    c = client(summary.tracking_uri)
    run_id = summary.best["mlflow_run_id"]
    files = {a.path for a in c.list_artifacts(run_id)}
    assert {"gene_set.csv", "checkpoint", "model"} <= files
    assert c.get_model_version_by_alias("agl-model", "champion").run_id == run_id


DIVERGING_SPACE = """description: one trial whose loss goes non-finite in its first epoch (lr 1e30)
split: kfold-s0-f0
metric: val_pcc
direction: max
num_samples: 1
seed: 0
scheduler: {name: fifo}
resources: {cpu: 1}
fixed: {mode: features, epochs: 2, patience: 2, trunk: [64], lr: 1.0e+30, k: 32}
params:
  method: {type: categorical, choices: [topk]}
"""


@pytest.mark.reliability(kind="fault", case="a sweep trial whose loss goes non-finite (NonFiniteLossError), "
                         "with --max-failures 3", outcome="not retried: the trial ends once, status 'diverged' with "
                         "its message in trials.csv and summary.md, its MLflow run FAILED with tag error; no champion")
def test_a_diverging_trial_fails_once_without_retries(ray_local, demo_store: Path, tmp_path: Path) -> None:
    space_file = tmp_path / "diverging.yaml"
    space_file.write_text(DIVERGING_SPACE)
    out = tmp_path / "sweep"
    summary = run_sweep(SweepOptions(space=str(space_file), store=str(demo_store), out=str(out), max_failures=3))
    row = summary.table.iloc[0]
    assert row["status"] == "diverged", summary.table  # "error" after 3 retries before
    assert row["error"].startswith("NonFiniteLossError: ") and "lr is 1e+30" in row["error"]
    assert summary.best is None and summary.champion_version is None
    assert "diverged: NonFiniteLossError" in (out / "summary.md").read_text()
    assert pd.read_csv(out / "trials.csv")["status"].tolist() == ["diverged"]
    # Tune ran the trial once: no restart (a restart would have re-run the failing epoch)
    trial_dir = next((out / "ray" / "agl-sweep").glob("agl_trial_*"))
    reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
    assert [r.get("diverged") for r in reports] == [True]
    c = client(summary.tracking_uri)
    run = c.get_run(row["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["error"] == row["error"]


def test_one_train_worker_per_trial_on_gpus() -> None:
    """--trainer train on GPUs: one worker per trial unless asked (1-GPU nodes: a trial's workers stay on one
    node), so a 4-GPU cluster runs 4 trials at once; on CPUs 2 workers as before; a negative count is refused."""
    from agl.distributed.tune import _max_concurrent, _workers_per_trial

    space = load_space("tiny")
    gpu = SweepOptions(trainer="train", use_gpu=True)
    assert _workers_per_trial(gpu, space) == 1
    assert _max_concurrent(gpu, space, {"CPU": 16, "GPU": 4}) == 4
    assert _workers_per_trial(SweepOptions(trainer="train", use_gpu=True, workers_per_trial=2), space) == 2
    assert _workers_per_trial(SweepOptions(trainer="train"), space) == 2
    gpu_space = load_space("finetune-gpu")
    assert gpu_space.resources.get("gpu") and _workers_per_trial(SweepOptions(trainer="train"), gpu_space) == 1
    with pytest.raises(ConfigError, match="--workers-per-trial"):
        _workers_per_trial(SweepOptions(trainer="train", workers_per_trial=-1), space)


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
    uri = default_tracking_uri(out)
    c = client(uri)
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


CV_SPACE = cv_space('cross-validated test sweep (2 of the 4 leave-one-slide-out folds, 2 epochs)', trunk=64, start_with='  - {method: pgl}\n  - {method: topk, k: 64}')


def test_cross_validated_sweep_refits_the_champion(ray_local, demo_store: Path, tmp_path: Path) -> None:
    """cv_pcc is the fold mean (s.e. as scipy's sem), every trial logs its gene set, k and fold metrics,
    PGL trials carry no k, and the champion is the refit on every non-test spot, scored on B4."""
    import json

    from scipy import stats

    space_file = tmp_path / "cv.yaml"
    space_file.write_text(CV_SPACE)
    out = tmp_path / "sweep"
    summary = run_sweep(SweepOptions(space=str(space_file), store=str(demo_store), out=str(out)))
    table = summary.table
    assert len(table) == 3 and set(table["status"]) == {"finished"}
    for _, row in table.iterrows():
        folds = json.loads(row["fold_pcc"])
        assert sorted(folds) == ["loso-C2", "loso-C3"]          # never the test slide B4
        assert row["cv_pcc"] == pytest.approx(sum(folds.values()) / 2)
        assert row["cv_pcc_se"] == pytest.approx(stats.sem(list(folds.values())))
        assert (row["param.method"] == "pgl") == pd.isna(row["param.k"])  # conditional space
    assert table["cv_pcc"].is_monotonic_decreasing
    assert summary.best["trial_id"] == table.iloc[0]["trial_id"]
    # the champion: a refit of the best configuration, scored once on the held-out slide
    champion = summary.champion
    assert champion["trial_id"] == summary.best["trial_id"]
    refit_result = json.loads((out / "champion" / "result.json").read_text())
    assert refit_result["refit_of"] == summary.best["trial_id"] and -1 < refit_result["metrics"]["test_pcc"] < 1
    assert (out / "champion" / "model.safetensors").is_file() or list((out / "champion").glob("*.safetensors"))
    c = client(summary.tracking_uri)
    version = c.get_model_version_by_alias("agl-model", "champion")
    assert version.run_id == champion["run_id"]
    assert c.get_run(version.run_id).data.tags["agl.kind"] == "refit"
    exp_id = c.get_experiment_by_name("agl-sweep").experiment_id
    for trial_id, run_id in child_runs(summary.tracking_uri, exp_id, summary.parent_run_id).items():
        run = c.get_run(run_id)
        assert {"gene_set.csv", "result.json"} <= {a.path for a in c.list_artifacts(run_id)}
        assert "final_k" in run.data.metrics and "gene_set_sha256" in run.data.tags
        if trial_id != "refit":
            assert len(c.get_metric_history(run_id, "fold_pcc")) == 2
    # the summary: by method, the champion, and the PGL comparison line
    text = (out / "summary.md").read_text()
    assert "best finished trial per method" in text and "champion: refit of" in text
    assert "PGL trial" in text and ("beyond the fold noise" in text or "within the fold noise" in text)


def test_the_refit_is_a_ray_task_whose_errors_come_back_as_themselves(ray_local, demo_store: Path,
                                                                       tmp_path: Path) -> None:
    """remote_refit trains in a Ray worker (not the driver's process) holding a trial's resources and writes the
    champion folder on the driver's side; an agl error in the task is raised as that error, nothing written."""
    from agl.distributed.cv import remote_refit
    from agl.errors import DataError

    space = load_space("tiny")
    config = {"method": "topk", "k": 32, "lr": 1e-3}
    summary, ran_on = remote_refit(space, config, str(demo_store), tmp_path / "champion", {"cpu": 1}, threads=1)
    assert ran_on["pid"] != os.getpid()
    files = {p.name for p in (tmp_path / "champion").iterdir()}
    assert {"best.safetensors", "optimizer.safetensors", "gene_set.csv", "result.json"} <= files
    assert json.loads((tmp_path / "champion" / "result.json").read_text())["metrics"] == summary["metrics"]
    assert -1 < summary["metrics"]["test_pcc"] < 1
    with pytest.raises(DataError, match="not an agl store"):
        remote_refit(space, config, str(tmp_path / "no-store"), tmp_path / "other", {"cpu": 1})
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.partial").exists()


def test_pgl_comparison_is_a_paired_t_test() -> None:
    from scipy import stats

    from agl.distributed.spaces import parse_space
    from agl.distributed.tune import compare_with_pgl

    space = parse_space({"split": "loso-B4", "metric": "cv_pcc", "cv": {"kind": "loso"},
                         "params": {"method": {"type": "categorical", "choices": ["dkgsb", "pgl"]}}})
    aux = {"a": 0.22, "b": 0.25, "c": 0.20, "d": 0.24}
    pgl = {"a": 0.17, "b": 0.21, "c": 0.18, "d": 0.16}
    table = pd.DataFrame([
        {"trial_id": "t1", "status": "finished", "param.method": "dkgsb", "cv_pcc": 0.2275, "cv_pcc_se": 0.01,
         "fold_pcc": json.dumps(aux)},
        {"trial_id": "t2", "status": "finished", "param.method": "pgl", "cv_pcc": 0.18, "cv_pcc_se": 0.01,
         "fold_pcc": json.dumps(pgl)},
    ])
    verdict = compare_with_pgl(table, space)
    expected = stats.ttest_rel(list(aux.values()), list(pgl.values()), alternative="greater").pvalue
    assert verdict["p_value"] == pytest.approx(expected) and verdict["n_folds"] == 4
    assert verdict["beyond_noise"] == (expected < 0.05) and "beyond the fold noise" in verdict["line"]
    assert verdict["mean_diff"] == pytest.approx(0.0475)


def test_pgl_comparison_does_not_count_the_probe_as_an_auxiliary_gene_trial() -> None:
    """The probe predicts the primary genes only (its gate's trait); the best auxiliary-gene trial is dkgsb's."""
    from agl.distributed.spaces import parse_space
    from agl.distributed.tune import compare_with_pgl

    space = parse_space({"split": "loso-B4", "metric": "cv_pcc", "cv": {"kind": "loso"},
                         "params": {"method": {"type": "categorical", "choices": ["probe", "dkgsb", "pgl"]}}})
    folds = {"probe": {"a": 0.30, "b": 0.31}, "dkgsb": {"a": 0.22, "b": 0.25}, "pgl": {"a": 0.17, "b": 0.21}}
    table = pd.DataFrame([  # sorted best first, as summary_table writes it: the probe leads
        {"trial_id": f"t-{m}", "status": "finished", "param.method": m, "cv_pcc": sum(f.values()) / 2,
         "cv_pcc_se": 0.01, "fold_pcc": json.dumps(f)} for m, f in folds.items()])
    verdict = compare_with_pgl(table, space)
    assert verdict["aux_trial"] == "t-dkgsb" and verdict["pgl_trial"] == "t-pgl"
    assert verdict["mean_diff"] == pytest.approx(0.045)


def test_fair_asha_never_stops_pinned_trials() -> None:
    from agl.distributed.tune import FairASHA

    space = load_space("default")
    scheduler = _scheduler(space, "function", 4)
    assert isinstance(scheduler, FairASHA) and scheduler.protected == len(space.start_with) == 3
    assert scheduler._time_attr == "folds_done"

    class Trial:
        def __init__(self, trial_id: str):
            self.trial_id, self.config = trial_id, {}

    trials = [Trial(f"t{i}") for i in range(6)]
    for t in trials:
        scheduler.on_trial_add(None, t)
    decisions = {}
    # the pinned trials score worst; ASHA would stop them at the first rung (reduction factor 2)
    for t, score in zip(trials, [0.1, 0.11, 0.12, 0.3, 0.31, 0.32]):
        for folds in (1, 2):
            decisions[t.trial_id] = scheduler.on_trial_result(None, t, {"folds_done": folds, "cv_pcc": score,
                                                                        "training_iteration": folds})
    assert all(decisions[f"t{i}"] == FairASHA.CONTINUE for i in range(3))


class _Tuner:
    """A stand-in for ray.tune.Tuner whose fit() gives the next outcome: an exception to raise, or a result."""

    def __init__(self, outcomes: list) -> None:
        self.outcomes = outcomes

    def fit(self):
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _tune_stopped_by_a_memory_kill() -> RuntimeError:
    """What Tune 2.60 raises when Ray's memory monitor kills a trial (measured: a tiny sweep under
    RAY_memory_usage_threshold=0.1): a RuntimeError whose cause is Ray's OutOfMemoryError."""
    from ray.exceptions import OutOfMemoryError

    try:
        raise RuntimeError("Caught unexpected exception: 1 worker(s) were killed") from OutOfMemoryError(
            "1 worker(s) were killed due to the node running low on memory.\nMemory on the node ...")
    except RuntimeError as err:
        return err


@pytest.mark.reliability(kind="fault", case="Ray's memory monitor kills a trial's worker (Tune 2.60 then stops the "
                         "whole sweep with 'Caught unexpected exception')",
                         outcome="the sweep is restored from its saved state and continued, up to --max-failures "
                                 "times; beyond that a clear error (exit 1) that names --resume; other errors pass through")
def test_a_memory_killed_trial_restores_the_sweep_instead_of_ending_it():
    from agl.cli import exit_code
    from agl.distributed.tune import fit_surviving_memory_kills
    from agl.errors import ResourceError

    restored = []

    def restore():
        restored.append(1)
        return _Tuner(["grid after the restore"])

    assert fit_surviving_memory_kills(_Tuner([_tune_stopped_by_a_memory_kill()]), restore, 3, "s") == \
        "grid after the restore"
    assert len(restored) == 1

    def always_killed():
        return _Tuner([_tune_stopped_by_a_memory_kill()])

    with pytest.raises(ResourceError, match=r"killed trial workers 3 time\(s\).*--resume") as info:
        fit_surviving_memory_kills(always_killed(), always_killed, 2, "s")
    assert exit_code(info.value) == 1
    with pytest.raises(RuntimeError, match="something else"):  # not a memory kill: Tune's error as it was
        fit_surviving_memory_kills(_Tuner([RuntimeError("something else")]), restore, 3, "s")


def test_a_memory_killed_trial_shows_why_in_the_table():
    """trials.csv's error column: the memory monitor's line (node memory used / limit), not Ray's closing advice."""
    from types import SimpleNamespace

    from agl.distributed.results import trial_error

    text = ("Task was killed due to the node running low on memory.\n"
            "ray.exceptions.OutOfMemoryError: 1 worker(s) were killed due to the node running low on memory. "
            "Memory on the node (IP: 127.0.0.1) was 22.4GB used / 23.54GB limit (0.95)\n"
            "Refer to the documentation on how to address the out of memory issue: https://docs.ray.io/...")
    shown = trial_error(SimpleNamespace(metrics={}, error=RuntimeError(text)))
    assert "1 worker(s) were killed" in shown and "22.4GB used / 23.54GB limit" in shown
    other = trial_error(SimpleNamespace(metrics={}, error=ValueError("Traceback ...\nValueError: bad value")))
    assert other == "ValueError: bad value"
