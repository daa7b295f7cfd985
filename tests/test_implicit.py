"""Implicit (IFT) and unrolled hypergradients against a closed-form bi-level problem, plus the
loop's outer-step budget, statistics, tau annealing and the val_outer role.

The inner problem is ridge regression with one shared parameter vector: gene g is predicted as
``(x . theta) * c_g``, so auxiliary genes move the same ``theta`` the primary genes use. Its
gate-weighted minimiser has the closed form

    theta*(t) = (X^T X + n lam I)^-1 X^T (sum_g w_g c_g y_g) / sum_g w_g c_g^2

and autograd through that formula (float64) is the exact hypergradient.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from agl.selection.dkgsb import DkGSBGate
from agl.training.bilevel import HYPERGRADIENTS, hypergradient
from agl.training.losses import mse_loss

P, A, D, N, N_VAL, LAM = 3, 10, 5, 40, 30, 0.1


class SharedLinear(nn.Module):
    def __init__(self, scales: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(D, dtype=torch.float64))
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.theta)[:, None] * self.scales[None, :]


class DifferentiatedNormaliser(DkGSBGate):
    """DkGSB with the loss normaliser P + sum(w) differentiated (the base gate detaches it)."""

    def loss(self, l_primary: torch.Tensor, l_aux: torch.Tensor) -> torch.Tensor:
        w = self.weights().to(l_aux)
        return (l_primary.sum() + (w * l_aux).sum()) / (l_primary.numel() + w.sum())


def _ridge(seed: int = 0, gate_cls: type = DkGSBGate):
    gen = torch.Generator().manual_seed(seed)
    scales = 0.5 + torch.rand(P + A, generator=gen, dtype=torch.float64)
    truth = torch.randn(D, generator=gen, dtype=torch.float64)
    other = torch.randn(D, generator=gen, dtype=torch.float64)  # auxiliary genes of the second half follow another signal
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    xv = torch.randn(N_VAL, D, generator=gen, dtype=torch.float64)

    def targets(inputs: torch.Tensor) -> torch.Tensor:
        signal = torch.stack([inputs @ (truth if g < P + A // 2 else other) for g in range(P + A)], 1)
        return signal * scales + 0.3 * torch.randn(len(inputs), P + A, generator=gen, dtype=torch.float64)

    y, yv = targets(x), targets(xv)
    # ridge as extra rows: sqrt(n lam) I with target 0 adds n lam c_g^2 |theta|^2 to gene g's squared error
    x_aug = torch.cat([x, (N * LAM) ** 0.5 * torch.eye(D, dtype=torch.float64)])
    y_aug = torch.cat([y, torch.zeros(D, P + A, dtype=torch.float64)])
    ranks = {"hvg": np.linspace(0.0, 1.0, A)}
    gate = gate_cls(A, ranks, t_init=0.45, tau=0.2).double()
    model = SharedLinear(scales)
    return model, gate, (x_aug, y_aug), (xv, yv)


def _closed_form(model: SharedLinear, gate: DkGSBGate, train: tuple, t: torch.Tensor) -> torch.Tensor:
    x_aug, y_aug = train
    x, y = x_aug[:N], y_aug[:N]
    w = torch.cat([torch.ones(P, dtype=torch.float64), torch.sigmoid((t - gate.ranks.double()) / gate.tau.double())])
    c = model.scales
    a = x.T @ x + N * LAM * torch.eye(D, dtype=torch.float64)
    rhs = x.T @ (y * (w * c)[None, :]).sum(1)
    return torch.linalg.solve(a, rhs) / (w * c * c).sum()


def _analytic(model: SharedLinear, gate: DkGSBGate, train: tuple, val: tuple) -> tuple[float, torch.Tensor]:
    t = gate.t.detach().clone().double().requires_grad_()
    theta = _closed_form(model, gate, train, t)
    xv, yv = val
    loss = mse_loss((xv @ theta)[:, None] * model.scales[None, :P], yv[:, :P]).mean()
    (g,) = torch.autograd.grad(loss, t)
    return float(g), theta.detach()


def _at_optimum(seed: int = 0, gate_cls: type = DkGSBGate):
    model, gate, train, val = _ridge(seed, gate_cls)
    exact, theta = _analytic(model, gate, train, val)
    model.theta.data.copy_(theta)
    return model, gate, train, val, exact


def _hyper(model, gate, train, val, method: str, inner_steps: int = 2, inner_lr: float = 1e-3,
           inner_optimizer: str = "adam", ift_iters: int = 20, **kw) -> float:
    options = {"ift_iters": ift_iters} if method.startswith("ift_") else {}
    out = hypergradient(model, gate, mse_loss, train, val, P, inner_steps=inner_steps, inner_lr=inner_lr,
                        inner_optimizer=inner_optimizer, method=method, estimator_options=options, accumulate=False, **kw)
    return float(out["hypergrad"][0])


def test_estimators_are_registered() -> None:
    assert {"unroll", "ift_neumann", "ift_cg"} <= set(HYPERGRADIENTS)


def test_ift_cg_matches_the_closed_form() -> None:
    model, gate, train, val, exact = _at_optimum()
    assert abs(exact) > 1e-4, "degenerate problem: t does not matter"
    got = _hyper(model, gate, train, val, method="ift_cg", ift_iters=50)
    assert abs(got - exact) / abs(exact) < 1e-3, (got, exact)
    assert model.theta.grad is None and gate.t.grad is None


def test_ift_neumann_matches_the_closed_form() -> None:
    model, gate, train, val, exact = _at_optimum(seed=1)
    got = _hyper(model, gate, train, val, method="ift_neumann", ift_iters=400)
    assert abs(got - exact) / abs(exact) < 1e-3, (got, exact)
    few = _hyper(model, gate, train, val, method="ift_neumann", ift_iters=2)
    assert abs(few - exact) / abs(exact) > 1e-3  # truncation error is real: the test can fail


def test_a_long_unroll_matches_the_closed_form() -> None:
    model, gate, train, val, exact = _at_optimum(seed=2)
    hess = torch.autograd.functional.hessian(
        lambda th: gate.loss(*mse_loss((train[0] @ th)[:, None] * model.scales, train[1]).split([P, A])),
        model.theta.detach())
    lr = 1.0 / float(torch.linalg.eigvalsh(hess).max())
    got = _hyper(model, gate, train, val, method="unroll", inner_optimizer="sgd", inner_steps=300, inner_lr=lr)
    assert abs(got - exact) / abs(exact) < 1e-2, (got, exact)


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_ift_does_not_depend_on_the_loss_normaliser(seed: int) -> None:
    """theta*(t) minimises L / S and L alike, so the exact hypergradient ignores whether S = P + sum(w)
    is differentiated; IFT at the optimum reproduces that (a short unroll away from it need not)."""
    m1, detached, train, val, exact = _at_optimum(seed)
    m2, differentiated, _, _, exact2 = _at_optimum(seed, DifferentiatedNormaliser)
    assert exact == pytest.approx(exact2, rel=1e-12)
    a = _hyper(m1, detached, train, val, method="ift_cg", ift_iters=50)
    b = _hyper(m2, differentiated, train, val, method="ift_cg", ift_iters=50)
    assert np.sign(a) == np.sign(b) == np.sign(exact)
    assert a == pytest.approx(b, rel=1e-6)


def test_fresh_inner_state_ignores_the_training_moments() -> None:
    model, gate, train, val, _ = _at_optimum()
    model.theta.data.add_(0.3)  # away from the optimum, so Adam's moments matter
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        gate.loss(*mse_loss(model(train[0]), train[1]).split([P, A])).backward()
        opt.step()
    model.theta.grad = None
    fresh = _hyper(model, gate, train, val, "unroll", inner_lr=0.01, inner_state="fresh", optimizer=opt)
    alone = _hyper(model, gate, train, val, "unroll", inner_lr=0.01, inner_state="fresh", optimizer=None)
    warm = _hyper(model, gate, train, val, "unroll", inner_lr=0.01, inner_state="warm", optimizer=opt)
    assert fresh == alone
    assert warm != pytest.approx(fresh, rel=1e-3)


# --------------------------------------------------------------------------- the loop (real demo store)
def test_hypergradient_statistics() -> None:
    from agl.training.loop import hypergradient_stats

    stats = hypergradient_stats([torch.tensor([v]) for v in (-1.0, -2.0, -3.0, 1.0)])
    assert stats["hypergrad_mean"] == pytest.approx(-1.25)
    assert stats["hypergrad_sign_agreement"] == pytest.approx(0.75)
    assert stats["hypergrad_snr"] == pytest.approx(-1.25 / np.std([-1.0, -2.0, -3.0, 1.0], ddof=1))


@pytest.fixture(scope="module")
def demo_bundle(demo_store):
    from trainkit import cheap_bundle

    with cheap_bundle(demo_store) as bundle:
        yield bundle


def test_outer_budget_statistics_and_tau_reach_the_run_record(demo_bundle) -> None:
    from agl.training.loop import fit
    from trainkit import small_config

    cfg = small_config(epochs=3, patience=1, outer_steps=3, hypergrad_batches=2, outer_val="full",
                       tau=0.05, tau_final=0.005, hypergrad="ift_cg", ift_iters=5, ift_damping=1e-2)
    res = fit(cfg, dataclasses.replace(demo_bundle, seed=cfg.seed))
    bilevel = [row for row in res.history if row["outer_steps"] > 0]
    assert bilevel and all(row["outer_steps"] == 3 for row in bilevel)
    for row in bilevel:
        assert 0.0 <= row["hypergrad_sign_agreement"] <= 1.0 and np.isfinite(row["hypergrad_snr"])
    # tau is scheduled by outer step over the passes before the earliest early stop (patience 1: one pass)
    assert bilevel[0]["tau"] == pytest.approx(0.005)


def test_val_outer_is_carved_from_validation_and_seeded(demo_store) -> None:
    from agl.data.splits import carve_val_outer
    from agl.data.store import open_store

    store = open_store(demo_store)
    name = next(n for n in store.split_names if n.startswith("loso"))
    roles = np.asarray(store.split(name), dtype=object)
    slides = store.spots["slide_id"].astype(str).to_numpy()
    a = carve_val_outer(roles, slides, 0.5, seed=0)
    assert np.array_equal(a, carve_val_outer(roles, slides, 0.5, seed=0))
    assert not np.array_equal(a, carve_val_outer(roles, slides, 0.5, seed=1))
    assert set(np.flatnonzero(a == "val_outer")) <= set(np.flatnonzero(roles == "val"))
    assert ((a == "val") | (a == "val_outer")).sum() == (roles == "val").sum()
    for slide in np.unique(slides[roles == "val"]):  # each validation slide keeps spots in both roles
        here = slides == slide
        assert (a[here] == "val").any() and (a[here] == "val_outer").any()
