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
import tracemalloc
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=2_100_000)
    parser.add_argument("--slides", type=int, default=1229)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--loso-sample", type=int, default=20, help="loso columns materialised in the old format")
    parser.add_argument("--out", default=str(HERE / "results" / "bench_split_table.json"))
    args = parser.parse_args()

    from agl.data.splits import split_table
    from agl.data.store import read_split_table, write_role_columns, write_split_table

    seeds = [int(s) for s in args.seeds.split(",")]
    obs = synthetic_obs(args.spots, args.slides)
    report: dict = {"command": "python scripts/split_table_bytes.py " + " ".join(sys.argv[1:]),
                    "n_spots": len(obs), "n_slides": int(obs["slide_id"].nunique()), "seeds": seeds,
                    "kinds": ["kfold", "spatial", "loso"], "n_folds": 5, "load_average_start": os.getloadavg()}
    started = time.perf_counter()
    table = split_table(obs, seeds=seeds)
    report["split_table_seconds"] = round(time.perf_counter() - started, 1)
    names = table.columns
    loso = [n for n in names if n.startswith("loso-")]
    within = [n for n in names if n not in loso]
    report["n_splits"] = {"all": len(names), "loso": len(loso), "kfold_spatial": len(within)}

    with tempfile.TemporaryDirectory(dir=HERE / "results") as tmp:
        tmp = Path(tmp)
        # ---- new: the compact table
        new_path = tmp / "split_table.parquet"
        write_split_table(table, new_path)
        per_column = column_bytes(new_path)
        lazy = read_split_table(new_path, len(obs))
        reads = {}
        for name in (loso[len(loso) // 2], within[0]):
            before = lazy.nbytes()
            t0 = time.perf_counter()
            lazy.codes(name)
            reads[name] = {"seconds": round(time.perf_counter() - t0, 3),
                           "column_bytes_loaded": lazy.nbytes() - before}
        report["new"] = {"memory_bytes": table.nbytes(), "memory_bytes_per_spot": table.nbytes() / len(obs),
                         "disk_bytes": new_path.stat().st_size, "disk_bytes_per_column": per_column,
                         "lazy_reads": reads, "lazy_memory_after_both_reads": lazy.nbytes(),
                         "columns": {k: str(v.dtype) for k, v in table.loaded().items()}}
        print(json.dumps(report["new"], indent=1), flush=True)

        # ---- old: object columns of role strings, splits.parquet
        spot_ids = (obs["slide_id"] + "_" + pd.Series(np.arange(len(obs))).astype(str)).to_numpy()
        sample = within + loso[:args.loso_sample]
        old_columns: dict[str, int] = {}
        old_memory = {}
        for i in range(0, len(sample), 10):  # ten columns at a time: bounded memory
            part = sample[i:i + 10]
            tracemalloc.start()
            frame = pd.DataFrame({n: table[n] for n in part}, dtype=object)
            traced, _ = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            for n in part:
                old_memory[n] = int(frame[n].memory_usage(index=False, deep=False))
            old_memory.setdefault("traced", 0)
            old_memory["traced"] += traced
            path = tmp / f"splits-{i}.parquet"
            write_role_columns(frame, spot_ids, path)
            sizes = column_bytes(path)
            old_columns.update({n: sizes[n] for n in part})
            if i == 0:
                old_columns["spot_id"] = sizes["spot_id"]
            path.unlink()
            del frame
        loso_sampled = [n for n in sample if n in loso]
        loso_disk = float(np.mean([old_columns[n] for n in loso_sampled]))
        loso_mem = float(np.mean([old_memory[n] for n in loso_sampled]))
        within_disk = sum(old_columns[n] for n in within)
        within_mem = sum(old_memory[n] for n in within)
        report["old"] = {
            "disk_bytes_estimated": int(old_columns["spot_id"] + within_disk + loso_disk * len(loso)),
            "memory_bytes_estimated": int(within_mem + loso_mem * len(loso)),
            "measured_columns": len(sample), "loso_columns_sampled": len(loso_sampled),
            "disk_bytes_spot_id": old_columns["spot_id"], "disk_bytes_per_loso_column": loso_disk,
            "disk_bytes_kfold_spatial_columns": within_disk, "memory_bytes_per_column": loso_mem,
            "memory_traced_for_sampled_columns": old_memory["traced"],
            "note": "loso columns: measured on the sample at full length, scaled by loso splits / sampled"}
    report["ratio_memory"] = report["old"]["memory_bytes_estimated"] / report["new"]["memory_bytes"]
    report["ratio_disk"] = report["old"]["disk_bytes_estimated"] / report["new"]["disk_bytes"]
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["load_average_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("new",)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
