"""HEST-Benchmark's linear probe as a baseline method: frozen features -> PCA(256) -> ridge.

The protocol of HEST-Benchmark (Jaume et al., "HEST-1k: A Dataset for Spatial
Transcriptomics and Histology Image Analysis", NeurIPS 2024 Datasets and Benchmarks;
code: github.com/mahmoodlab/HEST, ``src/hest/bench/benchmark.py`` and ``trainer.py``):
standardise the encoder's patch embeddings, reduce them with PCA to 256 components (fit on
the training spots, ``random_state`` = the seed), then fit one ridge regression for all
target genes (``solver="lsqr"``, ``fit_intercept=False``, ``max_iter=1000``) with the fixed
``alpha = 100 / (n_components * n_genes)``. HEST does not tune alpha; ``probe_alpha="val"``
additionally picks it from a grid (HEST's value included) by validation PCC, which agl's
splits allow. One view (view 0) per spot, as HEST embeds each patch once.

It is registered as the gate ``probe`` (so ``agl train --method probe``, ``agl evaluate
--methods pgl,probe:probe_alpha=val``, config files and search spaces take it and its option
like any method); like PGL it learns the primary genes only (every auxiliary weight 0).
``agl.training.loop.fit`` hands it to ``agl.training.probe.fit_probe`` (the gate's ``fitter``) instead of the
gradient loop, and it is scored by the same ``agl.evaluation.metrics.evaluate_predictions``
on the same splits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agl.checks import is_number, setting
from agl.selection.base import register_gate
from agl.selection.fixed import PrimaryOnlyGate

N_COMPONENTS = 256
ALPHA_GRID = tuple(float(a) for a in np.logspace(-3, 6, 10))  # searched with probe_alpha="val"


def _alpha(v: Any) -> str | None:
    return None if v in ("hest", "val") or (is_number(v) and v > 0) else "must be hest, val or a positive number"


@register_gate("probe")
class ProbeGate(PrimaryOnlyGate):
    """HEST-Benchmark's linear probe: primary genes only (as PGL), fitted in closed form by ``agl.training.probe.fit_probe``."""

    fitter = "agl.training.probe:fit_probe"
    reference = False  # inherited from PGL's class; PGL alone is the reference
    help = "HEST-Benchmark's PCA + ridge probe on frozen features, primary genes only"

    @dataclass
    class Options:
        probe_alpha: str | float = setting(
            "hest", _alpha, "probe's ridge penalty: hest (100 / (256 x genes), as HEST-Benchmark), "
                            "val (picked on validation from a grid) or a number")


def hest_alpha(n_components: int, n_genes: int) -> float:
    """HEST-Benchmark's fixed ridge penalty, ``100 / (n_components * n_genes)``."""
    return 100.0 / (n_components * n_genes)
