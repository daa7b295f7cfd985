"""The per-batch data path of ``fit`` (issue 26) on the real demo store and a sparse her2st store.

The streaming bundle (targets gathered per batch from the memory-mapped store arrays, frozen
features gathered from a memory-mapped cache, evaluation streamed in chunks with per-gene sums)
must give the same batches and the same metrics as the in-memory bundle and today's
``evaluate_predictions``, for every method, in features and finetune modes, and must allocate
nothing of size spots x genes.
"""
from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from agl.config import list_gates
from agl.data.store import Store, open_store
from agl.errors import DataError
from agl.evaluation.metrics import StreamingMetrics, evaluate_predictions
from agl.training import bundles
from agl.training.bundles import make_bundle
from agl.training.loop import fit
from agl.training.streaming import MappedFeatureInputs, StoreTargets
from trainkit import first_split, pooled_features, small_config

TOL = 1e-6


@pytest.fixture(scope="module")
def sparse_store(tmp_path_factory) -> Path:
    """The real demo sections (996 spots, 32 px patches) in the sparse (CSR, count-encoded) layout."""
    from agl.data.ingest import build_store
    from agl.datasets import DEMO_STORE_SETTINGS, her2st_demo

    settings = {**DEMO_STORE_SETTINGS, "patch_px": 32, "seeds": [0], "split_kinds": ["kfold", "loso"]}
    return build_store(her2st_demo(), tmp_path_factory.mktemp("sparse") / "store", **settings,
                       expression_layout="sparse")


@pytest.fixture
def mapped_cheap_features(monkeypatch, tmp_path):
    """Features mode reads the cheap pooled features from a real memory-mapped .npy file (as the
    CNN cache is read), for the streaming and the in-memory bundle alike."""
    import agl.models

    def cache(store, *args, **kwargs):
        path = tmp_path / f"{Path(store.path).name}.npy"
        if not path.exists():
            np.save(path, pooled_features(store))
        return np.load(path, mmap_mode="r")

    monkeypatch.setattr(agl.models, "feature_cache", cache)


class TodaysBundle:
    """The in-memory bundle without ``eval_batches``: ``fit`` evaluates it as before this change
    (the whole part at once, ``evaluate_predictions``)."""

    def __init__(self, bundle):
        self._bundle = bundle

    def __getattr__(self, name):
        if name == "eval_batches":
            raise AttributeError(name)
        return getattr(self._bundle, name)


def _assert_same_metrics(a: dict, b: dict, tol: float = TOL) -> None:
    for key in ("pcc", "scc", "mse"):
        assert a[key] == pytest.approx(b[key], abs=tol, nan_ok=True), key
    assert a["n_slides"] == b["n_slides"] and a["n_undefined"] == b["n_undefined"] and a["genes"] == b["genes"]
    np.testing.assert_allclose(a["per_gene_pcc"], b["per_gene_pcc"], atol=tol)
    np.testing.assert_allclose(a["per_gene_scc"], b["per_gene_scc"], atol=tol)
    assert list(a["per_slide"]) == list(b["per_slide"])
    for slide, row in a["per_slide"].items():
        for key, value in row.items():
            assert value == pytest.approx(b["per_slide"][slide][key], abs=tol, nan_ok=True), (slide, key)


def _store(name, demo_store, sparse_store):
    return open_store(demo_store if name == "demo" else sparse_store)


@pytest.mark.parametrize("store_name", ["demo", "sparse"])
@pytest.mark.parametrize("mode", ["features", "finetune"])
def test_streaming_batches_equal_the_in_memory_bundle(store_name, mode, demo_store, sparse_store,
                                                      mapped_cheap_features):
    store = _store(store_name, demo_store, sparse_store)
    if mode == "finetune" and store_name == "demo":
        pytest.skip("224 px patches: the batches are the same PatchInputs; the 32 px sparse store covers finetune")
    cfg = small_config(mode=mode, val_outer_fraction=0.5)
    new = make_bundle(store, first_split(store), cfg)
    old = make_bundle(store, first_split(store), cfg, in_memory=True)
    assert isinstance(new.targets, StoreTargets) and isinstance(old.targets, np.ndarray)
    if mode == "features":
        assert isinstance(new.inputs, MappedFeatureInputs) and isinstance(old.inputs, bundles.FeatureInputs)
    for epoch in (0, 1):
        batches = zip(new.train_batches(64, epoch), old.train_batches(64, epoch), strict=True)
        for (xn, yn), (xo, yo) in batches:
            assert torch.equal(xn, xo) and torch.equal(yn, yo)
        for part in ("val", "val_outer"):
            for (xn, yn), (xo, yo) in zip(new.val_batches(64, epoch, part), old.val_batches(64, epoch, part), strict=True):
                assert torch.equal(xn, xo) and torch.equal(yn, yo)
    for part in ("train", "val", "val_outer", "test"):
        xn, yn, sn = new.eval_arrays(part)
        xo, yo, so = old.eval_arrays(part)
        assert torch.equal(xn, xo) and np.array_equal(yn, yo) and np.array_equal(sn, so)
        chunks = list(new.eval_batches(part, batch_size=50, n_columns=new.n_primary))
        rows = np.concatenate([c[2] for c in chunks])
        assert sorted(rows) == sorted(so) and all((rows[:-1] <= rows[1:]) | (rows[:-1] == rows[1:]))


@pytest.mark.parametrize("method", list_gates())
def test_fit_gives_todays_metrics_for_every_method(method, demo_store, mapped_cheap_features):
    """Features mode on the demo: the streaming bundle and streamed evaluation against today's bundle and
    evaluation, same seed: every epoch's validation PCC and loss, and the test metrics, to 1e-6."""
    options = {"k": 20} if method in ("topk", "random_k") else {}
    cfg = small_config(method=method, epochs=2, val_outer_fraction=0.3 if method == "dkgsb" else 0.0, **options)
    store = open_store(demo_store)
    new = fit(cfg, make_bundle(store, first_split(store), cfg))
    old = fit(cfg, TodaysBundle(make_bundle(store, first_split(store), cfg, in_memory=True)))
    assert len(new.history) == len(old.history)
    for a, b in zip(new.history, old.history):
        assert a["val_pcc"] == pytest.approx(b["val_pcc"], abs=TOL)
        if "val_loss" in b:
            assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)  # float64 sums vs today's float32 torch
    _assert_same_metrics(new.test, old.test)
    assert new.k == old.k and np.array_equal(new.selected, old.selected)


def test_finetune_fit_gives_todays_metrics(sparse_store):
    cfg = small_config(mode="finetune", epochs=1, batch_size=64)
    store = open_store(sparse_store)
    new = fit(cfg, make_bundle(store, first_split(store), cfg))
    old = fit(cfg, TodaysBundle(make_bundle(store, first_split(store), cfg, in_memory=True)))
    assert new.history[0]["val_pcc"] == pytest.approx(old.history[0]["val_pcc"], abs=TOL)
    _assert_same_metrics(new.test, old.test)


def test_streaming_metrics_equal_evaluate_predictions(demo_store):
    """Real demo targets, predictions = targets + noise, a gene constant on one slide, a one-spot slide:
    every chunk size gives evaluate_predictions' numbers; rows of a closed slide are refused."""
    store = open_store(demo_store)
    rows = np.arange(600)
    slides = store.spots["slide_id"].astype(str).to_numpy()[rows]
    slides[-1] = "lonely"  # a slide of one spot: every correlation undefined
    target = store.expression_block(rows, np.arange(40))
    target[slides == slides[0], 3] = 1.0  # constant within a slide
    pred = target + np.random.default_rng(0).normal(scale=0.5, size=target.shape).astype(np.float32)
    names = [f"g{i}" for i in range(40)]
    expected = evaluate_predictions(pred, target, slides, names, primary=30)
    for chunk in (1, 7, 128, 600):
        metrics = StreamingMetrics(names, primary=30)
        for start in range(0, len(rows), chunk):
            metrics.update(pred[start:start + chunk], target[start:start + chunk], slides[start:start + chunk])
        _assert_same_metrics(metrics.result(), expected, tol=1e-9)
    full = StreamingMetrics(names, primary=30)
    full.update(pred, target, slides)
    p, t = torch.as_tensor(pred[:, :30]), torch.as_tensor(target[:, :30])
    from agl.training.losses import mse_loss, pearson_loss
    assert full.loss("pcc") == pytest.approx(float(pearson_loss(p, t).mean()), abs=1e-5)
    assert full.loss("mse") == pytest.approx(float(mse_loss(p, t).mean()), abs=1e-6)
    broken = StreamingMetrics(names)
    broken.update(pred[:10], target[:10], slides[:10])
    broken.update(pred[500:510], target[500:510], slides[500:510])
    with pytest.raises(DataError, match="grouped by slide"):
        broken.update(pred[10:20], target[10:20], slides[10:20])


@pytest.mark.parametrize("store_name", ["demo", "sparse"])
def test_no_spots_by_genes_array_is_allocated(store_name, demo_store, sparse_store, mapped_cheap_features,
                                              monkeypatch):
    """An allocation guard: numpy reports every array it allocates to tracemalloc; building the bundle and
    fitting (train, validation and test evaluation) never holds a fifth of the split's targets array (the demo
    is small: a training batch of all genes is a few % of it), while
    the in-memory bundle does hold it. The sparse store must not even be densified."""
    store = _store(store_name, demo_store, sparse_store)
    # bi-level steps hold ~4 batches; outer_val "batch": "full" (the features-mode default) holds the
    # outer-validation part in one batch by design
    cfg = small_config(method="dkgsb", epochs=2, batch_size=16, bilevel_batch_size=16, outer_val="batch")
    n_spots = int(store.manifest["n_spots"])
    n_genes = len(store.gene_set(first_split(store)))
    dense_bytes = n_spots * n_genes * 4
    if store_name == "sparse":
        def refuse(self):
            raise AssertionError("the store was densified")
        monkeypatch.setattr(Store, "expression", property(refuse))
        monkeypatch.setattr(Store, "expression_csr", property(refuse))
    monkeypatch.setattr(bundles, "EVAL_CHUNK", 16)  # evaluation chunks as small as the batches
    # warm up: the spot table and gene set caches, and every module fit imports (code objects are traced too)
    fit(cfg.replace(epochs=1), make_bundle(store, first_split(store), cfg))
    tracemalloc.start()
    try:
        fit(cfg, make_bundle(store, first_split(store), cfg))
        streamed = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert streamed < dense_bytes / 5, (streamed, dense_bytes)
    if store_name == "demo":  # the guard sees the old bundle's array, so it can fail
        tracemalloc.start()
        try:
            make_bundle(store, first_split(store), cfg, in_memory=True)
            held = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert held >= dense_bytes


def test_cv_folds_share_the_bundle(demo_store, mapped_cheap_features):
    """A CV fold is the outer bundle under other roles: the same target reader and inputs, no rebuild."""
    store = open_store(demo_store)
    cfg = small_config()
    outer = make_bundle(store, first_split(store), cfg)
    roles = np.asarray(store.split(first_split(store)))
    fold_roles = np.where(roles == "test", "", roles)
    fold_roles[np.flatnonzero(roles == "train")[:100]] = "test"
    fold = outer.with_roles(fold_roles)
    assert fold.targets is outer.targets and fold.inputs is outer.inputs
    assert np.array_equal(fold.parts["test"], np.flatnonzero(roles == "train")[:100])
    rebuilt = make_bundle(store, first_split(store), cfg, roles=fold_roles)
    for (xa, ya), (xb, yb) in zip(fold.train_batches(64, 0), rebuilt.train_batches(64, 0), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.reliability(kind="bad input", case="agl train on a store whose expression arrays disagree with "
                         "manifest.json (spot or gene count edited)",
                         outcome="exit != 0; message names the first file that disagrees (arrays/expression.arrow, or for "
                                 "a spot count the split table) and both counts; no run folder written")
def test_train_refuses_arrays_that_disagree_with_the_manifest(layout, small_store, sparse_store, tmp_path, capsys,
                                                              monkeypatch):
    from agl.cli import main

    monkeypatch.chdir(tmp_path)
    source = Path(small_store if layout == "dense" else sparse_store)
    store = tmp_path / "store"
    shutil.copytree(source, store, ignore=shutil.ignore_patterns("cache"))
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["n_genes" if layout == "dense" else "n_spots"] += 1
    (store / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "run"
    capsys.readouterr()
    code = main(["train", "--store", str(store), "--split", first_split(source), "--method", "pgl", "--out", str(out),
                 "--set", "epochs=1", "--set", "device=cpu", "--set", "mode=finetune", "--set", "weights=null"])
    err = capsys.readouterr().err
    assert code not in (0, None)
    if layout == "dense":
        assert "expression.arrow" in err and "disagree" in err, err
    else:  # the spot count is checked first by the split table, the first file of the store that is read
        spots, recorded = manifest["n_spots"] - 1, manifest["n_spots"]   # the table's count, the edited one
        assert "split_table.parquet" in err and f"{spots} spots" in err and f"records {recorded}" in err, err
    assert "Traceback" not in err, err
    assert not out.exists()


def test_feature_cache_of_another_store_is_refused(tmp_path):
    features = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float32, shape=(8, 5, 3))
    with pytest.raises(DataError, match="5 spots, the store has 6"):
        MappedFeatureInputs(features, tmp_path / "f.npy", n_spots=6)
    with pytest.raises(DataError, match=r"\[8, N, D\]"):
        MappedFeatureInputs(np.zeros((4, 5, 3), np.float32), tmp_path / "g.npy")
