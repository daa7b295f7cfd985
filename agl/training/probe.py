"""Fitting HEST-Benchmark's probe (``agl.selection.probe``) in closed form for ``fit``.

Kept in the training layer (it returns the loop's ``FitResult``) so that ``agl.selection``
does not import ``agl.training``.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agl.errors import ConfigError
from agl.selection.probe import ALPHA_GRID, N_COMPONENTS, ProbeGate, hest_alpha

if TYPE_CHECKING:
    from agl.training.loop import FitResult, TrainConfig

log = logging.getLogger(__name__)


def _features(data: Any, part: str, n_primary: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y, slides = data.eval_arrays(part, n_columns=n_primary)  # only the primary genes: the probe predicts those
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return x.astype(np.float64), np.asarray(y, dtype=np.float64)[:, :n_primary], np.asarray(slides)


def as_linear(scaler: Any, pca: Any, ridge: Any) -> torch.nn.Linear:
    """The fitted scaler -> PCA -> ridge chain as one affine map ``features -> primary genes``."""
    # z = ((x - mu) / sd - m) @ C.T;  y = z @ B.T  =>  y = x @ (C / sd).T @ B.T - (mu / sd + m) @ C.T @ B.T
    scale = np.where(scaler.scale_ == 0, 1.0, scaler.scale_)
    weight = ridge.coef_ @ (pca.components_ / scale)                      # [P, D]
    bias = -ridge.coef_ @ (pca.components_ @ (scaler.mean_ / scale + pca.mean_))
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return layer.eval()


def fit_probe(cfg: "TrainConfig", data: Any) -> "FitResult":
    """Fit the probe on the training spots of ``data`` and score it on the test spots."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    from agl.evaluation.metrics import evaluate_predictions
    from agl.training.loop import FitResult

    if cfg.mode != "features":
        raise ConfigError("method", "probe: the linear probe reads frozen features; set mode=features")
    started = time.perf_counter()
    n_primary = int(data.n_primary)
    names = list(data.genes["gene"].iloc[:n_primary])
    x_train, y_train, _ = _features(data, "train", n_primary)
    n_components = min(N_COMPONENTS, x_train.shape[0], x_train.shape[1])
    scaler = StandardScaler().fit(x_train)
    pca = PCA(n_components=n_components, random_state=cfg.seed).fit(scaler.transform(x_train))

    def reduce(x: np.ndarray) -> np.ndarray:
        return pca.transform(scaler.transform(x))

    def ridge(alpha: float) -> Any:
        return Ridge(alpha=alpha, solver="lsqr", fit_intercept=False, max_iter=1000,
                     random_state=cfg.seed).fit(z_train, y_train)

    z_train = reduce(x_train)
    default = hest_alpha(n_components, n_primary)
    if cfg.probe_alpha == "hest":
        candidates = [default]
    elif cfg.probe_alpha == "val":
        candidates = sorted({default, *ALPHA_GRID})
    else:
        candidates = [float(cfg.probe_alpha)]
    x_val, y_val, s_val = _features(data, "val", n_primary)
    z_val = reduce(x_val)
    history = []
    best = (-np.inf, None, None)
    for alpha in candidates:
        model = ridge(alpha)
        val = evaluate_predictions(model.predict(z_val), y_val, s_val, names)
        history.append({"epoch": len(history), "alpha": alpha, "val_pcc": val["pcc"], "k": 0})
        if val["pcc"] > best[0] or best[1] is None:
            best = (val["pcc"], alpha, model)
    best_val, alpha, model = best
    for row in history:
        row["best_val_pcc"] = best_val
    x_test, y_test, s_test = _features(data, "test", n_primary)
    test = evaluate_predictions(model.predict(reduce(x_test)), y_test, s_test, names)
    log.info("probe (PCA %d, ridge alpha %.3g%s): val PCC %.4f, test PCC %.4f", n_components, alpha,
             f" chosen from {len(candidates)} by validation" if len(candidates) > 1 else "", best_val, test["pcc"])
    return FitResult(
        config=cfg, history=history, best_epoch=int(np.argmax([r["val_pcc"] for r in history])),
        best_val_pcc=float(best_val), test=test, k=0, weights=np.zeros(0, np.float32),
        selected=np.zeros(0, np.int64), epochs_run=len(history), stopped_early=False,
        wall_time_s=time.perf_counter() - started, checkpoint_dir=None,
        model=as_linear(scaler, pca, model), gate=ProbeGate(0, {}, probe_alpha=cfg.probe_alpha))
