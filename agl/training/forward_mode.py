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

If some operator of the model has no forward-mode (jvp) rule, the step falls back to the
same tangent by reverse-over-reverse: ``dg = grad_theta(<g, Z_theta> + <dL/dphi, Z_phi>)``
(a Hessian-vector product, Pearlmutter 1994) and a ``jvp`` of the optimiser arithmetic only;
a warning names the operator. The result is the same; the cost is about one more backward pass.
"""
from __future__ import annotations

import logging
import re
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from agl.training.bilevel import Estimate, grads_of, replay_rng, capture_rng, Unrolled, weighted_loss

log = logging.getLogger(__name__)

# Above this many outer scalars the reverse estimators are cheaper (one tangent per scalar here).
MANY_OUTER_SCALARS = 8


class _GateLoss(nn.Module):
    """The gate's weighted loss as a module, so ``functional_call`` can swap its outer parameters."""

    def __init__(self, gate: nn.Module, n_primary: int):
        super().__init__()
        self.gate = gate
        self.n_primary = n_primary

    def forward(self, per_gene: Tensor) -> Tensor:
        return weighted_loss(self.gate, per_gene, self.n_primary)


class ForwardModeUnsupported(RuntimeError):
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
                                                                    "must override", "doesn't support", "NotImplemented"))


def forward_mode(net: Unrolled, gate: nn.Module, opt: Any, train: tuple, val: tuple, n_primary: int,
                 steps: int, outer: list[Tensor]) -> Estimate:
    """Hypergradient of the unrolled objective by forward-mode differentiation (one tangent per outer scalar)."""
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
                                                                   outer_names, phi, tangent_phi)
            else:  # later ones replay the same masks
                with replay_rng(start_rng, device):
                    _, _, derivative = _trajectory(net, gate_loss, opt, train, val, n_primary, steps,
                                                   outer_names, phi, tangent_phi)
            total[j].view(-1)[e] = derivative
            direction += 1
    return outer_loss, inner_losses, total


def _trajectory(net: Unrolled, gate_loss: _GateLoss, opt: Any, train: tuple, val: tuple, n_primary: int, steps: int,
                outer_names: list[str], phi: list[Tensor], tangent_phi: list[Tensor]) -> tuple[float, list[float], Tensor]:
    """``H`` inner steps carrying the tangent along ``tangent_phi``; the validation loss and its derivative."""

    def train_loss(theta: Sequence[Tensor], outer_values: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        per_gene = net.per_gene(theta, train)
        loss = functional_call(gate_loss, dict(zip(outer_names, outer_values)), (per_gene,))
        return loss, loss

    theta = [p.detach() for p in net.params]
    state = tuple([x.detach() for x in xs] for xs in opt.state())
    d_theta = [torch.zeros_like(x) for x in theta]
    d_state = tuple([torch.zeros_like(x) for x in xs] for xs in state)
    inner_losses = []
    fallback = False
    with torch.no_grad():  # torch.func does its own differentiation; no eager graph is needed
        for h in range(steps):
            count = opt.count + h + 1

            def step(th: list[Tensor], st: tuple, ph: list[Tensor]) -> tuple[tuple[list[Tensor], tuple], Tensor]:
                g, loss = grad(train_loss, has_aux=True)(th, ph)
                return opt.update(th, g, st, count), loss

            if not fallback:
                rng = capture_rng(theta[0].device)
                try:
                    (theta_next, state_next), (d_theta, d_state), loss = jvp(
                        step, (theta, state, phi), (d_theta, d_state, tangent_phi), has_aux=True)
                    theta, state = theta_next, state_next
                except (RuntimeError, NotImplementedError) as error:
                    if not _is_missing_rule(error):
                        raise
                    operator = _operator_name(str(error))
                    layers = _layers_without_rule(net, theta, train)
                    if layers:
                        operator = f"{operator} in layer(s) {', '.join(layers)}"
                    warnings.warn(f"hypergrad=forward: {operator} has no forward-mode rule in torch; computing the "
                                  f"tangent by double backward instead (same result, about one more backward pass). "
                                  f"torch said: {str(error).splitlines()[0]}", RuntimeWarning, stacklevel=2)
                    log.warning("forward mode: %s lacks a jvp rule; falling back to double backward", operator)
                    fallback = True
                    with replay_rng(rng, theta[0].device):  # redo this step with the same dropout masks
                        theta, state, d_theta, d_state, loss = _double_backward_step(
                            train_loss, opt, theta, state, phi, d_theta, d_state, tangent_phi, count)
            else:
                theta, state, d_theta, d_state, loss = _double_backward_step(
                    train_loss, opt, theta, state, phi, d_theta, d_state, tangent_phi, count)
            inner_losses.append(float(loss))

        def val_loss(th: list[Tensor]) -> Tensor:
            return net.per_gene(th, val, n_primary).mean()

        if fallback:
            final = [x.detach().requires_grad_() for x in theta]
            with torch.enable_grad():
                value = val_loss(final)
                g_val = grads_of(value, final, create_graph=False)
            derivative = sum((g * d).sum() for g, d in zip(g_val, d_theta))
        else:
            value, derivative = jvp(val_loss, (theta,), (d_theta,))
    return float(value.detach()), inner_losses, torch.as_tensor(derivative).detach()


def _layers_without_rule(net: Unrolled, theta: list[Tensor], batch: tuple) -> list[str]:
    """Leaf modules whose forward, or the backward of it, has no jvp rule (names for the warning).

    Each leaf module's input is captured by a forward hook during one functional forward pass
    (private buffers, replayed RNG: the model is not changed), then the module is run alone
    under ``jvp`` and under ``jvp`` of its input gradient.
    """
    captured: dict[str, tuple[nn.Module, tuple]] = {}

    def capture(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:  # returns None: the output is kept
            captured.setdefault(name, (module, args))
        return hook

    hooks = [module.register_forward_hook(capture(name))
             for name, module in net.model.named_modules() if not any(True for _ in module.children())]
    try:
        with torch.no_grad(), replay_rng(capture_rng(theta[0].device), theta[0].device):
            net.per_gene(theta, batch)
    finally:
        for hook in hooks:
            hook.remove()
    culprits = []
    for name, (module, args) in captured.items():
        floats = tuple(a for a in args if isinstance(a, Tensor) and a.is_floating_point())
        if len(floats) != len(args) or not floats:
            continue
        ones = tuple(torch.ones_like(a) for a in floats)
        try:
            with replay_rng(capture_rng(floats[0].device), floats[0].device):
                jvp(lambda *a: module(*a), floats, ones)
                jvp(lambda *a: grad(lambda *b: module(*b).sum())(*a), floats, ones)
        except Exception:  # noqa: BLE001 - the module ran in the plain forward above, so jvp is what fails
            culprits.append(f"{name} ({type(module).__name__})")
    return culprits


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
