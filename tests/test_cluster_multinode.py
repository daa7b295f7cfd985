"""The cluster story on one machine, with a worker node that shares no files with the driver.

A Ray head (0 CPUs: it runs no trial) on 127.0.0.1, and a worker node started inside its own mount
namespace (``unshare --mount``) with a fresh tmpfs over /tmp and ~/.cache and its own HOME: it sees
the installed code, nothing the driver wrote. Trials need a custom resource only the worker has. An S3
endpoint on loopback (moto's server mode) is the sweep's --storage-path, where its store lives
(--store s3://..., staged on the worker) and the MLflow server's artifact destination. The sweep runs
with launch/tune.py --address, like a user's, and loses its head mid-sweep: the driver is interrupted
once the first trial has finished, the head's sweep folder is deleted, and ``--resume`` with only the
bucket and the tracking URI restores the sweep from the bucket and finishes it. The champion is then
loaded from a fresh process that has only the tracking URI and the bucket.

Every process is started here and stopped by its PID (never `ray stop`: other Ray clusters may run here).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from servers import MlflowServer, MotoServer, free_port
from test_cluster_e2e import pids_with, stop_pids

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.cluster
TRIAL_RESOURCE = "agl_trial_node"
BUCKET = "agl-sweeps"
SPACE = "tiny"
# `ray start` on Linux swaps 127.0.0.1 for the machine's address, and then listens on every interface;
# keeping the given address keeps every server of this test cluster on loopback.
RAY_ON_LOOPBACK = ("import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
                   "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")
# Ray gives a starting node 30 s to register with the GCS (ray/_private/node.py); on a loaded 2-core machine that
# can pass, and the node is then simply started again
NODE_START_TIMEOUT = "timed out during startup"


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


class Phases:
    """Wall-clock seconds of each phase of the test, printed at the end (where the minutes go)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.rows: list[tuple[str, float]] = []

    def done(self, what: str) -> None:
        now = time.perf_counter()
        self.rows.append((what, now - self.last))
        self.last = now

    def __str__(self) -> str:
        return "; ".join(f"{what} {seconds:.0f} s" for what, seconds in self.rows) + \
            f"; total {time.perf_counter() - self.start:.0f} s"


@dataclass
class Cluster:
    address: str
    env: dict[str, str]     # the driver's: this cluster's token, the S3 endpoint, PYTHONPATH
    nodes: dict[str, str]   # "head"/"worker" -> Ray node id
    s3: MotoServer
    bucket: str
    mlflow: MlflowServer
    store: str              # the store's URI in the bucket
    phases: Phases
    logs: Path


def _shared_feature_cache(store: Path) -> tuple[Path, Path]:
    """(the store's feature folder, this machine's copy of it): the session's small store is built afresh in each
    pytest session, but its frozen features (keyed by the patches' sha256, backbone and weights) are the same."""
    from agl.fileio import default_cache_dir

    return store / "cache" / "features", default_cache_dir() / "test-features" / "small-store"


def _warm_store(store: Path) -> None:
    """The store's frozen-feature cache, computed here (or copied from this machine's earlier run) before the store
    goes to the bucket: the worker then stages a store whose cache is ready, as an operator's upload would be."""
    from agl.distributed.spaces import load_space
    from agl.distributed.tune import warm_caches

    features, shared = _shared_feature_cache(store)
    patches = json.loads((store / "manifest.json").read_text())["files"].get("arrays/patches.arrow")
    for meta in shared.glob("*.json") if shared.is_dir() else []:
        if json.loads(meta.read_text()).get("patches_sha256") == patches and meta.with_suffix(".npy").is_file():
            features.mkdir(parents=True, exist_ok=True)
            for part in (meta, meta.with_suffix(".npy")):
                shutil.copyfile(part, features / part.name)
    warm_caches(str(store), load_space(SPACE))
    shared.mkdir(parents=True, exist_ok=True)
    for meta in features.glob("[!.]*.json"):  # the array first: a sidecar is only taken with its array present
        for part in (meta.with_suffix(".npy"), meta):
            if not (shared / part.name).exists():
                shutil.copyfile(part, shared / f".{part.name}.tmp")
                os.replace(shared / f".{part.name}.tmp", shared / part.name)


def _start_worker(address: str, env: dict[str, str], worker_temp: str, log: Path) -> subprocess.Popen:
    """The worker node: `ray start --block` in its own mount namespace (fresh tmpfs over /tmp and the caches)."""
    worker_home = "/tmp/aglmn-home"
    hide = " ".join(p for p in ("/root/.cache", str(Path.home() / ".cache"), str(Path.home() / ".ray"))
                    if Path(p).is_dir())
    script = (
        "set -e; mount -t tmpfs -o size=6g tmpfs /tmp; "
        f"for d in {hide}; do mount -t tmpfs tmpfs \"$d\"; done; "
        f"mkdir -p {worker_home} {worker_temp}; cd {worker_home}; "
        f"exec {sys.executable} -c \"{RAY_ON_LOOPBACK}\" start --address={address} --node-ip-address=127.0.0.1 "
        f"--num-cpus=2 --resources='{{\"{TRIAL_RESOURCE}\": 2}}' --temp-dir={worker_temp} "
        f"--object-store-memory={200 * 1024**2} --disable-usage-stats --block")
    return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            env={**env, "HOME": worker_home, "TMPDIR": worker_home},
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _node_waiter(address: str, env: dict[str, str], n: int, timeout_s: float = 300) -> subprocess.Popen:
    """A process that exits once ``n`` nodes are alive, printing {"head": id, "worker": id} (worker: the one with
    the trial resource)."""
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
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _start_head(port: int, env: dict[str, str], head_temp: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RAY_ON_LOOPBACK, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=0", "--include-dashboard=false", f"--temp-dir={head_temp}", "--disable-usage-stats",
         f"--object-store-memory={200 * 1024**2}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


@pytest.fixture(scope="module")
def cluster(small_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """moto S3 + an mlflow server + a Ray head + a worker node in its own mount namespace, started in parallel
    where they can be (the set-up is most of this test's minutes on a 2-core machine)."""
    problem = _unshare_problem()
    if problem:
        pytest.skip(problem)
    from agl.distributed.storage import storage_filesystem

    phases = Phases()
    root = tmp_path_factory.mktemp("multinode")
    s3 = MotoServer(root / "moto").start()
    saved_env = {key: os.environ.get(key) for key in s3.env}
    os.environ.update(s3.env)  # this process reads the bucket too
    head_temp = Path(tempfile.mkdtemp(prefix="aglmn-h-", dir="/tmp"))  # short (socket paths), marks our processes
    worker_temp = f"/tmp/aglmn-w-{secrets.token_hex(4)}"                # inside the worker's own /tmp
    bucket = s3.bucket(BUCKET)
    mlflow_server = MlflowServer(root / "mlflow", artifacts=f"{bucket}/mlartifacts", env=s3.env).launch()
    workers: list[subprocess.Popen] = []  # reaped at the end (an unreaped child stays a zombie)
    try:
        port = free_port()
        address = f"127.0.0.1:{port}"
        env = {**os.environ, **s3.env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),  # this cluster's own token
               # Ray's memory monitor kills trials when the machine's memory is 95% used: here that is mostly
               # other users' memory (a shared 24 GB machine), which would fail the test for nothing it checks
               "RAY_memory_monitor_refresh_ms": "0"}
        env.pop("RAY_ADDRESS", None)
        head = _start_head(port, env, head_temp)
        # meanwhile: the store (with its feature cache) goes to the bucket
        import pyarrow.fs

        _warm_store(small_store)
        pyarrow.fs.copy_files(str(small_store), f"{BUCKET}/stores/small",
                              source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=storage_filesystem(bucket))
        phases.done("store to the bucket")
        head_log = head.communicate(timeout=300)[0]
        if head.returncode != 0 and NODE_START_TIMEOUT in head_log:
            stop_pids(pids_with(str(head_temp)))
            head = _start_head(port, env, head_temp)
            head_log = head.communicate(timeout=300)[0]
        assert head.returncode == 0, head_log[-3000:]
        phases.done("Ray head")
        nodes: dict[str, str] = {}
        for attempt in range(3):
            worker = _start_worker(address, env, worker_temp, root / "worker.log")
            workers.append(worker)
            waiter = _node_waiter(address, env, 2)
            while waiter.poll() is None and worker.poll() is None:
                time.sleep(1)
            if waiter.poll() is None:  # the worker exited before it joined: start it again if Ray timed out
                waiter.kill()
                waiter.communicate()
                stop_pids(pids_with(worker_temp))
                said = (root / "worker.log").read_text()
                assert NODE_START_TIMEOUT in said, said[-3000:]
                continue
            found = waiter.communicate()[0]
            assert waiter.returncode == 0, found[-3000:]
            nodes = json.loads([line for line in found.splitlines() if line.startswith("{")][-1])
            break
        assert set(nodes) == {"head", "worker"}, (nodes, (root / "worker.log").read_text()[-3000:])
        phases.done("worker node")
        mlflow_server.ready(timeout_s=300)
        phases.done("mlflow server (started with the head)")
        yield Cluster(address=address, env=env, nodes=nodes, s3=s3, bucket=bucket, mlflow=mlflow_server,
                      store=f"{bucket}/stores/small", phases=phases, logs=root)
    finally:
        stop_pids(pids_with(str(head_temp)) + pids_with(worker_temp))
        for worker in workers:
            worker.kill()
            worker.wait()
        mlflow_server.stop(grace_s=5)  # its database is not used after the test
        s3.stop()
        shutil.rmtree(head_temp, ignore_errors=True)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert not pids_with(str(head_temp)) and not pids_with(worker_temp)


def _interrupt_after_first_trial(command: list[str], env: dict[str, str], log: Path, timeout_s: float = 600) -> str:
    """Run the sweep driver; SIGINT it (by its PID) as soon as Tune says a trial completed; returns its log."""
    completed = re.compile(r"Trial (\S+) completed after")
    with open(log, "w") as sink:
        driver = subprocess.Popen(command, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout_s
        while not completed.search(log.read_text()):
            assert driver.poll() is None, f"the sweep ended before a trial completed:\n{log.read_text()[-6000:]}"
            assert time.time() < deadline, f"no trial completed in {timeout_s} s:\n{log.read_text()[-6000:]}"
            time.sleep(0.2)
        driver.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment to the bucket and returns
        driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    text = log.read_text()
    assert driver.returncode == 130, text[-6000:]
    return text


def _trial_runs(url: str, experiment_name: str = "agl-sweep") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(experiment_name)
    return client.search_runs([experiment.experiment_id], max_results=100)


@pytest.mark.reliability(kind="fault", case="multi-node sweep (worker node sharing no files, S3 storage): the driver is "
                                            "interrupted after its first trial and the head's sweep folder is deleted",
                         outcome="--resume with only the bucket and the tracking URI restores the sweep from the bucket "
                                 "(the finished trial is not rerun), keeps the MLflow parent run, finishes on the "
                                 "worker and registers a champion that another process loads")
def test_sweep_survives_its_head_on_a_worker_node_that_shares_no_files(cluster: Cluster, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    phases, bucket, url = cluster.phases, cluster.bucket, cluster.mlflow.url
    out = tmp_path / "head-sweep"
    storage = f"{bucket}/sweeps"
    tune_py = [sys.executable, str(REPO / "launch" / "tune.py"), "--address", cluster.address]
    driver_env = {**cluster.env, "AGL_CACHE_DIR": str(tmp_path / "driver-cache")}
    # one trial at a time, so the first finishes while the sweep still has one to run
    first = _interrupt_after_first_trial(
        tune_py + ["--space", SPACE, "--store", cluster.store, "--storage-path", storage, "--out", str(out),
                   "--trial-resource", f"{TRIAL_RESOURCE}=1", "--max-failures", "1", "--max-concurrent", "1",
                   "--tracking-uri", url], driver_env, tmp_path / "sweep.log")
    phases.done("sweep until the first trial finished, then SIGINT")
    print("\n".join(line for line in first.splitlines() if re.search(
        r"store ready on node|staging|completed after|interrupted after", line)))
    assert "interrupted after 1 of 2 trials" in first, first[-6000:]
    state = json.loads((out / "sweep.json").read_text())
    before = pd.read_csv(out / "trials.csv").set_index("trial_id")
    done_first = list(before.index[before["status"] == "finished"])
    assert len(done_first) == 1, before

    # the head is lost: its sweep folder and its staged store are gone; only the bucket and the tracker remain
    shutil.rmtree(out)
    shutil.rmtree(tmp_path / "driver-cache")
    fresh = tmp_path / "new-head"  # and the new head keeps its sweep in another folder
    resumed = subprocess.run(tune_py + ["--storage-path", storage, "--tracking-uri", url, "--out", str(fresh),
                                        "--resume"], env=driver_env, capture_output=True, text=True, timeout=900)
    log = resumed.stdout + resumed.stderr
    (tmp_path / "resume.log").write_text(log)
    phases.done("resume on a wiped head until the sweep finished")
    print("\n".join(line for line in log.splitlines() if re.search(
        r"restored the sweep|resuming sweep|resume: the sweep's own|store ready on node|completed after|registered",
        line)))
    assert resumed.returncode == 0, log[-6000:]
    assert f"restored the sweep's files from {storage}/agl-sweep.agl" in log, log[-6000:]
    assert f"resuming sweep agl-sweep from {storage}/agl-sweep (MLflow parent run {state['parent_run_id']})" in log
    again = json.loads((fresh / "sweep.json").read_text())
    assert again["parent_run_id"] == state["parent_run_id"] and again["tracking_uri"] == url
    assert again["out"] == str(fresh) and not (fresh / "mlflow-pending.json").exists()
    table = pd.read_csv(fresh / "trials.csv").set_index("trial_id")
    assert len(table) == 2 and set(table["status"]) == {"finished"}, table
    assert table.loc[done_first[0], "val_pcc"] == pytest.approx(before.loc[done_first[0], "val_pcc"])

    # the finished trial was not rerun: Tune restored it from the bucket, and MLflow got each of its epochs once
    runs = _trial_runs(url)
    parents = [r for r in runs if r.data.tags.get("agl.kind") == "sweep"]
    trials = {r.data.tags["trial_id"]: r for r in runs if r.data.tags.get("agl.kind") == "trial"}
    assert [r.info.run_id for r in parents] == [state["parent_run_id"]] and parents[0].info.status == "FINISHED"
    assert set(trials) == set(table.index) and {r.info.status for r in trials.values()} == {"FINISHED"}
    client = MlflowClient(url)
    steps = sorted(m.step for m in client.get_metric_history(trials[done_first[0]].info.run_id, "val_pcc"))
    assert steps == [1, 2], steps

    # every trial ran on the worker node (its id in each trial's final report, read back from the bucket)
    analysis = ExperimentAnalysis(f"{storage}/agl-sweep")
    ran_on = {trial.trial_id: trial.last_result.get("node_id") for trial in analysis.trials}
    print("trial -> node:", ran_on, "; worker node:", cluster.nodes["worker"])
    assert set(ran_on) == set(table.index) and set(ran_on.values()) == {cluster.nodes["worker"]}, ran_on

    # checkpoints, results, the sweep's own files and the MLflow artifacts are in the bucket
    keys = cluster.s3.keys(BUCKET)
    print("bucket:\n  " + "\n  ".join(k for k in keys if not k.startswith("stores/")))
    for trial_id in ran_on:
        mine = [k for k in keys if k.startswith("sweeps/agl-sweep/") and trial_id in k]
        assert any(k.endswith("result.json") for k in mine), mine
        assert any("/checkpoint_" in k for k in mine), mine
    assert {"sweeps/agl-sweep.agl/sweep.json", "sweeps/agl-sweep.agl/trials.csv",
            "sweeps/agl-sweep.agl/space.yaml"} <= set(keys)
    assert any(k.startswith("mlartifacts/") and k.endswith("MLmodel") for k in keys), keys

    # the champion, from a process that has only the tracking URI and the bucket
    champion = client.get_model_version_by_alias("agl-model", "champion")
    assert champion.run_id in {r.info.run_id for r in runs}, champion  # a run of this sweep (wherever it was fit)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    load = textwrap.dedent("""
        import mlflow, numpy as np
        model = mlflow.pyfunc.load_model("models:/agl-model@champion")
        print("prediction", np.asarray(model.predict(model.input_example)).shape)
    """)
    clean = {k: v for k, v in cluster.env.items() if not k.startswith(("AGL_", "RAY_"))}
    loaded = subprocess.run([sys.executable, "-c", load], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                            env={**clean, "HOME": str(elsewhere), "MLFLOW_TRACKING_URI": url})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "prediction (1," in loaded.stdout, loaded.stdout
    phases.done("checks and the champion loaded elsewhere")
    print("phases:", phases)
