"""``agl bench scale``: streaming ingest of N x the real demo sections, N = 1, 2, 4, ...

The 5 bundled her2st sections are relabelled ``{section}-r{k}`` for k < N, so a store
of N copies has 5N distinct slides and about 1,015N spots. Each N runs in a fresh
subprocess (its peak RSS is its own, ``ru_maxrss``), once with each expression layout,
and reports ingest wall time, driver peak RSS, store size on disk (dense vs sparse
expression) and spots/s; JSON + PNG under ``--out``, and a back-of-envelope HEST-1k table
(2.1 million spots, 18k genes) extrapolated from the largest N measured.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from agl.fileio import atomic_write_json

log = logging.getLogger(__name__)

HEST_SPOTS = 2_100_000
HEST_SLIDES = 1_229


class RelabelledDemo:
    """The demo sections, ``copies`` times, each copy under new slide ids (picklable slide source)."""

    def __init__(self, copies: int):
        from agl.datasets import HER2ST_DEMO_SECTIONS

        self.copies = copies
        self.units = [f"{s}-r{k}" for k in range(copies) for s in HER2ST_DEMO_SECTIONS]

    def __call__(self, unit: str):
        from agl.data.schema import OBS_SLIDE, UNS_SLIDES, spot_index
        from agl.datasets import her2st_demo

        section = unit.rsplit("-r", 1)[0]
        adata = her2st_demo([section])
        adata.obs[OBS_SLIDE] = unit
        adata.obs_names = [spot_index(unit, b) for b in adata.obs["barcode"].astype(str)]
        adata.uns[UNS_SLIDES] = {unit: adata.uns[UNS_SLIDES][section]}
        return adata


def _du(path: Path, pattern: str = "**/*") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


def run_one(copies: int, layout: str, out: str) -> dict[str, Any]:
    """One ingest in this process (called in a subprocess by :func:`bench_scale`)."""
    import resource

    from agl.data.ingest import IngestSettings, ingest_slides

    t0 = time.perf_counter()
    path = ingest_slides(RelabelledDemo(copies), Path(out), IngestSettings(expression_layout=layout, seeds=(0,)))
    seconds = time.perf_counter() - t0
    manifest = json.loads((path / "manifest.json").read_text())
    arrays = path / "arrays"
    return {"copies": copies, "layout": layout, "slides": len(manifest["slides"]), "spots": manifest["n_spots"],
            "genes": manifest["n_genes"], "seconds": seconds, "spots_per_s": manifest["n_spots"] / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "store_bytes": _du(path), "expression_array_bytes": _du(arrays, "expression*.arrow"),
            "partition_bytes": _du(path / "spots")}


def feature_rates(workers: tuple[int, ...] = (1, 2), views: int = 1) -> dict[str, float]:
    """Feature-cache images/s on the demo store: in process, then on Ray Data with each worker count.

    Each run computes a fresh cache (a scratch copy of the store), MobileNetV2 ImageNet weights,
    ``views`` dihedral views; measured one after another in this process, so the ratios compare.
    """
    import shutil

    from agl.data.locate import open_store_arg
    from agl.data.store import open_store
    from agl.distributed.features import feature_cache_ray
    from agl.distributed.runtime import init_ray
    from agl.models.features import feature_cache

    demo = open_store_arg("demo")
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="agl-featrate-") as tmp:
        def fresh(name: str) -> Any:
            dst = Path(tmp) / name
            shutil.copytree(demo.path, dst, ignore=shutil.ignore_patterns("cache"))
            return open_store(dst)

        store = fresh("local")
        t0 = time.perf_counter()
        feature_cache(store, views=views)
        rates["in_process"] = views * store.patches.shape[0] / (time.perf_counter() - t0)
        import ray

        init_ray(num_cpus=max(workers))
        try:
            for w in workers:
                store = fresh(f"ray{w}")
                t0 = time.perf_counter()
                feature_cache_ray(store, views=views, num_workers=w)
                rates[f"ray_{w}_workers"] = views * store.patches.shape[0] / (time.perf_counter() - t0)
        finally:
            ray.shutdown()
    return rates


def bench_scale(out_dir: str | Path = "results", max_n: int = 16, echo: Callable[[str], None] = print,
                features: bool = True) -> dict[str, Any]:
    ns = [n for n in (1, 2, 4, 8, 16) if n <= max_n]
    rows = []
    t_start = time.perf_counter()
    for n in ns:
        for layout in ("sparse", "dense"):
            with tempfile.TemporaryDirectory(prefix="agl-scale-") as tmp:
                code = ("import json, sys; from agl.bench.scale import run_one; "
                        f"print('RESULT ' + json.dumps(run_one({n}, {layout!r}, sys.argv[1])))")
                proc = subprocess.run([sys.executable, "-c", code, str(Path(tmp) / "store")], capture_output=True,
                                      text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if proc.returncode != 0:
                    raise RuntimeError(f"N={n} {layout} failed:\n{proc.stderr[-3000:]}")
                row = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
            rows.append(row)
            elapsed = time.perf_counter() - t_start
            echo(f"N={n:<3} {layout:<6} {row['spots']:>7} spots {row['seconds']:>7.1f} s {row['spots_per_s']:>7.1f} "
                 f"spots/s  peak RSS {row['peak_rss_mb']:>7.0f} MB  store {row['store_bytes'] / 1e6:>8.1f} MB  "
                 f"expression arrays {row['expression_array_bytes'] / 1e6:>7.1f} MB  (bench {elapsed:.0f} s)")
    sparse = {r["copies"]: r for r in rows if r["layout"] == "sparse"}
    dense = {r["copies"]: r for r in rows if r["layout"] == "dense"}
    big = sparse[max(sparse)]
    per_spot_disk = big["store_bytes"] / big["spots"]
    hest = {"spots": HEST_SPOTS, "slides": HEST_SLIDES,
            "disk_gb_sparse_store": per_spot_disk * HEST_SPOTS / 1e9,
            "ingest_hours_one_process": HEST_SPOTS / big["spots_per_s"] / 3600,
            "note": "extrapolated linearly from the largest N measured here (her2st genes ~14k; HEST ~18k, so "
                    "expression grows ~1.3x); per-worker memory is one slide's image + patches"}
    result = {"ns": ns, "rows": rows,
              "sparse_over_dense_expression": {n: sparse[n]["expression_array_bytes"] / dense[n]["expression_array_bytes"]
                                               for n in sparse},
              "sparse_over_dense_store": {n: sparse[n]["store_bytes"] / dense[n]["store_bytes"] for n in sparse},
              "peak_rss_ratio_max_over_n2": (max(r["peak_rss_mb"] for r in sparse.values())
                                             / sparse[min(2, max(sparse))]["peak_rss_mb"]),
              "hest_1k_estimate": hest}
    if features:
        code = "import json; from agl.bench.scale import feature_rates; print('RESULT ' + json.dumps(feature_rates()))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"feature-cache rates failed:\n{proc.stderr[-3000:]}")
        rates = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        result["feature_cache_images_per_s"] = rates
        echo("feature cache (demo store, MobileNetV2, 1 view): "
             + ", ".join(f"{k} {v:.1f} img/s" for k, v in rates.items()))
        hest["feature_hours_per_worker_8_views"] = HEST_SPOTS * 8 / rates.get("ray_1_workers", rates["in_process"]) / 3600
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench_scale.json", result, indent=1)
    _plot(result, out / "bench_scale.png")
    echo(f"sparse/dense expression arrays: {result['sparse_over_dense_expression']}; store: "
         f"{ {n: round(v, 3) for n, v in result['sparse_over_dense_store'].items()} }")
    echo(f"HEST-1k back-of-envelope: {hest['disk_gb_sparse_store']:.0f} GB on disk, "
         f"{hest['ingest_hours_one_process']:.1f} h in one process at {big['spots_per_s']:.0f} spots/s")
    echo(f"wrote {out / 'bench_scale.json'} and {out / 'bench_scale.png'}")
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for layout, style in (("sparse", "o-"), ("dense", "s--")):
        rows = [r for r in result["rows"] if r["layout"] == layout]
        n = [r["copies"] for r in rows]
        axes[0].plot(n, [r["seconds"] for r in rows], style, label=layout)
        axes[1].plot(n, [r["peak_rss_mb"] for r in rows], style, label=layout)
        axes[2].plot(n, [r["store_bytes"] / 1e6 for r in rows], style, label=layout)
    for ax, title in zip(axes, ("ingest wall time (s)", "driver peak RSS (MB)", "store size (MB)")):
        ax.set_xlabel("N x demo sections (5 slides, ~1,015 spots each)")
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
