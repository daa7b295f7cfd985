"""Build a store from a canonical AnnData: patches, preprocessing, splits, gene sets, write.

The order matters for leakage: splits are drawn first and each split's primary genes
and priors come from its own training spots only (``gene_set``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from agl.data.patches import extract_patches
from agl.data.preprocess import (PRIORS, PriorContext, check_min_detection, check_panel, filtered_out_message,
                                 gene_set, gene_table, preprocess, primary_genes, prior_names)
from agl.data.schema import OBS_SLIDE, UNS_SLIDES, validate_canonical
from agl.data.splits import SPLIT_KINDS, SPLITS_VERSION, SplitTable, loso_validation, split_kind, split_table
from agl.data.stain import check_method as check_stain_method, fit_reference, normalise_patches
from agl.data.stats import GeneMoments, seurat_hvg
from agl.data.encoding import ValueEncoding, counts_encoding, settings_transform
from agl.data.store import (SAFE_NAME, check_layout, check_target, finish_store, new_temp_folder, write_ipc_blocks,
                            write_expression_arrays, write_gene_set, write_partition, write_store,
                            write_tables)
from agl.errors import ConfigError, DataError, show
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


INGEST_FLAGS = {"priors": "--priors", "split_kinds": "--splits"}  # the `agl ingest` flag of each setting


def _check_names(names: list[str], registry: dict, field: str) -> None:
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ConfigError(INGEST_FLAGS.get(field, field), f"unknown {field} {unknown}; known: {sorted(registry)}")


def build_store(adata: AnnData, out: str | Path, *, patch_um: float = 112.0, patch_px: int = 224,
                border: str = "pad", min_genes: int = 200, min_cells: int = 3,
                normalize_total: float | None = None, log1p: bool = True, n_primary: int = 50,
                primary_min_detection: float = 0.0,
                priors: Iterable[str] = ("hvg", "mean"), prior_data: AnnData | None = None,
                split_kinds: Iterable[str] = ("kfold", "spatial", "loso"), seeds: Iterable[int] = (0, 1, 2),
                n_folds: int = 5, overwrite: bool = False, expression_layout: str = "dense",
                stain: str = "none", stain_reference_slides: Sequence[str] | None = None) -> Path:
    """Ingest a canonical AnnData (all slides, with images) into a store at ``out``.

    Steps: extract patches (H1's ``extract_patches``), drop spots without a patch,
    ``preprocess``, ``split_table``, one ``gene_set`` per split (primary HVGs, optionally
    only among genes detected in ``primary_min_detection`` of the spots, and priors on
    that split's training spots; "coexpr" from ``prior_data`` when given), then
    ``write_store``. Nothing appears at ``out`` unless every step succeeds.

    ``stain`` (``agl.data.stain``): normalise the kept patches to a reference fitted on the
    patches of ``stain_reference_slides`` (default: every slide of the store); the record goes
    into the manifest (``patch.stain``) and ``stain.json``.
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
        raise ConfigError("ingest", f"need --patch-um > 0, --patch-px > 0, --n-primary > 0 and --border pad|drop; "
                                    f"got {patch_um}, {patch_px}, {n_primary}, {border!r}")
    check_min_detection(primary_min_detection)
    check_stain_method(stain)
    if stain_reference_slides:  # before cutting patches: a misspelt slide must not cost an ingest
        present = set(adata.obs[OBS_SLIDE].astype(str))
        missing = sorted(set(map(str, stain_reference_slides)) - present)
        if missing:
            raise ConfigError("--stain-reference-slides", f"slides {missing} are not ingested; the store's slides "
                                                          f"are {sorted(present)}")
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
    if pp.n_obs:
        check_panel(pp.n_vars, n_primary)
    progress.step(f"preprocess: {pp.n_obs} spots x {pp.n_vars} genes "
                  f"(min_genes={min_genes}, min_cells={min_cells}, log1p={log1p}, normalize_total={normalize_total})")
    stain_record = {"method": "none"}
    if stain != "none":  # after QC: the reference and the store hold the same patches
        stain_record = fit_reference(patches, stain, pp.obs[OBS_SLIDE].astype(str).to_numpy(), stain_reference_slides)
        patches, n_as_cut = normalise_patches(patches, stain_record, progress=True)
        stain_record["n_kept_as_cut"] = int(n_as_cut)
        log.info("stain %s: reference from %d tissue patches of %s; %d of %d patches background, kept as cut",
                 stain, stain_record["reference_from"]["n_patches"], stain_record["reference_from"]["slides"],
                 n_as_cut, len(patches))

    prior_pp = None
    if prior_data is not None:
        prior_pp = preprocess(prior_data, min_genes=min_genes, min_cells=0,
                              normalize_total=normalize_total, log1p=log1p)

    splits = split_table(pp.obs, kinds=split_kinds, n_folds=n_folds, seeds=seeds)
    progress.step(f"splits: {len(splits.columns)} ({', '.join(split_kinds)}; seeds {seeds})")

    gene_sets: dict[str, pd.DataFrame] = {}
    t0 = time.perf_counter()
    for i, name in enumerate(splits.columns, 1):
        try:
            gene_sets[name] = gene_set(pp, splits.mask(name, "train"), n_primary=n_primary, priors=priors,
                                       prior_data=prior_pp, primary_min_detection=primary_min_detection)
        except DataError as err:
            raise DataError(None, f"split {name}: {err}") from err
        if i % 10 == 0 and i < len(splits.columns):
            rate = i / (time.perf_counter() - t0)
            log.info("ingest gene sets %d/%d (%.1f/s, ETA %.0f s)", i, len(splits.columns), rate,
                     (len(splits.columns) - i) / rate)
    progress.step(f"gene sets: {len(gene_sets)} splits, {n_primary} primary genes each, priors "
                  f"{list(next(iter(gene_sets.values())).filter(like='prior_').columns)}")

    expression = np.asarray(pp.X.toarray(), dtype=np.float32)
    genes = pd.DataFrame({"name": pp.var_names.astype(str), "mean": expression.mean(axis=0, dtype=np.float64).astype(np.float32),
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
        "preprocessing": {**pp.uns["agl_preprocess"], "n_primary": int(n_primary),
                          "primary_min_detection": float(primary_min_detection), "priors": priors,
                          "prior_slides": None if prior_data is None
                          else sorted(map(str, prior_data.obs[OBS_SLIDE].unique()))},
        "patch": {"patch_um": float(patch_um), "patch_px": int(patch_px), "border": border,
                  "report": jsonable(report, max_array=1000),
                  # only when on: the feature-cache keys of stores cut without it stay what they were
                  **({"stain": stain_record} if stain != "none" else {})},
        "split_settings": {"kinds": split_kinds, "seeds": seeds, "n_folds": int(n_folds), "version": SPLITS_VERSION},
        "spots_read": int(n_read),
        "slide_meta": slides_meta,
        "sources": sources,
    }
    path = write_store(out, spots=spots, patches=np.ascontiguousarray(patches, dtype=np.uint8),
                       expression=expression, genes=genes, splits=splits, gene_sets=gene_sets,
                       manifest=manifest, overwrite=overwrite, expression_layout=expression_layout,
                       stain_record=stain_record if stain != "none" else None)
    progress.step(f"wrote {path}")
    return path


# --------------------------------------------------------------------------- streaming ingest
#
# ``ingest_slides`` builds the same store as ``build_store`` without ever holding more than
# one slide's image, patches and counts (per worker). Four passes, each a function of one
# slide that runs in-process or as a Ray task (``address``):
#   1. stage:    read the slide, cut its patches, keep its raw counts (a staging folder
#                beside the store, reused by a re-run: an interrupted ingest resumes);
#   2. qc:       spots kept by filter_cells on the genes all slides share, per-gene counts
#                of non-zero spots (filter_genes is their sum);
#   3. finalize: preprocess the slide's kept spots and genes, write its Parquet partition,
#                write sums of the expression (agl.data.stats.GeneMoments) over the training
#                spots of each kfold/spatial split, over all spots, and over the slide's loso
#                training part (its non-validation spots, the same in every loso split),
#                beside its staged counts;
#   4. driver:   merge the sums into each split's HVGs and priors (a loso split's: every
#                slide's loso part minus the held-out slide's, kept beside the staged slide),
#                write the memory-mapped arrays block by block, the tables and the manifest,
#                rename into place.
# The driver holds the spot table and a few gene-sized vectors per kfold/spatial split and
# statistic; what it holds for loso splits does not grow with the number of slides.

STAGE_VERSION = 1
SLIDE_MOMENTS = "moments.npz"  # a slide's sums for every group (pass 3), beside its staged counts
LOSO_MOMENTS = "loso_moments.npz"  # and those of its loso training part alone


@dataclass(frozen=True)
class IngestSettings:
    """Everything a streamed store depends on besides its input (staged slides are reused only when it matches)."""

    patch_um: float = 112.0
    patch_px: int = 224
    border: str = "pad"
    min_genes: int = 200
    min_cells: int = 3
    normalize_total: float | None = None
    log1p: bool = True
    n_primary: int = 50
    primary_min_detection: float = 0.0
    priors: tuple[str, ...] = ("hvg", "mean")
    split_kinds: tuple[str, ...] = ("kfold", "spatial", "loso")
    seeds: tuple[int, ...] = (0, 1, 2)
    n_folds: int = 5
    expression_layout: str = "sparse"

    def stage_key(self) -> str:
        """Hash of the settings that change a staged slide (patches, raw counts)."""
        fields = {"v": STAGE_VERSION, "patch_um": self.patch_um, "patch_px": self.patch_px, "border": self.border}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


class SlideSource:
    """One slide (or one input unit) at a time from a dataset on disk, through ``read_slides``.

    ``units`` are what the reader's subset argument takes (her2st sections, HEST sample
    ids); a format without one (a Space Ranger ``outs/``, an ``.h5ad``) is one unit.
    Picklable, so Ray tasks read their own slides.
    """

    def __init__(self, fmt: str, path: str | Path, units: list[str] | None = None, **reader_kwargs: Any):
        from agl.data.readers import READER_ENTRIES, list_units

        if fmt not in READER_ENTRIES:
            raise ConfigError("format", f"unknown format {fmt!r}; known: {sorted(READER_ENTRIES)}")
        self.fmt, self.path, self.reader_kwargs = fmt, Path(path), reader_kwargs
        self.subset_kw = READER_ENTRIES[fmt].subset
        self.units = list(units) if units else (list_units(fmt, self.path, **reader_kwargs) or [None])

    def __call__(self, unit: str | None) -> AnnData:
        from agl.data.readers import read_slides

        kw = dict(self.reader_kwargs)
        if unit is not None:
            if self.subset_kw is None:
                raise ConfigError("--sections", f"the {self.fmt} reader does not select slides")
            kw[self.subset_kw] = [unit]
        return read_slides(self.fmt, self.path, **kw)


class AnnDataSource:
    """Slides of a canonical AnnData already in memory (tests, notebooks): one unit per slide."""

    def __init__(self, adata: AnnData):
        self.adata = adata
        self.units = list(dict.fromkeys(adata.obs[OBS_SLIDE].astype(str)))

    def __call__(self, unit: str) -> AnnData:
        part = self.adata[self.adata.obs[OBS_SLIDE].astype(str).to_numpy() == unit].copy()
        part.uns[UNS_SLIDES] = {unit: self.adata.uns[UNS_SLIDES][unit]}
        return part


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write a folder under a temporary name and rename it to ``final`` (a staged slide is whole or absent)."""
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stage_unit(source: Callable[[Any], AnnData], unit: Any, settings: IngestSettings, stage: str) -> list[dict[str, Any]]:
    """Pass 1: read one input unit, cut each slide's patches, keep its raw counts under ``stage/SLIDE``."""
    stage_dir = Path(stage)
    unit_done = stage_dir / f"unit-{hashlib.sha256(repr(unit).encode()).hexdigest()[:16]}.json"
    if unit_done.is_file():  # staged by an earlier, interrupted run: not read again
        return [json.loads((stage_dir / sid / "slide.json").read_text()) for sid in json.loads(unit_done.read_text())]
    adata = source(unit)
    try:
        validate_canonical(adata, f"slide {unit}")
    except ValueError as err:
        raise DataError(None, str(err)) from err
    slides = list(dict.fromkeys(adata.obs[OBS_SLIDE].astype(str)))
    out = []
    for sid in slides:
        done = stage_dir / sid / "slide.json"
        if done.is_file():
            out.append(json.loads(done.read_text()))
            continue
        one = adata[adata.obs[OBS_SLIDE].astype(str).to_numpy() == sid]
        patches, keep, report = extract_patches(one, patch_um=settings.patch_um, patch_px=settings.patch_px,
                                                border=settings.border, progress=False)
        keep = np.asarray(keep, dtype=bool)
        if patches.shape[0] == one.n_obs:
            patches = patches[keep]
        kept = one[keep]
        meta = dict(adata.uns[UNS_SLIDES][sid])
        summary = {"slide_id": sid, "unit": unit, "n_read": int(one.n_obs), "n_spots": int(kept.n_obs),
                   "genes": [str(g) for g in kept.var_names], "report": jsonable(report["slides"][sid], max_array=1000),
                   "meta": jsonable(meta, max_array=1000), "sources": source_files(kept)}

        def write(folder: Path) -> None:
            np.save(folder / "patches.npy", np.ascontiguousarray(patches, dtype=np.uint8))
            sp.save_npz(folder / "counts.npz", sp.csr_matrix(kept.X, dtype=np.int32), compressed=False)
            obs = kept.obs.copy()
            obs.insert(0, "spot_id", kept.obs_names.astype(str))
            obs[OBS_SLIDE] = obs[OBS_SLIDE].astype(str)
            obs.to_parquet(folder / "obs.parquet", index=False)
            (folder / "slide.json").write_text(json.dumps(summary))

        _atomic_dir(stage_dir / sid, write)
        out.append(summary)
        del patches, kept, one
    tmp_done = unit_done.with_name(f".{unit_done.name}.{uuid.uuid4().hex[:8]}")
    tmp_done.write_text(json.dumps([s["slide_id"] for s in out]))
    os.replace(tmp_done, unit_done)
    return out


def qc_slide(stage: str, slide: str, common: list[str], min_genes: int) -> dict[str, Any]:
    """Pass 2: filter_cells(min_genes) on the shared genes, and non-zero spot counts per gene of the kept spots."""
    folder = Path(stage) / slide
    genes = json.loads((folder / "slide.json").read_text())["genes"]
    cols = pd.Index(genes).get_indexer(common)
    counts = sp.load_npz(folder / "counts.npz").tocsr()[:, cols]
    positive = counts > 0
    genes_per_spot = np.asarray(positive.sum(axis=1)).ravel()
    keep = genes_per_spot >= min_genes
    nonzero = np.asarray(positive[keep].sum(axis=0)).ravel().astype(np.int64)
    kept = counts[keep]
    # the largest count decides the store's count dtype (uint16 or uint32)
    return {"slide": slide, "keep": keep, "nonzero": nonzero, "max_count": int(kept.max()) if kept.nnz else 0,
            "genes_per_spot": genes_per_spot}


def finalize_slide(stage: str, slide: str, gene_cols: np.ndarray, keep: np.ndarray, row_start: int,
                   train: np.ndarray, settings: IngestSettings, partition: str,
                   encoding: ValueEncoding | None = None) -> dict[str, Any]:
    """Pass 3: preprocess the slide's kept spots x kept genes, write its partition and its sums (``SLIDE_MOMENTS``,
    ``LOSO_MOMENTS`` in its staging folder).

    ``gene_cols`` index the slide's own gene list (store column order); ``train`` is bool
    [groups, kept spots]: one row per kfold/spatial split's training spots, then one of all
    spots, then the slide's loso training part.
    """
    folder = Path(stage) / slide
    counts = sp.load_npz(folder / "counts.npz").tocsr()[keep][:, gene_cols]
    obs = pd.read_parquet(folder / "obs.parquet")[keep].reset_index(drop=True)
    adata = AnnData(X=counts, obs=pd.DataFrame(index=obs["spot_id"].to_numpy()))
    # the same scanpy calls as the in-memory path; the filters keep everything here (applied in pass 2)
    pp = preprocess(adata, min_genes=0, min_cells=0, normalize_total=settings.normalize_total, log1p=settings.log1p)
    x = sp.csr_matrix(pp.X, dtype=np.float32)
    spots = pd.DataFrame({"spot_id": obs["spot_id"].astype(str), "slide_id": slide,
                          "barcode": obs["barcode"].astype(str), "pixel_x": obs["pixel_x"].astype(np.float64),
                          "pixel_y": obs["pixel_y"].astype(np.float64),
                          "row": np.arange(row_start, row_start + len(obs), dtype=np.int64)})
    patches = np.load(folder / "patches.npy", mmap_mode="r")[keep]
    fs, path = _filesystem(partition)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    write_partition(path, spots, patches, x, settings.expression_layout, filesystem=fs, encoding=encoding)
    # the sums go back through the staging folder, where the driver also finds the loso part of a held-out slide
    moments = GeneMoments.of(x, train)
    moments.save(folder / SLIDE_MOMENTS)
    moments.row(-1).save(folder / LOSO_MOMENTS)
    return {"slide": slide, "nnz": int(x.nnz), "n": int(x.shape[0])}


def _filesystem(uri: str) -> tuple[Any, str]:
    """A pyarrow filesystem and path for a local path or a URI (``s3://``, ``gs://``, ``file://``)."""
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).absolute())


class _Runner:
    """Run one function over many argument tuples in-process or as Ray tasks; progress lines; failures collected.

    Ray retries a task whose worker died (``max_retries``) and, for OSError (a flaky
    filesystem), the call itself; an input error (DataError) fails at once. Results are
    merged as they arrive, so the driver never holds all of them.
    """

    def __init__(self, address: str | None, max_retries: int = 2, num_cpus: float = 1.0):
        self.address, self.max_retries, self.num_cpus = address, max_retries, num_cpus
        if address is not None:
            from agl.distributed.runtime import init_ray

            init_ray(address=address)

    def map(self, name: str, fn: Callable[..., Any], calls: list[tuple[str, tuple]],
            merge: Callable[[Any], None]) -> None:
        failures: dict[str, str] = {}
        t0, n = time.perf_counter(), len(calls)

        def progress(i: int) -> None:
            if i == n or i % max(1, n // 10) == 0:
                rate = i / max(time.perf_counter() - t0, 1e-9)
                log.info("ingest %s %d/%d slides (%.2f/s, ETA %.0f s)", name, i, n, rate, (n - i) / max(rate, 1e-9))

        if self.address is None:
            for i, (label, args) in enumerate(calls, 1):
                try:
                    merge(fn(*args))
                except (DataError, ConfigError, OSError, ValueError) as err:
                    failures[label] = f"{type(err).__name__}: {err}"
                progress(i)
        else:
            import ray

            remote = ray.remote(fn).options(num_cpus=self.num_cpus, max_retries=self.max_retries,
                                            retry_exceptions=[OSError])
            pending = {remote.remote(*args): label for label, args in calls}
            done = 0
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                label = pending.pop(ready[0])
                try:
                    merge(ray.get(ready[0]))
                except ray.exceptions.RayError as err:
                    cause = getattr(err, "cause", None) or err
                    failures[label] = f"{type(cause).__name__}: {cause}"
                done += 1
                progress(done)
        if failures:
            lines = "; ".join(f"{k}: {v}" for k, v in failures.items())
            raise DataError(None, f"{len(failures)} of {n} slides failed in the {name} pass ({lines}); "
                                  "the slides staged so far are kept, re-run the same command to resume")


def _stage_dir(out: Path, settings: IngestSettings) -> Path:
    return out.parent / f".{out.name}.staging-{settings.stage_key()}"


@dataclass
class _Staged:
    """Pass 1's result: every slide's summary (``gene_codes`` into one vocabulary), in input order."""

    slides: dict[str, dict[str, Any]]
    order: list[str]
    common_codes: np.ndarray  # codes of the genes every slide has, in the first slide's order
    names_by_code: np.ndarray  # gene symbol of each code
    n_read: int

    @property
    def common(self) -> pd.Index:
        return pd.Index(self.names_by_code[self.common_codes])


@dataclass
class _Filtered:
    """Pass 2's result: the spots and genes kept, and the store's value encoding."""

    keep: dict[str, np.ndarray]  # per slide, its staged spots kept
    gene_keep: np.ndarray  # bool over the common genes
    genes_kept: pd.Index
    n_spots: int
    encoding: ValueEncoding


@dataclass
class _Splits:
    """The splits of the kept spots and the spot groups whose sums the gene sets need."""

    obs: pd.DataFrame
    table: SplitTable
    loso: list[str]
    within: list[str]  # kfold/spatial: every slide has training spots in each
    is_train: np.ndarray  # bool [groups, spots]: within splits' training spots, all spots, each slide's loso part


def _check_settings(settings: IngestSettings) -> None:
    _check_names(list(settings.priors), PRIORS, "priors")
    _check_names(list(settings.split_kinds), SPLIT_KINDS, "split_kinds")
    check_layout(settings.expression_layout)
    if not (settings.patch_um > 0 and settings.patch_px > 0 and settings.n_primary > 0) \
            or settings.border not in ("pad", "drop"):
        raise ConfigError("ingest", f"need --patch-um > 0, --patch-px > 0, --n-primary > 0 and --border pad|drop; "
                                    f"got {settings.patch_um}, {settings.patch_px}, {settings.n_primary}, {settings.border!r}")
    check_min_detection(settings.primary_min_detection)


def _stage_pass(runner: _Runner, source: Callable[[Any], AnnData], units: list[Any], settings: IngestSettings,
                stage: Path, out: Path) -> _Staged:
    """Pass 1: stage every unit's slides; the genes all slides share."""
    slides: dict[str, dict[str, Any]] = {}
    # each slide's gene list as int32 codes into one vocabulary: a list of its own strings per slide
    # (~1 MB for a her2st slide) made the driver grow with the number of slides
    vocabulary: dict[str, int] = {}

    def add_staged(summaries: list[dict[str, Any]]) -> None:
        for s in summaries:
            if s["slide_id"] in slides:
                raise DataError(None, f"duplicate slide id {s['slide_id']!r} in units {slides[s['slide_id']]['unit']!r} "
                                      f"and {s['unit']!r}")
            s["gene_codes"] = np.fromiter((vocabulary.setdefault(g, len(vocabulary)) for g in s.pop("genes")),
                                          dtype=np.int32)
            slides[s["slide_id"]] = s

    runner.map("stage", stage_unit, [(str(u), (source, u, settings, str(stage))) for u in units], add_staged)
    order = [sid for u in units for sid, s in slides.items() if s["unit"] == u]  # input order, as assemble
    bad = [s for s in order if not SAFE_NAME.match(s)]
    if bad:
        raise DataError(out, f"slide names must match {SAFE_NAME.pattern}: {show(bad[:5])}")
    common_codes = slides[order[0]]["gene_codes"]
    for sid in order[1:]:
        common_codes = common_codes[np.isin(common_codes, slides[sid]["gene_codes"])]  # first slide's order (as assemble)
    if len(common_codes) == 0:
        raise DataError(None, "the slides share no gene symbols")
    names_by_code = np.empty(len(vocabulary), dtype=object)
    names_by_code[list(vocabulary.values())] = list(vocabulary)
    for sid in order:
        dropped = len(slides[sid]["gene_codes"]) - len(common_codes)
        if dropped:
            log.warning("slide %s has %d genes that other slides lack; dropped them (%d genes kept)",
                        sid, dropped, len(common_codes))
        slides[sid]["meta"]["dropped_genes"] = int(dropped)
        slides[sid]["meta"]["n_spots"] = int(slides[sid]["n_read"])
    return _Staged(slides, order, common_codes, names_by_code, sum(slides[s]["n_read"] for s in order))


def _qc_pass(runner: _Runner, stage: Path, staged: _Staged, settings: IngestSettings) -> _Filtered:
    """Pass 2: spot and gene filters; the largest count sets the store's encoding."""
    keep: dict[str, np.ndarray] = {}
    common = staged.common
    nonzero = np.zeros(len(common), dtype=np.int64)
    max_count = 0
    genes_per_spot: list[np.ndarray] = []  # only for the message when the filters leave nothing

    def add_qc(r: dict[str, Any]) -> None:
        nonlocal nonzero, max_count
        keep[r["slide"]] = r["keep"]
        genes_per_spot.append(r["genes_per_spot"])
        nonzero += r["nonzero"]
        max_count = max(max_count, r["max_count"])

    runner.map("qc", qc_slide, [(s, (str(stage), s, list(common), settings.min_genes)) for s in staged.order], add_qc)
    gene_keep = nonzero >= settings.min_cells
    genes_kept = common[gene_keep]
    # one encoding for the store, known before any partition is written (Ray Data reads one schema)
    encoding = counts_encoding(len(genes_kept), max_count, settings_transform(settings.normalize_total, settings.log1p))
    n_spots = int(sum(keep[s].sum() for s in staged.order))
    if n_spots == 0 or len(genes_kept) == 0:
        per_spot = np.concatenate(genes_per_spot) if genes_per_spot else np.zeros(0)
        raise DataError(None, filtered_out_message(n_spots, len(genes_kept), settings.min_genes, settings.min_cells,
                                                   len(common), float(np.median(per_spot)) if len(per_spot) else 0.0))
    check_panel(len(genes_kept), settings.n_primary)
    return _Filtered(keep, gene_keep, genes_kept, n_spots, encoding)


def _split_pass(stage: Path, order: list[str], kept: _Filtered, settings: IngestSettings) -> _Splits:
    """The splits of the kept spots (on the driver: the spot table only) and the groups to sum per slide."""
    keep = kept.keep
    obs = pd.concat([pd.read_parquet(stage / s / "obs.parquet")[keep[s]] for s in order], ignore_index=True)
    obs.index = obs["spot_id"].to_numpy()
    obs[OBS_SLIDE] = pd.Categorical(obs[OBS_SLIDE].astype(str), categories=order)
    splits = split_table(obs, kinds=list(settings.split_kinds), n_folds=settings.n_folds, seeds=list(settings.seeds))
    names = list(splits.columns)
    loso = [c for c in names if split_kind(c) == "loso"]
    within = [c for c in names if c not in loso]
    # groups: within-slide splits' training spots, all spots, every slide's loso part (its non-validation spots)
    is_train = np.vstack([splits.mask(c, "train") for c in within]
                         + [np.ones(kept.n_spots, dtype=bool), ~loso_validation(obs)])
    slide_of_spot = obs[OBS_SLIDE].astype(str).to_numpy()
    for c in loso[:1]:  # the loso sums below rely on it (split_table draws loso validation by loso_validation)
        if not np.array_equal(splits.mask(c, "train"), is_train[-1] & (slide_of_spot != c[len("loso-"):])):
            raise DataError(None, f"split {c}: training spots are not every other slide's loso part")
    return _Splits(obs, splits, loso, within, is_train)


def _finalize_pass(runner: _Runner, stage: Path, tmp: Path, staged: _Staged, kept: _Filtered, splits: _Splits,
                   settings: IngestSettings) -> tuple[GeneMoments, dict[str, int]]:
    """Pass 3: each slide's partition in ``tmp`` and its sums; the sums of every group, merged."""
    order, keep = staged.order, kept.keep
    starts = np.cumsum([0] + [int(keep[s].sum()) for s in order])
    moments = GeneMoments.zeros(len(splits.within) + 2, len(kept.genes_kept))
    nnz: dict[str, int] = {}

    def add_final(r: dict[str, Any]) -> None:
        nonlocal moments
        moments += GeneMoments.load(stage / r["slide"] / SLIDE_MOMENTS)
        nnz[r["slide"]] = r["nnz"]

    calls = []
    for i, s in enumerate(order):
        position = np.full(len(staged.names_by_code), -1, dtype=np.int64)  # a code's column in the slide's own list
        position[staged.slides[s]["gene_codes"]] = np.arange(len(staged.slides[s]["gene_codes"]))
        cols = position[staged.common_codes[kept.gene_keep]]
        part = str(tmp / "spots" / f"slide_id={s}" / "part-0.parquet")
        calls.append((s, (str(stage), s, cols, keep[s], int(starts[i]),
                          splits.is_train[:, starts[i]:starts[i + 1]], settings, part, kept.encoding)))
    runner.map("finalize", finalize_slide, calls, add_final)
    return moments, nnz


def _ingest_manifest(staged: _Staged, kept: _Filtered, settings: IngestSettings, prior_data: AnnData | None,
                     address: str | None) -> dict[str, Any]:
    """The streamed store's manifest (the same keys as ``build_store`` writes, plus ``ingest``)."""
    order, keep, slides = staged.order, kept.keep, staged.slides
    report = {"patch_um": float(settings.patch_um), "patch_px": int(settings.patch_px), "border": settings.border,
              "slides": {s: slides[s]["report"] for s in order},
              "n_dropped": int(sum(slides[s]["report"].get("n_dropped", 0) for s in order))}
    return {
        "preprocessing": {"min_genes": int(settings.min_genes), "min_cells": int(settings.min_cells),
                          "normalize_total": None if not settings.normalize_total else float(settings.normalize_total),
                          "log1p": bool(settings.log1p), "n_primary": int(settings.n_primary),
                          "primary_min_detection": float(settings.primary_min_detection),
                          "priors": list(settings.priors),
                          "prior_slides": None if prior_data is None
                          else sorted(map(str, prior_data.obs[OBS_SLIDE].unique()))},
        "patch": {"patch_um": float(settings.patch_um), "patch_px": int(settings.patch_px),
                  "border": settings.border, "report": jsonable(report, max_array=1000)},
        "split_settings": {"kinds": list(settings.split_kinds), "seeds": [int(s) for s in settings.seeds],
                           "n_folds": int(settings.n_folds), "version": SPLITS_VERSION},
        "spots_read": int(staged.n_read),
        "slide_meta": {s: slides[s]["meta"] for s in order if keep[s].any()},
        "sources": [f for s in order for f in slides[s]["sources"]],
        "ingest": {"mode": "in-process" if address is None else f"ray ({address})", "slides": len(order),
                   "passes": ["stage", "qc", "finalize", "merge"]},
    }


def ingest_slides(source: Callable[[Any], AnnData], out: str | Path, settings: IngestSettings | None = None, *,
                  units: list[Any] | None = None, prior_data: AnnData | None = None, overwrite: bool = False,
                  address: str | None = None, max_retries: int = 2, keep_staging: bool = False) -> Path:
    """Streaming ingest: the store ``build_store`` writes, built slide by slide (in-process, or on Ray).

    ``source(unit)`` returns the canonical AnnData of one input unit (``SlideSource``,
    ``AnnDataSource``); ``units`` default to ``source.units``. ``address``: None runs every
    pass in this process; ``"local"`` starts a local Ray, ``"auto"`` / ``"ray://..."`` joins a
    cluster, and each slide becomes one Ray task per pass (the staging folder and ``out``
    must then be on storage every worker sees). Memory: one slide per worker, and on the
    driver the spot table plus a few gene-length vectors per split. A failed slide is
    reported by name; the staged slides stay beside ``out`` so the same call resumes.
    """
    settings = settings or IngestSettings()
    out = check_target(out, overwrite)
    _check_settings(settings)
    units = list(units if units is not None else getattr(source, "units"))
    runner = _Runner(address, max_retries=max_retries)
    progress = _Progress(5)
    stage = _stage_dir(out, settings)
    stage.mkdir(parents=True, exist_ok=True)

    staged = _stage_pass(runner, source, units, settings, stage, out)
    order = staged.order
    progress.step(f"staged {len(order)} slides ({staged.n_read} spots read; patches {settings.patch_px} px for "
                  f"{settings.patch_um} um, {settings.border}); {len(staged.common_codes)} shared genes")

    kept = _qc_pass(runner, stage, staged, settings)
    progress.step(f"preprocess: {kept.n_spots} spots x {len(kept.genes_kept)} genes (min_genes={settings.min_genes}, "
                  f"min_cells={settings.min_cells}, log1p={settings.log1p}, normalize_total={settings.normalize_total})")

    splits = _split_pass(stage, order, kept, settings)
    names = list(splits.table.columns)
    progress.step(f"splits: {len(names)} ({', '.join(settings.split_kinds)}; seeds {list(settings.seeds)})")

    tmp = new_temp_folder(out)  # passes 3 and 4 write into the store's temporary folder
    try:
        moments, nnz = _finalize_pass(runner, stage, tmp, staged, kept, splits, settings)

        def train_moments(name: str) -> GeneMoments:
            if name in splits.loso:
                return moments.row(-1) - GeneMoments.load(stage / name.removeprefix("loso-") / LOSO_MOMENTS)
            return moments.row(splits.within.index(name))

        prior_pp = None if prior_data is None else preprocess(
            prior_data, min_genes=settings.min_genes, min_cells=0, normalize_total=settings.normalize_total,
            log1p=settings.log1p)
        # each split's table written as soon as it is merged: all of them (one per loso split too) grew with the slides
        for name, table in merged_gene_sets(train_moments, names, kept.genes_kept, settings, prior_pp):
            write_gene_set(tmp, name, table)
        progress.step(f"gene sets: {len(names)} splits from merged per-slide sums, {settings.n_primary} primary genes each")

        all_spots = len(splits.within)
        all_n = int(moments.n[all_spots])
        genes = pd.DataFrame({"name": kept.genes_kept.astype(str),
                              "mean": (moments.log_sum[all_spots] / all_n).astype(np.float32),
                              "n_spots": moments.nonzero[all_spots].astype(np.int64)})
        patch_shape = tuple(np.load(stage / order[0] / "patches.npy", mmap_mode="r").shape[1:])
        _write_arrays_from_partitions(tmp, stage, order, kept.keep, kept.n_spots, len(kept.genes_kept),
                                      settings.expression_layout, sum(nnz.values()), patch_shape, kept.encoding)
        write_tables(tmp, spot_ids=splits.obs["spot_id"].to_numpy(), genes=genes,
                     splits=splits.table, gene_sets=None)
        finish_store(tmp, out, manifest=_ingest_manifest(staged, kept, settings, prior_data, address),
                     n_spots=kept.n_spots, n_genes=len(kept.genes_kept), patch_shape=patch_shape,
                     slides={s: int(kept.keep[s].sum()) for s in order if kept.keep[s].any()}, splits=names,
                     gene_names=list(kept.genes_kept.astype(str)), layout=settings.expression_layout,
                     overwrite=overwrite, encoding=kept.encoding)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not keep_staging:
        shutil.rmtree(stage, ignore_errors=True)
    progress.step(f"wrote {out}")
    return out


def merged_gene_sets(train_moments: Callable[[str], GeneMoments], names: list[str], genes: pd.Index,
                     settings: IngestSettings, prior_pp: AnnData | None) -> Iterator[tuple[str, pd.DataFrame]]:
    """Each split's gene set from merged sums (``train_moments(split)``: its training spots' moments, one
    group): seurat HVGs of its training spots, then ``gene_table``; yielded one split at a time."""
    prior_list = prior_names(settings.priors, prior_pp, settings.n_primary, len(genes))
    var = pd.DataFrame(index=pd.Index(genes.astype(str)))
    empty = AnnData(X=sp.csr_matrix((0, len(genes)), dtype=np.float32), var=var)  # carries the gene names only
    for name in names:
        moments = train_moments(name)
        n = int(moments.n[0])
        if n < 3:
            raise ConfigError("gene_set", f"split {name}: only {n} training spots")
        mean, variance = moments.mean_var(0)
        hvg = seurat_hvg(mean, variance, settings.n_primary, var.index)
        try:
            primary = primary_genes(hvg, settings.n_primary, moments.nonzero[0] / n, settings.primary_min_detection)
        except DataError as err:
            raise DataError(None, f"split {name}: {err}") from err
        hvg["highly_variable"] = primary
        ctx = PriorContext(train=empty, hvg=hvg, primary=primary, prior_data=prior_pp,
                           train_mean=moments.log_sum[0] / n)
        yield name, gene_table(ctx, prior_list)


def _write_arrays_from_partitions(tmp: Path, stage: Path, order: list[str], keep: dict[str, np.ndarray],
                                  n_spots: int, n_genes: int, layout: str, nnz: int, patch_shape: tuple[int, ...],
                                  encoding: ValueEncoding) -> None:
    """arrays/ (the in-process memory maps): expression from the partitions, one row group at a time; patches
    from the staged slides (the bytes ``finalize_slide`` wrote into the partitions), a block of rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = tmp / "arrays"
    arrays.mkdir()

    def batches(columns: list[str], batch_size: int) -> Iterator[Any]:
        """Every partition's batches in row order, one open file at a time.

        A ``ParquetFile`` keeps the column data it read until it is closed (measured: one
        slide's patch column each), so holding all of them open made the driver's memory grow
        with the number of slides.
        """
        for s in order:
            with pq.ParquetFile(str(tmp / "spots" / f"slide_id={s}" / "part-0.parquet")) as f:
                yield from f.iter_batches(columns=columns, batch_size=batch_size)
            pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages otherwise

    def patch_blocks() -> Iterator[np.ndarray]:
        """Decoding the partitions' patch column took ~3 GB a 1,000 patches (levels of 150k uint8 list items
        per patch) and Arrow's allocator kept much of it: it was the driver's peak, growing with the slides."""
        for s in order:
            rows = np.flatnonzero(keep[s])
            with open(stage / s / "patches.npy", "rb") as fh:
                header = np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(fh) == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = header(fh)
                if fortran or dtype != np.uint8 or tuple(shape[1:]) != tuple(patch_shape) or len(shape) < 1:
                    raise DataError(fh.name, f"staged patches are {dtype} {shape}, expected uint8 [n, {patch_shape}]")
                start, row_bytes = fh.tell(), int(np.prod(patch_shape))
                for i in range(0, len(rows), 256):
                    block = rows[i:i + 256]  # ascending: one read from its first to its last row
                    fh.seek(start + int(block[0]) * row_bytes)
                    span = np.fromfile(fh, dtype=np.uint8, count=(int(block[-1]) - int(block[0]) + 1) * row_bytes)
                    yield span.reshape(-1, *patch_shape)[block - block[0]]

    write_ipc_blocks(arrays / "patches.arrow", "patch", (n_spots, *patch_shape), np.uint8, patch_blocks())

    def expression_blocks() -> Iterator[np.ndarray | sp.csr_matrix]:
        if layout == "dense":
            for batch in batches(["expression"], 1024):
                yield batch.column(0).flatten().to_numpy().reshape(len(batch), n_genes)
            return
        # the partitions' stored values (counts) pass through unchanged
        for batch in batches(["expression_indices", encoding.column], 1024):
            idx, val = batch.column(0), batch.column(1)
            offsets = idx.offsets.to_numpy()
            yield sp.csr_matrix((val.flatten().to_numpy(), idx.flatten().to_numpy(), offsets - offsets[0]),
                                shape=(len(batch), n_genes))

    write_expression_arrays(arrays, n_spots, n_genes, layout, expression_blocks, nnz=nnz, encoding=encoding)
