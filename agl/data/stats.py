"""Per-gene sufficient statistics that merge across slides, and the seurat HVG table from them.

Streaming ingest (``agl.data.ingest.ingest_slides``) never holds all spots at once, yet
the gene filter and every split's primary genes and priors need all training spots. Each
of those is a function of per-gene sums, so each slide contributes its sums and the
driver adds them up:

- ``filter_genes(min_cells)``: the number of spots where a gene is non-zero;
- the "mean" prior: the sum of the log1p expression over the training spots;
- ``highly_variable_genes(flavor="seurat")``: scanpy takes ``expm1`` of the log1p data
  and the per-gene mean and unbiased variance (``_get_mean_var``), then log-dispersions
  normalised within 20 bins of log mean. Mean and variance come from the count, the sum
  and the sum of squares of ``expm1(x)``; the bins and normalisation are then applied to
  the merged values (:func:`seurat_hvg`), following scanpy 1.11
  ``_highly_variable_genes_single_batch`` step by step. ``tests/test_streaming_ingest.py``
  checks the result against ``scanpy.pp.highly_variable_genes`` on the same spots.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class GeneMoments:
    """Count, per-gene sum of the log1p values, and sum and sum of squares of ``expm1`` of them.

    Rows are groups (e.g. one per split's training spots); columns are genes. Sums are
    float64; squares are taken in the data's float32, as scanpy's sparse mean/variance does.
    """

    n: np.ndarray             # [groups] spots in each group
    log_sum: np.ndarray       # [groups, genes] sum of x (log1p expression)
    lin_sum: np.ndarray       # [groups, genes] sum of expm1(x)
    lin_sumsq: np.ndarray     # [groups, genes] sum of expm1(x)**2
    nonzero: np.ndarray = field(default=None)  # [groups, genes] spots with x > 0 (int64)

    @classmethod
    def zeros(cls, n_groups: int, n_genes: int) -> "GeneMoments":
        z = lambda: np.zeros((n_groups, n_genes), dtype=np.float64)  # noqa: E731
        return cls(np.zeros(n_groups, np.int64), z(), z(), z(), np.zeros((n_groups, n_genes), np.int64))

    @classmethod
    def of(cls, x_log: sp.csr_matrix, groups: np.ndarray) -> "GeneMoments":
        """Moments of the rows of ``x_log`` (float32 CSR) in each group; ``groups`` bool [groups, rows]."""
        g = sp.csr_matrix(np.asarray(groups, dtype=np.float64))
        x = sp.csr_matrix(x_log, dtype=np.float32)
        lin = x.copy()
        np.expm1(lin.data, out=lin.data)
        sq = lin.copy()
        sq.data = sq.data * sq.data  # float32 product, as scanpy's numba kernel
        ones = x.copy()
        ones.data = (ones.data > 0).astype(np.float64)
        dense = lambda m: np.asarray((g @ sp.csr_matrix(m, dtype=np.float64)).todense())  # noqa: E731
        return cls(np.asarray(groups, dtype=bool).sum(axis=1).astype(np.int64), dense(x), dense(lin), dense(sq),
                   np.rint(dense(ones)).astype(np.int64))

    def __iadd__(self, other: "GeneMoments") -> "GeneMoments":
        self.n += other.n
        self.log_sum += other.log_sum
        self.lin_sum += other.lin_sum
        self.lin_sumsq += other.lin_sumsq
        self.nonzero += other.nonzero
        return self

    def __sub__(self, other: "GeneMoments") -> "GeneMoments":
        """The moments of a group's spots minus a subset of them (a leave-one-slide-out split's training spots:
        every slide's minus the held-out slide's)."""
        return GeneMoments(self.n - other.n, self.log_sum - other.log_sum, self.lin_sum - other.lin_sum,
                           self.lin_sumsq - other.lin_sumsq, self.nonzero - other.nonzero)

    def row(self, group: int) -> "GeneMoments":
        """One group's moments (a copy) as a 1-group GeneMoments."""
        at = slice(group, group + 1) if group != -1 else slice(-1, None)
        return GeneMoments(self.n[at].copy(), self.log_sum[at].copy(), self.lin_sum[at].copy(),
                           self.lin_sumsq[at].copy(), self.nonzero[at].copy())

    def save(self, path: str | Path) -> None:
        np.savez(path, n=self.n, log_sum=self.log_sum, lin_sum=self.lin_sum, lin_sumsq=self.lin_sumsq,
                 nonzero=self.nonzero)

    @classmethod
    def load(cls, path: str | Path) -> "GeneMoments":
        with np.load(path) as f:
            return cls(f["n"], f["log_sum"], f["lin_sum"], f["lin_sumsq"], f["nonzero"])

    def mean_var(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        """scanpy's ``_get_mean_var`` of ``expm1(x)`` for one group: mean and unbiased variance."""
        n = int(self.n[group])
        mean = self.lin_sum[group] / n
        var = self.lin_sumsq[group] / n - mean ** 2
        if n != 1:
            var *= n / (n - 1)
        return mean, var


def seurat_hvg(mean: np.ndarray, var: np.ndarray, n_top_genes: int, index: pd.Index,
               n_bins: int = 20) -> pd.DataFrame:
    """``highly_variable_genes(flavor="seurat", n_top_genes=...)`` from the mean and variance of expm1(x).

    Returns scanpy's columns ``means, dispersions, mean_bin, dispersions_norm,
    highly_variable`` indexed by ``index``.
    """
    mean = np.array(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(dispersion)
    mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    # a bin holding one gene has no std: scanpy sets that gene's normalised dispersion to 1
    single = stats["dev"].isnull()
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0
    per_gene = stats.loc[df["mean_bin"]].set_index(df.index)
    df["dispersions_norm"] = (df["dispersions"] - per_gene["avg"]) / per_gene["dev"]
    norm = df["dispersions_norm"].to_numpy()
    n_top = min(int(n_top_genes), len(norm))
    finite = np.sort(norm[~np.isnan(norm)])[::-1]
    cutoff = finite[min(n_top, finite.size) - 1]
    df["highly_variable"] = np.nan_to_num(norm, nan=-np.inf) >= cutoff
    df.index = index
    return df
