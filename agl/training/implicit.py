"""Implicit-differentiation hypergradients (``hypergrad: ift_neumann | ift_cg``).

At a stationary point of the inner objective, ``grad_theta L_train(theta*, phi) = 0``, the
implicit function theorem gives ``dtheta*/dphi = -H^{-1} d/dphi grad_theta L_train`` with
``H = d^2 L_train / dtheta^2``. The hypergradient of the validation primary loss (which
depends on ``phi`` only through ``theta*``) is then

    dL_val/dphi = -(d/dphi grad_theta L_train(theta*, phi))^T q,   H q = grad_theta L_val(theta*)

(Pedregosa, ICML 2016; Lorraine, Vicol & Duvenaud, AISTATS 2020, eq. 5). ``q`` is found
without forming ``H``: by conjugate gradients (``ift_cg``; Hestenes & Stiefel 1952) or by
the truncated Neumann series ``q ~= alpha * sum_j (I - alpha H)^j v`` (``ift_neumann``;
Lorraine et al., algorithm 3). Hessian-vector products are forward-over-reverse
(``torch.func.jvp`` of ``torch.func.grad``); the final mixed derivative is one ordinary
double-backward.

The current model weights stand for ``theta*``, so this fits the ``warmstart`` schedule
(train to near-stationarity, then take outer steps). Unlike a short unroll, the result
does not depend on how the training loss is scaled: ``L/S`` and ``L`` have the same
minimiser, and at a stationary point the factor ``1/S`` cancels between ``H`` and the mixed
term (tests/test_implicit.py checks this). Away from a minimiser ``H`` may be indefinite;
``ift_damping`` adds ``lambda I`` (a common regularisation of the inverse).

Every function evaluation replays one saved RNG state, so with dropout all Hessian-vector
products see the same masks (one fixed stochastic objective).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, jvp

from agl.checks import int_at_least, num_in, optional, positive, setting
from agl.errors import ConfigError
from agl.training.bilevel import (Estimate, HypergradProblem, grads_of, register_estimator, replay_rng, capture_rng,
                                  Unrolled, weighted_loss)

Vector = tuple[Tensor, ...]
POWER_ITERATIONS = 20


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _axpy(alpha: Tensor | float, x: Sequence[Tensor], y: Sequence[Tensor]) -> Vector:
    """``y + alpha * x``."""
    return tuple(yi + alpha * xi for xi, yi in zip(x, y))


def hvp_operator(net: Unrolled, gate: nn.Module, train: tuple, n_primary: int, params: Vector,
                 rng_state: Any, damping: float = 0.0) -> Callable[[Vector], Vector]:
    """``v -> (H + damping I) v``, ``H`` the Hessian of the gate-weighted training loss at ``params``."""
    device = params[0].device

    def loss(theta: Vector) -> Tensor:
        with replay_rng(rng_state, device):
            return weighted_loss(gate, net.per_gene(list(theta), train), n_primary)

    grad_fn = grad(loss)

    def apply(v: Vector) -> Vector:
        _, hv = jvp(grad_fn, (params,), (tuple(v),))
        hv = tuple(h.detach() for h in hv)
        return _axpy(damping, v, hv) if damping else hv

    return apply


def solve_cg(apply: Callable[[Vector], Vector], b: Vector, iters: int, tol: float = 1e-6) -> tuple[Vector, dict[str, float]]:
    """Conjugate gradients for ``A q = b`` (``A`` symmetric); stops at ``|r| <= tol |b|``."""
    x = tuple(torch.zeros_like(t) for t in b)
    r = tuple(t.clone() for t in b)
    p = r
    rr = _dot(r, r)
    b_norm = math.sqrt(float(rr))
    if b_norm == 0.0:
        return x, {"ift_iterations": 0.0, "ift_residual": 0.0}
    done = 0
    for done in range(1, iters + 1):
        ap = apply(p)
        curvature = _dot(p, ap)
        if float(curvature) <= 0.0:
            # negative curvature: the quadratic model has no minimiser along p; stop with what we have
            done -= 1
            break
        alpha = rr / curvature
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rr_new = _dot(r, r)
        if math.sqrt(float(rr_new)) <= tol * b_norm:
            rr = rr_new
            break
        p = _axpy(rr_new / rr, p, r)
        rr = rr_new
    return x, {"ift_iterations": float(done), "ift_residual": math.sqrt(float(rr)) / b_norm}


def largest_eigenvalue(apply: Callable[[Vector], Vector], like: Vector, iters: int = POWER_ITERATIONS,
                       seed: int = 0) -> float:
    """Power iteration for the largest |eigenvalue| of ``apply`` (sets the Neumann step)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in like)
    value = 0.0
    for _ in range(iters):
        norm = math.sqrt(float(_dot(v, v)))
        if norm == 0.0:
            return 0.0
        v = tuple(t / norm for t in v)
        hv = apply(v)
        value = float(_dot(v, hv))
        v = hv
    return abs(value)


def solve_neumann(apply: Callable[[Vector], Vector], b: Vector, iters: int, alpha: float) -> tuple[Vector, dict[str, float]]:
    """``q = alpha * sum_{j<iters} (I - alpha A)^j b``, which tends to ``A^{-1} b`` when ``0 < alpha < 2/lambda_max``."""
    term = tuple(t.clone() for t in b)
    total = tuple(t.clone() for t in b)
    for _ in range(iters):
        term = _axpy(-alpha, apply(term), term)
        total = tuple(s + t for s, t in zip(total, term))
    q = tuple(alpha * t for t in total)
    residual = _axpy(-1.0, apply(q), b)
    b_norm = math.sqrt(float(_dot(b, b)))
    rel = math.sqrt(float(_dot(residual, residual))) / b_norm if b_norm else 0.0
    return q, {"ift_iterations": float(iters), "ift_residual": rel, "ift_alpha": float(alpha)}


def _implicit(net: Unrolled, gate: nn.Module, train: tuple, val: tuple, n_primary: int, outer: list[Tensor],
              solver: str, iters: int, damping: float, alpha: float | None, tol: float) -> Estimate:
    if iters < 1:
        raise ConfigError("ift_iters", f"must be >= 1, got {iters}")
    if damping < 0:
        raise ConfigError("ift_damping", f"must be >= 0, got {damping}")
    params = tuple(p.detach() for p in net.params)
    device = params[0].device
    rng_state = capture_rng(device)

    # v = grad_theta L_val at theta (the validation primary loss sees phi only through theta)
    theta = [p.clone().requires_grad_() for p in params]
    val_loss = net.per_gene(theta, val, n_primary).mean()
    v = tuple(g.detach() for g in grads_of(val_loss, theta, create_graph=False))

    apply = hvp_operator(net, gate, train, n_primary, params, rng_state, damping)
    if solver == "cg":
        q, _ = solve_cg(apply, v, iters, tol)
    else:
        if alpha is None:
            lam = largest_eigenvalue(apply, params)
            if lam == 0.0:
                raise ConfigError("ift_alpha", "the training loss has a zero Hessian here; set ift_alpha")
            alpha = 1.0 / lam
        q, _ = solve_neumann(apply, v, iters, alpha)

    # -d/dphi <grad_theta L_train(theta, phi), q>: one double-backward, q held constant
    theta = [p.clone().requires_grad_() for p in params]
    with replay_rng(rng_state, device):
        train_loss = weighted_loss(gate, net.per_gene(theta, train), n_primary)
    inner_grads = grads_of(train_loss, theta, create_graph=True)
    mixed = torch.autograd.grad(_dot(inner_grads, q), outer, allow_unused=True)
    hyper = [torch.zeros_like(p) if g is None else -g for p, g in zip(outer, mixed)]
    return float(val_loss.detach()), [float(train_loss.detach())], hyper


@dataclass
class IFTOptions:
    """The run settings of the implicit estimators (flattened into TrainConfig: ``ift_iters`` etc.)."""

    ift_iters: int = setting(20, int_at_least(1), "ift_cg / ift_neumann: CG iterations or Neumann terms")
    ift_damping: float = setting(0.0, num_in(0.0), "ift_*: lambda in (H + lambda I)^-1")
    ift_alpha: float | None = setting(None, optional(positive), "ift_neumann: step; null = 1 / lambda_max (power iteration)")


@register_estimator("ift_cg", options=IFTOptions)
def ift_cg(problem: HypergradProblem, *, ift_iters: int = 20, ift_damping: float = 0.0, ift_alpha: float | None = None,
           tol: float = 1e-6) -> Estimate:
    """IFT with the inverse-Hessian-vector product by conjugate gradients (``ift_iters`` at most).

    ``opt`` and ``steps`` (the unrolled estimators' inputs) are not used: no inner steps are taken.
    """
    net, gate, _, train, val, n_primary, _, outer = problem
    return _implicit(net, gate, train, val, n_primary, outer, "cg", ift_iters, ift_damping, ift_alpha, tol)


@register_estimator("ift_neumann", options=IFTOptions)
def ift_neumann(problem: HypergradProblem, *, ift_iters: int = 20, ift_damping: float = 0.0,
                ift_alpha: float | None = None, tol: float = 1e-6) -> Estimate:
    """IFT with the inverse-Hessian-vector product by ``ift_iters`` Neumann terms of step ``ift_alpha``
    (by default ``1 / lambda_max`` from power iteration)."""
    net, gate, _, train, val, n_primary, _, outer = problem
    return _implicit(net, gate, train, val, n_primary, outer, "neumann", ift_iters, ift_damping, ift_alpha, tol)
