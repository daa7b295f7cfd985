"""Checkpoints: round trip, every refusal case, and a malicious pickle that must never run."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agl.training.bundles import make_bundle
from agl.training.checkpoint import check_compatible, load_checkpoint, load_model, restore
from agl.errors import CheckpointError
from agl.training.loop import Trainer, fit
from trainkit import first_split, small_config, use_cheap_features


@pytest.fixture(scope="module")
def trained(demo_store, tmp_path_factory):
    """One short DkGSB run with a checkpoint (module-scoped: shared by the tests below)."""
    mp = pytest.MonkeyPatch()
    use_cheap_features(mp)
    cfg = small_config(epochs=2)
    data = make_bundle(demo_store, first_split(demo_store), cfg)
    out = tmp_path_factory.mktemp("run")
    result = fit(cfg, data, out_dir=out)
    yield {"cfg": cfg, "data": data, "result": result, "ckpt": out / "checkpoint"}
    mp.undo()


@pytest.fixture
def ckpt_copy(trained, tmp_path) -> Path:
    dst = tmp_path / "checkpoint"
    shutil.copytree(trained["ckpt"], dst)
    return dst


def test_layout_and_round_trip(trained):
    ck = load_checkpoint(trained["ckpt"])
    names = {p.name for p in trained["ckpt"].iterdir()}
    assert names == {"model.safetensors", "gate.safetensors", "optimizer.safetensors", "best.safetensors",
                     "state.json", "config.json", "genes.parquet", "store.json"}
    assert ck.config == trained["cfg"]
    assert ck.state["next_epoch"] == 2 and len(ck.state["history"]) == 2
    assert list(ck.genes["gene"]) == list(trained["data"].genes["gene"])
    assert ck.store["manifest_sha256"] and ck.store["split"] == trained["data"].split
    patch = trained["data"].manifest["patch"]
    assert ck.store["patch"] == {k: patch[k] for k in ("patch_um", "patch_px", "border")}
    model, gate, cfg, genes = load_model(trained["ckpt"])
    res = trained["result"]
    for (name, a), b in zip(model.state_dict().items(), res.model.state_dict().values()):
        assert torch.equal(a, b), name  # load_model gives the best epoch's model, as fit returned it
    assert torch.equal(gate.t.detach(), res.gate.t.detach()) and gate.k() == res.k
    x, _, _ = trained["data"].eval_arrays("test")
    res.model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), res.model(x))


def test_no_leftover_temporary_folders(trained):
    assert [p.name for p in trained["ckpt"].parent.iterdir()] == ["checkpoint"]


@pytest.mark.parametrize("name", ["model.safetensors", "gate.safetensors", "optimizer.safetensors",
                                  "best.safetensors", "state.json", "config.json", "genes.parquet", "store.json"])
def test_missing_file_is_named(ckpt_copy, name):
    (ckpt_copy / name).unlink()
    with pytest.raises(CheckpointError, match=rf"{name}: missing"):
        load_checkpoint(ckpt_copy)


@pytest.mark.parametrize("name", ["model.safetensors", "best.safetensors", "optimizer.safetensors",
                                  "state.json", "config.json", "genes.parquet"])
def test_truncated_file_is_named(ckpt_copy, name):
    f = ckpt_copy / name
    f.write_bytes(f.read_bytes()[: max(8, f.stat().st_size // 2)])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt_copy)
    assert name in str(err.value)


def test_missing_folder():
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint("/nonexistent/checkpoint")


class _Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/agl_pickle_was_executed",))


def test_malicious_pickle_is_refused_without_running(ckpt_copy):
    marker = Path("/tmp/agl_pickle_was_executed")
    marker.unlink(missing_ok=True)
    (ckpt_copy / "model.safetensors").write_bytes(pickle.dumps({"weight": _Boom()}))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(ckpt_copy)
    torch.save({"weight": torch.zeros(2)}, ckpt_copy / "model.safetensors")  # a torch pickle zip, also refused
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ckpt_copy)
    assert not marker.exists()


def test_tensors_of_another_shape_are_refused(ckpt_copy):
    from safetensors.torch import load_file, save_file

    best = load_file(str(ckpt_copy / "best.safetensors"))
    key = next(k for k in best if k.startswith("model/head"))
    best[key] = torch.zeros(3, 3)
    save_file(best, str(ckpt_copy / "best.safetensors"))
    with pytest.raises(CheckpointError, match="best.safetensors: tensors do not fit"):
        load_model(ckpt_copy)


def test_genes_differing_from_the_data_are_refused(trained, ckpt_copy):
    genes = pd.read_parquet(ckpt_copy / "genes.parquet")
    genes.loc[3, "gene"] = "NOT_A_GENE"
    genes.to_parquet(ckpt_copy / "genes.parquet", index=False)
    with pytest.raises(CheckpointError, match="genes.parquet: genes differ"):
        check_compatible(load_checkpoint(ckpt_copy), trained["data"].genes, trained["cfg"])
    with pytest.raises(CheckpointError, match="genes differ"):
        restore(ckpt_copy, Trainer(trained["cfg"], trained["data"]), trained["cfg"])


def test_another_backbone_is_refused(trained, ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["backbone"] = "timm/resnet18"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: backbone"):
        check_compatible(load_checkpoint(ckpt_copy), trained["data"].genes, trained["cfg"])


def test_bad_config_inside_checkpoint(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["tau"] = -1
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json.*tau"):
        load_checkpoint(ckpt_copy)


def test_state_json_is_strict_json(trained):
    text = (trained["ckpt"] / "state.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert np.isfinite(json.loads(text)["best_val_pcc"])
