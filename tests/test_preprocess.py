"""Preprocessing and per-split gene sets on real her2st counts, checked against scanpy directly."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from scipy import stats

from agl.data.preprocess import PRIORS, gene_set, normalised_rank, preprocess, primary_genes
from agl.data.readers import read_her2st
from agl.data.splits import make_splits
from agl.data.stats import GeneMoments, seurat_hvg
from agl.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def raw(her2st_dir):
    return read_her2st(her2st_dir, ["C2", "C3"], require_image=False)


@pytest.fixture(scope="module")
def pp(raw):
    return preprocess(raw)


@pytest.fixture(scope="module")
def train_mask(pp):
    return (make_splits(pp.obs, kinds=("kfold",))["kfold-s0-f0"] == "train").to_numpy()


def test_preprocess_matches_scanpy_steps(raw, pp):
    ref = raw.copy()
    sc.pp.filter_cells(ref, min_genes=200)
    sc.pp.filter_genes(ref, min_cells=3)
    assert list(pp.obs_names) == list(ref.obs_names) and list(pp.var_names) == list(ref.var_names)
    assert pp.X.dtype == np.float32
    assert (pp.layers["counts"] != ref.X).nnz == 0  # raw counts kept
    np.testing.assert_allclose(pp.X.toarray(), np.log1p(ref.X.toarray()), rtol=1e-6)
    assert pp.uns["agl_preprocess"]["log1p"] is True


def test_normalize_total_option(raw):
    pp = preprocess(raw, normalize_total=1e4, log1p=False)
    np.testing.assert_allclose(np.asarray(pp.X.sum(axis=1)).ravel(), 1e4, rtol=1e-4)


def test_primary_genes_are_scanpy_hvgs_of_the_training_spots(pp, train_mask):
    table = gene_set(pp, train_mask, n_primary=50)
    ref = sc.pp.highly_variable_genes(pp[train_mask].copy(), flavor="seurat", n_top_genes=50, inplace=False)
    expected = set(ref.index[ref["highly_variable"]])
    primary = table.loc[table["role"] == "primary", "gene"]
    assert set(primary) == expected and len(primary) == 50
    assert list(table["role"][:50]) == ["primary"] * 50 and (table["role"][50:] == "auxiliary").all()
    # column indexes the store's expression matrix (= var order)
    assert list(pp.var_names[table["column"]]) == list(table["gene"])
    assert sorted(table["column"]) == list(range(pp.n_vars))


def test_no_leakage_from_test_spots(pp, train_mask):
    """Primary genes computed with every spot differ from those of the training spots only."""
    on_train = set(gene_set(pp, train_mask).query("role == 'primary'")["gene"])
    on_all = set(gene_set(pp, np.ones(pp.n_obs, bool)).query("role == 'primary'")["gene"])
    assert on_train != on_all
    # changing only test spots' expression leaves the gene set unchanged
    noisy = pp.copy()
    x = noisy.X.toarray()
    x[~train_mask] = np.random.default_rng(0).permutation(x[~train_mask].ravel()).reshape(x[~train_mask].shape)
    noisy.X = sp.csr_matrix(x)
    a, b = gene_set(pp, train_mask), gene_set(noisy, train_mask)
    assert a["gene"].equals(b["gene"])
    np.testing.assert_allclose(a["prior_mean"], b["prior_mean"])


def test_prior_ranks(pp, train_mask):
    table = gene_set(pp, train_mask, priors=("hvg", "mean"))
    aux = table[table["role"] == "auxiliary"]
    assert table.loc[table["role"] == "primary", ["rank_hvg", "rank_mean"]].isna().all().all()
    for p in ("hvg", "mean"):
        r = aux[f"rank_{p}"].to_numpy()
        assert r.min() == 0.0 and r.max() == 1.0 and len(np.unique(r)) == len(r)
        # higher prior score -> better (smaller) rank
        score = aux[f"prior_{p}"].fillna(-np.inf).to_numpy()
        assert stats.spearmanr(score, r).statistic < -0.99
    assert aux["rank_hvg"].is_monotonic_increasing  # auxiliary genes ordered by rank_hvg
    # the mean prior is the mean log expression of the training spots
    expected = np.asarray(pp.X[train_mask].mean(axis=0)).ravel()[aux["column"]]
    np.testing.assert_allclose(aux["prior_mean"], expected, rtol=1e-5)


def test_coexpr_prior_from_expression_only_sections(her2st_dir, pp, train_mask):
    other = preprocess(read_her2st(her2st_dir, ["A1", "B1"], require_image=False), min_cells=0)
    table = gene_set(pp, train_mask, prior_data=other)
    assert "rank_coexpr" in table and "coexpr" in PRIORS
    primary = [g for g in table.loc[table["role"] == "primary", "gene"] if g in other.var_names]
    assert 0 < len(primary) < 50  # a few primary genes are absent from the other sections
    aux = table[(table["role"] == "auxiliary") & table["gene"].isin(other.var_names)]
    # check three genes against numpy's Pearson on the same expression-only data
    x = other[:, primary].X.toarray()
    for gene in aux["gene"].iloc[[0, 100, 1000]]:
        g = other[:, gene].X.toarray().ravel()
        r = [np.corrcoef(g, x[:, j])[0, 1] if x[:, j].std() > 0 and g.std() > 0 else 0.0 for j in range(len(primary))]
        got = aux.loc[aux["gene"] == gene, "prior_coexpr"].item()
        assert got == pytest.approx(np.mean(np.abs(r)), rel=1e-6)


def test_normalised_rank():
    np.testing.assert_allclose(normalised_rank(np.array([0.5, 3.0, np.nan, 1.0])), [2 / 3, 0, 1, 1 / 3])


def test_bad_arguments(pp, train_mask):
    with pytest.raises(ConfigError, match="unknown prior"):
        gene_set(pp, train_mask, priors=("hvg", "bogus"))
    with pytest.raises(ConfigError, match="coexpr"):
        gene_set(pp, train_mask, priors=("coexpr",))
    with pytest.raises(ConfigError, match="train_mask"):
        gene_set(pp, train_mask[:-1])


def _scanpy_hvg(pp, train_mask, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sc.pp.highly_variable_genes(pp[train_mask].copy(), flavor="seurat", n_top_genes=n, inplace=False)


def test_primary_count_is_exact_when_scanpy_ties(pp, train_mask):
    """Where scanpy's n_top_genes returns extra tied genes, the panel has exactly n, chosen independently of gene order."""
    norm = _scanpy_hvg(pp, train_mask, 50)["dispersions_norm"].dropna().sort_values(ascending=False).to_numpy()
    ties = [n for n in range(5, 200) if norm[n - 1] == norm[n]]
    assert ties, "no tie at any cut-off on real data: the test would check nothing"
    for n in ties[:2]:
        ref = _scanpy_hvg(pp, train_mask, n)
        theirs = set(ref.index[ref["highly_variable"]])
        assert len(theirs) > n  # scanpy's behaviour that this fixes
        ours = set(gene_set(pp, train_mask, n_primary=n).query("role == 'primary'")["gene"])
        assert len(ours) == n and ours < theirs
        cutoff = norm[n - 1]
        assert set(ref.index[ref["dispersions_norm"] > cutoff]) <= ours  # only the tied genes are cut
        flipped = pp[:, ::-1].copy()  # the same data with the genes in reverse order
        assert set(gene_set(flipped, train_mask, n_primary=n).query("role == 'primary'")["gene"]) == ours
        # the streaming path (HVGs from merged sums) picks the same panel
        moments = GeneMoments.of(sp.csr_matrix(pp.X), train_mask[None, :])
        hvg = seurat_hvg(*moments.mean_var(0), n, pp.var_names)
        streamed = primary_genes(hvg, n, moments.nonzero[0] / moments.n[0])
        assert set(pp.var_names[streamed]) == ours


def test_primary_min_detection(pp, train_mask):
    detection = pd.Series(np.asarray((pp.layers["counts"][train_mask] > 0).mean(axis=0)).ravel(), index=pp.var_names)
    default = gene_set(pp, train_mask).query("role == 'primary'")["gene"].tolist()
    assert (detection[default] < 0.3).sum() > 25  # the plain panel is mostly rarely detected genes
    table = gene_set(pp, train_mask, primary_min_detection=0.3)
    panel = table.query("role == 'primary'")["gene"].tolist()
    assert len(panel) == 50 and (detection[panel] >= 0.3).all()
    # the panel is the top of seurat's ranking among the detected genes (dispersions of all genes)
    norm = _scanpy_hvg(pp, train_mask, 50)["dispersions_norm"]
    left_out = norm[(detection >= 0.3) & ~norm.index.isin(panel)]
    assert left_out.max() <= norm[panel].min()
    assert set(default) & set(panel) == {g for g in default if detection[g] >= 0.3}
    with pytest.raises(ConfigError, match="--primary-min-detection"):
        gene_set(pp, train_mask, primary_min_detection=1.5)
    with pytest.raises(DataError, match="fewer than --n-primary 50"):
        gene_set(pp, train_mask, primary_min_detection=0.999)
