"""Fault injection with recovery: a full disk while checkpointing, the MLflow server stopped
mid-sweep, the sweep driver and an ingest SIGKILLed. Each test checks that nothing is lost."""
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

from agl.training.checkpoint import load_checkpoint
from agl.cli import main
from agl.tracking import MlflowTracker, default_tracking_uri
from agl.distributed.sync import PENDING_FILE
from agl.errors import CheckpointError
from servers import MlflowServer
from trainkit import first_split, small_config, use_cheap_features

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- full disk
class _SmallDisk:
    """A 64 MiB tmpfs at ``path`` (root), or, where mounting is not allowed, a per-process file-size
    limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full quota)."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir()
        self.mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)],
                                      capture_output=True).returncode == 0
        self._limit = None

    def fill(self) -> None:
        """Leave (almost) no room for the next write."""
        if self.mounted:
            st = os.statvfs(self.path)
            with open(self.path / "filler", "wb") as fh:
                os.posix_fallocate(fh.fileno(), 0, st.f_bavail * st.f_frsize - 4096)
        else:
            import resource

            self._limit = resource.getrlimit(resource.RLIMIT_FSIZE)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, self._limit[1]))

    def free(self) -> None:
        if self.mounted:
            (self.path / "filler").unlink(missing_ok=True)
        elif self._limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, self._limit)
            self._limit = None

    def close(self) -> None:
        self.free()
        if self.mounted:
            subprocess.run(["umount", "--lazy", str(self.path)], check=False)  # mapped tensors may still hold it


@pytest.mark.reliability(kind="fault", case="the disk fills up while fit() writes the epoch-2 checkpoint",
                         outcome="CheckpointError names the folder and 'No space left'; the epoch-1 checkpoint is "
                                 "intact, no temporary folder is left, and training resumes from it once space is freed")
def test_full_disk_during_checkpointing_keeps_the_previous_checkpoint(demo_store, tmp_path, monkeypatch) -> None:
    from agl.training.bundles import make_bundle
    from agl.training.loop import fit

    use_cheap_features(monkeypatch)
    cfg = small_config(epochs=3)
    data = make_bundle(demo_store, first_split(demo_store), cfg)
    disk = _SmallDisk(tmp_path / "disk")
    ckpt = disk.path / "checkpoint"

    class FillAfterFirstEpoch:
        def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
            if metrics["epoch"] == 0:
                disk.fill()

    try:
        with pytest.raises(CheckpointError) as err:
            fit(cfg, data, reporter=FillAfterFirstEpoch(), out_dir=disk.path)
        message = str(err.value)
        assert str(ckpt) in message and "epoch 2" in message and "intact" in message
        assert ("No space left" in message) if disk.mounted else ("File too large" in message)
        disk.free()
        assert sorted(p.name for p in disk.path.iterdir() if p.name != "filler") == ["checkpoint"]  # no half folder
        kept = load_checkpoint(ckpt)  # every file readable, sha-free formats parse
        assert kept.state["epoch"] == 0 and len(kept.state["history"]) == 1
        resumed = fit(cfg, data, resume_from=ckpt, out_dir=tmp_path / "resumed")
        assert resumed.epochs_run == 3 and resumed.history[0] == pytest.approx(kept.state["history"][0])
    finally:
        disk.close()


# --------------------------------------------------------------------------- sweeps
def _sweep_cmd(out: Path, store: Path, n: int, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "tune.py"), "--space", "tiny", "--store", str(store),
            "--out", str(out), "--num-samples", str(n), "--num-cpus", "1", "--max-concurrent", "1", *extra]


def _finished_trials(out: Path) -> dict[str, float]:
    """trial id -> best validation PCC of the trials whose final report is on disk."""
    done = {}
    for result in (out / "ray" / "agl-sweep").glob("agl_trial_*/checkpoint_*/result.json"):
        summary = json.loads(result.read_text())
        done[result.parent.parent.name] = summary["metrics"]["best_val_pcc"]
    return done


def _wait_for(predicate, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"the sweep ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _trial_runs(uri: str) -> list:
    c = MlflowTracker(uri).client
    exp_id = c.get_experiment_by_name("agl-sweep").experiment_id
    return c.search_runs([exp_id], filter_string="tags.`agl.kind` = 'trial'")


@pytest.mark.reliability(kind="fault", case="the MLflow server is stopped mid-sweep (after the first of 4 trials)",
                         outcome="the sweep finishes (exit 0) with a warning and OUT/mlflow-pending.json; after the "
                                 "server is back, `agl tune-sync` sends every trial's epochs, gene set and checkpoint "
                                 "and registers the champion; nothing lost")
def test_mlflow_stopped_mid_sweep_loses_nothing(demo_store, tmp_path) -> None:
    server = MlflowServer(tmp_path / "mlflow").start()
    out = tmp_path / "sweep"
    proc = subprocess.Popen(_sweep_cmd(out, demo_store, 4, "--tracking-uri", server.url), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _finished_trials(out), proc, 300, "the first trial finished")
        server.stop()
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 0, stderr[-3000:]
    assert "agl tune-sync --out" in stderr and "MLflow" in stderr
    pending = json.loads((out / PENDING_FILE).read_text())
    assert pending["tracking_uri"] == server.url and pending["trials"]
    table = pd.read_csv(out / "trials.csv")  # the local record is complete
    assert len(table) == 4 and set(table["status"]) == {"finished"}

    server.start()  # same port, same database: the server is back
    try:
        _check_synced(server, out, table)
    finally:
        server.stop()


def _check_synced(server: MlflowServer, out: Path, table: pd.DataFrame) -> None:
    """After `agl tune-sync`: every trial's run, epochs, artifacts and the champion are in MLflow."""
    assert main(["tune-sync", "--out", str(out)]) == 0
    assert not (out / PENDING_FILE).exists()
    runs = _trial_runs(server.url)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    c = MlflowTracker(server.url).client
    for run in runs:
        steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "val_pcc"))
        assert steps == [1, 2], steps  # every epoch exactly once, none missing, none twice
        assert {"gene_set.csv", "checkpoint"} <= {a.path for a in c.list_artifacts(run.info.run_id)}
        assert run.data.tags.get("gene_set_sha256")
    best = table.sort_values("val_pcc", ascending=False).iloc[0]
    champion = c.get_model_version_by_alias("agl-model", "champion")
    assert c.get_run(champion.run_id).data.tags["trial_id"] == best["trial_id"]
    assert set(pd.read_csv(out / "trials.csv")["mlflow_run_id"]) == {r.info.run_id for r in runs}
    # a second sync finds nothing to send
    assert main(["tune-sync", "--out", str(out)]) == 0 and len(_trial_runs(server.url)) == 4


@pytest.mark.reliability(kind="fault", case="the sweep driver and its local Ray are SIGKILLed mid-sweep",
                         outcome="--resume restores the sweep; trials finished before the kill keep their results; "
                                 "every trial finishes; one MLflow run per trial")
def test_driver_killed_mid_sweep_is_restored(demo_store, tmp_path) -> None:
    import psutil

    out = tmp_path / "sweep"
    cmd = _sweep_cmd(out, demo_store, 3)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for(lambda: _finished_trials(out), proc, 300, "the first trial finished")
        time.sleep(1.0)  # let Tune snapshot the experiment as it does after each checkpoint
        before = _finished_trials(out)
        family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's process group ...
        for pid in family if "family" in locals() else []:  # ... and Ray processes that left it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and 0 < len(before) < 3
    # a generous limit: on a loaded shared machine the resumed 3-trial sweep took more than 400 s
    resumed = subprocess.run(cmd + ["--resume"], env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 3 and set(table["status"]) == {"finished"}, table
    kept = table.set_index("trial_id")["val_pcc"]
    for trial_dir, val_pcc in before.items():
        trial_id = next(t for t in kept.index if t in trial_dir)
        assert kept[trial_id] == pytest.approx(val_pcc)  # the finished result was kept, not re-drawn
    runs = _trial_runs(default_tracking_uri(out))
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(table["trial_id"])


@pytest.mark.reliability(kind="fault", case="`agl ingest` is SIGKILLed while it writes the store",
                         outcome="no store under the target name (only a hidden temporary folder); the re-run removes "
                                 "that leftover and writes a store that verifies")
def test_ingest_killed_mid_write_leaves_no_store(her2st_dir, tmp_path) -> None:
    from agl.data.store import open_store

    out = tmp_path / "store"
    cmd = [str(Path(sys.executable).with_name("agl")), "ingest", "her2st", str(her2st_dir), "--sections", "C2", "C3",
           "--out", str(out), "--patch-px", "32", "--seeds", "0", "--splits", "kfold"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list(tmp_path.glob(".store.tmp-*/spots")):  # the write has begun
            assert proc.poll() is None, "ingest ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    assert [p.name.split(".tmp-")[0] for p in tmp_path.iterdir()] == [".store"]  # the killed write's leftover
    assert subprocess.run(cmd, env=ENV, capture_output=True).returncode == 0
    open_store(out).verify()
    assert [p.name for p in tmp_path.iterdir()] == ["store"]
