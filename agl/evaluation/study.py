"""``agl study``: the real-data study on the bundled her2st demo, regenerated into one Markdown page.

For each primary-gene panel (``seurat``: the store's seurat top 50; ``detected``: the top 50 among
genes non-zero in at least ``min_detection`` of the training spots, a second demo store) and each
protocol (``loso``: leave one slide out; ``kfold``: the paper's random 5-fold spot split), it runs
PGL, AGL-all, DkGSB and top-k / random-k over a grid of k with :func:`agl.evaluation.protocol.evaluate`
(one resumable grid per panel and protocol under ``work``), then writes the page: tables, the
PCC-vs-k curve with DkGSB's learned k on it, paired tests over runs and per gene, and a verdict.

The page goes between two markers, so hand-written sections of the same file outside them stay;
a page (or block) produced with another plan is replaced only with ``overwrite``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from agl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PANELS = ("seurat", "detected")
PROTOCOLS = ("loso", "kfold")
ALPHA = 0.05
BEGIN = "<!-- agl study: begin"
END = "<!-- agl study: end -->"

# The two sizes of the study; any field can be overridden on the command line.
FULL: dict[str, Any] = {"seeds": [0, 1, 2, 3, 4], "kfold_seeds": [0, 1, 2], "folds": None,
                        "ks": [250, 500, 1000, 2000, 4000, 8000], "epochs": 30, "patience": 10}
QUICK: dict[str, Any] = {"seeds": [0, 1], "kfold_seeds": [0], "folds": [0, 1],
                         "ks": [500, 4000], "epochs": 12, "patience": 4}


@dataclass(frozen=True)
class StudyPlan:
    """What the study runs (``jobs`` and paths are not part of it: they do not change the results)."""

    panels: tuple[str, ...] = PANELS
    protocols: tuple[str, ...] = PROTOCOLS
    seeds: tuple[int, ...] = tuple(FULL["seeds"])
    kfold_seeds: tuple[int, ...] = tuple(FULL["kfold_seeds"])
    folds: tuple[int, ...] | None = None
    slides: tuple[str, ...] | None = None
    ks: tuple[int, ...] = tuple(FULL["ks"])
    epochs: int = FULL["epochs"]
    patience: int = FULL["patience"]
    min_detection: float = 0.3
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, values, known in (("--panels", self.panels, PANELS), ("--protocols", self.protocols, PROTOCOLS)):
            bad = [v for v in values if v not in known]
            if bad or not values:
                raise ConfigError(name, f"{bad or 'nothing'}: choose from {', '.join(known)}")
        if not self.seeds or not self.kfold_seeds:
            raise ConfigError("--seeds", "needs at least one seed")
        if not self.ks or any(k < 1 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise ConfigError("--ks", f"needs distinct positive k values, got {list(self.ks)}")
        if self.epochs < 1 or self.patience < 1:
            raise ConfigError("--epochs", "epochs and patience must be at least 1")
        if not 0.0 < self.min_detection < 1.0:
            raise ConfigError("--min-detection", f"must be a fraction in (0, 1), got {self.min_detection}")

    def key(self) -> str:
        """Hash of the plan: a page made with the same plan may be regenerated without --overwrite."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=list).encode()).hexdigest()[:12]

    def methods(self, n_aux: int) -> list[str]:
        ks = [k for k in self.ks if k < n_aux]  # k >= all auxiliary genes is AGL-all
        return ["pgl", "agl_all", "dkgsb", *(f"topk:k={k}" for k in ks), *(f"random_k:k={k}" for k in ks)]

    def base(self) -> dict[str, Any]:
        return {**self.settings, "epochs": self.epochs, "patience": self.patience}

    def command(self, page: Path, work: Path, jobs: int, quick: bool) -> str:
        """The exact command line that reproduces this plan (every option explicit)."""
        parts = ["agl study"] + (["--quick"] if quick else [])
        parts += [f"--panels {','.join(self.panels)}", f"--protocols {','.join(self.protocols)}",
                  f"--seeds {','.join(map(str, self.seeds))}", f"--kfold-seeds {','.join(map(str, self.kfold_seeds))}"]
        if self.folds is not None:
            parts.append(f"--folds {','.join(map(str, self.folds))}")
        if self.slides is not None:
            parts.append(f"--slides {','.join(self.slides)}")
        parts += [f"--ks {','.join(map(str, self.ks))}", f"--epochs {self.epochs}", f"--patience {self.patience}",
                  f"--min-detection {self.min_detection:g}"]
        parts += [f"--set {k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(self.settings.items())]
        parts += [f"--jobs {jobs}", f"--work {work}", f"--out {page}"]
        return " ".join(parts)


# --------------------------------------------------------------------------- the page guard
def existing_block_key(page: Path) -> str | None:
    """The plan key of the study block in ``page``; '' when the page has no block; None when absent."""
    if not page.exists():
        return None
    if not page.is_file():
        raise DataError(page, "exists and is not a file; refusing to write the study page there")
    match = re.search(re.escape(BEGIN) + r".*?plan=([0-9a-f]+)", page.read_text())
    return match.group(1) if match else ""


def check_page(page: Path, plan: StudyPlan, overwrite: bool) -> None:
    """Refuse (before any training) to replace a page, or a study block of another plan, without ``overwrite``."""
    found = existing_block_key(page)
    if found is None or found == plan.key() or overwrite:
        return
    if found == "":
        raise DataError(page, "exists and holds no `agl study` block; pass --overwrite to replace the whole file "
                              "(or add the study's begin/end markers where the block should go)")
    raise DataError(page, f"holds an `agl study` block made with another plan ({found}, this one is {plan.key()}); "
                          "pass --overwrite to replace it")


def splice(page: Path, block: str) -> str:
    """The page's text with its study block replaced by ``block`` (everything outside the markers kept)."""
    if not page.exists():
        return block
    text = page.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return block
    return text[:start] + block + text[end + len(END):]


# --------------------------------------------------------------------------- statistics
def _p(p: float) -> str:
    return "–" if not math.isfinite(p) else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def _f(x: float, digits: int = 4) -> str:
    return "–" if not math.isfinite(x) else f"{x:+.{digits}f}" if digits == 4 else f"{x:.{digits}f}"


def _ms(values: pd.Series) -> str:
    values = values.astype(float)
    std = values.std(ddof=1) if len(values) > 1 else float("nan")
    return f"{values.mean():.4f} ± {std:.4f}" if math.isfinite(std) else f"{values.mean():.4f}"


def paired_runs(runs: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Test PCC of methods ``a`` and ``b`` on the same (split, seed) runs, with ``diff = a - b``."""
    pa = runs[runs["method"] == a].set_index(["split", "seed"])["pcc"]
    pb = runs[runs["method"] == b].set_index(["split", "seed"])["pcc"]
    both = pd.concat([pa.rename("a"), pb.rename("b")], axis=1).dropna()
    return both.assign(diff=both["a"] - both["b"]).reset_index()


def paired_p(diff: np.ndarray) -> tuple[float, float]:
    """Two-sided p-values of paired differences: Wilcoxon signed-rank and paired t (NaN when undefined)."""
    from agl.evaluation.metrics import paired_difference_tests

    tests = paired_difference_tests(diff)
    return tests["p_wilcoxon"], tests["p_t"]


def compare(records: list[dict[str, Any]], runs: pd.DataFrame, a: str, b: str) -> dict[str, Any]:
    """``a`` against ``b``: paired over runs (Wilcoxon and t) and per primary gene (Wilcoxon)."""
    from agl.evaluation.protocol import wilcoxon_table

    pr = paired_runs(runs, a, b)
    w, t = paired_p(pr["diff"].to_numpy())
    genes = wilcoxon_table(records, [a], reference=b)
    g = genes.iloc[0] if not genes.empty else None
    return {"a": a, "b": b, "n_runs": len(pr), "mean_diff": float(pr["diff"].mean()) if len(pr) else float("nan"),
            "wins": int((pr["diff"] > 0).sum()), "losses": int((pr["diff"] < 0).sum()), "p_wilcoxon": w, "p_t": t,
            "n_genes": int(g["n_genes"]) if g is not None else 0,
            "gene_mean_diff": float(g["mean_diff"]) if g is not None else float("nan"),
            "gene_wins": int(g["wins"]) if g is not None else 0, "gene_losses": int(g["losses"]) if g is not None else 0,
            "p_genes": float(g["p_value"]) if g is not None else float("nan")}


def run_level_p(c: dict[str, Any]) -> tuple[float, str]:
    """The run-level p-value a verdict uses: Wilcoxon from 6 paired runs on, the paired t-test below that
    (with n <= 5 pairs the two-sided Wilcoxon p cannot go below 2 / 2^n = 0.0625)."""
    return (c["p_wilcoxon"], "Wilcoxon") if c["n_runs"] >= 6 else (c["p_t"], "paired t")


def verdict(c: dict[str, Any]) -> str:
    """One plain sentence: better, worse, or not distinguishable from noise.

    A difference counts only when the run-level test (:func:`run_level_p`) and the per-gene
    Wilcoxon test both give p < ALPHA in the same direction; genes of one run share its noise,
    so the per-gene test alone overstates the evidence.
    """
    stats = (f"mean test PCC difference {_f(c['mean_diff'])} over {c['n_runs']} paired runs ({c['wins']} wins, "
             f"{c['losses']} losses), Wilcoxon p = {_p(c['p_wilcoxon'])}, paired t p = {_p(c['p_t'])}; per gene "
             f"{_f(c['gene_mean_diff'])} ({c['gene_wins']} wins / {c['gene_losses']} losses of {c['n_genes']} genes), "
             f"Wilcoxon p = {_p(c['p_genes'])}")
    return f"**{c['a']} vs {c['b']}: {verdict_word(c)}**: {stats}"


def verdict_word(c: dict[str, Any]) -> str:
    """better / worse (both tests agree at ALPHA), not shown (only one test), noise, or not testable."""
    p, test = run_level_p(c)
    if not math.isfinite(p):
        return f"not testable with {c['n_runs']} paired run(s)"
    same_sign = math.isfinite(c["gene_mean_diff"]) and (c["gene_mean_diff"] > 0) == (c["mean_diff"] > 0)
    if p < ALPHA and c["p_genes"] < ALPHA and same_sign:
        return "better" if c["mean_diff"] > 0 else "worse"
    if p < ALPHA or c["p_genes"] < ALPHA:
        return f"not shown (only the {'run-level ' + test if p < ALPHA else 'per-gene'} test gives p < {ALPHA})"
    return "no detectable difference: noise"


def summary_sentence(key: list[dict[str, Any]]) -> str:
    """How often selection (DkGSB, the validation-chosen top-k) and AGL-all were better/worse than the baselines."""
    def tally(rows: list[dict[str, Any]]) -> str:
        words = [verdict_word(c) for c in rows]
        better, worse = words.count("better"), words.count("worse")
        return f"better in {better}, worse in {worse}, neither (noise, not shown or not testable) in {len(rows) - better - worse}"

    selection = [c for c in key if c["a"] != "agl_all"]
    parts = []
    for ref, name in (("agl_all", "AGL-all"), ("pgl", "PGL")):
        rows = [c for c in selection if c["b"] == ref]
        if rows:
            parts.append(f"against {name} it is {tally(rows)} of {len(rows)} comparisons")
    agl = [c for c in key if c["a"] == "agl_all" and c["b"] == "pgl"]
    text = "**In short: auxiliary-gene selection (DkGSB and the top-k chosen on validation): " + "; ".join(parts) + "."
    if agl:
        text += f" AGL-all against PGL: {tally(agl)} of {len(agl)} grids."
    return text + "** Per grid:"


def group_of(split: str, protocol: str) -> str:
    """The unit of per-slide / per-fold tests: the held-out slide (loso) or the fold index (kfold)."""
    if protocol == "loso":
        return split.removeprefix("loso-")
    match = re.search(r"-f(\d+)$", split)
    return f"fold {match.group(1)}" if match else split


# --------------------------------------------------------------------------- one grid's analysis
@dataclass
class GridResult:
    panel: str
    protocol: str
    records: list[dict[str, Any]]
    n_aux: int
    primary_detection: float  # median over runs' primary genes of the fraction of spots with a non-zero count
    n_planned: int = 0  # runs in the plan's grid (more than len(records) when written from an unfinished grid)
    min_detection: float = 0.0  # the detection rate of the 'detected' panel

    @property
    def runs(self) -> pd.DataFrame:
        return pd.DataFrame([{k: r[k] for k in ("method", "split", "seed", "pcc", "scc", "mse", "k", "epochs",
                                                 "best_epoch", "best_val_pcc", "wall_time_s")} for r in self.records])


def curve_table(runs: pd.DataFrame, n_aux: int) -> pd.DataFrame:
    """Per k: top-k and random-k test PCC (mean, std, runs); k = all is AGL-all for both."""
    rows = []
    labels = {m for m in runs["method"] if m.startswith(("topk:", "random_k:"))}
    ks = sorted({int(m.split("k=")[1]) for m in labels})
    for k in [*ks, n_aux]:
        row: dict[str, Any] = {"k": k}
        for kind in ("topk", "random_k"):
            label = "agl_all" if k == n_aux else f"{kind}:k={k}"
            sub = runs[runs["method"] == label]
            row[f"{kind}_mean"] = float(sub["pcc"].mean()) if len(sub) else float("nan")
            row[f"{kind}_std"] = float(sub["pcc"].std(ddof=1)) if len(sub) > 1 else float("nan")
            row[f"{kind}_val"] = float(sub["best_val_pcc"].mean()) if len(sub) else float("nan")
            row[f"{kind}_n"] = len(sub)
            diff = paired_runs(runs, label, "agl_all")["diff"]
            row[f"{kind}_dmean"] = float(diff.mean()) if len(diff) else float("nan")
            row[f"{kind}_dsem"] = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def best_topk(runs: pd.DataFrame, by: str) -> str | None:
    """The top-k label (k < all) with the highest mean ``by`` (best_val_pcc: chosen on validation; pcc: on test)."""
    sub = runs[runs["method"].str.startswith("topk:")]
    if sub.empty:
        return None
    return str(sub.groupby("method")[by].mean().idxmax())


def threshold_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Did DkGSB's threshold t move on signal? Its path and its hypergradients over a grid's DkGSB runs.

    Per run: t at the start (``t_init``), at the best validation epoch (the tested model) and at the end;
    per epoch with outer steps, whether the mean of its single-batch hypergradients lies more than two
    standard errors from zero (``|snr| * sqrt(n) > 2``, a t-statistic, n = outer steps x ``hypergrad_batches``:
    each outer step logs one estimate per training batch it averages). Across runs: a one-sample t-test of the
    net change of t against 0.
    """
    from scipy.stats import binomtest, t as student_t, ttest_1samp

    runs = [r for r in records if r.get("method") == "dkgsb" and r.get("history")]
    if not runs:
        return None
    t0, t_best, t_end, strong, epochs, agreement, null = [], [], [], 0, 0, [], []
    for r in runs:
        h = r["history"]  # one row per epoch
        best = next((row for row in h if row.get("epoch") == r.get("best_epoch")), h[-1])
        t0.append(float(r.get("config", {}).get("t_init", h[0]["t"])))
        t_best.append(float(best["t"]))
        t_end.append(float(h[-1]["t"]))
        per_step = int(r.get("config", {}).get("hypergrad_batches") or 1)
        for row in h:
            n, snr = (row.get("outer_steps") or 0) * per_step, row.get("hypergrad_snr")
            if n > 1 and snr is not None and math.isfinite(snr):
                epochs += 1
                strong += abs(snr) * math.sqrt(n) > 2
                agreement.append(float(row["hypergrad_sign_agreement"]))
                null.append(2 * float(student_t.sf(2.0, n - 1)))  # the share pure noise would give
    delta = np.asarray(t_end) - np.asarray(t0)
    p = float(ttest_1samp(delta, 0.0).pvalue) if len(delta) > 1 and delta.std(ddof=1) > 0 else float("nan")
    rate = float(np.mean(null)) if null else float("nan")
    p_strong = float(binomtest(int(strong), epochs, rate, alternative="greater").pvalue) if epochs else float("nan")
    return {"runs": len(runs), "t_init": float(np.mean(t0)), "t_best": float(np.mean(t_best)),
            "t_best_std": float(np.std(t_best, ddof=1)) if len(runs) > 1 else float("nan"),
            "t_end": float(np.mean(t_end)), "delta_min": float(delta.min()), "delta_max": float(delta.max()),
            "p_delta": p, "epochs": epochs, "strong_epochs": int(strong), "noise_rate": rate, "p_strong": p_strong,
            "sign_agreement": float(np.mean(agreement)) if agreement else float("nan")}


def threshold_lines(s: dict[str, Any]) -> list[str]:
    """The page's paragraph on DkGSB's threshold (see ``threshold_summary``)."""
    share = f"{s['strong_epochs']} of {s['epochs']}" if s["epochs"] else "none"
    sd = f" ± {s['t_best_std']:.3f}" if math.isfinite(s["t_best_std"]) else ""
    moved = ("t ended where it started in every run" if s["delta_min"] == s["delta_max"] == 0 else
             f"net change of t {s['delta_min']:+.3f} to {s['delta_max']:+.3f} (t-test against 0: p = {_p(s['p_delta'])})")
    signal = ("more than noise alone gives, so within epochs the hypergradient carries some signal (whether t "
              "moved the same way across runs is the t-test above)" if s["p_strong"] < 0.05 else
              "not more than noise alone gives: nothing shows that t moved on signal, so DkGSB's k "
              "reflects its starting threshold more than the data") if math.isfinite(s["p_strong"]) else "not measured"
    return [f"DkGSB's threshold over its {s['runs']} runs: t {s['t_init']:.3f} at the start, {s['t_best']:.3f}{sd} at "
            f"the tested (best-validation) epoch, {s['t_end']:.3f} at the end; {moved}. Epochs whose mean "
            f"hypergradient lies more than 2 standard errors from zero: {share}, where pure noise would give "
            f"{100 * s['noise_rate']:.0f}% (one-sided binomial p = {_p(s['p_strong'])}): {signal}. Mean sign "
            f"agreement of the single-batch estimates: {_f(s['sign_agreement'], 2)}.", ""]


def nearest_topk(runs: pd.DataFrame, k: float) -> str | None:
    labels = sorted({m for m in runs["method"] if m.startswith("topk:")})
    return min(labels, key=lambda m: abs(math.log(int(m.split("k=")[1]) / max(k, 1.0)))) if labels else None


def grid_section(g: GridResult, figures: Path, page: Path) -> tuple[str, list[str]]:
    """Markdown of one panel x protocol and its verdict lines; writes its figure."""
    from agl import plotting

    runs = g.runs
    name = {"loso": "leave-one-slide-out", "kfold": "5-fold spot split (the paper's protocol)"}[g.protocol]
    panel = {"seurat": "seurat top 50",
             "detected": f"detected top 50 (non-zero in >= {g.min_detection:.0%} of training spots)"}[g.panel]
    lines = [f"## {panel}, {name}", ""]
    n_splits, n_seeds = runs["split"].nunique(), runs["seed"].nunique()
    if g.n_planned > len(runs):
        lines += [f"**Unfinished grid: {len(runs)} of its {g.n_planned} runs** (only the (split, seed) units where "
                  "every method had finished are used).", ""]
    lines.append(f"{len(runs)} runs: {n_splits} splits x {n_seeds} seed(s) x {runs['method'].nunique()} methods; "
                 f"{g.n_aux} auxiliary genes; the primary genes are non-zero in a median of "
                 f"{100 * g.primary_detection:.0f}% of spots. Epochs run (mean): "
                 + ", ".join(f"{m} {runs[runs['method'] == m]['epochs'].mean():.1f}" for m in ("pgl", "agl_all", "dkgsb")
                             if (runs["method"] == m).any()) + ".")
    lines.append("")

    best_val, best_test = best_topk(runs, "best_val_pcc"), best_topk(runs, "pcc")
    main = [m for m in ("pgl", "agl_all", "dkgsb") if (runs["method"] == m).any()]
    if best_val:
        main.append(best_val)
    lines += ["| method | runs | test PCC | SCC | MSE | k (mean) | epochs | best val PCC |", "|---|---|---|---|---|---|---|---|"]
    for m in main:
        sub = runs[runs["method"] == m]
        tag = " (best top-k on validation)" if m == best_val else ""
        lines.append(f"| {m}{tag} | {len(sub)} | {_ms(sub['pcc'])} | {_ms(sub['scc'])} | {_ms(sub['mse'])} | "
                     f"{sub['k'].mean():.0f} | {sub['epochs'].mean():.1f} | {sub['best_val_pcc'].mean():.4f} |")
    lines.append("")

    curve = curve_table(runs, g.n_aux)
    lines += [f"PCC against k (top-k: the first k auxiliary genes of the HVG prior ranking, the only subsets DkGSB's "
              f"threshold can pick; random-k: k genes drawn at random; k = {g.n_aux} is AGL-all):", "",
              "| k | top-k test PCC | random-k test PCC | top-k − AGL-all (paired) | random-k − AGL-all (paired) "
              "| top-k val PCC |", "|---|---|---|---|---|---|"]
    for row in curve.itertuples():
        def cell(kind: str, mean: str = "mean", spread: str = "std", fmt: str = ".4f") -> str:
            m, sd = getattr(row, f"{kind}_{mean}"), getattr(row, f"{kind}_{spread}")
            return "–" if not math.isfinite(m) else f"{m:{fmt}} ± {sd:.4f}" if math.isfinite(sd) else f"{m:{fmt}}"
        lines.append(f"| {row.k}{' (all)' if row.k == g.n_aux else ''} | {cell('topk')} | {cell('random_k')} | "
                     f"{cell('topk', 'dmean', 'dsem', '+.4f')} | {cell('random_k', 'dmean', 'dsem', '+.4f')} | "
                     f"{_f(row.topk_val, 3) if math.isfinite(row.topk_val) else '–'} |")
    lines += ["", "(± is the standard deviation over runs for PCC, the standard error of the mean for the paired "
              "differences: in leave-one-slide-out the slides differ far more from each other than methods do, so "
              "the paired differences are the informative ones.)", ""]
    dk = runs[runs["method"] == "dkgsb"]
    points = {}
    if len(dk):
        points["DkGSB"] = (float(dk["k"].mean()), float(dk["k"].std(ddof=1)) if len(dk) > 1 else 0.0,
                           float(dk["pcc"].mean()), float(dk["pcc"].std(ddof=1)) if len(dk) > 1 else 0.0)
    pgl = runs[runs["method"] == "pgl"]["pcc"]
    fig = plotting.plot_k_curve(
        {"top-k (prior prefix)": curve.rename(columns={"topk_mean": "mean", "topk_std": "std"})[["k", "mean", "std"]],
         "random-k": curve.rename(columns={"random_k_mean": "mean", "random_k_std": "std"})[["k", "mean", "std"]]},
        figures / f"study_{g.panel}_{g.protocol}_curve.png", n_aux=g.n_aux,
        lines={"PGL": (float(pgl.mean()), 0.0)} if len(pgl) else {}, points=points,
        title=f"{panel}, {g.protocol}: test PCC against k")
    diff_points = {}
    if len(dk):
        d = paired_runs(runs, "dkgsb", "agl_all")["diff"]
        diff_points["DkGSB"] = (points["DkGSB"][0], points["DkGSB"][1], float(d.mean()),
                                float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0)
    d_pgl = paired_runs(runs, "pgl", "agl_all")["diff"]
    fig_diff = plotting.plot_k_curve(
        {"top-k (prior prefix)": curve.rename(columns={"topk_dmean": "mean", "topk_dsem": "std"})[["k", "mean", "std"]],
         "random-k": curve.rename(columns={"random_k_dmean": "mean", "random_k_dsem": "std"})[["k", "mean", "std"]]},
        figures / f"study_{g.panel}_{g.protocol}_curve_vs_agl_all.png", n_aux=g.n_aux,
        lines={"PGL − AGL-all": (float(d_pgl.mean()), 0.0), "AGL-all": (0.0, 0.0)} if len(d_pgl) else {},
        points=diff_points, ylabel="test PCC − AGL-all's on the same run (mean ± s.e.m.)",
        title=f"{panel}, {g.protocol}: paired difference from AGL-all against k")
    threshold = threshold_summary(g.records)
    if threshold:
        lines += threshold_lines(threshold)
    lines += [f"![PCC against k, {panel}, {g.protocol}]({os.path.relpath(fig, page.parent)})",
              f"![Paired difference from AGL-all against k, {panel}, {g.protocol}]"
              f"({os.path.relpath(fig_diff, page.parent)})", ""]

    pairs = [("agl_all", "pgl"), ("dkgsb", "pgl"), ("dkgsb", "agl_all")]
    if best_val:
        pairs += [(best_val, "pgl"), (best_val, "agl_all"), ("dkgsb", best_val)]
    near = nearest_topk(runs, float(dk["k"].mean())) if len(dk) else None
    if near and near != best_val:
        pairs.append(("dkgsb", near))
    pairs = [(a, b) for a, b in pairs if (runs["method"] == a).any() and (runs["method"] == b).any()]
    comparisons = [compare(g.records, runs, a, b) for a, b in pairs]
    lines += ["Paired tests (two-sided; runs paired by split and seed; per gene: each primary gene's test PCC "
              "averaged over the matched runs, Wilcoxon signed-rank):", "",
              "| comparison | paired runs | mean diff | wins/losses | Wilcoxon p (runs) | t p (runs) | genes | "
              "mean diff (genes) | wins/losses (genes) | Wilcoxon p (genes) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['a']} − {c['b']} | {c['n_runs']} | {_f(c['mean_diff'])} | {c['wins']}/{c['losses']} | "
                     f"{_p(c['p_wilcoxon'])} | {_p(c['p_t'])} | {c['n_genes']} | {_f(c['gene_mean_diff'])} | "
                     f"{c['gene_wins']}/{c['gene_losses']} | {_p(c['p_genes'])} |")
    lines.append("")
    if best_test and best_test != best_val:
        bt = runs[runs["method"] == best_test]["pcc"]
        lines += [f"The best top-k on the test set is {best_test} ({bt.mean():.4f}); chosen on test, it is an optimistic "
                  "ceiling, so the tests above use the top-k chosen on validation.", ""]

    unit = "slide" if g.protocol == "loso" else "fold"
    groups = sorted({group_of(s, g.protocol) for s in runs["split"]})
    cols = [m for m in ("pgl", "agl_all", "dkgsb", best_val) if m and (runs["method"] == m).any()]
    lines += [f"Per held-out {unit} (test PCC, mean over seeds; DkGSB − AGL-all paired over seeds, t-test):", "",
              f"| {unit} | " + " | ".join(cols) + " | DkGSB k | DkGSB − AGL-all | p |",
              "|---|" + "---|" * (len(cols) + 3)]
    runs = runs.assign(group=[group_of(s, g.protocol) for s in runs["split"]])
    for grp in groups:
        sub = runs[runs["group"] == grp]
        means = [f"{sub[sub['method'] == m]['pcc'].mean():.4f}" for m in cols]
        diff = paired_runs(sub, "dkgsb", "agl_all")["diff"].to_numpy() if "dkgsb" in cols else np.array([])
        _, t = paired_p(diff)
        k = sub[sub["method"] == "dkgsb"]["k"].mean() if "dkgsb" in cols else float("nan")
        lines.append(f"| {grp} | " + " | ".join(means) + f" | {k:.0f} | {_f(float(diff.mean()) if len(diff) else float('nan'))} | {_p(t)} |")
    lines.append("")
    verdicts = [f"- {panel}, {g.protocol}: " + verdict(c) for c in comparisons]
    key = [{**c, "grid": f"{g.panel}, {g.protocol}"} for c in comparisons
           if c["b"] in ("pgl", "agl_all") and c["a"] in ("agl_all", "dkgsb", best_val)]
    lines += ["Verdicts (alpha = 0.05, no correction for multiple comparisons; a difference counts when the run-level "
              "test and the per-gene test agree):", "", *verdicts, ""]
    return "\n".join(lines), key


# --------------------------------------------------------------------------- running it
def panel_store(panel: str, plan: StudyPlan) -> Path:
    """The demo store of a primary-gene panel (the ``detected`` one is built on first use, sharing features)."""
    from agl.data.store import open_store
    from agl.datasets import her2st_demo_store
    from agl.models.features import share_feature_cache

    default = her2st_demo_store()
    if panel == "seurat":
        return default
    path = her2st_demo_store(primary_min_detection=plan.min_detection)
    linked = share_feature_cache(open_store(default), open_store(path))
    if linked:
        log.info("reused %d cached feature file(s) of %s for %s", len(linked), default, path)
    return path


def primary_detection(store: Any, records: list[dict[str, Any]]) -> float:
    """Median fraction of spots where the runs' primary genes are non-zero."""
    genes = store.genes.set_index("name") if "name" in store.genes.columns else store.genes
    names = sorted({gene for r in records for gene in r.get("per_gene_pcc", {})})
    n = int(store.manifest.get("n_spots") or len(store.spots))
    found = [float(genes.loc[g, "n_spots"]) / n for g in names if g in genes.index]
    return float(np.median(found)) if found else float("nan")


def finished_units(store: Any, protocol: str, seeds: Sequence[int], methods: Sequence[str], out: Path,
                   base: dict[str, Any], folds: Sequence[int] | None, only: Sequence[str] | None
                   ) -> tuple[list[dict[str, Any]], int]:
    """The finished runs of a grid, kept only for (split, seed) units where every method finished; and the grid's size.

    Whole units only, so that every method's mean is over the same held-out data.
    """
    from agl.evaluation.protocol import build_grid, finished_run

    specs = build_grid(store.split_names, protocol, seeds, methods, base, folds, only)
    found = []
    for spec in specs:
        record = finished_run(spec, out)
        if record is not None:  # when it was written: the report states the span the training ran in
            found.append({**record, "finished_at": (spec.directory(out) / "result.json").stat().st_mtime})
    per_unit: dict[tuple[str, int], int] = {}
    for r in found:
        per_unit[(r["split"], r["seed"])] = per_unit.get((r["split"], r["seed"]), 0) + 1
    complete = {u for u, n in per_unit.items() if n == len(methods)}
    return [r for r in found if (r["split"], r["seed"]) in complete], len(specs)


def run_study(plan: StudyPlan, page: str | Path, work: str | Path, *, jobs: int = 1, overwrite: bool = False,
              quick: bool = False, figures: str | Path | None = None, report_only: bool = False) -> dict[str, Any]:
    """Run (or resume) every grid of ``plan`` and write the page and its figures; returns what was written.

    ``report_only``: train nothing; write the page from the runs already finished in ``work`` (whole
    (split, seed) units only), saying how many of each grid's runs that is.
    """
    from agl.data.store import open_store
    from agl.evaluation.protocol import evaluate

    started, started_utc = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    page, work = Path(page), Path(work)
    figures = Path(figures) if figures is not None else page.parent / "figures"
    check_page(page, plan, overwrite)
    load_start = os.getloadavg()
    grids = [(panel, protocol) for panel in plan.panels for protocol in plan.protocols]
    results: list[GridResult] = []
    for i, (panel, protocol) in enumerate(grids, 1):
        store = open_store(panel_store(panel, plan))
        n_aux = int((store.gene_set(store.split_names[0])["role"] == "auxiliary").sum())
        seeds = plan.seeds if protocol == "loso" else plan.kfold_seeds
        only = [f"loso-{s}" for s in plan.slides] if (plan.slides and protocol == "loso") else None
        t0 = time.perf_counter()
        log.info("study grid %d/%d: panel %s, protocol %s (%s)", i, len(grids), panel, protocol, store.path)
        folds = plan.folds if protocol == "kfold" else None
        if report_only:
            records, n_planned = finished_units(store, protocol, seeds, plan.methods(n_aux), work / panel / protocol,
                                                plan.base(), folds, only)
            if not records:
                log.warning("no whole (split, seed) unit of grid %s/%s has finished in %s; left out", panel, protocol,
                            work / panel / protocol)
                continue
        else:
            records = evaluate(store, protocol, seeds, plan.methods(n_aux), work / panel / protocol, base=plan.base(),
                               jobs=jobs, folds=folds, only_splits=only)["records"]
            n_planned = len(records)
        results.append(GridResult(panel, protocol, records, n_aux, primary_detection(store, records), n_planned,
                                  plan.min_detection))
        elapsed = time.perf_counter() - started
        eta = elapsed / i * (len(grids) - i)
        log.info("study grid %d/%d done in %.0f s (%d runs) | %.2f grids/h, ETA %dm%02ds", i, len(grids),
                 time.perf_counter() - t0, len(records), 3600 * i / elapsed, int(eta) // 60, int(eta) % 60)
        # the page after every grid: an interrupted study still leaves the finished grids written up
        written = write_page(plan, page, work, figures, jobs, quick, results, len(grids), started, started_utc,
                             load_start, overwrite, report_only)
    if not results:
        raise DataError(work, "no finished runs of this plan to report (run it without --report-only first)")
    return {**written, "figures": sorted(figures.glob("study_*.png"))}


def write_page(plan: StudyPlan, page: Path, work: Path, figures: Path, jobs: int, quick: bool,
               results: list[GridResult], n_grids: int, started: float, started_utc: str,
               load_start: tuple[float, float, float], overwrite: bool, report_only: bool = False) -> dict[str, Any]:
    """Render the finished grids into the page's study block (atomically) and their figures."""
    from agl.fileio import atomic_write_text

    sections, verdicts = [], []
    for g in results:
        text, v = grid_section(g, figures, page)
        sections.append(text)
        verdicts += v
    wall = time.perf_counter() - started
    train_s = sum(r["wall_time_s"] for g in results for r in g.records)
    n_runs = sum(len(g.records) for g in results)
    block = render_page(plan, page, work, jobs, quick, sections, verdicts, results, started_utc, wall, train_s,
                        n_runs, load_start, n_grids, report_only)
    check_page(page, plan, overwrite)  # again: the page may have changed during the runs
    atomic_write_text(page, splice(page, block))
    log.info("wrote %s (%d of %d grids, %d runs, %.0f s)", page, len(results), n_grids, n_runs, wall)
    return {"page": page, "n_runs": n_runs, "verdicts": [f"{c['grid']}: {verdict(c)}" for c in verdicts], "wall_s": wall}


def span(results: list[GridResult]) -> str:
    """First start and last end (UTC) of the runs, from their result files' times (``--report-only``)."""
    ends = [(r["finished_at"], r["wall_time_s"]) for g in results for r in g.records if "finished_at" in r]
    if not ends:
        return "unknown times"
    first, last = min(e - w for e, w in ends), max(e for e, _ in ends)
    fmt = lambda t: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))  # noqa: E731
    return f"{fmt(first)} and {fmt(last)} ({(last - first) / 60:.0f} min of wall time)"


def render_page(plan: StudyPlan, page: Path, work: Path, jobs: int, quick: bool, sections: list[str],
                verdicts: list[str], results: list[GridResult], started_utc: str, wall: float, train_s: float,
                n_runs: int, load_start: tuple[float, float, float], n_grids: int, report_only: bool = False) -> str:
    import torch

    full = StudyPlan(panels=PANELS, protocols=PROTOCOLS, min_detection=plan.min_detection)
    is_full = (plan.seeds == full.seeds and plan.kfold_seeds == full.kfold_seeds and plan.folds is None
               and plan.slides is None and set(plan.ks) >= set(full.ks) and plan.epochs >= full.epochs
               and plan.patience >= full.patience and set(plan.panels) == set(PANELS)
               and set(plan.protocols) == set(PROTOCOLS))
    mem = ""
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB memory"
    except (ValueError, OSError, AttributeError):
        pass
    scope = ("the full study" if is_full else
             "**a subset of the full study** (the full one is `" + full.command(page, work, jobs, False) + "`)")
    head = [
        f"{BEGIN} plan={plan.key()} (generated by `agl study`; edit outside these markers) -->",
        "# Results on the bundled her2st demo",
        "",
        "Does auxiliary-gene learning help the 50 primary genes on real data, and does DkGSB's learned selection "
        "beat using all auxiliary genes (AGL-all) or only the primary genes (PGL)? Five imaged her2st sections "
        "(B4, C2-C5, 996 spots after QC), frozen MobileNetV2 features, one command. This page is "
        f"{scope}."
        + ("" if len(results) == n_grids else f" **Unfinished: {len(results)} of its {n_grids} grids (panel x "
                                               "protocol) had finished when this page was written.**"),
        "",
        "## Answer",
        "",
        summary_sentence(verdicts),
        "",
        "| panel, protocol | comparison | mean diff (runs) | wins/losses | run-level p | per-gene p | verdict |",
        "|---|---|---|---|---|---|---|",
        *(f"| {c['grid']} | {c['a']} − {c['b']} | {_f(c['mean_diff'])} | {c['wins']}/{c['losses']} | "
          f"{_p(run_level_p(c)[0])} ({run_level_p(c)[1]}, {c['n_runs']} pairs) | {_p(c['p_genes'])} ({c['n_genes']} genes) "
          f"| {verdict_word(c)} |" for c in verdicts),
        "",
        "All tests are two-sided. A difference counts (better / worse) only when the run-level test (Wilcoxon "
        "signed-rank over runs paired by split and seed from 6 pairs on, the paired t-test below that) and the per-gene "
        "Wilcoxon test (each primary gene's PCC averaged over the matched runs) both give p < 0.05 in the same "
        "direction; otherwise it is reported as noise or as not shown. No correction for multiple comparisons. The "
        "top-k compared with PGL and AGL-all is the k with the best mean validation PCC (not the best on test).",
        "",
        "## How this page was made",
        "",
        "```bash",
        plan.command(page, work, jobs, quick) + (" --report-only" if report_only else ""),
        "```",
        "",
        *(["This page was written with `--report-only` from the runs that the same command without it had finished "
           "in the work folder (it trains nothing itself); the wall time below is the report's, the training time "
           "summed over runs is the study's.", ""] if report_only else []),
        *([f"- The runs were trained between {span(results)} (first run's start to last run's end, all grids)."]
          if report_only else []),
        f"- Date: {started_utc}; wall time {wall / 60:.1f} min ({n_runs} runs, {train_s / 60:.1f} min of training "
        f"summed over runs; runs already in `{work}` from an earlier call with the same settings are reused).",
        f"- Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
        f"{mem}, torch {torch.__version__}, {jobs} worker process(es) of 1 thread; load average at start "
        f"{load_start[0]:.1f}, at end {os.getloadavg()[0]:.1f}.",
        f"- Training: features mode (frozen ImageNet MobileNetV2, 1280-d, 8 dihedral views), trunk, per-gene 1 − PCC "
        f"loss, up to {plan.epochs} epochs with early stopping after {plan.patience} epochs without a better "
        f"validation PCC (the best-validation model is tested); the library's defaults otherwise"
        + (f", and {', '.join(f'{k}={v}' for k, v in sorted(plan.settings.items()))}" if plan.settings else "") + ".",
        f"- Protocols: leave-one-slide-out (train on four sections, validation spots from them, test on the fifth; "
        f"training seeds {', '.join(map(str, plan.seeds))}"
        + (f"; held-out slides {', '.join(plan.slides)}" if plan.slides else "") + "); the 5-fold spot split per slide "
        f"(split seeds {', '.join(map(str, plan.kfold_seeds))}, which are also the training seeds; folds "
        f"{'all five' if plan.folds is None else ', '.join(map(str, plan.folds))}).",
        f"- Panels: `seurat` = the store's seurat-flavour top 50 HVGs on the training spots; `detected` = the top 50 "
        f"among genes non-zero in at least {plan.min_detection:.0%} of the training spots (a second demo store, "
        f"`agl ingest ... --primary-min-detection {plan.min_detection:g}`). Methods: PGL, AGL-all, DkGSB, top-k and "
        f"random-k for k in {', '.join(map(str, plan.ks))}.",
        f"- Raw runs: `{work}/<panel>/<protocol>/` (`table.md`, `wilcoxon.csv`, one `result.json` per run).",
        "",
    ]
    return "\n".join(head + sections) + "\n" + END + "\n"
