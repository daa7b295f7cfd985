"""Dihedral augmentation: the 8 symmetries of a square patch (rotations by 90 degrees and flips).

View ``k`` in 0..7 rotates by ``90 * (k % 4)`` degrees counter-clockwise, then flips
left-right if ``k >= 4``. The same numbering is used by the training loader and the
frozen-feature cache, so a cached view ``k`` is exactly what the loader would produce.
"""
from __future__ import annotations

import numpy as np
import torch

N_VIEWS = 8


def _check_k(k: int) -> int:
    k = int(k)
    if not 0 <= k < N_VIEWS:
        raise ValueError(f"dihedral view k must be in 0..7, got {k}")
    return k


def dihedral(x: np.ndarray | torch.Tensor, k: int) -> np.ndarray | torch.Tensor:
    """View ``k`` of an image: numpy ``[..., H, W, C]`` (HWC) or torch ``[..., C, H, W]``.

    Both layouts give the same picture for the same ``k``.
    """
    k = _check_k(k)
    if isinstance(x, torch.Tensor):
        y = torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x
        return torch.flip(y, dims=(-1,)) if k >= 4 else y
    y = np.rot90(x, k % 4, axes=(-3, -2))
    return y[..., :, ::-1, :] if k >= 4 else y


# view k of a CHW image built from basic slicing only (np.rot90 / np.flip cost microseconds a call):
# rotate the last two axes (H, W) by 90*(k % 4) degrees counter-clockwise, then reverse W if k >= 4
_CHW_ROTATIONS = (
    lambda m: m,
    lambda m: m[..., ::-1].swapaxes(-2, -1),
    lambda m: m[..., ::-1, ::-1],
    lambda m: m.swapaxes(-2, -1)[..., ::-1],
)


def dihedral_chw(x: np.ndarray, k: int) -> np.ndarray:
    """View ``k`` of a numpy HWC image ``[..., H, W, C]`` as a CHW view ``[..., C, H, W]`` (no copy).

    Equals ``np.moveaxis(dihedral(x, k), -1, -3)``; a strided copy of it (``out[...] = view``)
    applies the view and the layout change in one pass.
    """
    k = _check_k(k)
    n = x.ndim
    m = _CHW_ROTATIONS[k % 4](x.transpose(*range(n - 3), n - 1, n - 3, n - 2))
    return m[..., ::-1] if k >= 4 else m


def dihedral_inverse(k: int) -> int:
    """The view that undoes view ``k``: rotations invert to the opposite turn, reflections to themselves."""
    k = _check_k(k)
    return (4 - k) % 4 if k < 4 else k


def dihedral_batch(x: torch.Tensor, ks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Apply a per-sample view ``ks[i]`` to each image of a batch ``[B, C, H, W]``.

    Groups the batch by view so the cost is at most 8 tensor ops, whatever the batch size.
    """
    ks = torch.as_tensor(np.asarray(ks), dtype=torch.long)
    if ks.shape != (x.shape[0],):
        raise ValueError(f"need one view per sample: batch {x.shape[0]}, got ks of shape {tuple(ks.shape)}")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError("dihedral_batch needs square images (rotation by 90 degrees changes H and W)")
    out = torch.empty_like(x)
    for k in torch.unique(ks).tolist():
        idx = (ks == k).nonzero(as_tuple=True)[0]
        out[idx] = dihedral(x[idx], k)
    return out
