"""Hypergradients for a gate's outer parameters by unrolled inner optimisation (torch.func).

Bi-level problem (DkGSB): the outer parameters ``phi`` of the gate (the threshold ``t``)
minimise the primary-gene loss on validation spots of model weights ``theta*(phi)`` trained
on the gate-weighted training loss. Per outer step we approximate ``theta*`` by ``H``
differentiable optimiser steps from the current weights on one training batch, evaluate
the validation primary loss and back-propagate into ``phi``. With ``inner_state="fresh"``
(the default) the inner Adam starts from zero moments every outer step, which is what the
authors' release does (a new ``torch.optim.Adam`` inside ``higher.innerloop_ctx`` per outer
step); ``"warm"`` seeds the moments from the training optimiser instead (not the release).

The model itself is never copied or modified: its parameters are swapped in functionally
with ``torch.func.functional_call``, and its buffers (BatchNorm running statistics) are
cloned for the unrolled steps, so the real ones stay untouched.

Estimators (the ``hypergrad`` setting, registry ``HYPERGRADIENTS``):

- ``unroll``: reverse mode through the whole unrolled graph. Cost: ``H`` forward/backward
  passes with ``create_graph=True``, one validation forward/backward, and one backward through
  the unrolled graph (the second-order pass); memory grows by one step's graph per step.
- ``checkpointed``: the same gradient, but only ``theta_h`` and the optimiser state are kept on
  the way forward; the backward pass recomputes one step at a time and pulls the adjoint through
  it, so memory grows with ``H`` only by a copy of the parameters (and moments) per step.
- ``forward`` (``agl.training.forward_mode``): the tangent ``d theta_h / d phi`` carried along the
  trajectory; memory flat in ``H``, cost proportional to the number of outer scalars.
- ``ift_cg`` / ``ift_neumann`` (``agl.training.implicit``): the implicit function theorem at the
  current weights taken as an approximately converged ``theta*`` (fits the warmstart schedule).
- ``first_order`` (also ``first_order=True`` with ``unroll``): the Hessian-free approximation.

Every estimator is ``estimator(problem: HypergradProblem, *, **options) -> Estimate`` and is
registered in ``ESTIMATORS`` with its options dataclass (``register_estimator(name, options=...)``);
the options' fields are run settings (flattened into :class:`agl.config.TrainConfig` as gate
options are), so a new estimator with its options is one file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from agl.errors import ConfigError
from agl.registry import Registry
from agl.training.precision import in_full_float32

LossFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- functional optimisers
class FunctionalSGD:
    """``theta - lr * g``; stateless."""

    def __init__(self, params: Sequence[Tensor], lr: float, **_: Any):
        self.lr = lr
        self.count = 0  # steps taken (kept for a common interface with FunctionalAdam)

    def state(self) -> tuple[list[Tensor], ...]:
        """The optimiser state as a tuple of per-parameter tensor lists (none for SGD)."""
        return ()

    def update(self, params: Sequence[Tensor], grads: Sequence[Tensor], state: tuple[list[Tensor], ...],
               count: int) -> tuple[list[Tensor], tuple[list[Tensor], ...]]:
        """Pure step ``(params, state) -> (params, state)``; ``count`` is the 1-based step number."""
        return [p - self.lr * g for p, g in zip(params, grads)], ()

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> list[Tensor]:
        self.count += 1
        return self.update(params, grads, (), self.count)[0]

    @torch.no_grad()
    def tangent_step_(self, params: Sequence[Tensor], state: tuple, d_params: Sequence[Tensor], d_state: tuple,
                      grads: Sequence[Tensor], d_grads: Sequence[Tensor], count: int) -> None:
        """``update`` and its tangent (the jvp along ``d_grads``, ``d_params``) in place: ``p -= lr g``."""
        torch._foreach_add_(list(params), list(grads), alpha=-self.lr)
        torch._foreach_add_(list(d_params), list(d_grads), alpha=-self.lr)


class FunctionalAdam:
    """Adam (as ``torch.optim.Adam``, no weight decay) with its moments as ordinary tensors.

    Each step returns new parameter tensors that stay in the autograd graph, so the
    trajectory can be differentiated. ``state`` seeds the moments (e.g. from the training
    optimiser, as ``higher`` does); otherwise they start at zero. ``update`` is the same
    step as a pure function of ``(params, (m, v), count)``, for the estimators that replay
    or differentiate single steps (checkpointed reverse, forward mode).
    """

    def __init__(self, params: Sequence[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, state: Sequence[dict[str, Any]] | None = None):
        self.lr, self.betas, self.eps = lr, betas, eps
        if state is not None:
            self.m = [s["exp_avg"].detach().clone() for s in state]
            self.v = [s["exp_avg_sq"].detach().clone() for s in state]
            self.count = int(state[0]["step"]) if len(state) else 0
        else:
            self.m = [torch.zeros_like(p) for p in params]
            self.v = [torch.zeros_like(p) for p in params]
            self.count = 0

    def state(self) -> tuple[list[Tensor], ...]:
        """``(m, v)``: first and second moments, one tensor per parameter."""
        return list(self.m), list(self.v)

    def update(self, params: Sequence[Tensor], grads: Sequence[Tensor], state: tuple[list[Tensor], ...],
               count: int) -> tuple[list[Tensor], tuple[list[Tensor], ...]]:
        """Pure step ``(params, (m, v)) -> (params, (m, v))``; ``count`` is the 1-based step number."""
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1**count, 1.0 - b2**count
        out, ms, vs = [], [], []
        for p, g, m, v in zip(params, grads, *state):
            m = b1 * m + (1.0 - b1) * g
            v = b2 * v + (1.0 - b2) * g * g
            v_hat = v / c2
            # sqrt'(0) is infinite: where v_hat == 0 (g == 0 throughout) take sqrt(1) on a branch
            # that is then zeroed, so the second-order pass gets 0 instead of inf * 0 = NaN
            positive = v_hat > 0
            root = torch.where(positive, v_hat, torch.ones_like(v_hat)).sqrt() * positive
            out.append(p - self.lr * (m / c1) / (root + self.eps))
            ms.append(m)
            vs.append(v)
        return out, (ms, vs)

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> list[Tensor]:
        self.count += 1
        out, (self.m, self.v) = self.update(params, grads, (self.m, self.v), self.count)
        return out

    @torch.no_grad()
    def tangent_step_(self, params: Sequence[Tensor], state: tuple, d_params: Sequence[Tensor], d_state: tuple,
                      grads: Sequence[Tensor], d_grads: Sequence[Tensor], count: int) -> None:
        """``update`` and its tangent in place (forward mode without a jvp through ``update``: no tangent
        copies of every intermediate). With ``r = sqrt(v_hat)``, ``d = r + eps``:

            dm' = b1 dm + (1 - b1) dg,   dv' = b2 dv + 2 (1 - b2) g dg,   dr = dv' / (2 c2 r)  (0 where r = 0)
            dp' = dp - lr / c1 * (dm' - m' dr / d) / d
        """
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1**count, 1.0 - b2**count
        for p, m, v, dp, dm, dv, g, dg in zip(params, *state, d_params, *d_state, grads, d_grads):
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            dm.mul_(b1).add_(dg, alpha=1.0 - b1)
            dv.mul_(b2).addcmul_(g, dg, value=2.0 * (1.0 - b2))
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            positive = v > 0
            root = torch.where(positive, v, torch.ones_like(v)).div_(c2).sqrt_()  # sqrt(v_hat), 1 where v = 0
            d_root = dv.div(root).mul_(positive).div_(2.0 * c2)
            root.mul_(positive)
            denom = root.add_(self.eps)
            dp.sub_(dm.sub(m * d_root / denom).div_(denom), alpha=self.lr / c1)
            p.sub_(m / denom, alpha=self.lr / c1)


INNER_OPTIMIZERS: dict[str, type] = {"sgd": FunctionalSGD, "adam": FunctionalAdam}


def _adam_state(optimizer: torch.optim.Optimizer | None, params: Sequence[Tensor]) -> tuple[list[dict[str, Any]] | None, dict[str, Any]]:
    """Moments and hyperparameters of a ``torch.optim.Adam`` over ``params``, if it has them for all."""
    if not isinstance(optimizer, torch.optim.Adam):
        return None, {}
    group = optimizer.param_groups[0]
    hyper = {"betas": tuple(group["betas"]), "eps": group["eps"]}
    states = [optimizer.state.get(p, {}) for p in params]
    if not all("exp_avg" in s for s in states):
        return None, hyper
    return states, hyper


# --------------------------------------------------------------------------- helpers
def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (its forward hooks must not run on unrolled copies)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _cuda_index(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def capture_rng(device: torch.device) -> tuple[Tensor, Tensor | None]:
    index = _cuda_index(device)
    return torch.get_rng_state(), (None if index is None else torch.cuda.get_rng_state(index))


@contextlib.contextmanager
def replay_rng(state: tuple[Tensor, Tensor | None], device: torch.device) -> Iterator[None]:
    """Run with a saved RNG state (same dropout masks as before), restoring the current one after."""
    cpu, cuda = state
    index = _cuda_index(device)
    with torch.random.fork_rng(devices=[] if index is None else [index]):
        torch.set_rng_state(cpu)
        if cuda is not None and index is not None:
            torch.cuda.set_rng_state(cuda, index)
        yield


class Unrolled:
    """The model as a function of a list of parameter tensors, with private buffer copies."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        self.model = _unwrap(model)
        self.loss_fn = loss_fn
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # A training-mode BatchNorm normalises by batch statistics, so its running statistics
        # never change an output here: passing None skips their in-place update (which the
        # torch.func transforms refuse, and which would otherwise need clones). Other buffers are cloned.
        skipped = {f"{prefix}.{name}" if prefix else name
                   for prefix, module in self.model.named_modules()
                   if isinstance(module, _BatchNorm) and module.training
                   for name in ("running_mean", "running_var", "num_batches_tracked")}
        self.buffers = {n: None if n in skipped else b.clone() for n, b in self.model.named_buffers()}
        # models that can compute only their first outputs (Estimator) skip the auxiliary head rows
        self.partial = "n_outputs" in inspect.signature(self.model.forward).parameters

    def per_gene(self, params: Sequence[Tensor], batch: tuple[Tensor, Tensor], n_cols: int | None = None) -> Tensor:
        """Per-gene loss of the model with ``params`` on ``batch`` (only the first ``n_cols`` genes if given)."""
        x, y = batch
        kwargs = {"n_outputs": n_cols} if n_cols is not None and self.partial else {}
        pred = functional_call(self.model, ({**dict(zip(self.names, params)), **self.buffers}), (x,), kwargs)
        if n_cols is not None:
            pred, y = pred[:, :n_cols], y[:, :n_cols]
        return self.loss_fn(pred, y)


def weighted_loss(gate: nn.Module, per_gene: Tensor, n_primary: int) -> Tensor:
    return gate.loss(per_gene[:n_primary], per_gene[n_primary:])


def grads_of(loss: Tensor, params: Sequence[Tensor], create_graph: bool, cotangent: Tensor | None = None
             ) -> list[Tensor]:
    """``d loss / d params`` (``J^T cotangent`` for a non-scalar ``loss``), zeros for a parameter it does not use."""
    grads = torch.autograd.grad(loss, params, cotangent, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


# --------------------------------------------------------------------------- estimators
Estimate = tuple[float, list[float], list[Tensor]]  # (outer loss, inner losses, one gradient per outer parameter)


class HypergradProblem(NamedTuple):
    """What every estimator gets: the unrolled model, the gate, a fresh functional optimiser over
    ``net.params`` (``FunctionalSGD``/``FunctionalAdam``), the batches, ``H`` and the outer parameters."""

    net: "Unrolled"
    gate: nn.Module
    opt: Any
    train: tuple
    val: tuple
    n_primary: int
    steps: int
    outer: list[Tensor]


@dataclass
class NoOptions:
    """An estimator that reads no settings."""


# The ``hypergrad`` setting. Built-ins are lazy "module:function" entries (listing them imports no
# estimator module); each module registers its functions with their options when imported.
ESTIMATORS: Registry[Callable[..., Estimate]] = Registry("hypergradient estimator", setting="hypergrad")
for _name, _target in {
    "unroll": "agl.training.bilevel:unrolled_reverse",
    "checkpointed": "agl.training.bilevel:checkpointed_reverse",
    "forward": "agl.training.forward_mode:forward_mode",
    "forward_fd": "agl.training.forward_mode:forward_fd",
    "ift_cg": "agl.training.implicit:ift_cg",
    "ift_neumann": "agl.training.implicit:ift_neumann",
    "first_order": "agl.training.bilevel:first_order_approximation",
}.items():
    ESTIMATORS.register_lazy(_name, _target)
HYPERGRADIENTS = ESTIMATORS  # the earlier name of this registry
INNER_STATES = ("fresh", "warm")


def register_estimator(name: str, options: type = NoOptions) -> Callable[[Callable[..., Estimate]], Callable[..., Estimate]]:
    """Decorator adding ``estimator(problem, *, **options)`` under ``name`` with its ``options`` dataclass
    (fields made by :func:`agl.checks.setting`; they become run settings, read by the keyword of the same name)."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"estimator {name!r}: options must be a dataclass of setting() fields")

    def add(fn: Callable[..., Estimate]) -> Callable[..., Estimate]:
        fn.Options = options  # type: ignore[attr-defined]
        return ESTIMATORS.register(name, fn)

    return add


def register_hypergradient(name: str, target: str) -> None:
    """Add an estimator ``"module:function"`` under ``name`` (the value of the ``hypergrad`` setting)."""
    ESTIMATORS.register_lazy(name, target)


def hypergradient_estimator(name: str) -> Callable[..., Estimate]:
    """The estimator registered under ``name``, run with TF32 and autocast off (``full_float32``).

    Unknown: a ConfigError listing the known ones.
    """
    return in_full_float32(ESTIMATORS.get(name))


def estimator_options_class(fn: Callable[..., Estimate]) -> type:
    """The options dataclass an estimator was registered with."""
    return getattr(fn, "Options", NoOptions)


# --------------------------------------------------------------------------- hypergradient
def hypergradient(
    model: nn.Module,
    gate: nn.Module,
    loss_fn: LossFn,
    train_batch: tuple[Tensor, Tensor],
    val_batch: tuple[Tensor, Tensor],
    n_primary: int,
    *,
    inner_steps: int = 2,
    inner_lr: float = 1e-3,
    inner_optimizer: str = "adam",
    first_order: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    fd_eps: float = 1e-2,
    method: str = "unroll",
    inner_state: str = "fresh",
    estimator_options: dict[str, Any] | None = None,
    accumulate: bool = True,
) -> dict[str, Any]:
    """Accumulate into ``p.grad`` for ``p in gate.outer_parameters()`` the hypergradient of the
    validation primary loss after ``inner_steps`` unrolled optimiser steps.

    Args:
        model: the estimator (trainable parameters are unrolled; its mode decides dropout/BN).
        gate: provides ``loss(l_primary, l_aux)`` and ``outer_parameters()``.
        loss_fn: per-gene loss ``(pred, target) -> [G]``.
        train_batch, val_batch: ``(x, y)`` with ``y`` columns in model output order.
        n_primary: the first ``n_primary`` outputs are primary genes.
        inner_steps: ``H``, unrolled steps on ``train_batch``.
        inner_lr, inner_optimizer: ``"sgd"`` or ``"adam"`` (functional, differentiable).
        first_order: skip differentiating through the trajectory (the ``first_order`` estimator, ``first_order_approximation``).
        optimizer: the training ``torch.optim.Adam``; read for its betas/eps, and with
            ``inner_state="warm"`` its moments seed the inner Adam.
        fd_eps: relative finite-difference step of the first-order approximation.
        method: the estimator (``ESTIMATORS``): ``unroll``, ``checkpointed``, ``first_order``,
            ``forward``, ``forward_fd``, ``ift_cg`` or ``ift_neumann``; ``first_order=True`` is
            ``method="first_order"`` and combines with ``unroll`` only.
        inner_state: ``fresh`` (zero inner Adam moments, the authors' release) or ``warm``.
        estimator_options: keyword options of the estimator (the fields of its options dataclass,
            e.g. ``ift_*``: ift_iters, ift_damping, ift_alpha).
        accumulate: add the result to ``.grad`` (False: only return it).

    Returns:
        ``outer_loss`` (float), ``inner_losses`` (floats), ``hypergrad`` (tensors, one per outer
        parameter, also added to ``.grad``), ``hypergrad_norm``. Does not step any optimiser and
        leaves the model's parameters, gradients and buffers unchanged.
    """
    if inner_optimizer not in INNER_OPTIMIZERS:
        raise ConfigError("inner_optimizer", f"unknown inner optimiser {inner_optimizer!r}; choose {sorted(INNER_OPTIMIZERS)}")
    if inner_steps < 1:
        raise ConfigError("inner_steps", f"must be >= 1, got {inner_steps}")
    if inner_state not in INNER_STATES:
        raise ConfigError("inner_state", f"must be one of {', '.join(INNER_STATES)}, got {inner_state!r}")
    if first_order and method not in ("unroll", "first_order"):
        raise ConfigError("hypergrad", f"first_order approximates the unrolled hypergradient; it takes no estimator (got {method!r})")
    method = "first_order" if first_order else method
    estimator = hypergradient_estimator(method)
    options = dict(estimator_options or {})
    if method == "first_order":
        options.setdefault("fd_eps", fd_eps)
    outer = [p for p in gate.outer_parameters() if p.requires_grad]
    if not outer:
        return {"outer_loss": math.nan, "inner_losses": [], "hypergrad": [], "hypergrad_norm": 0.0}

    net = Unrolled(model, loss_fn)
    state, hyper = _adam_state(optimizer, net.params) if inner_optimizer == "adam" else (None, {})
    if inner_state == "fresh":
        state = None  # a new Adam per outer step, as the release's higher.innerloop_ctx(Adam(...))
    opt = INNER_OPTIMIZERS[inner_optimizer](net.params, inner_lr, state=state, **hyper)
    problem = HypergradProblem(net, gate, opt, train_batch, val_batch, n_primary, inner_steps, outer)
    with torch.enable_grad():
        outer_loss, inner_losses, hyper_grads = estimator(problem, **options)

    for p, g in zip(outer, hyper_grads if accumulate else []):
        g = g.detach()
        p.grad = g.clone() if p.grad is None else p.grad + g
    norm = math.sqrt(sum(float(g.detach().square().sum()) for g in hyper_grads))
    return {"outer_loss": outer_loss, "inner_losses": inner_losses, "hypergrad": [g.detach() for g in hyper_grads], "hypergrad_norm": norm}


@register_estimator("unroll")
def unrolled_reverse(problem: HypergradProblem) -> Estimate:
    """Exact hypergradient of the unrolled objective: differentiate through every inner step."""
    net, gate, opt, train, val, n_primary, steps, outer = problem
    params: list[Tensor] = list(net.params)  # the real leaves: the graph starts there, but we only ask for d/d outer
    inner_losses = []
    for _ in range(steps):
        loss = weighted_loss(gate, net.per_gene(params, train), n_primary)
        params = opt.step(params, grads_of(loss, params, create_graph=True))
        inner_losses.append(float(loss.detach()))
    val_loss = net.per_gene(params, val, n_primary).mean()
    grads = torch.autograd.grad(val_loss, outer, allow_unused=True)
    return float(val_loss.detach()), inner_losses, [torch.zeros_like(p) if g is None else g for p, g in zip(outer, grads)]


def _flat(state: tuple[list[Tensor], ...]) -> list[Tensor]:
    return [x for xs in state for x in xs]


def _unflat(flat: Sequence[Tensor], like: tuple[list[Tensor], ...]) -> tuple[list[Tensor], ...]:
    out, i = [], 0
    for xs in like:
        out.append(list(flat[i:i + len(xs)]))
        i += len(xs)
    return tuple(out)


def _leaves(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [x.detach().requires_grad_() for x in tensors]


@register_estimator("checkpointed")
def checkpointed_reverse(problem: HypergradProblem) -> Estimate:
    """``unroll``'s gradient with one step's graph alive at a time (recompute in the backward pass).

    Forward: plain steps (first-order gradients, no graph), keeping ``theta_h``, the optimiser
    state and the RNG state of each step. Backward, for ``h = H-1 .. 0``: recompute step ``h``
    with its graph (same dropout masks), then one vector-Jacobian product pulls the adjoint
    ``(a_theta, a_state)`` of step ``h + 1`` back to step ``h`` and adds ``a . d step_h / d phi``
    to the hypergradient (the adjoint recursion of Franceschi et al. 2017, sec. 2.1, and of
    Griewank's checkpointing with a checkpoint at every step). Costs about ``unroll`` plus ``H``
    plain steps; memory is one step's second-order graph plus ``H`` copies of parameters and moments.
    """
    net, gate, opt, train, val, n_primary, steps, outer = problem
    device = net.params[0].device
    params = [p.detach() for p in net.params]
    state = tuple([x.detach() for x in xs] for xs in opt.state())
    start, saved, inner_losses = opt.count, [], []
    for h in range(steps):
        saved.append((params, state, capture_rng(device)))
        current = _leaves(params)
        loss = weighted_loss(gate, net.per_gene(current, train), n_primary)
        grads = grads_of(loss, current, create_graph=False)
        with torch.no_grad():
            params, state = opt.update(params, grads, state, start + h + 1)
        inner_losses.append(float(loss.detach()))
    final = _leaves(params)
    val_loss = net.per_gene(final, val, n_primary).mean()
    adj_params = grads_of(val_loss, final, create_graph=False)
    adj_state = [torch.zeros_like(x) for x in _flat(state)]
    total = [torch.zeros_like(p) for p in outer]
    n = len(adj_params)
    for h in reversed(range(steps)):
        params_h, state_h, rng = saved[h]
        saved[h] = None  # this step's copies are not needed after its recomputation
        p_in, s_in = _leaves(params_h), _leaves(_flat(state_h))
        with replay_rng(rng, device):
            loss = weighted_loss(gate, net.per_gene(p_in, train), n_primary)
        grads = grads_of(loss, p_in, create_graph=True)
        p_out, s_out = opt.update(p_in, grads, _unflat(s_in, state_h), start + h + 1)
        outputs, cotangents = [*p_out, *_flat(s_out)], [*adj_params, *adj_state]
        pulled = torch.autograd.grad(outputs, [*p_in, *s_in, *outer], cotangents, allow_unused=True)
        pulled = [torch.zeros_like(x) if g is None else g for x, g in zip([*p_in, *s_in, *outer], pulled)]
        adj_params, adj_state = pulled[:n], pulled[n:len(pulled) - len(outer)]
        total = [t + g for t, g in zip(total, pulled[len(pulled) - len(outer):])]
    return float(val_loss.detach()), inner_losses, total


@register_estimator("first_order")
def first_order_approximation(problem: HypergradProblem, *, fd_eps: float = 1e-2) -> Estimate:
    """First-order approximation: inner gradients are computed without ``create_graph``.

    Taken literally, treating the inner gradients ``g_h`` as constants leaves the validation loss
    with no dependence on ``t`` at all (the mask acts only through ``g_h``), i.e. a zero
    hypergradient. We keep instead the *direct* dependence of each step on ``phi`` and drop the
    Hessian terms (how earlier steps' changes of ``theta`` alter later gradients):

        dL_val/dphi ~= sum_h u_h . d/dphi grad_theta L_train(theta_h, phi),  u_h = dL_val/dg_h,

    where ``u_h`` back-propagates the validation gradient through the optimiser arithmetic only
    (SGD: ``-lr * grad L_val``; Adam: its elementwise Jacobian, incl. later moment updates). The
    mixed derivative is a directional derivative along ``u_h``, taken by central differences
    as in DARTS (Liu et al., ICLR 2019, eq. 8):

        [grad_phi L_train(theta_h + e u_h, phi) - grad_phi L_train(theta_h - e u_h, phi)] / 2e

    which needs two forward passes per step and no second-order autograd. With ``H = 1`` and
    SGD this is exactly the one-step unrolled hypergradient up to O(e^2). ``fd_eps``: the relative
    finite-difference step (not a run setting).
    """
    net, gate, opt, train, val, n_primary, steps, outer = problem
    values = [p.detach() for p in net.params]      # theta_h as plain tensors (forward passes)
    tracked: list[Tensor] = list(values)            # theta_h as a function of the g leaves
    thetas, leaves, rng_states, inner_losses = [], [], [], []
    device = values[0].device
    for _ in range(steps):
        thetas.append(values)
        rng_states.append(capture_rng(device))  # replayed below: same dropout masks as this step
        current = [v.detach().requires_grad_() for v in values]
        loss = weighted_loss(gate, net.per_gene(current, train), n_primary)
        g = [x.detach().requires_grad_() for x in grads_of(loss, current, create_graph=False)]
        leaves.append(g)
        inner_losses.append(float(loss.detach()))
        tracked = opt.step(tracked, g)
        values = [t.detach() for t in tracked]
    val_loss = net.per_gene(tracked, val, n_primary).mean()
    flat_leaves = [x for g in leaves for x in g]
    u_flat = grads_of(val_loss, flat_leaves, create_graph=False)

    total = [torch.zeros_like(p) for p in outer]
    n = len(net.params)
    for h in range(steps):
        u = u_flat[h * n:(h + 1) * n]
        norm = math.sqrt(sum(float(x.square().sum()) for x in u))
        if norm == 0.0:
            continue
        eps = fd_eps / norm
        sides = []
        for sign in (1.0, -1.0):
            shifted = [v + sign * eps * d for v, d in zip(thetas[h], u)]
            with torch.no_grad(), replay_rng(rng_states[h], device):
                per_gene = net.per_gene(shifted, train)
            # only the gate is differentiated here: d/dphi of the weighted loss at fixed per-gene losses
            sides.append(grads_of(weighted_loss(gate, per_gene, n_primary), outer, create_graph=False))
        total = [t + (gp - gm) / (2.0 * eps) for t, gp, gm in zip(total, *sides)]
    return float(val_loss.detach()), inner_losses, total


# --------------------------------------------------------------------------- distributed
def allreduce_gradients(params: Sequence[Tensor]) -> None:
    """Average ``p.grad`` over ranks when ``torch.distributed`` is initialised (no-op otherwise).

    DDP does not synchronise gradients from ``torch.autograd.grad`` or double backward, so
    hypergradients (and gate inner parameters outside DDP) are averaged here. Parameters
    without a gradient contribute zeros, so every rank issues the same collective.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1 or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
