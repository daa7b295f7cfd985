"""Evaluation metrics over primary genes: computed per slide, then averaged over slides.

This is the paper's protocol: for every slide, the Pearson (PCC) and Spearman (SCC)
correlation of each gene across that slide's spots, averaged over genes, and the MSE;
then the mean over slides. A gene that is constant within a slide (in the prediction or
the truth) has no defined correlation there: it is left out of that slide's mean and
counted in ``n_undefined``.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from scipy.stats import rankdata

from agl.errors import DataError, show


def _columnwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns of ``a`` and ``b`` ``[n, G]``; NaN where either is constant."""
    a = a.astype(np.float64, copy=False)
    b = b.astype(np.float64, copy=False)
    ac = a - a.mean(axis=0)
    bc = b - b.mean(axis=0)
    num = (ac * bc).sum(axis=0)
    den = np.sqrt((ac * ac).sum(axis=0) * (bc * bc).sum(axis=0))
    # exact constancy (ptp == 0) is what makes a correlation undefined; tiny variances are still defined
    constant = (np.ptp(a, axis=0) == 0) | (np.ptp(b, axis=0) == 0) | (a.shape[0] < 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[constant] = np.nan
    return np.clip(r, -1.0, 1.0)


def _columnwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation (Pearson of average ranks, as scipy.stats.spearmanr) per column."""
    return _columnwise_pearson(rankdata(a, axis=0), rankdata(b, axis=0))


def _select_primary(gene_names: Sequence[str], primary: int | Sequence[str] | None) -> np.ndarray:
    """Column indices of the genes to score: all, the first ``primary`` ones, or the named ones."""
    names = list(gene_names)
    if primary is None:
        return np.arange(len(names))
    if isinstance(primary, (int, np.integer)):
        if not 0 < primary <= len(names):
            raise DataError("primary", f"primary={primary} is outside 1..{len(names)}")
        return np.arange(int(primary))
    position = {g: i for i, g in enumerate(names)}
    missing = [g for g in primary if g not in position]
    if missing:
        raise DataError("primary", f"{len(missing)} primary genes not among the predicted genes, e.g. {show(missing[:5])}")
    return np.array([position[g] for g in primary], dtype=np.int64)


def evaluate_predictions(
    pred: np.ndarray,
    target: np.ndarray,
    slide_ids: Sequence[Any] | np.ndarray,
    gene_names: Sequence[str],
    primary: int | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-slide PCC / SCC / MSE over the scored genes, averaged over slides.

    Args:
        pred, target: ``[N, G]`` predictions and truth (columns in ``gene_names`` order).
        slide_ids: ``[N]`` slide of each spot.
        gene_names: the ``G`` column names.
        primary: genes to score: ``None`` = all columns, an int = the first ``primary``
            columns (primary genes come first in model output order), or a list of names.

    Returns:
        ``pcc``, ``scc``, ``mse`` (means over slides), ``n_slides``, ``n_undefined``
        (slide-gene pairs with an undefined PCC), ``per_slide`` (slide -> pcc/scc/mse/
        n_spots/n_undefined), ``per_gene_pcc`` / ``per_gene_scc`` (``[P]``, nan-mean over
        slides) and ``genes`` (the scored gene names).
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    slide_ids = np.asarray(slide_ids)
    if pred.shape != target.shape or pred.ndim != 2:
        raise DataError("predictions", f"pred {pred.shape} and target {target.shape} must both be [N, G]")
    if slide_ids.shape != (pred.shape[0],):
        raise DataError("slide_ids", f"need one slide id per spot ({pred.shape[0]}), got shape {slide_ids.shape}")
    if len(gene_names) != pred.shape[1]:
        raise DataError("gene_names", f"{len(gene_names)} names for {pred.shape[1]} columns")
    cols = _select_primary(gene_names, primary)
    pred, target = pred[:, cols], target[:, cols]

    per_slide: dict[str, dict[str, float]] = {}
    pcc_rows, scc_rows = [], []
    for slide in np.unique(slide_ids):
        rows = slide_ids == slide
        pcc = _columnwise_pearson(pred[rows], target[rows])
        scc = _columnwise_spearman(pred[rows], target[rows])
        pcc_rows.append(pcc)
        scc_rows.append(scc)
        undefined = int(np.isnan(pcc).sum())
        per_slide[str(slide)] = {
            "pcc": float(np.nanmean(pcc)) if undefined < len(pcc) else float("nan"),
            "scc": float(np.nanmean(scc)) if np.isfinite(scc).any() else float("nan"),
            "mse": float(np.mean((pred[rows].astype(np.float64) - target[rows]) ** 2)),
            "n_spots": int(rows.sum()),
            "n_undefined": undefined,
        }
    pcc_mat = np.vstack(pcc_rows)  # [slides, P]
    scc_mat = np.vstack(scc_rows)

    def nanmean(values: np.ndarray, axis: int | None = None) -> Any:
        with warnings.catch_warnings():  # an all-NaN column legitimately averages to NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(values, axis=axis)

    slides = list(per_slide.values())
    return {
        "pcc": float(nanmean(np.array([s["pcc"] for s in slides]))),
        "scc": float(nanmean(np.array([s["scc"] for s in slides]))),
        "mse": float(np.mean([s["mse"] for s in slides])),
        "n_slides": len(slides),
        "n_undefined": int(sum(s["n_undefined"] for s in slides)),
        "per_slide": per_slide,
        "per_gene_pcc": nanmean(pcc_mat, axis=0),
        "per_gene_scc": nanmean(scc_mat, axis=0),
        "genes": [gene_names[i] for i in cols],
    }



def paired_difference_tests(diff: Sequence[float], alternative: str = "two-sided") -> dict[str, float]:
    """Tests of paired differences ``a - b`` against 0: paired t and Wilcoxon signed-rank (scipy), with
    the mean difference and its standard error. agl's one paired-test helper (study, benchmarks, sweeps).

    ``alternative``: ``two-sided``, or ``greater`` (``a`` beats ``b``) / ``less``, as scipy takes it.
    A p-value is NaN where its test is undefined: fewer than two pairs; t when every difference is
    equal (zero variance); Wilcoxon when every difference is zero.
    """
    from scipy.stats import ttest_1samp, wilcoxon

    d = np.asarray(diff, dtype=float)
    nan = float("nan")
    out = {"n": int(len(d)), "mean_diff": float(d.mean()) if len(d) else nan, "se_diff": nan, "t": nan, "p_t": nan,
           "p_wilcoxon": nan}
    if len(d) < 2:
        return out
    out["se_diff"] = float(d.std(ddof=1) / np.sqrt(len(d)))
    if d.std(ddof=1) > 0:
        res = ttest_1samp(d, 0.0, alternative=alternative)
        out.update(t=float(res.statistic), p_t=float(res.pvalue))
    if np.any(d != 0):
        out["p_wilcoxon"] = float(wilcoxon(d, alternative=alternative).pvalue)
    return out
