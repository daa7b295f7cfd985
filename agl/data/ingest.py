"""Build a store from a canonical AnnData: patches, preprocessing, splits, gene sets, write.

The order matters for leakage: splits are drawn first and each split's primary genes
and priors come from its own training spots only (``gene_set``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from anndata import AnnData

from agl.data.patches import extract_patches
from agl.data.preprocess import PRIORS, gene_set, preprocess
from agl.data.schema import OBS_SLIDE, UNS_SLIDES, validate_canonical
from agl.data.splits import SPLIT_KINDS, make_splits
from agl.data.store import check_target, write_store
from agl.errors import ConfigError, DataError
from agl.fileio import jsonable, sha256_file

log = logging.getLogger(__name__)


class _Progress:
    """Numbered progress lines with elapsed time (``ingest [2/6] ... (3.1 s)``)."""

    def __init__(self, n_steps: int):
        self.n, self.i, self.t0 = n_steps, 0, time.perf_counter()

    def step(self, message: str) -> None:
        self.i += 1
        log.info("ingest [%d/%d] %s (%.1f s)", self.i, self.n, message, time.perf_counter() - self.t0)


def source_files(adata: AnnData) -> list[dict[str, Any]]:
    """Every input file named in ``uns['slides']`` with its size and sha256 (provenance)."""
    seen: dict[str, dict[str, Any]] = {}
    for sid, meta in adata.uns.get(UNS_SLIDES, {}).items():
        files = list(meta.get("source_files", []))
        if meta.get("image_path"):
            files.append(meta["image_path"])
        for f in files:
            p = Path(str(f))
            if str(p) in seen or not p.is_file():
                continue
            seen[str(p)] = {"slide_id": sid, "path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return list(seen.values())


def _check_names(names: list[str], registry: dict, field: str) -> None:
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ConfigError(field, f"unknown {field} {unknown}; known: {sorted(registry)}")


def build_store(adata: AnnData, out: str | Path, *, patch_um: float = 112.0, patch_px: int = 224,
                border: str = "pad", min_genes: int = 200, min_cells: int = 3,
                normalize_total: float | None = None, log1p: bool = True, n_primary: int = 50,
                priors: Iterable[str] = ("hvg", "mean"), prior_data: AnnData | None = None,
                split_kinds: Iterable[str] = ("kfold", "spatial", "loso"), seeds: Iterable[int] = (0, 1, 2),
                n_folds: int = 5, overwrite: bool = False) -> Path:
    """Ingest a canonical AnnData (all slides, with images) into a store at ``out``.

    Steps: extract patches (H1's ``extract_patches``), drop spots without a patch,
    ``preprocess``, ``make_splits``, one ``gene_set`` per split (primary HVGs and priors
    on that split's training spots; "coexpr" from ``prior_data`` when given), then
    ``write_store``. Nothing appears at ``out`` unless every step succeeds.
    """
    out = check_target(out, overwrite)  # fail before the expensive work
    try:
        validate_canonical(adata, "input")
    except ValueError as err:
        raise DataError(None, str(err)) from err
    priors, split_kinds, seeds = list(priors), list(split_kinds), [int(s) for s in seeds]
    _check_names(priors, PRIORS, "priors")
    _check_names(split_kinds, SPLIT_KINDS, "split_kinds")
    if not (patch_um > 0 and patch_px > 0 and n_primary > 0) or border not in ("pad", "drop"):
        raise ConfigError("ingest", f"need patch_um > 0, patch_px > 0, n_primary > 0 and border pad|drop; got "
                                    f"{patch_um}, {patch_px}, {n_primary}, {border!r}")
    progress = _Progress(6)
    n_read = adata.n_obs

    patches, keep, report = extract_patches(adata, patch_um=patch_um, patch_px=patch_px, border=border)
    keep = np.asarray(keep, dtype=bool)
    if patches.shape[0] == n_read:  # extract_patches returns all rows (with keep) or only the kept ones
        patches = patches[keep]
    adata = adata[keep]
    progress.step(f"patches: {len(patches)} of {n_read} spots, {patch_px} px for {patch_um} um ({border})")

    pp = preprocess(adata, min_genes=min_genes, min_cells=min_cells, normalize_total=normalize_total, log1p=log1p)
    patches = patches[adata.obs_names.get_indexer(pp.obs_names)]
    progress.step(f"preprocess: {pp.n_obs} spots x {pp.n_vars} genes "
                  f"(min_genes={min_genes}, min_cells={min_cells}, log1p={log1p}, normalize_total={normalize_total})")

    prior_pp = None
    if prior_data is not None:
        prior_pp = preprocess(prior_data, min_genes=min_genes, min_cells=0,
                              normalize_total=normalize_total, log1p=log1p)

    splits = make_splits(pp.obs, kinds=split_kinds, n_folds=n_folds, seeds=seeds)
    progress.step(f"splits: {len(splits.columns)} ({', '.join(split_kinds)}; seeds {seeds})")

    gene_sets: dict[str, pd.DataFrame] = {}
    t0 = time.perf_counter()
    for i, name in enumerate(splits.columns, 1):
        gene_sets[name] = gene_set(pp, (splits[name] == "train").to_numpy(), n_primary=n_primary,
                                   priors=priors, prior_data=prior_pp)
        if i % 10 == 0 and i < len(splits.columns):
            rate = i / (time.perf_counter() - t0)
            log.info("ingest gene sets %d/%d (%.1f/s, ETA %.0f s)", i, len(splits.columns), rate,
                     (len(splits.columns) - i) / rate)
    progress.step(f"gene sets: {len(gene_sets)} splits, {n_primary} primary genes each, priors "
                  f"{list(next(iter(gene_sets.values())).filter(like='prior_').columns)}")

    expression = np.asarray(pp.X.toarray(), dtype=np.float32)
    genes = pd.DataFrame({"name": pp.var_names.astype(str), "mean": expression.mean(axis=0),
                          "n_spots": (expression > 0).sum(axis=0).astype(np.int64)})
    obs = pp.obs
    spots = pd.DataFrame({"spot_id": pp.obs_names.astype(str), "slide_id": obs[OBS_SLIDE].astype(str).to_numpy(),
                          "barcode": obs["barcode"].astype(str).to_numpy(),
                          "pixel_x": obs["pixel_x"].to_numpy(np.float64), "pixel_y": obs["pixel_y"].to_numpy(np.float64)})
    sources = source_files(adata)
    progress.step(f"provenance: sha256 of {len(sources)} source files")

    slides_meta = {sid: jsonable(dict(m), max_array=1000) for sid, m in adata.uns.get(UNS_SLIDES, {}).items()
                   if sid in set(spots["slide_id"])}
    manifest = {
        "preprocessing": {**pp.uns["agl_preprocess"], "n_primary": int(n_primary), "priors": priors,
                          "prior_slides": None if prior_data is None
                          else sorted(map(str, prior_data.obs[OBS_SLIDE].unique()))},
        "patch": {"patch_um": float(patch_um), "patch_px": int(patch_px), "border": border,
                  "report": jsonable(report, max_array=1000)},
        "split_settings": {"kinds": split_kinds, "seeds": seeds, "n_folds": int(n_folds)},
        "spots_read": int(n_read),
        "slide_meta": slides_meta,
        "sources": sources,
    }
    path = write_store(out, spots=spots, patches=np.ascontiguousarray(patches, dtype=np.uint8),
                       expression=expression, genes=genes, splits=splits, gene_sets=gene_sets,
                       manifest=manifest, overwrite=overwrite)
    progress.step(f"wrote {path}")
    return path
