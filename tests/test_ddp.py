"""Data parallel training (2 gloo processes, different spots per rank): DDP ordinary steps, BatchNorm
buffers from rank 0, best epoch and early stopping decided on rank 0 (agl.training.ddp)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from trainkit import first_split, small_config, use_cheap_features

TINY_BN = "test/tiny-bn-cnn"
TIMEOUT_S = 300


def _register_tiny_bn_backbone() -> None:
    """A small CNN with BatchNorm (conv -> BN -> ReLU -> pool), cheap on 32 px patches."""
    from torch import nn

    from agl.models.backbones import BACKBONES, BackboneSpec, register_backbone

    if TINY_BN in BACKBONES:
        return
    build = lambda: nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),  # noqa: E731
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
    register_backbone(TINY_BN)(lambda: BackboneSpec(build=build, dim=8))


def _worker(rank: int, world: int, store: str, out: str, mode: str, use_ddp: bool) -> None:
    """One rank: fit on this rank's spots, write a digest of the whole model (parameters and buffers)."""
    from agl.errors import NonFiniteLossError
    from agl.training import ddp
    from agl.training.bundles import make_bundle
    from agl.training.loop import fit

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=world)
    try:
        ddp.USE_DDP = use_ddp
        if mode == "finetune":
            _register_tiny_bn_backbone()
            cfg = small_config(mode="finetune", backbone=TINY_BN, weights=None, method="topk", k=50, epochs=4,
                               patience=1, batch_size=64, lr=1e-2)
        else:
            use_cheap_features(pytest.MonkeyPatch())
            cfg = small_config(epochs=2)
        data = make_bundle(store, first_split(store), cfg)
        if mode == "nan-on-rank1" and rank == 1:
            _poison_second_batch(data)
        try:
            res = fit(cfg, data)
        except NonFiniteLossError as err:  # every rank must get here, none left waiting in a collective
            (Path(out) / f"rank{rank}.json").write_text(json.dumps({"error": type(err).__name__, "message": str(err)}))
            return
        state = res.model.state_dict()
        digest = hashlib.sha256(b"".join(v.detach().numpy().tobytes() for v in state.values())).hexdigest()
        buffers = hashlib.sha256(b"".join(v.numpy().tobytes() for k, v in state.items() if "running" in k)).hexdigest()
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(
            {"model": digest, "buffers": buffers, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
             "t": float(getattr(res.gate, "t", float("nan"))), "train_rows": len(data.train_rows(0)[0])}))
    finally:
        torch.distributed.destroy_process_group()


def _poison_second_batch(data) -> None:
    """This rank's second training batch gets NaN targets (a NaN in one rank's shard of the store)."""
    batches = data.train_batches

    def poisoned(batch_size, epoch):
        for i, (x, y) in enumerate(batches(batch_size, epoch)):
            yield x, (y * float("nan") if i == 1 else y)

    data.train_batches = poisoned


def run_two_ranks(store: Path, out: Path, mode: str, use_ddp: bool) -> list[dict] | None:
    """Both ranks' results, or None when the ranks did not finish within TIMEOUT_S (a hang)."""
    import torch.multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_worker, args=(2, str(store), str(out), mode, use_ddp), nprocs=2, join=False,
                             start_method="spawn")
    try:
        import time

        deadline = time.monotonic() + TIMEOUT_S
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                return None
    finally:
        for process in ctx.processes:  # a hung rank is ended by its own process id
            if process.is_alive():
                process.kill()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.reliability(kind="fault", case="2 data-parallel ranks with BatchNorm see different spots; patience 1",
                         outcome="no rank hangs; both end with the same weights, BN statistics, best epoch and stop")
def test_ranks_with_batchnorm_and_different_spots_end_with_one_model(small_store, tmp_path):
    ranks = run_two_ranks(small_store, tmp_path / "ddp", "finetune", use_ddp=True)
    assert ranks is not None, "a rank hung in a collective"
    assert ranks[0]["train_rows"] == ranks[1]["train_rows"]  # equal, disjoint shards
    assert ranks[0] == ranks[1]  # same weights, BN statistics, best epoch and stop
    # the hand all-reduce (before DDP) leaves each rank its own BatchNorm statistics
    legacy = run_two_ranks(small_store, tmp_path / "legacy", "finetune", use_ddp=False)
    assert legacy is None or legacy[0]["buffers"] != legacy[1]["buffers"]


def test_ddp_gives_the_model_of_the_hand_all_reduce_where_that_was_right(demo_store, tmp_path):
    """No BatchNorm (features mode): the old flat all-reduce was correct, and DDP gives the same model bit for bit."""
    ddp = run_two_ranks(demo_store, tmp_path / "ddp", "features", use_ddp=True)
    legacy = run_two_ranks(demo_store, tmp_path / "legacy", "features", use_ddp=False)
    assert ddp is not None and legacy is not None
    assert ddp[0] == ddp[1] and ddp[0] == legacy[0] == legacy[1]


@pytest.mark.reliability(kind="fault", case="2 data-parallel ranks; NaN targets in one rank's second batch only",
                         outcome="both ranks stop with the same NonFiniteLossError after the epoch; no rank hangs")
def test_a_nan_loss_on_one_rank_stops_every_rank(demo_store, tmp_path):
    ranks = run_two_ranks(demo_store, tmp_path / "nan", "nan-on-rank1", use_ddp=True)
    assert ranks is not None, "a rank hung in a collective"
    assert [r.get("error") for r in ranks] == ["NonFiniteLossError"] * 2
    assert ranks[0]["message"] == ranks[1]["message"] and "step 2" in ranks[0]["message"]
