"""The canonical AnnData that every reader returns and every later stage consumes.

One object holds all slides of a dataset:

- ``X``: raw integer UMI counts, ``scipy.sparse.csr_matrix`` of dtype int32 (spots x genes).
- ``obs`` (index = ``f"{slide_id}_{barcode}"``, unique):
  ``slide_id`` (str), ``barcode`` (str, unique within a slide),
  ``pixel_x``, ``pixel_y`` (float64, spot centre in full-resolution image pixels;
  x = column, y = row).
- ``obsm["spatial"]``: float64 (n, 2) array ``[pixel_x, pixel_y]`` (scanpy/squidpy convention).
- ``var`` (index = unique gene symbols).
- ``uns["slides"][slide_id]``: dict with ``image_path`` (str, absolute or None for
  expression-only slides), ``microns_per_pixel`` (float), ``spot_diameter_um`` (float),
  ``source_format`` (str), ``source_files`` (list of str).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

OBS_SLIDE = "slide_id"
OBS_BARCODE = "barcode"
OBS_PX = "pixel_x"
OBS_PY = "pixel_y"
OBSM_SPATIAL = "spatial"
UNS_SLIDES = "slides"
SLIDE_KEYS = ("image_path", "microns_per_pixel", "spot_diameter_um", "source_format", "source_files")


def spot_index(slide_id: str, barcode: str) -> str:
    """The obs index of a spot: unique across slides."""
    return f"{slide_id}_{barcode}"


def validate_canonical(adata: Any, where: str = "AnnData") -> None:
    """Raise ``ValueError`` naming ``where`` if ``adata`` breaks the canonical schema."""
    problems: list[str] = []
    if not sp.issparse(adata.X):
        problems.append("X must be a scipy sparse matrix of raw counts")
    elif adata.n_obs and adata.X.nnz and (adata.X.data.min() < 0 or not np.all(np.isfinite(adata.X.data))):
        problems.append("X holds negative or non-finite counts")
    for key in (OBS_SLIDE, OBS_BARCODE, OBS_PX, OBS_PY):
        if key not in adata.obs:
            problems.append(f"obs lacks column {key!r}")
    if OBSM_SPATIAL not in adata.obsm:
        problems.append("obsm lacks 'spatial'")
    if not adata.obs_names.is_unique:
        problems.append("obs names are not unique")
    if not adata.var_names.is_unique:
        problems.append("var names (gene symbols) are not unique")
    slides = adata.uns.get(UNS_SLIDES)
    if not isinstance(slides, dict):
        problems.append("uns lacks the 'slides' dict")
    elif OBS_SLIDE in adata.obs:
        for sid in adata.obs[OBS_SLIDE].astype(str).unique():
            if sid not in slides:
                problems.append(f"uns['slides'] lacks slide {sid!r}")
            else:
                missing = [k for k in SLIDE_KEYS if k not in slides[sid]]
                if missing:
                    problems.append(f"uns['slides'][{sid!r}] lacks {missing}")
    if problems:
        raise ValueError(f"{where} is not a canonical agl AnnData: " + "; ".join(problems))
