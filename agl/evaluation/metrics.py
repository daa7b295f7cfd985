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
    return _summary(per_slide, pcc_rows, scc_rows, [gene_names[i] for i in cols])


def _nanmean(values: np.ndarray, axis: int | None = None) -> Any:
    with warnings.catch_warnings():  # an all-NaN column legitimately averages to NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _summary(per_slide: dict[str, dict[str, float]], pcc_rows: list[np.ndarray], scc_rows: list[np.ndarray],
             genes: list[str]) -> dict[str, Any]:
    """The means over slides (and per gene) of per-slide scores, as ``evaluate_predictions`` returns them."""
    pcc_mat = np.vstack(pcc_rows)  # [slides, P]
    scc_mat = np.vstack(scc_rows)
    slides = list(per_slide.values())
    return {
        "pcc": float(_nanmean(np.array([s["pcc"] for s in slides]))),
        "scc": float(_nanmean(np.array([s["scc"] for s in slides]))),
        "mse": float(np.mean([s["mse"] for s in slides])),
        "n_slides": len(slides),
        "n_undefined": int(sum(s["n_undefined"] for s in slides)),
        "per_slide": per_slide,
        "per_gene_pcc": _nanmean(pcc_mat, axis=0),
        "per_gene_scc": _nanmean(scc_mat, axis=0),
        "genes": genes,
    }


class _Moments:
    """Per-gene count, means, centred sums of squares and co-moment, squared error and range of
    (pred, target) pairs, merged chunk by chunk (Chan, Golub & LeVeque's pairwise update): exact in
    float64 up to rounding, whatever the chunking."""

    def __init__(self, n_genes: int):
        self.n = 0
        self.mean_p, self.mean_t = np.zeros(n_genes), np.zeros(n_genes)
        self.m2_p, self.m2_t, self.co = np.zeros(n_genes), np.zeros(n_genes), np.zeros(n_genes)
        self.sse = np.zeros(n_genes)
        self.lo_p, self.lo_t = np.full(n_genes, np.inf), np.full(n_genes, np.inf)
        self.hi_p, self.hi_t = np.full(n_genes, -np.inf), np.full(n_genes, -np.inf)

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        p, t = pred.astype(np.float64, copy=False), target.astype(np.float64, copy=False)
        nb = len(p)
        if nb == 0:
            return
        mp, mt = p.mean(axis=0), t.mean(axis=0)
        pc, tc = p - mp, t - mt
        m2p, m2t, co = (pc * pc).sum(axis=0), (tc * tc).sum(axis=0), (pc * tc).sum(axis=0)
        n = self.n + nb
        dp, dt = mp - self.mean_p, mt - self.mean_t
        weight = self.n * nb / n
        self.mean_p += dp * (nb / n)
        self.mean_t += dt * (nb / n)
        self.m2_p += m2p + dp * dp * weight
        self.m2_t += m2t + dt * dt * weight
        self.co += co + dp * dt * weight
        self.n = n
        self.sse += ((p - t) ** 2).sum(axis=0)
        np.minimum(self.lo_p, p.min(axis=0), out=self.lo_p)
        np.minimum(self.lo_t, t.min(axis=0), out=self.lo_t)
        np.maximum(self.hi_p, p.max(axis=0), out=self.hi_p)
        np.maximum(self.hi_t, t.max(axis=0), out=self.hi_t)

    def pearson(self) -> np.ndarray:
        """As ``_columnwise_pearson``: NaN where either side is exactly constant or fewer than 2 spots."""
        constant = (self.hi_p == self.lo_p) | (self.hi_t == self.lo_t) | (self.n < 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = self.co / np.sqrt(self.m2_p * self.m2_t)
        r[constant] = np.nan
        return np.clip(r, -1.0, 1.0)


class StreamingMetrics:
    """``evaluate_predictions`` accumulated over chunks of a part, holding no spots x genes array.

    PCC and MSE come from per-(slide, gene) sums merged chunk by chunk (exact up to float64
    rounding). SCC needs ranks: a slide's scored columns are kept until its last chunk and
    ranked then, exactly as ``evaluate_predictions`` does; so rows must arrive grouped by slide
    (as ``InMemoryBundle.eval_batches`` gives them), and memory is one or two slides x scored genes.
    ``loss(name)`` is the per-gene training loss over the whole part (``agl.training.losses``).
    """

    def __init__(self, gene_names: Sequence[str], primary: int | Sequence[str] | None = None):
        self.names = list(gene_names)
        self.cols = _select_primary(self.names, primary)
        self.moments: dict[str, _Moments] = {}
        self.part = _Moments(len(self.cols))
        self.ranked: dict[str, np.ndarray] = {}
        self.open: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    def update(self, pred: np.ndarray, target: np.ndarray, slide_ids: Sequence[Any] | np.ndarray) -> None:
        """Add a chunk: ``[n, G]`` predictions and truth (``gene_names`` columns) and their slides."""
        pred, target, slide_ids = np.asarray(pred), np.asarray(target), np.asarray(slide_ids)
        if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != len(self.names):
            raise DataError("predictions", f"pred {pred.shape} and target {target.shape} must both be "
                                           f"[n, {len(self.names)}]")
        if slide_ids.shape != (pred.shape[0],):
            raise DataError("slide_ids", f"need one slide id per spot ({pred.shape[0]}), got shape {slide_ids.shape}")
        pred, target = pred[:, self.cols], target[:, self.cols]
        self.part.add(pred, target)
        present = {str(s) for s in np.unique(slide_ids)}
        for slide in [s for s in self.open if s not in present]:
            self._close(slide)
        for slide in np.unique(slide_ids):
            key = str(slide)
            if key in self.ranked:
                raise DataError("slide_ids", f"spots of slide {key!r} came after that slide's last chunk; "
                                             "stream a part grouped by slide")
            rows = slide_ids == slide
            self.moments.setdefault(key, _Moments(len(self.cols))).add(pred[rows], target[rows])
            self.open.setdefault(key, []).append((pred[rows], target[rows]))

    def _close(self, slide: str) -> None:
        chunks = self.open.pop(slide)
        self.ranked[slide] = _columnwise_spearman(np.concatenate([c[0] for c in chunks]),
                                                  np.concatenate([c[1] for c in chunks]))

    def loss(self, name: str, eps: float = 1e-8) -> float:
        """Mean over the scored genes of the per-gene loss ``name`` ("pcc": 1 - Pearson with
        ``agl.training.losses.pearson_loss``'s eps; "mse") over every spot added."""
        m = self.part
        if name == "pcc":
            return float(np.mean(1.0 - m.co / np.sqrt(m.m2_p * m.m2_t + eps)))
        if name == "mse":
            return float(np.mean(m.sse / max(m.n, 1)))
        raise ValueError(f"no streaming form of loss {name!r}")

    def result(self) -> dict[str, Any]:
        """What ``evaluate_predictions`` returns for every chunk added."""
        for slide in list(self.open):
            self._close(slide)
        if not self.moments:
            raise DataError("predictions", "no spots were evaluated")
        per_slide: dict[str, dict[str, float]] = {}
        pcc_rows, scc_rows = [], []
        for slide in sorted(self.moments):
            m = self.moments[slide]
            pcc, scc = m.pearson(), self.ranked[slide]
            pcc_rows.append(pcc)
            scc_rows.append(scc)
            undefined = int(np.isnan(pcc).sum())
            per_slide[slide] = {
                "pcc": float(np.nanmean(pcc)) if undefined < len(pcc) else float("nan"),
                "scc": float(np.nanmean(scc)) if np.isfinite(scc).any() else float("nan"),
                "mse": float(m.sse.sum() / (m.n * len(self.cols))),
                "n_spots": int(m.n),
                "n_undefined": undefined,
            }
        return _summary(per_slide, pcc_rows, scc_rows, [self.names[i] for i in self.cols])



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
