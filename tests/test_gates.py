"""Gates: registry, weights, read-out consistency, DkGSB mask, annealing and straight-through."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from agl.errors import ConfigError
from agl.selection import GATES, blend_ranks, create_gate

A = 101  # ranks i / 100 are exact in binary-ish steps of 0.01


def _priors(a: int = A) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"hvg": np.linspace(0, 1, a), "mean": rng.random(a)}


def test_registry_and_config_options() -> None:
    from agl.config import TrainConfig, gate_options

    assert set(GATES) >= {"pgl", "agl_all", "topk", "random_k", "uncertainty", "dkgsb"}
    values = dict(k=10, t_init=0.3, tau=0.01, lr=1e-3, epochs=5, seed=3, backbone="x", prior="hvg")
    for name in GATES:
        # a whole config carries every gate's options; each gate gets the ones it declares
        gate = create_gate(name, A, _priors(), **gate_options(TrainConfig.from_dict({**values, "method": name})))
        assert gate.weights().shape == (A,)
        assert gate.k() == len(gate.selected())
    with pytest.raises(ConfigError, match="unknown gate"):
        create_gate("nope", A, _priors())
    with pytest.raises(ConfigError, match="needs k"):
        create_gate("topk", A, _priors())
    with pytest.raises(ConfigError, match="not available"):
        create_gate("dkgsb", A, {"mean": np.zeros(A)})


def test_unknown_or_bad_gate_options_are_errors_naming_the_key() -> None:
    # an option the gate does not declare is never dropped silently
    with pytest.raises(ConfigError, match=r"^lr: gate 'topk' has no option\(s\) lr; its options: .*k"):
        create_gate("topk", A, _priors(), k=3, lr=1e-3)
    with pytest.raises(ConfigError, match=r"^k: gate 'pgl' has no option"):
        create_gate("pgl", A, _priors(), k=3)
    with pytest.raises(ConfigError, match=r"^tau: must be a number in \(0.0, inf\)"):
        create_gate("dkgsb", A, _priors(), tau=0.0)
    with pytest.raises(ConfigError, match=r"^per_gene: .*takes \['bool'\]"):
        create_gate("uncertainty", A, _priors(), per_gene=1)


def test_per_gene_uncertainty_is_reachable_from_a_config() -> None:
    from agl.config import TrainConfig, gate_options

    cfg = TrainConfig.from_dict({"method": "uncertainty", "per_gene": True})
    gate = create_gate(cfg.method, 5, {}, **gate_options(cfg))
    assert gate.per_gene and gate.log_var_aux.shape == (5,)
    assert TrainConfig.from_dict(cfg.to_dict()).per_gene is True


def test_default_loss_is_weighted_mean_with_constant_normaliser() -> None:
    gate = create_gate("dkgsb", 4, {"hvg": np.array([0.0, 1 / 3, 2 / 3, 1.0])}, t_init=0.5, tau=0.1)
    lp, la = torch.tensor([0.2, 0.4]), torch.tensor([1.0, 0.5, 0.3, 0.9])
    w = gate.weights().detach()
    loss = gate.loss(lp, la)
    assert loss.item() == pytest.approx(((lp.sum() + (w * la).sum()) / (2 + w.sum())).item())
    loss.backward()
    # normaliser constant: dL/dt = sum(dw/dt * l_aux) / Z only
    dw = (w * (1 - w) / 0.1)
    assert gate.t.grad.item() == pytest.approx((dw * la).sum().item() / (2 + w.sum()).item(), rel=1e-5)


def test_fixed_gates() -> None:
    pri = _priors()
    assert create_gate("pgl", A, pri).k() == 0 and create_gate("pgl", A, pri).weights().sum() == 0
    assert create_gate("agl_all", A, pri).k() == A
    top = create_gate("topk", A, pri, k=7)
    assert top.selected().tolist() == list(range(7))  # hvg ranks are 0..1 in order
    by_mean = create_gate("topk", A, pri, k=7, prior="mean")
    assert by_mean.selected().tolist() == np.argsort(pri["mean"], kind="stable")[:7].tolist()
    r1, r2 = create_gate("random_k", A, pri, k=9, seed=1), create_gate("random_k", A, pri, k=9, seed=1)
    assert r1.k() == 9 and torch.equal(r1.mask, r2.mask)
    assert not torch.equal(r1.mask, create_gate("random_k", A, pri, k=9, seed=2).mask)


def test_prior_blending_reranks_to_unit_interval() -> None:
    pri = {"hvg": np.array([0.0, 0.5, 1.0, 0.25]), "mean": np.array([1.0, 0.0, 0.5, 0.25])}
    assert blend_ranks(pri, 4, "hvg", "mean", 1.0).tolist() == pytest.approx([0, 2 / 3, 1, 1 / 3])
    # 0.5 * hvg + 0.5 * mean = [0.5, 0.25, 0.75, 0.25] -> ties keep input order
    assert blend_ranks(pri, 4, "hvg", "mean", 0.5).tolist() == pytest.approx([2 / 3, 0, 1, 1 / 3])
    with pytest.raises(ConfigError):
        blend_ranks(pri, 5, "hvg")


def test_dkgsb_mask_readout_and_export_agree() -> None:
    gate = create_gate("dkgsb", A, _priors(), t_init=0.305, tau=0.01)
    w = gate.weights().detach()
    r = gate.ranks
    assert torch.allclose(w, torch.sigmoid((0.305 - r) / 0.01))
    assert gate.k() == int((w > 0.5).sum()) == 31  # r_j = j / 100 < 0.305 for j = 0..30
    assert gate.selected().tolist() == list(range(31))
    assert set(gate.summary()) >= {"k", "t", "tau"}
    for k in (0, 1, 17, A - 1):  # t from k: the read-out starts at exactly k
        assert create_gate("dkgsb", A, _priors(), k=k).k() == k
    gate.t.data.fill_(1.7)
    gate.project_()
    assert gate.t.item() == 1.0 and gate.k() == A - 1


def test_dkgsb_tau_annealing_is_geometric() -> None:
    gate = create_gate("dkgsb", A, _priors(), tau=0.1, tau_final=0.001)
    taus = []
    for step in range(5):
        taus.append(float(gate.tau))
        gate.on_outer_step((step + 1) / 4)  # progress past 1 stays at tau_final
    assert taus[0] == pytest.approx(0.1) and taus[-1] == pytest.approx(0.001)
    ratios = np.array(taus[1:]) / np.array(taus[:-1])
    assert np.allclose(ratios, ratios[0])
    assert "tau" in gate.state_dict()  # the current temperature is saved with checkpoints


def test_dkgsb_straight_through() -> None:
    gate = create_gate("dkgsb", A, _priors(), t_init=0.305, tau=0.05, hard=True)
    w = gate.weights()
    assert set(w.detach().unique().tolist()) == {0.0, 1.0}
    (w * torch.arange(A, dtype=torch.float32)).sum().backward()
    soft = torch.sigmoid((gate.t.detach() - gate.ranks) / 0.05)
    expected = (soft * (1 - soft) / 0.05 * torch.arange(A)).sum()
    assert gate.t.grad.item() == pytest.approx(expected.item(), rel=1e-4)


def test_uncertainty_gate() -> None:
    gate = create_gate("uncertainty", 5, {})
    lp, la = torch.tensor([0.5, 0.7]), torch.tensor([0.9, 0.8, 1.0, 0.6, 0.7])
    assert gate.loss(lp, la).item() == pytest.approx(lp.mean().item() + la.mean().item())
    assert len(gate.inner_parameters()) == 2 and gate.outer_parameters() == []
    with torch.no_grad():
        gate.log_var_aux.fill_(np.log(4.0))
    assert gate.loss(lp, la).item() == pytest.approx(lp.mean().item() + la.mean().item() / 4 + np.log(4.0))
    assert torch.allclose(gate.weights(), torch.full((5,), 0.25))
    per_gene = create_gate("uncertainty", 5, {}, per_gene=True)
    assert per_gene.log_var_aux.shape == (5,) and per_gene.k() == 5
