"""The store on real her2st data: layout, zero-copy views, hashes, versions, atomic writes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from agl.data.readers import read_her2st
from agl.data.store import SCHEMA_VERSION, StoreExistsError, open_store, write_store
from agl.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def store(small_store):
    return open_store(small_store)


def test_layout(store, small_store):
    files = {p.relative_to(small_store).as_posix() for p in small_store.rglob("*") if p.is_file()}
    assert {"manifest.json", "genes.parquet", "split_table.parquet", "arrays/patches.arrow",
            "arrays/expression.arrow", "spots/slide_id=C2/part-0.parquet",
            "spots/slide_id=C3/part-0.parquet"} <= files
    assert {f"gene_sets/{s}.parquet" for s in store.split_names} <= files
    assert (small_store / "cache").is_dir() and store.cache_dir == small_store / "cache"
    m = store.manifest
    assert m["schema_version"] == SCHEMA_VERSION and m["patch"]["patch_px"] == 32
    # cache/ holds what runs derive from the store (feature caches, the integrity stamp): not in the manifest
    assert set(m["files"]) == {f for f in files if not f.startswith("cache/")} - {"manifest.json"}
    assert all(s["sha256"] and s["bytes"] > 0 for s in m["sources"])
    assert {"min_genes", "min_cells", "log1p", "normalize_total"} <= set(m["preprocessing"])
    # no temporary folders left beside the store
    assert [p.name for p in small_store.parent.iterdir()] == ["small"]


def test_parquet_matches_memory_mapped_arrays(store, small_store):
    ds = pads.dataset(small_store / "spots", partitioning="hive")
    schema = ds.schema
    assert str(schema.field("patch").type) == "fixed_size_list<element: uint8>[3072]"
    assert str(schema.field("expression").type) == f"fixed_size_list<element: float>[{store.manifest['n_genes']}]"
    table = ds.to_table().sort_by("row")
    n = store.manifest["n_spots"]
    patches = table["patch"].combine_chunks().values.to_numpy().reshape(n, 32, 32, 3)
    expression = table["expression"].combine_chunks().values.to_numpy().reshape(n, -1)
    assert np.array_equal(patches, store.patches) and np.array_equal(expression, store.expression)
    assert table["spot_id"].to_pylist() == store.spots["spot_id"].tolist()


def test_views_are_zero_copy_and_read_only(store):
    for arr in (store.patches, store.expression):
        assert not arr.flags.owndata and not arr.flags.writeable
    assert store.patches.dtype == np.uint8 and store.patches.shape[1:] == (32, 32, 3)
    assert store.expression.dtype == np.float32


def test_content_matches_the_input(store, her2st_dir):
    raw = read_her2st(her2st_dir, ["C2", "C3"], require_image=False)
    spots = store.spots
    assert list(spots.columns) == ["spot_id", "slide_id", "barcode", "pixel_x", "pixel_y", "row"]
    assert spots["row"].tolist() == list(range(len(spots)))
    # expression = log1p(raw counts) of the kept genes, in genes.parquet order
    genes = store.gene_names
    expected = np.log1p(raw[spots["spot_id"], genes].X.toarray())
    np.testing.assert_allclose(store.expression, expected, rtol=1e-6)
    assert store.genes["n_spots"].tolist() == (expected > 0).sum(0).tolist()


def test_splits_and_gene_sets(store):
    assert store.split_names[:2] == ["kfold-s0-f0", "kfold-s0-f1"] and "loso-C2" in store.split_names
    roles = store.split("kfold-s0-f0")
    assert len(roles) == store.manifest["n_spots"] and set(roles) == {"train", "val", "test"}
    assert np.array_equal(store.rows("kfold-s0-f0", "test"), np.flatnonzero(roles == "test"))
    gs = store.gene_set("spatial-s0-f2")
    assert list(gs.columns[:3]) == ["gene", "column", "role"] and (gs["role"][:50] == "primary").all()
    assert [store.gene_names[c] for c in gs["column"]] == gs["gene"].tolist()
    with pytest.raises(ConfigError, match="unknown split 'nope'"):
        store.split("nope")


def test_verify_detects_a_modified_file(small_store, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_store, copy)
    open_store(copy).verify()
    with open(copy / "split_table.parquet", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(DataError, match="split_table.parquet: sha256 differs"):
        open_store(copy).verify()


def test_foreign_schema_version(small_store, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_store, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest\.json: schema_version 99"):
        open_store(copy)
    with pytest.raises(DataError, match=r"manifest\.json: missing"):
        open_store(tmp_path)


def _inputs(store):
    n = store.manifest["n_spots"]
    return dict(spots=store.spots, patches=np.asarray(store.patches), expression=np.asarray(store.expression),
                genes=store.genes, splits=pd.DataFrame({"kfold-s0-f0": store.split("kfold-s0-f0")}),
                gene_sets={"kfold-s0-f0": store.gene_set("kfold-s0-f0")}) if n else {}


def test_overwrite_rules_and_atomic_swap(store, tmp_path, monkeypatch):
    out = tmp_path / "st"
    write_store(out, **_inputs(store), manifest={"tag": "first"})
    with pytest.raises(StoreExistsError, match="already exists"):
        write_store(out, **_inputs(store))

    # a failure in the middle of an overwrite leaves the old store intact and no temp folder
    import agl.data.store as store_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(store_mod, "_write_ipc", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_store(out, **_inputs(store), manifest={"tag": "second"}, overwrite=True)
    monkeypatch.undo()
    assert open_store(out).manifest["tag"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]

    write_store(out, **_inputs(store), manifest={"tag": "third"}, overwrite=True)
    assert open_store(out).manifest["tag"] == "third"
    open_store(out).verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]

    # never replace a folder that is not a store
    user = tmp_path / "results"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not an agl store"):
        write_store(user, **_inputs(store), overwrite=True)
    assert (user / "notes.txt").read_text() == "mine"


def test_rejects_inconsistent_inputs(store, tmp_path):
    bad = _inputs(store)
    bad["expression"] = bad["expression"][:-1]
    with pytest.raises(DataError, match="row counts differ"):
        write_store(tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()
    bad = _inputs(store)
    bad["gene_sets"] = {}
    with pytest.raises(DataError, match="no gene set"):
        write_store(tmp_path / "x", **bad)


def test_patch_array_past_two_to_the_31_values(tmp_path):
    """A patch array of more than 2^31 - 1 uint8 values (14,267 patches of 224 px) is written (streamed and in one
    piece) and memory-mapped back zero-copy; Arrow's IPC writer refuses it without 64-bit lengths (issue 11: the
    scale bench failed at N = 16). Writes two 2.1 GB files, deleted at the end."""
    from agl.data.store import _read_ipc, _write_ipc, write_ipc_blocks

    shape = (14_267, 224, 224, 3)
    assert np.prod(shape, dtype=np.int64) > 2**31 - 1
    last = np.arange(np.prod(shape[1:]), dtype=np.int64).astype(np.uint8).reshape(shape[1:])
    block = np.zeros((4096, *shape[1:]), dtype=np.uint8)  # every block but the last is a view of these zeros

    def blocks():
        for start in range(0, shape[0], len(block)):
            part = block[:min(len(block), shape[0] - start)]
            if start + len(part) == shape[0]:
                part = part.copy()
                part[-1] = last
            yield part

    streamed, whole = tmp_path / "streamed.arrow", tmp_path / "whole.arrow"
    try:
        write_ipc_blocks(streamed, "patch", shape, np.uint8, blocks())
        mapped = _read_ipc(streamed)
        assert mapped.shape == shape and not mapped.flags.writeable and not mapped.flags.owndata
        assert np.array_equal(mapped[-1], last) and not mapped[-2].any() and not mapped[0].any()
        del mapped
        values = np.zeros(shape, dtype=np.uint8)  # untouched pages: no resident memory
        values[-1] = last
        _write_ipc(whole, "patch", values)
        del values
        mapped = _read_ipc(whole)
        assert mapped.shape == shape and np.array_equal(mapped[-1], last) and not mapped[0].any()
        del mapped
    finally:
        streamed.unlink(missing_ok=True)
        whole.unlink(missing_ok=True)
