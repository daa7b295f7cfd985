"""Stain normalisation of H&E patches at extraction (``agl ingest --stain macenko|reinhard|none``).

The colour transforms are torchstain's numpy normalisers (Macenko et al., ISBI 2009: H and E
stain vectors from the optical-density plane; Reinhard et al., IEEE CG&A 2001: LAB channel
means and standard deviations). What agl adds is the reference and the edge cases:

- The reference is fitted on tissue patches of the store's slides (``--stain-reference-slides``
  to restrict them): every patch with at least :data:`MIN_TISSUE_FRACTION` tissue pixels is
  fitted on its own, and the reference is the element-wise median of those fits (Macenko's
  stain vectors are then scaled back to unit length). No seed and no single "typical" patch:
  the same patches give the same reference, and one odd patch cannot move it. Above
  :data:`MAX_REFERENCE_PATCHES` patches a fixed-seed sample of that many is fitted.
- A patch that is (almost) all background (fewer than :data:`MIN_TISSUE_FRACTION` of its pixels
  absorb light in every channel, torchstain's own tissue mask) is kept as cut: Macenko's
  eigen-decomposition has nothing to fit there (torchstain raises on near-white patches) and
  Reinhard would divide by a zero spread. Such patches are counted in the record.

The record (method, reference parameters, which slides and how many patches it came from, the
library version) goes into the store's manifest under ``patch.stain`` and into ``stain.json``
(checked by sha256 like every store file); checkpoints copy it into ``store.json``, so
``agl predict`` and the champion's pyfunc apply the same transform to new slides.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from agl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

STAIN_METHODS = ("none", "macenko", "reinhard")
STAIN_FILE = "stain.json"
RECORD_VERSION = 1
IO, ALPHA, BETA = 240, 1, 0.15  # torchstain's (and Macenko's) defaults: light intensity, angle percentile, OD floor
MIN_TISSUE_FRACTION = 0.05  # below this share of tissue pixels a patch is background: kept as cut
MAX_REFERENCE_PATCHES = 2000  # more: a fixed-seed sample (the median is stable long before that)
REFERENCE_SEED = 0


def check_method(method: str, flag: str = "--stain") -> str:
    """``method`` if it is one of :data:`STAIN_METHODS`; else a ConfigError naming ``flag``."""
    if method not in STAIN_METHODS:
        raise ConfigError(flag, f"unknown stain normalisation {method!r}; choose one of {', '.join(STAIN_METHODS)}")
    return method


def tissue_fraction(patch: np.ndarray) -> float:
    """Share of the pixels whose optical density is at least :data:`BETA` in every channel (torchstain's mask)."""
    od = -np.log((patch.reshape(-1, 3).astype(np.float64) + 1.0) / IO)
    return float(np.mean(np.all(od >= BETA, axis=1)))


def _normaliser(method: str) -> Any:
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

    return NumpyMacenkoNormalizer() if method == "macenko" else NumpyReinhardNormalizer()


def _fit_one(method: str, patch: np.ndarray) -> np.ndarray | None:
    """The patch's own parameters as one flat vector (Macenko: HE 3x2 then maxC 2; Reinhard: LAB means then
    stds); None where torchstain cannot fit it."""
    norm = _normaliser(method)
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's empty-slice warnings before the error below
            if method == "macenko":
                norm.fit(patch, Io=IO, alpha=ALPHA, beta=BETA)
                flat = np.concatenate([np.asarray(norm.HERef, np.float64).ravel(), np.asarray(norm.maxCRef, np.float64)])
            else:
                norm.fit(patch)
                flat = np.concatenate([np.asarray(norm.target_means, np.float64), np.asarray(norm.target_stds, np.float64)])
    except (np.linalg.LinAlgError, ValueError, IndexError) as err:  # too few tissue pixels for the fit
        log.debug("stain fit failed on a patch: %s", err)
        return None
    return flat if np.all(np.isfinite(flat)) else None


def fit_reference(patches: np.ndarray, method: str, slide_ids: Sequence[str] | np.ndarray | None = None,
                  reference_slides: Sequence[str] | None = None) -> dict[str, Any]:
    """The stain record for ``method``: the reference fitted on ``patches`` (uint8 [N, px, px, 3]).

    ``slide_ids`` (one per patch) and ``reference_slides`` restrict the fit to those slides'
    patches; a named slide that has no patch is a ConfigError naming ``--stain-reference-slides``.
    """
    check_method(method)
    if method == "none":
        return {"method": "none"}
    rows = np.arange(len(patches))
    slides = None if slide_ids is None else np.asarray(slide_ids).astype(str)
    if reference_slides:
        if slides is None:
            raise ConfigError("--stain-reference-slides", "needs the slide of every patch")
        missing = sorted(set(map(str, reference_slides)) - set(slides))
        if missing:
            raise ConfigError("--stain-reference-slides", f"slides {missing} have no patches; the store's slides "
                                                          f"are {sorted(set(slides))}")
        rows = rows[np.isin(slides, list(map(str, reference_slides)))]
    if len(rows) > MAX_REFERENCE_PATCHES:
        rows = np.sort(np.random.default_rng(REFERENCE_SEED).choice(rows, MAX_REFERENCE_PATCHES, replace=False))
    fits = [f for f in (_fit_one(method, patches[i]) for i in rows if tissue_fraction(patches[i]) >= MIN_TISSUE_FRACTION)
            if f is not None]
    if not fits:
        raise DataError(None, f"no patch with tissue to fit the {method} stain reference on ({len(rows)} patches "
                              f"looked at, each needs {MIN_TISSUE_FRACTION:.0%} tissue pixels); use --stain none")
    median = np.median(np.stack(fits), axis=0)
    if method == "macenko":
        he = median[:6].reshape(3, 2)
        he = he / np.linalg.norm(he, axis=0, keepdims=True)  # stain vectors are unit optical-density directions
        reference = {"HERef": he.tolist(), "maxCRef": median[6:8].tolist()}
    else:
        reference = {"target_means": median[:3].tolist(), "target_stds": median[3:6].tolist()}
    from importlib.metadata import version

    used = sorted(map(str, set(slides[rows]))) if slides is not None else None
    return {"version": RECORD_VERSION, "method": method, "reference": reference,
            "reference_from": {"slides": used, "n_patches": len(fits), "n_looked_at": int(len(rows)),
                               "rule": "element-wise median of per-patch fits over tissue patches"},
            "params": {"Io": IO, "alpha": ALPHA, "beta": BETA, "min_tissue_fraction": MIN_TISSUE_FRACTION},
            "library": f"torchstain {version('torchstain')}"}


def check_record(record: Any, source: str | Path | None) -> dict[str, Any]:
    """``record`` if it is a usable stain record; a DataError naming ``source`` otherwise."""
    if record is None:
        return {"method": "none"}
    if not isinstance(record, Mapping) or record.get("method") not in STAIN_METHODS:
        raise DataError(source, f"unreadable stain record {record!r}: expected a method of {STAIN_METHODS}")
    if record["method"] == "none":
        return dict(record)
    ref = record.get("reference")
    keys = ("HERef", "maxCRef") if record["method"] == "macenko" else ("target_means", "target_stds")
    shapes = ((3, 2), (2,)) if record["method"] == "macenko" else ((3,), (3,))
    try:
        ok = isinstance(ref, Mapping) and all(np.asarray(ref[k], np.float64).shape == s and
                                              np.all(np.isfinite(np.asarray(ref[k], np.float64)))
                                              for k, s in zip(keys, shapes))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(source, f"the {record['method']} stain record has no usable reference {keys} "
                                f"(shapes {shapes}, finite): rebuild the store with agl ingest --stain")
    return dict(record)


def normalise_patches(patches: np.ndarray, record: Mapping[str, Any], progress: bool = False) -> tuple[np.ndarray, int]:
    """``patches`` (uint8 [N, px, px, 3]) under the record's transform, and how many were kept as cut (background).

    Returns a new array (the input is not changed); ``method == "none"`` returns the input itself.
    """
    method = record.get("method", "none")
    if method == "none":
        return patches, 0
    norm = _normaliser(method)
    ref = record["reference"]
    if method == "macenko":
        norm.HERef, norm.maxCRef = np.asarray(ref["HERef"], np.float64), np.asarray(ref["maxCRef"], np.float64)
    else:
        norm.target_means = np.asarray(ref["target_means"], np.float64)
        norm.target_stds = np.asarray(ref["target_stds"], np.float64)
    min_tissue = float((record.get("params") or {}).get("min_tissue_fraction", MIN_TISSUE_FRACTION))
    out = np.array(patches, dtype=np.uint8, copy=True)
    kept = 0
    from tqdm.auto import tqdm

    for i in tqdm(range(len(out)), desc=f"stain {method}", unit="patch", disable=not progress, leave=False):
        if tissue_fraction(out[i]) < min_tissue:
            kept += 1
            continue
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                if method == "macenko":
                    done = norm.normalize(out[i], Io=IO, alpha=ALPHA, beta=BETA, stains=False)[0]
                else:
                    done = norm.normalize(out[i])
        except (np.linalg.LinAlgError, ValueError, IndexError) as err:
            log.debug("stain normalisation failed on patch %d: %s", i, err)
            kept += 1
            continue
        out[i] = done
    return out, kept


def checkpoint_stain(checkpoint: str | Path) -> dict[str, Any]:
    """The stain record a checkpoint keeps in its ``store.json`` (``{"method": "none"}`` when it has none, or no
    ``store.json``: checkpoints of earlier agl); a DataError naming the file when the record is unusable.
    ``agl predict`` and the served champion both read it here, so they apply the same transform."""
    path = Path(checkpoint) / "store.json"
    record = json.loads(path.read_text()).get("stain") if path.is_file() else None
    return check_record(record, path)


def write_record(folder: Path, record: Mapping[str, Any]) -> None:
    """``folder/stain.json`` (a store being written: its sha256 goes into the manifest)."""
    (folder / STAIN_FILE).write_text(json.dumps(dict(record), indent=1, sort_keys=True))


def store_record(store: Any) -> dict[str, Any]:
    """The stain record of an open store (``{"method": "none"}`` for stores cut without one).

    The manifest's ``patch.stain`` must equal ``stain.json``: a DataError naming the file otherwise.
    """
    manifest = getattr(store, "manifest", {}) or {}
    record = (manifest.get("patch") or {}).get("stain")
    if record is None:
        return {"method": "none"}
    path = Path(store.path) / STAIN_FILE
    try:
        on_disk = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(path, f"missing or unreadable stain record ({err}); the manifest says the patches were "
                              f"stain-normalised ({record.get('method')}): rebuild the store with agl ingest") from err
    if on_disk != record:
        raise DataError(path, "differs from the manifest's patch.stain record: the store was modified after it "
                              "was written; rebuild it with agl ingest")
    return check_record(record, path)
