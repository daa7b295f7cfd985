"""Finding a model's genes in a slide whose genes may be named otherwise (symbols or Ensembl IDs).

A slide's ``var`` may carry other names of each gene in well-known columns (scanpy / 10x:
``gene_ids``, ``gene_symbols``, ``feature_name``, ...). A model gene is found by its exact name
in ``var_names`` first, else in any of those columns; Ensembl IDs also match without their
version suffix (``ENSG00000141736.14`` == ``ENSG00000141736``). Case is kept: ``Erbb2`` (mouse)
is not ``ERBB2`` (human).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

ALIAS_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "gene_name", "symbol", "gene_ids", "gene_id",
                 "feature_id", "ensembl_id")
_VERSION = re.compile(r"^(ENS[A-Z]*G\d+)\.\d+$")


def unversioned(name: str) -> str:
    """An Ensembl gene ID without its version suffix; any other name unchanged."""
    m = _VERSION.match(name)
    return m.group(1) if m else name


def alias_columns(var: pd.DataFrame) -> dict[str, np.ndarray]:
    """The columns of ``var`` that hold other names of its genes, as string arrays."""
    return {c: var[c].astype(str).to_numpy() for c in ALIAS_COLUMNS if c in var.columns}


def locate_genes(var: pd.DataFrame, genes: Sequence[str]) -> sp.csr_matrix:
    """0/1 matrix (slide genes x ``genes``): column j marks the slide rows that are ``genes[j]``.

    Several rows (e.g. two IDs of one symbol) are all marked, so ``counts @ M`` adds them; an
    all-zero column is a gene the slide lacks.
    """
    names = var.index.astype(str).to_numpy()
    exact: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        exact.setdefault(unversioned(n), []).append(i)
    other: dict[str, list[int]] = {}
    for values in alias_columns(var).values():
        for i, n in enumerate(values):
            other.setdefault(unversioned(n), []).append(i)
    rows, cols = [], []
    for j, g in enumerate(genes):
        key = unversioned(str(g))
        hit = exact.get(key) or sorted(set(other.get(key, [])))
        rows += hit
        cols += [j] * len(hit)
    return sp.csr_matrix((np.ones(len(rows), np.float64), (rows, cols)), shape=(len(names), len(genes)))
