"""Cluster storage without a cluster: S3 (moto on 127.0.0.1) checkpoint paths, the local-storage refusal,
a store staged once per node from a storage URI, and the per-node store check before any trial."""
from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path

import pytest

from agl.errors import ConfigError, DataError
from servers import MotoServer


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> MotoServer:
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _upload(local: Path, uri: str) -> None:
    import pyarrow.fs

    from agl.distributed.storage import fs_path, storage_filesystem

    pyarrow.fs.copy_files(str(local), fs_path(uri), source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=storage_filesystem(uri))


@pytest.mark.reliability(kind="fault", case="--trainer train with --storage-path s3://...: Ray Train reports the "
                                            "checkpoint path as bucket/key, without its scheme",
                         outcome="the run folder is opened on the sweep's S3 filesystem (trials.csv and champion "
                                 "written), not ArrowInvalid: URI has empty scheme")
def test_train_checkpoint_path_without_scheme_opens_on_s3(s3: MotoServer, small_store: Path) -> None:
    from agl.distributed.storage import storage_filesystem
    from agl.distributed.sync import TrialView

    bucket = s3.bucket("agl-ckpt")
    _upload(small_store / "genes.parquet", f"{bucket}/sweep/train-t1/checkpoint_000001/genes.parquet")

    class Result:  # what ResultGrid yields for a nested-TorchTrainer trial (no Tune checkpoint of its own)
        metrics = {"final": True, "checkpoint_path": "agl-ckpt/sweep/train-t1/checkpoint_000001", "trial_id": "t1"}
        metrics_dataframe = None
        checkpoint = None
        config = {}
        path = "agl-ckpt/sweep/t1"
        error = None
        filesystem = storage_filesystem(bucket)

    view = TrialView.from_result(Result())
    with view.checkpoint.as_directory() as local:
        assert (Path(local) / "genes.parquet").read_bytes() == (small_store / "genes.parquet").read_bytes()


@pytest.mark.reliability(kind="bad input", case="--address of a multi-node cluster with a local --storage-path "
                                                "(or none: OUT/ray)",
                         outcome="refused before any trial, naming --storage-path and asking for s3://... or a "
                                 "shared mount")
def test_local_storage_refused_on_a_multi_node_cluster(tmp_path: Path) -> None:
    from agl.distributed.storage import check_storage_path

    with pytest.raises(ConfigError, match=r"--storage-path: .*local folder.*2 nodes.*s3://"):
        check_storage_path(str(tmp_path / "ray"), "auto", nodes=2)
    check_storage_path(str(tmp_path / "ray"), "auto", nodes=1)          # one node: its disk is the cluster's
    check_storage_path(str(tmp_path / "ray"), None, nodes=1)            # local Ray
    check_storage_path("s3://bucket/sweeps", "10.0.0.1:6379", nodes=4)  # a URI every node reaches


def test_store_uri_is_staged_once_per_node(s3: MotoServer, small_store: Path, tmp_path: Path) -> None:
    from agl.data.store import open_store
    from agl.distributed.storage import node_store, stage_store

    uri = s3.bucket("agl-stores") + "/stores/small"
    _upload(small_store, uri)
    cache = tmp_path / "node-cache"
    found: list[Path] = []
    threads = [threading.Thread(target=lambda: found.append(stage_store(uri, cache))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 1 and len(found) == 3  # three trials of one node share one copy
    staged = found[0]
    assert [p.name for p in (cache / "stores").iterdir() if not p.name.startswith(".")] == [staged.name]
    assert not [p for p in (cache / "stores").iterdir() if ".part-" in p.name]  # no half copy left
    assert open_store(staged).manifest == open_store(small_store).manifest
    before = staged.stat().st_mtime_ns
    assert stage_store(uri, cache) == staged and staged.stat().st_mtime_ns == before  # not copied again
    os.environ["AGL_CACHE_DIR"] = str(cache)
    try:
        assert node_store(uri) == str(staged)
    finally:
        del os.environ["AGL_CACHE_DIR"]


@pytest.mark.reliability(kind="bad input", case="--store s3://BUCKET/KEY that holds no store",
                         outcome="DataError naming s3://BUCKET/KEY/manifest.json, before any trial")
def test_missing_store_uri_is_named(s3: MotoServer, tmp_path: Path) -> None:
    from agl.distributed.storage import stage_store

    uri = s3.bucket("agl-empty") + "/stores/none"
    with pytest.raises(DataError, match=r"s3://agl-empty/stores/none/manifest.json: cannot read it"):
        stage_store(uri, tmp_path)
    assert not list(tmp_path.rglob("manifest.json"))


@pytest.mark.reliability(kind="bad input", case="--store PATH on a cluster whose trial nodes lack PATH",
                         outcome="one DataError naming the node and the missing manifest.json before any trial "
                                 "starts (not every trial failing twice)")
def test_store_missing_on_a_node_is_named_before_any_trial(ray_local, tmp_path: Path) -> None:
    from agl.distributed.spaces import load_space
    from agl.distributed.storage import prepare_nodes
    from agl.distributed.tune import warm_caches

    missing = tmp_path / "not-here"
    with pytest.raises(DataError, match=r"not usable on 1 of 1 nodes.*node 127\.0\.0\.1 .*not-here/manifest.json"):
        prepare_nodes(str(missing), {"CPU": 1.0}, warm=functools.partial(warm_caches, space=load_space("tiny")))


def test_sweep_files_round_trip_through_the_bucket(s3: MotoServer, tmp_path: Path) -> None:
    """What a lost head would lose (sweep.json, trial table, summary, champion folder) is in the bucket."""
    from agl.distributed.storage import fetch_from_storage, mirror_to_storage, state_uri

    storage = s3.bucket("agl-state") + "/sweeps"
    head = tmp_path / "head"
    (head / "champion").mkdir(parents=True)
    (head / "sweep.json").write_text('{"name": "s", "parent_run_id": "p1"}')
    (head / "trials.csv").write_text("trial_id,status\nt1,finished\n")
    (head / "champion" / "result.json").write_text('{"metrics": {}}')
    mirror_to_storage(head, storage, "s", ["sweep.json", "trials.csv", "summary.md", "champion"])  # no summary yet
    assert s3.keys("agl-state") == ["sweeps/s.agl/champion/result.json", "sweeps/s.agl/sweep.json",
                                    "sweeps/s.agl/trials.csv"]
    fresh = tmp_path / "fresh-head"
    assert fetch_from_storage(fresh, storage, "s")
    assert sorted(str(p.relative_to(fresh)) for p in fresh.rglob("*") if p.is_file()) == [
        "champion/result.json", "sweep.json", "trials.csv"]
    assert (fresh / "sweep.json").read_text() == (head / "sweep.json").read_text()
    assert not fetch_from_storage(tmp_path / "other", storage, "nope") and not (tmp_path / "other").exists()
    assert state_uri(storage, "s") == "s3://agl-state/sweeps/s.agl"


@pytest.mark.reliability(kind="bad input", case="--resume on a fresh head where neither --out nor the bucket holds "
                                                "the sweep, or where Tune cannot restore it",
                         outcome="ConfigError naming what is missing, before Ray or MLflow is touched; never a new sweep")
def test_a_resume_that_cannot_restore_is_an_error(s3: MotoServer, small_store: Path, tmp_path: Path) -> None:
    from agl.distributed.tune import SweepOptions, run_sweep
    from agl.fileio import write_output_marker

    storage = s3.bucket("agl-resume") + "/sweeps"
    out = tmp_path / "sweep"
    opts = SweepOptions(space="tiny", store=str(small_store), out=str(out), resume=True, storage_path=storage,
                        tracking_uri="http://127.0.0.1:9")  # never reached: the refusal comes first
    with pytest.raises(ConfigError, match=r"no sweep to resume: .*sweep.json nor s3://agl-resume/sweeps/agl-sweep"
                                          r"\.agl/sweep.json"):
        run_sweep(opts)
    assert not (out / "sweep.json").exists()
    out.mkdir()
    write_output_marker(out, "tune", name="agl-sweep")
    (out / "sweep.json").write_text('{"name": "agl-sweep", "out": "%s", "parent_run_id": "p", "experiment_id": "1", '
                                    '"tracking_uri": "http://127.0.0.1:9", "storage_path": "%s"}' % (out, storage))
    with pytest.raises(ConfigError, match=r"agl-sweep: --resume: Ray Tune finds no experiment state"):
        run_sweep(opts)
    assert json.loads((out / "sweep.json").read_text())["parent_run_id"] == "p"  # not replaced by a new sweep


@pytest.mark.reliability(kind="bad input", case="--resume on a fresh head with only --storage-path, or with a "
                                                "--space / --num-samples other than the sweep's own",
                         outcome="without the flags the sweep's own settings (space file as it started, store, trial "
                                 "resources, checkpoint interval) are used; another value is refused naming the flag "
                                 "and the sweep's own value")
def test_a_resume_takes_the_sweeps_own_settings(tmp_path: Path) -> None:
    from dataclasses import asdict

    from agl.distributed.spaces import SPACES_DIR
    from agl.distributed.tune import SweepOptions, resumed_options

    out = tmp_path / "new-head"
    out.mkdir()
    (out / "space.yaml").write_text((SPACES_DIR / "tiny.yaml").read_text())  # the copy fetched from the bucket
    started = SweepOptions(space="tiny", store="s3://b/stores/small", num_samples=3, trial_resources={"node": 1.0},
                           checkpoint_every=2, model_name="m", out="/gone/head-sweep")
    state = {"options": json.loads(json.dumps(asdict(started)))}
    # (store="demo": the command line's default, as launch/tune.py passes it)
    fresh = resumed_options(SweepOptions(out=str(out), resume=True, storage_path="s3://b/sweeps", store="demo"),
                            state, out)
    assert (fresh.store, fresh.num_samples, fresh.trial_resources, fresh.checkpoint_every, fresh.model_name) == (
        "s3://b/stores/small", 3, {"node": 1.0}, 2, "m")
    assert (fresh.space, fresh.out, fresh.storage_path) == (str(out / "space.yaml"), str(out), "s3://b/sweeps")
    # the same settings given again are fine (the space compared by content), a store that moved is taken
    again = resumed_options(SweepOptions(space=str(SPACES_DIR / "tiny.yaml"), num_samples=3, store="/here/small",
                                         resume=True), state, out)
    assert again.store == "/here/small" and again.space == str(out / "space.yaml")
    with pytest.raises(ConfigError, match=r"--space: 'large' is not this sweep's own 'tiny' .*leave the flag out"):
        resumed_options(SweepOptions(space="large", resume=True), state, out)
    with pytest.raises(ConfigError, match=r"--num-samples: 5 is not this sweep's own 3"):
        resumed_options(SweepOptions(num_samples=5, resume=True), state, out)


def test_mlflow_artifacts_go_to_the_bucket(s3: MotoServer, tmp_path: Path) -> None:
    from agl.tracking import make_tracker

    tracker = make_tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = s3.bucket("agl-art") + "/sweeps/s.agl/mlartifacts"
    experiment = tracker.experiment("e", artifact_root=root)
    assert tracker.client.get_experiment(experiment).artifact_location == root
