"""The champion as an MLflow pyfunc model.

Saved as *models from code* (``pyfunc_entry.py`` is the model's code; nothing is pickled):
loading runs that file, which builds :class:`AglPyfuncModel`, whose ``load_context`` reads the
bundled checkpoint folder with :func:`agl.training.checkpoint.load_model` (safetensors + JSON; weights
only, :func:`agl.training.checkpoint.export_weights`: no optimiser state). It predicts on the device the
model trained on, or where this host lacks it (CUDA), on what the host has, with a warning.
Input: uint8 H&E patches ``[N, px, px, 3]`` cut as in training (``agl.data.patches``), before any
stain normalisation: a model whose store normalised its patches (``agl ingest --stain``) applies the
same transform with the store's reference (recorded in the bundled checkpoint's ``store.json``);
output: a DataFrame ``[N, genes]`` of float32 predicted log1p expression, one column per gene
named by its symbol, primary genes first (also the metadata ``genes`` and the checkpoint's
``genes.parquet``), so ``mlflow models serve`` answers with gene names; an empty batch gives
``[0, genes]``.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agl.data.stain import checkpoint_stain

if TYPE_CHECKING:
    import pandas as pd

try:  # the class must derive from PythonModel; agl imports without mlflow installed
    from mlflow.pyfunc import PythonModel as _Base
except ImportError:  # pragma: no cover
    _Base = object

log = logging.getLogger(__name__)
ENTRY = Path(__file__).with_name("pyfunc_entry.py")
ARTIFACT = "checkpoint"
DEFAULT_PATCH_PX = 224


class AglPyfuncModel(_Base):
    """An agl checkpoint behind ``mlflow.pyfunc``: patches in, expression out."""

    checkpoint: Path | None = None

    def load_context(self, context: Any) -> None:
        from agl.training.checkpoint import load_model

        self.checkpoint = Path(context.artifacts[ARTIFACT])
        model, _gate, cfg, self.genes = load_model(self.checkpoint)
        n_out = int(getattr(model, "n_genes", len(self.genes)))
        self.serve(model, cfg, self.genes["gene"].astype(str).iloc[:n_out].tolist(), checkpoint_stain(self.checkpoint))

    def serve(self, model: Any, cfg: Any, columns: list[str],
              stain: dict[str, Any] | None = None) -> "AglPyfuncModel":
        """Hold ``model`` (trained with ``cfg``) for prediction, its outputs named ``columns`` (one per gene);
        ``stain``: the training store's stain record, applied to every request's patches."""
        self.model, self.cfg, self.columns = model, cfg, list(columns)
        self.stain = dict(stain or {"method": "none"})
        self.predictors: dict[str, Any] = {}  # device -> Predictor: the encoder is built once, not per request
        return self

    def predictor(self, device: str | None = None) -> Any:
        """The loaded model on ``device`` (default: the run's ``cfg.device`` where this host has it, else what
        the host has), built on first use."""
        import copy

        from agl.training.inference import Predictor

        device = device or host_device(self.cfg.device)
        if device not in self.predictors:  # a second device gets its own copy: Predictor moves the model
            model = copy.deepcopy(self.model) if self.predictors else self.model
            self.predictors[device] = Predictor(model, self.cfg, device)
        return self.predictors[device]

    # model_input has no type hint on purpose: MLflow would read it as the input schema (the signature is that)
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> "pd.DataFrame":  # noqa: ANN001
        import pandas as pd

        if isinstance(model_input, dict):  # a named-tensor request ({"patches": ...})
            model_input = model_input["patches"]
        patches = np.asarray(model_input)
        if patches.ndim != 4 or patches.shape[-1] != 3:
            raise ValueError(f"expected uint8 patches [N, px, px, 3], got shape {patches.shape}")
        if len(patches) == 0:  # no model run: an empty table with every gene's column
            return pd.DataFrame(np.zeros((0, len(self.columns)), dtype=np.float32), columns=self.columns)
        options = params or {}
        device = options.get("device") or None  # "": the signature's default, the host's device
        from agl.data.stain import normalise_patches

        patches, _ = normalise_patches(patches.astype(np.uint8, copy=False), getattr(self, "stain", {}))
        pred = self.predictor(None if device is None else str(device)).predict(patches, int(options.get("batch_size", 64)))
        return pd.DataFrame(pred, columns=self.columns)


def host_device(trained_on: str) -> str:
    """The device to serve on by default: the one the model trained on, else (a CUDA model on a host without
    CUDA) ``auto``, with a warning; ``params={"device": ...}`` still forces one."""
    import torch

    if str(trained_on).startswith("cuda") and not torch.cuda.is_available():
        log.warning("the model was trained with device %r but this host has no CUDA (torch %s); predicting on "
                    "the CPU (pass params={'device': ...} to choose)", trained_on, torch.__version__)
        return "auto"
    return str(trained_on)


def patch_px(checkpoint: Path) -> int:
    """The patch size the checkpoint's training store was cut at."""
    from agl.training.checkpoint import load_checkpoint

    record = load_checkpoint(checkpoint).store
    return int((record.get("patch") or {}).get("patch_px") or record.get("patch_px") or DEFAULT_PATCH_PX)


def save_pyfunc(checkpoint: Path, dest: Path, input_example: np.ndarray | None = None) -> Path:
    """Save ``checkpoint`` as a pyfunc model folder at ``dest`` (signature, input example, metadata)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

    from agl.runs import RECORD_FILES
    from agl.training.checkpoint import export_weights, load_model

    model, _gate, cfg, genes = load_model(checkpoint)
    n_out = int(getattr(model, "n_genes", len(genes)))
    px = patch_px(checkpoint)
    names = genes["gene"].astype(str).iloc[:n_out].tolist()
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, px, px, 3))]),
                               outputs=Schema([ColSpec(DataType.float, name) for name in names]),  # gene-named
                               # without a params schema MLflow drops every inference parameter
                               params=ParamSchema([ParamSpec("device", DataType.string, ""),
                                                   ParamSpec("batch_size", DataType.long, 64)]))
    if input_example is not None:
        input_example = np.ascontiguousarray(input_example[:1], dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="agl-weights-") as tmp:  # the model needs no optimiser state
        weights = export_weights(checkpoint, Path(tmp) / ARTIFACT)
        for name in RECORD_FILES:  # the run record beside the weights (result.json: metrics, refit_of), kilobytes
            if (Path(checkpoint) / name).is_file():
                shutil.copyfile(Path(checkpoint) / name, weights / name)
        mlflow.pyfunc.save_model(
            str(dest), python_model=str(ENTRY), artifacts={ARTIFACT: str(weights)}, signature=signature,
            input_example=input_example, pip_requirements=_requirements(),
            metadata={"genes": json.dumps(names), "method": cfg.method, "stain": checkpoint_stain(checkpoint)["method"],
                      "backbone": cfg.backbone, "mode": cfg.mode})
    return dest


def _requirements() -> list[str]:
    """The pinned packages the model needs (given, so MLflow does not infer them by loading the model)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("agl", "torch", "torchvision", "safetensors", "numpy", "pandas", "mlflow"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return out
