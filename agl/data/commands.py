"""CLI: ``agl ingest FORMAT PATH --out STORE`` and ``agl info [STORE]``."""
from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

from agl.cli import add_list_arg
from agl.data.locate import add_store_arg, open_store_arg
from agl.errors import ConfigError

# the registered readers' names (agl.data.readers.READERS; the parser stays light; a test keeps them equal)
FORMATS = ("her2st", "hest", "visium", "visium-hd", "xenium", "anndata")
ARRAY_CHOICES = ("auto", "1k", "2k")  # agl.data.readers.ST_ARRAY_CHOICES (the parser stays light)
DUPLICATE_CHOICES = ("error", "sum", "first")  # agl.data.readers.DUPLICATE_POLICIES
STAIN_METHODS = ("none", "macenko", "reinhard")  # agl.data.stain.STAIN_METHODS (the parser stays light)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ingest`` and ``info`` to the top-level parser."""
    p = sub.add_parser("ingest", help="read slides, cut patches, preprocess, write a store")
    p.add_argument("format", choices=FORMATS, help="input format")
    p.add_argument("path", type=Path, help="dataset folder or file")
    p.add_argument("--out", type=Path, required=True, help="store folder to create")
    add_reader_args(p)
    p.add_argument("--patch-um", type=float, default=112.0, help="tissue width of a patch in micrometres")
    p.add_argument("--patch-px", type=int, default=224, help="patch size in pixels")
    p.add_argument("--border", choices=("pad", "drop"), default="pad", help="spots near the image edge")
    p.add_argument("--stain", choices=STAIN_METHODS, default="none",
                   help="stain normalisation of the patches (torchstain): macenko (H and E stain vectors) or reinhard "
                        "(LAB colour statistics), to a reference fitted on the store's slides; agl predict applies "
                        "the same to new slides")
    add_list_arg(p, "--stain-reference-slides", help="fit the stain reference on these slides only (default: all "
                                                     "slides of the store)")
    p.add_argument("--min-genes", type=int, default=200)
    p.add_argument("--min-cells", type=int, default=3)
    p.add_argument("--normalize-total", type=float, default=None, metavar="X",
                   help="scale each spot to X counts before log1p (default: off, as the paper)")
    p.add_argument("--no-log1p", action="store_true")
    p.add_argument("--n-primary", type=int, default=50, help="primary genes (HVGs of the training spots)")
    p.add_argument("--primary-min-detection", type=float, default=0.0, metavar="FRACTION",
                   help="primary genes only among genes non-zero in at least this fraction of the training spots "
                        "(e.g. 0.3; default 0: any gene)")
    add_list_arg(p, "--priors", default=["hvg", "mean"], help="gene priors to rank the auxiliary genes by")
    add_list_arg(p, "--splits", default=["kfold", "spatial", "loso"], dest="split_kinds", help="split kinds to write")
    add_list_arg(p, "--seeds", item=int, default=[0, 1, 2], help="split seeds")
    add_list_arg(p, "--prior-sections", help="her2st sections read without images, for the co-expression prior")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier store at --out (never the input, "
                   "nor a folder of other files)")
    p.add_argument("--stream", action="store_true",
                   help="ingest slide by slide (memory of one slide, not of the cohort); implied by --address")
    p.add_argument("--address", metavar="local|auto|ray://HOST:PORT",
                   help="run the streaming ingest on Ray: one task per slide (local Ray, or join a cluster)")
    p.add_argument("--expression", choices=("dense", "sparse"), default=None,
                   help="expression layout: float32 rows, or CSR per spot (default: sparse when streaming, "
                        "else dense)")
    p.add_argument("--max-retries", type=int, default=2, help="Ray retries of a slide whose worker died")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("info", help="describe a store")
    add_store_arg(p, positional=True)
    p.add_argument("--split", help="split whose primary genes to list (default: the first)")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256")
    p.set_defaults(func=cmd_info)


# (namespace attribute, flag, reader keywords it may fill: the first one the reader takes)
_READER_FLAGS = (
    ("sections", "--sections", ()),  # the reader's registered subset keyword (sections, sample_ids)
    ("image", "--image", ("image_path",)),
    ("array", "--array", ("array",)),
    ("microns_per_pixel", "--microns-per-pixel", ("microns_per_pixel",)),
    ("spot_diameter_um", "--spot-diameter-um", ("spot_diameter_um",)),
    ("duplicate_genes", "--duplicate-genes", ("duplicate_genes",)),
    ("library_id", "--library-id", ("library_id",)),
    ("bin_um", "--bin-um", ("bin_um",)),
    ("spot_um", "--spot-um", ("spot_um",)),
    ("alignment", "--alignment", ("alignment_path",)),
    ("min_qv", "--min-qv", ("min_qv",)),
    ("xenium_counts", "--xenium-counts", ("counts_from",)),
)


def add_reader_args(p: argparse.ArgumentParser) -> None:
    """The options that tell a reader what to read and how (``agl ingest`` and ``agl predict``)."""
    g = p.add_argument_group("reading the slides")
    add_list_arg(g, "--sections", help="slides/sections (her2st) or sample ids (hest) to read, as A1 B2 or A1,B2 "
                                       "(default: all with an image)")
    g.add_argument("--image", "--he", type=Path, help="full-resolution image (visium, visium-hd, anndata inputs; "
                   "the post-Xenium H&E for xenium)")
    g.add_argument("--array", choices=ARRAY_CHOICES, default=None,
                   help="legacy ST array (her2st format): 1k = 200 um spot pitch, 2k = 100 um "
                        "(default: auto, from the array coordinates)")
    g.add_argument("--microns-per-pixel", type=float, default=None, metavar="UM",
                   help="pixel size of obsm['spatial'] and the full-resolution image (anndata input: needed "
                        "when the file has none; a scanpy Visium file derives it from spot_diameter_fullres)")
    g.add_argument("--spot-diameter-um", type=float, default=None, metavar="UM",
                   help="spot diameter (anndata input without one in the file; in scanpy's Visium layout the "
                        "diameter spot_diameter_fullres stands for, default 55)")
    g.add_argument("--duplicate-genes", choices=DUPLICATE_CHOICES, default=None,
                   help="genes sharing one symbol (as in human 10x references): refuse naming them (default), "
                        "add their counts, or keep the first")
    g.add_argument("--library-id", default=None, metavar="ID",
                   help="which library of uns['spatial'] to read (anndata input in scanpy's Visium layout with "
                        "several; the default takes the only one)")
    g.add_argument("--bin-um", type=int, choices=(2, 8, 16), default=None,
                   help="visium-hd: which of Space Ranger's bins to pool (binned_outputs/square_XXXum; default 8)")
    g.add_argument("--spot-um", type=float, default=None, metavar="UM",
                   help="visium-hd, xenium: width of the square pseudo-spots the bins or transcripts are pooled into "
                        "(default: --patch-um, so a patch shows exactly the tissue its counts come from)")
    g.add_argument("--alignment", type=Path, default=None, metavar="CSV",
                   help="xenium: H&E-to-Xenium alignment exported by Xenium Explorer (*_he_imagealignment.csv, or "
                        "its keypoints CSV; default: the one in the bundle)")
    g.add_argument("--min-qv", type=float, default=None, metavar="QV",
                   help="xenium: transcripts of at least this quality value (default 20, as Xenium's cell matrix)")
    g.add_argument("--xenium-counts", choices=("auto", "transcripts", "cells"), default=None,
                   help="xenium: pool transcripts, or cells by centroid (default auto: transcripts when "
                        "transcripts.parquet exists)")


def reader_kwargs(fmt: str, args: argparse.Namespace) -> dict[str, Any]:
    """Reader keywords from the options of :func:`add_reader_args`; a flag the reader has no use for is an error."""
    from agl.data.readers import READER_ENTRIES, READERS

    if fmt not in READERS:
        raise ConfigError("--format", f"unknown format {fmt!r}; choose one of {', '.join(sorted(READERS))}")
    params = inspect.signature(READERS[fmt]).parameters

    def keys_of(entry: Any, keys: tuple[str, ...]) -> tuple[str, ...]:
        return keys or ((entry.subset,) if entry.subset else ())

    kw: dict[str, Any] = {}
    for attr, flag, keys in _READER_FLAGS:
        value = getattr(args, attr, None)
        if value is None:
            continue
        key = next((k for k in keys_of(READER_ENTRIES[fmt], keys) if k in params), None)
        if key is None:
            takers = sorted(f for f, e in READER_ENTRIES.items()
                            if any(k in inspect.signature(e.read).parameters for k in keys_of(e, keys)))
            raise ConfigError(flag, f"only for formats {', '.join(takers)}; the {fmt} reader has no use for it")
        kw[key] = value
    if "spot_um" in params and "spot_um" not in kw and getattr(args, "patch_um", None) is not None:
        kw["spot_um"] = args.patch_um  # pseudo-spots as wide as the patches unless --spot-um says otherwise
    return kw


def cmd_ingest(args: argparse.Namespace) -> int:
    from agl.data.ingest import build_store
    from agl.data.readers import read_slides
    from agl.data.store import check_target
    from agl.fileio import check_output_folder, check_output_location

    # before reading anything: never over the input, nor a folder that is not an earlier store
    check_output_folder(args.out, "ingest", inputs=[args.path, args.image], overwrite=args.overwrite,
                        what="an agl store")
    check_target(args.out, args.overwrite)
    check_output_location(args.out)  # writable, with room: known before reading and cutting every slide
    if args.stain_reference_slides and args.stain == "none":
        raise ConfigError("--stain-reference-slides", "only with --stain macenko or --stain reinhard")
    if args.stream or args.address:
        if args.stain != "none":  # the reference needs every slide's patches before any slide is written
            raise ConfigError("--stain", "is not available with --stream/--address yet; ingest without them")
        return _cmd_ingest_streaming(args)
    adata = read_slides(args.format, args.path, **reader_kwargs(args.format, args))
    prior_data = None
    if args.prior_sections:
        if args.format != "her2st":
            raise ConfigError("--prior-sections", "only her2st releases have expression-only sections")
        prior_data = read_slides("her2st", args.path, sections=args.prior_sections, require_image=False)
    path = build_store(adata, args.out, patch_um=args.patch_um, patch_px=args.patch_px, border=args.border,
                       min_genes=args.min_genes, min_cells=args.min_cells, normalize_total=args.normalize_total,
                       log1p=not args.no_log1p, n_primary=args.n_primary,
                       primary_min_detection=args.primary_min_detection, priors=args.priors,
                       prior_data=prior_data, split_kinds=args.split_kinds, seeds=args.seeds,
                       overwrite=args.overwrite, expression_layout=args.expression or "dense",
                       stain=args.stain, stain_reference_slides=args.stain_reference_slides)
    print(f"store written: {path}")
    return 0


def _cmd_ingest_streaming(args: argparse.Namespace) -> int:
    from agl.data.ingest import IngestSettings, SlideSource, ingest_slides
    from agl.data.readers import READER_ENTRIES, read_slides

    kw = reader_kwargs(args.format, args)
    # the slides named on the command line are the units, one task each
    units = kw.pop(READER_ENTRIES[args.format].subset, None) if READER_ENTRIES[args.format].subset else None
    prior_data = None
    if args.prior_sections:
        if args.format != "her2st":
            raise ConfigError("--prior-sections", "only her2st releases have expression-only sections")
        prior_data = read_slides("her2st", args.path, sections=args.prior_sections, require_image=False)
    settings = IngestSettings(patch_um=args.patch_um, patch_px=args.patch_px, border=args.border,
                              min_genes=args.min_genes, min_cells=args.min_cells,
                              normalize_total=args.normalize_total, log1p=not args.no_log1p,
                              n_primary=args.n_primary, primary_min_detection=args.primary_min_detection,
                              priors=tuple(args.priors),
                              split_kinds=tuple(args.split_kinds), seeds=tuple(args.seeds),
                              expression_layout=args.expression or "sparse")
    path = ingest_slides(SlideSource(args.format, args.path, units=units, **kw), args.out, settings,
                         prior_data=prior_data, overwrite=args.overwrite, address=args.address,
                         max_retries=args.max_retries)
    print(f"store written: {path}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    store = open_store_arg(args.store)
    if args.verify:
        store.verify()
    print(describe(store, args.split))
    return 0


def describe(store: Any, split: str | None = None) -> str:
    """Human-readable summary of a store (what ``agl info`` prints)."""
    m = store.manifest
    lines = [f"store      {store.path}",
             f"created    {m.get('created')} by agl {m.get('agl_version')} (schema {m.get('schema_version')})",
             f"spots      {m['n_spots']} in {len(m['slides'])} slides: "
             + ", ".join(f"{s} {n}" for s, n in m["slides"].items()),
             f"genes      {m['n_genes']}"]
    patch = m.get("patch", {})
    stain = patch.get("stain") or {"method": "none"}
    lines.append(f"patches    {' x '.join(map(str, m['patch_shape']))} uint8, "
                 f"{patch.get('patch_um')} um wide, border={patch.get('border')}, stain={stain['method']}"
                 + (f" (reference from {stain['reference_from']['n_patches']} patches of "
                    f"{', '.join(stain['reference_from']['slides'] or [])})" if stain.get("reference_from") else ""))
    lines.append(f"preprocess {m.get('preprocessing')}")
    names = store.split_names
    kinds: dict[str, int] = {}
    for n in names:
        kinds[n.split("-", 1)[0]] = kinds.get(n.split("-", 1)[0], 0) + 1
    lines.append(f"splits     {len(names)}: " + ", ".join(f"{k} x{v}" for k, v in kinds.items())
                 + (f" ({names[0]} ... {names[-1]})" if names else ""))
    if names:
        split = split or names[0]
        gs = store.gene_set(split)
        roles = store.split(split).value_counts()
        primary = gs.loc[gs["role"] == "primary", "gene"].tolist()
        lines.append(f"split      {split}: " + ", ".join(f"{r or 'unused'} {roles.get(r, 0)}" for r in ("train", "val", "test")))
        lines.append(f"primary    {len(primary)} genes: {' '.join(primary)}")
        lines.append(f"auxiliary  {int((gs['role'] == 'auxiliary').sum())} genes, priors "
                     f"{[c[len('prior_'):] for c in gs.columns if c.startswith('prior_')]}")
    return "\n".join(lines)
