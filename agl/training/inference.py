"""Batch inference of a trained model on uint8 H&E patches (``agl predict`` and the pyfunc champion)."""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def run_model(model: Any, cfg: Any, patches: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    """Model outputs for uint8 patches: through the frozen backbone first in features mode."""
    import torch

    from agl.models import create_backbone
    from agl.models.features import to_model_input
    from agl.training.loop import resolve_device

    dev = resolve_device(device)
    model = model.to(dev).eval()
    encoder = None
    if cfg.mode == "features":
        from agl.models.backbones import check_same_preprocessing

        encoder, _ = create_backbone(cfg.backbone, cfg.weights)
        check_same_preprocessing(getattr(model, "encoder_input", None), encoder.preprocessing, f"{cfg.backbone} checkpoint")
        encoder = encoder.to(dev).eval()
    outs = []
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(patches), batch_size):
            x = to_model_input(np.ascontiguousarray(patches[start:start + batch_size]), dev)
            if encoder is not None:
                x = encoder(x)
            outs.append(model(x).float().cpu().numpy())
            done = min(start + batch_size, len(patches))
            if (start // batch_size) % 10 == 9 or done == len(patches):
                rate = done / max(time.perf_counter() - started, 1e-9)
                log.info("predicted %d/%d spots (%.0f spots/s, ETA %.0f s)", done, len(patches), rate,
                         (len(patches) - done) / max(rate, 1e-9))
    return np.concatenate(outs) if outs else np.zeros((0, 0), dtype=np.float32)
