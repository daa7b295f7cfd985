"""Forward-mode hypergradient for gates with few outer scalars (``hypergrad: forward``).

Franceschi et al. 2017 ("Forward and reverse gradient-based hyperparameter optimization",
ICML, sec. 2.2): write one inner optimiser step as ``s_{h+1} = Phi(s_h, phi)`` with the state
``s = (theta, optimiser moments)``. The tangent ``Z_h = d s_h / d phi`` obeys

    Z_{h+1} = (d Phi / d s) Z_h + d Phi / d phi,        Z_0 = 0,

and the hypergradient is ``dL_val(theta_H) / d phi = grad L_val(theta_H) . Z_H``. Per outer
scalar we carry one tangent: ``torch.func.jvp`` over the step (which contains
``torch.func.grad`` of the training loss: forward-over-reverse) returns the next state and its
tangent together, so nothing of step ``h`` is kept once step ``h + 1`` has started. Memory is
therefore flat in ``H`` (one step's activations and their tangents), and the cost per inner
step is a constant times a plain step, per outer scalar. The validation loss is a ``jvp`` of a
forward pass only (no backward pass at all).

The initial optimiser state (warm moments from the training optimiser, or zeros) does not
depend on ``phi`` in this objective, so its tangent starts at zero, exactly as the reverse
unroll treats it.

If some module of the model has no forward-mode (jvp) rule (an operator without a forward-AD
formula, or a custom ``autograd.Function`` without ``jvp``), only that module falls back, once a
warning has named it: it runs inside ``_LayerFunction``, whose ``jvp`` computes the module's
tangent by double backward (the "double-vjp" trick: ``J v = d/du <J^T u, v>``), and whose
backward is ``_LayerVjp``, whose ``jvp`` is the tangent of ``J^T g``: ``J^T dg`` plus the
Hessian-vector product ``d/dz <J(z)^T g, dz>`` (Pearlmutter 1994), both by eager reverse mode
on that module alone. Every other module stays in forward mode. Only if that does not help
(e.g. the loss itself lacks a rule) does the whole step fall back to reverse-over-reverse:
``dg = grad_theta(<g, Z_theta> + <dL/dphi, Z_phi>)`` and a ``jvp`` of the optimiser arithmetic.
``FALLBACKS`` counts the tangents computed each way (per module name, or ``WHOLE_STEP``).

``hypergrad: forward_fd`` is the same recursion without forward-over-reverse. The gradient's
tangent splits into the mixed term ``d/dphi grad_theta L . Z_phi`` and the Hessian-vector product
``H Z_theta``. The first is cheap: ``phi`` (the gate) only reweights the per-gene losses, so it is
the model's Jacobian transposed times a per-gene vector that forward mode gets from the gate alone.
The second is a difference of gradients along ``Z_theta`` (DARTS, Liu et al. 2019, eq. 8,
approximates its second-order term by differences of gradients too; a difference along ``phi``
would be poor, since the gate is sharp on the scale of tau). Both come from two passes at
``theta -/+ (h/2) Z_theta`` whose backward cotangents carry the gate's term with opposite signs:
their difference is a central difference (error ``O(h^2)`` plus round-off, ``h`` from ``FD_STEP``),
their mean the gradient itself. At the first inner step (``Z_theta = 0``) the two passes give the
gradient and the mixed term exactly, so at ``H = 1`` the result is exact. Per inner step that is two
forward and two backward passes, about 2 plain steps; no backward pass keeps its graph and no
activation carries a tangent, so the peak is one plain step's activations plus the trajectory's
parameter-sized tensors (measured at 224 px, batch 64: docs/results.md). Every pass replays the
step's dropout masks.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
import weakref
from collections import Counter
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from agl.errors import RebuiltError
from agl.training.bilevel import (Estimate, HypergradProblem, grads_of, register_estimator, replay_rng, capture_rng,
                                  Unrolled, weighted_loss)

log = logging.getLogger(__name__)

try:  # eager autograd inside a torch.func transform (the fallback's double backward); private, so guarded
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack as _outside_transforms
except ImportError:  # pragma: no cover - older/newer torch: torch.func-composable modules still work
    _outside_transforms = contextlib.nullcontext

# Tangents computed other than by forward mode: module name -> count; WHOLE_STEP: whole inner steps
FALLBACKS: Counter[str] = Counter()
WHOLE_STEP = "<whole step by double backward>"
# Modules found without a jvp rule, per model (probed once per model, then wrapped up front)
_KNOWN_CULPRITS: "weakref.WeakKeyDictionary[nn.Module, list[str]]" = weakref.WeakKeyDictionary()
_WHOLE_STEP_MODELS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()

# Above this many outer scalars the reverse estimators are cheaper (one tangent per scalar here).
MANY_OUTER_SCALARS = 8
# forward_fd: the central-difference step is FD_STEP * (1 + |theta|) / |d_theta|; 0 means the square
# root of the parameters' float epsilon (a one-sided difference's balance of truncation and round-off;
# the central difference used here errs O(h^2), so this step is on the safe side of round-off)
FD_STEP = 0.0


class _GateLoss(nn.Module):
    """The gate's weighted loss as a module, so ``functional_call`` can swap its outer parameters."""

    def __init__(self, gate: nn.Module, n_primary: int):
        super().__init__()
        self.gate = gate
        self.n_primary = n_primary

    def forward(self, per_gene: Tensor) -> Tensor:
        return weighted_loss(self.gate, per_gene, self.n_primary)


class ForwardModeUnsupported(RebuiltError, RuntimeError):
    """An operator of the model has no forward-mode rule in torch (``operator`` names it)."""

    def __init__(self, operator: str, message: str):
        super().__init__(f"forward mode: {operator} has no forward-mode (jvp) rule in torch: {message}")
        self.operator = operator


_NO_RULE = re.compile(r"(forward AD|jvp|forward-mode|setup_context)", re.IGNORECASE)


def _operator_name(message: str) -> str:
    """The operator or autograd.Function a torch 'no forward rule' error names."""
    for pattern in (r"(aten::[\w.]+)", r"forward AD with (\S+)"):
        found = re.search(pattern, message)
        if found:
            return found.group(1).rstrip(".,")
    return message.splitlines()[0][:120]


def _is_missing_rule(error: Exception) -> bool:
    text = str(error)
    return bool(_NO_RULE.search(text)) and any(w in text for w in ("not implemented", "not supported", "does not support",
                                                                    "must override", "must implement", "doesn't support",
                                                                    "NotImplemented"))


@register_estimator("forward_fd")
def forward_fd(problem: HypergradProblem) -> Estimate:
    """``forward_mode`` without forward-over-reverse: each inner step's gradient tangent from a second backward
    pass (the gate's term, exact) and a central difference of gradients (the Hessian's term)."""
    return forward_mode(problem, fd_step=FD_STEP)


@register_estimator("forward")
def forward_mode(problem: HypergradProblem, *, fd_step: float | None = None) -> Estimate:
    """Hypergradient of the unrolled objective by forward-mode differentiation (one tangent per outer scalar).

    ``fd_step``: not None: take each step's gradient tangent as ``forward_fd`` does (0: the default step)."""
    net, gate, opt, train, val, n_primary, steps, outer = problem
    names = {id(p): n for n, p in gate.named_parameters()}
    outer_names = [f"gate.{names[id(p)]}" for p in outer]
    gate_loss = _GateLoss(gate, n_primary)
    n_scalars = sum(p.numel() for p in outer)
    if n_scalars > MANY_OUTER_SCALARS:
        log.warning("hypergrad=forward with %d outer scalars costs %d trajectories; "
                    "hypergrad=checkpointed is cheaper for gates with many outer parameters", n_scalars, n_scalars)
    device = net.params[0].device
    start_rng = capture_rng(device)
    phi = [p.detach() for p in outer]
    total = [torch.zeros_like(p) for p in outer]
    outer_loss, inner_losses = float("nan"), []
    direction = 0
    for j, p in enumerate(outer):
        for e in range(p.numel()):
            tangent_phi = [torch.zeros_like(q) for q in phi]
            tangent_phi[j].view(-1)[e] = 1.0
            if direction == 0:  # the first trajectory draws dropout masks like the reverse unroll would
                outer_loss, inner_losses, derivative = _trajectory(net, gate_loss, opt, train, val, n_primary, steps,
                                                                   outer_names, phi, tangent_phi, fd_step)
            else:  # later ones replay the same masks
                with replay_rng(start_rng, device):
                    _, _, derivative = _trajectory(net, gate_loss, opt, train, val, n_primary, steps,
                                                   outer_names, phi, tangent_phi, fd_step)
            total[j].view(-1)[e] = derivative
            direction += 1
    return outer_loss, inner_losses, total


def _trajectory(net: Unrolled, gate_loss: _GateLoss, opt: Any, train: tuple, val: tuple, n_primary: int, steps: int,
                outer_names: list[str], phi: list[Tensor], tangent_phi: list[Tensor], fd_step: float | None = None
                ) -> tuple[float, list[float], Tensor]:
    """``H`` inner steps carrying the tangent along ``tangent_phi``; the validation loss and its derivative."""

    def train_loss(theta: Sequence[Tensor], outer_values: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        per_gene = net.per_gene(theta, train)
        loss = functional_call(gate_loss, dict(zip(outer_names, outer_values)), (per_gene,))
        return loss, loss

    # own copies, updated in place by the optimiser's tangent step (the model and ``opt`` stay as they are)
    theta = [p.detach().clone() for p in net.params]
    state = tuple([x.detach().clone() for x in xs] for xs in opt.state())
    d_theta = [torch.zeros_like(x) for x in theta]
    d_state = tuple([torch.zeros_like(x) for x in xs] for xs in state)
    inner_losses = []
    whole_step = net.model in _WHOLE_STEP_MODELS
    differences = fd_step is not None  # forward_fd: no forward-over-reverse at all
    # torch.func does its own differentiation; no eager graph is needed
    with torch.no_grad(), _LayerFallbacks(net) as layers:
        for h in range(steps):
            count = opt.count + h + 1

            rng = capture_rng(theta[0].device)
            while not (whole_step or differences):
                try:  # forward-over-reverse: the gradient and its tangent
                    g, d_g, loss = jvp(grad(train_loss, has_aux=True), (theta, phi), (d_theta, tangent_phi),
                                       has_aux=True)
                    theta, state, d_theta, d_state = _optimiser_step(opt, theta, state, d_theta, d_state, g, d_g,
                                                                     count)
                    del g, d_g
                    break
                except (RuntimeError, NotImplementedError) as error:
                    if not _is_missing_rule(error):
                        raise
                    torch.set_rng_state(rng[0])  # the retry draws this step's dropout masks again
                    if rng[1] is not None:
                        torch.cuda.set_rng_state(rng[1], theta[0].device)
                    if not layers.add_culprits(theta, train, error):
                        whole_step = True  # no single module to blame (or wrapping did not help)
                        _WHOLE_STEP_MODELS.add(net.model)
                        layers.remove()
                        _warn_whole_step(error)
            if differences:
                g, d_g, loss = _finite_difference_step(
                    lambda th: net.per_gene(th, train),
                    lambda losses, ph: functional_call(gate_loss, dict(zip(outer_names, ph)), (losses,)),
                    theta, phi, d_theta, tangent_phi, fd_step)
                theta, state, d_theta, d_state = _optimiser_step(opt, theta, state, d_theta, d_state, g, d_g, count)
                del g, d_g
            elif whole_step:  # (after a failed try the RNG was reset above: same dropout masks)
                theta, state, d_theta, d_state, loss = _double_backward_step(
                    train_loss, opt, theta, state, phi, d_theta, d_state, tangent_phi, count)
                FALLBACKS[WHOLE_STEP] += 1
            inner_losses.append(float(loss))

        def val_loss(th: list[Tensor]) -> Tensor:
            return net.per_gene(th, val, n_primary).mean()

        if whole_step or differences:  # one plain backward pass
            final = [x.detach().requires_grad_() for x in theta]
            with torch.enable_grad():
                value = val_loss(final)
                g_val = grads_of(value, final, create_graph=False)
            derivative = sum((g * d).sum() for g, d in zip(g_val, d_theta))
        else:
            value, derivative = jvp(val_loss, (theta,), (d_theta,))
    return float(value.detach()), inner_losses, torch.as_tensor(derivative).detach()


def _optimiser_step(opt: Any, theta: list[Tensor], state: tuple, d_theta: list[Tensor], d_state: tuple,
                    g: list[Tensor], d_g: list[Tensor], count: int) -> tuple:
    """One inner optimiser step and its tangent: in place where the optimiser writes its tangent step out
    (``tangent_step_``), else a ``jvp`` through its pure update."""
    if hasattr(opt, "tangent_step_"):
        opt.tangent_step_(theta, state, d_theta, d_state, g, d_g, count)
        return theta, state, d_theta, d_state
    (theta, state), (d_theta, d_state) = jvp(lambda t_, s_, g_: opt.update(t_, g_, s_, count),
                                             (theta, state, g), (d_theta, d_state, d_g))
    return theta, state, d_theta, d_state


def _finite_difference_step(per_gene: Any, weighted: Any, theta: list[Tensor], phi: list[Tensor],
                            d_theta: list[Tensor], d_phi: list[Tensor], rel_step: float
                            ) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """The training gradient ``g`` at ``(theta, phi)``, its tangent ``d_g`` along ``(d_theta, d_phi)``, and the loss.

    ``d_g = H_theta d_theta + J^T c_phi`` with ``l = per_gene(theta)`` (the per-gene losses, ``J`` their
    Jacobian), ``f = weighted(l, phi)`` the gate's loss and ``c_phi = d/dphi grad_l f . d_phi`` (per-gene
    sized, from forward mode through the gate alone). Two passes, each a forward and a backward that frees
    its graph as it goes, so no pass holds a second set of activations:

    - at the first inner step (``d_theta = 0``): ``g`` and then ``J^T c_phi``, both at ``theta``, exact;
    - later, at ``theta -/+ (h/2) d_theta``, ``J^T (c -/+ (h/2) c_phi)`` each (``c = grad_l f`` there), so
      their difference over ``h`` is a central difference of gradients along ``d_theta`` plus the gate's
      term (``O(h^2)``) and their mean is ``g`` (``O(h^2)``, as is the loss, the mean of the two).

    The second pass replays this step's dropout masks.
    """
    device = theta[0].device
    rel_step = rel_step or float(torch.finfo(theta[0].dtype).eps) ** 0.5  # 0: the default (see FD_STEP)
    rng = capture_rng(device)
    # Eager autograd, not torch.func: torch.func.grad always differentiates with create_graph=True (to
    # compose), which held about one more set of activations (+1.1 GB at batch 64, 224 px).
    leaves = [x.detach().requires_grad_() for x in theta]  # theta's own storage: no copy
    norm_v = torch.sqrt(sum((d.double() ** 2).sum() for d in d_theta))
    if float(norm_v) == 0.0:
        g, loss = _gradient_pass(per_gene, weighted, leaves, phi, d_phi, 1.0, 0.0)
        with replay_rng(rng, device):  # restores the RNG afterwards: the next step draws new masks
            d_g, _ = _gradient_pass(per_gene, weighted, leaves, phi, d_phi, 0.0, 1.0)
        return g, d_g, loss
    norm_x = torch.sqrt(sum((x.double() ** 2).sum() for x in theta))
    h = float(rel_step * (1.0 + norm_x) / norm_v)
    offset = 0.0  # theta is shifted in place and back (as DARTS does): no copy of theta
    try:
        for x, d in zip(theta, d_theta):
            x.sub_(d, alpha=h / 2)
        offset = -h / 2
        below, loss_below = _gradient_pass(per_gene, weighted, leaves, phi, d_phi, 1.0, -h / 2)
        for x, d in zip(theta, d_theta):
            x.add_(d, alpha=h)
        offset = h / 2
        with replay_rng(rng, device):
            above, loss_above = _gradient_pass(per_gene, weighted, leaves, phi, d_phi, 1.0, h / 2)
    finally:
        for x, d in zip(theta, d_theta):
            x.sub_(d, alpha=offset)
    for a, b in zip(below, above):  # in place: a <- (a + b) / 2 = g, then b <- (b - g) * 2 / h = (b - a) / h
        a.add_(b).mul_(0.5)
        b.sub_(a).mul_(2.0 / h)
    return below, above, (loss_below + loss_above) / 2


def _gradient_pass(per_gene: Any, weighted: Any, leaves: list[Tensor], phi: list[Tensor], d_phi: list[Tensor],
                   of_loss: float, of_tangent: float) -> tuple[list[Tensor], Tensor]:
    """One forward and backward pass at ``leaves``: ``J^T (of_loss c + of_tangent c_phi)`` and the gate's loss."""
    from torch.func import grad_and_value

    with torch.enable_grad():
        losses = per_gene(leaves)
    (c, loss), (c_phi, _) = jvp(lambda ph: grad_and_value(weighted)(losses.detach(), ph), (phi,), (d_phi,))
    return grads_of(losses, leaves, False, of_loss * c + of_tangent * c_phi), loss


def _warn_whole_step(error: Exception) -> None:
    operator = _operator_name(str(error))
    warnings.warn(f"hypergrad=forward: {operator} has no forward-mode rule in torch and no single module could be "
                  f"given one; computing whole inner steps' tangents by double backward instead (same result, about "
                  f"one more backward pass). torch said: {str(error).splitlines()[0]}", RuntimeWarning, stacklevel=3)
    log.warning("forward mode: %s lacks a jvp rule; whole steps fall back to double backward", operator)


# --------------------------------------------------------------------------- per-module fallback
def _zero_if_none(tangent: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if tangent is None else tangent


class _Call:
    """How one wrapped module is called: the module, its parameter names, its positional arguments
    (``None`` where a differentiated tensor goes), keyword arguments, the RNG state at the call
    (replayed by the recomputations, so dropout masks agree) and the name reported in ``FALLBACKS``."""

    def __init__(self, wrapper: "_Wrapped", param_names: list[str], template: list[Any], kwargs: dict[str, Any],
                 rng: tuple):
        self.name, self.wrapper, self.param_names = wrapper.name, wrapper, param_names
        self.template, self.kwargs, self.rng = template, kwargs, rng
        self.n_inputs = sum(a is None for a in template)

    def run(self, tensors: Sequence[Tensor], replay: bool = True) -> Tensor:
        """The module's own forward on ``tensors`` = (differentiated inputs, parameters), with the private
        buffers it had in the unrolled forward (the backward pass runs after ``functional_call`` has ended)."""
        inputs, params = iter(tensors[:self.n_inputs]), tensors[self.n_inputs:]
        args = tuple(next(inputs) if a is None else a for a in self.template)
        state = {**self.wrapper.buffers, **dict(zip(self.param_names, params))}
        replayed = replay_rng(self.rng, tensors[0].device) if replay else contextlib.nullcontext()
        with self.wrapper.unwrapped(), replayed:
            return functional_call(self.wrapper.module, state, args, self.kwargs)

    def vjp(self, tensors: Sequence[Tensor], cotangent: Tensor | None, create_graph: bool) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Eager reverse mode on this module alone: leaves for ``tensors``, ``J^T cotangent`` and the
        cotangent (a zero probe that requires grad when ``None``: ``J^T u`` as a function of ``u``)."""
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = self.run(leaves)
        if cotangent is None:
            cotangent = torch.zeros_like(out, requires_grad=True)
        pulled = torch.autograd.grad(out, leaves, cotangent, create_graph=create_graph, allow_unused=True)
        return leaves, [_zero_if_none(g, x) for g, x in zip(pulled, leaves)], cotangent


class _LayerFunction(torch.autograd.Function):
    """A module without a jvp rule as one differentiable function of its inputs and parameters."""

    @staticmethod
    def forward(call: _Call, *tensors: Tensor) -> Tensor:
        return call.run(tensors, replay=False)  # draws its dropout masks; the recomputations replay them

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.call = inputs[0]
        ctx.save_for_backward(*inputs[1:])
        ctx.save_for_forward(*inputs[1:])

    @staticmethod
    def jvp(ctx: Any, _call: None, *tangents: Tensor | None) -> Tensor:
        # J v by double backward: u -> J^T u is linear, so d/du <J^T u, v> = J v
        FALLBACKS[ctx.call.name] += 1
        tensors = ctx.saved_tensors
        with _outside_transforms(), torch.enable_grad():
            leaves, pulled, probe = ctx.call.vjp(tensors, None, create_graph=True)
            pairs = [(g, _zero_if_none(v, x)) for g, v, x in zip(pulled, tangents, leaves) if g.requires_grad]
            if not pairs:
                return torch.zeros_like(probe).detach()
            (out,) = torch.autograd.grad([g for g, _ in pairs], probe, [v for _, v in pairs], allow_unused=True)
        return _zero_if_none(out, probe).detach()

    @staticmethod
    def backward(ctx: Any, cotangent: Tensor) -> tuple:
        return (None, *_LayerVjp.apply(ctx.call, cotangent, *ctx.saved_tensors))


class _LayerVjp(torch.autograd.Function):
    """``J(z)^T g`` of a wrapped module, with its tangent ``J^T dg + d/dz <J(z)^T g, dz>`` by double backward."""

    @staticmethod
    def forward(call: _Call, cotangent: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        with _outside_transforms(), torch.enable_grad():
            _, pulled, _ = call.vjp(tensors, cotangent, create_graph=False)
        return tuple(pulled)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.call = inputs[0]
        ctx.save_for_forward(*inputs[1:])

    @staticmethod
    def jvp(ctx: Any, _call: None, d_cotangent: Tensor | None, *tangents: Tensor | None) -> tuple[Tensor, ...]:
        FALLBACKS[ctx.call.name] += 1
        cotangent, *tensors = ctx.saved_tensors
        with _outside_transforms(), torch.enable_grad():
            leaves, pulled, _ = ctx.call.vjp(tensors, cotangent, create_graph=True)
            pairs = [(g, _zero_if_none(v, x)) for g, v, x in zip(pulled, tangents, leaves) if g.requires_grad]
            second = (torch.autograd.grad([g for g, _ in pairs], leaves, [v for _, v in pairs], allow_unused=True)
                      if pairs else [None] * len(leaves))
            first = ([None] * len(leaves) if d_cotangent is None
                     else ctx.call.vjp(tensors, d_cotangent, create_graph=False)[1])
        return tuple((_zero_if_none(a, x) + _zero_if_none(b, x)).detach() for a, b, x in zip(first, second, leaves))

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor) -> tuple:
        raise NotImplementedError("hypergrad=forward: a module's fallback gradient is not differentiable in reverse mode")


class _Wrapped:
    """Replaces one module's ``forward`` (an instance attribute, removed afterwards) by a call through
    ``_LayerFunction``; inside the function the module's own forward runs (``unwrapped``)."""

    def __init__(self, name: str, module: nn.Module, buffers: dict[str, Tensor | None]):
        self.name, self.module, self.buffers = name, module, buffers
        self.original = module.forward
        self.inside = 0  # > 0 while the module's own forward runs inside _LayerFunction
        module.forward = self

    @contextlib.contextmanager
    def unwrapped(self) -> Iterator[None]:
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.inside:
            return self.original(*args, **kwargs)
        named = list(self.module.named_parameters())  # inside functional_call: the values being differentiated
        template = [None if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
        inputs = [a for a, t in zip(args, template) if t is None]
        if not inputs:
            return self.original(*args, **kwargs)
        call = _Call(self, [n for n, _ in named], template, kwargs, capture_rng(inputs[0].device))
        return _LayerFunction.apply(call, *inputs, *[p for _, p in named])

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.forward


class _LayerFallbacks:
    """The modules of ``net.model`` whose tangents are computed by double backward (``_LayerFunction``)."""

    def __init__(self, net: Unrolled):
        self.net = net
        self.wrapped: dict[str, _Wrapped] = {}

    def __enter__(self) -> "_LayerFallbacks":
        modules = dict(self.net.model.named_modules())
        for name in _KNOWN_CULPRITS.get(self.net.model, []):
            self._wrap(name, modules[name])
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _wrap(self, name: str, module: nn.Module) -> None:
        prefix = f"{name}." if name else ""
        buffers = {n[len(prefix):]: b for n, b in self.net.buffers.items() if n.startswith(prefix)}
        self.wrapped[name] = _Wrapped(name, module, buffers)

    def remove(self) -> None:
        for wrapper in self.wrapped.values():
            wrapper.remove()
        self.wrapped.clear()

    def add_culprits(self, theta: list[Tensor], batch: tuple, error: Exception) -> bool:
        """Find and wrap the modules without a jvp rule; False when none (more) can be found."""
        found = _modules_without_rule(self.net, theta, batch, self)
        if not found:
            return False
        _KNOWN_CULPRITS[self.net.model] = [*_KNOWN_CULPRITS.get(self.net.model, []), *found]
        named = ", ".join(f"{n or '<model>'} ({type(self.wrapped[n].module).__name__})" for n in found)
        warnings.warn(f"hypergrad=forward: no forward-mode (jvp) rule in torch for layer(s) {named}; only their "
                      f"tangents are computed by double backward, every other layer stays in forward mode. torch "
                      f"said: {str(error).splitlines()[0]}", RuntimeWarning, stacklevel=3)
        log.warning("forward mode: per-layer double-backward fallback for %s (%s)", named, _operator_name(str(error)))
        return True


def _modules_without_rule(net: Unrolled, theta: list[Tensor], batch: tuple, layers: _LayerFallbacks) -> list[str]:
    """Modules whose own forward, or the backward of it, has no jvp rule, children before parents
    (a parent is tried with its culprit children already wrapped, so only its own code can fail);
    each culprit is wrapped in ``layers`` as it is found.

    Each module's input is captured by a forward hook during one functional forward pass (private
    buffers, replayed RNG: the model is not changed), then the module is run alone, functionally
    with its share of ``theta``, under ``jvp`` and under ``jvp`` of its input-and-parameter gradient.
    """
    captured: dict[str, tuple[tuple, dict]] = {}
    modules = dict(net.model.named_modules())

    def capture(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:  # None: the output is kept
            captured.setdefault(name, (args, kwargs))
        return hook

    hooks = [module.register_forward_hook(capture(name), with_kwargs=True) for name, module in modules.items()
             if name not in layers.wrapped]
    try:
        with torch.no_grad(), replay_rng(capture_rng(theta[0].device), theta[0].device):
            net.per_gene(theta, batch)
    finally:
        for hook in hooks:
            hook.remove()
    values = dict(zip(net.names, theta))
    found = []
    for name in reversed(list(modules)):  # reversed pre-order: every module after its descendants
        if name in layers.wrapped or name not in captured:
            continue
        args, kwargs = captured[name]
        module, prefix = modules[name], f"{name}." if name else ""
        own = {n[len(prefix):]: v for n, v in values.items() if n.startswith(prefix)}
        buffers = {n[len(prefix):]: b for n, b in net.buffers.items() if n.startswith(prefix)}
        slots = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point()]
        if not slots and not own:
            continue

        def run(inputs: tuple, params: dict) -> Tensor:
            full = list(args)
            for i, x in zip(slots, inputs):
                full[i] = x
            out = functional_call(module, {**params, **buffers}, tuple(full), kwargs)
            return out if isinstance(out, Tensor) else sum(o.sum() for o in out if isinstance(o, Tensor))

        primals = (tuple(args[i] for i in slots), own)
        tangents = (tuple(torch.ones_like(args[i]) for i in slots), {n: torch.ones_like(v) for n, v in own.items()})
        try:
            with torch.no_grad(), replay_rng(capture_rng(theta[0].device), theta[0].device):
                jvp(run, primals, tangents)
                jvp(grad(lambda i, p: run(i, p).sum(), argnums=(0, 1)), primals, tangents)
        except Exception as error:  # noqa: BLE001 - the module ran in the forward above, so a transform failed
            if not _is_missing_rule(error):
                continue
            layers._wrap(name, module)
            found.append(name)
    return found


def _double_backward_step(train_loss: Any, opt: Any, theta: list[Tensor], state: tuple, phi: list[Tensor],
                          d_theta: list[Tensor], d_state: tuple, tangent_phi: list[Tensor], count: int):
    """One step and its tangent without forward-mode rules in the model: a Hessian-vector product
    ``dg = H_theta,theta d_theta + H_theta,phi d_phi`` by double backward, then a ``jvp`` of the
    optimiser's elementwise arithmetic."""
    th = [x.detach().requires_grad_() for x in theta]
    ph = [x.detach().requires_grad_() for x in phi]
    with torch.enable_grad():
        loss, _ = train_loss(th, ph)
        g = torch.autograd.grad(loss, th, create_graph=True, allow_unused=True)
        g = [torch.zeros_like(x) if gi is None else gi for x, gi in zip(th, g)]
        g_phi = grads_of(loss, ph, create_graph=True)
        directional = sum((gi * d).sum() for gi, d in zip(g, d_theta)) + sum((gp * t).sum() for gp, t in zip(g_phi, tangent_phi))
        d_g = grads_of(directional, th, create_graph=False)
    g = [x.detach() for x in g]
    (theta, state), (d_theta, d_state) = jvp(lambda t_, s_, g_: opt.update(t_, g_, s_, count),
                                             (theta, state, g), (d_theta, d_state, d_g))
    return theta, state, d_theta, d_state, loss.detach()
