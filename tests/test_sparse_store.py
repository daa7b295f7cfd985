"""The sparse expression layout's compact encoding (agl.data.encoding) on real her2st counts.

Counts are stored as uint16 (uint32 once a count exceeds 65,535) with uint16 gene indices and
a float32 count -> value table; what is read must be bit for bit what the dense layout holds.
Stores written before the encoding (int32 indices, float32 values) must stay readable.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from agl.data.encoding import LEGACY, ValueEncoding, counts_encoding
from agl.data.ingest import build_store
from agl.data.loaders import densify_csr_lists
from agl.data.readers import read_her2st
from agl.data.store import _write_ipc, open_store
from agl.errors import DataError

SETTINGS = dict(patch_px=16, seeds=(0,), split_kinds=("kfold",))


@pytest.fixture(scope="module")
def b4(her2st_dir):
    return read_her2st(her2st_dir, ["B4"])


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _pair(adata, tmp_path, **kw):
    dense = open_store(build_store(adata, tmp_path / "dense", **SETTINGS, **kw))
    sparse = open_store(build_store(adata, tmp_path / "sparse", **SETTINGS, **kw, expression_layout="sparse"),
                        verify=True)
    return dense, sparse


def _partition_rows(store):
    """Every partition's expression lists densified as the Ray Data path does, in row order."""
    enc = store.expression_encoding
    out = {}
    for f in sorted((store.path / "spots").glob("slide_id=*/part-0.parquet")):
        t = pq.read_table(f, columns=["row", "expression_indices", enc.column])
        dense = densify_csr_lists(t.column("expression_indices"), t.column(enc.column), store.manifest["n_genes"],
                                  enc, store.expression_table)
        out.update(zip(t.column("row").to_numpy(), dense))
    return np.stack([out[r] for r in range(len(out))])


@pytest.mark.parametrize("big_count", [None, 70_000])
def test_count_encoding_reads_back_exactly(b4, tmp_path, big_count):
    adata = b4.copy()
    if big_count is not None:  # one real count raised above 65,535: the store must switch to uint32
        x = sp.csr_matrix(adata.X)
        x.data[int(np.argmax(x.data))] = big_count
        adata.X = x
    dense, sparse = _pair(adata, tmp_path)
    enc = sparse.expression_encoding
    assert enc.indices == "uint16" and enc.transform == "log1p"
    assert enc.values == ("uint16" if big_count is None else "uint32")
    assert enc.max_count == (big_count or int(sp.csr_matrix(b4.X).max()))
    assert _same_bits(sparse.expression, dense.expression)
    if big_count is not None:  # the raised count survived preprocessing: the uint32 path is exercised
        assert dense.expression.max() == np.log1p(np.float32(big_count))
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(sparse.manifest["n_spots"], 64, replace=False))
    cols = sparse.gene_set("kfold-s0-f0")["column"].to_numpy()
    assert _same_bits(sparse.expression_rows(rows, cols), np.take(dense.expression[rows], cols, axis=1))
    assert _same_bits(sparse.expression_rows(rows[::-1]), dense.expression[rows[::-1]])  # any row order
    assert _same_bits(sparse.expression_rows(rows, np.array([5, 5, 0])), dense.expression[rows][:, [5, 5, 0]])
    assert _same_bits(_partition_rows(sparse), dense.expression)
    # what is on disk: the recorded dtypes, Parquet lists of them, zstd
    arrays = sparse.path / "arrays"
    assert not (arrays / "expression_values.arrow").exists()
    part = next((sparse.path / "spots").glob("*/part-0.parquet"))
    schema = pq.read_schema(part)
    assert str(schema.field("expression_indices").type.value_type) == "uint16"
    assert str(schema.field("expression_counts").type.value_type) == enc.values
    meta = pq.ParquetFile(part).metadata.row_group(0)
    codecs = {meta.column(i).path_in_schema: meta.column(i).compression for i in range(meta.num_columns)}
    assert codecs["expression_indices.list.element"] == codecs["expression_counts.list.element"] == "ZSTD"
    assert codecs["patch.list.element"] == "UNCOMPRESSED"
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert "DELTA_BINARY_PACKED" in encodings["expression_indices.list.element"]  # ascending gaps, not a dictionary
    sparse_bytes = sum(f.stat().st_size for f in arrays.glob("expression_*.arrow"))
    dense_bytes = (dense.path / "arrays" / "expression.arrow").stat().st_size
    print(f"sparse/dense expression arrays {sparse_bytes / dense_bytes:.3f} ({enc.values} counts)")
    assert sparse_bytes < 0.3 * dense_bytes


def test_non_integer_values_keep_float32(b4, tmp_path):
    dense, sparse = _pair(b4, tmp_path, normalize_total=1e4)  # ratios: not a function of the count
    assert sparse.expression_encoding.values == "float32" and sparse.expression_encoding.indices == "uint16"
    assert (sparse.path / "arrays" / "expression_values.arrow").is_file()
    assert _same_bits(sparse.expression, dense.expression)
    assert _same_bits(_partition_rows(sparse), dense.expression)


def test_encode_refuses_values_it_would_change():
    enc = counts_encoding(100, 10, "log1p")
    table = enc.table()
    assert np.array_equal(enc.encode(np.log1p(np.float32([1, 10])), table), [1, 10])
    with pytest.raises(DataError, match="not log1p"):
        enc.encode(np.float32([0.5]), table)          # not log1p of an integer
    with pytest.raises(DataError, match="not log1p"):
        enc.encode(np.log1p(np.float32([11])), table)  # above the table
    off_by_one_bit = (np.log1p(np.float32([3])).view(np.uint32) + 1).view(np.float32)
    with pytest.raises(DataError, match="not log1p"):  # bitwise, not to a tolerance
        enc.encode(off_by_one_bit, table)


def test_unknown_encoding_is_refused_by_name(b4, tmp_path):
    _dense, sparse = _pair(b4, tmp_path)
    manifest = json.loads((sparse.path / "manifest.json").read_text())
    manifest["expression_encoding"]["values"] = "float16"
    (sparse.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest.json.*not one this agl reads.*rebuild the store with agl ingest"):
        open_store(sparse.path).expression_rows(np.array([0]))


def test_stores_written_before_the_encoding_stay_readable(b4, tmp_path):
    """A sparse store as the earlier writer left it: int32 indices, float32 values, no encoding recorded."""
    dense, sparse = _pair(b4, tmp_path)
    legacy = tmp_path / "legacy"
    shutil.copytree(sparse.path, legacy)
    csr = sparse.expression_csr
    arrays = legacy / "arrays"
    for name in ("expression_counts", "expression_table", "expression_indices"):
        (arrays / f"{name}.arrow").unlink()
    _write_ipc(arrays / "expression_indices.arrow", "indices", csr.indices.astype(np.int32))
    _write_ipc(arrays / "expression_values.arrow", "values", csr.data.astype(np.float32))
    manifest = json.loads((legacy / "manifest.json").read_text())
    del manifest["expression_encoding"]
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    old = open_store(legacy)
    assert old.expression_encoding == LEGACY and old.expression_table is None
    assert _same_bits(old.expression, dense.expression)
    rows = np.array([0, 9, 3])
    assert _same_bits(old.expression_rows(rows, np.array([2, 1])), dense.expression[rows][:, [2, 1]])
    # the earlier partitions' lists (int32 indices, float32 values) through the Ray Data densifier
    import pyarrow as pa

    offsets = pa.array(csr.indptr[:4].astype(np.int32))
    lists = lambda values: pa.chunked_array([pa.ListArray.from_arrays(offsets, pa.array(values))])  # noqa: E731
    got = densify_csr_lists(lists(csr.indices[:csr.indptr[3]].astype(np.int32)), lists(csr.data[:csr.indptr[3]]),
                            csr.shape[1])
    assert _same_bits(got, dense.expression[:3])
    assert ValueEncoding.from_manifest({}) == LEGACY
