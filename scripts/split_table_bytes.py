"""Bytes of a store's split table at HEST-1k scale: the compact ``split_table.parquet`` against the old ``splits.parquet``.

A synthetic spot table (slide column + pixel coordinates only, as the splits need): ``--slides``
slides (1,229, as HEST-1k) of together ``--spots`` spots (2.1 M), each slide a square grid of
100 px pitch, slide sizes drawn log-normally around the mean. The splits are ``agl ingest``'s
defaults (kfold, spatial, loso; seeds 0, 1, 2; 5 folds), computed by ``agl.data.splits.split_table``.

- new: the SplitTable's columns in memory, ``split_table.parquet`` on disk (per column from the
  Parquet footer), and what reading one loso / one kfold split lazily loads and how long it takes;
- old: one object column of roles per split (``make_splits``' DataFrame) and ``splits.parquet``
  as ``write_role_columns`` writes it (the format before). Materialising all of it (about 8 bytes
  x spots x splits, ~21 GB) does not fit this machine, so it is measured on every fold column
  and ``--loso-sample`` loso columns at full length, and the loso part is scaled by
  (loso splits / sampled): every loso column has the same structure (one slide's test block,
  the same validation mask).

    python scripts/split_table_bytes.py [--spots 2100000] [--slides 1229] [--out results/bench_split_table.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parents[1]


def synthetic_obs(n_spots: int, n_slides: int, seed: int = 0) -> pd.DataFrame:
    """slide_id, pixel_x, pixel_y of ``n_spots`` spots in ``n_slides`` slides (grids of 100 px pitch), slide by slide."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 0.5, n_slides)
    sizes = np.maximum(10, np.floor(weights / weights.sum() * n_spots)).astype(np.int64)
    sizes[-1] += n_spots - sizes.sum()
    local = np.concatenate([np.arange(s) for s in sizes])
    width = np.repeat(np.ceil(np.sqrt(sizes)).astype(np.int64), sizes)
    names = np.array([f"S{i:04d}" for i in range(n_slides)])
    return pd.DataFrame({"slide_id": np.repeat(names, sizes), "pixel_x": (local % width) * 100.0,
                         "pixel_y": (local // width) * 100.0})


def column_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes of each column of a Parquet file (summed over row groups), from its footer."""
    meta = pq.ParquetFile(str(path)).metadata
    out: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            col = group.column(c)
            out[col.path_in_schema] = out.get(col.path_in_schema, 0) + int(col.total_compressed_size)
    return out


def measure(table, obs: pd.DataFrame, tmp: Path, loso_sample: int) -> dict:
    """New and old bytes of ``table``'s splits: per column on disk (Parquet footer) and in memory."""
    from agl.data.store import read_split_table, write_role_columns, write_split_table

    names = table.columns
    loso = [n for n in names if n.startswith("loso-")]
    within = [n for n in names if n not in loso]
    new_path = tmp / "split_table.parquet"
    write_split_table(table, new_path)
    lazy = read_split_table(new_path, len(obs))
    reads = {}
    for name in [n for n in (loso[len(loso) // 2] if loso else None, within[0] if within else None) if n]:
        before = lazy.nbytes()
        t0 = time.perf_counter()
        lazy.codes(name)
        reads[name] = {"seconds": round(time.perf_counter() - t0, 3), "column_bytes_loaded": lazy.nbytes() - before}
    new = {"memory_bytes": table.nbytes(), "disk_bytes": new_path.stat().st_size,
           "disk_bytes_per_column": column_bytes(new_path), "lazy_reads": reads,
           "columns": {k: str(v.dtype) for k, v in table.loaded().items()}}
    new_path.unlink()
    # old: one object column of role strings per split and splits.parquet, ten columns at a time (bounded memory)
    spot_ids = (obs["slide_id"] + "_" + pd.Series(np.arange(len(obs)), index=obs.index).astype(str)).to_numpy()
    sample = within + loso[:loso_sample]
    disk: dict[str, int] = {}
    memory: dict[str, int] = {}
    for i in range(0, len(sample), 10):
        part = sample[i:i + 10]
        frame = pd.DataFrame({n: table[n] for n in part}, dtype=object)
        memory.update({n: int(frame[n].memory_usage(index=False, deep=False)) for n in part})
        path = tmp / f"splits-{i}.parquet"
        write_role_columns(frame, spot_ids, path)
        disk.update({n: b for n, b in column_bytes(path).items() if n in part or n == "spot_id"})
        path.unlink()
        del frame
    sampled = [n for n in sample if n in loso]
    scale = len(loso) / max(len(sampled), 1)
    old = {"disk_bytes_spot_id": disk["spot_id"],
           "disk_bytes_within": sum(disk[n] for n in within),
           "disk_bytes_loso": sum(disk[n] for n in sampled) * scale,
           "memory_bytes_within": sum(memory[n] for n in within),
           "memory_bytes_loso": sum(memory[n] for n in sampled) * scale,
           "columns_measured": len(sample), "loso_columns_sampled": len(sampled), "loso_scale": scale}
    return {"n_spots": len(obs), "n_splits": len(names), "n_loso": len(loso), "new": new, "old": old}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=2_100_000)
    parser.add_argument("--slides", type=int, default=1229)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--loso-sample", type=int, default=20, help="loso columns materialised in the old format")
    parser.add_argument("--spatial-slides", type=int, default=60,
                        help="spatial folds (a Python k-means per slide and seed, ~0.3 s each here) on the first N "
                             "slides only, their bytes scaled by spots / their spots")
    parser.add_argument("--out", default=str(HERE / "results" / "bench_split_table.json"))
    args = parser.parse_args()

    from agl.data.splits import split_table

    seeds = [int(s) for s in args.seeds.split(",")]
    obs = synthetic_obs(args.spots, args.slides)
    report: dict = {"command": "python scripts/split_table_bytes.py " + " ".join(sys.argv[1:]),
                    "n_spots": len(obs), "n_slides": int(obs["slide_id"].nunique()), "seeds": seeds,
                    "kinds": ["kfold", "spatial", "loso"], "n_folds": 5, "load_average_start": os.getloadavg()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=HERE / "results") as tmp:
        t0 = time.perf_counter()
        full = split_table(obs, kinds=("kfold", "loso"), seeds=seeds)
        report["kfold_loso_split_table_seconds"] = round(time.perf_counter() - t0, 1)
        report["kfold_loso"] = measure(full, obs, Path(tmp), args.loso_sample)
        del full
        print(json.dumps(report["kfold_loso"], indent=1), flush=True)
        first = obs["slide_id"].isin(obs["slide_id"].unique()[:args.spatial_slides]).to_numpy()
        sub = obs[first].reset_index(drop=True)
        t0 = time.perf_counter()
        spatial = split_table(sub, kinds=("spatial",), seeds=seeds)
        report["spatial_split_table_seconds"] = round(time.perf_counter() - t0, 1)
        report["spatial_subset"] = measure(spatial, sub, Path(tmp), 0)
    k, s = report["kfold_loso"], report["spatial_subset"]
    scale = len(obs) / len(sub)  # spatial columns: bytes per spot of the subset, times every spot
    spatial_new_disk = sum(b for c, b in s["new"]["disk_bytes_per_column"].items() if c.startswith("folds:")) * scale
    spatial_new_memory = sum(len(sub) for c in s["new"]["columns"] if c.startswith("folds:")) * scale
    new_disk = k["new"]["disk_bytes"] + spatial_new_disk
    new_memory = k["new"]["memory_bytes"] + spatial_new_memory
    old_disk = k["old"]["disk_bytes_spot_id"] + k["old"]["disk_bytes_within"] + k["old"]["disk_bytes_loso"] \
        + s["old"]["disk_bytes_within"] * scale
    old_memory = k["old"]["memory_bytes_within"] + k["old"]["memory_bytes_loso"] + s["old"]["memory_bytes_within"] * scale
    n_splits = k["n_splits"] + s["n_splits"]
    report["total"] = {"n_splits": n_splits, "new_disk_bytes": int(new_disk), "new_memory_bytes": int(new_memory),
                       "old_disk_bytes": int(old_disk), "old_memory_bytes": int(old_memory),
                       "ratio_disk": old_disk / new_disk, "ratio_memory": old_memory / new_memory,
                       "new_memory_bytes_per_spot": new_memory / len(obs),
                       "note": "old: loso columns measured on a sample at full length and scaled by loso splits / "
                               "sampled; spatial columns (old and new) measured on the first slides and scaled by "
                               "spots / their spots; everything else measured whole"}
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["load_average_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["total"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
