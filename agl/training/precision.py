"""Numerical precision around the hypergradient estimators and the ordinary steps.

On Ampere/Hopper GPUs PyTorch runs convolutions (``torch.backends.cudnn.allow_tf32``, on by
default) and optionally matmuls (``torch.backends.cuda.matmul.allow_tf32``) in TF32, whose
10-bit mantissa gives about 1e-3 relative precision (PyTorch docs, "TensorFloat-32 (TF32) on
Ampere (and later) devices"). The estimators take finite differences of ~1e-4 relative size
(``forward_fd``, ``first_order``) or run CG to ``tol=1e-6`` (``ift_cg``), so they need full
float32: :func:`full_float32` turns TF32 and autocast off for their duration and restores the
caller's settings after. Ordinary steps may use bf16 autocast (:func:`train_autocast`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def tf32_flags() -> dict[str, Any]:
    """The process-wide TF32 settings (readable without a GPU)."""
    return {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """TF32 off for convolutions and matmuls, autocast off; the previous settings restored after."""
    saved = tf32_flags()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        # an estimator called from inside an autocast region (a bf16 step) still runs in float32
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved["cudnn_allow_tf32"]
        torch.backends.cuda.matmul.allow_tf32 = saved["matmul_allow_tf32"]
        torch.set_float32_matmul_precision(saved["float32_matmul_precision"])


def in_full_float32(function: F) -> F:
    """Decorator: ``function`` runs under :func:`full_float32` (used on every hypergradient estimator)."""
    if getattr(function, "_full_float32", False):
        return function

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with full_float32():
            return function(*args, **kwargs)

    wrapper._full_float32 = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of ordinary steps: bf16 on CUDA with ``precision="bf16"``, else None (float32).

    CPU steps stay float32: CPU bf16 autocast is slower than float32 on most CPUs and would
    change the CPU results the tests pin.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if precision == "bf16" and device.type == "cuda":
        return torch.bfloat16
    return None


def train_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for an ordinary step or a forward pass where :func:`autocast_dtype` allows it."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
