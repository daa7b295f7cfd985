"""HEST-Benchmark's probe (PCA 256 + ridge) as a method: same bundle, splits and metrics as the gates."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from trainkit import first_split, small_config, use_cheap_features

from agl.errors import ConfigError
from agl.evaluation.metrics import evaluate_predictions
from agl.selection.probe import ALPHA_GRID, hest_alpha
from agl.training.bundles import make_bundle
from agl.training.loop import fit


@pytest.fixture
def bundle(demo_store, monkeypatch):
    use_cheap_features(monkeypatch)  # real patches, cheap descriptor (48-d): PCA keeps all 48 components
    cfg = small_config(method="probe")
    return make_bundle(demo_store, first_split(demo_store), cfg)


def _reference(bundle, alpha: float):
    """The probe written out with scikit-learn as HEST's benchmark.py/trainer.py do it."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    p = bundle.n_primary
    (x_tr, y_tr, _), (x_te, y_te, s_te) = bundle.eval_arrays("train"), bundle.eval_arrays("test")
    pipe = Pipeline([("scaler", StandardScaler()), ("pca", PCA(n_components=min(256, x_tr.shape[1]), random_state=0))])
    z_tr, z_te = pipe.fit_transform(x_tr.numpy().astype(np.float64)), pipe.transform(x_te.numpy().astype(np.float64))
    reg = Ridge(alpha=alpha, solver="lsqr", fit_intercept=False, max_iter=1000, random_state=0).fit(z_tr, y_tr[:, :p])
    pred = reg.predict(z_te)
    return pred, evaluate_predictions(pred, y_te[:, :p], s_te, list(bundle.genes["gene"].iloc[:p]))


def test_probe_matches_hest_protocol_written_out(bundle) -> None:
    res = fit(small_config(method="probe"), bundle)
    alpha = hest_alpha(48, bundle.n_primary)
    assert res.history[0]["alpha"] == pytest.approx(alpha) and len(res.history) == 1
    pred, expected = _reference(bundle, alpha)
    assert res.test["pcc"] == pytest.approx(expected["pcc"], abs=1e-9)
    np.testing.assert_allclose(res.test["per_gene_pcc"], expected["per_gene_pcc"], atol=1e-9)
    assert res.test["genes"] == list(bundle.genes["gene"].iloc[:bundle.n_primary])
    # the fitted chain as one affine map gives the same predictions (it is the run's model)
    x_test = bundle.eval_arrays("test")[0]
    with torch.no_grad():
        np.testing.assert_allclose(res.model(x_test).numpy(), pred, atol=1e-3)
    assert res.k == 0 and len(res.selected) == 0 and res.gate.k() == 0


def test_alpha_chosen_on_validation_and_refused_settings(bundle) -> None:
    res = fit(small_config(method="probe", probe_alpha="val"), bundle)
    tried = [row["alpha"] for row in res.history]
    assert sorted(tried) == sorted({hest_alpha(48, bundle.n_primary), *ALPHA_GRID})
    best = max(res.history, key=lambda r: r["val_pcc"])
    assert res.best_val_pcc == best["val_pcc"] and res.history[res.best_epoch]["alpha"] == best["alpha"]
    assert res.test["pcc"] == pytest.approx(_reference(bundle, best["alpha"])[1]["pcc"], abs=1e-9)
    fixed = fit(small_config(method="probe", probe_alpha=10.0), bundle)
    assert [r["alpha"] for r in fixed.history] == [10.0]
    with pytest.raises(ConfigError, match="probe_alpha"):
        small_config(method="probe", probe_alpha="often")
    with pytest.raises(ConfigError, match="mode=features"):
        fit(small_config(method="probe", mode="finetune"), bundle)
