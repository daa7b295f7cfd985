"""Predict spatial expression of a new slide with a trained checkpoint.

``predict_slides`` takes a checkpoint folder (or the MLflow model version
``<model>@champion``), reads the slide in any supported format
(``agl.data.readers.read_slides``), cuts patches as in training (same size, same stain
normalisation with the training store's reference: ``store.json``), runs the model and
writes ``OUT/predictions.h5ad`` plus PNG spatial maps (predicted vs measured) of the
best-predicted primary genes (or the genes named by ``--genes``) under ``OUT/maps/``. A slide
the checkpoint trained or validated on (its ``store.json`` records the split's slides) gets a
warning: its PCC vs measured is in-sample.

The .h5ad holds the predicted expression of every gene the model outputs in ``X``
(log1p scale, as in training), the measured expression of the same genes in
``layers["measured"]`` when the slide has counts for them (NaN for missing genes),
the input slide's ``obs``/``obsm``/``uns["slides"]`` unchanged, and per-gene agreement
in ``var`` (``pcc_measured``). The output folder is built beside the target and
renamed into place, so a crash leaves no half output; an existing folder is replaced
only with ``overwrite=True`` and only when it is an earlier ``agl predict`` output (its
``.agl-output.json`` marker), never the input or a folder holding it
(:func:`agl.fileio.check_output_folder`).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from agl.data.genes import locate_genes
from agl.errors import CheckpointError, ConfigError, DataError
from agl.fileio import atomic_savefig, check_output_folder, check_output_location, swap_folder, write_output_marker
from agl.training.inference import run_model

log = logging.getLogger(__name__)

COMMAND = "predict"
H5AD = "predictions.h5ad"
MAPS = "maps"
DEFAULT_PATCH_UM = 112.0
DEFAULT_PATCH_PX = 224


@dataclass
class PredictOptions:
    """Where the model comes from, what to read, where to write."""

    out: str
    input: str
    format: str = "her2st"
    reader_args: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None           # a checkpoint folder, or None to pull from MLflow
    tracking_uri: str | None = None
    model_name: str = "agl-model"
    alias: str = "champion"
    patch_um: float | None = None           # None: the training store's setting (else 112 um)
    patch_px: int | None = None             # None: the training store's setting (else 224 px)
    top_genes: int = 6                      # maps: the best-predicted primary genes (else the first)
    genes: list[str] | None = None          # maps: these genes instead (--genes ERBB2,ESR1)
    batch_size: int = 64
    device: str = "auto"
    overwrite: bool = False
    clip_maps: bool = True                  # maps show predictions below 0 (log1p scale) as 0
    min_gene_fraction: float = 0.5          # refuse a slide holding fewer of the model's genes
    warn_gene_fraction: float = 0.9         # warn below this fraction


def input_paths(opts: PredictOptions) -> list[str]:
    """Every path ``predict`` reads: the output must never replace or contain one of them."""
    paths = [opts.input, opts.checkpoint]
    paths += [str(v) for k, v in opts.reader_args.items() if k.endswith("_path") and v is not None]
    return [p for p in paths if p]


def resolve_checkpoint(opts: PredictOptions, download_to: Path) -> Path:
    """The local checkpoint folder: the given path, or ``model_name@alias`` downloaded from MLflow."""
    if opts.checkpoint:
        path = Path(opts.checkpoint)
        if not path.is_dir():
            raise CheckpointError(path, "checkpoint folder not found")
        return path
    if not opts.tracking_uri:
        raise ConfigError("--checkpoint", "give a checkpoint folder, or --tracking-uri (and --model-name/--alias) "
                                          "to pull the registered champion from MLflow")
    from agl.tracking import make_tracker

    # the champion's pyfunc model, loaded as mlflow.pyfunc.load_model("models:/<name>@<alias>") loads it
    # reading only: a mistyped SQLite path is refused, never created as a new empty database
    return make_tracker(opts.tracking_uri, must_exist=True).fetch_champion(opts.model_name, opts.alias,
                                                                           dst=download_to)


def store_record(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's record of its training store and split (``store.json``; empty if absent)."""
    store_json = ckpt / "store.json"
    return json.loads(store_json.read_text()) if store_json.is_file() else {}


def patch_settings(ckpt: Path, opts: PredictOptions) -> tuple[float, int]:
    """Patch size in um and px: explicit options, else the checkpoint's store record, else the defaults."""
    record = store_record(ckpt)
    patch = record.get("patch") or {}
    um = opts.patch_um or patch.get("patch_um") or record.get("patch_um")
    px = opts.patch_px or patch.get("patch_px") or record.get("patch_px")
    if um is None or px is None:
        log.warning("%s records no patch size; using %s um / %s px (pass --patch-um/--patch-px to match training)",
                    ckpt, um or DEFAULT_PATCH_UM, px or DEFAULT_PATCH_PX)
    return float(um or DEFAULT_PATCH_UM), int(px or DEFAULT_PATCH_PX)


def preprocessing(ckpt: Path) -> dict[str, Any]:
    """The store's preprocessing switches recorded in the checkpoint (log1p by default)."""
    return dict(store_record(ckpt).get("preprocessing") or {"log1p": True, "normalize_total": None})


SEEN_PARTS = ("train", "val", "val_outer")  # parts whose spots shaped the model (fit or early stopping)


def training_slides(ckpt: Path) -> dict[str, list[str]] | None:
    """The slides of each part of the split the checkpoint was trained on (``store.json``'s ``slides``).

    Checkpoints of earlier agl versions record only the split and the store's manifest hash:
    a store with that hash in the agl cache (the demo store) still tells; else None."""
    record = store_record(ckpt)
    if record.get("slides"):
        return {part: list(slides) for part, slides in record["slides"].items()}
    split, digest = record.get("split"), record.get("manifest_sha256")
    if not split or not digest:
        return None
    from agl.data.store import open_store
    from agl.fileio import default_cache_dir
    from agl.training.checkpoint import manifest_hash

    for manifest in sorted(default_cache_dir().glob("*/manifest.json")):
        try:
            if manifest_hash(json.loads(manifest.read_text())) != digest:
                continue
            store = open_store(manifest.parent)
            roles = np.asarray(store.split(split)).astype(str)
        except (OSError, ValueError, KeyError, DataError):  # another store, or no such split: keep looking
            continue
        slide_ids = store.spots["slide_id"].astype(str).to_numpy()
        return {part: sorted(set(slide_ids[roles == part])) for part in dict.fromkeys(roles)}
    return None


def in_sample_slides(predicted: list[str], slides: Mapping[str, list[str]] | None) -> list[str]:
    """The predicted slides the model trained or was validated on (their PCC is in-sample)."""
    seen = {s for part in SEEN_PARTS for s in (slides or {}).get(part, [])}
    return [s for s in predicted if s in seen]


def warn_in_sample(in_sample: list[str], slides: Mapping[str, list[str]] | None, split: str | None) -> None:
    """A clear warning that the PCC of ``in_sample`` slides does not measure prediction on new slides."""
    if not in_sample or not slides:
        return
    parts = "; ".join(f"{part}: {', '.join(slides[part])}" for part in SEEN_PARTS if slides.get(part))
    held_out = [s for s in slides.get("test", []) if not in_sample_slides([s], slides)]
    log.warning("slide%s %s %s among the model's training slides (split %s; %s): the PCC vs measured is "
                "in-sample, not a measure of prediction on a new slide; predict a slide the model never saw (%s)",
                "s" if len(in_sample) > 1 else "", ", ".join(in_sample), "were" if len(in_sample) > 1 else "was",
                split or "?", parts, f"the split's test slides: {', '.join(held_out)}" if held_out else
                "this split holds out no whole slide")


def measured_expression(adata: Any, genes: list[str], switches: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Counts of ``genes`` normalised as in training (no spot/gene filtering); NaN columns for absent genes."""
    import scipy.sparse as sp

    counts = sp.csr_matrix(adata.X, dtype=np.float64)
    if switches.get("normalize_total"):
        totals = np.asarray(counts.sum(axis=1)).ravel()
        scale = np.divide(float(switches["normalize_total"]), totals, out=np.zeros_like(totals), where=totals > 0)
        counts = sp.diags(scale) @ counts
    where = locate_genes(adata.var, genes)  # by symbol or by another name in var (gene_ids, gene_symbols, ...)
    present = np.asarray(where.sum(axis=0)).ravel() > 0
    out = np.full((adata.n_obs, len(genes)), np.nan, dtype=np.float32)
    if present.any():
        values = (counts @ where[:, np.flatnonzero(present)]).toarray()
        out[:, present] = np.log1p(values) if switches.get("log1p", True) else values
    return out, present


def check_gene_overlap(present: np.ndarray, genes: list[str], slide_genes: Any, source: str,
                       min_fraction: float, warn_fraction: float) -> None:
    """Refuse a slide holding fewer than ``min_fraction`` of the model's genes; warn below ``warn_fraction``."""
    n, total = int(present.sum()), len(genes)
    fraction = n / total if total else 1.0
    if fraction >= warn_fraction:
        return
    missing = [g for g, p in zip(genes, present) if not p]
    text = (f"{n} of the model's {total} genes ({fraction:.0%}) are in the slide; missing e.g. "
            f"{', '.join(missing[:5])}; the slide's genes look like {', '.join(map(str, list(slide_genes)[:3]))}")
    if fraction < min_fraction:
        raise DataError(source, f"{text}. Below --min-gene-fraction {min_fraction:g}: another species, or gene IDs "
                                "without a gene_symbols column in var? (lower --min-gene-fraction to predict anyway)")
    log.warning("%s: %s (below --warn-gene-fraction %g)", source, text, warn_fraction)


def check_map_genes(named: list[str] | None, genes: list[str]) -> None:
    """Refuse ``--genes`` names the model does not output, suggesting a match in another case."""
    if not named:
        return
    known = set(genes)
    unknown = [g for g in named if g not in known]
    if unknown:
        by_upper = {g.upper(): g for g in genes}
        hints = [f"{g} (did you mean {by_upper[g.upper()]}?)" if g.upper() in by_upper else g for g in unknown]
        raise ConfigError("--genes", f"{', '.join(hints)}: not among the model's {len(genes)} output genes")


def map_genes(primary_pcc: pd.Series, top: int, named: list[str] | None) -> tuple[list[str], str]:
    """The genes to map and how they were picked: ``named`` (--genes), else the ``top`` primary genes with the
    highest PCC vs measured expression (``primary_pcc``, NaN where unmeasured), else the first ``top``."""
    if named:
        return list(named), "genes named by --genes"
    measured = primary_pcc.dropna()
    if len(measured):
        best = measured.sort_values(ascending=False, kind="stable").index[:top]
        return [str(g) for g in best], f"the {len(best)} best-predicted primary genes (highest PCC vs measured)"
    first = [str(g) for g in primary_pcc.index[:top]]
    return first, f"the first {len(first)} primary genes (no measured expression)"


def _pcc(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return math.nan
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


@dataclass
class MapFigure:
    """One slide's map figure: its file and, per gene, the shared colour range and the PCC shown."""

    path: Path
    scales: dict[str, tuple[float, float]]
    pcc: dict[str, float]


def _background(meta: Mapping[str, Any], box: tuple[float, float, float, float],
                max_px: int = 1200) -> np.ndarray | None:
    """The H&E under ``box`` (x0, y0, x1, y1 full-resolution px), at most ``max_px`` wide, read by region."""
    from PIL import Image

    from agl.data.patches import open_slide_image

    path = meta.get("image_path")
    if not path or not Path(path).is_file():
        return None
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    try:
        with open_slide_image(path) as img:
            level = img.level_for(max(x1 - x0, y1 - y0) / max_px)
            dx, dy = img.downsample(level)
            region = img.region(level, int(x0 / dx), int(y0 / dy), int(np.ceil(x1 / dx)), int(np.ceil(y1 / dy)))
    except (OSError, ValueError) as err:  # a map without its H&E is still worth writing
        log.warning("%s: no H&E under the maps (%s)", path, err)
        return None
    thumb = Image.fromarray(region)
    thumb.thumbnail((max_px, max_px))
    return np.asarray(thumb)


def _spot_px(meta: Mapping[str, Any], xy: np.ndarray) -> float:
    """Spot diameter in full-resolution px: from the slide's record, else 70% of the spot spacing."""
    um, mpp = meta.get("spot_diameter_um"), meta.get("microns_per_pixel")
    if um and mpp:
        return float(um) / float(mpp)
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        return 10.0
    dist, _ = cKDTree(xy).query(xy, k=2)
    return 0.7 * float(np.median(dist[:, 1]))


def plot_maps(adata: Any, genes: list[str], folder: Path, clip: bool = True, chosen: str = "") -> list[MapFigure]:
    """One PNG per slide: predicted beside measured expression of each of ``genes`` over the H&E.

    ``chosen`` says in the title how the genes were picked. Each panel takes the tissue's aspect
    ratio and the figure is laid out tight (no empty band above or below the panels).

    Both panels of a gene share one colour scale (1st-99th percentile of both together), the
    measured panel's title gives the PCC of what is shown, and with ``clip`` predictions below 0
    (impossible on the log1p scale) are shown as 0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection
    from matplotlib.colors import Normalize

    folder.mkdir(parents=True, exist_ok=True)
    has_measured = "measured" in adata.layers
    written = []
    slides = adata.obs["slide_id"].astype(str).to_numpy()
    for slide in dict.fromkeys(slides):
        rows = np.flatnonzero(slides == slide)
        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[rows, :2]
        meta = (adata.uns.get("slides") or {}).get(slide, {})
        spot = _spot_px(meta, xy)
        box = (xy[:, 0].min() - spot, xy[:, 1].min() - spot, xy[:, 0].max() + spot, xy[:, 1].max() + spot)
        under = _background(meta, box)
        ncols = 2 if has_measured else 1
        panel_w = 3.4
        panel_h = panel_w * (box[3] - box[1]) / max(box[2] - box[0], 1e-9)
        fig, axes = plt.subplots(len(genes), ncols, figsize=(panel_w * ncols + 1.2, (panel_h + 0.4) * len(genes) + 0.5),
                                 dpi=100, squeeze=False, layout="constrained")
        scales, pccs = {}, {}
        for i, gene in enumerate(genes):
            j = adata.var_names.get_loc(gene)
            pred = np.asarray(adata.X[rows, j], dtype=np.float64).ravel()
            if clip:
                pred = np.maximum(pred, 0.0)
            panels = [("predicted", pred)]
            if has_measured:
                panels.append(("measured", np.asarray(adata.layers["measured"][rows, j], dtype=np.float64).ravel()))
            shown = np.concatenate([v[np.isfinite(v)] for _, v in panels])
            lo, hi = (np.percentile(shown, [1, 99]) if shown.size else (0.0, 1.0))
            lo, hi = float(lo), float(hi) if hi > lo else float(lo) + 1e-6
            scales[gene] = (lo, hi)
            norm = Normalize(vmin=lo, vmax=hi)
            pccs[gene] = _pcc(pred, panels[1][1]) if has_measured else math.nan
            for col, (label, values) in enumerate(panels):
                ax = axes[i, col]
                if under is not None:
                    ax.imshow(under, extent=(box[0], box[2], box[3], box[1]), interpolation="bilinear")
                ok = np.isfinite(values)
                spots = EllipseCollection(spot, spot, 0.0, units="xy", offsets=xy[ok], offset_transform=ax.transData,
                                          cmap="viridis", norm=norm, alpha=0.8, linewidths=0)
                spots.set_array(values[ok])
                ax.add_collection(spots)
                ax.set_xlim(box[0], box[2])
                ax.set_ylim(box[3], box[1])  # image coordinates: y grows downwards
                ax.set_aspect("equal")
                ax.set_xticks([])
                ax.set_yticks([])
                title = f"{gene} {label}"
                if label == "measured":
                    title += f" (PCC {pccs[gene]:.2f})"
                ax.set_title(title, fontsize=9)
            fig.colorbar(spots, ax=list(axes[i]), shrink=0.9, label="log1p expression")
        what = "predicted and measured on one colour scale per gene" if has_measured else "predicted"
        fig.suptitle(f"slide {slide}: {what}" + (f"\n{chosen}" if chosen else ""), fontsize=10)
        path = folder / f"{slide}.png"
        atomic_savefig(fig, path, format="png", bbox_inches="tight", pad_inches=0.1)
        plt.close(fig)
        written.append(MapFigure(path, scales, pccs))
    return written


def predict_slides(opts: PredictOptions) -> dict[str, Any]:
    """Predict, then write ``OUT/predictions.h5ad`` and ``OUT/maps/*.png`` atomically; return a summary."""
    import anndata as ad

    from agl.training.checkpoint import load_model
    from agl.data.patches import extract_patches
    from agl.data.readers import read_slides
    from agl.data.stain import checkpoint_stain, normalise_patches

    out = Path(opts.out)
    check_output_folder(out, COMMAND, inputs=input_paths(opts), overwrite=opts.overwrite)  # before any work
    check_output_location(out)  # writable, with room
    if opts.top_genes < 0:
        raise ConfigError("--top-genes", f"must be >= 0, got {opts.top_genes}")
    for flag, value in (("--min-gene-fraction", opts.min_gene_fraction), ("--warn-gene-fraction", opts.warn_gene_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(flag, f"must be between 0 and 1, got {value:g}")
    if not opts.checkpoint and opts.tracking_uri:  # a missing MLflow database is named before anything is written
        from agl.tracking import check_database, check_tracking_uri

        check_database(check_tracking_uri(opts.tracking_uri), must_exist=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        ckpt = resolve_checkpoint(opts, tmp / ".download")
        model, _gate, cfg, genes = load_model(ckpt)
        n_out = int(getattr(model, "n_genes", len(genes)))
        out_genes = genes.iloc[:n_out].reset_index(drop=True)
        patch_um, patch_px = patch_settings(ckpt, opts)
        adata = read_slides(opts.format, opts.input, **opts.reader_args)
        names = out_genes["gene"].astype(str).tolist()
        check_map_genes(opts.genes, names)  # before reading the slide
        measured, present = measured_expression(adata, names, preprocessing(ckpt))
        check_gene_overlap(present, names, adata.var_names, str(opts.input), opts.min_gene_fraction,
                           opts.warn_gene_fraction)  # before cutting patches and running the model
        slides = training_slides(ckpt)
        predicted_slides = list(dict.fromkeys(adata.obs["slide_id"].astype(str)))
        in_sample = in_sample_slides(predicted_slides, slides)
        warn_in_sample(in_sample, slides, store_record(ckpt).get("split"))
        if slides is None:
            log.info("%s records no training slides (a checkpoint of earlier agl, its store not in the agl cache): "
                     "whether %s was among them is unknown", ckpt, ", ".join(predicted_slides))
        stain = checkpoint_stain(ckpt)  # read before cutting: a damaged record stops here
        patches, keep, report = extract_patches(adata, patch_um=patch_um, patch_px=patch_px, border="pad")
        if not keep.all():
            adata, patches, measured = adata[keep].copy(), patches[keep], measured[keep]
        patches, n_as_cut = normalise_patches(patches, stain)  # as the training store's patches were
        if stain["method"] != "none":
            log.info("stain %s with the training store's reference: %d of %d patches background, kept as cut",
                     stain["method"], n_as_cut, len(patches))
        pred = run_model(model, cfg, patches, opts.batch_size, opts.device)
        var = out_genes.set_index(out_genes["gene"].astype(str))
        var.index.name = None
        var["measured"] = present
        var["pcc_measured"] = [_pcc(pred[:, j], measured[:, j]) if present[j] else math.nan for j in range(n_out)]
        result = ad.AnnData(X=pred.astype(np.float32), obs=adata.obs.copy(), var=var.drop(columns=["gene"]))
        for key, value in adata.obsm.items():
            result.obsm[key] = np.asarray(value)
        if present.any():
            result.layers["measured"] = measured
        result.uns["slides"] = adata.uns.get("slides", {})
        result.uns["agl_predict"] = {
            "checkpoint": str(opts.checkpoint or f"models:/{opts.model_name}@{opts.alias}"),
            "config": json.dumps(cfg.to_dict()), "patch_um": patch_um, "patch_px": patch_px,
            "stain": stain["method"],
            "n_dropped_spots": int((~keep).sum()), "input": str(opts.input), "format": opts.format,
            "training_slides": json.dumps(slides), "in_sample_slides": json.dumps(in_sample),
        }
        n_primary = int((out_genes["role"] == "primary").sum())
        primary_pcc = var["pcc_measured"].to_numpy()[:n_primary]
        result.write_h5ad(tmp / H5AD)
        shown = np.maximum(pred[:, :n_primary], 0.0) if opts.clip_maps else pred[:, :n_primary]
        shown_pcc = pd.Series([_pcc(shown[:, j], measured[:, j]) if present[j] else math.nan
                               for j in range(n_primary)], index=names[:n_primary])  # the PCC the maps show
        top, chosen = map_genes(shown_pcc, opts.top_genes, opts.genes)
        maps = plot_maps(result, top, tmp / MAPS, clip=opts.clip_maps, chosen=chosen) if top else []
        shutil.rmtree(tmp / ".download", ignore_errors=True)
        write_output_marker(tmp, COMMAND, input=str(opts.input), format=opts.format)
        _publish(tmp, out, opts.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = {
        "out": str(out), "h5ad": str(out / H5AD), "maps": [str(out / MAPS / m.path.name) for m in maps],
        "n_spots": int(result.n_obs), "n_genes": int(result.n_vars),
        "mean_pcc_primary_measured": float(np.nanmean(primary_pcc)) if np.isfinite(primary_pcc).any() else None,
        "in_sample_slides": in_sample, "map_genes": list(top),
    }
    log.info("wrote %s (%d spots x %d genes)%s", summary["h5ad"], summary["n_spots"], summary["n_genes"],
             "" if summary["mean_pcc_primary_measured"] is None else
             f"; mean PCC vs measured over primary genes {summary['mean_pcc_primary_measured']:.3f}"
             + (f" (in-sample: the model trained on {', '.join(in_sample)})" if in_sample else ""))
    return summary


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temp folder into place (the old output goes only once the new one is complete)."""
    check_output_folder(out, COMMAND, overwrite=overwrite)  # again: the folder may have changed meanwhile
    swap_folder(tmp, out)
