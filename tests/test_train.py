"""The training loop on the real demo store: config checks, determinism, resume, early stopping, gates."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from agl.training.bundles import make_bundle
from agl.errors import ConfigError
from agl.training.loop import SCHEDULES, TrainConfig, fit, warmup_epochs
from trainkit import cheap_bundle, first_split, small_config, use_cheap_features


@pytest.fixture(scope="module")
def base_bundle(demo_store):
    with cheap_bundle(demo_store) as bundle:
        yield bundle


@pytest.fixture
def bundle_of(base_bundle):
    """A fresh bundle for a config (shares the read-only arrays of one module-wide bundle)."""
    return lambda cfg, **kw: dataclasses.replace(base_bundle, seed=cfg.seed, **kw)


class Recorder:
    def __init__(self, stop_after: int | None = None):
        self.rows, self.checkpoints, self.stop_after = [], [], stop_after

    def report(self, metrics, checkpoint_dir=None):
        self.rows.append(dict(metrics))
        self.checkpoints.append(checkpoint_dir)
        if self.stop_after is not None and metrics["epoch"] == self.stop_after:
            raise KeyboardInterrupt("simulated crash")


# --------------------------------------------------------------------------- config
def test_config_round_trip_and_defaults():
    cfg = TrainConfig.from_dict({"method": "topk", "k": 100, "trunk": (64, 32)})
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.trunk == [64, 32]
    # features mode (the default) takes DkGSB's larger outer budget; finetune mode keeps the settings' own defaults
    assert TrainConfig().to_dict()["outer_lr"] == 0.01 and TrainConfig().outer_steps == 10
    finetune = TrainConfig(mode="finetune")
    assert (finetune.outer_lr, finetune.outer_val, finetune.bilevel_batch_size, finetune.outer_steps,
            finetune.hypergrad_batches) == (3e-3, "batch", 64, None, 1)
    assert TrainConfig.from_dict({"outer_lr": 0.05}).outer_lr == 0.05          # given explicitly: kept


@pytest.mark.parametrize("values, key", [
    ({"methd": "pgl"}, "methd"),
    ({"method": "lasso"}, "method"),
    ({"k": -1}, "k"),
    ({"k": 2.5}, "k"),
    ({"tau": 0}, "tau"),
    ({"lr": "fast"}, "lr"),
    ({"hard": "yes"}, "hard"),
    ({"trunk": [512, 0]}, "trunk"),
    ({"schedule": "cosine"}, "schedule"),
    ({"prior_weight": 1.5}, "prior_weight"),
    ({"epochs": True}, "epochs"),
    ({"loss": "huber"}, "loss"),
    ({"dropout": 1.0}, "dropout"),
])
def test_config_rejects_bad_values_naming_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_dict(values, source="cfg.yaml")


# --------------------------------------------------------------------------- bundle
def test_bundle_shards_are_disjoint_and_seeded(bundle_of):
    cfg = small_config()
    full = bundle_of(cfg)
    x_eval, y_eval, slides = full.eval_arrays("val")
    assert len(x_eval) == len(y_eval) == len(slides) == len(full.parts["val"])
    assert full.genes["role"].iloc[: full.n_primary].eq("primary").all()
    assert set(full.prior_ranks) >= {"hvg"} and len(full.prior_ranks["hvg"]) == len(full.genes) - full.n_primary
    shards = [bundle_of(cfg, rank=r, world_size=2) for r in (0, 1)]
    rows = [set(b.train_rows(3)[0]) for b in shards]
    assert len(rows[0]) == len(rows[1]) == len(full.parts["train"]) // 2
    assert not rows[0] & rows[1] and rows[0] | rows[1] <= set(full.parts["train"])
    ys = [torch.cat([y for _, y in b.train_batches(64, 3)]) for b in shards]
    assert len(ys[0]) == len(rows[0])
    again = torch.cat([x for x, _ in bundle_of(cfg).train_batches(64, 3)])
    same = torch.cat([x for x, _ in full.train_batches(64, 3)])
    other = torch.cat([x for x, _ in full.train_batches(64, 4)])
    assert torch.equal(again, same) and not torch.equal(same, other)


def test_training_batches_draw_dihedral_views(bundle_of):
    data = bundle_of(small_config())
    feats = data.inputs.features
    x, _ = next(iter(data.train_batches(len(data.parts["train"]), 0)))
    # each training row equals the cached feature of some view; views other than 0 occur
    views = [int(torch.nonzero((feats[:, :, :] == row).all(-1).any(-1)).flatten()[0]) for row in x[:40]]
    assert len(set(views)) > 1
    x_eval, _, _ = data.eval_arrays("test")
    assert torch.equal(x_eval, feats[0, torch.as_tensor(data.parts["test"])])


# --------------------------------------------------------------------------- the loop
def test_same_config_gives_identical_history(bundle_of):
    cfg = small_config(epochs=2)
    a, b = fit(cfg, bundle_of(cfg)), fit(cfg, bundle_of(cfg))
    assert a.history[0]["val_pcc"] == b.history[0]["val_pcc"]
    for ra, rb in zip(a.history, b.history):
        assert {k: v for k, v in ra.items() if k != "epoch_time_s"} == pytest.approx(
            {k: v for k, v in rb.items() if k != "epoch_time_s"}, abs=0, rel=0, nan_ok=True)
    assert a.test["pcc"] == b.test["pcc"]
    assert fit(cfg.replace(seed=1), bundle_of(cfg.replace(seed=1))).history[-1]["val_pcc"] != a.history[-1]["val_pcc"]


def test_resume_reproduces_an_uninterrupted_run(bundle_of, tmp_path):
    cfg = small_config(epochs=4, tau_final=0.002)
    full = fit(cfg, bundle_of(cfg))
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, bundle_of(cfg), reporter=Recorder(stop_after=1), out_dir=tmp_path)
    resumed = fit(cfg, bundle_of(cfg), resume_from=tmp_path / "checkpoint")
    assert len(resumed.history) == len(full.history) == 4
    for ra, rb in zip(full.history, resumed.history):
        for key in ("train_loss", "val_loss", "val_pcc", "k", "t", "tau"):
            assert ra[key] == rb[key], key
    assert resumed.test["pcc"] == full.test["pcc"]
    assert torch.equal(resumed.gate.t.detach(), full.gate.t.detach())


def test_resume_after_the_last_epoch_still_yields_a_checkpoint(bundle_of, tmp_path):
    """A run killed after its last epoch but before it reported the end (a sweep driver SIGKILLed)
    resumes with nothing left to train; its output folder must still get the checkpoint."""
    cfg = small_config(epochs=2)
    done = fit(cfg, bundle_of(cfg), out_dir=tmp_path / "first")
    resumed = fit(cfg, bundle_of(cfg), resume_from=tmp_path / "first" / "checkpoint", out_dir=tmp_path / "again")
    assert resumed.history == done.history and resumed.test["pcc"] == done.test["pcc"]
    from agl.training.checkpoint import load_checkpoint

    assert load_checkpoint(resumed.checkpoint_dir).state["next_epoch"] == 2


def test_early_stopping_and_best_model_selection(bundle_of, tmp_path):
    cfg = small_config(method="agl_all", epochs=30, patience=2, lr=0.05)
    rec = Recorder()
    res = fit(cfg, bundle_of(cfg), reporter=rec, out_dir=tmp_path)
    assert res.stopped_early and res.epochs_run < 30
    assert res.epochs_run == res.best_epoch + cfg.patience + 1
    pccs = [r["val_pcc"] for r in res.history]
    assert res.best_val_pcc == max(pccs) and int(np.argmax(pccs)) == res.best_epoch
    assert [r["best_val_pcc"] for r in rec.rows] == list(np.maximum.accumulate(pccs))
    assert all(c is not None for c in rec.checkpoints)
    assert set(rec.rows[0]) == {"epoch", "train_loss", "val_loss", "val_pcc", "best_val_pcc", "k", "t", "tau", "epoch_time_s",
                                "outer_steps"}
    # the returned model is the best epoch's: its validation PCC is the best one
    from agl.training.checkpoint import load_model
    from agl.evaluation.metrics import evaluate_predictions
    model, _, _, genes = load_model(tmp_path / "checkpoint")
    data = bundle_of(cfg)
    x, y, slides = data.eval_arrays("val")
    with torch.no_grad():
        pred = model(x).numpy()[:, : data.n_primary]
    val = evaluate_predictions(pred, y[:, : data.n_primary], slides, list(genes["gene"][: data.n_primary]))
    assert val["pcc"] == pytest.approx(res.best_val_pcc, abs=1e-6)


def test_dkgsb_threshold_moves_and_k_is_reported(bundle_of):
    cfg = small_config(epochs=3, outer_lr=0.05)
    rec = Recorder()
    res = fit(cfg, bundle_of(cfg), reporter=rec)
    ts = [r["t"] for r in rec.rows]
    ks = [r["k"] for r in rec.rows]
    assert ts[0] == pytest.approx(0.5)  # epoch 0 trains only; bi-level passes start at epoch 1
    assert ts[-1] != ts[0] and ks[-1] != ks[0]
    assert res.k == int(ks[res.best_epoch])  # the returned gate is the best epoch's
    assert len(res.selected) == res.k and res.weights.shape == (len(res.gate.ranks),)


def test_pgl_ignores_auxiliary_targets(bundle_of):
    cfg = small_config(method="pgl", epochs=2)
    plain = bundle_of(cfg)
    noisy = bundle_of(cfg)
    rng = np.random.default_rng(0)
    noisy.targets = noisy.targets[np.arange(len(noisy.targets))]  # a writable dense copy
    noisy.targets[:, noisy.n_primary:] = rng.normal(size=noisy.targets[:, noisy.n_primary:].shape).astype(np.float32)
    a, b = fit(cfg, plain), fit(cfg, noisy)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name
    # the same perturbation does change a model that learns from auxiliary genes
    cfg_all = cfg.replace(method="agl_all")
    c, d = fit(cfg_all, bundle_of(cfg_all)), fit(cfg_all, noisy)
    assert not torch.equal(c.model.trunk[0].weight, d.model.trunk[0].weight)


def test_warmstart_schedule_trains_all_genes_first(bundle_of):
    cfg = small_config(epochs=5, schedule="warmstart", outer_lr=0.05)
    warm = warmup_epochs(cfg)
    plans = [SCHEDULES["warmstart"](e, cfg) for e in range(cfg.epochs)]
    assert [p.all_genes for p in plans] == [e < warm for e in range(cfg.epochs)]
    rec = Recorder()
    fit(cfg, bundle_of(cfg), reporter=rec)
    ts = [r["t"] for r in rec.rows]
    assert all(t == pytest.approx(0.5) for t in ts[:warm]) and ts[-1] != pytest.approx(0.5)


@pytest.mark.parametrize("method, extra", [("topk", {"k": 100}), ("random_k", {"k": 100}), ("uncertainty", {}),
                                           ("dkgsb", {"hard": True}), ("dkgsb", {"first_order": True}),
                                           ("dkgsb", {"hypergrad": "forward"}), ("dkgsb", {"hypergrad": "checkpointed"})])
def test_every_method_runs_one_epoch(bundle_of, method, extra):
    cfg = small_config(method=method, epochs=2, **extra)
    res = fit(cfg, bundle_of(cfg))
    assert math.isfinite(res.test["pcc"]) and len(res.history) == 2
    if method in ("topk", "random_k"):
        assert res.k == 100


def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    """One rank of a 2-process gloo run (top-level so torch.multiprocessing can spawn it)."""
    import hashlib
    from pathlib import Path

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=world)
    try:
        mp = pytest.MonkeyPatch()
        use_cheap_features(mp)
        cfg = small_config(epochs=2)
        data = make_bundle(store, first_split(store), cfg)  # rank/world_size from torch.distributed
        res = fit(cfg, data, out_dir=Path(out) / f"rank{rank}")
        digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in res.model.state_dict().values())).hexdigest()
        (Path(out) / f"rank{rank}.txt").write_text(f"{digest} {float(res.gate.t):.9f} {len(data.train_rows(0)[0])}")
    finally:
        torch.distributed.destroy_process_group()


def test_data_parallel_ranks_stay_in_sync(demo_store, tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(demo_store), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = ((tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert r0 == r1  # same weights and threshold on both ranks: gradients and hypergradients were averaged
    assert (tmp_path / "rank0" / "checkpoint" / "model.safetensors").is_file()
    assert not (tmp_path / "rank1").exists()  # only rank 0 writes files


def test_finetune_bundle_batches_are_the_views_of_the_store_patches(small_store):
    """Fine-tuning batches: store patch -> the drawn dihedral view -> ImageNet normalisation, per spot."""
    from agl.data.augment import dihedral
    from agl.data.loaders import IMAGENET_MEAN, IMAGENET_STD
    from agl.data.store import open_store

    store = open_store(small_store)
    data = make_bundle(store, first_split(small_store), small_config(mode="finetune"))
    rows, views = data.train_rows(epoch=3)
    assert len(set(views.tolist())) > 1  # several views drawn, so a view mix-up would show
    x, y = next(iter(data.train_batches(batch_size=16, epoch=3)))
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    for i in range(len(x)):
        view = np.ascontiguousarray(dihedral(np.asarray(store.patches[rows[i]]), int(views[i])))
        expected = (view.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std
        np.testing.assert_allclose(x[i].numpy(), expected, atol=1e-5)
        np.testing.assert_array_equal(y[i].numpy(), data.targets[rows[i]])
