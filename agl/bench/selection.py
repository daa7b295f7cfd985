"""``agl bench selection``: auxiliary-gene selection where the right answer is known.

The inputs are real: the demo store's frozen MobileNetV2 features (the feature cache that
features-mode training reads) and its splits. The expression is planted (:func:`plant`):

- the view-averaged features are standardised and whitened by PCA; two disjoint blocks of
  principal components drive two sets of latent factors, each factor a linear, ``tanh`` or
  ``|.|`` function of one random direction in its block (so a linear read-out of the
  features cannot fit all of them; the trunk can);
- the primary genes and the **helpful** auxiliary genes are random mixtures of the
  *shared* factors plus independent noise (primaries noisier: helpful genes carry the
  extra signal about the shared factors that multi-task learning can exploit);
- **conflict** auxiliary genes mix the *other* block's factors: just as predictable from
  the image, but they pull the shared trunk towards directions the primaries do not use;
- **noise** auxiliary genes are pure noise (a trunk that fits them overfits);
- conflict genes are most of the unhelpful ones (70% of all auxiliary genes, noise 15%) and
  every method trains a narrow trunk (``BASE_SETTINGS``: one hidden layer of 64), so that the
  conflict genes really compete with the primaries for the trunk's capacity. With the earlier
  35% conflict / 50% noise and a 512-wide trunk the top-k curve was flat from about 0.5 to
  3.3 times the planted k (``--curve``, one ``--quick`` seed: 0.433 to 0.435): the question
  "which k?" had no answer there (measured figures: the README's ``agl bench selection`` bullet);
- the prior score is ``1[helpful] + sigma * noise``, ``sigma`` set so that a chosen share
  (``precision``, 0.8 by default) of the top-``k_planted`` genes are helpful, where
  ``k_planted`` is the number of helpful genes.

Each seed draws a new planted data set, a kfold split (``kfold-s0-f{seed % 5}``) and the
model's initialisation; within a seed every method sees the same data, the same
validation spots for model selection (``val_outer_fraction`` carves the others into
``val_outer`` for every method, used only by DkGSB's threshold) and the same budget. The
methods are trained by the normal loop (``agl.training.loop.fit`` through ``make_bundle``
on an in-memory store, :class:`PlantedStore`): PGL, AGL-all, top-k at the planted k,
random-k at the planted k and DkGSB once per hypergradient estimator. Reported: test PCC
of the primary genes per method, paired t-tests over seeds of every DkGSB variant
against PGL and AGL-all, DkGSB's learned k against the planted k (and its trajectory),
and the hypergradient's SNR and sign agreement per epoch from the run record.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from agl.errors import ConfigError

log = logging.getLogger(__name__)

PRIOR = "planted"  # name of the planted prior ranking (rank_planted in the gene table)
KINDS = ("helpful", "conflict", "noise")
FACTOR_SHAPES = ("linear", "tanh", "abs")


@dataclass
class Planted:
    """Planted targets for every spot and what they were planted with."""

    targets: np.ndarray              # [N, P + A] float32, columns in gene-table order
    genes: pd.DataFrame              # gene, column, role, prior_planted, rank_planted (auxiliary by rank)
    kind: np.ndarray                 # [A] helpful | conflict | noise, in gene-table order
    shared: np.ndarray               # [N, r] factors of the primary and helpful genes
    conflict: np.ndarray             # [N, r] factors of the conflict genes
    sigma: float                     # prior noise
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_primary(self) -> int:
        return int((self.genes["role"] == "primary").sum())

    @property
    def k_planted(self) -> int:
        return int((self.kind == "helpful").sum())

    def precision_at(self, k: int) -> float:
        """Share of helpful genes among the first ``k`` of the prior ranking."""
        return float((self.kind[: int(k)] == "helpful").mean()) if k > 0 else float("nan")


def _whitened_components(features: np.ndarray, n_components: int) -> np.ndarray:
    """Unit-variance principal components of the view-averaged, standardised features ``[N, q]``."""
    x = np.asarray(features, dtype=np.float64)
    x = x.mean(axis=0) if x.ndim == 3 else x  # the planted expression of a spot does not depend on its view
    x = x - x.mean(axis=0)
    sd = x.std(axis=0)
    x = x[:, sd > 1e-8] / sd[sd > 1e-8]
    if n_components > min(x.shape):
        raise ConfigError("n_components", f"{n_components} components from features of shape {x.shape}")
    vals, vecs = np.linalg.eigh(x @ x.T)  # left singular vectors from the spots' Gram matrix: N x N is small
    u = vecs[:, np.argsort(-vals)[:n_components]]
    return u * np.sqrt(x.shape[0])


def _factors(z: np.ndarray, n_factors: int, rng: np.random.Generator) -> np.ndarray:
    """``n_factors`` standardised factors of the components ``z``: linear, tanh or |.| of a random direction."""
    out = np.empty((z.shape[0], n_factors))
    for j in range(n_factors):
        a = rng.normal(size=z.shape[1])
        s = z @ (a / np.linalg.norm(a))
        shape = FACTOR_SHAPES[j % len(FACTOR_SHAPES)]
        f = s if shape == "linear" else np.tanh(1.5 * s) if shape == "tanh" else np.abs(s)
        out[:, j] = (f - f.mean()) / f.std()
    return out


def _genes_from(factors: np.ndarray, n: int, signal: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` genes: random mixtures of ``factors`` with variance share ``signal``, plus independent noise."""
    mix = factors @ rng.normal(size=(factors.shape[1], n))
    mix = (mix - mix.mean(axis=0)) / mix.std(axis=0)
    return np.sqrt(signal) * mix + np.sqrt(1.0 - signal) * rng.normal(size=mix.shape)


def prior_sigma(is_helpful: np.ndarray, noise: np.ndarray, precision: float) -> float:
    """The noise scale whose prior ``1[helpful] + sigma * noise`` puts ``precision`` helpful genes in its top k_planted.

    Bisection on the realised precision (it falls from 1 towards the base rate as sigma grows).
    """
    k = int(is_helpful.sum())
    base = k / len(is_helpful)
    if not base < precision <= 1.0:
        raise ConfigError("precision", f"must lie in ({base:.3f}, 1] (above the helpful share), got {precision}")

    def realised(sigma: float) -> float:
        top = np.argsort(-(is_helpful + sigma * noise), kind="stable")[:k]
        return float(is_helpful[top].mean())

    lo, hi = 0.0, 1.0
    while realised(hi) > precision and hi < 1e6:
        hi *= 2.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if realised(mid) > precision else (lo, mid)
    return hi


def plant(features: np.ndarray, *, n_primary: int = 50, n_aux: int = 14000, helpful_fraction: float = 0.15,
          conflict_fraction: float = 0.7, precision: float = 0.8, n_factors: int = 6, n_components: int = 24,
          primary_signal: float = 0.3, helpful_signal: float = 0.6, conflict_signal: float = 0.8,
          seed: int = 0) -> Planted:
    """Plant primary, helpful, conflict and noise genes on real image features (see the module docstring).

    ``features``: ``[views, N, D]`` (a feature cache) or ``[N, D]``. The signals are the
    variance share of each gene explained by its factors (the rest is noise). Shared factors
    use the first ``n_components // 2`` whitened components, conflict factors the others.
    """
    if not (0 < helpful_fraction and 0 <= conflict_fraction and helpful_fraction + conflict_fraction <= 1):
        raise ConfigError("helpful_fraction", f"need 0 < helpful ({helpful_fraction}) and helpful + conflict "
                                              f"({conflict_fraction}) <= 1")
    if n_primary < 1 or n_aux < 2:
        raise ConfigError("n_aux", f"need n_primary >= 1 and n_aux >= 2, got {n_primary}, {n_aux}")
    for name, v in (("primary_signal", primary_signal), ("helpful_signal", helpful_signal),
                    ("conflict_signal", conflict_signal)):
        if not 0 < v < 1:
            raise ConfigError(name, f"must lie in (0, 1), got {v}")
    rng = np.random.default_rng([int(seed), 13])
    z = _whitened_components(features, n_components)
    half = n_components // 2
    shared, conflict = _factors(z[:, :half], n_factors, rng), _factors(z[:, half:], n_factors, rng)
    n_help = max(1, int(round(helpful_fraction * n_aux)))
    n_conf = int(round(conflict_fraction * n_aux))
    kind = np.array(["helpful"] * n_help + ["conflict"] * n_conf + ["noise"] * (n_aux - n_help - n_conf))
    kind = kind[rng.permutation(n_aux)]
    aux = np.empty((z.shape[0], n_aux))
    aux[:, kind == "helpful"] = _genes_from(shared, n_help, helpful_signal, rng)
    aux[:, kind == "conflict"] = _genes_from(conflict, n_conf, conflict_signal, rng)
    aux[:, kind == "noise"] = rng.normal(size=(z.shape[0], int((kind == "noise").sum())))
    primary = _genes_from(shared, n_primary, primary_signal, rng)

    is_helpful = (kind == "helpful").astype(np.float64)
    noise = rng.normal(size=n_aux)
    sigma = prior_sigma(is_helpful, noise, precision)
    score = is_helpful + sigma * noise
    order = np.argsort(-score, kind="stable")  # auxiliary genes by prior rank, as a store's gene table
    from agl.data.preprocess import normalised_rank

    genes = pd.DataFrame({
        "gene": [f"P{i:03d}" for i in range(n_primary)] + [f"A{i:05d}" for i in order],
        "column": np.arange(n_primary + n_aux),
        "role": ["primary"] * n_primary + ["auxiliary"] * n_aux,
        f"prior_{PRIOR}": np.concatenate([np.full(n_primary, np.nan), score[order]]),
        f"rank_{PRIOR}": np.concatenate([np.full(n_primary, np.nan), normalised_rank(score)[order]]),
    })
    targets = np.ascontiguousarray(np.hstack([primary, aux[:, order]]), dtype=np.float32)
    settings = {"n_primary": n_primary, "n_aux": n_aux, "helpful_fraction": helpful_fraction,
                "conflict_fraction": conflict_fraction, "precision": precision, "n_factors": n_factors,
                "n_components": n_components, "primary_signal": primary_signal, "helpful_signal": helpful_signal,
                "conflict_signal": conflict_signal, "seed": int(seed)}
    return Planted(targets=targets, genes=genes, kind=kind[order], shared=shared, conflict=conflict,
                   sigma=float(sigma), settings=settings)


class PlantedStore:
    """A store whose expression and gene sets are planted; spots, splits, patches and feature cache are the real store's.

    ``agl.training.bundles.make_bundle`` reads it like a store, so the benchmark trains
    through the same bundle, carving of ``val_outer`` and loop as ``agl train``.
    """

    def __init__(self, store: Any, planted: Planted):
        if planted.targets.shape[0] != len(store.spots):
            raise ConfigError("planted", f"{planted.targets.shape[0]} planted spots, the store has {len(store.spots)}")
        self._store, self.planted = store, planted
        self.expression = planted.targets

    def gene_set(self, split: str) -> pd.DataFrame:
        self._store.split(split)  # an unknown split fails as it would on the store
        return self.planted.genes.copy()

    def __getattr__(self, name: str) -> Any:  # path, manifest, spots, split, patches, cache_dir
        return getattr(self._store, name)


def method_settings(k_planted: int, variants: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Label -> the gate settings of each compared method (DkGSB once per hypergradient estimator)."""
    out: dict[str, dict[str, Any]] = {
        "pgl": {"method": "pgl"},
        "agl_all": {"method": "agl_all"},
        "topk": {"method": "topk", "k": k_planted, "prior": PRIOR},
        "random_k": {"method": "random_k", "k": k_planted},
    }
    for v in variants:
        out[f"dkgsb_{v}"] = {"method": "dkgsb", "hypergrad": v, "prior": PRIOR}
    return out


# settings every run shares (features mode, CPU); DKGSB_SETTINGS only DkGSB's
BASE_SETTINGS: dict[str, Any] = {"mode": "features", "device": "cpu", "epochs": 40, "patience": 10,
                                 "val_outer_fraction": 0.5, "trunk": [64]}  # narrow: conflict genes compete
DKGSB_SETTINGS: dict[str, Any] = {"outer_val": "full", "t_init": 0.5}


# top-k at these multiples of the planted k (capped at n_aux; AGL-all is the "all" end): is the optimum
# of test PCC over k even at the planted k, and how flat is the curve that DkGSB's threshold descends?
CURVE_MULTIPLES: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0, 3.33)


def curve_ks(k_planted: int, n_aux: int, multiples: Sequence[float] = CURVE_MULTIPLES) -> list[int]:
    """Distinct k of the top-k curve: ``multiples`` of the planted k, within 1..n_aux - 1."""
    return sorted({min(n_aux - 1, max(1, int(round(m * k_planted)))) for m in multiples})


def run_method(store: PlantedStore, split: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Train one method with the normal loop; its test PCC, k and per-epoch record."""
    from agl.config import TrainConfig
    from agl.training.bundles import make_bundle
    from agl.training.loop import fit

    cfg = TrainConfig.from_dict(settings, source="bench selection")
    data = make_bundle(store, split, cfg)
    res = fit(cfg, data)
    keys = ("epoch", "val_pcc", "k", "t", "hypergrad_snr", "hypergrad_sign_agreement", "hypergrad_mean")
    return {"test_pcc": float(res.test["pcc"]), "k": int(res.k), "best_epoch": int(res.best_epoch),
            "epochs_run": int(res.epochs_run), "wall_s": round(float(res.wall_time_s), 2),
            "history": [{key: row.get(key) for key in keys if key in row} for row in res.history]}


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two-sided paired t-test of ``a`` against ``b``, with the mean difference."""
    from agl.evaluation.metrics import paired_difference_tests

    tests = paired_difference_tests(np.asarray(a, float) - np.asarray(b, float))
    return {"mean_diff": tests["mean_diff"], "t": tests["t"], "p": tests["p_t"]}


def summarise(runs: list[dict[str, Any]], k_planted: dict[int, int], tolerance: float = 0.25) -> dict[str, Any]:
    """Per-method PCC and k, paired tests of each DkGSB variant against PGL and AGL-all, k recovery."""
    frame = pd.DataFrame([{k: r[k] for k in ("seed", "method", "test_pcc", "k")} for r in runs])
    pcc = frame.pivot(index="seed", columns="method", values="test_pcc")
    ks = frame.pivot(index="seed", columns="method", values="k")
    planted = pd.Series(k_planted).reindex(pcc.index)
    methods: dict[str, Any] = {}
    for m in pcc.columns:
        col = pcc[m].dropna()
        methods[m] = {"pcc_mean": float(col.mean()), "pcc_std": float(col.std(ddof=1)) if len(col) > 1 else 0.0,
                      "n": int(len(col)), "k_mean": float(ks[m].mean())}
        if m.startswith("dkgsb"):
            rel = (ks[m] - planted) / planted
            methods[m].update({"k_rel_error_mean": float(rel.mean()),
                               "k_within_tolerance": int((rel.abs() <= tolerance).sum())})
            for base in ("pgl", "agl_all", "topk"):
                if base in pcc.columns:
                    both = pcc[[m, base]].dropna()
                    methods[m][f"vs_{base}"] = paired_test(both[m], both[base])
            methods[m]["recovers_k"] = bool(abs(methods[m]["k_rel_error_mean"]) <= tolerance)
            methods[m]["beats_pgl_and_agl_all"] = all(
                methods[m].get(f"vs_{b}", {}).get("mean_diff", -1) > 0 and methods[m].get(f"vs_{b}", {}).get("p", 1) < 0.05
                for b in ("pgl", "agl_all"))
    return {"k_planted_mean": float(planted.mean()), "tolerance": tolerance, "methods": methods}


def summarise_curve(curve: list[dict[str, Any]], runs: list[dict[str, Any]],
                    k_planted: dict[int, int] | None = None, tolerance: float = 0.25) -> dict[str, Any]:
    """Top-k test PCC by k (mean, sd over seeds; AGL-all as k = n_aux), the best k per seed, and
    paired tests of top-k at the planted k against top-k at every other k (a flat curve gives t no signal).

    With ``k_planted``: how identifiable k is at all. ``oracle_within_tolerance`` counts the seeds whose
    best k on their own test curve (an oracle no method has) lies within ``tolerance`` of the planted k;
    where even that oracle misses, a learned k cannot be expected to hit it seed by seed."""
    frame = pd.DataFrame([{k: r[k] for k in ("seed", "k", "test_pcc")} for r in curve])
    allk = [{"seed": r["seed"], "k": r["k"], "test_pcc": r["test_pcc"]} for r in runs if r["method"] in ("agl_all", "topk")]
    frame = pd.concat([frame, pd.DataFrame(allk)]).drop_duplicates(["seed", "k"])
    table = frame.pivot(index="seed", columns="k", values="test_pcc").sort_index(axis=1)
    k_at = {r["seed"]: r["k"] for r in runs if r["method"] == "topk"}
    best = {int(s): int(table.loc[s].idxmax()) for s in table.index}
    out: dict[str, Any] = {"k": [int(k) for k in table.columns],
                           "pcc_mean": [float(table[k].mean()) for k in table.columns],
                           "pcc_std": [float(table[k].std(ddof=1)) if table[k].count() > 1 else 0.0 for k in table.columns],
                           "best_k_per_seed": best,
                           "per_seed": {int(s): {int(k): float(v) for k, v in table.loc[s].dropna().items()}
                                        for s in table.index}}
    if k_planted:
        hits = [s for s, k in best.items() if s in k_planted and abs(k - k_planted[s]) <= tolerance * k_planted[s]]
        out["oracle_within_tolerance"] = {"seeds": len(hits), "of": len([s for s in best if s in k_planted]),
                                          "tolerance": tolerance}
    if k_at:
        at = pd.Series({s: table.loc[s, k] for s, k in k_at.items()})
        out["planted_vs_k"] = {int(k): paired_test(at.values, table.loc[at.index, k].values)
                               for k in table.columns if not all(k_at[s] == k for s in at.index)}
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The printed table: one row per method."""
    lines = [f"{'method':<16} {'test PCC':>16} {'k':>9}  {'vs PGL (diff, p)':>20}  {'vs AGL-all (diff, p)':>22}"]
    for m, s in summary["methods"].items():
        pcc = f"{s['pcc_mean']:.4f} +- {s['pcc_std']:.4f}"
        tests = ["", ""]
        for i, base in enumerate(("pgl", "agl_all")):
            t = s.get(f"vs_{base}")
            if t:
                tests[i] = f"{t['mean_diff']:+.4f}, p={t['p']:.3g}"
        lines.append(f"{m:<16} {pcc:>16} {s['k_mean']:>9.0f}  {tests[0]:>20}  {tests[1]:>22}")
    lines.append(f"planted k (helpful auxiliary genes): {summary['k_planted_mean']:.0f}; DkGSB target: within "
                 f"+-{summary['tolerance']:.0%} and better than PGL and AGL-all with p < 0.05")
    for m, s in summary["methods"].items():
        if m.startswith("dkgsb"):
            lines.append(f"  {m}: learned k {s['k_mean']:.0f} ({s['k_rel_error_mean']:+.0%} of planted; "
                         f"{s['k_within_tolerance']}/{s['n']} seeds within tolerance) -> recovers k: "
                         f"{'yes' if s['recovers_k'] else 'no'}; beats PGL and AGL-all: "
                         f"{'yes' if s['beats_pgl_and_agl_all'] else 'no'}")
    return "\n".join(lines)


def format_curve(curve: dict[str, Any], k_planted: float) -> str:
    """The top-k curve as printed lines: PCC by k and the paired test of the planted k against each k."""
    lines = [f"top-k curve (planted k {k_planted:.0f}): " + ", ".join(
        f"k {k}: {m:.4f}" for k, m in zip(curve["k"], curve["pcc_mean"]))]
    tests = curve.get("planted_vs_k", {})
    if tests:
        lines.append("  top-k at planted k minus top-k at k (paired): " + ", ".join(
            f"k {k}: {t['mean_diff']:+.4f} (p={t['p']:.2g})" for k, t in tests.items()))
    lines.append(f"  best k per seed: {sorted(curve['best_k_per_seed'].values())}")
    oracle = curve.get("oracle_within_tolerance")
    if oracle:
        lines.append(f"  test-set oracle (each seed's best k on its own test curve): within +-{oracle['tolerance']:.0%} "
                     f"of the planted k in {oracle['seeds']}/{oracle['of']} seeds")
    return "\n".join(lines)


def _plot(runs: list[dict[str, Any]], summary: dict[str, Any], path: Path,
          curve: dict[str, Any] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agl.fileio import atomic_savefig

    methods = list(summary["methods"])
    dk = [m for m in methods if m.startswith("dkgsb")]
    per_seed = (curve or {}).get("per_seed") or {}
    panels = 1 + (2 if dk else 0) + (1 if curve else 0) + (1 if per_seed else 0)  # DkGSB panels only when it ran
    rows = 2 if panels > 3 else 1  # 4-5 panels: two rows, so the figure stays readable
    cols = -(-panels // rows)
    fig, grid = plt.subplots(rows, cols, figsize=(5 * cols, 4.2 * rows), squeeze=False)
    axes = list(grid.flat)[:panels]
    for spare in list(grid.flat)[panels:]:
        spare.set_visible(False)
    ax = axes[0]
    means = [summary["methods"][m]["pcc_mean"] for m in methods]
    errs = [summary["methods"][m]["pcc_std"] for m in methods]
    ax.bar(range(len(methods)), means, yerr=errs, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
    lo = min(m - e for m, e in zip(means, errs))
    ax.set_ylim(max(0.0, lo - 0.05), max(m + e for m, e in zip(means, errs)) + 0.02)
    ax.set_ylabel("test PCC, primary genes (mean +- sd over seeds)")
    ax.set_title("Planted data: test PCC by method")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    k_planted = summary["k_planted_mean"]
    for i, m in enumerate(dk):
        c = colours[i % len(colours)]
        for j, r in enumerate(r for r in runs if r["method"] == m):
            h = r["history"]
            axes[1].plot([row["epoch"] + 1 for row in h], [row["k"] for row in h], color=c, alpha=0.6,
                         label=m if j == 0 else None)
            snr = [(row["epoch"] + 1, row.get("hypergrad_snr")) for row in h if row.get("hypergrad_snr") is not None]
            axes[2].plot([e for e, _ in snr], [s for _, s in snr], color=c, alpha=0.6, label=m if j == 0 else None)
    if dk:
        axes[1].axhline(k_planted, color="k", ls="--", lw=1, label=f"planted k ({k_planted:.0f})")
        axes[1].axhspan(0.75 * k_planted, 1.25 * k_planted, color="grey", alpha=0.15, label="+-25%")
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("k (auxiliary genes kept)")
        axes[1].set_title("DkGSB: learned k per epoch")
        axes[1].legend(fontsize=7)
        axes[2].axhline(0, color="k", lw=0.8)
        axes[2].set_xlabel("epoch")
        axes[2].set_ylabel("hypergradient SNR (< 0: towards more genes)")
        axes[2].set_title("DkGSB: hypergradient signal per epoch")
        axes[2].legend(fontsize=7)
    if curve:
        ax = axes[-2] if per_seed else axes[-1]
        ax.errorbar(curve["k"], curve["pcc_mean"], yerr=curve["pcc_std"], marker="o", capsize=3, color="#4c72b0",
                    label="top-k (prior prefix)")
        ax.axvline(k_planted, color="k", ls="--", lw=1, label=f"planted k ({k_planted:.0f})")
        for i, m in enumerate(dk):
            s = summary["methods"][m]
            ax.errorbar([s["k_mean"]], [s["pcc_mean"]], yerr=[s["pcc_std"]], marker="s", capsize=3,
                        color=colours[i % len(colours)], label=f"{m} (learned k)")
        if "pgl" in summary["methods"]:
            ax.axhline(summary["methods"]["pgl"]["pcc_mean"], color="grey", lw=1, ls=":", label="PGL")
        ax.set_xscale("log")
        ax.set_xlabel("k (auxiliary genes kept, log)")
        ax.set_ylabel("test PCC (mean +- sd over seeds)")
        ax.set_title("Top-k curve: where is the optimum?")
        ax.legend(fontsize=7)
    if per_seed:  # why a single run's k can miss: each seed's own curve and where DkGSB's k landed on it
        ax = axes[-1]
        markers = "sD^v"
        for i, (seed, points) in enumerate(sorted(per_seed.items(), key=lambda kv: int(kv[0]))):
            c = colours[i % len(colours)]
            ks_seed = sorted(points, key=int)
            ax.plot([int(k) for k in ks_seed], [points[k] for k in ks_seed], color=c, alpha=0.7, lw=1, marker=".",
                    label=f"seed {seed}")
            for j, m in enumerate(dk):
                r = next((r for r in runs if r["method"] == m and str(r["seed"]) == str(seed)), None)
                if r is not None:
                    ax.plot([r["k"]], [r["test_pcc"]], marker=markers[j % len(markers)], color=c, ms=7, mec="k",
                            label=m if i == 0 else None)
        ax.axvline(k_planted, color="k", ls="--", lw=1)
        ax.axvspan(0.75 * k_planted, 1.25 * k_planted, color="grey", alpha=0.15, label="planted k +-25%")
        ax.set_xscale("log")
        ax.set_xlabel("k (auxiliary genes kept, log)")
        ax.set_ylabel("test PCC")
        oracle = curve.get("oracle_within_tolerance")
        ax.set_title("Per seed: top-k curve, DkGSB's k on it" + (
            f"\n(each seed's own best k within +-25%: {oracle['seeds']}/{oracle['of']})" if oracle else ""),
            fontsize=10)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    try:
        return atomic_savefig(fig, path, dpi=110)
    finally:
        plt.close(fig)


def bench_selection(store: Any, out_dir: str | Path = "results", *, n_aux: int = 14000, seeds: int = 5,
                    first_seed: int = 0, variants: Sequence[str] = ("unroll", "ift_cg"), epochs: int = 40,
                    patience: int = 10,
                    methods: Sequence[str] | None = None, threads: int | None = None,
                    extra: dict[str, Any] | None = None, dkgsb_extra: dict[str, Any] | None = None,
                    plant_options: dict[str, Any] | None = None, curve: Sequence[float] = CURVE_MULTIPLES,
                    echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method on ``seeds`` planted data sets; print the table, write JSON and PNG under ``out_dir``.

    ``curve``: multiples of the planted k at which top-k is also trained (the PCC-vs-k curve;
    empty: none). ``first_seed``: the planted data sets are seeds ``first_seed .. first_seed + seeds - 1``
    (fresh seeds check settings that were chosen on others).
    """
    import torch

    from agl.config import TrainConfig, list_hypergradients
    from agl.fileio import atomic_write_json
    from agl.models import feature_cache

    unknown = [v for v in variants if v not in list_hypergradients()]
    if unknown:
        raise ConfigError("--variants", f"unknown hypergradient(s) {unknown}; known: {list_hypergradients()}")
    import inspect

    known = set(inspect.signature(plant).parameters) - {"features", "n_aux", "seed"}
    bad = sorted(set(plant_options or {}) - known)
    if bad:
        raise ConfigError("--plant", f"unknown planted-design setting(s) {bad}; known: {sorted(known)}")
    if seeds < 2:
        raise ConfigError("--seeds", f"paired tests need at least 2 seeds, got {seeds}")
    if first_seed < 0:
        raise ConfigError("--first-seed", f"must be >= 0, got {first_seed}")
    if threads:
        torch.set_num_threads(int(threads))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_cfg = TrainConfig()
    features = feature_cache(store, base_cfg.backbone, base_cfg.weights)
    runs: list[dict[str, Any]] = []
    curve_runs: list[dict[str, Any]] = []
    k_planted: dict[int, int] = {}
    precision: dict[int, float] = {}
    started = time.perf_counter()
    for seed in range(first_seed, first_seed + seeds):
        planted = plant(features, n_aux=n_aux, seed=seed, **(plant_options or {}))
        k_planted[seed], precision[seed] = planted.k_planted, planted.precision_at(planted.k_planted)
        split = f"kfold-s0-f{seed % 5}"
        pstore = PlantedStore(store, planted)
        table = method_settings(planted.k_planted, variants)
        for label, gate in table.items():
            if methods and label not in methods:
                continue
            settings = {**BASE_SETTINGS, "epochs": epochs, "patience": patience, **(extra or {}), **gate, "seed": seed}
            if gate["method"] == "dkgsb":
                settings = {**settings, **DKGSB_SETTINGS, **(dkgsb_extra or {})}
            r = run_method(pstore, split, settings)
            runs.append({"seed": seed, "method": label, "split": split, "settings": settings, **r})
            echo(f"seed {seed} {label:<14} test PCC {r['test_pcc']:.4f}  k {r['k']:>6} (planted {planted.k_planted})"
                 f"  best epoch {r['best_epoch'] + 1}/{r['epochs_run']}  {r['wall_s']:.0f} s")
        for k in curve_ks(planted.k_planted, n_aux, curve) if curve and (not methods or "topk" in methods) else []:
            if k == planted.k_planted:
                continue  # the topk run above
            settings = {**BASE_SETTINGS, "epochs": epochs, "patience": patience, **(extra or {}),
                        "method": "topk", "k": k, "prior": PRIOR, "seed": seed}
            r = run_method(pstore, split, settings)
            curve_runs.append({"seed": seed, "k": k, "test_pcc": r["test_pcc"], "best_epoch": r["best_epoch"]})
            echo(f"seed {seed} top-k curve k {k:>6} test PCC {r['test_pcc']:.4f}")
    summary = summarise(runs, k_planted)
    curve_summary = summarise_curve(curve_runs, runs, k_planted) if curve_runs else None
    text = format_table(summary)
    if curve_summary:
        text += "\n" + format_curve(curve_summary, summary["k_planted_mean"])
    echo(text)
    result = {"benchmark": "selection", "n_aux": n_aux, "seeds": seeds, "first_seed": first_seed,
              "variants": list(variants),
              "planted": {"k": k_planted, "prior_precision_at_k": precision,
                          "settings": {k: v for k, v in planted.settings.items() if k != "seed"}},
              "base_settings": {**BASE_SETTINGS, "epochs": epochs, "patience": patience, **(extra or {})},
              "dkgsb_settings": {**DKGSB_SETTINGS, **(dkgsb_extra or {})},
              "summary": summary, "curve": curve_summary, "curve_runs": curve_runs, "table": text, "runs": runs,
              "wall_s": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads()}
    atomic_write_json(out_dir / "bench_selection.json", result)
    _plot(runs, summary, out_dir / "bench_selection.png", curve_summary)
    echo(f"wrote {out_dir / 'bench_selection.json'} and {out_dir / 'bench_selection.png'} "
         f"({result['wall_s']:.0f} s)")
    return result
