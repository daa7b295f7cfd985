"""Loaders over a store: a torch Dataset, a fast batched iterator, and Ray Data.

The in-process loaders read the memory-mapped Arrow arrays (no decoding, no copies
beyond the batch itself). ``iter_patch_batches`` is what training uses: one fancy
pass per batch over sorted memmap rows (locality), where each patch gets its dihedral
view, CHW layout and ImageNet normalisation in cache-resident steps (``load_views``).
"""
from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from agl.data.augment import N_VIEWS, dihedral_chw
from agl.data.store import Store

if TYPE_CHECKING:  # Ray is imported only by ray_dataset
    import ray.data

from agl.normalisation import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402  (re-exported: one definition)


_SCALE = np.array([1.0 / (255.0 * s) for s in IMAGENET_STD], dtype=np.float32).reshape(3, 1, 1)
_SHIFT = np.array([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], dtype=np.float32).reshape(3, 1, 1)


def normalise_uint8(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 ImageNet-normalised: one multiply and one add per value.

    A tensor on an accelerator is normalised there (for batches loaded with
    ``normalise=False``); CPU data goes through numpy, whose uint8 -> float32 cast is
    several times faster than torch's on CPU.
    """
    if isinstance(x, torch.Tensor) and x.device.type != "cpu":
        scale = torch.from_numpy(_SCALE).to(x.device)
        return torch.addcmul(torch.from_numpy(_SHIFT).to(x.device), x.float(), scale)
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    out = np.multiply(x, _SCALE, dtype=np.float32)
    out += _SHIFT
    return torch.from_numpy(out)


class _Recycler:
    """Output arrays handed out again once no tensor made from them is alive.

    A fresh float32 batch of 128 x 224 px patches is 77 MB: new memory every batch costs
    page faults and kernel zeroing (measured 6-30 ms CPU a batch here, next to ~20 ms of
    transforms). A
    training loop drops batch t before it asks for batch t + 2, so two arrays alternate.
    Liveness is a weak reference to the array a tensor was made from: ``torch.from_numpy``
    keeps it alive for as long as any tensor shares its memory, so memory still in use is
    never reused (a consumer that keeps every batch simply gets fresh arrays).
    """

    def __init__(self, keep: int = 4):
        self.keep = keep  # two per consumer iterating at once (e.g. float and uint8 batches)
        self._slots: list[tuple[np.ndarray, weakref.ref]] = []
        self._lock = threading.Lock()  # two threads must never be handed the same free slot

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        with self._lock:
            # the smallest free slot that fits, at most twice the size (a short last batch may
            # take a full batch's memory; a uint8 batch does not take a float batch's)
            free = [j for j, (memory, handed_out) in enumerate(self._slots)
                    if handed_out() is None and nbytes <= memory.nbytes < 2 * nbytes]
            if free:
                j = min(free, key=lambda j: self._slots[j][0].nbytes)
                memory = self._slots[j][0]
                arr = memory[:nbytes].view(dtype).reshape(shape)
                self._slots[j] = (memory, weakref.ref(arr))
                return arr
            memory = np.empty(nbytes, dtype=np.uint8)
            arr = memory.view(dtype).reshape(shape)
            self._slots = [*self._slots, (memory, weakref.ref(arr))][-self.keep:]  # forget the oldest
            return arr


# one recycler per store, released with it (its arrays live as long as the Store object)
_RECYCLERS: "weakref.WeakKeyDictionary[Store, _Recycler]" = weakref.WeakKeyDictionary()


def _recycler(store: Store) -> _Recycler:
    try:
        return _RECYCLERS.setdefault(store, _Recycler())
    except TypeError:  # an object that takes no weak references: recycle within this call only
        return _Recycler()


def load_views(patches: np.ndarray, idx: np.ndarray, ks: np.ndarray | None, normalise: bool = True,
               out: np.ndarray | None = None) -> torch.Tensor:
    """float32 [B, 3, H, W] (contiguous): ``patches[idx]`` (NHWC memmap), view ``ks[i]`` on item i, normalised.

    Works one patch at a time so each step stays in the CPU cache: a strided uint8 copy
    that applies the dihedral view and the HWC -> CHW transposition at once, then a cast,
    a multiply and an add in place in the output. ``out`` (float32 [B, 3, H, W], or uint8 with
    ``normalise=False``) is filled instead of a new array when given.

    Measured alternatives that were slower here: a channels-last (NHWC) float output (a
    rotated view of an HWC patch copies 3 bytes per inner loop, 5-10x slower than the CHW
    planes), a cast straight from the strided view, 256-entry lookup tables, whole-batch passes.
    """
    n, (h, w, c) = len(idx), patches.shape[1:]
    if ks is not None and h != w:
        raise ValueError("dihedral views need square patches")
    dtype = np.float32 if normalise else np.uint8
    if out is None:
        out = np.empty((n, c, h, w), dtype=dtype)
    elif out.shape != (n, c, h, w) or out.dtype != dtype:
        raise ValueError(f"out must be {np.dtype(dtype)} {(n, c, h, w)}, got {out.dtype} {out.shape}")
    # the uint8 CHW plane copy is the cache-friendly transposition: inner loops run along W
    chw = np.empty((c, h, w), dtype=np.uint8) if normalise else None
    for i, row in enumerate(idx):
        view = dihedral_chw(patches[row], 0 if ks is None else int(ks[i]))
        if chw is None:
            out[i] = view
            continue
        chw[...] = view
        o = out[i]
        o[...] = chw
        o *= _SCALE
        o += _SHIFT
    return torch.from_numpy(out)


def _n_genes(store: Store) -> int:
    return int(store.manifest["n_genes"])


def _columns(gene_columns: Sequence[int] | np.ndarray | None, n_genes: int) -> np.ndarray:
    return np.arange(n_genes) if gene_columns is None else np.asarray(gene_columns, dtype=np.int64)


class PatchDataset(torch.utils.data.Dataset):
    """Items ``(image float32 [3, H, W] ImageNet-normalised, expression float32 [n_genes])``.

    ``augment``: False (view 0), True (a random dihedral view per item, from torch's
    RNG so DataLoader workers are seeded as usual) or an int k (always view k).
    """

    def __init__(self, store: Store, rows: Sequence[int] | np.ndarray,
                 gene_columns: Sequence[int] | np.ndarray | None = None, augment: bool | int = False):
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.gene_columns = _columns(gene_columns, _n_genes(store))
        self.augment = augment

    def __len__(self) -> int:
        return len(self.rows)

    def _view(self) -> int:
        if self.augment is True:
            return int(torch.randint(N_VIEWS, ()))
        return int(self.augment) if self.augment is not False else 0

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows[i]
        img = load_views(self.store.patches, self.rows[i:i + 1], np.array([self._view()]))[0]
        y = torch.from_numpy(self.store.expression_rows(np.array([row]), self.gene_columns)[0])
        return img, y


def iter_patch_batches(store: Store, rows: Sequence[int] | np.ndarray,
                       gene_columns: Sequence[int] | np.ndarray | None, batch_size: int,
                       augment: bool = True, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                       drop_last: bool = False, normalise: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(x float32 [B, 3, H, W], y float32 [B, n_genes])`` for one epoch.

    With ``normalise=False`` x is uint8 (same views); move it to the accelerator and
    call ``normalise_uint8`` there.

    Order and views are drawn from ``(seed, epoch)``, so an epoch is reproducible and
    resumable. Rows inside a batch are sorted (memmap locality; order within a batch
    does not matter to the loss).

    Output memory is recycled (per store, across epochs): the array behind a batch is
    refilled for a later batch only once no tensor sharing it is alive, so a batch that is
    kept is never changed.
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = _columns(gene_columns, _n_genes(store))
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(rows) if shuffle else rows
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    patches = store.patches
    recycler = _recycler(store)
    c, h, w = patches.shape[3], patches.shape[1], patches.shape[2]
    for start in range(0, stop, batch_size):
        idx = np.sort(order[start:start + batch_size])
        out = recycler.empty((len(idx), c, h, w), np.float32 if normalise else np.uint8)
        x = load_views(patches, idx, rng.integers(0, N_VIEWS, len(idx)) if augment else None, normalise, out)
        del out  # only the tensor may keep the array alive (the recycler watches it)
        y = torch.from_numpy(store.expression_rows(idx, cols))  # dense, or CSR rows densified
        yield x, y


def ray_dataset(store: Store, split: str, part: str,
                columns: Sequence[str] = ("row", "patch", "expression"),
                gene_columns: Sequence[int] | np.ndarray | None = None,
                uri: str | None = None) -> "ray.data.Dataset":
    """A Ray Dataset over ``spots/`` restricted to the spots with role ``part`` in ``split``.

    Only the slide partitions holding such spots are listed, and a row filter is pushed
    down to the Parquet reader. ``gene_columns``: the ``expression`` column holds only these
    genes, in this order (a split's gene set: ``[B, len(gene_columns)]`` per batch, never all
    the store's genes). ``uri``: the same store at a storage URI (``s3://bucket/stores/NAME``):
    the Parquet files are read from there through its pyarrow filesystem, so read tasks run on
    any node; ``store`` (a local copy, e.g. :func:`agl.distributed.storage.node_store`'s) gives
    only the split's rows and the manifest.
    """
    import ray.data
    from ray.data.expressions import col

    rows = store.rows(split, part)
    slides = sorted(set(store.spots["slide_id"].to_numpy()[rows]))
    filesystem = None
    root = str(store.path)
    if uri is not None:
        from agl.distributed.storage import fs_path, storage_filesystem

        filesystem, root = storage_filesystem(uri), fs_path(uri)
    paths = [f"{root}/spots/slide_id={s}/part-0.parquet" for s in slides]
    wanted = list(columns)
    read = set(wanted) | {"row"}
    if "expression" in read and store.expression_layout == "sparse":  # densified per batch below
        read = (read - {"expression"}) | {"expression_indices", store.expression_encoding.column}
    ds = ray.data.read_parquet(paths, filesystem=filesystem).select_columns(sorted(read))  # projection pushdown
    # an expression filter (not a Python callable) is pushed down into the Parquet scan
    ds = ds.filter(expr=col("row").is_in(rows.tolist()))
    if "row" not in wanted:
        ds = ds.select_columns(wanted)
    n_genes = int(store.manifest["n_genes"])
    shapes = {"patch": tuple(store.manifest["patch_shape"]), "expression": (n_genes,)}
    if gene_columns is not None:
        gene_columns = np.asarray(gene_columns, dtype=np.int64)
        store.column_positions(gene_columns)  # out-of-range or repeated columns: a DataError naming the store
    return ds.map_batches(_ListsToTensors(shapes, store.expression_encoding, store.expression_table, gene_columns),
                          batch_format="pyarrow")


class _ListsToTensors:
    """Turn fixed-size-list columns into numpy tensor columns ([B, px, px, 3], [B, G]).

    A sparse store's ``expression_indices`` / ``expression_counts`` (or ``expression_values``)
    lists become one dense float32 ``expression`` column per batch, decoded through the
    store's value table (a few KB, shipped with this callable). ``gene_columns`` keeps only
    those genes' columns, in that order (the others are never densified).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], encoding: Any = None, table: np.ndarray | None = None,
                 gene_columns: np.ndarray | None = None):
        from agl.data.encoding import LEGACY

        self.shapes, self.encoding, self.table = shapes, encoding or LEGACY, table
        self.columns, self.positions = gene_columns, None
        if gene_columns is not None:  # gene -> output column (-1: not kept), mapped once
            self.positions = np.full(shapes["expression"][0], -1, dtype=np.int64)
            self.positions[gene_columns] = np.arange(len(gene_columns))

    def __call__(self, batch):  # pyarrow.Table -> dict of numpy arrays
        out = {}
        if self.encoding.column in batch.column_names:
            out["expression"] = densify_csr_lists(batch.column("expression_indices"),
                                                  batch.column(self.encoding.column), self.shapes["expression"][0],
                                                  self.encoding, self.table, self.positions)
        for name in batch.column_names:
            if name.startswith("expression_"):
                continue
            column = batch.column(name).combine_chunks()
            if name in self.shapes:
                out[name] = column.flatten().to_numpy().reshape((len(batch), *self.shapes[name]))  # slice-aware
                if name == "expression" and self.columns is not None:  # dense layout: the gene set's columns
                    out[name] = np.ascontiguousarray(out[name][:, self.columns], dtype=np.float32)
            else:
                out[name] = column.to_numpy()
        return out


def densify_csr_lists(indices, values, n_genes: int, encoding: Any = None, table: np.ndarray | None = None,
                      positions: np.ndarray | None = None) -> np.ndarray:
    """float32 [B, n_genes] from Arrow list columns of per-spot gene indices and stored values (``encoding``:
    agl.data.encoding.ValueEncoding, default float32 values; ``table``: its count -> value table).
    ``positions`` (gene -> output column, -1: dropped): float32 [B, genes kept] instead, the rest never densified."""
    from agl.data.encoding import LEGACY

    idx, val = indices.combine_chunks(), values.combine_chunks()
    offsets = idx.offsets.to_numpy()
    lengths = np.diff(offsets)
    genes = idx.flatten().to_numpy().astype(np.int64)
    decoded = (encoding or LEGACY).decode(val.flatten().to_numpy(), table)
    spot = np.repeat(np.arange(len(idx), dtype=np.int64), lengths)
    if positions is None:
        out = np.zeros((len(idx), n_genes), dtype=np.float32)
        out[spot, genes] = decoded
        return out
    where = positions[genes]
    keep = where >= 0
    out = np.zeros((len(idx), int((positions >= 0).sum())), dtype=np.float32)
    out[spot[keep], where[keep]] = decoded[keep]
    return out
