"""Batches built ahead on a background thread, pinned for asynchronous copies to a GPU.

Fine-tuning batches are cut from memory-mapped patches in numpy (which releases the GIL), so
a thread overlaps building batch ``i + 1`` with the step on batch ``i``. On CUDA each batch is
put in pinned memory, so ``.to(device, non_blocking=True)`` copies it without a host-side wait
(PyTorch docs, "pin_memory" and "non_blocking").
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

import torch
from torch import Tensor

_DONE = object()


def _pinned(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(t.pin_memory() for t in batch)


def prefetch(batches: Iterable[tuple[Tensor, ...]], device: torch.device, depth: int = 2
             ) -> Iterator[tuple[Tensor, ...]]:
    """The batches of ``batches`` on ``device``, up to ``depth`` built ahead on a thread.

    An exception raised while building a batch is re-raised here, at that batch. ``depth=0``
    builds them in the caller's thread (the plain loop, for comparison).
    """
    pin = device.type == "cuda"

    def to_device(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(t.to(device, non_blocking=pin) for t in batch)

    if depth <= 0:
        for batch in batches:
            yield to_device(_pinned(batch) if pin else batch)
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        """Hand ``item`` over unless the consumer has left (then False)."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(_pinned(batch) if pin else batch):
                    return
            put(_DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            put(err)

    worker = threading.Thread(target=produce, name="agl-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield to_device(item)
    finally:
        stop.set()  # the consumer left early (break, error): let the producer end
        worker.join(timeout=5.0)
