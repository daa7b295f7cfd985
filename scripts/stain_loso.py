"""Leave-one-slide-out test PCC with and without stain normalisation, paired (issue 30 item 3).

Reads two ``agl evaluate --protocol loso`` output folders that ran the same methods, seeds and
settings, one on the demo store and one on the demo store ingested with ``--stain``; pairs runs by
(method, held-out slide, seed) and writes ``OUT.json`` and ``OUT.png``. The runs come from::

    agl evaluate --store demo --protocol loso --seeds 0,1,2,3,4 --methods pgl,topk:k=222 \\
        --set epochs=30 --set patience=10 --out results/stain_loso/none
    agl evaluate --store <her2st_demo_store(stain="macenko")> ... --out results/stain_loso/macenko

Only pairs present in both folders count (a grid stopped early gives fewer seeds; the JSON says how many).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def load_runs(folder: Path) -> pd.DataFrame:
    """One row per finished run: method, split, seed, test PCC, per-slide PCC and per-gene PCC."""
    rows = []
    for path in sorted(folder.glob("runs/*/*/seed*/result.json")):
        r = json.loads(path.read_text())
        rows.append({"method": r["method_name"], "split": r["split"], "seed": int(r["seed"]), "pcc": float(r["pcc"]),
                     "per_gene": r.get("per_gene_pcc") or {}})
    return pd.DataFrame(rows, columns=["method", "split", "seed", "pcc", "per_gene"])


def _mean_se(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=float)
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()) if len(values) else float("nan"), "se": se}


def compare(base: pd.DataFrame, stained: pd.DataFrame, method: str) -> dict[str, Any]:
    """Paired comparison of one method: stained - unnormalised test PCC over (split, seed), and per gene."""
    from agl.evaluation.metrics import paired_difference_tests

    key = ["split", "seed"]
    a = stained[stained["method"] == method].set_index(key)
    b = base[base["method"] == method].set_index(key)
    both = a.join(b, lsuffix="_stain", rsuffix="_none", how="inner").sort_index()
    diff = (both["pcc_stain"] - both["pcc_none"]).to_numpy()
    tests = paired_difference_tests(diff)
    genes: dict[str, list[float]] = {}
    for ga, gb in zip(both["per_gene_stain"], both["per_gene_none"]):
        for g in set(ga) & set(gb):
            if ga[g] is not None and gb[g] is not None and math.isfinite(ga[g]) and math.isfinite(gb[g]):
                genes.setdefault(g, []).append(ga[g] - gb[g])
    gene_means = np.array([np.mean(v) for v in genes.values()])
    gene_tests = paired_difference_tests(gene_means)
    by_slide = {split.removeprefix("loso-"): _mean_se((both.loc[split, "pcc_stain"] - both.loc[split, "pcc_none"]).to_numpy())
                | {"n": int(len(both.loc[split]))} for split in both.index.get_level_values("split").unique()}
    return {"method": method, "n_pairs": int(len(both)),
            "seeds": sorted(set(int(s) for s in both.index.get_level_values("seed"))),
            "none": _mean_se(both["pcc_none"].to_numpy()), "stain": _mean_se(both["pcc_stain"].to_numpy()),
            "diff": {"mean": tests["mean_diff"], "se": tests["se_diff"]},
            "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum()),
            "p_wilcoxon": tests["p_wilcoxon"], "p_t": tests["p_t"],
            "per_gene": {"n_genes": int(len(gene_means)), "mean_diff": gene_tests["mean_diff"],
                         "wins": int((gene_means > 0).sum()), "losses": int((gene_means < 0).sum()),
                         "p_wilcoxon": gene_tests["p_wilcoxon"]},
            "by_held_out_slide": by_slide,
            "pairs": [{"split": s, "seed": int(k), "pcc_none": float(n), "pcc_stain": float(m)}
                      for (s, k), n, m in zip(both.index, both["pcc_none"], both["pcc_stain"])]}


def colour_spread(store_paths: dict[str, str]) -> dict[str, Any]:
    """Per-slide mean RGB of tissue pixels (every 4th pixel) in each store, and its between-slide s.d."""
    from agl.data.stain import BETA, IO
    from agl.data.store import open_store

    out: dict[str, Any] = {}
    for name, path in store_paths.items():
        store = open_store(path)
        slides = store.spots["slide_id"].astype(str).to_numpy()
        means = {}
        for sid in sorted(set(slides)):
            px = np.asarray(store.patches[np.flatnonzero(slides == sid), ::4, ::4]).reshape(-1, 3).astype(np.float64)
            tissue = np.all(-np.log((px + 1.0) / IO) >= BETA, axis=1)  # the stain module's tissue mask
            means[sid] = px[tissue].mean(axis=0).round(2).tolist()
        out[name] = {"tissue_mean_rgb": means,
                     "between_slide_sd_rgb": np.std(np.array(list(means.values())), axis=0, ddof=1).round(2).tolist()}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Per-run paired differences by held-out slide, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agl.fileio import atomic_savefig

    methods = [m for m in result["methods"] if m["n_pairs"]]
    if not methods:
        return
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], methods):
        pairs = pd.DataFrame(m["pairs"])
        slides = sorted(pairs["split"].unique())
        for i, s in enumerate(slides):
            d = pairs.loc[pairs["split"] == s, "pcc_stain"] - pairs.loc[pairs["split"] == s, "pcc_none"]
            ax.scatter(np.full(len(d), i) + np.linspace(-0.15, 0.15, len(d)), d, s=18)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.axhline(m["diff"]["mean"], color="C3", lw=1.2, ls="--", label=f"mean {m['diff']['mean']:+.4f}")
        ax.set_xticks(range(len(slides)), [s.removeprefix("loso-") for s in slides])
        ax.set_xlabel("held-out slide")
        ax.set_title(f"{m['method']}: {m['n_pairs']} pairs, Wilcoxon p = {m['p_wilcoxon']:.2g}")
        ax.legend(loc="best", fontsize=8)
    axes[0][0].set_ylabel(f"test PCC, {result['stain']} - none")
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    """The table for docs/results.md: per method, both arms (mean ± s.e. over runs) and the paired difference."""
    lines = [f"| method | pairs (seeds) | none | {result['stain']} | {result['stain']} - none (± s.e.) | wins / losses | "
             "Wilcoxon p | paired t p | per gene (wins / losses, p) |", "|---" * 9 + "|"]
    for m in result["methods"]:
        g = m["per_gene"]
        lines.append(f"| {m['method']} | {m['n_pairs']} ({','.join(map(str, m['seeds']))}) | {m['none']['mean']:.4f} ± "
                     f"{m['none']['se']:.4f} | {m['stain']['mean']:.4f} ± {m['stain']['se']:.4f} | "
                     f"{m['diff']['mean']:+.4f} ± {m['diff']['se']:.4f} | {m['wins']} / {m['losses']} | "
                     f"{m['p_wilcoxon']:.3g} | {m['p_t']:.3g} | {g['mean_diff']:+.4f} ({g['wins']} / {g['losses']} of "
                     f"{g['n_genes']}, p = {g['p_wilcoxon']:.3g}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--none", type=Path, required=True, help="agl evaluate output on the unnormalised store")
    p.add_argument("--stained", type=Path, required=True, help="agl evaluate output on the stain-normalised store")
    p.add_argument("--stain", default="macenko", help="the normalisation of --stained (for the labels)")
    p.add_argument("--stain-store", default=None, help="the normalised store (its reference goes into the JSON)")
    p.add_argument("--none-store", default=None, help="the unnormalised store (for the per-slide colour table)")
    p.add_argument("--out", type=Path, default=Path("results/bench_stain_loso"), help="OUT.json and OUT.png")
    args = p.parse_args(argv)
    base, stained = load_runs(args.none), load_runs(args.stained)
    methods = [m for m in dict.fromkeys(base["method"]) if m in set(stained["method"])]
    result: dict[str, Any] = {
        "what": "leave-one-slide-out test PCC (mean over the 50 primary genes) on the her2st demo store, with and "
                f"without {args.stain} stain normalisation at patch extraction; runs paired by (held-out slide, seed)",
        "stain": args.stain, "none_runs": str(args.none), "stained_runs": str(args.stained),
        "methods": [compare(base, stained, m) for m in methods],
    }
    if args.stain_store:
        from agl.data.stain import store_record
        from agl.data.store import open_store

        result["stain_record"] = store_record(open_store(args.stain_store))
        if args.none_store:
            result["colour"] = colour_spread({"none": args.none_store, args.stain: args.stain_store})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out.with_suffix(".json"))
    plot(result, args.out.with_suffix(".png"))  # none when no run has its pair yet
    for name, c in result.get("colour", {}).items():
        print(f"{name}: between-slide s.d. of the tissue mean RGB {c['between_slide_sd_rgb']}")
    for m in result["methods"]:
        print(f"{m['method']}: {m['n_pairs']} pairs (seeds {m['seeds']}); none {m['none']['mean']:.4f} ± "
              f"{m['none']['se']:.4f}, {args.stain} {m['stain']['mean']:.4f} ± {m['stain']['se']:.4f}; "
              f"diff {m['diff']['mean']:+.4f} ± {m['diff']['se']:.4f} ({m['wins']} wins / {m['losses']} losses), "
              f"Wilcoxon p = {m['p_wilcoxon']:.3g}, paired t p = {m['p_t']:.3g}; per gene "
              f"{m['per_gene']['mean_diff']:+.4f} ({m['per_gene']['wins']}/{m['per_gene']['losses']} of "
              f"{m['per_gene']['n_genes']}), p = {m['per_gene']['p_wilcoxon']:.3g}")
    print(markdown(result))
    print(f"written: {args.out.with_suffix('.json')}, {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
