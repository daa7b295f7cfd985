"""``agl study`` end to end at a tiny size on the real demo store: the page, its tables and figures,
the overwrite guard, and the second primary-gene panel (minimum detection rate)."""
from __future__ import annotations

import numpy as np
import pytest

from agl.cli import main
from agl.data.store import open_store
from trainkit import use_cheap_features

MARKERS = ("<!-- agl study: begin", "<!-- agl study: end -->")


def tiny(page, work, *extra: str, seeds: str = "0") -> list[str]:
    return ["study", "--panels", "seurat", "--protocols", "loso", "--slides", "B4", "--seeds", seeds,
            "--ks", "100,1000", "--epochs", "2", "--patience", "1", "--set", "trunk=[16]",
            "--set", "bilevel_batch_size=256", "--set", "weights=null",
            "--out", str(page), "--work", str(work), *extra]


def test_study_writes_the_page_with_tables_and_figures_and_guards_it(demo_store, tmp_path, monkeypatch):
    use_cheap_features(monkeypatch)
    monkeypatch.setattr("agl.evaluation.protocol.prepare_inputs", lambda store, specs: None)  # no CNN cache in tests
    page, work = tmp_path / "docs" / "results.md", tmp_path / "work"
    page.parent.mkdir()
    page.write_text("hand-written results\n")
    assert main(tiny(page, work)) == 1  # a page without a study block is not replaced silently
    assert page.read_text() == "hand-written results\n" and not work.exists()  # refused before any training

    page.write_text(f"{MARKERS[0]} plan=0 -->\nold block\n{MARKERS[1]}\n\n## Kept section\n")
    assert main(tiny(page, work, "--overwrite")) == 0
    text = page.read_text()
    assert text.count(MARKERS[0]) == 1 and text.count(MARKERS[1]) == 1 and "old block" not in text
    assert text.rstrip().endswith("## Kept section")  # outside the markers: kept
    for needle in ("agl study --panels seurat --protocols loso --seeds 0", "--ks 100,1000 --epochs 2 --patience 1",
                   "| pgl | 1 |", "| agl_all | 1 |", "| dkgsb | 1 |", "| 100 | ", "| 1000 | ", "(all)",
                   "| top-k test PCC | random-k test PCC | top-k − AGL-all (paired) |", "| dkgsb − agl_all | 1 |", "Wilcoxon p (genes)",
                   "| B4 |", "**a subset of the full study**", "## Answer", "Machine:", "wall time"):
        assert needle in text, needle
    figure = tmp_path / "docs" / "figures" / "study_seurat_loso_curve.png"
    assert "(figures/study_seurat_loso_curve.png)" in text and "(figures/study_seurat_loso_curve_vs_agl_all.png)" in text
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.with_name("study_seurat_loso_curve_vs_agl_all.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the per-gene test of a comparison is the evaluation's Wilcoxon (checked against scipy in test_evaluate)
    n_runs = len(list((work / "seurat" / "loso" / "runs").rglob("result.json")))
    assert n_runs == 7  # pgl, agl_all, dkgsb, top-k and random-k at two k, one split, one seed

    # the same plan again: runs reused, the block regenerated without --overwrite
    assert main(tiny(page, work)) == 0
    # another plan: refused without --overwrite, page untouched
    before = page.read_text()
    assert main(tiny(page, work, "--min-detection", "0.2")) == 1
    assert page.read_text() == before

    # --report-only trains nothing: a plan with a second seed is written from the finished seed, and says so
    assert main(tiny(page, work, "--report-only", "--overwrite", seeds="0,1")) == 0
    text = page.read_text()
    assert "**Unfinished grid: 7 of its 14 runs**" in text and "--seeds 0,1" in text and "--report-only" in text
    assert len(list((work / "seurat" / "loso" / "runs").rglob("result.json"))) == n_runs
    assert main(tiny(page, tmp_path / "empty", "--report-only", "--overwrite")) == 1  # nothing finished there
    assert page.read_text() == text


def test_paired_p_values_match_scipy():
    from scipy.stats import ttest_rel, wilcoxon

    from agl.evaluation.study import paired_p

    rng = np.random.default_rng(0)
    a, b = rng.normal(0.25, 0.02, 12), rng.normal(0.24, 0.02, 12)
    w, t = paired_p(a - b)
    assert w == pytest.approx(wilcoxon(a, b).pvalue) and t == pytest.approx(ttest_rel(a, b).pvalue)
    assert all(np.isnan(paired_p(np.zeros(5))))


def test_threshold_summary_tells_a_drifting_threshold_from_one_that_moves_on_signal():
    from scipy.stats import binomtest, t as student_t, ttest_1samp

    from agl.evaluation.study import threshold_lines, threshold_summary

    def run(snrs: list[float], t_end: float, best: int) -> dict:
        rows = [{"epoch": 1, "t": 0.5, "outer_steps": 0.0}]  # the warm-up epoch has no outer steps
        ts = np.linspace(0.5, t_end, len(snrs) + 1)[1:]
        rows += [{"epoch": e + 2, "t": float(t), "outer_steps": 10.0, "hypergrad_snr": snr,
                  "hypergrad_sign_agreement": 0.6} for e, (snr, t) in enumerate(zip(snrs, ts))]
        return {"method": "dkgsb", "best_epoch": best, "config": {"t_init": 0.5}, "history": rows}

    # |snr| * sqrt(10) > 2 <=> |snr| > 0.632: noise-like runs have one such epoch in ten
    noisy = [run([0.1, -0.2, 0.7, 0.05, -0.1, 0.3, -0.4, 0.2, 0.1, -0.3], t_end, 4) for t_end in (0.49, 0.51, 0.5)]
    noisy.append({"method": "pgl", "history": [{"epoch": 1}]})  # other methods are ignored
    s = threshold_summary(noisy)
    rate = 2 * student_t.sf(2.0, 9)
    assert s["runs"] == 3 and s["epochs"] == 30 and s["strong_epochs"] == 3
    assert s["noise_rate"] == pytest.approx(rate)
    assert s["p_strong"] == pytest.approx(binomtest(3, 30, rate, alternative="greater").pvalue)
    assert s["p_delta"] == pytest.approx(ttest_1samp([-0.01, 0.01, 0.0], 0.0).pvalue)
    assert s["t_best"] == pytest.approx(np.mean([0.5 + 3 * d / 10 for d in (-0.01, 0.01, 0.0)]))
    assert "not more than noise" in threshold_lines(s)[0]

    moving = threshold_summary([run([-1.5] * 10, t_end, 11) for t_end in (0.3, 0.28, 0.33)])
    assert moving["strong_epochs"] == 30 and moving["p_strong"] < 1e-6 and moving["t_end"] == pytest.approx(0.3033, abs=1e-3)
    assert moving["p_delta"] < 0.01 and "not more than noise" not in threshold_lines(moving)[0]
    assert threshold_summary([{"method": "pgl"}]) is None

    # two training batches per outer step (the features-mode default): 20 estimates per epoch of 10 steps, so
    # |snr| = 0.5 is 2.24 standard errors (strong), where counting steps alone would give 1.58
    two = run([0.5] * 10, 0.4, 11)
    two["config"]["hypergrad_batches"] = 2
    s = threshold_summary([two])
    assert s["strong_epochs"] == 10 and s["noise_rate"] == pytest.approx(2 * student_t.sf(2.0, 19))
    assert threshold_summary([run([0.5] * 10, 0.4, 11)])["strong_epochs"] == 0


def test_detected_panel_store_has_exactly_n_detected_primary_genes_and_shares_features(demo_store, tmp_path):
    from agl.datasets import her2st_demo_store
    from agl.models.features import share_feature_cache

    path = her2st_demo_store(cache_dir=tmp_path, primary_min_detection=0.3)
    assert path.parent == tmp_path and path.name != demo_store.name
    store, default = open_store(path), open_store(demo_store)
    assert store.manifest["preprocessing"]["primary_min_detection"] == 0.3
    split = "loso-B4"
    genes = store.gene_set(split)
    primary = genes[genes["role"] == "primary"]
    assert len(primary) == 50
    train = store.rows(split, "train")
    detected = (store.expression_rows(train, primary["column"].to_numpy()) > 0).mean(axis=0)
    assert detected.min() >= 0.3
    seurat = default.gene_set(split)
    assert set(primary["gene"]) != set(seurat[seurat["role"] == "primary"]["gene"])

    features = default.cache_dir / "features"
    fake = not any(features.glob("*.npy"))
    if fake:  # a demo store without a feature cache: share a stand-in file of the same name scheme
        features.mkdir(parents=True, exist_ok=True)
        (features / "stand-in.npy").write_bytes(b"x")
    try:
        linked = share_feature_cache(default, store)
        names = {p.name for p in features.glob("*") if not p.name.startswith(".")}
        assert {p.name for p in linked} == names
        assert share_feature_cache(default, store) == []  # already there
        assert share_feature_cache(open_store(default.path), _OtherPatches(store)) == []
    finally:
        if fake:
            (features / "stand-in.npy").unlink()


class _OtherPatches:
    """A store whose patch file differs: its features are not the same."""

    def __init__(self, store):
        self._store = store
        self.manifest = {**store.manifest, "files": {**store.manifest.get("files", {}), "arrays/patches.arrow": "other"}}
        self.patches = store.patches
        self.cache_dir = store.cache_dir
