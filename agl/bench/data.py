"""``agl bench data``: patches/s of the store's batched loader vs a naive per-item loader.

The naive loader is the pattern of the paper's public code: per item, slice the
AnnData (``adata[i].X.toarray()``) and run Pillow + torchvision transforms on the
patch (random flips / rotation by 90 -> ToTensor -> Normalize), then collate.
Both loaders read the same spots with the same augmentation group and batch size,
in one process, in one run.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from agl.errors import ConfigError
from agl.fileio import atomic_write_json

log = logging.getLogger(__name__)


class NaiveDataset(torch.utils.data.Dataset):
    """Per-item AnnData slicing and PIL/torchvision transforms (the baseline being measured)."""

    def __init__(self, adata: Any, patches: np.ndarray, rows: np.ndarray, gene_columns: np.ndarray):
        from torchvision import transforms

        from agl.data.loaders import IMAGENET_MEAN, IMAGENET_STD

        self.adata, self.patches, self.rows, self.cols = adata, patches, rows, gene_columns
        rotations = [transforms.RandomRotation((a, a)) for a in (0, 90, 180, 270)]
        self.transform = transforms.Compose([
            transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(),
            transforms.RandomChoice(rotations), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        r = int(self.rows[i])
        y = self.adata[r].X.toarray()[0, self.cols].astype(np.float32)
        x = self.transform(Image.fromarray(np.asarray(self.patches[r])))
        return x, torch.from_numpy(y)


def _epochs(make: Callable[[int], Iterable[Any]]) -> Iterator[Any]:
    """Batches of epoch 0, 1, 2, ... without end (so any number of batches can be timed)."""
    for epoch in itertools.count():
        yield from make(epoch)


def _interleaved_rates(loaders: dict[str, Iterable[tuple[torch.Tensor, torch.Tensor]]],
                       n_batches: int) -> dict[str, dict[str, float]]:
    """Patches/s of each loader, timing their batches alternately after one warm-up batch each.

    Alternating makes the loaders see the same machine load (other processes come and go).
    The order reverses every round, so each fast loader directly follows the naive one half
    of the time: a batch right after the naive loader's finds the CPU caches cold (measured:
    15-20% slower), and a fixed order would charge that to one loader only. Besides wall-clock
    rates, rates per second of this process's CPU time are recorded: on a shared machine they
    show the loaders' own cost, whatever share of the cores they got.
    """
    its = {name: iter(loader) for name, loader in loaders.items()}
    for it in its.values():
        next(it)
    seconds = dict.fromkeys(its, 0.0)
    cpu_seconds = dict.fromkeys(its, 0.0)
    counts = dict.fromkeys(its, 0)
    names = list(its)
    for round_ in range(n_batches):
        for name in names if round_ % 2 == 0 else names[::-1]:
            it = its[name]
            t0, c0 = time.perf_counter(), time.process_time()
            x, _y = next(it)
            seconds[name] += time.perf_counter() - t0
            cpu_seconds[name] += time.process_time() - c0
            counts[name] += x.shape[0]
            del x, _y  # as a training step would: the batch is consumed before the next one
    return {name: {"patches_per_s": counts[name] / seconds[name], "patches": counts[name],
                   "patches_per_cpu_s": counts[name] / max(cpu_seconds[name], 1e-9)} for name in its}


def numpy_copy_rate(nbytes: int, repeats: int = 20) -> float:
    """Bytes/s of a plain ``np.copyto`` of ``nbytes`` into a preallocated array (the memory-bandwidth floor
    of a loader writing that many bytes per batch); best of ``repeats``, both arrays touched first."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.zeros_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return src.nbytes / best


def expression_rows_ms(store: Any, columns: np.ndarray, batch_size: int, repeats: int = 50,
                       seed: int = 0) -> float:
    """Median milliseconds of ``store.expression_rows`` for a sorted random batch: the expression part of a
    batch alone (memory-mapped rows for a dense store, CSR rows densified for a sparse one)."""
    rng = np.random.default_rng(seed)
    n = int(store.manifest["n_spots"])
    times = []
    for i in range(repeats + 5):
        rows = np.sort(rng.choice(n, min(batch_size, n), replace=False))
        t0 = time.perf_counter()
        store.expression_rows(rows, columns)
        if i >= 5:  # the first calls map the arrays
            times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def machine_info() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "torch_threads": torch.get_num_threads()}


def bench_data(store_path: str | Path | None = None, out_dir: str | Path = "results", batch_size: int = 128,
               n_batches: int = 20, seed: int = 0, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure both loaders; print a table and write ``out_dir/bench_data.json``."""
    import anndata
    import scipy.sparse as sp

    from agl.data.loaders import iter_patch_batches
    from agl.data.locate import open_store_arg

    store = open_store_arg(store_path)
    split = store.split_names[0]
    genes = store.gene_set(split)
    cols = genes["column"].to_numpy()
    rows = np.arange(len(store.spots))
    if len(rows) < batch_size:
        raise ConfigError("--batch-size", f"{batch_size} is more than the store's {len(rows)} spots")

    # the naive loader starts from an AnnData of sparse expression, as the reference code does
    adata = anndata.AnnData(X=sp.csr_matrix(store.expression))
    torch.manual_seed(seed)
    naive_loader = torch.utils.data.DataLoader(NaiveDataset(adata, store.patches, rows, cols),
                                               batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)
    fast = _epochs(lambda e: iter_patch_batches(store, rows, cols, batch_size, augment=True, seed=seed, epoch=e,
                                                drop_last=True))
    fast8 = _epochs(lambda e: iter_patch_batches(store, rows, cols, batch_size, augment=True, seed=seed, epoch=e,
                                                 drop_last=True, normalise=False))
    naive = _epochs(lambda e: iter(naive_loader))
    rates = _interleaved_rates({"naive": naive, "batched": fast, "batched_uint8": fast8}, n_batches)
    what = {
        "naive": "per item adata[i].X.toarray() + PIL random flips/rot90 + ToTensor + Normalize, DataLoader "
                 "collate: float32 [B, 3, H, W] ImageNet-normalised",
        "batched": "iter_patch_batches: sorted memmap rows; per patch one strided uint8 copy (dihedral view + "
                   "HWC -> CHW), cast, multiply-add normalisation into a recycled output array: float32 "
                   "[B, 3, H, W] ImageNet-normalised",
        "batched_uint8": "same views, normalise=False: uint8 [B, 3, H, W], normalisation left to the accelerator",
    }
    naive_rate = rates["naive"]["patches_per_s"]
    # memory bandwidth: the float loader writes 4 bytes per value (the uint8 one 1), a plain copy of one batch
    values = int(np.prod(store.manifest["patch_shape"]))
    rows_ms = expression_rows_ms(store, cols, batch_size)
    copy_rate = numpy_copy_rate(batch_size * values * 4)
    for name, width in (("batched", 4), ("batched_uint8", 1)):
        rates[name]["output_bytes_per_s"] = rates[name]["patches_per_s"] * values * width
        rates[name]["vs_numpy_copy"] = rates[name]["output_bytes_per_s"] / copy_rate
    result = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "load_average": list(os.getloadavg()),
        "store": str(store.path), "split": split, "n_genes": int(len(cols)),
        "patch_shape": store.manifest["patch_shape"], "batch_size": batch_size,
        "expression_layout": store.expression_layout,
        "expression_encoding": store.manifest.get("expression_encoding"),
        "expression_rows_ms": rows_ms,
        "expression_rows": "median ms of Store.expression_rows for one sorted random batch of the split's gene "
                           "columns (50 batches after 5 warm-up), the expression part of a batch alone",
        **{name: {**rates[name], "what": what[name]} for name in rates},
        "ratio": rates["batched"]["patches_per_s"] / naive_rate,
        "ratio_uint8": rates["batched_uint8"]["patches_per_s"] / naive_rate,
        "ratio_cpu": rates["batched"]["patches_per_cpu_s"] / rates["naive"]["patches_per_cpu_s"],
        "numpy_copy_bytes_per_s": copy_rate,
        "numpy_copy": f"np.copyto of one float32 batch ({batch_size * values * 4} bytes) into a preallocated array, "
                      "best of 20: the bandwidth a loader writing that batch cannot beat",
        "timing": "batches of the loaders timed alternately in one process (same load), in an order reversed "
                  "every round (so no loader always follows the naive one), after one warm-up batch each; the same spots, 8 dihedral views and batch size for every loader; "
                  "ratio = wall-clock patches/s over the naive loader's, ratio_cpu = the same per CPU second",
    }
    echo(f"{'loader':<10}{'patches/s':>12}{'per cpu s':>12}{'patches':>10}")
    for name, label in (("naive", "naive"), ("batched", "batched"), ("batched_uint8", "uint8")):
        r = rates[name]
        echo(f"{label:<10}{r['patches_per_s']:>12.1f}{r['patches_per_cpu_s']:>12.1f}{r['patches']:>10}"
             + ("   (normalised later on the accelerator)" if name == "batched_uint8" else ""))
    echo(f"ratio {result['ratio']:.1f}x (uint8 {result['ratio_uint8']:.1f}x, per CPU second {result['ratio_cpu']:.1f}x)"
         f"  (batch {batch_size}, {len(cols)} genes, {result['machine']['cpu_count']} CPUs, "
         f"load average {result['load_average'][0]:.1f})")
    echo(f"output bytes/s: float {rates['batched']['output_bytes_per_s'] / 1e9:.2f} GB/s, uint8 "
         f"{rates['batched_uint8']['output_bytes_per_s'] / 1e9:.2f} GB/s; plain numpy copy of one float batch "
         f"{copy_rate / 1e9:.2f} GB/s (float loader at {rates['batched']['vs_numpy_copy']:.0%} of it)")
    echo(f"expression rows: {rows_ms:.2f} ms per batch of {batch_size} ({store.expression_layout} layout"
         + (f", {result['expression_encoding']['indices']} indices / {result['expression_encoding']['values']} values"
            if result["expression_encoding"] else "") + ")")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench_data.json", result, indent=1)
    echo(f"wrote {out / 'bench_data.json'}")
    return result
