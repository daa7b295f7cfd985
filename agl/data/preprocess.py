"""Expression preprocessing (scanpy) and per-split gene sets with prior rankings.

``preprocess`` reproduces the authors' targets: ``filter_cells(min_genes)``,
``filter_genes(min_cells)``, optional ``normalize_total``, ``log1p``.

``gene_set`` chooses the primary genes of one split from its TRAINING spots only
(the release computed HVGs on whole slides, test spots included, which leaks):
exactly ``n_primary`` of them (:func:`primary_genes` breaks scanpy's ties), optionally
only among genes detected in a minimum fraction of those spots; it
scores every other gene as an auxiliary candidate with prior knowledge from the
``PRIORS`` registry. Ranks are min-max normalised ordinal ranks among the auxiliary
genes (0 = best), the input of DkGSB's threshold gate.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData

from agl.errors import ConfigError, DataError
from agl.registry import Registry

PREPROCESS_KEY = "agl_preprocess"


def preprocess(adata: AnnData, min_genes: int = 200, min_cells: int = 3,
               normalize_total: float | None = None, log1p: bool = True) -> AnnData:
    """Filter spots and genes, then normalise; returns a new AnnData.

    Raw counts of the kept spots/genes stay in ``layers["counts"]``; ``X`` is float32
    (sparse CSR). The switches are recorded in ``uns["agl_preprocess"]``.
    """
    ad = adata.copy()
    genes_per_spot = np.asarray((sp.csr_matrix(ad.X) > 0).sum(axis=1)).ravel()  # for the message below
    sc.pp.filter_cells(ad, min_genes=min_genes)
    sc.pp.filter_genes(ad, min_cells=min_cells)
    if ad.n_obs == 0 or ad.n_vars == 0:
        raise DataError(None, filtered_out_message(ad.n_obs, ad.n_vars, min_genes, min_cells, adata.n_vars,
                                                   float(np.median(genes_per_spot)) if len(genes_per_spot) else 0.0))
    ad.layers["counts"] = ad.X.copy()
    ad.X = sp.csr_matrix(ad.X, dtype=np.float32)
    if normalize_total:
        sc.pp.normalize_total(ad, target_sum=float(normalize_total))
    if log1p:
        sc.pp.log1p(ad)
    ad.uns[PREPROCESS_KEY] = {"min_genes": int(min_genes), "min_cells": int(min_cells),
                              "normalize_total": None if not normalize_total else float(normalize_total),
                              "log1p": bool(log1p)}
    return ad


@dataclass
class PriorContext:
    """What a prior function may read: training spots only, plus optional outside data."""

    train: AnnData               # preprocessed, training spots of the split
    hvg: pd.DataFrame            # scanpy HVG table on the training spots (index = genes)
    primary: np.ndarray          # bool [n_genes], primary genes
    prior_data: AnnData | None   # expression-only data (preprocessed alike), e.g. other sections
    train_mean: np.ndarray | None = None  # per-gene mean of the training spots, when merged from slides


def _hvg_prior(ctx: PriorContext) -> np.ndarray:
    return ctx.hvg["dispersions_norm"].to_numpy(dtype=np.float64)


def _mean_prior(ctx: PriorContext) -> np.ndarray:
    if ctx.train_mean is not None:  # streaming ingest: merged from per-slide sums (agl.data.stats)
        return np.asarray(ctx.train_mean, dtype=np.float64)
    # float64 sums: float32 ones are order-dependent, and split genes with equal means (many rare
    # genes) into an arbitrary order that a merge of per-slide sums could not reproduce
    x = sp.csr_matrix(ctx.train.X, dtype=np.float64)  # scipy's mean(dtype=float64) still sums in float32
    return np.asarray(x.sum(axis=0)).ravel() / max(x.shape[0], 1)


def _coexpr_prior(ctx: PriorContext) -> np.ndarray:
    """Mean |Pearson r| of each gene with the primary genes, measured on ``prior_data``."""
    if ctx.prior_data is None:
        raise ConfigError("priors", "prior 'coexpr' needs prior_data (expression-only sections)")
    genes = ctx.train.var_names
    pdata = ctx.prior_data
    present = genes.isin(pdata.var_names)
    primary_names = genes[ctx.primary & present]
    if len(primary_names) == 0:
        raise DataError(None, "prior_data shares no primary gene with the store")
    common = genes[present]
    x = sp.csr_matrix(pdata[:, common].X, dtype=np.float64)
    xp = x[:, common.get_indexer(primary_names)].toarray()
    n = x.shape[0]
    mu = np.asarray(x.mean(axis=0)).ravel()
    sd = np.sqrt(np.maximum(np.asarray(x.multiply(x).mean(axis=0)).ravel() - mu ** 2, 0.0))
    mup, sdp = xp.mean(0), xp.std(0)
    cov = np.asarray(x.T @ xp) / n - np.outer(mu, mup)  # sparse x dense: no dense genes x spots copy
    with np.errstate(divide="ignore", invalid="ignore"):
        r = cov / np.outer(sd, sdp)
    r[~np.isfinite(r)] = 0.0  # constant genes correlate with nothing
    score = np.full(len(genes), np.nan)
    score[present] = np.abs(r).mean(axis=1)
    return score


# name -> function(ctx) -> score per gene (higher = better; NaN = no information, ranked last)
PRIORS: Registry[Callable[[PriorContext], np.ndarray]] = Registry("prior", setting="priors")
PRIORS.register("hvg", _hvg_prior)
PRIORS.register("mean", _mean_prior)
PRIORS.register("coexpr", _coexpr_prior)


def normalised_rank(score: np.ndarray) -> np.ndarray:
    """Ordinal rank by descending score, min-max normalised to [0, 1] (0 = best; NaN last)."""
    score = np.asarray(score, dtype=np.float64)
    n = len(score)
    key = np.where(np.isnan(score), -np.inf, score)
    order = np.argsort(-key, kind="stable")  # ties keep gene order
    rank = np.empty(n, dtype=np.float64)
    rank[order] = np.arange(n)
    return rank / max(n - 1, 1)


def primary_genes(hvg: pd.DataFrame, n_primary: int, detection: np.ndarray | None = None,
                  min_detection: float = 0.0) -> np.ndarray:
    """Exactly ``n_primary`` primary genes (bool mask over ``hvg``'s rows) from a seurat HVG table.

    scanpy's ``n_top_genes`` keeps every gene whose normalised dispersion reaches the
    n-th one, so ties at the cut-off return extra genes. Here genes are ordered by
    ``dispersions_norm``, then ``dispersions``, then ``means`` (all descending), then
    name, and the first ``n_primary`` are kept: the same set as scanpy's when there is no
    tie, and independent of the gene order when there is. ``min_detection`` > 0 makes
    only genes with ``detection`` (fraction of training spots with a non-zero count) at
    least that high eligible; the dispersion table itself stays that of all genes.
    """
    check_min_detection(min_detection)
    norm = hvg["dispersions_norm"].to_numpy(dtype=np.float64)
    eligible = np.isfinite(norm)
    if min_detection > 0:
        if detection is None or len(detection) != len(norm):
            raise ConfigError("--primary-min-detection", "needs a detection rate per gene")
        eligible &= np.asarray(detection, dtype=np.float64) >= min_detection
    if eligible.sum() < n_primary:
        raise DataError(None, f"only {int(eligible.sum())} genes are eligible as primary genes (finite dispersion"
                              + (f", detected in >= {min_detection:.0%} of the training spots" if min_detection > 0 else "")
                              + f"), fewer than --n-primary {n_primary}: lower --n-primary"
                              + (" or --primary-min-detection" if min_detection > 0 else ""))
    neg = lambda c: -np.nan_to_num(hvg[c].to_numpy(dtype=np.float64), nan=-np.inf)  # noqa: E731  (NaN last)
    name_rank = np.unique(hvg.index.astype(str), return_inverse=True)[1]
    order = np.lexsort((name_rank, neg("means"), neg("dispersions"), neg("dispersions_norm")))
    chosen = order[eligible[order]][:n_primary]
    mask = np.zeros(len(norm), dtype=bool)
    mask[chosen] = True
    return mask


def filtered_out_message(n_spots: int, n_genes: int, min_genes: int, min_cells: int, n_input_genes: int,
                         median_genes_per_spot: float) -> str:
    """What the spot/gene filters left and the flags to change (a small targeted panel needs a lower --min-genes)."""
    return (f"preprocessing left {n_spots} spots x {n_genes} genes: each spot needs --min-genes {min_genes} detected "
            f"genes and each gene --min-cells {min_cells} spots; the slides have {n_input_genes} genes and their median "
            f"spot detects {median_genes_per_spot:g}. Lower --min-genes (e.g. --min-genes "
            f"{max(1, int(median_genes_per_spot // 2))}) or --min-cells for a small gene panel")


def check_min_detection(min_detection: float) -> None:
    """A detection-rate threshold is a fraction in [0, 1)."""
    if not 0.0 <= float(min_detection) < 1.0:
        raise ConfigError("--primary-min-detection", f"must be a fraction in [0, 1), got {min_detection}")


def gene_set(adata_pp: AnnData, train_mask: np.ndarray | pd.Series, n_primary: int = 50,
             priors: Iterable[str] = ("hvg", "mean"), prior_data: AnnData | None = None,
             primary_min_detection: float = 0.0) -> pd.DataFrame:
    """Primary and auxiliary genes of one split, from its training spots only.

    Primary genes: the top ``n_primary`` of ``sc.pp.highly_variable_genes(flavor="seurat")``
    on the training spots, exactly that many (:func:`primary_genes`), among the genes
    non-zero in at least ``primary_min_detection`` of those spots. Auxiliary genes:
    every other gene, with one ``prior_<name>``
    score and ``rank_<name>`` (among auxiliary genes, 0 = best) per prior. The "hvg"
    prior is always included; "coexpr" is added when ``prior_data`` is given.

    Returns columns ``gene, column, role, prior_*, rank_*``: primary genes first (by
    HVG score), then auxiliary genes by ``rank_hvg``. ``column`` indexes the store's
    expression matrix (the order of ``adata_pp.var_names``). Primary rows have NaN ranks.
    """
    mask = np.asarray(train_mask, dtype=bool)
    if mask.shape != (adata_pp.n_obs,):
        raise ConfigError("gene_set", f"train_mask has shape {mask.shape}, expected ({adata_pp.n_obs},)")
    if mask.sum() < 3:
        raise ConfigError("gene_set", f"only {int(mask.sum())} training spots")
    names = prior_names(priors, prior_data, n_primary, adata_pp.n_vars)
    check_min_detection(primary_min_detection)
    # a light copy of the training rows: scanpy is much faster on it than on a view
    train = AnnData(X=sp.csr_matrix(adata_pp.X)[mask], var=pd.DataFrame(index=adata_pp.var_names))
    with warnings.catch_warnings():  # scanpy warns about genes with zero mean in a subset
        warnings.simplefilter("ignore")
        hvg = sc.pp.highly_variable_genes(train, flavor="seurat", n_top_genes=n_primary, inplace=False)
    detection = np.asarray((train.X > 0).mean(axis=0)).ravel()
    primary = primary_genes(hvg, n_primary, detection, primary_min_detection)
    hvg["highly_variable"] = primary  # the table agrees with the panel actually used
    return gene_table(PriorContext(train=train, hvg=hvg, primary=primary, prior_data=prior_data), names)


def prior_names(priors: Iterable[str], prior_data: AnnData | None, n_primary: int, n_genes: int) -> list[str]:
    """The priors a gene set scores ("hvg" first, "coexpr" added with ``prior_data``), validated."""
    names = ["hvg"] + [p for p in priors if p != "hvg"]
    if prior_data is not None and "coexpr" not in names:
        names.append("coexpr")
    unknown = [p for p in names if p not in PRIORS]
    if unknown:
        raise ConfigError("--priors", f"unknown prior(s) {unknown}; known: {sorted(PRIORS)}")
    check_panel(n_genes, n_primary)
    return names


def check_panel(n_genes: int, n_primary: int) -> None:
    """Refuse more primary genes than preprocessing left (a targeted panel), naming the flag to change."""
    if not 0 < n_primary < n_genes:
        raise ConfigError("--n-primary", f"must be in 1..{n_genes - 1} (the {n_genes} genes left after preprocessing "
                                         f"need at least one auxiliary gene), got {n_primary}: lower --n-primary "
                                         f"(e.g. --n-primary {max(1, n_genes // 2)}) or --min-cells")


def gene_table(ctx: PriorContext, names: list[str]) -> pd.DataFrame:
    """The gene-set table of :func:`gene_set` from a prior context (in-memory or merged statistics)."""
    var_names = ctx.train.var_names
    primary = ctx.primary
    table = pd.DataFrame({"gene": var_names.astype(str), "column": np.arange(len(var_names)),
                          "role": np.where(primary, "primary", "auxiliary")})
    aux = ~primary
    for p in names:
        score = np.asarray(PRIORS[p](ctx), dtype=np.float64)
        table[f"prior_{p}"] = score
        rank = np.full(len(score), np.nan)
        rank[aux] = normalised_rank(score[aux])
        table[f"rank_{p}"] = rank
    prim = table[primary].assign(_k=normalised_rank(table.loc[primary, "prior_hvg"].to_numpy()))
    prim = prim.sort_values("_k", kind="stable").drop(columns="_k")
    rest = table[aux].sort_values("rank_hvg", kind="stable")
    return pd.concat([prim, rest], ignore_index=True)
