"""Named, seeded train/validation/test splits of the spots of a store.

Names (see docs/architecture.md):

- ``kfold-s{seed}-f{f}``: per slide, ``n_folds`` random spot folds; test = fold f,
  validation = fold (f+1) % n_folds, train = the rest (the paper's intra-batch protocol).
- ``spatial-s{seed}-f{f}``: the same roles over spatially blocked folds per slide
  (size-balanced k-means on pixel coordinates), so test spots are not surrounded by
  training spots (random folds leak through spatial autocorrelation).
- ``loso-{slide}``: test = that slide, validation = a seeded 20% of every other slide's
  spots, train = the rest. A slide's validation spots are the same in every loso split
  where it is not held out (:func:`loso_validation`), so a split's training spots are
  (every slide's non-validation spots) minus (the held-out slide's): streaming ingest
  merges one sum per slide instead of one per slide and split (``SPLITS_VERSION`` 2;
  version 1 drew each split's validation spots anew).

A split is a column of roles ``"train" | "val" | "test" | ""`` (unused) in spot order,
optionally with ``"val_outer"``: validation spots kept for DkGSB's outer objective (the
threshold's loss), so that ``"val"`` (early stopping and model selection) is not the data
the threshold was fitted to (``make_splits(..., val_outer_fraction=...)`` or
``carve_val_outer``).
Every random draw is seeded by the split seed and the slide name, so adding a slide
does not change the folds of the others.

In memory and in a store the splits are a :class:`SplitTable`, which holds what the roles are
derived from instead of one role per spot per split (that is 8 bytes per spot per split as
Python objects: about 21 GB for HEST-1k's 2.1 M spots and 1,239 splits): the slide of each
spot (int16 codes) and the loso validation mask (one bool per spot) give every ``loso-*``
split; one small integer fold id per spot (int8) per kind and seed gives the ``n_folds``
splits of that kind and seed. Roles are built per split when asked for.
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from agl.errors import ConfigError, DataError
from agl.data.schema import OBS_PX, OBS_PY, OBS_SLIDE
from agl.registry import Registry

ROLES = ("train", "val", "test", "val_outer")
ROLE_NAMES = ("", "train", "val", "test", "val_outer")  # a role code is its position here ("": unused)
UNUSED, TRAIN, VAL, TEST, VAL_OUTER = range(len(ROLE_NAMES))
ROLE_CODES = {role: code for code, role in enumerate(ROLE_NAMES)}
_ROLE_OBJECTS = np.array(ROLE_NAMES, dtype=object)
LOSO_VAL_FRACTION = 0.2
LOSO_SEED = 0
SPLITS_VERSION = 2  # bumped when a split's roles change for the same spots (2: loso validation per slide)


def _rng(seed: int, slide: str, salt: str) -> np.random.Generator:
    """A generator keyed by (seed, slide, kind) so each slide's draw is independent of the others."""
    return np.random.default_rng([int(seed), zlib.crc32(slide.encode()), zlib.crc32(salt.encode())])


def random_folds(n: int, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold id per item: a random permutation cut into ``n_folds`` near-equal parts."""
    folds = np.empty(n, dtype=np.int64)
    folds[rng.permutation(n)] = np.arange(n) % n_folds
    return folds


def spatial_folds(xy: np.ndarray, n_folds: int, rng: np.random.Generator, n_iter: int = 20) -> np.ndarray:
    """Fold id per spot: contiguous, size-balanced spatial blocks.

    Lloyd's k-means (k-means++ start) where the assignment step is capacity-constrained
    (each block takes at most ceil(n / n_folds) spots, closest pairs first), so blocks
    stay compact and folds have near-equal size.
    """
    xy = np.asarray(xy, dtype=np.float64)
    n = len(xy)
    if n < n_folds:
        raise ConfigError("splits", f"{n} spots cannot make {n_folds} spatial folds")
    centres = [xy[rng.integers(n)]]
    for _ in range(1, n_folds):  # k-means++ seeding: far points are likely new centres
        d2 = np.min(((xy[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(xy[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else xy[rng.integers(n)])
    centres = np.asarray(centres)
    cap = -(-n // n_folds)
    labels = np.full(n, -1)
    for _ in range(n_iter):
        dist = ((xy[:, None, :] - centres[None]) ** 2).sum(-1)
        order = np.argsort(dist, axis=None, kind="stable")
        new = np.full(n, -1)
        fill = np.zeros(n_folds, dtype=np.int64)
        for flat in order:  # greedy: closest (spot, block) pairs first, respecting capacity
            i, c = divmod(int(flat), n_folds)
            if new[i] < 0 and fill[c] < cap:
                new[i] = c
                fill[c] += 1
        if np.array_equal(new, labels):
            break
        labels = new
        centres = np.stack([xy[labels == c].mean(0) for c in range(n_folds)])
    # random block -> fold numbering, so fold 0 is not always the first seeded block
    return rng.permutation(n_folds)[labels]


def role_codes(roles: Iterable[str], where: Any = "splits") -> np.ndarray:
    """int8 role codes (positions in ``ROLE_NAMES``) of role strings; an unknown role raises DataError naming ``where``."""
    values = np.asarray(roles if isinstance(roles, np.ndarray) else list(roles), dtype=object)
    codes = pd.Categorical(values, categories=list(ROLE_NAMES)).codes
    if (codes < 0).any():
        raise DataError(where, f"unknown role(s) {sorted(set(map(str, values[codes < 0])))[:5]}; "
                               f"roles are {list(ROLE_NAMES)}")
    return codes.astype(np.int8)


def role_strings(codes: np.ndarray) -> np.ndarray:
    """Role strings (an object array) of int8 role codes."""
    return _ROLE_OBJECTS[np.asarray(codes, dtype=np.intp)]


def slide_groups(slides: Sequence[Any] | np.ndarray) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """(slide names in order of first appearance, each spot's slide code, each slide's rows ascending).

    One sort instead of one comparison of every spot per slide: linear in spots at 1,229 slides.
    """
    codes, names = pd.factorize(np.asarray(slides).astype(str))
    order = np.argsort(codes, kind="stable")  # stable: each slide's rows stay ascending
    groups = np.split(order, np.cumsum(np.bincount(codes, minlength=len(names)))[:-1])
    return [str(n) for n in names], codes.astype(slide_code_dtype(len(names))), groups


def slide_code_dtype(n_slides: int) -> np.dtype:
    return np.dtype(np.int16 if n_slides <= np.iinfo(np.int16).max else np.int32)


def fold_dtype(n_folds: int) -> np.dtype:
    return np.dtype(np.int8 if n_folds <= np.iinfo(np.int8).max else np.int16)


class SplitTable(Mapping[str, np.ndarray]):
    """Named splits of ``n_spots`` spots, held as the columns their roles derive from (module doc).

    A mapping from split name to that split's roles (an object array of role strings, built on
    access); :meth:`codes` gives int8 role codes instead. ``specs`` says how each split derives:
    ``("folds", column, f, n_folds)``: test where the fold id is ``f``, validation where it is
    ``(f + 1) % n_folds``, train elsewhere; ``("loso", i)``: test on slide ``slides[i]``,
    validation where ``loso_val``, train elsewhere; ``("roles", column)``: stored role codes.
    Columns are named ``slide``, ``loso_val``, ``folds:{kind}-s{seed}``, ``roles:{name}``; they
    are given (``columns``) or read on first use (``read_column(name)``, e.g. from a store's
    file, so only the columns of the splits asked for are read). ``val_outer_fraction > 0``
    carves that share of each split's validation spots into ``val_outer`` (``carve_val_outer``).
    """

    def __init__(self, n_spots: int, specs: Mapping[str, Sequence[Any]], *, slides: Sequence[str] = (),
                 columns: Mapping[str, np.ndarray] | None = None,
                 read_column: Callable[[str], np.ndarray] | None = None,
                 val_outer_fraction: float = 0.0, source: Any = "splits"):
        self.n_spots = int(n_spots)
        self.specs = {str(name): tuple(spec) for name, spec in specs.items()}
        self.slides = [str(s) for s in slides]
        self.val_outer_fraction = float(val_outer_fraction)
        self.source = source
        self._columns: dict[str, np.ndarray] = {}
        self._read_column = read_column
        for name, values in (columns or {}).items():
            self._columns[name] = self._checked(name, np.asarray(values))
        if self.val_outer_fraction and not self.slides:
            raise ConfigError("val_outer_fraction", "carving val_outer needs the spots' slides")

    # --- the mapping: split name -> roles
    def __getitem__(self, name: str) -> np.ndarray:
        return role_strings(self.codes(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __repr__(self) -> str:
        return f"SplitTable({self.n_spots} spots, {len(self.specs)} splits, {len(self.slides)} slides)"

    @property
    def columns(self) -> list[str]:
        """The split names (as a DataFrame of roles would list them)."""
        return list(self.specs)

    def column(self, name: str) -> np.ndarray:
        """A stored column (read on first use when the table reads lazily)."""
        if name not in self._columns:
            if self._read_column is None:
                raise DataError(self.source, f"the split table has no column {name!r}")
            self._columns[name] = self._checked(name, np.asarray(self._read_column(name)))
        return self._columns[name]

    def _checked(self, name: str, values: np.ndarray) -> np.ndarray:
        if values.shape != (self.n_spots,):
            raise DataError(self.source, f"split column {name!r} holds {values.shape[0] if values.ndim else 0} values "
                                         f"for {self.n_spots} spots; rebuild the store with agl ingest")
        return values

    def codes(self, name: str) -> np.ndarray:
        """int8 role codes of split ``name`` (positions in ``ROLE_NAMES``)."""
        spec = self.specs.get(name)
        if spec is None:
            raise ConfigError("splits", f"unknown split {name!r}; this table has {self.columns[:10]}"
                                        f"{' ...' if len(self.specs) > 10 else ''}")
        kind = spec[0]
        if kind == "folds":
            folds = self.column(spec[1])
            fold, n_folds = int(spec[2]), int(spec[3])
            codes = np.full(self.n_spots, TRAIN, dtype=np.int8)
            codes[folds == (fold + 1) % n_folds] = VAL
            codes[folds == fold] = TEST
        elif kind == "loso":
            codes = np.where(self.column("loso_val"), VAL, TRAIN).astype(np.int8)
            codes[self.column("slide") == int(spec[1])] = TEST
        elif kind == "roles":
            codes = np.array(self.column(spec[1]), dtype=np.int8)
        else:
            raise DataError(self.source, f"split {name!r} has an unknown layout {spec!r}; this agl reads "
                                         "'folds', 'loso' and 'roles'")
        if self.val_outer_fraction:
            codes = carve_val_outer_codes(codes, self.column("slide"), self.slides, self.val_outer_fraction,
                                          split_seed(name))
        return codes

    def mask(self, name: str, role: str) -> np.ndarray:
        """bool per spot: has ``role`` in split ``name``."""
        return self.codes(name) == ROLE_CODES[role]

    # --- building and storing
    def loaded(self) -> dict[str, np.ndarray]:
        """Every column, read if need be (what a store file holds)."""
        needed = {"slide"} if self.slides else set()
        for spec in self.specs.values():
            needed |= {"loso_val", "slide"} if spec[0] == "loso" else {spec[1]}
        return {name: self.column(name) for name in sorted(needed)}

    def nbytes(self) -> int:
        """Bytes of the columns held in memory now."""
        return int(sum(v.nbytes for v in self._columns.values()))

    def layout(self) -> dict[str, Any]:
        """What a store records beside the columns: every split's spec, the slides, the carving."""
        return {"format": SPLIT_TABLE_FORMAT, "n_spots": self.n_spots, "slides": self.slides,
                "splits": {name: list(spec) for name, spec in self.specs.items()},
                "val_outer_fraction": self.val_outer_fraction}

    @classmethod
    def from_layout(cls, layout: Mapping[str, Any], read_column: Callable[[str], np.ndarray],
                    source: Any = "splits") -> "SplitTable":
        """A table that reads its columns on first use; ``layout`` as :meth:`layout` wrote it."""
        if not isinstance(layout, Mapping) or layout.get("format") != SPLIT_TABLE_FORMAT:
            raise DataError(source, f"split table format {layout.get('format') if isinstance(layout, Mapping) else layout!r} "
                                    f"is not supported by this agl (reads {SPLIT_TABLE_FORMAT}); rebuild the store with agl ingest")
        return cls(layout["n_spots"], layout["splits"], slides=layout.get("slides", ()), read_column=read_column,
                   val_outer_fraction=layout.get("val_outer_fraction", 0.0), source=source)

    @classmethod
    def from_roles(cls, roles: Mapping[str, Any], n_spots: int, slides: Sequence[str] = (),
                   slide_codes: np.ndarray | None = None, source: Any = "splits") -> "SplitTable":
        """Splits given as roles per spot (a DataFrame or mapping of role columns), stored as int8 role codes."""
        names = list(roles.columns) if isinstance(roles, pd.DataFrame) else list(roles)
        columns = {f"roles:{n}": role_codes(np.asarray(roles[n]), source) for n in names}
        if slide_codes is not None:
            columns["slide"] = slide_codes
        return cls(n_spots, {n: ("roles", f"roles:{n}") for n in names}, slides=slides, columns=columns,
                   source=source)

    def to_frame(self, index: pd.Index | None = None) -> pd.DataFrame:
        """One column of role strings per split (8 bytes per spot per split: for small tables)."""
        return pd.DataFrame({name: self[name] for name in self.specs}, index=index, dtype=object)


SPLIT_TABLE_FORMAT = 1


def merge_tables(tables: Iterable[SplitTable], val_outer_fraction: float = 0.0) -> SplitTable:
    """One table of the splits of ``tables`` (spots and slides alike; a later split of the same name wins)."""
    tables = list(tables)
    n_spots = tables[0].n_spots
    slides = next((t.slides for t in tables if t.slides), [])
    specs: dict[str, tuple] = {}
    columns: dict[str, np.ndarray] = {}
    for t in tables:
        if t.n_spots != n_spots or (t.slides and t.slides != slides):
            raise ConfigError("splits", "split tables of different spots cannot be merged")
        specs.update(t.specs)
        columns.update(t.loaded())
    return SplitTable(n_spots, specs, slides=slides, columns=columns, val_outer_fraction=val_outer_fraction)


def _fold_splits(obs: pd.DataFrame, kind: str, n_folds: int, seeds: Iterable[int],
                 assign: Callable[[pd.DataFrame, int, np.random.Generator], np.ndarray]) -> SplitTable:
    names, codes, groups = slide_groups(obs[OBS_SLIDE].to_numpy())
    specs: dict[str, tuple] = {}
    columns: dict[str, np.ndarray] = {"slide": codes}
    for seed in seeds:
        folds = np.empty(len(obs), dtype=fold_dtype(n_folds))
        for slide, at in zip(names, groups):
            if len(at) < n_folds:
                raise ConfigError("splits", f"slide {slide!r} has {len(at)} spots, fewer than {n_folds} folds")
            folds[at] = assign(obs.iloc[at], n_folds, _rng(seed, slide, kind))
        columns[f"folds:{kind}-s{seed}"] = folds
        specs.update({f"{kind}-s{seed}-f{f}": ("folds", f"folds:{kind}-s{seed}", f, n_folds) for f in range(n_folds)})
    return SplitTable(len(obs), specs, slides=names, columns=columns)


def _kfold(obs: pd.DataFrame, n_folds: int, seeds: Iterable[int]) -> SplitTable:
    return _fold_splits(obs, "kfold", n_folds, seeds, lambda o, k, rng: random_folds(len(o), k, rng))


def _spatial(obs: pd.DataFrame, n_folds: int, seeds: Iterable[int]) -> SplitTable:
    return _fold_splits(obs, "spatial", n_folds, seeds,
                        lambda o, k, rng: spatial_folds(o[[OBS_PX, OBS_PY]].to_numpy(), k, rng))


def loso_validation(obs: pd.DataFrame) -> np.ndarray:
    """bool per spot: a seeded 20% of each slide, its validation spots in every loso split that trains on it."""
    names, _, groups = slide_groups(obs[OBS_SLIDE].to_numpy())
    val = np.zeros(len(obs), dtype=bool)
    for slide, at in zip(names, groups):
        n_val = max(1, int(round(LOSO_VAL_FRACTION * len(at))))
        val[_rng(LOSO_SEED, slide, "loso").choice(at, n_val, replace=False)] = True
    return val


def _loso(obs: pd.DataFrame, n_folds: int, seeds: Iterable[int]) -> SplitTable:
    names, codes, _ = slide_groups(obs[OBS_SLIDE].to_numpy())
    if len(names) < 2:  # leave-one-slide-out needs another slide to train on
        return SplitTable(len(obs), {}, slides=names, columns={"slide": codes})
    return SplitTable(len(obs), {f"loso-{held}": ("loso", i) for i, held in enumerate(names)}, slides=names,
                      columns={"slide": codes, "loso_val": loso_validation(obs)})


# kind -> function(obs, n_folds, seeds) -> {split name: roles} (a SplitTable, or any mapping of role arrays);
# add a kind with SPLIT_KINDS.register(name, fn).
SPLIT_KINDS: Registry[Callable[[pd.DataFrame, int, Iterable[int]], Mapping[str, np.ndarray]]] = Registry(
    "split kind", setting="split_kinds")
SPLIT_KINDS.register("kfold", _kfold)
SPLIT_KINDS.register("spatial", _spatial)
SPLIT_KINDS.register("loso", _loso)


def carve_val_outer_codes(codes: np.ndarray, slide_codes: np.ndarray, slides: Sequence[str], fraction: float,
                          seed: int = 0) -> np.ndarray:
    """:func:`carve_val_outer` on int8 role codes, the slides given as codes into ``slides``."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError("val_outer_fraction", f"must lie in (0, 1), got {fraction}")
    codes = np.array(codes, dtype=np.int8)
    val = np.flatnonzero(codes == VAL)
    by_slide = val[np.argsort(slide_codes[val], kind="stable")]  # each slide's validation rows, ascending
    counts = np.bincount(slide_codes[val], minlength=len(slides))
    for slide_code, at in zip(np.flatnonzero(counts), np.split(by_slide, np.cumsum(counts[counts > 0])[:-1])):
        if len(at) < 2:
            continue
        n_outer = min(len(at) - 1, max(1, int(round(fraction * len(at)))))
        codes[_rng(seed, slides[slide_code], "val_outer").choice(at, n_outer, replace=False)] = VAL_OUTER
    return codes


def carve_val_outer(roles: np.ndarray, slides: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A copy of ``roles`` where a seeded ``fraction`` of each slide's ``val`` spots become ``val_outer``.

    Per slide (keyed like every other draw here), so each validation slide contributes to both
    roles; at least one spot stays ``val`` and one becomes ``val_outer`` where a slide has two
    or more validation spots.
    """
    names, slide_codes, _ = slide_groups(slides)
    return role_strings(carve_val_outer_codes(role_codes(roles), slide_codes, names, fraction, seed))


def split_table(obs: pd.DataFrame, kinds: Iterable[str] = ("kfold", "spatial", "loso"), n_folds: int = 5,
                seeds: Iterable[int] = (0,), val_outer_fraction: float = 0.0) -> SplitTable:
    """All named splits of the spots in ``obs`` (needs ``slide_id``, ``pixel_x``, ``pixel_y``) as a :class:`SplitTable`.

    With ``val_outer_fraction > 0`` that share of each split's validation spots has the role
    ``"val_outer"`` instead (``carve_val_outer``, seeded by the split seed, or ``LOSO_SEED``
    for leave-one-slide-out).
    """
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in SPLIT_KINDS]
    if unknown:
        raise ConfigError("splits", f"unknown split kind(s) {unknown}; known: {sorted(SPLIT_KINDS)}")
    if n_folds < 3:
        raise ConfigError("splits", f"n_folds must be >= 3 (test, validation and train folds), got {n_folds}")
    if val_outer_fraction and not 0.0 < val_outer_fraction < 1.0:
        raise ConfigError("val_outer_fraction", f"must lie in (0, 1), got {val_outer_fraction}")
    seeds = [int(s) for s in seeds]
    names, codes, _ = slide_groups(obs[OBS_SLIDE].to_numpy())
    tables = [SplitTable(len(obs), {}, slides=names, columns={"slide": codes})]
    for kind in kinds:
        made = SPLIT_KINDS[kind](obs, n_folds, seeds)
        tables.append(made if isinstance(made, SplitTable)
                      else SplitTable.from_roles(made, len(obs), names, codes, source=f"split kind {kind!r}"))
    table = merge_tables(tables, val_outer_fraction)
    if not len(table):  # e.g. only loso on a one-slide store: there is nothing to hold out
        raise ConfigError("splits", f"split kind(s) {kinds} give no split on {len(names)} slide(s); "
                                    "leave-one-slide-out needs at least 2 slides (add kfold or spatial)")
    return table


def make_splits(obs: pd.DataFrame, kinds: Iterable[str] = ("kfold", "spatial", "loso"),
                n_folds: int = 5, seeds: Iterable[int] = (0,), val_outer_fraction: float = 0.0) -> pd.DataFrame:
    """:func:`split_table` as a DataFrame indexed like ``obs``, one column of roles per split name.

    Values ``"train" | "val" | "test" | "" | "val_outer"``; 8 bytes per spot per split, so for
    small cohorts (ingest and stores use the compact :class:`SplitTable`).
    """
    return split_table(obs, kinds, n_folds, seeds, val_outer_fraction).to_frame(obs.index)


def split_seed(name: str) -> int:
    """The seed in a split name (``kfold-s3-f1`` -> 3); ``LOSO_SEED`` for names without one."""
    for part in name.split("-")[1:]:
        if part.startswith("s") and part[1:].isdigit():
            return int(part[1:])
    return LOSO_SEED


def split_kind(name: str) -> str:
    """The kind of a split name (``kfold-s0-f1`` -> ``kfold``)."""
    return name.split("-", 1)[0]


def inner_folds(obs: pd.DataFrame, outer_roles: Iterable[str], kind: str = "loso", n_folds: int = 3,
                seed: int = 0, max_folds: int | None = None) -> dict[str, np.ndarray]:
    """Cross-validation folds over the spots a sweep may see: everything but ``outer_roles == "test"``.

    The outer split's test spots (the sweep's held-out slide or slides) get role ``""`` in every
    fold, so no fold trains, validates or scores on them. Within the rest, the folds are the
    registered split kinds applied to those spots only: ``loso`` holds out one remaining slide
    per fold (its spots are the fold's ``test`` part, the score; a seeded 20% of the other
    slides validate for early stopping and outer steps), ``spatial`` / ``kfold`` cut
    ``n_folds`` spot folds per slide. Names are ``{kind}-...`` as in :func:`make_splits`,
    seeded by ``seed`` and the slide names, so a trial recomputes the same folds anywhere.
    ``max_folds`` keeps the first folds only (in name order).
    """
    if kind not in SPLIT_KINDS:
        raise ConfigError("cv", f"unknown fold kind {kind!r}; known: {sorted(SPLIT_KINDS)}")
    outer = np.asarray(list(outer_roles), dtype=object)
    if len(outer) != len(obs):
        raise ConfigError("cv", f"outer split has {len(outer)} roles for {len(obs)} spots")
    seen = np.flatnonzero(outer != "test")
    inner = SPLIT_KINDS[kind](obs.iloc[seen], n_folds, [seed])
    if not inner:
        raise ConfigError("cv", f"{kind} folds need at least 2 slides outside the test part, found "
                                f"{sorted(pd.unique(obs[OBS_SLIDE].astype(str).to_numpy()[seen]))}")
    folds: dict[str, np.ndarray] = {}
    for name in sorted(inner)[:max_folds]:
        roles = np.full(len(obs), "", dtype=object)
        roles[seen] = inner[name]
        folds[name] = roles
    return folds
