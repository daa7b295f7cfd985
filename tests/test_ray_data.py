"""The ``--data ray_data`` training source on real her2st stores (C2 + C3, dense and sparse):
streaming_split shards partition the training rows and carry exactly the per-batch path's
targets (the split's genes only), validation/test stay on the per-batch path, and a store at an
s3:// URI (moto on 127.0.0.1) is read in place through its pyarrow filesystem."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from agl.data.store import open_store
from agl.distributed.train import ShardBundle, read_train_part
from agl.training.streaming import StoreTargets
from servers import MotoServer

SPLIT = "kfold-s0-f0"


@pytest.fixture(scope="module")
def s3_ray(tmp_path_factory):
    """moto's S3, then a local Ray whose workers inherit its endpoint and dummy credentials."""
    import ray

    from agl.distributed.runtime import init_ray

    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    with pytest.MonkeyPatch.context() as env:  # restored after the module
        for key, value in {**server.env, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}.items():
            env.setenv(key, value)
        init_ray(num_cpus=2, object_store_memory=300 * 1024**2)
        try:
            yield server
        finally:
            ray.shutdown()
            server.stop()


@pytest.fixture(scope="module")
def stores(her2st_dir, small_store, tmp_path_factory) -> dict[str, Path]:
    """The session's dense small store and the same slides ingested with sparse expression."""
    from agl.data.ingest import build_store
    from agl.data.readers import read_her2st

    sparse = build_store(read_her2st(her2st_dir, ["C2", "C3"]), tmp_path_factory.mktemp("sparse") / "small",
                         patch_px=32, seeds=(0,), split_kinds=("kfold",), expression_layout="sparse")
    return {"dense": small_store, "sparse": sparse}


def _consume(shards, batch_size: int = 64) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """(row, expression) batches of every shard, the shards read at once (streaming_split needs that)."""
    got: list[list] = [[] for _ in shards]
    errors: list[BaseException] = []

    def read(i: int) -> None:
        try:
            for batch in shards[i].iter_batches(batch_size=batch_size, batch_format="numpy"):
                got[i].append((np.asarray(batch["row"]), np.stack(batch["expression"])))
        except BaseException as err:  # re-raised in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    return got


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_worker_shards_partition_the_training_rows_with_the_per_batch_targets(s3_ray, stores, layout) -> None:
    store = open_store(stores[layout])
    columns = store.gene_set(SPLIT)["column"].to_numpy()
    assert not np.array_equal(columns, np.arange(len(columns)))  # the gene set's order, not the store's
    targets = StoreTargets(store, columns)
    shards = read_train_part(stores[layout], SPLIT).streaming_split(2, equal=True)  # what Ray Train hands 2 workers
    got = _consume(shards)
    rows = [np.concatenate([r for r, _ in shard]) for shard in got]
    for shard in got:
        for r, expression in shard:
            assert expression.dtype == np.float32 and expression.shape == (len(r), len(columns))
            np.testing.assert_array_equal(expression, targets[r])  # the bundle's gene order and values
    train = store.rows(SPLIT, "train")
    assert len(rows[0]) == len(rows[1]) > 0  # equal shards keep the ranks' all-reduces in step
    assert not set(rows[0]) & set(rows[1])  # each worker reads only its own rows
    assert set(rows[0]) | set(rows[1]) <= set(train) and len(rows[0]) * 2 >= len(train) - 1
    from agl.data.loaders import ray_dataset

    every = ray_dataset(store, SPLIT, "val", columns=("row", "expression")).take_batch(5)  # all the store's genes
    np.testing.assert_array_equal(every["expression"], store.expression_rows(every["row"]))


def test_shard_bundle_trains_on_its_shard_and_evaluates_per_batch(s3_ray, stores) -> None:
    from agl.training.bundles import make_bundle
    from agl.training.loop import TrainConfig

    cfg = TrainConfig.from_dict({"mode": "finetune", "device": "cpu", "epochs": 1, "seed": 0})
    base = make_bundle(stores["sparse"], SPLIT, cfg, rank=0, world_size=1)
    assert isinstance(base.targets, StoreTargets)  # validation and test targets are read per batch
    with pytest.raises(TypeError, match="read per batch"):
        np.asarray(base.targets)  # nothing of size spots x genes is ever built
    shard = ShardBundle(base, read_train_part(stores["sparse"], SPLIT).iterator(), base.genes["column"].to_numpy())
    assert shard.eval_batches.__self__ is base  # fit's evaluation streams the base bundle's chunks
    ys = [y.numpy() for _, y in shard.train_batches(64, epoch=0)]
    train = base.parts["train"]
    assert sum(len(y) for y in ys) == len(train)  # one worker: every training spot once
    np.testing.assert_allclose(np.concatenate(ys).sum(0), base.targets[train].sum(0), rtol=1e-5, atol=1e-3)


@pytest.mark.reliability(kind="use", case="--data ray_data with --store s3://BUCKET/KEY (no node-local copy of "
                                             "the training table)",
                         outcome="Ray Data reads the training rows' Parquet files from the bucket through the URI's "
                                 "pyarrow filesystem; the rows and targets equal the local store's")
def test_store_uri_training_table_is_read_from_the_bucket(s3_ray, stores, tmp_path: Path) -> None:
    import pyarrow.fs

    from agl.distributed.storage import fs_path, storage_filesystem

    uri = s3_ray.bucket("agl-data") + "/stores/small-sparse"
    pyarrow.fs.copy_files(str(stores["sparse"]), fs_path(uri), source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=storage_filesystem(uri))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AGL_CACHE_DIR", str(tmp_path / "node-cache"))  # this node's staged copy: metadata only
        ds = read_train_part(uri, SPLIT)
    (staged,) = [p for p in (tmp_path / "node-cache" / "stores").iterdir() if not p.name.startswith(".")]
    shutil.rmtree(staged / "spots")  # the node's copy of the table is gone: the rows can only come from the bucket
    local = open_store(stores["sparse"])
    targets = StoreTargets(local, local.gene_set(SPLIT)["column"].to_numpy())
    (batches,) = _consume([ds.iterator()])
    rows = np.concatenate([r for r, _ in batches])
    assert sorted(rows.tolist()) == local.rows(SPLIT, "train").tolist()
    for r, expression in batches:
        np.testing.assert_array_equal(expression, targets[r])


def test_every_trial_body_trains_on_the_per_batch_path(demo_store, monkeypatch) -> None:
    """Tune's function trials (agl_trial, agl_cv_trial) and Ray Train workers (train_func) all build their data with
    service.run_config; it reads targets and features per batch, never the in-memory bundle."""
    import inspect

    from agl.distributed import cv, train, tune
    from agl.service import run_config
    from agl.training.streaming import MappedFeatureInputs
    from trainkit import small_config

    for body in (tune.agl_trial, cv.agl_cv_trial, train.train_func):
        assert "run_config(" in inspect.getsource(body) and "in_memory" not in inspect.getsource(body)
    run = run_config(small_config(method="pgl", epochs=1, mode="features", weights="imagenet"), demo_store,
                     "kfold-s0-f0", rank=0, world_size=1)
    assert isinstance(run.data.targets, StoreTargets) and isinstance(run.data.inputs, MappedFeatureInputs)
