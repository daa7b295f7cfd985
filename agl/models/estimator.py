"""The estimator: (optional backbone) -> shared trunk MLP -> one linear head over all genes."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from agl.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


class Estimator(nn.Module):
    """Predict ``n_genes`` outputs (primary genes first, then auxiliary) from features or images.

    The trunk exists because auxiliary genes act only through *shared trainable* parameters:
    with frozen features and independent per-gene linear heads, an auxiliary gene's loss
    would only move its own head row and could not change any primary prediction. The trunk
    (or a fine-tuned backbone) is what the auxiliary genes shape. ``trunk=()`` gives a plain
    linear head (then auxiliary genes matter only with a trainable backbone).

    Args:
        in_dim: input feature size (the backbone's output size when ``backbone`` is given).
        n_genes: number of outputs.
        trunk: hidden widths; each adds Linear -> activation -> Dropout.
        dropout: dropout probability after each trunk layer.
        backbone: optional image encoder ``[B, 3, H, W] -> [B, in_dim]`` (fine-tuning mode).
        activation: ``gelu`` or ``relu``.
    """

    def __init__(
        self,
        in_dim: int,
        n_genes: int,
        trunk: Sequence[int] = (512,),
        dropout: float = 0.1,
        backbone: nn.Module | None = None,
        activation: str = "gelu",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError("activation", f"unknown activation {activation!r}; choose {sorted(ACTIVATIONS)}")
        if in_dim <= 0 or n_genes <= 0 or any(int(w) <= 0 for w in trunk):
            raise ConfigError("model", f"sizes must be positive: in_dim={in_dim}, n_genes={n_genes}, trunk={list(trunk)}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError("dropout", f"must lie in [0, 1), got {dropout}")
        self.in_dim, self.n_genes = int(in_dim), int(n_genes)
        self.backbone = backbone
        layers: list[nn.Module] = []
        width = self.in_dim
        for hidden in trunk:
            layers += [nn.Linear(width, int(hidden)), ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = int(hidden)
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(width, self.n_genes)

    def features(self, x: Tensor) -> Tensor:
        """Trunk output (the shared representation) for images or backbone features."""
        if self.backbone is not None:
            x = self.backbone(x)
        return self.trunk(x)

    def forward(self, x: Tensor, n_outputs: int | None = None) -> Tensor:
        """Predictions ``[B, n_genes]``, or only the first ``n_outputs`` (e.g. the primary genes).

        uint8 patches (the fine-tuning batches on an accelerator) are ImageNet-normalised here, on
        their device."""
        if x.dtype == torch.uint8:
            from agl.data.loaders import normalise_uint8

            x = normalise_uint8(x)
        h = self.features(x)
        if n_outputs is None:
            return self.head(h)
        # skips the auxiliary rows of the head: the bi-level validation loss reads primary genes only
        return nn.functional.linear(h, self.head.weight[:n_outputs], self.head.bias[:n_outputs])
