"""Checkpoints as folders of safetensors + JSON + Parquet: nothing is ever unpickled.

Layout of a checkpoint folder (written to a temporary sibling, then renamed into place)::

    model.safetensors      model weights at the last finished epoch
    gate.safetensors       gate tensors (e.g. DkGSB's threshold t) at that epoch
    optimizer.safetensors  Adam moments of the model ("model.*") and gate ("outer.*") optimisers
    best.safetensors       the best-validation model ("model/*") and gate ("gate/*"): used for prediction
    state.json             epoch, best epoch/PCC, history, optimiser scalars, input size,
                           the encoder input preprocessing (``encoder_input``: mean/std, size, crop)
    config.json            the TrainConfig
    genes.parquet          the gene set in model output order (roles, priors, ranks)
    store.json             the store's manifest hash, preprocessing switches, patch size (and stain record)

A *weights-only* checkpoint (:func:`export_weights`: the registered MLflow model and each run's
``checkpoint`` artifact) keeps what prediction reads: ``best.safetensors`` (the best epoch's model and
gate, else the last epoch's), ``config.json``, ``genes.parquet``, ``store.json`` and ``state.json``
(``weights_only: true``, no optimiser scalars); it serves predictions but cannot resume training.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from agl.config import TrainConfig
from agl.errors import AGLError, CheckpointError
from agl.fileio import atomic_write_json, jsonable, swap_folder
from agl.training.model import build_model, gate_state

if TYPE_CHECKING:  # pragma: no cover
    from agl.training.loop import Trainer

FORMAT_VERSION = 1
TENSOR_FILES = ("model.safetensors", "gate.safetensors", "optimizer.safetensors", "best.safetensors")
JSON_FILES = ("state.json", "config.json", "store.json")
GENES_FILE = "genes.parquet"
CHECKPOINT_FILES = TENSOR_FILES + JSON_FILES + (GENES_FILE,)
WEIGHTS_FILE = "best.safetensors"   # the one tensor file of a weights-only checkpoint
# Settings that fix the model's shape or meaning: a checkpoint only resumes/serves a run that agrees on them.
ARCHITECTURE_KEYS = ("method", "mode", "backbone", "trunk", "loss", "prior", "second_prior", "prior_weight")


@dataclass
class Checkpoint:
    """The validated contents of a checkpoint folder."""

    path: Path
    config: TrainConfig
    state: dict[str, Any]
    store: dict[str, Any]
    genes: pd.DataFrame
    model: dict[str, Tensor]
    gate: dict[str, Tensor]
    optimizer: dict[str, Tensor]
    best_model: dict[str, Tensor]
    best_gate: dict[str, Tensor]
    weights_only: bool = False     # exported for serving (export_weights): no optimiser, no last-epoch weights


@dataclass
class LoopState:
    """Everything the loop carries between epochs (restored on resume)."""

    next_epoch: int = 0
    best_epoch: int = -1
    best_val_pcc: float = -math.inf
    history: list[dict[str, float]] = field(default_factory=list)
    elapsed_s: float = 0.0
    best_model: dict[str, Tensor] | None = None
    best_gate: dict[str, Tensor] | None = None


# --------------------------------------------------------------------------- JSON helpers
def manifest_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a store manifest."""
    return hashlib.sha256(json.dumps(jsonable(manifest), sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- save
def _flat_optimizer(prefix: str, opt: torch.optim.Optimizer | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer tensors as "prefix.<param index>.<key>" and its scalars for state.json."""
    if opt is None:
        return {}, {}
    sd = opt.state_dict()
    tensors, scalars = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.{idx}.{key}"] = value.detach().cpu().clone().contiguous()
            else:
                scalars["state"].setdefault(str(idx), {})[key] = value
    return tensors, scalars


def _unflat_optimizer(prefix: str, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        head, idx, key = name.split(".", 2)
        if head == prefix:
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in scalars.get("state", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": scalars["param_groups"]}


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def save_checkpoint(path: str | Path, trainer: "Trainer", cfg: TrainConfig, state: LoopState, data: Any) -> Path:
    """Write a checkpoint folder atomically (temporary sibling folder, then rename over the old one).

    A failed write (full disk, quota) removes its temporary folder and leaves the previous
    checkpoint as it was; a full disk raises CheckpointError saying so.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        _write_checkpoint_files(tmp, trainer, cfg, state, data)
        return swap_folder(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half a checkpoint beside the good one
        if _disk_error(err):
            kept = f"the previous checkpoint at {path} is intact" if path.is_dir() else "no earlier checkpoint exists"
            raise CheckpointError(path, f"could not write the checkpoint of epoch {state.next_epoch}: {err}; "
                                        f"{kept}. Free disk space, then resume from it") from err
        raise


def _disk_error(err: BaseException) -> bool:
    """True for a full disk, an exceeded quota or file-size limit (also as reported by safetensors' Rust code)."""
    import errno

    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(err)
    return "No space left on device" in text or "Disk quota exceeded" in text or "File too large" in text


def _write_checkpoint_files(tmp: Path, trainer: "Trainer", cfg: TrainConfig, state: LoopState, data: Any) -> None:
    """Every file of a checkpoint folder, into ``tmp``."""
    from safetensors.torch import save_file

    save_file(_contiguous(trainer.model.state_dict()), str(tmp / "model.safetensors"))
    save_file(_contiguous(gate_state(trainer.gate)), str(tmp / "gate.safetensors"))
    model_t, model_s = _flat_optimizer("model", trainer.opt)
    outer_t, outer_s = _flat_optimizer("outer", trainer.outer_opt)
    save_file({**model_t, **outer_t}, str(tmp / "optimizer.safetensors"))
    best = {f"model/{k}": v for k, v in (state.best_model or {}).items()}
    best.update({f"gate/{k}": v for k, v in (state.best_gate or {}).items()})
    save_file(_contiguous(best), str(tmp / "best.safetensors"))
    atomic_write_json(tmp / "state.json", {
        "format": FORMAT_VERSION, "epoch": state.next_epoch - 1, "next_epoch": state.next_epoch,
        "best_epoch": state.best_epoch, "best_val_pcc": state.best_val_pcc, "elapsed_s": state.elapsed_s,
        "history": state.history, "n_primary": int(data.n_primary), "input_dim": data.input_dim,
        "optimizer": {"model": model_s, "outer": outer_s},
        "encoder_input": encoder_input(trainer.model, data),
    })
    atomic_write_json(tmp / "config.json", cfg.to_dict())
    manifest = getattr(data, "manifest", None) or {}
    atomic_write_json(tmp / "store.json", {"manifest_sha256": manifest_hash(manifest) if manifest else None,
                                           "split": getattr(data, "split", None),
                                           "slides": slides_by_part(data),  # agl predict warns on these
                                           "preprocessing": manifest.get("preprocessing"),
                                           # prediction must cut patches of the physical size the model saw
                                           "patch": {k: (manifest.get("patch") or {}).get(k)
                                                     for k in ("patch_um", "patch_px", "border")},
                                           # and normalise their stain as the store did (absent: none)
                                           **stain_entry(manifest)})
    data.genes.reset_index(drop=True).to_parquet(tmp / GENES_FILE, index=False)


def stain_entry(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """``{"stain": record}`` for a store whose patches were stain-normalised, else ``{}`` (store.json as before)."""
    record = (manifest.get("patch") or {}).get("stain")
    return {"stain": dict(record)} if record and record.get("method", "none") != "none" else {}


def slides_by_part(data: Any) -> dict[str, list[str]] | None:
    """The slides of each part (train, val, val_outer, test) a bundle trains and validates on; None if unknown."""
    parts, slide_ids = getattr(data, "parts", None), getattr(data, "slide_ids", None)
    if parts is None or slide_ids is None:
        return None
    return {part: sorted({str(s) for s in np.asarray(slide_ids)[rows]}) for part, rows in parts.items()}


def encoder_input(model: Any, data: Any = None) -> dict[str, Any] | None:
    """The encoder preprocessing a model is trained on: its fine-tuned backbone's, else the features'."""
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        return getattr(backbone, "preprocessing", None)
    return getattr(getattr(data, "inputs", None), "preprocessing", None)


# --------------------------------------------------------------------------- load
def _load_tensors(file: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(file, "missing file")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(file, f"not a readable safetensors file (truncated, corrupt or another format): {err}") from None


def _load_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(file, "missing file")
    try:
        value = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(file, f"not valid JSON (truncated or corrupt): {err}") from None
    if not isinstance(value, dict):
        raise CheckpointError(file, "expected a JSON object")
    return value


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint folder; any problem raises CheckpointError naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "not a checkpoint folder (missing)")
    state = _load_json(path / "state.json")
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(path / "state.json", f"unsupported checkpoint format {state.get('format')!r} (expected {FORMAT_VERSION})")
    try:
        config = TrainConfig.from_dict(_load_json(path / "config.json"), source=path / "config.json")
    except AGLError as err:
        raise CheckpointError(path / "config.json", str(err)) from None
    store = _load_json(path / "store.json")
    genes_file = path / GENES_FILE
    if not genes_file.is_file():
        raise CheckpointError(genes_file, "missing file")
    try:
        genes = pd.read_parquet(genes_file)
    except Exception as err:  # pyarrow raises several types for damaged files
        raise CheckpointError(genes_file, f"not a readable Parquet file: {err}") from None
    if "gene" not in genes.columns or "role" not in genes.columns:
        raise CheckpointError(genes_file, "needs columns 'gene' and 'role'")
    weights_only = bool(state.get("weights_only"))
    tensors = {name: ({} if weights_only and name != WEIGHTS_FILE else _load_tensors(path / name))
               for name in TENSOR_FILES}
    best = tensors[WEIGHTS_FILE]
    return Checkpoint(
        path=path, config=config, state=state, store=store, genes=genes,
        model=tensors["model.safetensors"], gate=tensors["gate.safetensors"],
        optimizer=tensors["optimizer.safetensors"],
        best_model={k[6:]: v for k, v in best.items() if k.startswith("model/")},
        best_gate={k[5:]: v for k, v in best.items() if k.startswith("gate/")},
        weights_only=weights_only,
    )


def export_weights(src: str | Path, dest: str | Path) -> Path:
    """Write the weights-only checkpoint of ``src`` into the folder ``dest`` (see the module doc); returns ``dest``.

    The best epoch's model and gate (else the last epoch's) become ``best.safetensors``; the optimiser
    state and the last epoch's weights, which only resuming needs, are left out (about 3/4 of the bytes)."""
    from safetensors.torch import save_file

    ck = load_checkpoint(src)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model, gate = (ck.best_model, ck.best_gate) if ck.best_model else (ck.model, ck.gate)
    weights = {**{f"model/{k}": v for k, v in model.items()}, **{f"gate/{k}": v for k, v in gate.items()}}
    save_file(_contiguous(weights), str(dest / WEIGHTS_FILE))
    state = {k: v for k, v in ck.state.items() if k != "optimizer"}
    atomic_write_json(dest / "state.json", {**state, "weights_only": True})
    for name in ("config.json", "store.json", GENES_FILE):
        shutil.copyfile(ck.path / name, dest / name)
    return dest


def check_compatible(ck: Checkpoint, genes: pd.DataFrame, cfg: TrainConfig | None = None) -> None:
    """Raise CheckpointError when the checkpoint's genes or architecture differ from the run's."""
    mine = list(ck.genes["gene"])
    theirs = list(genes["gene"])
    if mine != theirs:
        diff = len(set(mine) ^ set(theirs))
        raise CheckpointError(ck.path / GENES_FILE, f"genes differ from the data's ({len(mine)} vs {len(theirs)} genes, "
                                                    f"{diff} not shared{'; same genes in another order' if not diff else ''})")
    if cfg is not None:
        for key in ARCHITECTURE_KEYS:
            a, b = getattr(ck.config, key), getattr(cfg, key)
            if a != b:
                raise CheckpointError(ck.path / "config.json", f"{key} is {a!r} in the checkpoint but {b!r} in this run")


def _load_state(module: Any, tensors: dict[str, Tensor], file: Path) -> None:
    try:
        module.load_state_dict(tensors)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(file, f"tensors do not fit the model built from config.json: {str(err)[:300]}") from None


def restore(path: str | Path, trainer: "Trainer", cfg: TrainConfig) -> LoopState:
    """Load a checkpoint into a freshly built trainer and return the loop state to continue from."""
    from agl.models.backbones import check_same_preprocessing

    ck = load_checkpoint(path)
    if ck.weights_only:
        raise CheckpointError(ck.path / "state.json", "holds a model's weights only (exported for serving: no optimiser "
                                                      "state, no last-epoch weights); it cannot resume training. Resume "
                                                      "from the run's full checkpoint (Tune's storage path or --out)")
    check_compatible(ck, trainer.data.genes, cfg)
    check_same_preprocessing(ck.state.get("encoder_input"), encoder_input(trainer.model, trainer.data),
                             ck.path / "state.json")
    _load_state(trainer.model, ck.model, ck.path / "model.safetensors")
    if ck.gate:
        _load_state(trainer.gate, ck.gate, ck.path / "gate.safetensors")
    scalars = ck.state.get("optimizer", {})
    try:
        trainer.opt.load_state_dict(_unflat_optimizer("model", ck.optimizer, scalars["model"]))
        if trainer.outer_opt is not None:
            trainer.outer_opt.load_state_dict(_unflat_optimizer("outer", ck.optimizer, scalars["outer"]))
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(ck.path / "optimizer.safetensors", f"optimiser state does not fit this run: {err}") from None
    last = int(ck.state["epoch"])
    if last >= 0:  # re-derive epoch-indexed gate settings (tau annealing) as they were after that epoch
        trainer.gate.on_epoch_end(last, cfg.epochs)
    history = [{k: (float("nan") if v is None else v) for k, v in row.items()} for row in ck.state.get("history", [])]
    best_val = ck.state.get("best_val_pcc")
    return LoopState(next_epoch=int(ck.state["next_epoch"]), best_epoch=int(ck.state["best_epoch"]),
                     best_val_pcc=-math.inf if best_val is None else float(best_val), history=history,
                     elapsed_s=float(ck.state.get("elapsed_s", 0.0)),
                     best_model=ck.best_model or None, best_gate=ck.best_gate or None)


def load_model(path: str | Path) -> tuple[torch.nn.Module, Any, TrainConfig, pd.DataFrame]:
    """Rebuild the best model of a checkpoint for prediction: (Estimator in eval mode, gate, config, genes)."""
    ck = load_checkpoint(path)
    n_primary = int(ck.state.get("n_primary", int((ck.genes["role"] == "primary").sum())))
    aux = ck.genes.iloc[n_primary:]
    prior_ranks = {c[len("rank_"):]: aux[c].to_numpy(np.float32) for c in ck.genes.columns if c.startswith("rank_")}
    try:
        model, gate = build_model(ck.config, ck.genes, n_primary, prior_ranks, ck.state.get("input_dim"), pretrained=False)
    except AGLError as err:
        raise CheckpointError(ck.path / "config.json", f"cannot rebuild the model: {err}") from None
    use_best = bool(ck.best_model)
    _load_state(model, ck.best_model if use_best else ck.model, ck.path / ("best.safetensors" if use_best else "model.safetensors"))
    gate_state = ck.best_gate if use_best else ck.gate
    if gate_state:
        _load_state(gate, gate_state, ck.path / ("best.safetensors" if use_best else "gate.safetensors"))
    from agl.models.backbones import check_same_preprocessing

    recorded = ck.state.get("encoder_input")
    check_same_preprocessing(recorded, encoder_input(model), ck.path / "state.json")  # fine-tuned backbone
    model.encoder_input = recorded  # features mode: predict checks the encoder it builds against this
    model.eval()
    return model, gate, ck.config, ck.genes
