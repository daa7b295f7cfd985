"""Hypergradients: finite-difference checks against real torch.optim trajectories (float64), and the
exact estimators (checkpointed reverse, forward mode) against the reverse unroll."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from agl.errors import ConfigError
from agl.training.bilevel import HYPERGRADIENTS, FunctionalAdam, allreduce_gradients, hypergradient
from agl.config import TrainConfig
from agl.training.losses import pearson_loss
from agl.models import Estimator
from agl.selection import create_gate

P, A, D = 3, 12, 6


def _problem(seed: int = 0, batchnorm: bool = False):
    """A tiny estimator, a DkGSB gate and correlated train/val batches, all float64."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D)) if batchnorm else None
    model = Estimator(D, P + A, trunk=(8,), dropout=0.0, backbone=backbone).double()
    ranks = {"hvg": np.linspace(0, 1, A), "mean": np.random.default_rng(seed).random(A)}
    gate = create_gate("dkgsb", A, ranks, t_init=0.45, tau=0.1).double()
    mix = torch.randn(D, P + A, dtype=torch.float64)

    def batch(n: int):
        x = torch.randn(n, D, dtype=torch.float64)
        return x, x @ mix + 0.5 * torch.randn(n, P + A, dtype=torch.float64)

    return model, gate, batch(16), batch(12)


def _warm_adam(model, train, steps: int = 3) -> torch.optim.Adam:
    """Train a few ordinary Adam steps so the optimiser has moments to hand to the inner loop."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        pearson_loss(model(train[0]), train[1]).mean().backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return opt


def _outer_loss_reference(model, gate, train, val, t: float, steps: int, lr: float, opt_name: str,
                          warm: torch.optim.Adam | None = None) -> float:
    """The unrolled objective recomputed from scratch with a deep copy and a real torch optimiser.

    The mask is written out independently of the gate; the normaliser P + sum(w) is held at
    its value at the gate's current t (METHOD.md: no gradient through the normaliser).
    """
    net = copy.deepcopy(model)
    ranks, tau = gate.ranks.double(), float(gate.tau)
    w = torch.sigmoid((t - ranks) / tau)
    norm = P + float(torch.sigmoid((gate.t.detach() - ranks) / tau).sum())
    opt = (torch.optim.Adam if opt_name == "adam" else torch.optim.SGD)(net.parameters(), lr=lr)
    if warm is not None:
        opt.load_state_dict(copy.deepcopy(warm.state_dict()))  # same moments; deep copy: Adam updates them in place
        for group in opt.param_groups:
            group["lr"] = lr
    for _ in range(steps):
        opt.zero_grad()
        per_gene = pearson_loss(net(train[0]), train[1])
        ((per_gene[:P].sum() + (w * per_gene[P:]).sum()) / norm).backward()
        opt.step()
    with torch.no_grad():
        return float(pearson_loss(net(val[0])[:, :P], val[1][:, :P]).mean())


@pytest.mark.parametrize("opt_name,steps,warm", [("sgd", 1, False), ("sgd", 3, False), ("adam", 1, True),
                                                 ("adam", 3, False), ("adam", 3, True)])
def test_hypergradient_matches_finite_differences(opt_name: str, steps: int, warm: bool) -> None:
    # (fresh Adam with one step is lr * sign(g): almost flat in t, hence warm moments for H = 1)
    model, gate, train, val = _problem()
    opt = _warm_adam(model, train) if warm else None
    lr = 0.05 if opt_name == "sgd" else 0.01
    out = hypergradient(model, gate, pearson_loss, train, val, P, inner_steps=steps, inner_lr=lr,
                        inner_optimizer=opt_name, optimizer=opt, inner_state="warm" if warm else "fresh")
    t0, h = gate.t.item(), 1e-5
    fd = (_outer_loss_reference(model, gate, train, val, t0 + h, steps, lr, opt_name, opt)
          - _outer_loss_reference(model, gate, train, val, t0 - h, steps, lr, opt_name, opt)) / (2 * h)
    analytic = float(gate.t.grad)
    assert abs(fd) > 1e-6, "degenerate test problem: the outer loss does not depend on t"
    assert abs(analytic - fd) / abs(fd) < 1e-4, (analytic, fd)
    assert out["hypergrad"][0].item() == pytest.approx(analytic)
    assert out["outer_loss"] == pytest.approx(_outer_loss_reference(model, gate, train, val, t0, steps, lr, opt_name, opt), rel=1e-10)
    assert len(out["inner_losses"]) == steps


def test_model_untouched_and_grad_accumulates() -> None:
    model, gate, train, val = _problem(batchnorm=True)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hypergradient(model, gate, pearson_loss, train, val, P, inner_steps=2, inner_lr=0.01)
    first = gate.t.grad.clone()
    after = model.state_dict()
    for key, value in before.items():  # parameters and BatchNorm running stats alike
        assert torch.equal(value, after[key]), key
    assert all(p.grad is None for p in model.parameters())
    hypergradient(model, gate, pearson_loss, train, val, P, inner_steps=2, inner_lr=0.01)
    assert torch.allclose(gate.t.grad, 2 * first)  # accumulates like .backward(), never steps


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_first_order_equals_full_for_one_sgd_step(dropout: float) -> None:
    """With H = 1 and SGD no Hessian term exists, so the first-order form is exact (up to FD error).

    With dropout, this also checks that the finite-difference passes replay the inner step's masks.
    """
    model, gate, train, val = _problem(seed=1)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = dropout
    model.train()
    torch.manual_seed(5)
    full = hypergradient(model, gate, pearson_loss, train, val, P, inner_steps=1, inner_lr=0.05, inner_optimizer="sgd")
    gate.t.grad = None
    torch.manual_seed(5)
    fo = hypergradient(model, gate, pearson_loss, train, val, P, inner_steps=1, inner_lr=0.05,
                       inner_optimizer="sgd", first_order=True, fd_eps=1e-4)
    assert fo["hypergrad"][0].item() == pytest.approx(full["hypergrad"][0].item(), rel=1e-5)


def test_first_order_approximates_full_with_several_adam_steps() -> None:
    """Several Adam steps: the first-order form drops Hessian terms, so it differs but keeps the sign."""
    model, gate, train, val = _problem(seed=2)
    opt = _warm_adam(model, train)  # give Adam a history so its steps are smooth in g
    kw = dict(inner_steps=3, inner_lr=0.01, inner_optimizer="adam", optimizer=opt, inner_state="warm")
    full = hypergradient(model, gate, pearson_loss, train, val, P, **kw)["hypergrad"][0].item()
    gate.t.grad = None
    fo = hypergradient(model, gate, pearson_loss, train, val, P, first_order=True, **kw)["hypergrad"][0].item()
    assert fo != pytest.approx(full, rel=1e-6)
    assert np.sign(fo) == np.sign(full) and abs(full) > 0


def test_functional_adam_matches_torch_adam() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    reference = torch.optim.Adam([w], lr=0.1)
    ours = FunctionalAdam([w], lr=0.1)
    value = w.detach().clone()
    for step in range(4):
        grad = torch.randn(5, 4, dtype=torch.float64)
        grad[0, 0] = 0.0  # an entry that never gets a gradient: must stay finite and fixed
        w.grad = grad.clone()
        reference.step()
        (value,) = ours.step([value], [grad])
    assert torch.allclose(value, w.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("opt_name,count", [("sgd", 1), ("adam", 1), ("adam", 5)])
def test_in_place_tangent_step_equals_jvp_of_the_update(opt_name: str, count: int) -> None:
    """The optimisers' hand-written tangent step (forward mode's) against torch.func.jvp of their pure update,
    including entries whose gradient and second moment are zero (Adam's sqrt at 0)."""
    from agl.training.bilevel import INNER_OPTIMIZERS

    torch.manual_seed(0)
    params = [torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    opt = INNER_OPTIMIZERS[opt_name](params, lr=0.1)
    state = tuple([x.abs() if i else x for x in (torch.randn_like(params[0]), torch.randn_like(params[1]))]
                  for i in range(len(opt.state())))
    if state:
        state[0][0][0, 0] = state[1][0][0, 0] = 0.0  # a weight that never had a gradient
    grads = [torch.randn_like(x) for x in params]
    grads[0][0, 0] = 0.0
    d_params, d_grads = [torch.randn_like(x) for x in params], [torch.randn_like(x) for x in params]
    d_state = tuple([torch.randn_like(x) for x in xs] for xs in state)
    if state:
        d_state[1][0][0, 0] = 0.0  # v stays 0 there, so its tangent is 0 too
    (ref, ref_state), (d_ref, d_ref_state) = torch.func.jvp(lambda p_, s_, g_: opt.update(p_, g_, s_, count),
                                                            (params, state, grads), (d_params, d_state, d_grads))
    clone = lambda xs: [x.clone() for x in xs]  # noqa: E731
    p2, s2, dp2, ds2 = clone(params), tuple(clone(xs) for xs in state), clone(d_params), tuple(clone(xs) for xs in d_state)
    opt.tangent_step_(p2, s2, dp2, ds2, grads, d_grads, count)
    for a, b in zip([*ref, *[x for xs in ref_state for x in xs], *d_ref, *[x for xs in d_ref_state for x in xs]],
                    [*p2, *[x for xs in s2 for x in xs], *dp2, *[x for xs in ds2 for x in xs]]):
        assert torch.isfinite(b).all()
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_gates_without_outer_parameters_are_a_no_op() -> None:
    model, _, train, val = _problem()
    gate = create_gate("agl_all", A, {})
    out = hypergradient(model, gate, pearson_loss, train, val, P)
    assert out["hypergrad"] == [] and np.isnan(out["outer_loss"])


def test_allreduce_is_a_no_op_without_distributed() -> None:
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    allreduce_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))


# --------------------------------------------------------------------------- exact estimators
CASES = [("sgd", 1, False), ("sgd", 3, False), ("adam", 1, True), ("adam", 3, False), ("adam", 3, True)]


def _estimate(method: str, opt_name: str, steps: int, warm: bool, batchnorm: bool, seed: int = 0):
    model, gate, train, val = _problem(seed=seed, batchnorm=batchnorm)
    opt = _warm_adam(model, train) if warm else None
    lr = 0.05 if opt_name == "sgd" else 0.01
    out = hypergradient(model, gate, pearson_loss, train, val, P, inner_steps=steps, inner_lr=lr,
                        inner_optimizer=opt_name, optimizer=opt, method=method,
                        inner_state="warm" if warm else "fresh")
    return out, (model, gate, train, val, lr, opt)


@pytest.mark.parametrize("method", ["checkpointed", "forward", "forward_fd"])
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("opt_name,steps,warm", CASES)
def test_exact_estimators_match_unroll_and_finite_differences(method: str, batchnorm: bool, opt_name: str,
                                                              steps: int, warm: bool) -> None:
    """Same gradient as the reverse unroll (float64, rel. err. < 1e-4) and as central differences of the
    objective recomputed with a real torch optimiser; BatchNorm in training mode included."""
    reference, _ = _estimate("unroll", opt_name, steps, warm, batchnorm)
    out, (model, gate, train, val, lr, opt) = _estimate(method, opt_name, steps, warm, batchnorm)
    ours, unrolled = out["hypergrad"][0].item(), reference["hypergrad"][0].item()
    assert abs(unrolled) > 1e-6
    assert abs(ours - unrolled) / abs(unrolled) < 1e-4, (ours, unrolled)
    t0, h = gate.t.item(), 1e-5
    fd = (_outer_loss_reference(model, gate, train, val, t0 + h, steps, lr, opt_name, opt)
          - _outer_loss_reference(model, gate, train, val, t0 - h, steps, lr, opt_name, opt)) / (2 * h)
    assert abs(ours - fd) / abs(fd) < 1e-4, (ours, fd)
    assert out["outer_loss"] == pytest.approx(reference["outer_loss"], rel=1e-12)
    assert out["inner_losses"] == pytest.approx(reference["inner_losses"], rel=1e-12)
    assert float(gate.t.grad) == pytest.approx(ours)


@pytest.mark.parametrize("method", ["checkpointed", "forward", "forward_fd"])
def test_exact_estimators_replay_dropout_masks(method: str) -> None:
    """With dropout, the recomputed steps (checkpointed) and the jvp steps (forward) see the unroll's masks."""
    results = []
    for name in ("unroll", method):
        model, gate, train, val = _problem(seed=1)
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.3
        model.train()
        torch.manual_seed(5)
        out = hypergradient(model, gate, pearson_loss, train, val, P, inner_steps=3, inner_lr=0.01, method=name)
        results.append((out["hypergrad"][0].item(), torch.rand(1).item()))  # and the RNG left in the same state
    (g_ref, rng_ref), (g, rng) = results
    assert g == pytest.approx(g_ref, rel=1e-6) and rng == rng_ref


class _SquareNoJvp(torch.autograd.Function):
    """x**2 as an old-style autograd.Function: differentiable twice in eager mode, but usable by no
    torch.func transform (it has no setup_context), so it has no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _ScaledTanhNoJvp(torch.autograd.Function):
    """tanh(x) * w as a torch.func-ready Function (setup_context, backward written with differentiable ops)
    but without a ``jvp``: grad works, forward mode does not."""

    @staticmethod
    def forward(x, w):
        return torch.tanh(x) * w

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        t = torch.tanh(x)
        return g * w * (1 - t * t), (g * t).sum(0)


class _SquareLayer(nn.Module):
    def forward(self, x):
        return _SquareNoJvp.apply(x)


class _ScaledTanhLayer(nn.Module):
    """A custom layer with its own parameter, dropout inside (masks must agree between all recomputations)."""

    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return _ScaledTanhNoJvp.apply(self.dropout(x), self.w)


def _with_custom_layers(seed: int, layers: list[nn.Module]):
    torch.manual_seed(0)
    model, gate, train, val = _problem(seed=seed)
    model.backbone = nn.Sequential(nn.Linear(D, D), *layers, nn.Linear(D, D)).double()
    return model, gate, train, val


@pytest.mark.parametrize("opt_name,steps,warm,dropout", [("adam", 3, False, 0.0), ("adam", 3, True, 0.0),
                                                         ("sgd", 1, False, 0.0), ("adam", 3, False, 0.3)])
def test_forward_mode_falls_back_per_layer_where_a_layer_has_no_jvp_rule(opt_name: str, steps: int, warm: bool,
                                                                         dropout: float) -> None:
    """Only the layers without a rule get their tangents by double backward, each named once in a warning;
    the hypergradient equals the reverse unroll's (rel. err. < 1e-4) and central differences."""
    from agl.training import forward_mode

    lr = 0.05 if opt_name == "sgd" else 0.01
    results = {}
    for method in ("unroll", "forward"):
        model, gate, train, val = _with_custom_layers(3, [_SquareLayer(), _ScaledTanhLayer(D, dropout)])
        model.train()
        opt = _warm_adam(model, train) if warm else None
        forward_mode.FALLBACKS.clear()
        torch.manual_seed(7)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = hypergradient(model, gate, pearson_loss, train, val, P, inner_steps=steps, inner_lr=lr,
                                inner_optimizer=opt_name, optimizer=opt, method=method,
                                inner_state="warm" if warm else "fresh")
        results[method] = out["hypergrad"][0].item(), [str(w.message) for w in caught
                                                        if issubclass(w.category, RuntimeWarning)]
        counts = dict(forward_mode.FALLBACKS)
        if method == "forward":
            # a second outer step on the same model: the culprits are remembered, no new warning
            with warnings.catch_warnings(record=True) as again:
                warnings.simplefilter("always")
                torch.manual_seed(7)
                repeat = hypergradient(model, gate, pearson_loss, train, val, P, inner_steps=steps, inner_lr=lr,
                                       inner_optimizer=opt_name, optimizer=opt, method=method,
                                       inner_state="warm" if warm else "fresh", accumulate=False)
            assert not [w for w in again if issubclass(w.category, RuntimeWarning)]
            assert repeat["hypergrad"][0].item() == pytest.approx(out["hypergrad"][0].item(), rel=1e-12)
    (ref, _), (ours, messages) = results["unroll"], results["forward"]
    fallback_warnings = [m for m in messages if "no forward-mode (jvp) rule" in m]
    assert len(fallback_warnings) == 1, messages
    assert "backbone.1 (_SquareLayer)" in fallback_warnings[0] and "backbone.2 (_ScaledTanhLayer)" in fallback_warnings[0]
    assert "backbone.0" not in fallback_warnings[0] and "backbone.3" not in fallback_warnings[0]
    # only the two custom layers fell back (the Linear layers, trunk and head stayed in forward mode), never a whole step
    assert set(counts) == {"backbone.1", "backbone.2"}, counts
    assert forward_mode.WHOLE_STEP not in counts
    assert abs(ours - ref) / abs(ref) < 1e-4, (ours, ref)
    if dropout == 0.0:
        model, gate, train, val = _with_custom_layers(3, [_SquareLayer(), _ScaledTanhLayer(D)])
        opt = _warm_adam(model, train) if warm else None
        t0, h = gate.t.item(), 1e-5
        fd = (_outer_loss_reference(model, gate, train, val, t0 + h, steps, lr, opt_name, opt)
              - _outer_loss_reference(model, gate, train, val, t0 - h, steps, lr, opt_name, opt)) / (2 * h)
        assert abs(ours - fd) / abs(fd) < 1e-4, (ours, fd)


def test_forward_mode_falls_back_to_whole_steps_when_no_layer_is_to_blame() -> None:
    """A loss function without a jvp rule is in no module: whole inner steps fall back, loudly, same result."""
    from agl.training import forward_mode

    def squared_pearson(pred, y):
        return pearson_loss(_SquareNoJvp.apply(pred), y)

    grads = []
    for method in ("unroll", "forward"):
        model, gate, train, val = _problem(seed=3)
        forward_mode.FALLBACKS.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grads.append(hypergradient(model, gate, squared_pearson, train, val, P, inner_steps=3, inner_lr=0.01,
                                       method=method)["hypergrad"][0].item())
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("whole inner steps" in m for m in messages), messages
    assert forward_mode.FALLBACKS[forward_mode.WHOLE_STEP] == 3
    assert grads[1] == pytest.approx(grads[0], rel=1e-8)


def test_hypergrad_setting_names_the_registered_estimators() -> None:
    assert {"unroll", "checkpointed", "forward", "forward_fd"} <= set(HYPERGRADIENTS)
    assert TrainConfig(hypergrad="forward").hypergrad == "forward"
    with pytest.raises(ConfigError, match="hypergrad"):
        TrainConfig.from_dict({"hypergrad": "backward"})
    model, gate, train, val = _problem()
    with pytest.raises(ConfigError, match="first_order"):
        hypergradient(model, gate, pearson_loss, train, val, P, first_order=True, method="forward")


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_fd_is_within_float32_error_of_forward_mode_with_a_sharp_gate_and_dropout(seed: int) -> None:
    """forward_fd in float32 at the defaults' sharpness (tau 0.01) with dropout: within 1e-3 of the exact
    forward mode (float32's own unroll-vs-forward gap here is ~3e-4), exact at H = 1 (no difference taken)."""
    torch.manual_seed(seed)
    d, p, a = 32, 10, 120
    model = Estimator(d, p + a, trunk=(32,), dropout=0.1)
    ranks = {"hvg": np.linspace(0, 1, a), "mean": np.random.default_rng(seed).random(a)}
    gate = create_gate("dkgsb", a, ranks, t_init=0.5, tau=0.01)
    mix = torch.randn(d, p + a)
    x_train, x_val = torch.randn(96, d), torch.randn(96, d)
    train = (x_train, x_train @ mix + 2 * torch.randn(96, p + a))
    val = (x_val, x_val @ mix + 2 * torch.randn(96, p + a))
    for steps, tolerance in ((1, 1e-5), (4, 1e-3)):
        got = {}
        for method in ("forward", "forward_fd"):
            torch.manual_seed(7)
            got[method] = hypergradient(model, gate, pearson_loss, train, val, p, inner_steps=steps, inner_lr=1e-3,
                                        method=method)["hypergrad"][0].item()
        assert abs(got["forward_fd"] - got["forward"]) <= tolerance * abs(got["forward"]), (steps, got)


@pytest.mark.parametrize("steps", [1, 3])
def test_forward_fd_keeps_no_graph_and_takes_two_passes_per_step(steps: int, monkeypatch) -> None:
    """forward_fd's memory bound: every backward pass frees its graph (no retain_graph, no create_graph,
    so no second set of activations is ever alive) and each inner step is two passes, then one for
    the validation gradient."""
    from agl.training import forward_mode

    calls = []
    real = forward_mode.grads_of

    def recording(loss, params, create_graph, cotangent=None, **rest):
        calls.append((create_graph, rest.get("retain_graph")))
        return real(loss, params, create_graph, cotangent, **rest)

    monkeypatch.setattr(forward_mode, "grads_of", recording)
    model, gate, train, val = _problem()
    out = hypergradient(model, gate, pearson_loss, train, val, P, inner_steps=steps, inner_lr=0.01,
                        method="forward_fd")
    assert torch.isfinite(out["hypergrad"][0]).all()
    n_outer = sum(p.numel() for p in gate.parameters() if p.requires_grad)
    assert len(calls) == n_outer * (2 * steps + 1), calls
    assert all(not create and not retain for create, retain in calls), calls
