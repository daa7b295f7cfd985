"""Hypergradient estimators run in full float32: TF32 off for convolutions and matmuls, autocast off,
the caller's settings restored after (agl.training.precision)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from agl.models import Estimator
from agl.selection import create_gate
from agl.training.bilevel import HYPERGRADIENTS, hypergradient
from agl.training.losses import pearson_loss
from agl.training.precision import full_float32, tf32_flags

P, A, D = 3, 12, 6
TF32_ON = {"cudnn_allow_tf32": True, "matmul_allow_tf32": True, "float32_matmul_precision": "high"}
TF32_OFF = {"cudnn_allow_tf32": False, "matmul_allow_tf32": False, "float32_matmul_precision": "highest"}


@pytest.fixture
def tf32_on():
    """TF32 on everywhere (as a caller that enables it for speed would leave it), restored after."""
    saved = tf32_flags()
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    yield
    torch.backends.cudnn.allow_tf32 = saved["cudnn_allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = saved["matmul_allow_tf32"]
    torch.set_float32_matmul_precision(saved["float32_matmul_precision"])


def _problem():
    torch.manual_seed(0)
    model = Estimator(D, P + A, trunk=(8,), dropout=0.0)
    gate = create_gate("dkgsb", A, {"hvg": np.linspace(0, 1, A)}, t_init=0.45, tau=0.1)
    x = torch.randn(24, D)
    y = x @ torch.randn(D, P + A) + 0.5 * torch.randn(24, P + A)
    return model, gate, (x[:16], y[:16]), (x[16:], y[16:])


@pytest.mark.parametrize("method,first_order", [*((m, False) for m in HYPERGRADIENTS), ("unroll", True)])
def test_every_estimator_runs_with_tf32_and_autocast_off(tf32_on, method: str, first_order: bool) -> None:
    seen = []

    def recording_loss(pred, target):  # every estimator evaluates the model through the loss
        seen.append((tf32_flags(), torch.is_autocast_enabled("cpu"), pred.dtype))
        return pearson_loss(pred, target)

    model, gate, train, val = _problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller inside a bf16 region
        out = hypergradient(model, gate, recording_loss, train, val, P, inner_steps=2, inner_lr=0.01,
                            method=method, first_order=first_order, accumulate=False)
    assert seen and all(flags == TF32_OFF and not autocast and dtype == torch.float32 for flags, autocast, dtype in seen)
    assert all(torch.isfinite(g).all() for g in out["hypergrad"])
    assert tf32_flags() == TF32_ON  # the caller's settings are back


def test_full_float32_restores_settings_after_an_error(tf32_on) -> None:
    with pytest.raises(RuntimeError), full_float32():
        assert tf32_flags() == TF32_OFF
        raise RuntimeError("estimator failed")
    assert tf32_flags() == TF32_ON
