"""The cluster story on one machine, with a worker node that shares no files with the driver.

A Ray head (0 CPUs: it runs no trial) on 127.0.0.1, and a worker node started inside its own mount
namespace (``unshare --mount``) with a fresh tmpfs over /tmp and ~/.cache and its own HOME: it sees
the installed code, nothing the driver wrote. Trials need a custom resource only the worker has. An S3
endpoint on loopback (moto's server mode) is the sweep's --storage-path, where its store lives
(--store s3://..., staged on the worker) and the MLflow server's artifact destination. The sweep runs
with launch/tune.py --address, like a user's; the champion is then loaded from a fresh process that
has only the tracking URI and the bucket.

Every process is started here and stopped by its PID (never `ray stop`: other Ray clusters may run here).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from servers import MlflowServer, MotoServer, free_port
from test_cluster_e2e import pids_with, stop_pids

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.cluster
TRIAL_RESOURCE = "agl_trial_node"
BUCKET = "agl-sweeps"
# `ray start` on Linux swaps 127.0.0.1 for the machine's address, and then listens on every interface;
# keeping the given address keeps every server of this test cluster on loopback.
RAY_ON_LOOPBACK = ("import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
                   "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")


def _unshare_problem() -> str | None:
    """Why a private mount namespace with a tmpfs cannot be made here (None: it can)."""
    if not shutil.which("unshare"):
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /tmp && test ! -e /tmp/.agl-unshare-probe"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --mount with a tmpfs is not permitted here (needs CAP_SYS_ADMIN): {probe.stderr.strip()[:300]}"
    return None


def _wait_for_nodes(address: str, env: dict[str, str], n: int, timeout_s: float = 180) -> dict[str, str]:
    """Block until ``n`` nodes are alive; returns {"head": id, "worker": id} (worker: the one with the trial resource)."""
    script = textwrap.dedent(f"""
        import json, time, ray
        from agl.distributed.runtime import init_ray
        init_ray({address!r})
        deadline = time.time() + {timeout_s}
        while True:
            nodes = [x for x in ray.nodes() if x["Alive"]]
            if len(nodes) >= {n} or time.time() > deadline:
                break
            time.sleep(1)
        print(json.dumps({{("worker" if x["Resources"].get({TRIAL_RESOURCE!r}) else "head"): x["NodeID"] for x in nodes}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=timeout_s + 60)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sweep_on_a_worker_node_that_shares_no_files(small_store: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    problem = _unshare_problem()
    if problem:
        pytest.skip(problem)
    from agl.distributed.spaces import load_space
    from agl.distributed.storage import storage_filesystem
    from agl.distributed.tune import warm_caches

    s3 = MotoServer(tmp_path / "moto").start()
    for key, value in s3.env.items():  # this process reads the bucket too
        monkeypatch.setenv(key, value)
    head_temp = Path(tempfile.mkdtemp(prefix="aglmn-h-", dir="/tmp"))  # short (socket paths), marks our processes
    worker_temp = f"/tmp/aglmn-w-{secrets.token_hex(4)}"                # inside the worker's own /tmp
    mlflow_server = None
    try:
        bucket = s3.bucket(BUCKET)
        # the store goes to the bucket with its frozen-feature cache (computed once, here)
        import pyarrow.fs

        warm_caches(str(small_store), load_space("tiny"))
        pyarrow.fs.copy_files(str(small_store), f"{BUCKET}/stores/small", source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=storage_filesystem(bucket))
        mlflow_server = MlflowServer(tmp_path / "mlflow", artifacts=f"{bucket}/mlartifacts", env=s3.env).start()

        port = free_port()
        address = f"127.0.0.1:{port}"
        env = {**os.environ, **s3.env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}  # this cluster's own token
        env.pop("RAY_ADDRESS", None)
        head = subprocess.run(
            [sys.executable, "-c", RAY_ON_LOOPBACK, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
             "--num-cpus=0", "--include-dashboard=false", f"--temp-dir={head_temp}", "--disable-usage-stats",
             f"--object-store-memory={200 * 1024**2}"], env=env, capture_output=True, text=True, timeout=180)
        assert head.returncode == 0, (head.stdout + head.stderr)[-3000:]
        worker_home = "/tmp/aglmn-home"
        hide = " ".join(p for p in ("/root/.cache", str(Path.home() / ".cache"), str(Path.home() / ".ray"))
                        if Path(p).is_dir())
        worker_script = (
            "set -e; mount -t tmpfs -o size=6g tmpfs /tmp; "
            f"for d in {hide}; do mount -t tmpfs tmpfs \"$d\"; done; "
            f"mkdir -p {worker_home} {worker_temp}; cd {worker_home}; "
            f"exec {sys.executable} -c \"{RAY_ON_LOOPBACK}\" start --address={address} --node-ip-address=127.0.0.1 "
            f"--num-cpus=2 --resources='{{\"{TRIAL_RESOURCE}\": 2}}' --temp-dir={worker_temp} "
            f"--object-store-memory={200 * 1024**2} --disable-usage-stats --block")
        worker = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", worker_script],
                                  env={**env, "HOME": worker_home, "TMPDIR": worker_home},
                                  stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        nodes = _wait_for_nodes(address, env, 2)
        assert set(nodes) == {"head", "worker"}, (nodes, (tmp_path / "worker.log").read_text()[-3000:])

        out = tmp_path / "sweep"
        command = [sys.executable, str(REPO / "launch" / "tune.py"), "--address", address, "--space", "tiny",
                   "--store", f"{bucket}/stores/small", "--storage-path", f"{bucket}/sweeps", "--out", str(out),
                   "--trial-resource", f"{TRIAL_RESOURCE}=1", "--max-failures", "1"]
        driver_env = {**env, "AGL_CACHE_DIR": str(tmp_path / "driver-cache")}
        started = time.perf_counter()
        sweep = subprocess.run(command + ["--tracking-uri", mlflow_server.url], env=driver_env, capture_output=True,
                               text=True, timeout=900)
        log = sweep.stdout + sweep.stderr
        (tmp_path / "sweep.log").write_text(log)
        print(f"sweep: {time.perf_counter() - started:.0f} s; nodes {nodes}")
        assert sweep.returncode == 0, log[-6000:]
        print("\n".join(line for line in log.splitlines() if "store ready on node" in line or "staging" in line))

        # trials ran on the worker node (its id in each trial's final report, read back from the bucket)
        from ray.tune import ExperimentAnalysis

        analysis = ExperimentAnalysis(f"{bucket}/sweeps/agl-sweep")
        ran_on = {trial.trial_id: trial.last_result.get("node_id") for trial in analysis.trials}
        print("trial -> node:", ran_on)
        assert len(ran_on) == 2 and set(ran_on.values()) == {nodes["worker"]}, ran_on
        assert "store ready on node" in log
        table = pd.read_csv(out / "trials.csv")
        assert len(table) == 2 and set(table["status"]) == {"finished"}, table

        # checkpoints and results in the bucket
        keys = s3.keys(BUCKET)
        print("bucket:\n  " + "\n  ".join(k for k in keys if not k.startswith("stores/")))
        for trial_id in ran_on:
            mine = [k for k in keys if k.startswith("sweeps/agl-sweep/") and trial_id in k]
            assert any(k.endswith("result.json") for k in mine), mine
            assert any("/checkpoint_" in k for k in mine), mine
        assert any(k.startswith("mlartifacts/") and k.endswith("MLmodel") for k in keys), keys

        # the champion, from a process that has only the tracking URI and the bucket
        fresh = tmp_path / "elsewhere"
        fresh.mkdir()
        load = textwrap.dedent("""
            import mlflow, numpy as np
            model = mlflow.pyfunc.load_model("models:/agl-model/1")
            example = model.input_example
            print("prediction", np.asarray(model.predict(example)).shape)
        """)
        clean = {k: v for k, v in env.items() if not k.startswith(("AGL_", "RAY_"))}
        loaded = subprocess.run([sys.executable, "-c", load], cwd=fresh, capture_output=True, text=True, timeout=300,
                                env={**clean, "HOME": str(fresh), "MLFLOW_TRACKING_URI": mlflow_server.url})
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        assert "prediction (1," in loaded.stdout, loaded.stdout

        # a fresh head: the sweep folder is gone; --resume with only the bucket and the tracking server restores it
        state = json.loads((out / "sweep.json").read_text())
        assert {"sweeps/agl-sweep.agl/sweep.json", "sweeps/agl-sweep.agl/trials.csv"} <= set(keys)
        shutil.rmtree(out)
        shutil.rmtree(tmp_path / "driver-cache")
        resumed = subprocess.run(command + ["--resume"], env=driver_env, capture_output=True, text=True, timeout=900)
        log = resumed.stdout + resumed.stderr
        (tmp_path / "resume.log").write_text(log)
        assert resumed.returncode == 0, log[-6000:]
        print("\n".join(line for line in log.splitlines() if "restored the sweep" in line or "resuming sweep" in line))
        assert "resuming sweep agl-sweep" in log and state["parent_run_id"] in log
        again = json.loads((out / "sweep.json").read_text())
        assert again["parent_run_id"] == state["parent_run_id"] and again["tracking_uri"] == mlflow_server.url
        assert set(pd.read_csv(out / "trials.csv")["status"]) == {"finished"}
    finally:
        stop_pids(pids_with(str(head_temp)) + pids_with(worker_temp))
        if mlflow_server is not None:
            mlflow_server.stop()
        s3.stop()
        shutil.rmtree(head_temp, ignore_errors=True)
    assert not pids_with(str(head_temp)) and not pids_with(worker_temp)
