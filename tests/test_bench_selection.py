"""The planted generator of ``agl bench selection`` on the demo's real image features (small sizes).

The benchmark itself is a command; this checks that its known answer is what it says:
helpful genes share the primaries' factors through the image features, conflict and
noise genes do not, and the prior has the requested precision.
"""
from __future__ import annotations

import numpy as np
import pytest

from agl.bench.selection import PlantedStore, curve_ks, method_settings, paired_test, plant, summarise_curve
from agl.errors import AGLError, ConfigError


@pytest.fixture(scope="module")
def store(demo_store):
    from agl.data.store import open_store

    return open_store(demo_store)


@pytest.fixture(scope="module")
def features(store):
    from agl.models import feature_cache

    return np.asarray(feature_cache(store))  # the demo's frozen MobileNetV2 features, as the benchmark reads them


def _r2_from(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Share of each column of y explained by a least-squares fit on x (with intercept)."""
    x1 = np.hstack([x, np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(x1, y, rcond=None)
    resid = y - x1 @ coef
    return 1.0 - resid.var(axis=0) / y.var(axis=0)


def test_planted_structure(features):
    p = plant(features, n_primary=20, n_aux=600, helpful_fraction=0.2, conflict_fraction=0.3, n_components=12,
              n_factors=3, seed=1)
    n = p.n_primary
    y = p.targets.astype(np.float64)
    assert y.shape == (features.shape[1], 620) and p.k_planted == 120
    assert list(p.genes["role"][:n]) == ["primary"] * n and (p.genes["role"][n:] == "auxiliary").all()
    assert p.genes["rank_planted"].iloc[n:].is_monotonic_increasing  # auxiliary genes in prior order
    kinds = {k: y[:, n:][:, p.kind == k] for k in ("helpful", "conflict", "noise")}
    # helpful genes are explained by the primaries' factors, conflict genes by the other ones, noise by neither
    r2_shared = {k: _r2_from(p.shared, v).mean() for k, v in kinds.items()}
    r2_conflict = {k: _r2_from(p.conflict, v).mean() for k, v in kinds.items()}
    assert _r2_from(p.shared, y[:, :n]).mean() == pytest.approx(0.3, abs=0.08)
    assert r2_shared["helpful"] == pytest.approx(0.6, abs=0.08) and r2_conflict["conflict"] == pytest.approx(0.8, abs=0.08)
    assert r2_shared["conflict"] < 0.05 and r2_shared["noise"] < 0.05 and r2_conflict["helpful"] < 0.05
    # through the image features: the factors are functions of them (the nonlinear ones only partly linear)
    x = features.mean(axis=0)
    assert _r2_from(np.hstack([x, x ** 2])[:, :200], p.shared).min() > 0.0
    # helpful genes correlate with the primaries, conflict and noise genes do not
    z = (y - y.mean(0)) / y.std(0)
    corr = np.abs(z[:, :n].T @ z[:, n:] / len(z)).max(axis=0)
    assert corr[p.kind == "helpful"].mean() > 3 * corr[p.kind == "conflict"].mean()
    assert corr[p.kind == "conflict"].mean() < 1.5 * corr[p.kind == "noise"].mean()  # chance level, about


@pytest.mark.parametrize("precision", [0.6, 0.8, 0.95])
def test_prior_precision(features, precision):
    p = plant(features, n_primary=10, n_aux=1000, precision=precision, n_components=8, n_factors=2, seed=0)
    assert p.precision_at(p.k_planted) == pytest.approx(precision, abs=0.01)
    assert p.precision_at(p.k_planted) < 1.0 or precision == 1.0  # not perfect: the prior is noisy
    with pytest.raises(ConfigError, match="precision"):
        plant(features, n_aux=100, precision=0.1, n_components=8, n_factors=2)


def test_planted_store_trains_like_a_store(store, features):
    from agl.config import TrainConfig
    from agl.training.bundles import make_bundle

    p = plant(features, n_primary=5, n_aux=40, n_components=8, n_factors=2)
    split = store.split_names[0]
    store = PlantedStore(store, p)
    cfg = TrainConfig.from_dict({"method": "topk", "k": p.k_planted, "prior": "planted", "val_outer_fraction": 0.5,
                                 "weights": None})
    data = make_bundle(store, split, cfg)
    assert data.n_primary == 5 and np.array_equal(data.targets, p.targets) and len(data.parts["val_outer"]) > 0
    assert set(method_settings(6, ["unroll", "ift_cg"])) == {"pgl", "agl_all", "topk", "random_k", "dkgsb_unroll",
                                                             "dkgsb_ift_cg"}
    with pytest.raises(AGLError):
        store.gene_set("no-such-split")


def test_paired_test():
    t = paired_test([0.5, 0.6, 0.55, 0.58], [0.4, 0.52, 0.5, 0.5])
    assert t["mean_diff"] == pytest.approx(0.0775) and t["p"] < 0.05


def test_curve_ks_and_summary():
    assert curve_ks(300, 2000) == [75, 150, 300, 450, 600, 999]
    assert curve_ks(300, 500, (0.001, 1.0, 5.0)) == [1, 300, 499]  # within 1..n_aux - 1
    runs = [{"seed": s, "method": m, "k": k, "test_pcc": p} for s in (0, 1, 2)
            for m, k, p in (("topk", 10, 0.5 + 0.01 * s), ("agl_all", 40, 0.4 + 0.02 * s))]
    curve = [{"seed": s, "k": 20, "test_pcc": 0.45 + 0.015 * s} for s in (0, 1, 2)]
    c = summarise_curve(curve, runs)
    assert c["k"] == [10, 20, 40] and c["best_k_per_seed"] == {0: 10, 1: 10, 2: 10}
    assert c["pcc_mean"][0] == pytest.approx(0.51) and c["planted_vs_k"][40]["mean_diff"] == pytest.approx(0.09)


def test_unknown_plant_setting_fails_before_training(store, tmp_path):
    from agl.bench.selection import bench_selection

    with pytest.raises(ConfigError, match="no_such_key"):
        bench_selection(store, tmp_path, n_aux=50, seeds=2, plant_options={"no_such_key": 1}, echo=lambda s: None)
    assert not list(tmp_path.iterdir())  # nothing written


def test_default_design_makes_conflict_genes_the_majority(features):
    p = plant(features, n_primary=5, n_aux=1000, n_components=8, n_factors=2, seed=0)
    share = {k: float((p.kind == k).mean()) for k in ("helpful", "conflict", "noise")}
    assert share == pytest.approx({"helpful": 0.15, "conflict": 0.7, "noise": 0.15})


def test_plot_without_dkgsb_has_no_empty_panels(tmp_path):
    import warnings

    from agl.bench.selection import _plot, summarise

    runs = [{"seed": s, "method": m, "k": k, "test_pcc": p + 0.01 * s, "history": []} for s in (0, 1)
            for m, k, p in (("pgl", 0, 0.4), ("topk", 10, 0.45))]
    curve = summarise_curve([{"seed": s, "k": 20, "test_pcc": 0.42} for s in (0, 1)], runs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty DkGSB panel's legend() warns "No artists with labels"
        path = _plot(runs, summarise(runs, {0: 10, 1: 10}), tmp_path / "curve.png", curve)
    assert path.exists() and path.stat().st_size > 0


def test_first_seed_picks_the_planted_data_sets(store, tmp_path):
    """--first-seed 3 --seeds 2 plants (and pairs over) seeds 3 and 4: the same runs as seeds 3-4 of a run from 0."""
    from agl.bench.selection import bench_selection

    with pytest.raises(ConfigError, match="first-seed"):
        bench_selection(store, tmp_path / "bad", n_aux=50, seeds=2, first_seed=-1, echo=lambda s: None)
    tiny = dict(n_aux=60, methods=["pgl"], epochs=1, patience=1, curve=(), extra={"trunk": [8]}, echo=lambda s: None)
    later = bench_selection(store, tmp_path / "later", seeds=2, first_seed=3, **tiny)
    every = bench_selection(store, tmp_path / "every", seeds=5, **tiny)
    assert later["first_seed"] == 3 and [r["seed"] for r in later["runs"]] == [3, 4]
    pcc = {r["seed"]: r["test_pcc"] for r in every["runs"]}
    assert len(set(pcc.values())) == 5  # the seeds plant different data
    assert [r["test_pcc"] for r in later["runs"]] == pytest.approx([pcc[3], pcc[4]], rel=1e-6)


def test_curve_counts_seeds_whose_own_best_k_is_near_the_planted_k(tmp_path):
    """The identifiability check: seed 0's best k (20) is within 25% of its planted 18; seed 1's (10) is not."""
    from agl.bench.selection import _plot, summarise

    runs = [{"seed": s, "method": m, "k": k, "test_pcc": p, "history": [{"epoch": 0, "k": k}]}
            for s, best in ((0, 20), (1, 10))
            for m, k, p in (("pgl", 0, 0.4), ("topk", 18, 0.45), ("agl_all", 40, 0.41), ("dkgsb_unroll", 30, 0.44))]
    curve = [{"seed": s, "k": k, "test_pcc": 0.5 if k == best else 0.43} for s, best in ((0, 20), (1, 10))
             for k in (10, 20)]
    c = summarise_curve(curve, runs, {0: 18, 1: 18})
    assert c["best_k_per_seed"] == {0: 20, 1: 10}
    assert c["oracle_within_tolerance"] == {"seeds": 1, "of": 2, "tolerance": 0.25}
    assert c["per_seed"][1] == {10: 0.5, 18: 0.45, 20: 0.43, 40: 0.41}
    path = _plot(runs, summarise(runs, {0: 18, 1: 18}), tmp_path / "per_seed.png", c)
    assert path.exists() and path.stat().st_size > 0
