"""``agl bench gpu``: the GPU path measured in one command (``scripts/gpu_check.sh``), at most ~8 min on one H100.

Sections, each guarded (a failing section records its error and the others still run):

- ``environment``: torch / CUDA / cuDNN / NCCL versions, the device and its memory;
- ``feature_cache``: images/s of the feature encoder, float32 vs bf16 + channels_last (MobileNetV2 with
  its offline ImageNet weights; ResNet-50 and a ViT-B/16 at random init), and the largest feature
  difference between the two;
- ``finetune_steps``: ResNet-18, 224 px, batch 64, all 13,949 outputs of the demo store: a plain step,
  then one outer step of ``forward_fd``, ``forward`` and ``unroll`` at H = 1, 2, 4, 12 where each fits;
  synchronised timing, medians of 3, the outer step in units of H plain steps, ``max_memory_allocated``;
- ``hypergradient_accuracy``: every estimator's hypergradient on a small conv + BN problem against the
  float64 CPU value, with TF32 off (as the estimators run) and on;
- ``ddp_two_workers``: the step time of 2 data-parallel workers, DDP vs the old flat all-reduce;
- ``serving``: 4-patch predict calls of the pyfunc model, the encoder built once vs per call;
- ``train_ray``: one ``agl train-ray --device DEVICE`` run; ``sweep``: a 2-trial sweep of
  ``--space finetune-gpu`` cut to one epoch; ``demo_job``: the README's main job (``launch/tune.py``).

Without CUDA (and without ``--device cpu``) it says so in one line and exits 0. ``--quick`` runs every
section at tiny sizes (the CI check that keeps the command working).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

JSON_NAME = "bench_gpu.json"
PNG_NAME = "bench_gpu.png"
SPLIT = "kfold-s0-f0"
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- timing
def synchronize(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: Any, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup``, synchronised on CUDA."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(device: Any) -> Callable[[], float | None]:
    """Reset the CUDA peak and return a function giving ``max_memory_allocated`` in MiB since (None on CPU)."""
    import torch

    if torch.device(device).type != "cuda":
        return lambda: None
    torch.cuda.reset_peak_memory_stats()
    return lambda: torch.cuda.max_memory_allocated() / 2**20


def _is_oom(err: BaseException) -> bool:
    return "out of memory" in str(err).lower()


# --------------------------------------------------------------------------- sections
def environment(device: str) -> dict[str, Any]:
    import platform

    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                           "device": device, "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
    return out


def feature_cache_throughput(store: Any, device: str, quick: bool) -> dict[str, Any]:
    """Encoder images/s over all 8 views, float32 vs bf16 + channels_last, and the largest feature difference."""
    import torch

    from agl.models import create_backbone
    from agl.models.features import encode_views

    encoders = ([("torchvision/mobilenet_v2", "imagenet"), ("torchvision/resnet18", None)] if quick else
                [("torchvision/mobilenet_v2", "imagenet"), ("timm/resnet50", None), ("timm/vit_base_patch16_224", None)])
    n, batch = (2, 2) if quick else (512, 64)
    px = 32 if quick else None
    patches = np.asarray(store.patches[:n])
    if px is not None:
        patches = np.ascontiguousarray(patches[:, :px, :px])
    rows = []
    for name, weights in encoders:
        row: dict[str, Any] = {"backbone": name, "weights": weights or "random", "patches": n, "views": 8}
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                module, _ = create_backbone(name, weights)
            module = module.to(device).eval().to(memory_format=torch.channels_last)
            feats = {}
            for precision in ("fp32", "bf16"):
                def run(precision: str = precision) -> np.ndarray:
                    return np.concatenate([encode_views(module, patches[s:s + batch], 8, device, precision)
                                           for s in range(0, n, batch)], axis=1)

                feats[precision] = run()  # also the warm-up
                seconds = timed(run, device, repeats=1 if quick else 3, warmup=0)
                row[f"images_per_s_{precision}"] = round(8 * n / seconds, 1)
            diff = np.abs(feats["fp32"] - feats["bf16"])
            row["max_abs_feature_diff"] = float(diff.max())
            row["max_rel_feature_diff"] = float(diff.max() / max(np.abs(feats["fp32"]).max(), 1e-12))
        except Exception as err:  # noqa: BLE001 - one encoder's failure keeps the others
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
    return {"rows": rows}


def _finetune_setup(store_path: str, device: str, quick: bool, precision: str = "bf16") -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from agl.training.bundles import make_bundle
    from agl.training.loop import TrainConfig, Trainer

    px, batch = (32, 4) if quick else (224, 64)
    cfg = TrainConfig(method="dkgsb", mode="finetune", backbone="torchvision/resnet18", weights=None, device=device,
                      precision=precision, seed=0, batch_size=batch, bilevel_batch_size=batch, inner_steps=1)
    data = make_bundle(store_path, SPLIT, cfg)
    tr = Trainer(cfg, data)

    def prepare(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = pair
        x = x.to(tr.device)
        if x.dtype == torch.uint8:
            from agl.data.loaders import normalise_uint8

            x = normalise_uint8(x)
        if x.shape[-1] != px:
            x = F.interpolate(x, size=(px, px), mode="bilinear", align_corners=False, antialias=True)
        return x, y.to(tr.device)

    train = prepare(next(iter(data.train_batches(batch, 0))))
    val = prepare(next(iter(data.val_batches(batch, 0))))
    return {"cfg": cfg, "tr": tr, "train": train, "val": val, "px": px, "batch": batch,
            "outputs": int(tr.n_out)}


def finetune_steps(store_path: str, device: str, quick: bool) -> dict[str, Any]:
    """Plain step vs one outer step per estimator and horizon (ResNet-18, 224 px, batch 64, every output)."""
    import torch

    from agl.training.bilevel import hypergradient
    from agl.training.precision import train_autocast

    s = _finetune_setup(store_path, device, quick)
    tr, cfg = s["tr"], s["cfg"]
    x, y = s["train"]
    repeats = 1 if quick else 3

    def plain() -> None:
        tr.model.train()
        tr.opt.zero_grad(set_to_none=True)
        with train_autocast(tr.device, cfg.precision):
            pred = tr.model(x.contiguous(memory_format=torch.channels_last) if tr.autocast is not None else x)
        tr.objective(pred, y, all_genes=False).backward()
        tr.opt.step()

    memory = peak_memory(tr.device)
    plain_s = timed(plain, tr.device, repeats)
    out: dict[str, Any] = {"backbone": "torchvision/resnet18", "px": s["px"], "batch": s["batch"],
                           "outputs": s["outputs"], "precision_plain": cfg.precision,
                           "plain_step_s": plain_s, "plain_max_memory_mib": memory(), "rows": []}
    horizons = [1] if quick else [1, 2, 4, 12]
    for method in ("forward_fd", "forward", "unroll"):
        for h in horizons:
            row: dict[str, Any] = {"method": method, "H": h}
            try:
                def outer(method: str = method, h: int = h) -> None:
                    tr.model.train()
                    tr.outer_opt.zero_grad(set_to_none=True)
                    hypergradient(tr.model, tr.gate, tr.loss_fn, s["train"], s["val"], tr.n_primary, inner_steps=h,
                                  inner_lr=cfg.lr, inner_optimizer=cfg.inner_optimizer, optimizer=tr.opt,
                                  method=method, accumulate=False)

                memory = peak_memory(tr.device)
                seconds = timed(outer, tr.device, repeats, warmup=0 if quick else 1)
                row.update(outer_step_s=seconds, per_h_plain_steps=seconds / (h * plain_s), max_memory_mib=memory())
            except Exception as err:  # noqa: BLE001 - an estimator that does not fit at this H
                row["error"] = "out of memory" if _is_oom(err) else f"{type(err).__name__}: {err}"
                if torch.device(tr.device).type == "cuda":
                    torch.cuda.empty_cache()
            out["rows"].append(row)
    return out


class _TinyBN:
    """A small conv + BN + MLP estimator problem on real patches (float64 reference on the CPU)."""

    @staticmethod
    def build(store: Any, quick: bool) -> dict[str, Any]:
        import torch
        from torch import nn

        from agl.models import Estimator
        from agl.models.features import to_model_input
        from agl.selection import create_gate

        torch.manual_seed(0)
        px, n, genes, aux = (16, 8, 12, 8) if quick else (64, 32, 40, 32)
        backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        model = Estimator(32, genes, trunk=(32,), dropout=0.0, backbone=backbone)
        gate = create_gate("dkgsb", aux, {"hvg": np.linspace(0, 1, aux)}, t_init=0.45, tau=0.1)
        x = to_model_input(np.ascontiguousarray(np.asarray(store.patches[:2 * n])[:, :px, :px]))
        y = torch.as_tensor(np.array(np.asarray(store.expression)[:2 * n, :genes], dtype=np.float32))
        return {"model": model, "gate": gate, "train": (x[:n], y[:n]), "val": (x[n:], y[n:]),
                "n_primary": genes - aux}


@contextlib.contextmanager
def _tf32_everywhere() -> Any:
    """TF32 on and the estimators' float32 guard bypassed (what the estimators ran under before)."""
    import torch

    from agl.training import precision

    saved, guard = precision.tf32_flags(), precision.full_float32
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    precision.full_float32 = contextlib.nullcontext
    try:
        yield
    finally:
        precision.full_float32 = guard
        torch.backends.cudnn.allow_tf32 = saved["cudnn_allow_tf32"]
        torch.backends.cuda.matmul.allow_tf32 = saved["matmul_allow_tf32"]
        torch.set_float32_matmul_precision(saved["float32_matmul_precision"])


def hypergradient_accuracy(store: Any, device: str, quick: bool) -> dict[str, Any]:
    """Each estimator on ``device`` (float32, TF32 off vs on) against the float64 CPU hypergradient."""
    import copy

    import torch

    from agl.training.bilevel import HYPERGRADIENTS, hypergradient
    from agl.training.losses import pearson_loss

    problem = _TinyBN.build(store, quick)

    def estimate(method: str, where: str, dtype: torch.dtype) -> np.ndarray:
        model = copy.deepcopy(problem["model"]).to(where, dtype).train()
        gate = copy.deepcopy(problem["gate"]).to(where, dtype)
        move = lambda pair: tuple(t.to(where, dtype) for t in pair)  # noqa: E731
        with torch.random.fork_rng(devices=[]):
            out = hypergradient(model, gate, pearson_loss, move(problem["train"]), move(problem["val"]),
                                problem["n_primary"], inner_steps=2, inner_lr=1e-2, inner_optimizer="adam",
                                method=method, accumulate=False)
        return torch.cat([g.reshape(-1) for g in out["hypergrad"]]).double().cpu().numpy()

    rows = []
    for method in HYPERGRADIENTS:  # first_order is one of the registered estimators
        row: dict[str, Any] = {"method": method}
        try:
            reference = estimate(method if method != "forward_fd" else "unroll", "cpu", torch.float64)
            scale = max(float(np.abs(reference).max()), 1e-30)
            row["reference_float64"] = reference.tolist()
            row["rel_error_tf32_off"] = float(np.abs(estimate(method, device, torch.float32) - reference).max() / scale)
            with _tf32_everywhere():
                row["rel_error_tf32_on"] = float(np.abs(estimate(method, device, torch.float32) - reference).max() / scale)
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
    return {"rows": rows, "note": "reference: float64 on CPU (forward_fd against the exact unroll)"}


def _ddp_worker(rank: int, world: int, store_path: str, out: str, use_ddp: bool, epochs: int, trunk: int) -> None:
    """One rank: ordinary training epochs on the demo store's pooled-colour features; rank 0 writes step times."""
    import torch

    from agl.training import bundles, ddp
    from agl.training.loop import TrainConfig, Trainer

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/pg-{int(use_ddp)}", rank=rank,
                                         world_size=world)
    try:
        ddp.USE_DDP = use_ddp
        bundles.INPUTS["features"] = lambda store, cfg: bundles.FeatureInputs(pooled_features(store))
        cfg = TrainConfig(method="topk", k=1000, mode="features", device="cpu", seed=0, batch_size=64, trunk=[trunk])
        data = bundles.make_bundle(store_path, SPLIT, cfg)
        tr = Trainer(cfg, data)
        n_batches = sum(1 for _ in data.train_batches(cfg.batch_size, 0))
        times = []
        for epoch in range(epochs):
            torch.distributed.barrier()
            start = time.perf_counter()
            tr.train_epoch(epoch, all_genes=False)
            times.append((time.perf_counter() - start) / n_batches)
        if rank == 0:
            Path(out, f"ddp-{int(use_ddp)}.json").write_text(json.dumps({"step_s": times, "steps": n_batches}))
    finally:
        torch.distributed.destroy_process_group()


def pooled_features(store: Any, grid: int = 4) -> np.ndarray:
    """[8, N, 3 grid^2] mean colours of a grid over each real patch under the 8 views (a cheap real input)."""
    from agl.data.augment import N_VIEWS, dihedral

    patches = np.asarray(store.patches)
    n, px = patches.shape[0], patches.shape[1]
    cell = px // grid
    cells = patches[:, : cell * grid, : cell * grid].reshape(n, grid, cell, grid, cell, 3).mean(axis=(2, 4),
                                                                                                dtype=np.float32)
    views = np.stack([np.ascontiguousarray(dihedral(cells / 255.0, k)).reshape(n, -1) for k in range(N_VIEWS)])
    return ((views - views.mean(axis=(0, 1))) / (views.std(axis=(0, 1)) + 1e-6)).astype(np.float32)


def ddp_two_workers(store_path: str, quick: bool) -> dict[str, Any]:
    """Per-step time of 2 gloo workers (CPU), the old flat all-reduce after backward vs DDP."""
    import torch.multiprocessing as mp

    epochs, trunk = (2, 64) if quick else (5, 512)
    out: dict[str, Any] = {"workers": 2, "backend": "gloo (CPU)", "trunk": trunk, "outputs": "all genes"}
    with tempfile.TemporaryDirectory(prefix="agl-ddp-") as tmp:
        for use_ddp in (False, True):
            mp.start_processes(_ddp_worker, args=(2, store_path, tmp, use_ddp, epochs, trunk), nprocs=2,
                               join=True, start_method="spawn")
            times = json.loads(Path(tmp, f"ddp-{int(use_ddp)}.json").read_text())
            key = "ddp" if use_ddp else "flat_allreduce"
            out[f"{key}_step_s"] = statistics.median(times["step_s"][1:] or times["step_s"])
            out["steps_per_epoch"] = times["steps"]
    out["speedup"] = out["flat_allreduce_step_s"] / out["ddp_step_s"]
    return out


def serving(store: Any, device: str, quick: bool) -> dict[str, Any]:
    """4-patch predict calls of the pyfunc model (features mode, MobileNetV2): encoder built once vs per call."""
    from agl.config import TrainConfig
    from agl.models import Estimator
    from agl.tracking.pyfunc import AglPyfuncModel
    from agl.training.inference import run_model

    n_genes = len(store.genes)
    served = AglPyfuncModel().serve(
        Estimator(1280, n_genes, trunk=(512,), dropout=0.0),
        TrainConfig(mode="features", backbone="torchvision/mobilenet_v2", weights="imagenet", device=device),
        [f"gene{i}" for i in range(n_genes)])
    patches = np.asarray(store.patches[:4])
    calls = 2 if quick else 10
    served.predict(None, patches)  # the first request builds the predictor
    once = [timed(lambda: served.predict(None, patches), device, 1, warmup=0) for _ in range(calls)]
    per_call = [timed(lambda: run_model(served.model, served.cfg, patches, 64, device), device, 1, warmup=0)
                for _ in range(calls)]
    return {"patches": 4, "calls": calls, "encoder_once_median_s": statistics.median(once),
            "encoder_per_call_median_s": statistics.median(per_call)}


def _agl(args: list[str], timeout: float, cwd: Path | None = None) -> dict[str, Any]:
    """Run ``agl ARGS`` (a child process of this one) and time it; the tail of its output on failure."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "agl.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)
    out: dict[str, Any] = {"command": "agl " + " ".join(args), "wall_s": round(time.perf_counter() - start, 1),
                           "returncode": proc.returncode}
    if proc.returncode:
        out["error"] = (proc.stdout + proc.stderr)[-2000:]
    return out


def train_ray(device: str, quick: bool, work: Path) -> dict[str, Any]:
    epochs = 1 if quick else 3
    return _agl(["train-ray", "--store", "demo", "--device", device, "--num-workers", "1",
                 "--set", f"epochs={epochs}", "--set", "method=dkgsb", "--set", "trunk=[64]" if quick else "trunk=[512]",
                 "--storage-path", str(work / "ray-train"), "--name", "bench-gpu"] +
                (["--num-cpus", "2"] if quick else []), timeout=600)


def _cut_space(space: str, work: Path, changes: dict[str, Any], num_samples: int) -> Path:
    """A copy of a bundled search space with ``fixed`` settings changed (e.g. one epoch)."""
    import yaml

    from agl.distributed.spaces import resolve_space_path

    raw = yaml.safe_load(Path(resolve_space_path(space)).read_text())
    raw["fixed"] = {**raw.get("fixed", {}), **changes}
    raw["num_samples"] = num_samples
    raw["scheduler"] = {"name": "fifo"}
    raw["start_with"] = []
    path = work / f"{space}-cut.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sweep(device: str, quick: bool, work: Path) -> dict[str, Any]:
    if quick:  # a finetune sweep on CPU takes far longer than a CI check: the tiny space on frozen features
        space = _cut_space("tiny", work, {"epochs": 1, "device": device}, 2)
    else:
        space = _cut_space("finetune-gpu", work, {"epochs": 1, "patience": 1}, 2)
    return _agl(["tune", "--space", str(space), "--store", "demo", "--out", str(work / "sweep"), "--num-samples", "2"]
                + (["--num-cpus", "2"] if quick else []), timeout=600)


def demo_job(quick: bool, work: Path) -> dict[str, Any]:
    """The README's main job (``launch/tune.py``: the default Optuna sweep on the demo), timed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    args = [sys.executable, str(REPO / "launch" / "tune.py"), "--out", str(work / "demo-job")]
    if quick:
        args += ["--space", str(_cut_space("tiny", work, {"epochs": 1}, 1)), "--num-samples", "1", "--num-cpus", "2"]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    out: dict[str, Any] = {"command": " ".join(args[1:]), "wall_s": round(time.perf_counter() - start, 1),
                           "returncode": proc.returncode}
    if proc.returncode:
        out["error"] = (proc.stdout + proc.stderr)[-2000:]
    return out


# --------------------------------------------------------------------------- driver
def run_bench_gpu(out: Path, device: str | None = None, quick: bool = False,
                  sections: list[str] | None = None) -> dict[str, Any] | None:
    """Run every section (or ``sections``) on ``device`` and write ``bench_gpu.json`` + PNG; None without CUDA."""
    import torch

    from agl.data.store import open_store
    from agl.datasets import her2st_demo_store
    from agl.errors import ConfigError

    if device is None:
        if not torch.cuda.is_available():
            print("agl bench gpu: CUDA is not available here; nothing measured (use --device cpu --quick to "
                  "check the command on a CPU)")
            return None
        device = "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device", f"{device} requested but CUDA is not available")
    store_path = str(her2st_demo_store())
    store = open_store(store_path)
    report: dict[str, Any] = {"device": device, "quick": quick, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="agl-bench-gpu-") as tmp:
        work = Path(tmp)
        plan: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("environment", lambda: environment(device)),
            ("feature_cache", lambda: feature_cache_throughput(store, device, quick)),
            ("finetune_steps", lambda: finetune_steps(store_path, device, quick)),
            ("hypergradient_accuracy", lambda: hypergradient_accuracy(store, device, quick)),
            ("ddp_two_workers", lambda: ddp_two_workers(store_path, quick)),
            ("serving", lambda: serving(store, device, quick)),
            ("train_ray", lambda: train_ray(device, quick, work)),
            ("sweep", lambda: sweep(device, quick, work)),
            ("demo_job", lambda: demo_job(quick, work)),
        ]
        for name, section in plan:
            if sections and name not in sections:
                continue
            start = time.perf_counter()
            try:
                report[name] = section()
            except Exception as err:  # noqa: BLE001 - one section's failure keeps the others
                report[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            report[name]["section_s"] = round(time.perf_counter() - start, 1)
            log.info("bench gpu: %s done in %.1f s", name, report[name]["section_s"])
            _write(report, out)
    _plot(report, out / PNG_NAME)
    print(summary(report))
    return report


def _write(report: dict[str, Any], out: Path) -> None:
    from agl.fileio import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / JSON_NAME, report, indent=1, default=str)


def summary(report: dict[str, Any]) -> str:
    """The figures as plain text lines."""
    lines = [f"agl bench gpu on {report['device']}{' (quick)' if report['quick'] else ''}"]
    env = report.get("environment", {})
    if "gpu" in env:
        lines.append(f"  {env['gpu']} ({env['gpu_memory_gib']} GiB), torch {env['torch']}, CUDA {env['cuda_build']}, "
                     f"cuDNN {env['cudnn']}, NCCL {env.get('nccl')}")
    for row in report.get("feature_cache", {}).get("rows", []):
        lines.append(f"  features {row['backbone']}: " + (row["error"] if "error" in row else
                     f"{row['images_per_s_fp32']:.0f} img/s fp32, {row['images_per_s_bf16']:.0f} img/s bf16+CL, "
                     f"max rel diff {row['max_rel_feature_diff']:.2e}"))
    steps = report.get("finetune_steps", {})
    if "plain_step_s" in steps:
        lines.append(f"  plain step {steps['plain_step_s'] * 1e3:.1f} ms ({steps['backbone']}, {steps['px']} px, "
                     f"batch {steps['batch']}, {steps['outputs']} outputs)")
        for row in steps["rows"]:
            lines.append(f"    {row['method']:>10} H={row['H']:<2} " + (row["error"] if "error" in row else
                         f"{row['outer_step_s'] * 1e3:.1f} ms = {row['per_h_plain_steps']:.2f} x H plain steps"))
    for row in report.get("hypergradient_accuracy", {}).get("rows", []):
        lines.append(f"  hypergradient {row['method']:>12}: " + (row["error"] if "error" in row else
                     f"rel. error vs float64 {row['rel_error_tf32_off']:.1e} (TF32 off), {row['rel_error_tf32_on']:.1e} (on)"))
    ddp = report.get("ddp_two_workers", {})
    if "ddp_step_s" in ddp:
        lines.append(f"  2 workers: {ddp['flat_allreduce_step_s'] * 1e3:.1f} ms/step flat all-reduce, "
                     f"{ddp['ddp_step_s'] * 1e3:.1f} ms/step DDP")
    srv = report.get("serving", {})
    if "encoder_once_median_s" in srv:
        lines.append(f"  serving 4 patches: {srv['encoder_once_median_s']:.3f} s (encoder built once), "
                     f"{srv['encoder_per_call_median_s']:.3f} s (built per call)")
    for name in ("train_ray", "sweep", "demo_job"):
        part = report.get(name, {})
        if "wall_s" in part:
            lines.append(f"  {name}: {part['wall_s']} s" + (" FAILED" if part.get("returncode") else ""))
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    if failed:
        lines.append(f"  sections that failed: {', '.join(failed)}")
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    """Images/s per encoder (fp32 vs bf16) and outer-step cost per H (in plain steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in report.get("feature_cache", {}).get("rows", []) if "error" not in r]
    xs = np.arange(len(rows))
    left.bar(xs - 0.2, [r["images_per_s_fp32"] for r in rows], 0.4, label="fp32")
    left.bar(xs + 0.2, [r["images_per_s_bf16"] for r in rows], 0.4, label="bf16 + channels_last")
    left.set_xticks(xs, [r["backbone"].split("/")[-1] for r in rows], fontsize=8)
    left.set_ylabel("images/s (8 views per patch)")
    left.set_title(f"feature cache on {report['device']}")
    left.legend()
    steps = report.get("finetune_steps", {}).get("rows", [])
    for method in dict.fromkeys(r["method"] for r in steps):
        ok = [r for r in steps if r["method"] == method and "error" not in r]
        right.plot([r["H"] for r in ok], [r["per_h_plain_steps"] for r in ok], marker="o", label=method)
    right.set_xlabel("H (inner steps)")
    right.set_ylabel("outer step / (H plain steps)")
    right.set_title("fine-tune outer step cost")
    if steps:
        right.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
