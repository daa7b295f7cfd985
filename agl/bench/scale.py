"""``agl bench scale``: streaming ingest of N x the real demo sections, N = 1, 2, 4, ...

The 5 bundled her2st sections are relabelled ``{section}-r{k}`` for k < N, so a store
of N copies has 5N distinct slides and about 1,000N spots. Each N runs in a fresh
subprocess (its peak RSS is its own, ``ru_maxrss``), on a fresh local Ray by default (one
task per slide and pass, as ``agl ingest --address local``), once with each expression
layout, and reports ingest wall time, CPU seconds (user + system of the driver and every
Ray process, :class:`CpuClock`: robust to a loaded machine), driver peak RSS, the Ray processes' peak RSS (each
process's own peak, and their sampled sum), store size on disk (dense vs sparse: whole
store, expression arrays, expression columns of the partitions; density and bytes per
non-zero) and spots/s; then feature-cache images/s in process and on Ray Data with 1 and 2
workers (demo store). It states whether the issue's targets are met (peak memory flat
within 20% from N = 2 to the largest N, time linear in N, sparse expression at most 0.3x the
dense one) and writes JSON + PNG under ``--out`` with a back-of-envelope HEST-1k table
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
HEST_GENES = 18_000
# no GPU was measured here: the HEST table's GPU hours use this rate for a frozen MobileNetV2 at 224 px, labelled
# as assumed in the output (an order of magnitude for one data-centre GPU with a fed input pipeline)
ASSUMED_GPU_IMAGES_PER_S = 2000


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


class RayMemory:
    """A daemon thread that samples, every ``interval_s``, the driver's descendant processes (a local Ray's
    GCS, raylet, agents and workers): their summed RSS (peak over the samples), and each process's own
    peak RSS (``VmHWM`` in ``/proc/PID/status``, exact: the kernel keeps it), so a worker's peak between
    two samples is not missed. Workers are the processes Ray names ``ray::...`` or runs ``default_worker.py``.

    CPU seconds (user + system) of each process too, the last value seen: Ray's raylet does not
    wait for its workers (they end unreaped into ``RUSAGE_CHILDREN``), so their time is only
    seen while they run. A process loses at most its last ``interval_s``; the final sample
    (on exit from the ``with`` block, before ``ray.shutdown``) sees every live worker's total.
    The sampler thread's own CPU time is kept apart (``sampler_cpu_s``), as it runs in the driver.
    """

    def __init__(self, interval_s: float = 0.25):
        import threading

        self.interval_s = interval_s
        self.peak_total_mb = 0.0
        self.hwm_mb: dict[int, tuple[str, float]] = {}  # pid -> (kind, peak RSS MB)
        self.cpu_s: dict[int, float] = {}  # pid -> user + system seconds (its reaped children's too), last seen
        self.sampler_cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="agl-bench-scale-memory", daemon=True)

    def __enter__(self) -> "RayMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()

    def sample(self) -> None:
        import psutil

        total = 0.0
        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        for proc in children:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                cmd = " ".join(proc.cmdline())
                name = proc.name()
                times = proc.cpu_times()
            except (OSError, psutil.Error):  # ended between listing and reading
                continue
            self.cpu_s[proc.pid] = max(self.cpu_s.get(proc.pid, 0.0), times.user + times.system
                                       + times.children_user + times.children_system)
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            rss = int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
            hwm = int(fields.get("VmHWM", "0 kB").split()[0]) / 1024
            kind = "worker" if name.startswith("ray::") or "default_worker.py" in cmd else "ray system"
            total += rss
            self.hwm_mb[proc.pid] = (kind, max(hwm, self.hwm_mb.get(proc.pid, ("", 0.0))[1]))
        self.peak_total_mb = max(self.peak_total_mb, total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()
        self.sampler_cpu_s = time.thread_time()

    def summary(self) -> dict[str, Any]:
        workers = [mb for kind, mb in self.hwm_mb.values() if kind == "worker"]
        system = [mb for kind, mb in self.hwm_mb.values() if kind != "worker"]
        return {"ray_peak_total_rss_mb": self.peak_total_mb, "ray_sum_of_process_peaks_mb": sum(workers + system),
                "worker_peak_rss_mb": max(workers, default=0.0), "ray_workers": len(workers),
                "ray_system_peak_rss_mb": sum(system), "ray_processes": len(self.hwm_mb),
                "cpu_s_ray": sum(self.cpu_s.values())}


def expression_bytes(path: Path) -> dict[str, int]:
    """Bytes of the expression on disk: the memory-mapped arrays, and the partitions' expression columns
    (compressed column chunks from the Parquet footers), and the patch column for comparison."""
    import pyarrow.parquet as pq

    columns = {"expression": 0, "patch": 0}
    for f in sorted((path / "spots").glob("slide_id=*/part-0.parquet")):
        meta = pq.ParquetFile(f).metadata
        for r in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                chunk = meta.row_group(r).column(c)
                top = chunk.path_in_schema.split(".")[0]
                key = "expression" if top.startswith("expression") else top
                if key in columns:
                    columns[key] += chunk.total_compressed_size
    return {"expression_array_bytes": _du(path / "arrays", "expression*.arrow"),
            "expression_partition_bytes": columns["expression"], "patch_partition_bytes": columns["patch"],
            "patch_array_bytes": _du(path / "arrays", "patches.arrow")}


def run_one(copies: int, layout: str, out: str, address: str | None = None) -> dict[str, Any]:
    """One ingest in this process (called in a subprocess by :func:`bench_scale`); ``address`` "local": on a
    local Ray (one task per slide and pass), whose processes' memory is sampled."""
    import resource

    from agl.data.ingest import IngestSettings, ingest_slides
    from agl.data.store import open_store

    own = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with RayMemory() as memory:
        path = ingest_slides(RelabelledDemo(copies), Path(out), IngestSettings(expression_layout=layout, seeds=(0,)),
                             address=address)
        seconds = time.perf_counter() - t0
    end = resource.getrusage(resource.RUSAGE_SELF)  # before ray.shutdown, as the sampler's last look at Ray
    if address is not None:
        import ray

        ray.shutdown()
    ray_cpu = memory.summary()["cpu_s_ray"]
    driver_cpu = end.ru_utime + end.ru_stime - own.ru_utime - own.ru_stime - memory.sampler_cpu_s
    cpu = {"cpu_s": driver_cpu + ray_cpu, "cpu_s_driver": driver_cpu, "cpu_s_sampler": memory.sampler_cpu_s}
    store = open_store(path)
    manifest = store.manifest
    nnz = int(store._csr_arrays[0][-1]) if layout == "sparse" else None
    row = {"copies": copies, "layout": layout, "mode": "in-process" if address is None else f"ray ({address})",
           "slides": len(manifest["slides"]), "spots": manifest["n_spots"], "genes": manifest["n_genes"],
           "seconds": seconds, "spots_per_s": manifest["n_spots"] / seconds, **cpu, "load_avg_1m": os.getloadavg()[0],
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "store_bytes": _du(path), "partition_bytes": _du(path / "spots"), **expression_bytes(path),
           "expression_encoding": manifest.get("expression_encoding"), **memory.summary()}
    if nnz is not None:
        row.update(nnz=nnz, density=nnz / (manifest["n_spots"] * manifest["n_genes"]),
                   array_bytes_per_nonzero=row["expression_array_bytes"] / nnz,
                   partition_bytes_per_nonzero=row["expression_partition_bytes"] / nnz)
    return row


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


def _subprocess_result(code: str, args: list[str], what: str) -> dict[str, Any]:
    """Run ``code`` in a fresh Python (its peak RSS is its own) and parse its ``RESULT {json}`` line."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least squares ``y = a + b x``, its R^2 and the largest residual relative to y."""
    import numpy as np

    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    b, a = np.polyfit(x, y, 1)
    fit = a + b * x
    ss_res, ss_tot = float(((y - fit) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return {"intercept": float(a), "slope": float(b), "r2": 1 - ss_res / ss_tot if ss_tot else 1.0,
            "max_rel_residual": float(np.max(np.abs(y - fit) / y))}


def verdicts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's three targets, from the measured rows (sparse layout: the one streamed stores use)."""
    sparse = {r["copies"]: r for r in rows if r["layout"] == "sparse"}
    dense = {r["copies"]: r for r in rows if r["layout"] == "dense"}
    ns = sorted(sparse)
    from_2 = [n for n in ns if n >= 2] or ns
    memory = {}
    for key in ("peak_rss_mb", "worker_peak_rss_mb", "ray_peak_total_rss_mb"):
        values = [sparse[n][key] for n in from_2]
        if min(values) > 0:
            memory[key] = {"max_over_n2": max(values) / values[0], "flat_within_20pct": max(values) / values[0] <= 1.2
                           and min(values) / values[0] >= 0.8}
    fit = linear_fit(ns, [sparse[n]["seconds"] for n in ns]) if len(ns) >= 3 else None
    cpu_fit = linear_fit(ns, [sparse[n]["cpu_s"] for n in ns]) if len(ns) >= 3 and all(
        "cpu_s" in sparse[n] for n in ns) else None
    both = [n for n in ns if n in dense]
    size = {n: {"expression_arrays": sparse[n]["expression_array_bytes"] / dense[n]["expression_array_bytes"],
                "expression_arrays_and_partitions":
                    (sparse[n]["expression_array_bytes"] + sparse[n]["expression_partition_bytes"])
                    / (dense[n]["expression_array_bytes"] + dense[n]["expression_partition_bytes"]),
                "whole_store": sparse[n]["store_bytes"] / dense[n]["store_bytes"]} for n in both}
    return {"memory_flat_n2_to_max": memory,
            "time_linear": None if fit is None else {**fit, "linear": fit["r2"] >= 0.99},
            "cpu_time_linear": None if cpu_fit is None else {**cpu_fit, "linear": cpu_fit["r2"] >= 0.99},
            "sparse_over_dense": size,
            "sparse_at_most_0.3x_dense_expression": all(v["expression_arrays"] <= 0.3 for v in size.values())
            if size else None}


def hest_estimate(rows: list[dict[str, Any]], rates: dict[str, float] | None, workers: int) -> dict[str, Any]:
    """Back-of-envelope HEST-1k figures, linear in spots from the largest sparse N measured."""
    sparse = {r["copies"]: r for r in rows if r["layout"] == "sparse"}
    big = sparse[max(sparse)]
    spots = big["spots"]
    gene_scale = HEST_GENES / big["genes"]  # non-zeros per spot assumed to grow with the gene count
    patch = (big["patch_partition_bytes"] + big["patch_array_bytes"]) / spots
    expression = (big["expression_array_bytes"] + big["expression_partition_bytes"]) / spots * gene_scale
    per_worker = big["spots_per_s"] / max(1, workers)
    out = {"spots": HEST_SPOTS, "slides": HEST_SLIDES, "genes": HEST_GENES, "from_n": big["copies"],
           "disk_gb": {"patches (Parquet + memory-mapped copy)": patch * HEST_SPOTS / 1e9,
                       "expression, sparse (arrays + Parquet)": expression * HEST_SPOTS / 1e9,
                       "expression, dense float32 arrays alone": 4 * HEST_GENES * HEST_SPOTS / 1e9},
           "memory_per_worker_mb": big.get("worker_peak_rss_mb"),
           "driver_peak_mb_here": big["peak_rss_mb"],
           "ingest_spots_per_s_per_worker": per_worker,
           "ingest_hours": {str(k): HEST_SPOTS / (k * per_worker) / 3600 for k in (1, 8, 32, 128)},
           **_cpu_hours(big),
           "note": (f"linear in spots from N={big['copies']} ({spots} spots, {big['slides']} slides, "
                    f"{big['genes']} genes); sparse expression scaled by {HEST_GENES}/{big['genes']} genes; memory "
                    "per worker is one her2st section (image ~9.3k x 9.9k px, 276 MB decoded, + its patches): a "
                    "HEST WSI of 20-100k px decoded whole needs 1.2-30 GB on top, read tile-wise only its patches "
                    "(150 KB a spot at 224 px)")}
    if rates:
        cpu = rates.get("ray_1_workers") or rates["in_process"]
        out["feature_images_per_s_cpu_worker"] = cpu
        out["feature_hours_8_views"] = {f"{k} CPU workers (measured rate)": HEST_SPOTS * 8 / (k * cpu) / 3600
                                        for k in (1, 8, 32, 128)}
        out["feature_hours_8_views"].update(
            {f"{k} GPUs (assumed {ASSUMED_GPU_IMAGES_PER_S} img/s each, not measured)":
             HEST_SPOTS * 8 / (k * ASSUMED_GPU_IMAGES_PER_S) / 3600 for k in (1, 4, 8, 16)})
    return out


def _cpu_hours(row: dict[str, Any]) -> dict[str, Any]:
    """HEST-1k ingest hours from CPU seconds (not slowed by other users of the machine): the driver's share runs
    once, serially; the Ray processes' share divides over K free cores."""
    if not row.get("cpu_s"):
        return {}
    driver_h = HEST_SPOTS * row["cpu_s_driver"] / row["spots"] / 3600
    ray_h = HEST_SPOTS * row["cpu_s_ray"] / row["spots"] / 3600
    return {"ingest_cpu_hours": {"driver (serial)": driver_h, "Ray processes": ray_h},
            "ingest_hours_from_cpu": {str(k): driver_h + ray_h / k for k in (1, 8, 32, 128)}}


def bench_scale(out_dir: str | Path = "results", max_n: int = 16, echo: Callable[[str], None] = print,
                features: bool = True, address: str | None = "local", dense_max_n: int | None = None,
                ns: list[int] | None = None) -> dict[str, Any]:
    """Ingest N x the demo sections for each N (sparse; dense up to ``dense_max_n``), JSON + PNG under ``out_dir``.

    ``address``: "local" runs each ingest on a fresh local Ray (memory of all its processes
    sampled), None in one process.
    """
    ns = [n for n in (ns or (1, 2, 4, 8, 16)) if n <= max_n]
    dense_max_n = max(ns) if dense_max_n is None else dense_max_n
    rows = []
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    for n in ns:
        for layout in ("sparse", "dense") if n <= dense_max_n else ("sparse",):
            with tempfile.TemporaryDirectory(prefix="agl-scale-") as tmp:
                code = ("import json, sys; from agl.bench.scale import run_one; "
                        f"print('RESULT ' + json.dumps(run_one({n}, {layout!r}, sys.argv[1], {address!r})))")
                row = _subprocess_result(code, [str(Path(tmp) / "store")], f"N={n} {layout}")
            rows.append(row)
            elapsed = time.perf_counter() - t_start
            echo(f"N={n:<3} {layout:<6} {row['spots']:>6} spots {row['seconds']:>6.1f} s {row['spots_per_s']:>5.1f} "
                 f"spots/s  CPU {row['cpu_s']:>6.1f} s ({row['cpu_s_driver']:.1f} driver + {row['cpu_s_ray']:.1f} Ray)"
                 f"  driver {row['peak_rss_mb']:>5.0f} MB  worker {row['worker_peak_rss_mb']:>5.0f} MB  "
                 f"Ray total {row['ray_peak_total_rss_mb']:>5.0f} MB  store {row['store_bytes'] / 1e6:>7.1f} MB  "
                 f"expression {row['expression_array_bytes'] / 1e6:>6.1f} + {row['expression_partition_bytes'] / 1e6:.1f}"
                 f" MB (bench {elapsed:.0f} s)")
            if layout == "sparse":
                echo(f"       density {row['density']:.4f}, {row['array_bytes_per_nonzero']:.2f} bytes per non-zero in "
                     f"arrays/, {row['partition_bytes_per_nonzero']:.2f} in Parquet ({row['expression_encoding']})")
    result: dict[str, Any] = {"ns": ns, "mode": "in-process" if address is None else f"ray ({address})",
                              "load_avg_start": load_start,
                              "workers": os.cpu_count() if address else 1, "rows": rows, **verdicts(rows)}
    rates = None
    if features:
        code = "import json; from agl.bench.scale import feature_rates; print('RESULT ' + json.dumps(feature_rates()))"
        rates = _subprocess_result(code, [], "feature-cache rates")
        result["feature_cache_images_per_s"] = rates
        echo("feature cache (demo store, MobileNetV2, 1 view): "
             + ", ".join(f"{k} {v:.1f} img/s" for k, v in rates.items()))
    result["hest_1k_estimate"] = hest = hest_estimate(rows, rates, result["workers"])
    result["bench_seconds"] = time.perf_counter() - t_start
    result["load_avg_end"] = os.getloadavg()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench_scale.json", result, indent=1)
    _plot(result, out / "bench_scale.png")
    for n, v in result["sparse_over_dense"].items():
        echo(f"N={n}: sparse/dense expression arrays {v['expression_arrays']:.3f}, arrays + partitions "
             f"{v['expression_arrays_and_partitions']:.3f}, whole store {v['whole_store']:.3f}")
    echo(f"targets: memory flat N=2..{max(ns)}: {result['memory_flat_n2_to_max']}; wall time linear: "
         f"{result['time_linear']}; CPU time linear: {result['cpu_time_linear']}; sparse <= 0.3x dense (expression arrays): "
         f"{result['sparse_at_most_0.3x_dense_expression']}")
    echo(f"HEST-1k back-of-envelope: {json.dumps(hest, indent=1)}")
    echo(f"wrote {out / 'bench_scale.json'} and {out / 'bench_scale.png'}")
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    axes = axes.ravel()
    for layout, style in (("sparse", "o-"), ("dense", "s--")):
        rows = [r for r in result["rows"] if r["layout"] == layout]
        n = [r["copies"] for r in rows]
        axes[0].plot(n, [r["seconds"] for r in rows], style, label=f"wall, {layout}")
        axes[0].plot(n, [r.get("cpu_s", float("nan")) for r in rows], style, alpha=0.5,
                     label=f"CPU (driver + Ray), {layout}")
        axes[1].plot(n, [r["peak_rss_mb"] for r in rows], style, label=f"driver, {layout}")
        axes[2].plot(n, [r["worker_peak_rss_mb"] for r in rows], style, label=f"largest worker peak, {layout}")
        axes[2].plot(n, [r["ray_peak_total_rss_mb"] for r in rows], style, alpha=0.5,
                     label=f"all Ray processes (sum, sampled), {layout}")
        axes[3].plot(n, [r["store_bytes"] / 1e6 for r in rows], style, label=f"whole store, {layout}")
        axes[4].plot(n, [(r["expression_array_bytes"] + r["expression_partition_bytes"]) / 1e6 for r in rows], style,
                     label=f"{layout}: arrays + Parquet")
        axes[4].plot(n, [r["expression_array_bytes"] / 1e6 for r in rows], style, alpha=0.5, label=f"{layout}: arrays/")
    titles = ("ingest time (s): wall and CPU", "driver peak RSS (MB)", "Ray processes' peak RSS (MB)", "store size (MB)",
              "expression on disk (MB)")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("N x the 5 demo sections (~1,000 spots per N)")
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    for ax in axes[3:5]:
        ax.set_yscale("log")
    rates = result.get("feature_cache_images_per_s")
    if rates:
        axes[5].bar(list(rates), list(rates.values()), color=["#888", "#4a7", "#27a"][:len(rates)])
        axes[5].set_title("feature cache, demo store (images/s)")
        axes[5].tick_params(axis="x", labelsize=8)
    else:
        axes[5].axis("off")
    fig.suptitle(f"agl bench scale ({result['mode']}, {result['workers']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
