"""Evaluation grids: protocol x seeds x methods, run in parallel processes, resumable.

Each run writes ``OUT/runs/<method>/<split>/seed<seed>/result.json``; a rerun with the
same ``OUT`` skips runs whose result exists with the same configuration. The summary is
``table.csv`` / ``table.md`` (mean ± std over runs of test PCC/SCC/MSE per method),
``wilcoxon.csv`` (per-gene paired Wilcoxon signed-rank test of each method against PGL
over the primary genes) and figures.
"""
from __future__ import annotations

import logging
import math
import re
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from agl.errors import ConfigError, NonFiniteLossError, OutputExistsError
from agl.fileio import atomic_write_json, atomic_write_text, check_output_folder, write_output_marker

log = logging.getLogger(__name__)

PROTOCOL_PREFIX: dict[str, Callable[[int], str]] = {
    "kfold": lambda seed: f"kfold-s{seed}-f",
    "spatial": lambda seed: f"spatial-s{seed}-f",
    "loso": lambda seed: "loso-",
}
METRICS = ("pcc", "scc", "mse")


# --------------------------------------------------------------------------- specs
def parse_value(text: str) -> Any:
    """A command-line value as YAML scalar/list (``100`` -> int, ``1e-4`` -> float, ``true`` -> bool, ``[256]`` -> list)."""
    import yaml

    from agl.checks import load_yaml

    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def parse_key_values(items: Iterable[str], flag: str, where: str = "",
                     convert: Callable[[str], Any] = parse_value) -> dict[str, Any]:
    """``["k=100", "hard=true"]`` -> ``{"k": 100, "hard": True}`` (values by ``convert``, YAML by default):
    agl's one ``key=value`` parser (``--set``, method options, benchmark flags). A malformed item is a
    ConfigError naming ``flag`` (``where`` prefixes the item in the message)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(flag, f"{where}{item!r} must look like key=value")
        out[key.strip()] = convert(value.strip())
    return out


def parse_method(spec: str, flag: str = "--methods") -> tuple[str, dict[str, Any]]:
    """``"topk:k=100"`` -> (``"topk:k=100"``, ``{"method": "topk", "k": 100}``); options join with ``:``.

    ``flag`` is the command-line flag the spec came from, named in errors.
    """
    name, *options = spec.strip().split(":")
    return spec.strip(), {"method": name, **parse_key_values(options, flag, where=f"{spec!r}: option ")}


def split_methods(text: str) -> list[str]:
    """Comma-separated method specs (``pgl,agl_all,topk:k=100,dkgsb:hard=true``)."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ConfigError("--methods", "no method given")
    if len(set(specs)) != len(specs):
        raise ConfigError("--methods", "a method is listed twice")
    return specs


def protocol_splits(split_names: Sequence[str], protocol: str, seed: int, folds: Sequence[int] | None = None) -> list[str]:
    """The store's splits that a protocol uses for one seed (optionally only some folds)."""
    if protocol not in PROTOCOL_PREFIX:
        raise ConfigError("--protocol", f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOL_PREFIX)}")
    prefix = PROTOCOL_PREFIX[protocol](seed)
    names = sorted(n for n in split_names if n.startswith(prefix))
    if folds is not None and protocol != "loso":
        wanted = {f"{prefix}{f}" for f in folds}
        names = [n for n in names if n in wanted]
    if not names:
        raise ConfigError("--protocol", f"the store has no {protocol} splits for seed {seed} (looked for {prefix}*); "
                                        f"it has: {', '.join(split_names) or 'none'}")
    return names


def slug(label: str) -> str:
    """A file-name-safe form of a method label."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", label).strip("-")


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    label: str
    split: str
    seed: int
    config: dict[str, Any]

    def directory(self, out: Path) -> Path:
        return out / "runs" / slug(self.label) / self.split / f"seed{self.seed}"


# --------------------------------------------------------------------------- one run
def run_one(store_path: str, spec: RunSpec, out: str, quiet: bool = True) -> dict[str, Any]:
    """Train one grid run and write its result.json (top-level so worker processes can run it)."""
    from agl.data.store import open_store
    from agl.service import run_config

    if quiet:
        logging.getLogger("agl.training.loop").setLevel(logging.WARNING)
    # one core per worker process: --jobs sets the parallelism
    try:
        return run_config(spec.config, open_store(store_path), spec.split, threads=1,
                          record_to=spec.directory(Path(out)), label=spec.label).record
    except NonFiniteLossError as err:  # name the grid run; the finished ones stay for a rerun to reuse
        raise err.with_outcome(f"grid run {spec.label} on {spec.split}, seed {spec.seed}; no result was written "
                               f"for it, finished runs are kept in {out}") from None


def finished_run(spec: RunSpec, out: Path) -> dict[str, Any] | None:
    """The stored record of a finished run, None if absent; a different config is an error."""
    from agl.runs import read_record

    file = spec.directory(out) / "result.json"
    record = read_record(file.parent)
    if record is None:
        return None
    if record.get("config") != spec.config:
        raise OutputExistsError(file, "a finished run with a different configuration is here; use another --out "
                                      "or delete the folder to rerun")
    return record


# --------------------------------------------------------------------------- summaries
def summary_table(records: list[dict[str, Any]], order: Sequence[str]) -> pd.DataFrame:
    """Mean and sample std over runs of test PCC/SCC/MSE per method, in ``order``."""
    df = pd.DataFrame([{k: r[k] for k in ("method", "split", "seed", "k", "epochs", "wall_time_s", *METRICS)}
                       for r in records])
    rows = []
    for label in order:
        sub = df[df["method"] == label]
        if sub.empty:
            continue
        row: dict[str, Any] = {"method": label, "n_runs": len(sub)}
        for m in METRICS:
            row[f"{m}_mean"] = float(sub[m].mean())
            row[f"{m}_std"] = float(sub[m].std(ddof=1)) if len(sub) > 1 else float("nan")
        row["k_mean"] = float(sub["k"].mean())
        row["epochs_mean"] = float(sub["epochs"].mean())
        row["wall_s_mean"] = float(sub["wall_time_s"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def per_gene_means(records: list[dict[str, Any]], label: str, runs: set[tuple[str, int]]) -> pd.Series:
    """Per-gene test PCC of a method averaged over the given (split, seed) runs (genes primary in them)."""
    frames = [pd.Series(r["per_gene_pcc"], dtype=float) for r in records
              if r["method"] == label and (r["split"], r["seed"]) in runs]
    return pd.concat(frames, axis=1).mean(axis=1) if frames else pd.Series(dtype=float)


def wilcoxon_table(records: list[dict[str, Any]], order: Sequence[str], reference: str | None = None) -> pd.DataFrame:
    """Paired Wilcoxon signed-rank test per method vs ``reference`` (default: the reference gate, PGL)
    over per-gene PCC (runs matched)."""
    from scipy.stats import wilcoxon

    from agl.selection import reference_gate

    reference = reference or reference_gate()

    def runs_of(label: str) -> set[tuple[str, int]]:
        return {(r["split"], r["seed"]) for r in records if r["method"] == label}

    rows = []
    for label in order:
        if label == reference:
            continue
        paired = runs_of(label) & runs_of(reference)
        if not paired:
            continue
        both = pd.concat([per_gene_means(records, label, paired).rename("m"),
                          per_gene_means(records, reference, paired).rename("r")], axis=1).dropna()
        diff = (both["m"] - both["r"]).to_numpy()
        if np.allclose(diff, 0):
            stat, p = float("nan"), 1.0
        else:
            res = wilcoxon(both["m"], both["r"])
            stat, p = float(res.statistic), float(res.pvalue)
        rows.append({"method": label, "reference": reference, "n_genes": len(both), "n_runs": len(paired),
                     "mean_diff": float(diff.mean()), "median_diff": float(np.median(diff)),
                     "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum()), "statistic": stat, "p_value": p})
    return pd.DataFrame(rows)


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(v) for v in row) + " |\n" for row in df.itertuples(index=False))


def results_markdown(table: pd.DataFrame, wil: pd.DataFrame) -> str:
    """table.md: mean ± std per method, then the Wilcoxon tests."""
    view = pd.DataFrame({
        "method": table["method"], "runs": table["n_runs"],
        **{m.upper(): [f"{a:.4f} ± {_fmt(b)}" for a, b in zip(table[f"{m}_mean"], table[f"{m}_std"])] for m in METRICS},
        "k (mean)": [f"{v:.0f}" for v in table["k_mean"]],
        "epochs": [f"{v:.1f}" for v in table["epochs_mean"]],
    })
    text = "Test metrics over primary genes (per-slide values averaged over slides; mean ± sample std over runs)\n\n"
    text += markdown_table(view)
    if not wil.empty:
        wv = wil.assign(p_value=[f"{p:.3g}" for p in wil["p_value"]])
        text += f"\nPer-gene paired Wilcoxon signed-rank test vs {wil['reference'].iloc[0]} (PCC per primary gene averaged over matched runs)\n\n"
        text += markdown_table(wv.drop(columns=["reference"]))
    return text


def write_outputs(out: Path, records: list[dict[str, Any]], order: Sequence[str]) -> dict[str, Path]:
    """Write table.csv, table.md, wilcoxon.csv and the figures; return their paths."""
    from agl import plotting
    from agl.selection import gates_with, reference_gate

    table = summary_table(records, order)
    wil = wilcoxon_table(records, order)
    paths = {"table_csv": out / "table.csv", "table_md": out / "table.md", "wilcoxon_csv": out / "wilcoxon.csv"}
    atomic_write_text(paths["table_csv"], table.to_csv(index=False))
    atomic_write_text(paths["wilcoxon_csv"], wil.to_csv(index=False))
    atomic_write_text(paths["table_md"], results_markdown(table, wil))
    paths["bars"] = plotting.plot_method_bars(table, out / "pcc_bars.png")
    present = [m for m in order if m in set(table["method"])]
    reference = reference_gate()
    if reference in present and len(present) > 1:
        ref_runs = {(r["split"], r["seed"]) for r in records if r["method"] == reference}
        others = {m: per_gene_means(records, m, ref_runs) for m in present if m != reference}
        paths["scatter"] = plotting.plot_gene_scatter(per_gene_means(records, reference, ref_runs), others,
                                                      out / "gene_scatter_vs_pgl.png", reference_name=reference)
    trajectories = {m: [[row["k"] for row in r["history"]] for r in records if r["method"] == m]
                    for m in present if any(r["method"] == m and r["method_name"] in gates_with(bilevel=True) for r in records)}
    if trajectories:
        n_aux = max(r["n_aux"] for r in records)
        paths["k_trajectories"] = plotting.plot_k_trajectories(trajectories, out / "k_trajectories.png", n_aux=n_aux)
    return paths


# --------------------------------------------------------------------------- the grid
def build_grid(split_names: Sequence[str], protocol: str, seeds: Iterable[int], methods: Sequence[str],
               base: dict[str, Any], folds: Sequence[int] | None = None,
               only_splits: Sequence[str] | None = None) -> list[RunSpec]:
    """Every (method, split, seed) run, with validated configs (bad options fail before any training).

    ``only_splits`` keeps only those split names (e.g. one held-out slide of ``loso``).
    """
    from agl.training.loop import TrainConfig

    specs = []
    parsed = [parse_method(m) for m in methods]
    keep = None if only_splits is None else set(only_splits)
    for seed in seeds:
        splits = protocol_splits(split_names, protocol, seed, folds)
        if keep is not None:
            splits = [s for s in splits if s in keep]
            if not splits:
                raise ConfigError("splits", f"none of {', '.join(only_splits)} is a {protocol} split for seed {seed}")
        for split in splits:
            for label, overrides in parsed:
                cfg = TrainConfig.from_dict({**base, **overrides, "seed": int(seed)}, source=f"--methods {label}")
                specs.append(RunSpec(label, split, int(seed), cfg.to_dict()))
    return specs


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def run_grid(store_path: str, specs: list[RunSpec], out: Path, jobs: int = 1) -> list[dict[str, Any]]:
    """Run the unfinished specs (``jobs`` processes), logging progress with an ETA; return all records."""
    records: list[dict[str, Any]] = []
    todo = []
    for spec in specs:
        done = finished_run(spec, out)
        if done is None:
            todo.append(spec)
        else:
            records.append(done)
    log.info("%d runs in the grid: %d already finished in %s, %d to run with %d job(s)",
             len(specs), len(records), out, len(todo), jobs)
    started = time.perf_counter()

    def progress(i: int, spec: RunSpec, record: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - started
        eta = elapsed / i * (len(todo) - i)
        log.info("run %d/%d done: %s %s seed %d -> test PCC %.4f (k %d, %d epochs, %.0f s) | %.1f runs/min, ETA %dm%02ds",
                 i, len(todo), spec.label, spec.split, spec.seed, record["pcc"], record["k"], record["epochs"],
                 record["wall_time_s"], 60 * i / max(elapsed, 1e-9), int(eta) // 60, int(eta) % 60)

    if jobs <= 1:
        for i, spec in enumerate(todo, 1):
            record = run_one(store_path, spec, str(out))
            records.append(record)
            progress(i, spec, record)
        return records
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
        pending: dict[Future, RunSpec] = {pool.submit(run_one, store_path, s, str(out)): s for s in todo}
        finished = 0
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                spec = pending.pop(future)
                record = future.result()
                records.append(record)
                finished += 1
                progress(finished, spec, record)
    return records


def prepare_inputs(store: Any, specs: list[RunSpec]) -> None:
    """Build the frozen-feature caches once, before worker processes would race to build them."""
    from agl.models import feature_cache

    for backbone, weights, dtype in sorted({(s.config["backbone"], s.config["weights"],
                                             s.config.get("feature_dtype", "float32"))
                                            for s in specs if s.config["mode"] == "features"}, key=str):
        feature_cache(store, backbone, weights, dtype=dtype)


def evaluate(store: Any, protocol: str, seeds: Sequence[int], methods: Sequence[str], out: str | Path,
             base: dict[str, Any] | None = None, jobs: int = 1, folds: Sequence[int] | None = None,
             only_splits: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or resume) a grid and write its summary; returns {"records", "table", "wilcoxon", "paths"}."""
    from agl.data.store import open_store

    store = open_store(store) if isinstance(store, (str, Path)) else store
    out = Path(out)
    specs = build_grid(store.split_names, protocol, seeds, methods, base or {}, folds, only_splits)
    check_output_folder(out, "evaluate", inputs=[store.path], reuse=True)
    out.mkdir(parents=True, exist_ok=True)
    for spec in specs:  # refuse a folder holding another configuration's runs before any work
        finished_run(spec, out)
    write_output_marker(out, "evaluate", store=str(store.path), protocol=protocol)
    prepare_inputs(store, specs)
    records = run_grid(str(store.path), specs, out, jobs)
    atomic_write_json(out / "grid.json", {"store": str(store.path), "protocol": protocol, "seeds": list(seeds),
                                          "methods": list(methods), "folds": None if folds is None else list(folds),
                                          "base": base or {}, "n_runs": len(specs)})
    order = [parse_method(m)[0] for m in methods]
    paths = write_outputs(out, records, order)
    return {"records": records, "table": summary_table(records, order),
            "wilcoxon": wilcoxon_table(records, order), "paths": paths}
