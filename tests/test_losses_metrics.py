"""Per-gene losses and the evaluation metrics, checked against scipy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from agl.errors import ConfigError, DataError
from agl.training.losses import LOSSES, get_loss, mse_loss, pearson_loss
from agl.evaluation.metrics import evaluate_predictions


def test_pearson_loss_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(40, 7))
    target = 0.6 * pred + rng.normal(size=(40, 7))
    loss = pearson_loss(torch.tensor(pred), torch.tensor(target)).numpy()
    expected = [1 - pearsonr(pred[:, g], target[:, g])[0] for g in range(7)]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert loss.shape == (7,)


def test_pearson_loss_gradcheck() -> None:
    torch.manual_seed(0)
    pred = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(9, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: pearson_loss(p, target), (pred,))
    assert torch.autograd.gradgradcheck(lambda p: pearson_loss(p, target), (pred,))  # bi-level needs 2nd order


def test_constant_gene_gives_constant_loss_and_zero_gradient() -> None:
    torch.manual_seed(1)
    pred = torch.randn(16, 3, requires_grad=True)
    target = torch.randn(16, 3)
    target[:, 1] = 2.5  # constant in the batch: undefined correlation
    loss = pearson_loss(pred, target)
    loss.sum().backward()
    assert loss[1].item() == pytest.approx(1.0)
    assert torch.all(pred.grad[:, 1] == 0)
    assert torch.isfinite(pred.grad).all() and pred.grad[:, 0].abs().sum() > 0
    # a constant prediction (e.g. a freshly zeroed head) must not produce NaN gradients either
    flat = torch.zeros(16, 3, requires_grad=True)
    pearson_loss(flat, torch.randn(16, 3)).sum().backward()
    assert torch.isfinite(flat.grad).all()


def test_mse_loss_and_registry() -> None:
    pred, target = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(mse_loss(pred, target), ((pred - target) ** 2).mean(0))
    assert set(LOSSES) == {"pcc", "mse"} and get_loss("pcc") is pearson_loss
    with pytest.raises(ConfigError, match="unknown loss"):
        get_loss("huber")
    with pytest.raises(ValueError):
        pearson_loss(torch.randn(5, 3), torch.randn(5, 4))


def _two_slides(seed: int = 0):
    rng = np.random.default_rng(seed)
    target = rng.gamma(2.0, size=(30, 5))
    pred = target + rng.normal(scale=1.0, size=target.shape)
    slides = np.array(["A"] * 12 + ["B"] * 18)
    return pred, target, slides, [f"g{i}" for i in range(5)]


def test_metrics_match_scipy_per_slide_then_mean_over_slides() -> None:
    pred, target, slides, genes = _two_slides()
    out = evaluate_predictions(pred, target, slides, genes)
    per_slide_pcc, per_slide_scc = {}, {}
    for s in ("A", "B"):
        m = slides == s
        per_slide_pcc[s] = np.mean([pearsonr(pred[m, g], target[m, g])[0] for g in range(5)])
        per_slide_scc[s] = np.mean([spearmanr(pred[m, g], target[m, g])[0] for g in range(5)])
        assert out["per_slide"][s]["pcc"] == pytest.approx(per_slide_pcc[s])
        assert out["per_slide"][s]["scc"] == pytest.approx(per_slide_scc[s])
        assert out["per_slide"][s]["mse"] == pytest.approx(np.mean((pred[m] - target[m]) ** 2))
    # the mean over slides, not over pooled spots (slides have different sizes)
    assert out["pcc"] == pytest.approx(np.mean(list(per_slide_pcc.values())))
    assert out["scc"] == pytest.approx(np.mean(list(per_slide_scc.values())))
    pooled = np.mean([pearsonr(pred[:, g], target[:, g])[0] for g in range(5)])
    assert out["pcc"] != pytest.approx(pooled)
    expected_gene0 = np.mean([pearsonr(pred[slides == s, 0], target[slides == s, 0])[0] for s in "AB"])
    assert out["per_gene_pcc"][0] == pytest.approx(expected_gene0)
    assert out["n_slides"] == 2 and out["n_undefined"] == 0


def test_spearman_with_ties_matches_scipy() -> None:
    rng = np.random.default_rng(3)
    target = rng.integers(0, 3, size=(25, 4)).astype(float)  # many ties, like sparse counts
    pred = target + rng.normal(size=target.shape)
    out = evaluate_predictions(pred, target, np.zeros(25), list("abcd"))
    expected = np.mean([spearmanr(pred[:, g], target[:, g])[0] for g in range(4)])
    assert out["scc"] == pytest.approx(expected)


def test_constant_gene_is_excluded_and_counted() -> None:
    pred, target, slides, genes = _two_slides(1)
    target[slides == "A", 2] = 0.0  # gene 2 never expressed on slide A
    out = evaluate_predictions(pred, target, slides, genes)
    m = slides == "A"
    expected_a = np.mean([pearsonr(pred[m, g], target[m, g])[0] for g in (0, 1, 3, 4)])
    assert out["per_slide"]["A"]["pcc"] == pytest.approx(expected_a)
    assert out["per_slide"]["A"]["n_undefined"] == 1 and out["n_undefined"] == 1
    b = slides == "B"
    assert out["per_gene_pcc"][2] == pytest.approx(pearsonr(pred[b, 2], target[b, 2])[0])


def test_primary_selection_and_bad_input() -> None:
    pred, target, slides, genes = _two_slides()
    first2 = evaluate_predictions(pred, target, slides, genes, primary=2)
    named = evaluate_predictions(pred, target, slides, genes, primary=["g0", "g1"])
    assert first2["pcc"] == pytest.approx(named["pcc"]) and first2["genes"] == ["g0", "g1"]
    assert len(first2["per_gene_pcc"]) == 2
    with pytest.raises(DataError, match="not among"):
        evaluate_predictions(pred, target, slides, genes, primary=["nope"])
    with pytest.raises(DataError, match="slide"):
        evaluate_predictions(pred, target, slides[:-1], genes)


def test_paired_difference_tests_match_scipys_paired_tests():
    from scipy.stats import ttest_rel, wilcoxon

    from agl.evaluation.metrics import paired_difference_tests

    rng = np.random.default_rng(3)
    a, b = rng.normal(0.30, 0.03, 9), rng.normal(0.28, 0.03, 9)
    got = paired_difference_tests(a - b)
    ref = ttest_rel(a, b)
    assert got["n"] == 9 and got["mean_diff"] == pytest.approx(float(np.mean(a - b)))
    assert got["t"] == pytest.approx(ref.statistic) and got["p_t"] == pytest.approx(ref.pvalue)
    assert got["p_wilcoxon"] == pytest.approx(wilcoxon(a, b).pvalue)
    constant = paired_difference_tests([0.01, 0.01, 0.01])  # t undefined, Wilcoxon defined
    assert np.isnan(constant["p_t"]) and constant["p_wilcoxon"] == pytest.approx(wilcoxon([0.01] * 3).pvalue)
    assert all(np.isnan(paired_difference_tests(np.zeros(4))[k]) for k in ("p_t", "p_wilcoxon"))
    assert np.isnan(paired_difference_tests([0.2])["p_t"])
