"""Test PCC of a float16 frozen-feature cache against float32 on the demo: paired, leave-one-slide-out.

Runs the study's protocol (``agl study``'s loso grid: train on four her2st sections, validate on a
seeded 20% of their spots, test on the fifth; 30 epochs, patience 10, the defaults otherwise) twice
per seed, once with ``feature_dtype: float32`` and once with ``float16``, and pairs the runs by
(method, held-out slide, seed). Also measures the two cache files: bytes on disk and the bytes a
full pass over every (view, spot) leaves in the page cache (``mincore`` after evicting the file).

    python scripts/feature_dtype_pcc.py [--seeds 0,1,2] [--methods pgl,topk:k=250] [--work results/feature_dtype]

Resumable (each grid is ``agl.evaluation.protocol.evaluate``'s); writes results/bench_feature_dtype.json.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]
BASE = {"epochs": 30, "patience": 10}  # the study's FULL plan
DTYPES = ("float32", "float16")


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` now in the page cache (``mincore`` over a read-only mapping of the whole file)."""
    size = path.stat().st_size
    page = mmap.PAGESIZE
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vec = ctypes.create_string_buffer((size + page - 1) // page)
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return int(sum(b & 1 for b in vec.raw)) * page
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    """Drop ``path``'s clean pages from the page cache (other processes mapping it may bring some back)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cache_bytes(store, dtype: str) -> dict[str, float]:
    """Disk bytes of the ``dtype`` feature cache and its page-cache bytes after one pass over every (view, spot)."""
    from agl.models import feature_cache
    from agl.training.streaming import MappedFeatureInputs

    started = time.perf_counter()
    features = feature_cache(store, dtype=dtype)
    build_s = time.perf_counter() - started
    path = Path(features.filename)
    evict(path)
    before = resident_bytes(path)
    inputs = MappedFeatureInputs(features, path, int(store.manifest["n_spots"]))
    n = features.shape[1]
    started = time.perf_counter()
    for view in range(features.shape[0]):  # one epoch's worth of gathers per view, in batches of 128
        for start in range(0, n, 128):
            rows = np.arange(start, min(start + 128, n))
            inputs.batch(rows, np.full(len(rows), view))
    pass_s = time.perf_counter() - started
    return {"file": str(path), "disk_bytes": path.stat().st_size, "page_cache_bytes_before": before,
            "page_cache_bytes_after_pass": resident_bytes(path), "pass_seconds": round(pass_s, 3),
            "seconds_to_get_cache": round(build_s, 1), "shape": list(features.shape), "dtype": str(features.dtype)}


def paired(records: dict[str, list[dict]], methods: list[str]) -> dict[str, dict]:
    """Per method (and all methods together): float16 - float32 test PCC, paired by (method, split, seed)."""
    from agl.evaluation.metrics import paired_difference_tests

    key = lambda r: (r["method"], r["split"], int(r["seed"]))  # noqa: E731
    f32 = {key(r): r for r in records["float32"]}
    f16 = {key(r): r for r in records["float16"]}
    both = sorted(set(f32) & set(f16))
    out = {}
    for label in [*methods, "all"]:
        keys = [k for k in both if label == "all" or k[0] == label]
        diff = [f16[k]["pcc"] - f32[k]["pcc"] for k in keys]
        out[label] = {**paired_difference_tests(diff),
                      "seeds": sorted({k[2] for k in keys}),
                      "pcc_float32": float(np.mean([f32[k]["pcc"] for k in keys])) if keys else None,
                      "pcc_float16": float(np.mean([f16[k]["pcc"] for k in keys])) if keys else None,
                      "max_abs_diff": float(np.max(np.abs(diff))) if diff else None,
                      "identical_runs": int(sum(d == 0 for d in diff))}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="pgl,topk:k=250")
    parser.add_argument("--work", default=str(HERE / "results" / "feature_dtype"))
    parser.add_argument("--out", default=str(HERE / "results" / "bench_feature_dtype.json"))
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()

    from agl.data.store import open_store
    from agl.datasets import her2st_demo_store
    from agl.evaluation.protocol import evaluate

    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    store = open_store(her2st_demo_store())
    report = {"command": "python scripts/feature_dtype_pcc.py " + " ".join(sys.argv[1:]), "store": str(store.path),
              "protocol": "loso", "base": BASE, "methods": methods, "load_average_start": os.getloadavg(),
              "cache": {dtype: cache_bytes(store, dtype) for dtype in DTYPES}}
    print(json.dumps(report["cache"], indent=1), flush=True)
    started = time.perf_counter()
    for seed in seeds:  # seed by seed, both dtypes, so an interrupted run still has complete pairs
        for dtype in DTYPES:
            evaluate(store, "loso", [seed], methods, Path(args.work) / dtype / f"seed{seed}",
                     base={**BASE, "feature_dtype": dtype}, jobs=args.jobs)
        # every finished run in the work folder (earlier calls' too, e.g. another method's seeds)
        records = {dtype: [json.loads(f.read_text()) for f in sorted(Path(args.work).glob(f"{dtype}/seed*/runs/*/*/*/result.json"))]
                   for dtype in DTYPES}
        found = sorted({r["method"] for rs in records.values() for r in rs})
        report.update(methods=found, paired=paired(records, found), wall_seconds=round(time.perf_counter() - started),
                      load_average_end=os.getloadavg(),
                      runs={d: [{k: r[k] for k in ("method", "split", "seed", "pcc", "epochs", "wall_time_s")}
                                for r in rs] for d, rs in records.items()})
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(f"seed {seed} done: " + json.dumps(report["paired"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
