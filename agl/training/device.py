"""Which device a run uses, said out loud: no silent CPU fallback.

``device: auto`` takes CUDA when present. Inside a Ray task, actor or Train worker that Ray
reserved GPUs for, the device is the reserved GPU (its index among ``CUDA_VISIBLE_DEVICES``,
as ``ray.train.torch.get_device`` picks it, so two workers on one node do not share cuda:0),
and a reserved GPU without CUDA is an error rather than a CPU run on a GPU reservation.
"""
from __future__ import annotations

import logging
import os
import sys

import torch

from agl.errors import ConfigError

log = logging.getLogger(__name__)


def ray_reserved_gpus() -> list[str]:
    """The GPU ids Ray reserved for this process (empty outside Ray or without a GPU reservation)."""
    if "ray" not in sys.modules:  # this process never imported Ray: it is no Ray worker
        return []
    import ray

    if not ray.is_initialized():
        return []
    try:
        return [str(i) for i in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - a driver outside any task has no reservation
        return []


def _reserved_index(gpu_ids: list[str]) -> int:
    """The CUDA index of Ray's first reserved GPU under this process's ``CUDA_VISIBLE_DEVICES``."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible.index(gpu_ids[0]) if gpu_ids[0] in visible else 0


def resolve_device(name: str) -> torch.device:
    """``auto``: the Ray-reserved GPU, else CUDA when present, else CPU; other names as given.

    Raises ConfigError when Ray reserved a GPU for this process and CUDA is unavailable.
    """
    reserved = ray_reserved_gpus()
    if reserved and not torch.cuda.is_available():
        raise ConfigError("device", f"Ray reserved GPU(s) {', '.join(reserved)} for this worker but CUDA is not "
                                    f"available to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
                                    "fix the driver/torch build or run without GPUs (no --use-gpu, resources.gpu: 0)")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _reserved_index(reserved) if reserved else torch.cuda.current_device())
        return torch.device("cpu")
    if name == "cuda" and reserved:
        return torch.device("cuda", _reserved_index(reserved))
    return torch.device(name)


def check_available(device: torch.device, setting: str = "device") -> None:
    """A clear error for a CUDA device on a machine without CUDA (instead of torch's deep in a run)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(setting, f"{device} requested but CUDA is not available (torch {torch.__version__}, "
                                   f"CUDA build: {torch.version.cuda}); use device: auto or cpu")


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3, 79.1 GiB)`` or ``cpu (2 threads)``: what a run logs at its start."""
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"cuda:{index} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    if device.type == "cpu":
        why = "" if torch.cuda.is_available() else ", CUDA not available"
        return f"cpu ({torch.get_num_threads()} threads{why})"
    return str(device)


def log_run_device(requested: str, device: torch.device) -> None:
    """One line at the start of a run: the setting and the device it resolved to."""
    log.info("device: %s -> %s", requested, describe_device(device))
