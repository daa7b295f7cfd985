"""Streaming and Ray-distributed ingest (agl.data.ingest.ingest_slides) on real her2st slides.

The streamed store must equal the in-memory ``build_store`` one (same spots, patches,
expression, splits and gene sets), the HVGs merged from per-slide sums must equal
scanpy's on the same spots, and a failed slide must be named and resumable.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData

from agl.data.ingest import IngestSettings, SlideSource, build_store, ingest_slides
from agl.data.preprocess import preprocess
from agl.data.readers import read_her2st
from agl.data.splits import loso_validation, make_splits
from agl.data.stats import GeneMoments, seurat_hvg
from agl.data.store import open_store
from agl.errors import DataError

SLIDES = ["B4", "C2"]  # different gene lists (767 and 1184 genes of their own): the intersection matters
SETTINGS = dict(patch_px=32, seeds=(0,))


@pytest.fixture(scope="module")
def reference_store(her2st_dir, tmp_path_factory):
    """The in-memory path: all slides read at once, then build_store."""
    return open_store(build_store(read_her2st(her2st_dir, SLIDES), tmp_path_factory.mktemp("ref") / "store",
                                  **SETTINGS))


def assert_same_store(ref, new) -> None:
    assert ref.split_names == new.split_names
    pd.testing.assert_frame_equal(ref.spots, new.spots)
    assert ref.split_table.layout() == new.split_table.layout()  # the same compact table, column for column
    ref_columns, new_columns = ref.split_table.loaded(), new.split_table.loaded()
    assert ref_columns.keys() == new_columns.keys()
    assert all(np.array_equal(ref_columns[c], new_columns[c]) for c in ref_columns)
    assert np.array_equal(ref.patches, new.patches)
    assert ref.gene_names == new.gene_names
    assert np.array_equal(ref.expression, new.expression)  # densified from CSR when new is sparse
    np.testing.assert_allclose(ref.genes["mean"], new.genes["mean"], rtol=1e-6)
    assert np.array_equal(ref.genes["n_spots"], new.genes["n_spots"])
    for name in ref.split_names:  # primary panel, its order, every prior and rank: identical
        pd.testing.assert_frame_equal(ref.gene_set(name), new.gene_set(name), check_exact=True)


def _assert_equals_scanpys_hvgs(ours: pd.DataFrame, x_train, var_names) -> pd.DataFrame:
    """scanpy's seurat HVGs of ``x_train``; ``ours`` must give the same genes, order, flags, dispersions and means."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sc.pp.highly_variable_genes(AnnData(X=x_train, var=pd.DataFrame(index=var_names)),
                                             flavor="seurat", n_top_genes=50, inplace=False)
    assert list(ours.index) == list(theirs.index)
    assert np.array_equal(ours["highly_variable"].to_numpy(), theirs["highly_variable"].to_numpy())
    np.testing.assert_allclose(ours["dispersions_norm"], theirs["dispersions_norm"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours["means"], theirs["means"], rtol=1e-12)
    return theirs


def test_merged_moments_give_scanpys_seurat_hvgs(her2st_dir):
    pp = preprocess(read_her2st(her2st_dir, SLIDES))
    x = sp.csr_matrix(pp.X)
    slide = pp.obs["slide_id"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    train = rng.random(pp.n_obs) < 0.7
    merged = GeneMoments.zeros(1, pp.n_vars)
    for s in SLIDES:  # per-slide sums, added up as the streaming driver does
        at = slide == s
        merged += GeneMoments.of(x[at], train[at][None, :])
    mean, var = merged.mean_var(0)
    ours = seurat_hvg(mean, var, 50, pp.var_names)
    theirs = _assert_equals_scanpys_hvgs(ours, x[train], pp.var_names)
    assert ours["highly_variable"].sum() == 50
    # and a mask that is wrong on purpose gives other genes (the check can fail)
    other = seurat_hvg(*GeneMoments.of(x, (~train)[None, :]).mean_var(0), 50, pp.var_names)
    assert not np.array_equal(other["highly_variable"].to_numpy(), theirs["highly_variable"].to_numpy())


def test_loso_moments_as_all_slides_minus_the_held_out_one_give_scanpys_hvgs(her2st_dir):
    """A leave-one-slide-out split's training moments are merged as ingest_slides merges them: the sum of every
    slide's loso part (non-validation spots) minus the held-out slide's part; HVGs equal scanpy's on the split's
    training spots."""
    slides3 = ["B4", "C2", "C3"]
    pp = preprocess(read_her2st(her2st_dir, slides3))
    x = sp.csr_matrix(pp.X)
    slide = pp.obs["slide_id"].astype(str).to_numpy()
    part = ~loso_validation(pp.obs)
    per_slide = {s: GeneMoments.of(x[slide == s], part[slide == s][None, :]) for s in slides3}
    total = GeneMoments.zeros(1, pp.n_vars)
    for m in per_slide.values():
        total += m
    splits = make_splits(pp.obs, kinds=("loso",))
    chosen = []
    for held in slides3:
        train = (splits[f"loso-{held}"] == "train").to_numpy()
        ours = seurat_hvg(*(total - per_slide[held]).mean_var(0), 50, pp.var_names)
        _assert_equals_scanpys_hvgs(ours, x[train], pp.var_names)
        chosen.append(frozenset(ours.index[ours["highly_variable"]]))
    assert len(set(chosen)) == 3  # each held-out slide gives its own panel (subtracting the wrong slide would show)


def test_streamed_sparse_store_equals_in_memory_store(her2st_dir, reference_store, tmp_path):
    out = ingest_slides(SlideSource("her2st", her2st_dir, units=SLIDES), tmp_path / "streamed",
                        IngestSettings(**SETTINGS, expression_layout="sparse"))
    new = open_store(out, verify=True)
    assert new.expression_layout == "sparse" and reference_store.expression_layout == "dense"
    assert_same_store(reference_store, new)
    rows, cols = np.array([3, 7, 300, 450]), np.array([0, 5, 17, 400])
    assert np.array_equal(new.expression_rows(rows, cols), reference_store.expression[rows][:, cols])
    assert not any(p.name.startswith(f".{out.name}.") for p in tmp_path.iterdir())  # no temp or staging left
    sparse_bytes = sum(f.stat().st_size for f in (out / "arrays").glob("expression_*.arrow"))
    dense_bytes = (reference_store.path / "arrays" / "expression.arrow").stat().st_size
    # uint16 counts + uint16 gene indices (4 bytes a non-zero) instead of float32 rows (4 bytes a gene)
    assert new.manifest["expression_encoding"] == {"indices": "uint16", "values": "uint16", "transform": "log1p",
                                                   "max_count": new.manifest["expression_encoding"]["max_count"]}
    assert sparse_bytes < 0.3 * dense_bytes


class FlakySource(SlideSource):
    """Reads her2st, except that ``broken`` slides raise a DataError (a corrupt input)."""

    def __init__(self, *args, broken=(), **kw):
        super().__init__(*args, **kw)
        self.broken = set(broken)

    def __call__(self, unit):
        if unit in self.broken:
            raise DataError(f"{unit}.tsv.gz", "truncated file (simulated)")
        return super().__call__(unit)


@pytest.mark.reliability(kind="fault", case="one slide of a streamed ingest fails",
                         outcome="the slide is named, no store appears, a re-run resumes from the staged slides")
def test_failed_slide_is_reported_and_the_rerun_resumes(her2st_dir, reference_store, tmp_path):
    out = tmp_path / "store"
    settings = IngestSettings(**SETTINGS, expression_layout="dense")
    with pytest.raises(DataError, match=r"1 of 2 slides failed in the stage pass \(C2: DataError"):
        ingest_slides(FlakySource("her2st", her2st_dir, units=SLIDES, broken={"C2"}), out, settings)
    assert not out.exists()
    staged = [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    assert len(staged) == 1 and (staged[0] / "B4" / "slide.json").is_file()
    # the re-run must not read B4 again: make it unreadable and expect success
    ingest_slides(FlakySource("her2st", her2st_dir, units=SLIDES, broken={"B4"}), out, settings)
    assert_same_store(reference_store, open_store(out, verify=True))


def test_distributed_ingest_on_local_ray(her2st_dir, reference_store, tmp_path, ray_local):
    out = ingest_slides(SlideSource("her2st", her2st_dir, units=SLIDES), tmp_path / "ray",
                        IngestSettings(**SETTINGS), address="local")
    store = open_store(out, verify=True)
    assert store.manifest["ingest"]["mode"].startswith("ray")
    assert_same_store(reference_store, store)
    from agl.data.loaders import ray_dataset

    batch = ray_dataset(store, "kfold-s0-f0", "train").take_batch(5)  # CSR lists densified per batch
    assert batch["expression"].shape == (5, store.manifest["n_genes"])
    assert np.array_equal(batch["expression"], reference_store.expression[batch["row"]])
