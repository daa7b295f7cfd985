"""One training loop for every gene-selection method (``fit``).

Its settings are :class:`agl.config.TrainConfig` (re-exported here).

A method is a gate (``agl.selection``) plugged into the same loop; the loop only
differs by schedule (when the gate's outer parameters get bi-level updates).
The same ``fit`` runs in a plain process, in a Ray Train worker and in a Tune trial:
everything outside the loop talks to it through ``DataBundle`` and ``Reporter``.
"""
from __future__ import annotations

import math
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from agl.config import TrainConfig
from agl.training import checkpoint as ckpt, ddp
from agl.training.checkpoint import LoopState
from agl.training.model import build_model, gate_state, n_outputs
from agl.training.schedules import SCHEDULES, WARMUP_FRACTION, EpochPlan, first_bilevel_epoch, warmup_epochs

__all__ = ["TrainConfig", "LoopState", "Trainer", "FitResult", "fit", "build_model", "n_outputs", "predict",
           "resolve_device", "SCHEDULES", "warmup_epochs"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- interfaces
class DataBundle(Protocol):
    """What ``fit`` reads; ``agl.training.bundles.make_bundle(store, split, cfg)`` builds one."""

    genes: pd.DataFrame
    n_primary: int
    prior_ranks: dict[str, np.ndarray]
    input_dim: int | None

    def train_batches(self, batch_size: int, epoch: int) -> Iterable[tuple[Tensor, Tensor]]: ...
    def val_batches(self, batch_size: int, epoch: int, part: str = "val") -> Iterable[tuple[Tensor, Tensor]]: ...
    def eval_arrays(self, part: str, n_columns: int | None = None) -> tuple[Tensor, np.ndarray, np.ndarray]: ...
    # optional: ``eval_batches(part, batch_size, n_columns)``, eval_arrays in chunks grouped by slide (streamed)


class Reporter(Protocol):
    """Receives per-epoch metrics and, when one was written, the checkpoint folder."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None: ...


@dataclass
class FitResult:
    """What one run produced: history, the best model's test metrics and its gate's selection."""

    config: TrainConfig
    history: list[dict[str, float]]
    best_epoch: int
    best_val_pcc: float
    test: dict[str, Any]
    k: int
    weights: np.ndarray
    selected: np.ndarray
    epochs_run: int
    stopped_early: bool
    wall_time_s: float
    checkpoint_dir: str | None
    model: torch.nn.Module
    gate: Any


# --------------------------------------------------------------------------- schedules
# SCHEDULES, EpochPlan and warmup_epochs are defined in agl.training.schedules (imported above).
def tau_horizon(cfg: TrainConfig, steps_per_pass: int) -> int:
    """Outer steps over which tau anneals to tau_final (``tau_anneal_steps`` when set).

    Annealing is scheduled by outer step, not by epoch, so that it completes even when early
    stopping ends the run long before ``epochs``: by default the horizon is the outer steps of
    the bi-level passes that every run takes before early stopping can trigger (a run stops at
    the earliest at epoch ``patience``), capped by the epoch budget.
    """
    if cfg.tau_anneal_steps is not None:
        return int(cfg.tau_anneal_steps)
    first = first_bilevel_epoch(cfg)
    passes = max(1, min(cfg.epochs - first, cfg.patience - first + 1))
    return passes * max(1, steps_per_pass)


def hypergradient_stats(estimates: list[Tensor]) -> dict[str, float]:
    """Mean, sign agreement and signal-to-noise ratio of single-batch hypergradient estimates.

    Vectors are projected on their mean direction; for a scalar outer parameter (DkGSB's t)
    ``hypergrad_mean`` and ``hypergrad_snr`` keep their sign (negative: towards a larger t,
    i.e. more auxiliary genes).
    """
    nan = float("nan")
    if not estimates or estimates[0].numel() == 0:
        return {"hypergrad_mean": nan, "hypergrad_snr": nan, "hypergrad_sign_agreement": nan}
    e = torch.stack(estimates).double()
    mu = e.mean(0)
    scalar = e.shape[1] == 1
    direction = torch.sign(mu) if scalar else mu / mu.norm().clamp_min(1e-300)
    proj = e @ direction.reshape(-1)
    agreement = float((proj > 0).double().mean()) if float(mu.abs().sum()) > 0 else nan
    std = float(proj.std()) if len(proj) > 1 else nan
    sign = float(torch.sign(mu[0])) if scalar else 1.0
    snr = sign * float(proj.mean()) / std if std and math.isfinite(std) else nan
    return {"hypergrad_mean": float(mu[0]) if scalar else float(mu.norm()),
            "hypergrad_snr": snr, "hypergrad_sign_agreement": agreement}



# --------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    """``auto`` picks the Ray-reserved GPU or CUDA when present, else CPU (``agl.training.device``)."""
    from agl.training.device import resolve_device as resolve

    return resolve(name)


def epoch_seed(seed: int, epoch: int) -> int:
    """One integer per (seed, epoch): dropout and shuffles restart identically after a resume."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def predict(model: torch.nn.Module, x: Tensor, device: torch.device, batch_size: int = 512,
            precision: str = "fp32") -> Tensor:
    """Model outputs for every row of x, in evaluation mode, without gradients (bf16 autocast on CUDA
    with ``precision="bf16"``)."""
    from agl.training.precision import train_autocast

    model.eval()
    outs = []
    with torch.no_grad(), train_autocast(device, precision):
        for start in range(0, len(x), batch_size):
            outs.append(model(x[start:start + batch_size].to(device)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def _gate_scalars(gate: Any) -> dict[str, float]:
    """k, t and tau of the gate (NaN where a gate has no such quantity)."""
    summary = gate.summary() if hasattr(gate, "summary") else {}
    out = {"k": float(gate.k())}
    for key in ("t", "tau"):
        value = summary.get(key)
        out[key] = float(value) if isinstance(value, (int, float, np.floating, np.integer)) else float("nan")
    return out


def check_finite(loss: Tensor | float, what: str, epoch: int, step: int | None, lr: float) -> None:
    """Stop the run at once on a NaN/inf loss (``epoch`` 0-based here, 1-based in the message)."""
    value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
    if not math.isfinite(value):
        from agl.errors import NonFiniteLossError

        raise NonFiniteLossError(what, value, epoch + 1, step, lr)


def first_non_finite(loss: Tensor, step: int, first: Tensor | None) -> Tensor:
    """``first`` (the first step whose loss was not finite, 0: none) updated with ``step``, on the loss's device."""
    bad = torch.where(torch.isfinite(loss.detach()), 0, step)
    if first is None:
        return bad
    return torch.where(first > 0, first, bad)


def _allreduce(params: list[torch.nn.Parameter]) -> None:
    if ddp.world()[1] > 1:
        from agl.training.bilevel import allreduce_gradients

        allreduce_gradients(params)


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# --------------------------------------------------------------------------- the loop
class Trainer:
    """Holds a run's model, gate and optimisers; ``fit`` drives it epoch by epoch."""

    def __init__(self, cfg: TrainConfig, data: DataBundle):
        from agl.training.losses import LOSSES

        self.cfg, self.data = cfg, data
        from agl.training.device import check_available, log_run_device

        self.device = resolve_device(cfg.device)
        check_available(self.device)
        if ddp.world()[0] == 0:
            log_run_device(cfg.device, self.device)
        self.n_primary = int(data.n_primary)
        self.n_out = n_outputs(cfg, len(data.genes), self.n_primary)
        self.model, self.gate = build_model(cfg, data.genes, self.n_primary, data.prior_ranks, data.input_dim)
        self.model.to(self.device)
        if isinstance(self.gate, torch.nn.Module):
            self.gate.to(self.device)
        self.loss_fn = LOSSES[cfg.loss]
        self.inner_params = list(self.model.parameters()) + list(self.gate.inner_parameters())
        self.outer_params = list(self.gate.outer_parameters())
        self.opt = torch.optim.Adam(self.inner_params, lr=cfg.lr)
        from agl.training.precision import autocast_dtype

        # ordinary steps: DDP all-reduces the model's gradients (bucketed, during backward); the gate's
        # inner parameters, outside the model, keep the explicit all-reduce
        self.step_model = ddp.wrap(self.model, self.device)
        self.manual_reduce = (list(self.gate.inner_parameters()) if self.step_model is not self.model
                              else self.inner_params)
        self.autocast = autocast_dtype(self.device, cfg.precision)
        if self.autocast is not None:  # bf16 convolutions run fastest on channels_last tensors
            self.model.to(memory_format=torch.channels_last)
        self.outer_opt = torch.optim.Adam(self.outer_params, lr=cfg.outer_lr) if self.outer_params else None

    def objective(self, pred: Tensor, y: Tensor, all_genes: bool) -> Tensor:
        """Per-gene loss split into primary/auxiliary and combined by the gate (or uniformly in warm-up).

        The loss is taken in float32 (Pearson centring loses the signal in bf16)."""
        per_gene = self.loss_fn(pred.float(), y[:, : self.n_out].float())
        if all_genes:
            return per_gene.mean()
        return self.gate.loss(per_gene[: self.n_primary], per_gene[self.n_primary:])

    def train_epoch(self, epoch: int, all_genes: bool) -> tuple[float, int]:
        """One pass of ordinary training (gate outer parameters frozen); returns (mean loss, spots seen)."""
        from agl.training.precision import train_autocast
        from agl.training.prefetch import prefetch

        self.model.train()
        total, n_batches, n_spots = torch.zeros((), device=self.device), 0, 0
        # alone on a CPU a NaN/inf loss stops the step at once (checking is free); on an accelerator or with
        # other ranks the first bad step is kept on the device and shared once per epoch, so no rank stops alone
        immediate = self.device.type == "cpu" and ddp.world()[1] == 1
        first_bad = None  # the first step whose loss was NaN/inf, a device tensor (0: none yet)
        # batches built on a background thread (pinned, non_blocking copies on CUDA)
        for x, y in prefetch(self.data.train_batches(self.cfg.batch_size, epoch), self.device):
            self.opt.zero_grad(set_to_none=True)
            with train_autocast(self.device, self.cfg.precision):
                pred = self.step_model(_channels_last(x) if self.autocast is not None else x)
            loss = self.objective(pred, y, all_genes)
            if immediate:  # before the step spoils the weights
                check_finite(loss, "training loss", epoch, n_batches + 1, self.cfg.lr)
            else:  # no host sync per step
                first_bad = first_non_finite(loss, n_batches + 1, first_bad)
            loss.backward()
            _allreduce(self.manual_reduce)
            self.opt.step()
            total += loss.detach()  # summed on the device: no host sync per step
            n_batches += 1
            n_spots += len(x)
        if self.step_model is not self.model:
            from agl.training.ddp import broadcast_buffers

            broadcast_buffers(self.model, self.device)  # BN statistics drifted per rank: evaluate rank 0's
        if not immediate:  # one sync per epoch; the last good checkpoint is the epoch before
            from agl.training.ddp import earliest_over_ranks

            bad_step = earliest_over_ranks(0 if first_bad is None else int(first_bad), self.device)
            if bad_step > 0:
                check_finite(float("nan"), "training loss", epoch, bad_step, self.cfg.lr)
        return float(total) / max(n_batches, 1), n_spots

    def outer_part(self) -> str:
        """The part whose primary loss the outer parameters minimise: ``val_outer`` when the split has one."""
        parts = getattr(self.data, "parts", {})
        return "val_outer" if len(parts.get("val_outer", ())) else "val"

    def steps_per_pass(self) -> int:
        """Outer steps of one bi-level pass: ``outer_steps``, else one pass over the training spots."""
        if self.cfg.outer_steps is not None:
            return int(self.cfg.outer_steps)
        bs = self.cfg.bilevel_batch_size
        if hasattr(self.data, "train_rows"):
            n_batches = max(1, math.ceil(len(self.data.train_rows(0)[0]) / bs))
        else:
            n_batches = sum(1 for _ in self.data.train_batches(bs, 0))
        return max(1, n_batches // self.cfg.hypergrad_batches)

    def bilevel_pass(self, epoch: int, outer_steps_done: int = 0) -> dict[str, float]:
        """Outer steps on the gate (hypergradient of the outer-validation primary loss); returns their statistics.

        Each outer step averages the hypergradients of ``hypergrad_batches`` training batches. The
        statistics are over the single-batch estimates of this pass, so a reader can tell signal
        from noise: ``hypergrad_sign_agreement`` is the share of estimates with the sign of their
        mean, ``hypergrad_snr`` their mean over their sample standard deviation.
        """
        from agl.config import estimator_options
        from agl.training.bilevel import hypergradient

        cfg = self.cfg
        bs = cfg.bilevel_batch_size
        options = estimator_options(cfg)
        part = self.outer_part()
        if cfg.outer_val == "full":
            # the whole outer-validation part in one batch (by design): its inputs and only its primary genes'
            # targets, the only ones an outer loss reads (per_gene(..., val, n_primary) in every estimator), so it
            # holds part x (input dim + primary genes), not part x every output (1.9 GB at 34k spots x 13,949 genes)
            xv, yv, _ = self.data.eval_arrays(part, n_columns=self.n_primary)
            full_val = (xv.to(self.device), torch.as_tensor(np.asarray(yv)[:, : self.n_primary]).to(self.device))
            val_iter: Iterator[tuple[Tensor, Tensor]] = iter(lambda: full_val, None)
        else:
            val_iter = _cycle(lambda e: self.data.val_batches(bs, e, part), epoch, part)
        train_iter = _cycle(lambda e: self.data.train_batches(bs, e), epoch, "train")
        n_steps = self.steps_per_pass()
        horizon = tau_horizon(cfg, n_steps)
        estimates: list[Tensor] = []
        self.model.train()
        for step in range(n_steps):
            self.outer_opt.zero_grad(set_to_none=True)
            batch_grads = []
            for _ in range(cfg.hypergrad_batches):
                xt, yt = next(train_iter)
                xv, yv = next(val_iter)
                out = hypergradient(self.model, self.gate, self.loss_fn,
                                    (xt.to(self.device), yt[:, : self.n_out].to(self.device)),
                                    (xv.to(self.device), yv[:, : self.n_out].to(self.device)),
                                    self.n_primary, inner_steps=cfg.inner_steps, inner_lr=cfg.lr,
                                    inner_optimizer=cfg.inner_optimizer, first_order=cfg.first_order,
                                    optimizer=self.opt, method=cfg.hypergrad, inner_state=cfg.inner_state,
                                    estimator_options=options, accumulate=False)
                flat = torch.cat([g.reshape(-1) for g in out["hypergrad"]]) if out["hypergrad"] else torch.zeros(0)
                estimates.append(flat.detach().cpu())
                batch_grads.append(out["hypergrad"])
            for i, p in enumerate(self.outer_params):
                p.grad = torch.stack([g[i] for g in batch_grads]).mean(0)
            _allreduce(self.outer_params)
            self.outer_opt.step()
            self.gate.project_()
            self.gate.on_outer_step(min((outer_steps_done + step + 1) / horizon, 1.0))
        return {"outer_steps": float(n_steps), **hypergradient_stats(estimates)}

    def evaluate(self, part: str) -> tuple[dict[str, Any], float]:
        """Metrics over the primary genes of one part, and its mean primary loss."""
        from agl.evaluation.metrics import StreamingMetrics, evaluate_predictions

        if hasattr(self.data, "eval_batches") and self.cfg.loss in ("pcc", "mse"):
            # streamed in chunks, metrics summed per slide and gene: nothing of size spots x genes
            names = list(self.data.genes["gene"].iloc[: self.n_primary])
            metrics = StreamingMetrics(names)
            for x, y, slide_ids in self.data.eval_batches(part, n_columns=self.n_primary):
                pred = predict(self.model, x, self.device, precision=self.cfg.precision)[:, : self.n_primary]
                metrics.update(pred.numpy(), y, slide_ids)
            return metrics.result(), metrics.loss(self.cfg.loss)
        x, y, slide_ids = self.data.eval_arrays(part)
        pred = predict(self.model, x, self.device, precision=self.cfg.precision)[:, : self.n_primary]
        target = torch.as_tensor(np.asarray(y)[:, : self.n_primary], dtype=torch.float32)
        loss = float(self.loss_fn(pred, target).mean())
        names = list(self.data.genes["gene"].iloc[: self.n_primary])
        return evaluate_predictions(pred.numpy(), target.numpy(), np.asarray(slide_ids), names), loss

    def snapshot(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return _clone_state(self.model.state_dict()), _clone_state(gate_state(self.gate))

    def load_snapshot(self, model_state: dict[str, Tensor], gate_state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(model_state)
        if gate_state:
            self.gate.load_state_dict(gate_state)


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _clone_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _cycle(make: Callable[[int], Iterable[tuple[Tensor, Tensor]]], epoch: int,
           part: str = "val") -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of one part for outer steps, reshuffled each time the part runs out."""
    round_ = 0
    while True:
        empty = True
        for batch in make(epoch * 1000 + round_):
            empty = False
            yield batch
        if empty:
            raise ValueError(f"the {part} part has no spots; bi-level selection needs {part} data")
        round_ += 1


def fit(cfg: TrainConfig, data: DataBundle, reporter: Reporter | None = None,
        resume_from: str | Path | None = None, out_dir: str | Path | None = None) -> FitResult:
    """Train one run: ``cfg.method``'s gate, early stopping on validation PCC, test metrics of the best epoch.

    ``out_dir``: when given (and on rank 0), ``out_dir/checkpoint`` is rewritten atomically every
    epoch and handed to ``reporter``. ``resume_from``: a checkpoint folder; training continues at its
    next epoch and reproduces the uninterrupted run.
    """
    cfg.validate()
    from agl.selection import GATES

    fitter = GATES[cfg.method].fitter
    if fitter is not None:  # fitted in closed form on the same bundle (the gate's trait), scored the same way
        import importlib

        module, _, name = fitter.partition(":")
        return getattr(importlib.import_module(module), name)(cfg, data)
    rank, world = ddp.world()
    tr = Trainer(cfg, data)
    state = LoopState()
    if resume_from is not None:
        state = ckpt.restore(resume_from, tr, cfg)
    ckpt_dir = Path(out_dir) / "checkpoint" if out_dir is not None and rank == 0 else None
    schedule = SCHEDULES[cfg.schedule]
    started = time.perf_counter() - state.elapsed_s
    stopped_early = False
    epoch_times: list[float] = []
    for epoch in range(state.next_epoch, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(epoch_seed(cfg.seed, epoch))
        plan = schedule(epoch, cfg)
        outer_stats: dict[str, float] = {"outer_steps": 0.0}  # hypergrad_* only for epochs with outer steps
        if plan.bilevel and tr.outer_opt is not None:
            done = int(sum(row.get("outer_steps", 0) or 0 for row in state.history))
            outer_stats = tr.bilevel_pass(epoch, done)
        n_outer = int(outer_stats.get("outer_steps", 0))
        train_loss, n_spots = tr.train_epoch(epoch, plan.all_genes)
        tr.gate.on_epoch_end(epoch, cfg.epochs)
        val_metrics, val_loss = tr.evaluate("val")
        # rank 0's values decide best epoch and early stopping on every rank (no rank waits alone in a collective)
        from agl.training.ddp import from_rank0

        val_pcc, val_loss = from_rank0([float(val_metrics["pcc"]), val_loss], tr.device)
        check_finite(val_loss, "validation loss", epoch, None, cfg.lr)
        if val_pcc > state.best_val_pcc or state.best_epoch < 0:
            state.best_val_pcc, state.best_epoch = val_pcc, epoch
            state.best_model, state.best_gate = tr.snapshot()
        epoch_time = time.perf_counter() - t0
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_pcc": val_pcc,
                   "best_val_pcc": state.best_val_pcc, **_gate_scalars(tr.gate), "epoch_time_s": epoch_time,
                   **outer_stats}
        state.history.append(metrics)
        state.next_epoch = epoch + 1
        state.elapsed_s = time.perf_counter() - started
        epoch_times.append(epoch_time)
        stop = epoch - state.best_epoch >= cfg.patience
        written = None
        if ckpt_dir is not None:
            written = str(ckpt.save_checkpoint(ckpt_dir, tr, cfg, state, data))
        if reporter is not None:
            reporter.report(dict(metrics), written)
        if rank == 0:
            remaining = (cfg.epochs - epoch - 1) * float(np.mean(epoch_times[-5:]))
            log.info("epoch %d/%d %s: train_loss %.4f val_pcc %.4f (best %.4f @%d) k %d%s | %.1f s, %.0f spots/s, ETA %s",
                     epoch + 1, cfg.epochs, cfg.method, train_loss, val_pcc, state.best_val_pcc, state.best_epoch + 1,
                     metrics["k"], f" outer {n_outer}" if n_outer else "", epoch_time,
                     n_spots * world / max(epoch_time, 1e-9), _format_eta(0 if stop else remaining))
        if stop:
            stopped_early = True
            break
    if ckpt_dir is not None and resume_from is not None and not ckpt_dir.exists():
        # resumed after its last epoch (killed before reporting the end): no epoch wrote a checkpoint
        shutil.copytree(resume_from, ckpt_dir)
    tr.load_snapshot(state.best_model, state.best_gate)
    test_metrics, _ = tr.evaluate("test")
    with torch.no_grad():
        weights = tr.gate.weights().detach().cpu().numpy().astype(np.float32)
        selected = tr.gate.selected().cpu().numpy()
    return FitResult(
        config=cfg, history=state.history, best_epoch=state.best_epoch, best_val_pcc=state.best_val_pcc,
        test=test_metrics, k=int(tr.gate.k()), weights=weights, selected=selected,
        epochs_run=state.next_epoch, stopped_early=stopped_early, wall_time_s=time.perf_counter() - started,
        checkpoint_dir=None if ckpt_dir is None else str(ckpt_dir), model=tr.model, gate=tr.gate)
