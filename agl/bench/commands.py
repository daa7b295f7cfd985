"""``agl bench WHAT``: every benchmark's command, registered here (core, data, ray, load, scale, cohort).

Each benchmark prints its figures and writes JSON (and a PNG where there is a plot) under
``--out`` (default ``results/``). A new benchmark is a module in ``agl/bench/`` plus one
entry of the ``BENCHMARKS`` registry below.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, NamedTuple

from agl.commands import int_list
from agl.data.locate import add_store_arg, open_store_arg
from agl.errors import ConfigError
from agl.registry import Registry


# --------------------------------------------------------------------------- agl bench core
def cmd_bench_core(args: argparse.Namespace) -> int:
    from agl.bench.core import run_bench_core, run_bench_hypergrad

    if args.horizons or args.finetune_horizons:
        skip = _pairs(args.skip, "--skip", key=str) or None
        run_bench_hypergrad(open_store_arg(args.store), Path(args.out), int_list(args.horizons, "--horizons"),
                            int_list(args.finetune_horizons, "--finetune-horizons"), args.repeats, args.finetune_repeats,
                            args.finetune_backbone, args.finetune_batch, args.patch_px if args.patch_px != 112 else 224,
                            args.threads, skip, memory_horizons=int_list(args.memory_horizons, "--memory-horizons") or None,
                            finetune_repeats_at=_pairs(args.finetune_repeats_at, "--finetune-repeats-at"),
                            finetune_methods=[m for m in args.finetune_methods.split(",") if m] or None,
                            feature_methods=[m for m in args.methods.split(",") if m] or None,
                            cache_patches=args.cache_patches,
                            repeats_at=_pairs(args.repeats_at, "--repeats-at"), live_memory=args.live_memory)
        return 0
    report = run_bench_core(store=open_store_arg(args.store), out=Path(args.out), repeats=args.repeats,
                            patch_px=args.patch_px, cache_patches=args.cache_patches)
    print(json.dumps(report, indent=2))
    return 0


def _pairs(text: str, flag: str, key: type = int) -> dict:
    """``A=1,B=2`` as a dict (keys converted by ``key``, values int); a malformed item names the flag."""
    from agl.errors import ConfigError
    from agl.evaluation.protocol import parse_key_values

    try:
        pairs = parse_key_values([item for item in text.split(",") if item], flag, convert=int)
        return {key(k): v for k, v in pairs.items()}
    except (ValueError, ConfigError) as err:
        raise ConfigError(flag, f"expected KEY=INT,... got {text!r}") from err


def add_bench_core_args(p: argparse.ArgumentParser) -> None:
    add_store_arg(p)
    p.add_argument("--out", default="results", help="folder for bench_core.json")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement (median)")
    p.add_argument("--patch-px", type=int, default=112, help="patch size for the fine-tuning measurement")
    p.add_argument("--horizons", default="", help="hypergradient estimators vs H in features mode, e.g. 1,2,4,12 "
                                                  "(with --finetune-horizons: only this comparison runs)")
    p.add_argument("--finetune-horizons", default="", help="the same in fine-tune mode, e.g. 1,2")
    p.add_argument("--finetune-repeats", type=int, default=1, help="repeats per fine-tune measurement")
    p.add_argument("--finetune-backbone", default="torchvision/resnet18", help="backbone (random init) for fine-tune timing")
    p.add_argument("--finetune-batch", type=int, default=64, help="batch size of fine-tune inner and outer steps")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the estimator comparison")
    p.add_argument("--memory-horizons", default="", help="measure peak memory (fresh processes) only at these H")
    p.add_argument("--live-memory", action="store_true",
                   help="memory processes under glibc's MALLOC_MMAP_THRESHOLD_=65536, so that RSS follows the live "
                        "tensors rather than the allocator's kept heap (which varies by +-150 MB between processes)")
    p.add_argument("--repeats-at", default="", help="H=N,...: repeats at that H in features mode (e.g. 12=1)")
    p.add_argument("--finetune-repeats-at", default="", help="H=N,...: repeats at that H in fine-tune mode; 0: only "
                                                              "the one call timed in its fresh memory process")
    p.add_argument("--methods", default="", help="estimators in features mode (default: all registered + first_order)")
    p.add_argument("--finetune-methods", default="", help="estimators in fine-tune mode (default: all)")
    p.add_argument("--cache-patches", type=int, default=128, help="patches (x 2 views) for the feature cache vs a "
                                                                  "plain inference_mode loop; 0 skips it")
    p.add_argument("--skip", default="", help="METHOD=H0,...: leave METHOD out for H >= H0 (e.g. unroll=4)")


# --------------------------------------------------------------------------- agl bench data
def add_bench_data_args(p: argparse.ArgumentParser) -> None:
    add_store_arg(p)
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for bench_data.json")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=20, help="batches timed per loader (alternating)")


def cmd_bench_data(args: argparse.Namespace) -> int:
    from agl.bench.data import bench_data

    bench_data(store_path=args.store, out_dir=args.out, batch_size=args.batch_size, n_batches=args.batches)
    return 0


# --------------------------------------------------------------------------- agl bench ray
def add_bench_ray_args(p: argparse.ArgumentParser) -> None:
    add_store_arg(p)
    p.add_argument("--out", default="results", help="folder for bench_ray.json")
    p.add_argument("--trials", type=int, default=4, help="trials in the timed frozen-feature sweep")
    p.add_argument("--epochs", type=int, default=4, help="epochs per trial / Train run")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs for the local Ray")


def cmd_bench_ray(args: argparse.Namespace) -> int:
    from agl.bench.sweep import bench_ray

    report = bench_ray(store=args.store, out=args.out, trials=args.trials, epochs=args.epochs, num_cpus=args.num_cpus)
    print(json.dumps(report, indent=1))
    return 0


# --------------------------------------------------------------------------- agl bench load
def add_bench_load_args(p: argparse.ArgumentParser) -> None:
    add_store_arg(p)
    p.add_argument("--out", default="results",
                   help="folder for bench_load.json/.png; the sweep itself runs in a temporary folder inside it "
                        "(Ray results and MLflow DB included), removed afterwards")
    p.add_argument("--trials", type=int, default=64, help="trials in the sweep (many more than --num-cpus)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial (fixed: no early stopping)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs for the local Ray")
    p.add_argument("--space", default="tiny",
                   help="search space (bundled name or YAML path); run with frozen features, FIFO, fixed epochs")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples")
    p.add_argument("--keep-sweep", action="store_true", help="keep the sweep's temporary folder (its path is logged)")


def cmd_bench_load(args: argparse.Namespace) -> int:
    from agl.bench.sweep import bench_load

    report = bench_load(store=args.store, out=args.out, trials=args.trials, epochs=args.epochs,
                        num_cpus=args.num_cpus, space=args.space, interval_s=args.interval,
                        keep_sweep=args.keep_sweep)
    print(json.dumps({k: v for k, v in report.items() if k != "series"}, indent=1))
    return 0 if report["trials"]["failed"] == 0 and report["memory"]["bounded"] is not False else 1


# --------------------------------------------------------------------------- agl bench scale
def add_bench_scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for bench_scale.json / .png")
    p.add_argument("--max-n", type=int, default=16, help="largest N of 1, 2, 4, 8, 16 to run")
    p.add_argument("--no-features", action="store_true",
                   help="skip the feature-cache rates (in process vs Ray Data with 1 and 2 workers)")
    p.add_argument("--ns", default="", help="the N to run, e.g. 1,2 (default 1,2,4,8,16 up to --max-n)")
    p.add_argument("--dense-max-n", type=int, default=None,
                   help="build the dense layout only up to this N (default: every N); sparse runs at every N")
    p.add_argument("--address", default="local", choices=("local", "none"),
                   help="local: each ingest on a fresh local Ray, its processes' memory sampled; none: in process")


def cmd_bench_scale(args: argparse.Namespace) -> int:
    from agl.bench.scale import bench_scale

    bench_scale(out_dir=args.out, max_n=args.max_n, features=not args.no_features,
                address=None if args.address == "none" else args.address, dense_max_n=args.dense_max_n,
                ns=int_list(args.ns, "--ns") or None)
    return 0


# --------------------------------------------------------------------------- agl bench cohort
def add_bench_cohort_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for bench_cohort.json / .png")
    p.add_argument("--copies", default="1,4,16,64", help="cohort sizes in copies of the demo (about 1k spots each)")
    p.add_argument("--before-max", default="train=16,cv=4",
                   help="largest copies measured on the old in-memory path, per run kind")
    p.add_argument("--epochs", type=int, default=3, help="epochs per fit (seconds/epoch: the median after the first)")
    p.add_argument("--work", default=None, help="folder for the cohort stores (default: a temporary folder)")
    p.add_argument("--sweep-copies", default="",
                   help="also run the sweep phase (a 2-trial cross-validated Ray Tune sweep) on these cohort sizes, "
                        "e.g. 128 (~127k spots); results in bench_cohort_sweep.json / .png")
    p.add_argument("--sweep-epochs", type=int, default=1, help="epochs per fold of the sweep phase")
    p.add_argument("--sweep-method", default=None,
                   help="the sweep phase's method (default: the train phase's, PGL; or DkGSB, whose features-mode "
                        "outer_val full takes the outer part in one batch)")


def cmd_bench_cohort(args: argparse.Namespace) -> int:
    from agl.bench.cohort import bench_cohort, bench_cohort_sweep

    copies = tuple(int_list(args.copies, "--copies"))
    sweep_copies = tuple(int_list(args.sweep_copies, "--sweep-copies"))
    if not copies and not sweep_copies:
        raise ConfigError("--copies", "no cohort sizes: give --copies and/or --sweep-copies")
    if copies:
        bench_cohort(out_dir=args.out, copies=copies, before_max=_pairs(args.before_max, "--before-max", key=str),
                     epochs=args.epochs, work=args.work)
    if sweep_copies:
        bench_cohort_sweep(out_dir=args.out, copies=sweep_copies, epochs=args.sweep_epochs, work=args.work,
                           **({"method": args.sweep_method} if args.sweep_method else {}))
    return 0


# --------------------------------------------------------------------------- agl bench selection
# --quick sizes; here, not in agl.bench.selection, so that building the parser imports no numpy/pandas
QUICK = {"n_aux": 2000, "seeds": 5, "epochs": 25, "patience": 8}


def add_bench_selection_args(p: argparse.ArgumentParser) -> None:
    add_store_arg(p)
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for bench_selection.json / .png")
    p.add_argument("--n-aux", type=int, default=None,
                   help="planted auxiliary genes (default 14000, like the demo; --quick: %d)" % QUICK["n_aux"])
    p.add_argument("--seeds", type=int, default=5, help="planted data sets (paired over methods)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seed of the first planted data set (e.g. 5: check settings chosen on seeds 0-4 on fresh ones)")
    p.add_argument("--variants", default="unroll,ift_cg", help="DkGSB hypergradient estimators, comma-separated")
    p.add_argument("--methods", default="", help="run only these labels (pgl,agl_all,topk,random_k,dkgsb_VARIANT)")
    p.add_argument("--epochs", type=int, default=None, help="epoch budget per run (default 40; --quick: %d)" % QUICK["epochs"])
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience (default 10; --quick: %d)"
                   % QUICK["patience"])
    p.add_argument("--precision", type=float, default=0.8, help="share of helpful genes in the prior's top k_planted")
    p.add_argument("--plant", action="append", default=[], metavar="KEY=VALUE", dest="plant_sets",
                   help="a setting of the planted design (repeatable), e.g. conflict_fraction=0.35 "
                        "(agl.bench.selection.plant's keyword arguments)")
    p.add_argument("--curve", default="0.25,0.5,1,1.5,2,3.33",
                   help="top-k also at these multiples of the planted k (the PCC-vs-k curve); empty: none")
    p.add_argument("--quick", action="store_true", help="small sizes: about 10 min on 2 cores")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="a run setting for every method (repeatable), e.g. lr=3e-4")
    p.add_argument("--dkgsb-set", action="append", default=[], metavar="KEY=VALUE", dest="dkgsb_sets",
                   help="a setting for the DkGSB runs only (repeatable), e.g. outer_lr=0.02")


def cmd_bench_selection(args: argparse.Namespace) -> int:
    from agl.bench.selection import bench_selection
    from agl.commands import parse_sets

    quick = QUICK if args.quick else {}
    pick = lambda value, key, default: value if value is not None else quick.get(key, default)  # noqa: E731
    bench_selection(open_store_arg(args.store), args.out, n_aux=pick(args.n_aux, "n_aux", 14000), seeds=args.seeds,
                    first_seed=args.first_seed,
                    variants=[v for v in args.variants.split(",") if v],
                    methods=[m for m in args.methods.split(",") if m] or None,
                    epochs=pick(args.epochs, "epochs", 40), patience=pick(args.patience, "patience", 10),
                    threads=args.threads, extra=parse_sets(args.sets),
                    dkgsb_extra=parse_sets(args.dkgsb_sets),
                    plant_options={"precision": args.precision, **parse_sets(args.plant_sets)},
                    curve=[float(m) for m in args.curve.split(",") if m.strip()])
    return 0


# --------------------------------------------------------------------------- agl bench gpu
def add_bench_gpu_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results", help="folder for bench_gpu.json and bench_gpu.png")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu (with --quick: the CI check)")
    p.add_argument("--quick", action="store_true", help="every section at tiny sizes (a few minutes on 2 CPU cores)")
    p.add_argument("--sections", default="", help="comma-separated subset of the sections (default: all)")


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from agl.bench.gpu import run_bench_gpu

    run_bench_gpu(Path(args.out), args.device, args.quick, [s for s in args.sections.split(",") if s] or None)
    return 0


# --------------------------------------------------------------------------- agl bench search
# --quick sizes (the CI test of the plumbing); the defaults are a small comparison, not the full grid
SEARCH_QUICK = {"n_aux": 300, "seeds": 1, "budgets": "3", "searchers": "tpe,grid", "asha": "on", "epochs": 2,
                "max_folds": 2, "curve": "1,2"}


def add_bench_search_args(p: argparse.ArgumentParser) -> None:
    add_store_arg(p)
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for bench_search.json / .png")
    p.add_argument("--n-aux", type=int, default=None, help="planted auxiliary genes (default 2000; --quick: 300)")
    p.add_argument("--seeds", type=int, default=None, help="planted data sets (default 2; --quick: 1)")
    p.add_argument("--first-seed", type=int, default=0, help="seed of the first planted data set")
    p.add_argument("--budgets", default=None, help="trials per sweep, comma-separated (default 8; --quick: 3)")
    p.add_argument("--searchers", default=None, help="tpe,random,grid,tpe-plain (default tpe,random; --quick: tpe,grid)")
    p.add_argument("--asha", default=None, help="on, off or on,off (default on; grid always runs without ASHA)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per fold (default 6; --quick: 2)")
    p.add_argument("--max-folds", type=int, default=None,
                   help="leave-one-slide-out folds per trial (default 2 of the 4; 0: all)")
    p.add_argument("--curve", default=None, help="the oracle's top-k at these multiples of the planted k "
                                                 "(default 0.25,0.5,1,2,4; --quick: 1,2)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (trials at once)")
    p.add_argument("--keep", action="store_true", help="keep the planted stores and sweep folders (OUT/bench_search_work)")
    p.add_argument("--quick", action="store_true", help="the plumbing on a tiny budget (a couple of minutes on 2 cores)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no sweep after this many minutes; the JSON lists the sweeps not run")
    p.add_argument("--no-reuse-actors", action="store_true",
                   help="a fresh Ray worker process per trial (the sweep's default) instead of reusing a warm one")


def cmd_bench_search(args: argparse.Namespace) -> int:
    from agl.bench.search import bench_search

    quick = SEARCH_QUICK if args.quick else {}
    pick = lambda value, key, default: value if value is not None else quick.get(key, default)  # noqa: E731
    folds = pick(args.max_folds, "max_folds", 2)
    bench_search(open_store_arg(args.store), args.out, n_aux=pick(args.n_aux, "n_aux", 2000),
                 seeds=pick(args.seeds, "seeds", 2), first_seed=args.first_seed,
                 budgets=int_list(pick(args.budgets, "budgets", "8"), "--budgets"),
                 searchers=[s for s in pick(args.searchers, "searchers", "tpe,random").split(",") if s],
                 asha=[s for s in pick(args.asha, "asha", "on").split(",") if s],
                 epochs=pick(args.epochs, "epochs", 6), max_folds=folds or None,
                 curve=[float(m) for m in pick(args.curve, "curve", "0.25,0.5,1,2,4").split(",") if m.strip()],
                 num_cpus=args.num_cpus, keep=args.keep, reuse_actors=not args.no_reuse_actors,
                 max_minutes=args.max_minutes)
    return 0


class Benchmark(NamedTuple):
    """One ``agl bench NAME`` sub-command: its help line, its arguments and its handler."""

    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


# name -> Benchmark: one entry per benchmark (a new one: BENCHMARKS.register("name", Benchmark(...)))
BENCHMARKS: Registry[Benchmark] = Registry("benchmark", setting="bench")
BENCHMARKS.register("core", Benchmark("cost of a DkGSB outer step vs plain steps; feature-cache speed-up",
                                      add_bench_core_args, cmd_bench_core))
BENCHMARKS.register("data", Benchmark("patches/s: the store's batched loader vs a naive per-item loader",
                                      add_bench_data_args, cmd_bench_data))
BENCHMARKS.register("ray", Benchmark("trials/hour of a frozen-feature sweep; Train samples/s with 1 vs 2 workers",
                                     add_bench_ray_args, cmd_bench_ray))
BENCHMARKS.register("load", Benchmark("many more trials than cores: peak memory, growth per trial, trials "
                                      "finished/failed/retried", add_bench_load_args, cmd_bench_load))
BENCHMARKS.register("scale", Benchmark("streaming ingest of N x the demo sections: time, peak RSS, store size",
                                       add_bench_scale_args, cmd_bench_scale))
BENCHMARKS.register("selection", Benchmark(
    "known answer: planted helpful/conflict/noise genes on real image features; PGL, AGL-all, top-k, random-k, "
    "DkGSB per hypergradient; learned k vs planted k, paired tests", add_bench_selection_args, cmd_bench_selection))
BENCHMARKS.register("gpu", Benchmark(
    "the GPU path in one command: feature-cache img/s fp32 vs bf16, fine-tune and outer steps, hypergradient "
    "accuracy with TF32 off/on, DDP step time, serving, train-ray, sweep, demo job", add_bench_gpu_args, cmd_bench_gpu))
BENCHMARKS.register("search", Benchmark(
    "known answer for the whole sweep: planted store, Ray Tune + Optuna (TPE, random, grid over k), ASHA on/off, "
    "cross-slide CV, refit; regret vs the oracle top-k and compute per searcher", add_bench_search_args, cmd_bench_search))
BENCHMARKS.register("cohort", Benchmark(
    "training at cohort scale: per-trial USS/PSS/RSS and s/epoch of train and a 2-trial CV, in-memory bundle vs "
    "per-batch path", add_bench_cohort_args, cmd_bench_cohort))


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` and one sub-command per row of ``BENCHMARKS`` to the ``agl`` parser."""
    parser = sub.add_parser("bench", help="benchmarks that print figures and write JSON results")
    bench = parser.add_subparsers(dest="bench", metavar="WHAT")
    parser.set_defaults(func=lambda a: (parser.print_help(), 2)[1])
    for name, benchmark in BENCHMARKS.items():
        p = bench.add_parser(name, help=benchmark.help)
        benchmark.add_args(p)
        p.set_defaults(func=benchmark.handler)
