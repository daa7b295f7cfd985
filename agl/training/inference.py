"""Batch inference of a trained model on uint8 H&E patches (``agl predict`` and the pyfunc champion).

A :class:`Predictor` holds a loaded model on its device with the frozen encoder (features mode)
built once, so a server answers each request without rebuilding the backbone and reloading its
weights (``mlflow models serve`` calls ``predict`` once per request). On CUDA the patches go up as
pinned uint8 (a quarter of float32's bytes, ``non_blocking``), are normalised there, and the
encoder and model run in bf16 autocast with channels_last (``precision="bf16"``); on CPU the path
is plain float32.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class Predictor:
    """A loaded model ready to predict: on ``device``, in eval mode, with its encoder built once."""

    def __init__(self, model: Any, cfg: Any, device: str = "auto", precision: str = "bf16"):
        import torch

        from agl.training.device import check_available, describe_device, resolve_device
        from agl.training.precision import autocast_dtype

        self.device = resolve_device(device)
        check_available(self.device)
        self.cfg = cfg
        self.autocast = autocast_dtype(self.device, precision)
        self.model = model.to(self.device).eval()
        self.encoder = None
        if cfg.mode == "features":
            from agl.models import create_backbone
            from agl.models.backbones import check_same_preprocessing

            encoder, _ = create_backbone(cfg.backbone, cfg.weights)
            check_same_preprocessing(getattr(model, "encoder_input", None), encoder.preprocessing,
                                     f"{cfg.backbone} checkpoint")
            self.encoder = encoder.to(self.device).eval()
        if self.device.type == "cuda":
            for module in (self.model, self.encoder):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        log.info("predictor on %s%s", describe_device(self.device),
                 f" ({self.autocast} autocast)" if self.autocast is not None else "")

    def _input(self, patches: np.ndarray) -> Any:
        """uint8 ``[B, H, W, 3]`` -> the model's float input ``[B, 3, H, W]`` on the device."""
        import torch

        from agl.models.features import to_model_input

        if self.device.type != "cuda":
            return to_model_input(np.ascontiguousarray(patches), self.device)
        from agl.data.loaders import normalise_uint8

        host = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.uint8)).pin_memory()
        x = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return normalise_uint8(x).contiguous(memory_format=torch.channels_last)

    def predict(self, patches: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Model outputs ``[N, genes]`` (float32) for uint8 patches ``[N, px, px, 3]``."""
        import contextlib

        import torch

        cast = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None
                else contextlib.nullcontext())
        outs = []
        started = time.perf_counter()
        with torch.inference_mode(), cast:
            for start in range(0, len(patches), batch_size):
                x = self._input(patches[start:start + batch_size])
                if self.encoder is not None:
                    x = self.encoder(x)
                outs.append(self.model(x).float().cpu().numpy())
                done = min(start + batch_size, len(patches))
                if (start // batch_size) % 10 == 9 or (done == len(patches) and len(patches) > batch_size):
                    rate = done / max(time.perf_counter() - started, 1e-9)
                    log.info("predicted %d/%d spots (%.0f spots/s, ETA %.0f s)", done, len(patches), rate,
                             (len(patches) - done) / max(rate, 1e-9))
        return np.concatenate(outs) if outs else np.zeros((0, 0), dtype=np.float32)


def run_model(model: Any, cfg: Any, patches: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    """Model outputs for uint8 patches: through the frozen backbone first in features mode (one-off use)."""
    return Predictor(model, cfg, device).predict(patches, batch_size)
