"""Ray Train on the real demo store: in-process mode, 2 CPU workers reading Ray Data shards,
and recovery from a SIGKILLed worker (resume from the last checkpoint)."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agl.training.checkpoint import load_model
from agl.distributed.train import build_trainer, run_train
from agl.errors import ConfigError
from agl.training.loop import TrainConfig

SPLIT = "kfold-s0-f0"


def small_cfg(**changes) -> TrainConfig:
    return TrainConfig.from_dict({"method": "dkgsb", "k": 64, "epochs": 2, "patience": 50, "trunk": [32],
                                  "inner_steps": 1, "batch_size": 64, "bilevel_batch_size": 32, **changes})


def read_result(checkpoint) -> dict:
    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / "result.json").read_text())


def test_in_process_mode_writes_a_loadable_checkpoint(ray_local, demo_store: Path, tmp_path: Path) -> None:
    result = run_train(small_cfg(), demo_store, SPLIT, {"num_workers": 0}, tmp_path, name="local")
    m = result.metrics
    assert m["final"] and m["epochs_run"] == 2 and -1 <= m["test_pcc"] <= 1
    with result.checkpoint.as_directory() as folder:
        model, gate, cfg, genes = load_model(folder)  # safetensors + JSON, no unpickling
        table = pd.read_csv(Path(folder) / "gene_set.csv")
    selected = table[(table["role"] == "auxiliary") & table["selected"]]
    assert cfg.k == 64 and len(selected) == m["final_k"] == gate.k()
    assert list(table.columns) == ["gene", "role", "prior_rank", "final_weight", "selected"]
    assert set(selected["gene"]) <= set(genes["gene"].iloc[int((genes["role"] == "primary").sum()):])


def test_a_diverging_sweep_run_ends_with_a_diverged_report(ray_local, demo_store: Path, tmp_path: Path) -> None:
    """report_divergence (a sweep trial): a NonFiniteLossError ends the run once with a diverged report (val_pcc
    NaN, the message), so Train does not restart it and Tune does not retry it; without it the run fails as before."""
    result = run_train(small_cfg(lr=1e30, method="topk"), demo_store, SPLIT, {"num_workers": 0}, tmp_path,
                       name="diverging", report_divergence=True)
    m = result.metrics
    assert result.error is None and m["diverged"] is True and not m["final"] and np.isnan(m["val_pcc"])
    assert m["error"].startswith("NonFiniteLossError: ") and "lr is 1e+30" in m["error"]


def test_two_workers_read_ray_data_shards(ray_local, demo_store: Path, tmp_path: Path) -> None:
    # Ray Data readers need CPUs too: 0.5 CPU per worker leaves one for them on 2 cores
    result = run_train(small_cfg(), demo_store, SPLIT,
                       {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}}, tmp_path, name="raydata",
                       data="ray_data", failure_max=0)
    assert result.error is None
    history = read_result(result.checkpoint)["history"]
    assert len(history) == 2
    # both epochs trained on real batches (an empty shard would leave train_loss at 0)
    assert all(0 < h["train_loss"] < 2 for h in history)
    assert np.isfinite(result.metrics["test_pcc"])


@pytest.mark.reliability(kind="fault", case="a Ray Train worker is SIGKILLed mid-run",
                         outcome="Ray Train restarts the worker group; fit resumes from the last checkpoint and runs every epoch")
def test_killed_worker_resumes_from_last_checkpoint(ray_local, demo_store: Path, tmp_path: Path) -> None:
    epochs = 25
    pids = tmp_path / "pids"
    storage = tmp_path / "storage"
    trainer = build_trainer(small_cfg(epochs=epochs), demo_store, SPLIT, {"num_workers": 2}, storage,
                            name="kill", failure_max=2, pid_dir=pids)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=trainer.fit()), daemon=True)
    thread.start()
    deadline = time.time() + 300
    # a checkpoint is registered once the report barrier after it completes: when the third
    # checkpoint folder appears, the first two are registered (older ones may be pruned)
    seen: set[str] = set()
    while time.time() < deadline and not (len(list(pids.glob("rank*.pid"))) >= 2 and len(seen) >= 3):
        seen.update(p.name for p in (storage / "kill").glob("checkpoint_*"))
        time.sleep(0.1)
    victim = sorted(pids.glob("rank1-*.pid"))
    assert victim, "rank 1 never started"
    assert thread.is_alive(), "training ended before the kill; raise epochs"
    os.kill(int(victim[0].read_text()), signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    result = box["result"]
    assert result.error is None
    # a new worker group started (new PIDs) and resumed from a checkpoint, then finished every epoch
    assert len(list(pids.glob("rank*.pid"))) >= 4
    assert result.metrics["resumed_from_epoch"] >= 1
    summary = read_result(result.checkpoint)
    assert [h["epoch"] for h in summary["history"]] == list(range(1, epochs + 1))  # 1-based in the record


def test_scaling_config_is_checked() -> None:
    from agl.distributed.train import scaling_config

    with pytest.raises(ConfigError, match="num_workers"):
        scaling_config({"num_workers": -1})
    with pytest.raises(ConfigError, match="unknown key"):
        scaling_config({"workers": 2})
    assert scaling_config({"num_workers": 2, "use_gpu": False}).num_workers == 2
