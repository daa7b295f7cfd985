"""Per-gene training losses: each maps ``pred, target [B, G]`` to a vector ``[G]``.

Gates (``agl.selection``) turn the per-gene vector into the training objective, so a
loss never reduces over genes itself.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from agl.registry import Registry

LossFn = Callable[[Tensor, Tensor], Tensor]
# name -> per-gene loss (the ``loss`` setting); a new loss is a function and @LOSSES.register("name")
LOSSES: Registry[LossFn] = Registry("loss", setting="loss")


@LOSSES.register("pcc")
def pearson_loss(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """``1 - pearson(pred[:, g], target[:, g])`` per gene, centred over the batch.

    ``eps`` sits inside the inverse square root of the variance product, so a gene that is
    constant in the batch (in the target or the prediction) gives covariance 0, a loss of
    exactly 1 and a zero gradient, instead of the NaN that ``sqrt(0)`` would back-propagate.
    """
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"pearson_loss needs pred and target of equal shape [B, G], got {tuple(pred.shape)} and {tuple(target.shape)}")
    pc = pred - pred.mean(dim=0, keepdim=True)
    tc = target - target.mean(dim=0, keepdim=True)
    cov = (pc * tc).sum(dim=0)
    var_product = pc.square().sum(dim=0) * tc.square().sum(dim=0)
    return 1.0 - cov * torch.rsqrt(var_product + eps)


@LOSSES.register("mse")
def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per gene, averaged over the batch."""
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"mse_loss needs pred and target of equal shape [B, G], got {tuple(pred.shape)} and {tuple(target.shape)}")
    return (pred - target).square().mean(dim=0)


def get_loss(name: str) -> LossFn:
    """The per-gene loss registered as ``name`` (``pcc`` or ``mse``)."""
    return LOSSES.get(name)
