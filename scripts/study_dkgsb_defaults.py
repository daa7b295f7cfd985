"""Rerun the study's leave-one-slide-out grids for DkGSB with today's features-mode defaults (issue 28 item 1).

Same protocol as docs/results.md (``agl study ... --epochs 30 --patience 10 --min-detection 0.3``, no
``--set``): both panels, held-out slides B4, C2-C5, seeds 0-4. PGL, AGL-all and the study's top-k chosen
on validation are rerun beside DkGSB in each (panel, seed) so that every comparison is paired by slide
and seed (the study's own runs were not kept; the reruns are checked against its per-slide means).

    python scripts/study_dkgsb_defaults.py run --work results/study_dkgsb_defaults --jobs 2
    python scripts/study_dkgsb_defaults.py report --work results/study_dkgsb_defaults \
        --out results/bench_study_dkgsb_defaults_loso.json

``run`` goes seed by seed (all slides of both panels for seed 0 first), so a stopped run leaves whole
seeds; ``report`` uses the (panel, slide, seed) units where every method finished.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from agl.evaluation.study import StudyPlan, panel_store

EPOCHS, PATIENCE, MIN_DETECTION = 30, 10, 0.3  # the study's command (docs/results.md)
SEEDS = (0, 1, 2, 3, 4)
# the top-k the study chose on validation per panel (docs/results.md, leave-one-slide-out tables)
TOPK_BY_PANEL = {"seurat": "topk:k=250", "detected": "topk:k=2000"}


def methods(panel: str) -> list[str]:
    return ["dkgsb", "pgl", "agl_all", TOPK_BY_PANEL[panel]]


def run_logged(store_path: str, spec: Any, out: str, log_file: str) -> dict[str, Any]:
    """One grid run (a worker process) with its per-epoch lines (k, validation PCC) in ``log_file``, readable mid-run."""
    from agl.evaluation.protocol import run_one

    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    loop_log = logging.getLogger("agl.training.loop")
    loop_log.addHandler(handler)
    loop_log.setLevel(logging.INFO)
    try:
        return run_one(store_path, spec, out, quiet=False)
    finally:
        loop_log.removeHandler(handler)
        handler.close()


def run(work: Path, jobs: int, seeds: tuple[int, ...], slides: tuple[str, ...] | None = None) -> None:
    """Train the missing runs in the order seed, held-out slide, panel, method (one pool for both panels);
    ``slides``: only these held-out slides."""
    import multiprocessing as mp
    import time
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from agl.data.store import open_store
    from agl.evaluation.protocol import (_worker_init, build_grid, check_output_folder, finished_run, prepare_inputs,
                                         write_output_marker)

    plan = StudyPlan(min_detection=MIN_DETECTION, epochs=EPOCHS, patience=PATIENCE)
    todo: list[tuple[tuple[int, int, int, int], str, Any, Path]] = []
    for p, panel in enumerate(("seurat", "detected")):
        store = open_store(panel_store(panel, plan))
        out = work / panel / "loso"
        specs = build_grid(store.split_names, "loso", seeds, methods(panel), plan.base())
        check_output_folder(out, "evaluate", inputs=[store.path], reuse=True)
        out.mkdir(parents=True, exist_ok=True)
        write_output_marker(out, "evaluate", store=str(store.path), protocol="loso")
        prepare_inputs(store, specs)
        order = {m: i for i, m in enumerate(methods(panel))}
        split_order = sorted({s.split for s in specs})
        for spec in specs:
            if finished_run(spec, out) is None and (slides is None or spec.split.removeprefix("loso-") in slides):
                todo.append(((spec.seed, split_order.index(spec.split), p, order[spec.label]), str(store.path), spec, out))
    todo.sort(key=lambda item: item[0])
    log = logging.getLogger("study_dkgsb_defaults")
    log.info("%d runs to train with %d job(s)", len(todo), jobs)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
        (work / "logs").mkdir(parents=True, exist_ok=True)
        pending = {pool.submit(run_logged, store_path, spec, str(out),
                               str(work / "logs" / f"{out.parent.name}_{spec.label.replace(':', '-')}_{spec.split}_seed{spec.seed}.log")):
                   (spec, out) for _, store_path, spec, out in todo}
        done_n = 0
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                spec, out = pending.pop(future)
                record = future.result()
                done_n += 1
                log.info("run %d/%d done after %.0f s: %s %s %s seed %d -> test PCC %.4f (k %d, %d epochs, %.0f s)",
                         done_n, len(todo), time.perf_counter() - started, out.parent.name, spec.label, spec.split,
                         spec.seed, record["pcc"], record["k"], record["epochs"], record["wall_time_s"])


# The study's published figures (docs/results.md, 2026-12-06, the earlier DkGSB defaults), per held-out
# slide, mean over seeds 0-4: to check that the reruns of PGL/AGL-all reproduce it, and to set the new
# DkGSB beside the old one (unpaired: the study's per-run results were not kept).
STUDY_2026_12_06 = {
    "seurat": {"pgl": {"B4": 0.2040, "C2": 0.1069, "C3": 0.1598, "C4": 0.1278, "C5": 0.1419},
               "agl_all": {"B4": 0.2121, "C2": 0.1142, "C3": 0.1564, "C4": 0.1409, "C5": 0.1391},
               "dkgsb": {"B4": 0.2150, "C2": 0.1115, "C3": 0.1583, "C4": 0.1383, "C5": 0.1412},
               "topk:k=250": {"B4": 0.2130, "C2": 0.1100, "C3": 0.1614, "C4": 0.1333, "C5": 0.1445},
               "dkgsb_k": {"B4": 6856, "C2": 6812, "C3": 7161, "C4": 6882, "C5": 6779}},
    "detected": {"pgl": {"B4": 0.4096, "C2": 0.3415, "C3": 0.3959, "C4": 0.3845, "C5": 0.3375},
                 "agl_all": {"B4": 0.4228, "C2": 0.3454, "C3": 0.3968, "C4": 0.3871, "C5": 0.3337},
                 "dkgsb": {"B4": 0.4288, "C2": 0.3452, "C3": 0.4011, "C4": 0.3871, "C5": 0.3382},
                 "topk:k=2000": {"B4": 0.4219, "C2": 0.3422, "C3": 0.3941, "C4": 0.3891, "C5": 0.3402},
                 "dkgsb_k": {"B4": 7079, "C2": 6913, "C3": 6562, "C4": 6601, "C5": 6555}},
}


def panel_records(work: Path, panel: str, seeds: tuple[int, ...]) -> tuple[list[dict[str, Any]], int]:
    """Finished runs of one panel, whole (slide, seed) units only (every method finished); and the planned count."""
    from agl.data.store import open_store
    from agl.evaluation.study import finished_units

    plan = StudyPlan(min_detection=MIN_DETECTION, epochs=EPOCHS, patience=PATIENCE)
    store = open_store(panel_store(panel, plan))
    return finished_units(store, "loso", seeds, methods(panel), work / panel / "loso", plan.base(), None, None)


def trajectory(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per epoch of one DkGSB run: its threshold t, the genes it keeps (k), tau, validation PCC, hypergradient SNR."""
    keys = ("epoch", "t", "k", "tau", "val_pcc", "outer_steps", "hypergrad_snr", "hypergrad_sign_agreement")
    return [{key: row.get(key) for key in keys} for row in record["history"]]


def panel_report(records: list[dict[str, Any]], n_planned: int, panel: str) -> dict[str, Any]:
    """Paired tests of DkGSB against PGL, AGL-all and the study's top-k; its k per slide; its threshold's path."""
    import pandas as pd

    from agl.evaluation.study import GridResult, compare, group_of, threshold_summary, verdict_word

    runs = GridResult(panel, "loso", records, 0, float("nan")).runs
    runs["slide"] = [group_of(s, "loso") for s in runs["split"]]
    topk = TOPK_BY_PANEL[panel]
    comparisons = []
    for a, b in (("dkgsb", "pgl"), ("dkgsb", "agl_all"), ("dkgsb", topk), ("agl_all", "pgl"), (topk, "pgl"),
                 (topk, "agl_all")):
        c = compare(records, runs, a, b)
        comparisons.append({**c, "verdict": verdict_word(c)})
    methods_summary = {m: {"n": int(len(g)), "pcc_mean": float(g["pcc"].mean()), "pcc_std": float(g["pcc"].std(ddof=1)),
                           "k_mean": float(g["k"].mean()), "epochs_mean": float(g["epochs"].mean()),
                           "wall_time_s_mean": float(g["wall_time_s"].mean())}
                       for m, g in runs.groupby("method")}
    dk = runs[runs["method"] == "dkgsb"]
    old = STUDY_2026_12_06[panel]
    per_slide = []
    for slide, g in dk.groupby("slide"):
        row: dict[str, Any] = {"slide": slide, "seeds": sorted(int(s) for s in g["seed"]),
                               "dkgsb_k": [int(k) for k in g.sort_values("seed")["k"]], "dkgsb_k_mean": float(g["k"].mean()),
                               "dkgsb_k_study_2026_12_06": old["dkgsb_k"][slide]}
        for m in methods(panel):
            sub = runs[(runs["method"] == m) & (runs["slide"] == slide)]
            row[f"{m}_pcc_mean"] = float(sub["pcc"].mean())
            if m in old:  # the study's mean over seeds 0-4 (equal to ours only when all five seeds are here)
                row[f"{m}_pcc_study_2026_12_06"] = old[m][slide]
        per_slide.append(row)
    by_run = {(r["split"], r["seed"]): r for r in records if r["method"] == "dkgsb"}
    trajectories = [{"slide": group_of(split, "loso"), "seed": seed, "best_epoch": r["best_epoch"],
                     "epochs": trajectory(r)} for (split, seed), r in sorted(by_run.items())]
    paired = {}
    for m in methods(panel)[1:]:
        pr = pd.merge(dk[["slide", "seed", "pcc"]], runs[runs["method"] == m][["slide", "seed", "pcc"]],
                      on=["slide", "seed"], suffixes=("_dkgsb", "_other"))
        paired[m] = [{"slide": s, "seed": int(seed), "dkgsb": a, m: b, "diff": a - b}
                     for s, seed, a, b in pr[["slide", "seed", "pcc_dkgsb", "pcc_other"]].itertuples(index=False)]
    return {"panel": panel, "runs_finished": len(records), "runs_planned": n_planned,
            "units": sorted({(group_of(r["split"], "loso"), int(r["seed"])) for r in records}),
            "methods": methods_summary, "comparisons": comparisons, "threshold": threshold_summary(records),
            "per_slide": per_slide, "dkgsb_trajectories": trajectories, "paired_runs": paired}


EPOCH_LINE = re.compile(r"^(?P<time>\S+ \S+) epoch (?P<epoch>\d+)/(?P<of>\d+) dkgsb: train_loss (?P<train_loss>\S+) "
                        r"val_pcc (?P<val_pcc>\S+) \(best (?P<best>\S+) @(?P<best_epoch>\d+)\) k (?P<k>\d+)"
                        r"(?: outer (?P<outer>\d+))? \| (?P<seconds>\S+) s")


def unfinished_runs(work: Path) -> list[dict[str, Any]]:
    """DkGSB runs still training (or stopped) when the report was written: their epochs so far, from the run logs."""
    runs = []
    for log_file in sorted((work / "logs").glob("*_dkgsb_*.log")):
        panel, _, split, seed = log_file.stem.split("_")
        if (work / panel / "loso" / "runs" / "dkgsb" / split / seed / "result.json").is_file():
            continue
        epochs = [{"epoch": int(m["epoch"]), "k": int(m["k"]), "val_pcc": float(m["val_pcc"]),
                   "best_epoch": int(m["best_epoch"]), "outer_steps": int(m["outer"] or 0),
                   "epoch_wall_s": float(m["seconds"]), "logged_at": m["time"]}
                  for m in map(EPOCH_LINE.match, log_file.read_text().splitlines()) if m]
        runs.append({"panel": panel, "slide": split.removeprefix("loso-"), "seed": int(seed.removeprefix("seed")),
                     "epochs_logged": len(epochs), "of_epochs": EPOCHS, "epochs": epochs})
    return runs


def plot(panels: list[dict[str, Any]], unfinished: list[dict[str, Any]], png: Path) -> None:
    """Per panel: DkGSB's k per epoch (finished runs solid, unfinished dashed, the old study's mean k dotted);
    when whole units finished, the learned k per held-out slide and the paired test-PCC differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p for p in ("seurat", "detected") if any(r["panel"] == p for r in [*panels, *unfinished])]
    fig, axes = plt.subplots(len(names), 3, figsize=(15, 4.2 * len(names)), squeeze=False)
    colours = {s: plt.cm.tab10(i) for i, s in enumerate(("B4", "C2", "C3", "C4", "C5"))}
    for row, panel in zip(axes, names):
        rep = next((r for r in panels if r["panel"] == panel), None)
        paths = [(t["slide"], t["seed"], t["epochs"], "-") for t in (rep["dkgsb_trajectories"] if rep else [])]
        paths += [(u["slide"], u["seed"], u["epochs"], "--") for u in unfinished if u["panel"] == panel]
        seen = set()
        for slide, seed, epochs, style in paths:
            row[0].plot([e["epoch"] for e in epochs], [e["k"] for e in epochs], style, color=colours[slide], alpha=0.8,
                        lw=1.2, label=None if slide in seen else slide)
            seen.add(slide)
        old = STUDY_2026_12_06[panel]["dkgsb_k"]
        row[0].axhline(float(np.mean(list(old.values()))), color="grey", ls=":", lw=1,
                       label="study 2026-12-06 (old defaults), mean k")
        dashed = " (dashed: unfinished)" if any(u["panel"] == panel for u in unfinished) else ""
        row[0].set(xlabel="epoch", ylabel="DkGSB k (genes kept)", title=f"{panel}: DkGSB k per epoch{dashed}")
        row[0].set_yscale("symlog", linthresh=100)  # symlog, not log: a selection that closed (k = 0) stays on the plot
        row[0].set_ylim(bottom=-30)  # room below 0 so k = 0 shows
        row[0].legend(fontsize=8, title="held-out slide")
        if rep is None:
            for ax in row[1:]:
                ax.set_axis_off()
            continue
        for i, s in enumerate(rep["per_slide"]):
            row[1].scatter([i] * len(s["dkgsb_k"]), s["dkgsb_k"], color=colours[s["slide"]], s=18)
            row[1].scatter([i], [s["dkgsb_k_study_2026_12_06"]], marker="x", color="black", s=40,
                           label="study 2026-12-06 (old defaults), mean" if i == 0 else None)
        row[1].set_xticks(range(len(rep["per_slide"])), [s["slide"] for s in rep["per_slide"]])
        row[1].set(ylabel="learned k (tested epoch)", title=f"{panel}: DkGSB k per held-out slide")
        row[1].set_yscale("symlog", linthresh=100)
        row[1].set_ylim(bottom=-30)  # room below 0 so k = 0 shows
        row[1].legend(fontsize=8)
        others = list(rep["paired_runs"])
        for j, m in enumerate(others):
            diffs = [p["diff"] for p in rep["paired_runs"][m]]
            row[2].scatter(np.full(len(diffs), j) + np.linspace(-0.15, 0.15, len(diffs)), diffs, s=14)
            if len(diffs) > 1:
                row[2].errorbar([j], [np.mean(diffs)], yerr=[np.std(diffs, ddof=1) / np.sqrt(len(diffs))],
                                color="black", marker="_", ms=20, capsize=4)
        row[2].axhline(0, color="grey", lw=1)
        row[2].set_xticks(range(len(others)), [f"DkGSB − {m}" for m in others], fontsize=8)
        row[2].set(ylabel="test PCC difference (paired by slide, seed)", title=f"{panel}: paired differences")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def report(work: Path, out: Path, seeds: tuple[int, ...]) -> dict[str, Any]:
    """Write the JSON (and the PNG beside it) from the finished runs in ``work``."""
    from agl.config import MODE_DEFAULTS
    from agl.fileio import atomic_write_json

    panels = []
    for panel in ("seurat", "detected"):
        records, planned = panel_records(work, panel, seeds)
        if records:
            panels.append(panel_report(records, planned, panel))
    unfinished = unfinished_runs(work)
    if not panels and not unfinished:
        raise SystemExit(f"no whole (slide, seed) unit has finished in {work}, and no run log is there")
    result = {"benchmark": "study_dkgsb_defaults_loso", "protocol": "loso", "epochs": EPOCHS, "patience": PATIENCE,
              "min_detection": MIN_DETECTION, "seeds_requested": list(seeds),
              "dkgsb_defaults": MODE_DEFAULTS["features"], "command": " ".join(["python", *sys.argv]),
              "load_average": os.getloadavg(), "cpus": os.cpu_count(), "panels": panels,
              "unfinished_dkgsb_runs": unfinished}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    plot(panels, unfinished, out.with_suffix(".png"))
    for p in panels:
        print(f"{p['panel']}: {p['runs_finished']} of {p['runs_planned']} runs")
        for c in p["comparisons"]:
            print(f"  {c['a']} - {c['b']}: {c['mean_diff']:+.4f} ({c['wins']}/{c['losses']}, {c['n_runs']} pairs) "
                  f"p_wilcoxon {c['p_wilcoxon']:.3g} p_t {c['p_t']:.3g} p_genes {c['p_genes']:.3g} -> {c['verdict']}")
        for s in p["per_slide"]:
            print(f"  {s['slide']}: k {s['dkgsb_k']} (study: {s['dkgsb_k_study_2026_12_06']})")
    for u in unfinished:
        print(f"  unfinished {u['panel']} {u['slide']} seed {u['seed']}: {u['epochs_logged']} of {EPOCHS} epochs, "
              f"k {[e['k'] for e in u['epochs']]}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("run", "report"))
    parser.add_argument("--work", type=Path, default=Path("results/study_dkgsb_defaults"))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--slides", default=None, help="run: only these held-out slides, e.g. C2,C3")
    parser.add_argument("--out", type=Path, default=Path("results/bench_study_dkgsb_defaults_loso.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.what == "run":
        run(args.work, args.jobs, seeds, tuple(args.slides.split(",")) if args.slides else None)
    else:
        report(args.work, args.out, seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
