"""Loaders over a store: a torch Dataset, a fast batched iterator, and Ray Data.

The in-process loaders read the memory-mapped Arrow arrays (no decoding, no copies
beyond the batch itself). ``iter_patch_batches`` is what training uses: one fancy
pass per batch over sorted memmap rows (locality), where each patch gets its dihedral
view, CHW layout and ImageNet normalisation in cache-resident steps (``load_views``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from agl.data.augment import N_VIEWS, dihedral
from agl.data.store import Store

if TYPE_CHECKING:  # Ray is imported only by ray_dataset
    import ray.data

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def load_views(patches: np.ndarray, idx: np.ndarray, ks: np.ndarray | None, normalise: bool = True,
               out: np.ndarray | None = None) -> torch.Tensor:
    """float32 [B, 3, H, W]: ``patches[idx]`` (NHWC memmap), view ``ks[i]`` on item i, normalised.

    Works one patch at a time so each step stays in the CPU cache: a strided uint8 copy
    that applies the dihedral view and the HWC -> CHW transposition at once, then a cast
    and one multiply-add into the output. About twice as fast as whole-batch passes.
    ``out`` (float32 [B, 3, H, W]) is filled instead of a new array when given.
    """
    n, h, w, c = len(idx), *patches.shape[1:]
    if ks is not None and h != w:
        raise ValueError("dihedral views need square patches")
    if not normalise:  # uint8 [B, 3, H, W] for normalisation on the accelerator (4x less to transfer)
        out8 = np.empty((n, c, h, w), dtype=np.uint8)
        for i, row in enumerate(idx):
            out8[i] = (patches[row] if ks is None else dihedral(patches[row], int(ks[i]))).transpose(2, 0, 1)
        return torch.from_numpy(out8)
    if out is None:
        out = np.empty((n, c, h, w), dtype=np.float32)
    chw = np.empty((c, h, w), dtype=np.uint8)
    for i, row in enumerate(idx):
        view = patches[row] if ks is None else dihedral(patches[row], int(ks[i]))
        chw[...] = view.transpose(2, 0, 1)
        o = out[i]
        o[...] = chw
        o *= _SCALE
        o += _SHIFT
    return torch.from_numpy(out)


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
        self.gene_columns = _columns(gene_columns, store.expression.shape[1])
        self.augment = augment

    def __len__(self) -> int:
        return len(self.rows)

    def _view(self) -> int:
        if self.augment is True:
            return int(torch.randint(N_VIEWS, ()))
        return int(self.augment) if self.augment is not False else 0

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows[i]
        img = np.ascontiguousarray(dihedral(self.store.patches[row], self._view()).transpose(2, 0, 1))
        img = normalise_uint8(img)
        y = torch.from_numpy(self.store.expression[row, self.gene_columns].astype(np.float32, copy=False))
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
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = _columns(gene_columns, store.expression.shape[1])
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(rows) if shuffle else rows
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    patches, expression = store.patches, store.expression
    for start in range(0, stop, batch_size):
        idx = np.sort(order[start:start + batch_size])
        x = load_views(patches, idx, rng.integers(0, N_VIEWS, len(idx)) if augment else None, normalise)
        y = torch.from_numpy(np.take(expression[idx], cols, axis=1))
        yield x, y


def ray_dataset(store: Store, split: str, part: str,
                columns: Sequence[str] = ("row", "patch", "expression")) -> "ray.data.Dataset":
    """A Ray Dataset over ``spots/`` restricted to the spots with role ``part`` in ``split``.

    Only the slide partitions holding such spots are listed, and a row filter is pushed
    down to the Parquet reader.
    """
    import ray.data
    from ray.data.expressions import col

    rows = store.rows(split, part)
    slides = sorted(set(store.spots["slide_id"].to_numpy()[rows]))
    paths = [str(store.path / "spots" / f"slide_id={s}" / "part-0.parquet") for s in slides]
    wanted = list(columns)
    ds = ray.data.read_parquet(paths).select_columns(sorted(set(wanted) | {"row"}))  # projection pushdown
    # an expression filter (not a Python callable) is pushed down into the Parquet scan
    ds = ds.filter(expr=col("row").is_in(rows.tolist()))
    if "row" not in wanted:
        ds = ds.select_columns(wanted)
    shapes = {"patch": tuple(store.manifest["patch_shape"]), "expression": (int(store.manifest["n_genes"]),)}
    return ds.map_batches(_ListsToTensors(shapes), batch_format="pyarrow")


class _ListsToTensors:
    """Turn fixed-size-list columns into numpy tensor columns ([B, px, px, 3], [B, G])."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes

    def __call__(self, batch):  # pyarrow.Table -> dict of numpy arrays
        out = {}
        for name in batch.column_names:
            column = batch.column(name).combine_chunks()
            if name in self.shapes:
                out[name] = column.values.to_numpy().reshape((len(batch), *self.shapes[name]))
            else:
                out[name] = column.to_numpy()
        return out
