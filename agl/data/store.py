"""The on-disk store: Parquet partitioned by slide (for Ray Data) + memory-mapped Arrow IPC.

Layout (docs/architecture.md)::

    STORE/manifest.json  genes.parquet  split_table.parquet  gene_sets/SPLIT.parquet
    STORE/spots/slide_id=S/part-0.parquet   (spot table with patch and expression vectors)
    STORE/arrays/patches.arrow  arrays/expression.arrow  (uncompressed, one record batch)
    STORE/cache/                 (derived data, safe to delete, not hashed)

``split_table.parquet`` holds the splits compactly (``agl.data.splits.SplitTable``: slide codes,
the loso validation mask, int8 fold ids per kind and seed), read one column at a time; stores
written before it hold ``splits.parquet`` (one string column of roles per split), which is
still read, one split's column at a time.

``write_store`` builds everything in a hidden temporary folder beside the target and
renames it into place at the end, so a crash never leaves a half store under the
target name. ``open_store`` checks the schema version; ``Store.verify`` the sha256
of every file listed in the manifest.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import mmap
import os
import re
import shutil
import uuid
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from agl.data.encoding import ValueEncoding, detect_encoding
from agl.data.splits import ROLE_CODES, SplitTable, role_codes
from agl.errors import ConfigError, DataError, OutputExistsError, show
from agl.fileio import sha256_file, swap_folder

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPOT_COLUMNS = ("spot_id", "slide_id", "barcode", "pixel_x", "pixel_y", "row")
EXPRESSION_LAYOUTS = ("dense", "sparse")  # float32 rows, or CSR per spot (indices + values)
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # slide ids and split names become file names
SPLIT_TABLE = "split_table.parquet"  # the compact splits (agl.data.splits.SplitTable)
ROLE_COLUMNS = "splits.parquet"  # the splits of stores written before SPLIT_TABLE: a string column of roles per split
SPLIT_LAYOUT_KEY = "agl_split_layout"  # schema metadata of SPLIT_TABLE: SplitTable.layout()


class StoreExistsError(OutputExistsError):
    """The target folder already exists and ``overwrite`` was not given."""


def agl_version() -> str:
    try:
        return metadata.version("agl")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def gene_list_hash(genes: list[str] | pd.Index) -> str:
    return hashlib.sha256("\n".join(map(str, genes)).encode()).hexdigest()


def check_target(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any expensive work) if writing ``out`` would clobber something."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise StoreExistsError(out, "already exists; pass overwrite=True (agl ingest --overwrite) to replace it")
        if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
            raise DataError(out, "exists and is not an agl store; refusing to replace it")
    return out


def _fixed_list(values: np.ndarray) -> pa.FixedSizeListArray:
    """[N, ...] numpy -> fixed_size_list<dtype>[prod(...)] without copying the data."""
    flat = np.ascontiguousarray(values).reshape(len(values), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


# Arrow's IPC writer refuses arrays of more than 2^31 - 1 values unless told otherwise: a patch array passes that
# at 14,266 patches of 224 px; lengths and the fixed-size-list layout are 64-bit, so readers need nothing else
IPC_OPTIONS = pa.ipc.IpcWriteOptions(allow_64bit=True)


def _write_ipc(path: Path, name: str, values: np.ndarray) -> None:
    # one record batch, no compression: the reader maps it as one contiguous zero-copy array
    table = pa.table({name: _fixed_list(values)})
    table = table.replace_schema_metadata({"shape": json.dumps(list(values.shape)),
                                           "dtype": str(values.dtype)})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=IPC_OPTIONS) as writer:
        writer.write_table(table, max_chunksize=max(len(values), 1))


def _read_ipc(path: Path) -> np.ndarray:
    """Zero-copy, read-only numpy view of an array written by ``_write_ipc``."""
    if not path.is_file():
        raise DataError(path, "missing from the store")
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        meta = reader.schema.metadata or {}
        shape = json.loads(meta[b"shape"])
        if reader.num_record_batches != 1:
            raise ValueError(f"expected 1 record batch, found {reader.num_record_batches}")
        column = reader.get_batch(0).column(0)
        flat = column.values.to_numpy(zero_copy_only=True)
    except (OSError, KeyError, ValueError, pa.ArrowException) as err:
        raise DataError(path, f"cannot memory-map the array: {err}") from err
    return flat.reshape(shape)


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), str(path), compression="zstd")


def write_ipc_blocks(path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype | type,
                     blocks: Iterable[np.ndarray]) -> None:
    """Write an array of ``shape`` as ``_write_ipc`` does, from consecutive row blocks, in bounded memory.

    pyarrow writes the file first over an anonymous zero mapping (its pages are the
    kernel's shared zero page, so they cost no resident memory), which lays out the one
    record batch; the rows are then written into its data buffer in place, block by block.
    Used by streaming ingest, whose store is larger than memory.
    """
    dtype = np.dtype(dtype)
    row_items = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    n_items = int(shape[0]) * row_items
    nbytes = n_items * dtype.itemsize
    zeros = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE)
    try:
        values = pa.Array.from_buffers(pa.from_numpy_dtype(dtype), n_items,
                                       [None, pa.py_buffer(zeros)[:nbytes]])
        table = pa.table({name: pa.FixedSizeListArray.from_arrays(values, row_items)})
        table = table.replace_schema_metadata({"shape": json.dumps([int(d) for d in shape]), "dtype": str(dtype)})
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=IPC_OPTIONS) as writer:
            writer.write_table(table, max_chunksize=max(int(shape[0]), 1))
        del table, values
    finally:
        try:
            zeros.close()
        except BufferError:  # pyarrow still holds an export of the mapping; the GC unmaps it
            pass
    with pa.memory_map(str(path), "r") as mapped:
        data = pa.ipc.open_file(mapped).get_batch(0).column(0).values.buffers()[1]
        mapped.seek(0)
        offset = data.address - mapped.read_buffer(mapped.size()).address
        del data
    written = 0
    with open(path, "r+b") as fh:
        fh.seek(offset)
        for block in blocks:
            raw = np.ascontiguousarray(block, dtype=dtype)
            fh.write(memoryview(raw.reshape(-1)).cast("B"))
            written += raw.nbytes
    if written != nbytes:
        raise DataError(path, f"wrote {written} of {nbytes} bytes: the row blocks do not add up to {shape}")


def expression_columns(expression: np.ndarray | sp.spmatrix, layout: str,
                       encoding: ValueEncoding | None = None, table: np.ndarray | None = None,
                       where: Any = None) -> dict[str, pa.Array]:
    """The expression columns of a spot partition: dense ``expression``, or CSR ``expression_indices`` +
    ``expression_counts`` (or ``expression_values``) in ``encoding`` (agl.data.encoding)."""
    if layout == "dense":
        dense = expression.toarray() if sp.issparse(expression) else np.asarray(expression)
        return {"expression": _fixed_list(np.asarray(dense, dtype=np.float32))}
    encoding = encoding or detect_encoding(sp.csr_matrix(expression).data, expression.shape[1])
    csr = sp.csr_matrix(expression, dtype=np.float32)
    csr.sort_indices()
    offsets = pa.array(csr.indptr.astype(np.int32))
    values = encoding.encode(csr.data, encoding.table() if table is None else table, where)
    return {"expression_indices": pa.ListArray.from_arrays(offsets, pa.array(csr.indices.astype(encoding.indices))),
            encoding.column: pa.ListArray.from_arrays(offsets, pa.array(values))}


def write_partition(path: str, spots: pd.DataFrame, patches: np.ndarray, expression: np.ndarray | sp.spmatrix,
                    layout: str, filesystem: Any = None, encoding: ValueEncoding | None = None,
                    table: np.ndarray | None = None) -> None:
    """One slide's ``spots/slide_id=S/part-0.parquet``: spot columns, patch, expression (dense or CSR).

    ``path`` may be local or on a pyarrow filesystem (``filesystem``), so Ray tasks on
    other machines can write their slides to shared or cloud storage.
    """
    part = pa.Table.from_pandas(spots[list(SPOT_COLUMNS)].reset_index(drop=True), preserve_index=False)
    part = part.append_column("patch", _fixed_list(patches))
    for name, column in expression_columns(expression, layout, encoding, table, where=path).items():
        part = part.append_column(name, column)
    codecs = leaf_compression(part.schema, "zstd", {"patch": "none"})
    # a spot's gene indices ascend: delta encoding stores the small gaps (4x smaller than a dictionary of
    # indices on the demo); every other column keeps Parquet's dictionary encoding
    delta = [leaf for leaf in codecs if leaf.startswith("expression_indices.")]
    # small row groups so Ray Data can split a slide across blocks; patches are incompressible
    pq.write_table(part, path, row_group_size=256, filesystem=filesystem, compression=codecs,
                   use_dictionary=[leaf for leaf in codecs if leaf not in delta],
                   column_encoding={leaf: "DELTA_BINARY_PACKED" for leaf in delta} or None)


def leaf_compression(schema: pa.Schema, default: str, columns: Mapping[str, str]) -> dict[str, str]:
    """Parquet codec per leaf column: ``columns`` by top-level name, ``default`` for the others.

    pyarrow's per-column ``compression`` is keyed by the Parquet leaf path, which for a list
    column is ``NAME.list.element``: a plain ``NAME`` key is silently ignored and that column
    is written uncompressed (the expression lists of earlier stores were).
    """
    out = {}
    for field in schema:
        leaf = f"{field.name}.list.element" if pa.types.is_list(field.type) or pa.types.is_fixed_size_list(field.type) \
            or pa.types.is_large_list(field.type) else field.name
        out[leaf] = columns.get(field.name, default)
    return out


def check_layout(layout: str) -> str:
    if layout not in EXPRESSION_LAYOUTS:
        raise ConfigError("expression_layout", f"must be one of {EXPRESSION_LAYOUTS}, got {layout!r}")
    return layout


def new_temp_folder(out: Path) -> Path:
    """A hidden temporary folder beside ``out`` (stale ones of dead writers are removed first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def write_gene_set(tmp: Path, split: str, table: pd.DataFrame) -> None:
    """``gene_sets/SPLIT.parquet`` of a store being written in ``tmp``."""
    (tmp / "gene_sets").mkdir(exist_ok=True)
    _write_parquet(table, tmp / "gene_sets" / f"{split}.parquet")


def as_split_table(splits: SplitTable | pd.DataFrame, where: Any = None) -> SplitTable:
    """``splits`` as a SplitTable (a DataFrame of role columns is stored as int8 role codes per split)."""
    if isinstance(splits, SplitTable):
        return splits
    return SplitTable.from_roles(splits, len(splits), source=where or "splits")


def write_split_table(table: SplitTable, path: Path) -> None:
    """``split_table.parquet``: the table's columns, its layout (every split's spec, the slides) in the schema metadata."""
    columns = table.loaded()
    arrow = pa.table({name: pa.array(values) for name, values in columns.items()})
    arrow = arrow.replace_schema_metadata({SPLIT_LAYOUT_KEY: json.dumps(table.layout())})
    pq.write_table(arrow, str(path), compression="zstd")


def read_split_table(path: Path, n_spots: int) -> SplitTable:
    """The SplitTable of ``split_table.parquet``: the layout now, each column on first use (one column read)."""
    if not path.is_file():
        raise DataError(path, "missing from the store")
    try:
        schema = pq.read_schema(str(path))
        layout = json.loads((schema.metadata or {})[SPLIT_LAYOUT_KEY.encode()])
    except (OSError, KeyError, ValueError, pa.ArrowException) as err:
        raise DataError(path, f"not a readable Parquet file (truncated or corrupt?): {err}") from None
    if not isinstance(layout, dict) or layout.get("n_spots") != n_spots:
        raise DataError(path, f"holds splits of {layout.get('n_spots') if isinstance(layout, dict) else '?'} spots, "
                              f"the manifest records {n_spots}; rebuild the store with agl ingest")

    def read_column(name: str) -> np.ndarray:
        if name not in schema.names:
            raise DataError(path, f"has no column {name!r} (its layout names it); rebuild the store with agl ingest")
        return _read_parquet(path, columns=[name])[name].to_numpy()

    return SplitTable.from_layout(layout, read_column, source=path)


def read_role_columns(path: Path, names: list[str], n_spots: int) -> SplitTable:
    """The SplitTable of a ``splits.parquet`` written before ``split_table.parquet`` (a string column of roles per
    split): each split's column read and coded on first use."""
    return SplitTable(n_spots, {name: ("roles", name) for name in names}, source=path,
                      read_column=lambda name: role_codes(_read_parquet(path, columns=[name])[name].to_numpy(), path))


def write_role_columns(splits: pd.DataFrame, spot_ids: np.ndarray, path: Path) -> None:
    """``splits.parquet`` as stores before ``split_table.parquet`` held it (spot_id + a string column of roles per
    split): what ``read_role_columns`` reads; written only to test and measure that format."""
    table = splits.reset_index(drop=True).astype(str)
    table.insert(0, "spot_id", np.asarray(spot_ids))
    _write_parquet(table, path)


def write_tables(tmp: Path, *, spot_ids: np.ndarray, genes: pd.DataFrame, splits: SplitTable | pd.DataFrame,
                 gene_sets: Mapping[str, pd.DataFrame] | None) -> None:
    """genes.parquet, split_table.parquet and gene_sets/ of a store being written in ``tmp`` (``gene_sets`` None:
    every split's was already written by ``write_gene_set``). ``spot_ids``: the spots in row order (their count is
    checked; the spot table keeps the ids)."""
    table = as_split_table(splits, tmp)
    if table.n_spots != len(spot_ids):
        raise DataError(tmp, f"the splits cover {table.n_spots} spots, the store has {len(spot_ids)}")
    if gene_sets is None:
        missing = [s for s in table.columns if not (tmp / "gene_sets" / f"{s}.parquet").is_file()]
    else:
        missing = [s for s in table.columns if s not in gene_sets]
    if missing:
        raise DataError(tmp, f"no gene set for split(s) {missing}")
    _write_parquet(genes.reset_index(drop=True), tmp / "genes.parquet")
    write_split_table(table, tmp / SPLIT_TABLE)
    (tmp / "gene_sets").mkdir(exist_ok=True)
    for name in table.columns if gene_sets is not None else ():
        write_gene_set(tmp, name, gene_sets[name])


def finish_store(tmp: Path, out: Path, *, manifest: Mapping[str, Any], n_spots: int, n_genes: int,
                 patch_shape: tuple[int, ...], slides: Mapping[str, int], splits: list[str], gene_names: list[str],
                 layout: str, overwrite: bool, encoding: ValueEncoding | None = None) -> Path:
    """Hash every file of ``tmp``, write the manifest last, and rename ``tmp`` to ``out``.

    ``encoding``: how a sparse store's indices and values are stored (required for sparse).
    """
    if layout == "sparse" and encoding is None:
        raise DataError(tmp, "a sparse store needs its expression encoding recorded")
    (tmp / "cache").mkdir(exist_ok=True)
    files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    full = {
        "schema_version": SCHEMA_VERSION,
        "agl_version": agl_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **dict(manifest or {}),
        "n_spots": int(n_spots),
        "n_genes": int(n_genes),
        "patch_shape": [int(d) for d in patch_shape],
        "expression_layout": layout,
        **({"expression_encoding": encoding.to_manifest()} if layout == "sparse" else {}),
        "slides": {str(s): int(c) for s, c in slides.items()},
        "splits": list(map(str, splits)),
        "gene_list_sha256": gene_list_hash(gene_names),
        "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(full, indent=1, default=str))
    _publish(tmp, out, overwrite)
    return out


def write_expression_arrays(folder: Path, n_spots: int, n_genes: int, layout: str,
                            blocks: Callable[[], Iterable[np.ndarray | sp.spmatrix]], nnz: int | None = None,
                            encoding: ValueEncoding | None = None) -> None:
    """``arrays/expression.arrow`` (dense) or the CSR arrays ``arrays/expression_{indptr,indices}.arrow`` and
    ``expression_counts.arrow`` + ``expression_table.arrow`` (or ``expression_values.arrow``) in ``encoding``.

    ``blocks()`` yields consecutive row blocks (dense, or sparse with float32 values or
    values already in ``encoding``'s stored dtype); it is called once per file written, so
    the whole matrix never needs to be in memory.
    """
    if layout == "dense":
        dense = (b.toarray() if sp.issparse(b) else b for b in blocks())
        write_ipc_blocks(folder / "expression.arrow", "expression", (n_spots, n_genes), np.float32, dense)
        return
    if encoding is None:
        raise DataError(folder, "a sparse store needs an expression encoding")
    table = encoding.table()
    stored = np.dtype(encoding.values)

    def csr() -> Iterator[sp.csr_matrix]:
        for b in blocks():
            b = sp.csr_matrix(b)
            b.sort_indices()
            if b.dtype != stored:  # float32 values: encoded (and checked) here
                b = sp.csr_matrix((encoding.encode(b.data, table, folder), b.indices, b.indptr), shape=b.shape)
            yield b

    if nnz is None:
        nnz = sum(b.nnz for b in csr())

    def indptr() -> Iterator[np.ndarray]:
        start = 0
        yield np.zeros(1, dtype=np.int64)
        for b in csr():
            yield start + b.indptr[1:].astype(np.int64)
            start += b.nnz

    write_ipc_blocks(folder / "expression_indptr.arrow", "indptr", (n_spots + 1,), np.int64, indptr())
    write_ipc_blocks(folder / "expression_indices.arrow", "indices", (nnz,), np.dtype(encoding.indices),
                     (b.indices for b in csr()))
    write_ipc_blocks(folder / f"{encoding.column}.arrow", "values", (nnz,), stored, (b.data for b in csr()))
    if table is not None:
        _write_ipc(folder / "expression_table.arrow", "value", table)


def write_store(out: str | Path, *, spots: pd.DataFrame, patches: np.ndarray, expression: np.ndarray | sp.spmatrix,
                genes: pd.DataFrame, splits: pd.DataFrame, gene_sets: Mapping[str, pd.DataFrame],
                manifest: Mapping[str, Any] | None = None, overwrite: bool = False,
                expression_layout: str = "dense", stain_record: Mapping[str, Any] | None = None) -> Path:
    """Write a complete store at ``out`` (temp folder beside it, renamed into place at the end).

    ``spots``: spot_id, slide_id, barcode, pixel_x, pixel_y in row order; ``patches``
    uint8 [N, px, px, 3]; ``expression`` float32 [N, G] (dense, or scipy sparse);
    ``genes``: one row per expression column (name, mean, n_spots); ``splits``: a
    ``SplitTable`` of the spots, or a DataFrame with one column of roles per split (row
    order); ``gene_sets``: split -> gene-set table;
    ``manifest``: extra fields (preprocessing, patch settings, sources);
    ``expression_layout``: "dense" (float32 rows) or "sparse" (CSR per spot: indices +
    values). Refuses an existing ``out`` unless ``overwrite``, in which case the old store
    is swapped out only once the new one is complete. ``stain_record``: the patches' stain
    normalisation (``agl.data.stain``), written to ``stain.json`` (listed and hashed like every file).
    """
    out = check_target(out, overwrite)
    layout = check_layout(expression_layout)
    n = len(spots)
    splits = as_split_table(splits, out)
    if patches.shape[0] != n or expression.shape[0] != n or splits.n_spots != n:
        raise DataError(out, f"row counts differ: spots {n}, patches {patches.shape[0]}, "
                             f"expression {expression.shape[0]}, splits {splits.n_spots}")
    if patches.dtype != np.uint8 or patches.ndim != 4 or expression.dtype != np.float32:
        raise DataError(out, "patches must be uint8 [N, px, px, 3] and expression float32 [N, G]")
    if expression.shape[1] != len(genes):
        raise DataError(out, f"expression has {expression.shape[1]} columns but genes lists {len(genes)}")
    bad = [s for s in list(pd.unique(spots["slide_id"].astype(str))) + list(splits.columns)
           if not SAFE_NAME.match(str(s))]
    if bad:
        raise DataError(out, f"slide/split names must match {SAFE_NAME.pattern}: {show(bad[:5])}")
    missing = [s for s in splits.columns if s not in gene_sets]
    if missing:
        raise DataError(out, f"no gene set for split(s) {missing}")

    tmp = new_temp_folder(out)
    try:
        table = spots[list(SPOT_COLUMNS[:-1])].reset_index(drop=True).copy()
        table["slide_id"] = table["slide_id"].astype(str)
        table["row"] = np.arange(n, dtype=np.int64)
        matrix = sp.csr_matrix(expression) if sp.issparse(expression) else expression
        encoding = value_table = None
        if layout == "sparse":  # one encoding for the whole store (the largest count decides uint16/uint32)
            matrix = sp.csr_matrix(matrix)
            encoding = detect_encoding(matrix.data, matrix.shape[1])
            value_table = encoding.table()
        for slide in pd.unique(table["slide_id"]):
            at = np.flatnonzero(table["slide_id"].to_numpy() == slide)
            folder = tmp / "spots" / f"slide_id={slide}"
            folder.mkdir(parents=True)
            write_partition(str(folder / "part-0.parquet"), table.iloc[at], patches[at], matrix[at], layout,
                            encoding=encoding, table=value_table)
        (tmp / "arrays").mkdir()
        _write_ipc(tmp / "arrays" / "patches.arrow", "patch", patches)
        if layout == "dense" and not sp.issparse(expression):
            _write_ipc(tmp / "arrays" / "expression.arrow", "expression", expression)
        else:
            write_expression_arrays(tmp / "arrays", n, expression.shape[1], layout, lambda: [matrix],
                                    encoding=encoding)
        write_tables(tmp, spot_ids=table["spot_id"].to_numpy(), genes=genes, splits=splits, gene_sets=gene_sets)
        if stain_record is not None:
            from agl.data.stain import write_record

            write_record(tmp, stain_record)
        finish_store(tmp, out, manifest=manifest or {}, n_spots=n, n_genes=int(expression.shape[1]),
                     patch_shape=patches.shape[1:], slides={s: int((table["slide_id"] == s).sum())
                                                            for s in pd.unique(table["slide_id"])},
                     splits=list(splits.columns), gene_names=list(genes["name"]), layout=layout, overwrite=overwrite,
                     encoding=encoding)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _remove_stale_temps(out: Path) -> None:
    """Delete temporary folders of earlier writes of ``out`` whose process is gone (killed mid-write)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; with ``overwrite`` swap out an old store first."""
    if out.exists():
        check_target(out, overwrite)
        swap_folder(tmp, out)  # puts the previous store back if the rename fails
        return
    try:
        os.rename(tmp, out)
    except OSError as err:  # another process published the same target meanwhile
        if out.exists():
            raise StoreExistsError(out, "appeared while this store was being written") from err
        raise


class Store:
    """A read-only view of a store folder; arrays are memory-mapped on first use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise DataError(mpath, "missing: not an agl store (or an unfinished write)")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except (OSError, ValueError) as err:
            raise DataError(mpath, f"unreadable manifest: {err}") from err
        if not isinstance(self.manifest, dict):
            raise DataError(mpath, "unreadable manifest: expected a JSON object")
        version = self.manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataError(mpath, f"schema_version {version!r} is not supported by this agl "
                                   f"(reads {SCHEMA_VERSION}); rebuild the store with agl ingest")
        self._check_manifest_paths(mpath)

    def _check_manifest_paths(self, mpath: Path) -> None:
        """Refuse names in the manifest that would address files outside the store folder."""
        files = self.manifest.get("files", {})
        if not isinstance(files, dict):
            raise DataError(mpath, "'files' must map relative paths to sha256 digests")
        for rel in files:
            self._inside(rel, mpath, "files")
        splits = self.manifest.get("splits", [])
        if not isinstance(splits, list):
            raise DataError(mpath, "'splits' must be a list of split names")
        bad = [s for s in splits if not isinstance(s, str) or not SAFE_NAME.match(s) or s in (".", "..")]
        if bad:
            raise DataError(mpath, f"split name(s) {bad[:3]} are not plain file names "
                                   f"(must match {SAFE_NAME.pattern}); the manifest was edited or is foreign")

    def _inside(self, rel: str, mpath: Path, field: str) -> Path:
        """``self.path / rel``, refused when ``rel`` is absolute or climbs out of the store (``..``, links)."""
        root = self.path.resolve()
        target = (root / rel).resolve()
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not target.is_relative_to(root):
            raise DataError(mpath, f"{field} entry {rel!r} escapes the store folder {root}; refusing to read it")
        return self.path / rel

    def __repr__(self) -> str:
        m = self.manifest
        return f"Store({str(self.path)!r}, spots={m.get('n_spots')}, genes={m.get('n_genes')}, slides={list(m.get('slides', {}))})"

    @property
    def cache_dir(self) -> Path:
        """Folder for derived data (frozen-backbone features); safe to delete."""
        return self.path / "cache"

    @cached_property
    def spots(self) -> pd.DataFrame:
        """spot_id, slide_id, barcode, pixel_x, pixel_y, row; in row order (index = row)."""
        parts = []
        for f in sorted((self.path / "spots").glob("slide_id=*/part-0.parquet")):
            parts.append(_read_parquet(f, columns=list(SPOT_COLUMNS)))
        if not parts:
            raise DataError(self.path / "spots", "no spot partitions")
        df = pd.concat(parts, ignore_index=True).sort_values("row").reset_index(drop=True)
        if not np.array_equal(df["row"].to_numpy(), np.arange(len(df))):
            raise DataError(self.path / "spots", "spot rows are not 0..N-1")
        return df

    @property
    def expression_layout(self) -> str:
        """"dense" (float32 rows) or "sparse" (CSR per spot); stores written before the choice are dense."""
        return str(self.manifest.get("expression_layout", "dense"))

    @cached_property
    def expression_encoding(self) -> ValueEncoding:
        """How a sparse store's indices and values are stored (stores written before the encoding: int32 +
        float32)."""
        return ValueEncoding.from_manifest(self.manifest, self.path / MANIFEST)

    @cached_property
    def expression_table(self) -> np.ndarray | None:
        """float32 value of each count (sparse stores with count encoding), else None."""
        if self.expression_layout != "sparse" or not self.expression_encoding.counts:
            return None
        table = _read_ipc(self.path / "arrays" / "expression_table.arrow")
        if table.dtype != np.float32 or len(table) != self.expression_encoding.max_count + 1:
            raise DataError(self.path / "arrays" / "expression_table.arrow",
                            f"expected float32 [{self.expression_encoding.max_count + 1}], found {table.dtype} "
                            f"{table.shape}; rebuild the store with agl ingest")
        return table

    @cached_property
    def expression(self) -> np.ndarray:
        """float32 [N, G]: memory-mapped and read-only (dense layout), or densified once (sparse layout).

        Batch loaders should use :meth:`expression_rows`, which densifies only the rows asked for.
        """
        if self.expression_layout == "dense":
            return _read_ipc(self.path / "arrays" / "expression.arrow")
        dense = self.expression_csr.toarray()
        dense.flags.writeable = False
        return dense

    @cached_property
    def _csr_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """indptr (int64), indices and stored values (the encoding's dtypes), memory-mapped (sparse layout)."""
        arrays = self.path / "arrays"
        enc = self.expression_encoding
        indptr = _read_ipc(arrays / "expression_indptr.arrow")
        indices = _read_ipc(arrays / "expression_indices.arrow")
        values = _read_ipc(arrays / f"{enc.column}.arrow")
        if indices.dtype != np.dtype(enc.indices) or values.dtype != np.dtype(enc.values):
            raise DataError(arrays, f"CSR arrays are {indices.dtype} indices / {values.dtype} values but the manifest "
                                    f"records {enc.indices} / {enc.values}; rebuild the store with agl ingest")
        if indptr[-1] != len(indices) or len(indices) != len(values) or len(indptr) != self.manifest["n_spots"] + 1:
            raise DataError(arrays, f"CSR arrays disagree: indptr ends at {indptr[-1]} ({len(indptr)} entries), "
                                    f"{len(indices)} indices, {len(values)} values")
        return indptr, indices, values

    @cached_property
    def expression_csr(self) -> sp.csr_matrix:
        """float32 CSR [N, G] (sparse layout: decoded once into memory, unless the store has float32 values and
        int32 indices, which are used memory-mapped)."""
        if self.expression_layout == "dense":
            return sp.csr_matrix(self.expression)
        indptr, indices, values = self._csr_arrays
        shape = (len(indptr) - 1, int(self.manifest["n_genes"]))
        if indices.dtype != np.int32 or values.dtype != np.float32:
            return sp.csr_matrix((self.expression_encoding.decode(values, self.expression_table),
                                  indices.astype(np.int32), indptr), shape=shape)
        # scipy would copy int64 indptr into int32 when it fits; build the matrix without its checks
        matrix = sp.csr_matrix(shape, dtype=np.float32)
        matrix.data, matrix.indices, matrix.indptr = values, indices, indptr
        return matrix

    def expression_rows(self, rows: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """float32 [len(rows), len(columns)] (all genes when ``columns`` is None), densified per call."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.expression_layout == "dense":
            block = self.expression[rows]
            return block if columns is None else np.take(block, columns, axis=1)
        # gather the rows' segments of the memory-mapped arrays, decode only those values
        indptr, indices, values = self._csr_arrays
        starts, ends = indptr[rows], indptr[rows + 1]
        lengths = ends - starts
        block_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=block_ptr[1:])
        at = np.arange(block_ptr[-1], dtype=np.int64) + np.repeat(starts - block_ptr[:-1], lengths)
        block = sp.csr_matrix((self.expression_encoding.decode(values[at], self.expression_table),
                               indices[at].astype(np.int32), block_ptr),
                              shape=(len(rows), int(self.manifest["n_genes"])))
        if columns is not None:
            block = block[:, np.asarray(columns, dtype=np.int64)]
        return block.toarray().astype(np.float32, copy=False)

    def column_positions(self, columns: np.ndarray, source: str | Path | None = None) -> np.ndarray:
        """Position of each expression gene in ``columns`` (-1: not selected), the lookup that
        :meth:`expression_block` uses; built once per split. ``source`` is named in errors."""
        columns = np.asarray(columns, dtype=np.int64)
        n_genes = int(self.manifest["n_genes"])
        where = source or self.path / "gene_sets"
        if columns.ndim != 1 or (len(columns) and (columns.min() < 0 or columns.max() >= n_genes)):
            raise DataError(where, f"gene columns must lie in 0..{n_genes - 1} (the store's genes); "
                                   f"found {columns.min() if len(columns) else '-'}..{columns.max() if len(columns) else '-'}")
        if len(np.unique(columns)) != len(columns):
            raise DataError(where, "a gene column is listed twice")
        positions = np.full(n_genes, -1, dtype=np.int64)
        positions[columns] = np.arange(len(columns))
        return positions

    def check_expression_shape(self) -> None:
        """Raise DataError naming the array file when the expression arrays disagree with the manifest."""
        n_spots, n_genes = int(self.manifest["n_spots"]), int(self.manifest["n_genes"])
        if self.expression_layout == "dense":
            shape = self.expression.shape
            if shape != (n_spots, n_genes):
                raise DataError(self.path / "arrays" / "expression.arrow",
                                f"disagrees with manifest.json: it holds {shape[0]} x "
                                f"{shape[1] if len(shape) > 1 else '?'} values, the manifest records {n_spots} spots x "
                                f"{n_genes} genes; rebuild the store with agl ingest")
            return
        self._csr_arrays  # checks the CSR arrays against each other and n_spots (gene indices: per block)

    def expression_block(self, rows: np.ndarray, columns: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """float32 [len(rows), len(columns)]: the rows' values of the genes ``columns``, read from the
        memory-mapped arrays (only these rows are touched). ``positions``: :meth:`column_positions` of
        ``columns``, computed once by a caller that reads many blocks."""
        rows = np.asarray(rows, dtype=np.int64)
        columns = np.asarray(columns, dtype=np.int64)
        if self.expression_layout == "dense":
            return np.ascontiguousarray(self.expression[np.ix_(rows, columns)], dtype=np.float32)
        positions = self.column_positions(columns) if positions is None else positions
        n_columns = len(columns)
        indptr, indices, values = self._csr_arrays
        starts = indptr[rows]
        lengths = indptr[rows + 1] - starts
        block_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=block_ptr[1:])
        at = np.arange(block_ptr[-1], dtype=np.int64) + np.repeat(starts - block_ptr[:-1], lengths)
        try:
            where = positions[indices[at]]
        except IndexError:
            raise DataError(self.path / "arrays" / "expression_indices.arrow",
                            f"a gene index is >= {len(positions)}, the manifest's gene count; rebuild the store "
                            "with agl ingest") from None
        keep = where >= 0
        out = np.zeros((len(rows), n_columns), dtype=np.float32)
        entry_rows = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)[keep]
        out[entry_rows, where[keep]] = self.expression_encoding.decode(values[at[keep]], self.expression_table)
        return out

    @cached_property
    def patches(self) -> np.ndarray:
        """uint8 [N, px, px, 3], memory-mapped, read-only."""
        return _read_ipc(self.path / "arrays" / "patches.arrow")

    @cached_property
    def genes(self) -> pd.DataFrame:
        return _read_parquet(self.path / "genes.parquet")

    @cached_property
    def gene_names(self) -> list[str]:
        """Expression gene symbols in column order."""
        return list(self.genes["name"])

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest.get("splits", []))

    @property
    def split_file(self) -> Path:
        """``split_table.parquet``, or ``splits.parquet`` in a store written before it."""
        compact = SPLIT_TABLE in self.manifest.get("files", {}) or (self.path / SPLIT_TABLE).is_file()
        return self.path / (SPLIT_TABLE if compact else ROLE_COLUMNS)

    @cached_property
    def split_table(self) -> SplitTable:
        """The splits, reading each column on first use (a split reads only the columns it derives from)."""
        n_spots = int(self.manifest["n_spots"])
        path = self.split_file
        if path.name == SPLIT_TABLE:
            table = read_split_table(path, n_spots)
            missing = [s for s in self.split_names if s not in table.specs]
            if missing:
                raise DataError(path, f"holds no split {missing[:3]} that manifest.json lists; rebuild the store "
                                      "with agl ingest")
            return table
        return read_role_columns(path, self.split_names, n_spots)

    def _check_split(self, name: str) -> None:
        if name not in self.split_names:
            raise ConfigError(self.split_file, f"unknown split {name!r}; this store has {self.split_names}")

    def split(self, name: str) -> pd.Series:
        """Roles ("train" | "val" | "test" | "" | "val_outer") of every spot, in row order."""
        self._check_split(name)
        return pd.Series(self.split_table[name], name=name)

    def split_codes(self, name: str) -> np.ndarray:
        """int8 role codes of every spot in ``name`` (positions in ``agl.data.splits.ROLE_NAMES``)."""
        self._check_split(name)
        return self.split_table.codes(name)

    def rows(self, split: str, part: str) -> np.ndarray:
        """Row indices of the spots with role ``part`` in ``split``."""
        codes = self.split_codes(split)
        return np.flatnonzero(codes == ROLE_CODES[part]) if part in ROLE_CODES else np.zeros(0, dtype=np.int64)

    def gene_set(self, split: str) -> pd.DataFrame:
        """The split's genes: gene, column, role, prior_*, rank_*; primary first."""
        self._check_split(split)
        return _read_parquet(self.path / "gene_sets" / f"{split}.parquet")

    def verify(self) -> None:
        """Recompute every file's sha256; raise DataError naming the first file that differs.

        Also refuses data files that the manifest does not list (a partition or gene set
        dropped in by hand would otherwise be read without ever being checked).
        """
        mpath = self.path / MANIFEST
        listed = self.manifest.get("files", {})
        for rel, expected in listed.items():
            f = self._inside(rel, mpath, "files")
            if not f.is_file():
                raise DataError(f, "missing from the store (listed in manifest.json)")
            if sha256_file(f) != expected:
                raise DataError(f, "sha256 differs from manifest.json: the store was modified or corrupted")
        for f in sorted(self.path.rglob("*")):
            rel = f.relative_to(self.path).as_posix()
            hidden = any(part.startswith(".") for part in f.relative_to(self.path).parts)  # editor/NFS files
            if f.is_file() and not hidden and rel != MANIFEST and not rel.startswith("cache/") and rel not in listed:
                raise DataError(f, "not listed in manifest.json: the store was modified after it was written")


def _read_parquet(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A Parquet file of the store as a DataFrame; a missing or damaged file raises DataError naming it."""
    if not path.is_file():
        raise DataError(path, "missing from the store")
    try:
        return pq.read_table(str(path), columns=columns).to_pandas()
    except (OSError, ValueError, pa.ArrowException) as err:  # truncated, not Parquet, wrong columns
        raise DataError(path, f"not a readable Parquet file (truncated or corrupt?): {err}") from None


def open_store(path: str | Path, verify: bool = False) -> Store:
    """Open a store folder written by :func:`write_store` (checks the schema version and the
    manifest's paths); ``verify=True`` also checks every file's sha256 (reads the whole store)."""
    store = Store(path)
    if verify:
        store.verify()
    return store
