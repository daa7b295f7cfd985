"""Exact, compact encoding of a sparse store's expression (CSR per spot: gene indices + values).

The expression a store holds is a function of integer raw counts: ``log1p(count)`` (the
default preprocessing), or the count itself (``log1p=False``). So instead of float32 values
(4 bytes) and int32 gene indices (4 bytes) per non-zero, a sparse store keeps

* the count, as the smallest unsigned type that holds the store's largest count (uint16, or
  uint32 above 65,535), in the column/array ``expression_counts``;
* the gene index as uint16 when the store has at most 65,536 genes (int32 otherwise);
* a float32 lookup table ``arrays/expression_table.arrow`` with ``table[c]`` = the stored
  value of count ``c``, computed once by the writer.

Reading is a gather, ``table[counts]``, so the values read are bit for bit the float32
values the preprocessing produced, on any machine (a reader's own ``log1p`` could differ in
the last bit from the writer's). The writer checks exactly that before it writes: a slide
whose values are not ``table[count]`` (``normalize_total`` gives non-integer ratios) is
refused, and :func:`detect_encoding` falls back to plain float32 values for such data.

Stores written before this encoding have no ``expression_encoding`` in their manifest and
keep int32 indices + float32 ``expression_values``; :meth:`ValueEncoding.from_manifest`
returns :data:`LEGACY` for them, so they stay readable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from agl.errors import DataError

# the inverse (float64) and forward (float32, as scanpy computes it on float32 data) of each transform
TRANSFORMS = {
    "identity": (lambda v: v.astype(np.float64), lambda c: c.astype(np.float32)),
    "log1p": (lambda v: np.expm1(v.astype(np.float64)), lambda c: np.log1p(c.astype(np.float32))),
}
MAX_TABLE = 1 << 24  # counts up to 16.7 M: float32 holds every integer below 2**24 exactly; table <= 64 MB
UINT16_MAX = np.iinfo(np.uint16).max


def index_dtype(n_genes: int) -> str:
    """uint16 gene indices when every column index fits (at most 65,536 genes), else int32."""
    return "uint16" if n_genes <= UINT16_MAX + 1 else "int32"


def count_dtype(max_count: int) -> str:
    return "uint16" if max_count <= UINT16_MAX else "uint32"


@dataclass(frozen=True)
class ValueEncoding:
    """How a sparse store's CSR indices and values are stored (recorded in the manifest)."""

    indices: str = "int32"          # uint16 | int32
    values: str = "float32"         # float32 (values as they are) | uint16 | uint32 (counts)
    transform: str | None = None    # counts -> value: identity | log1p (None with float32 values)
    max_count: int | None = None    # the table covers counts 0..max_count

    @property
    def counts(self) -> bool:
        return self.values != "float32"

    @property
    def column(self) -> str:
        """Name of the values column (Parquet) and array (``arrays/NAME.arrow``)."""
        return "expression_counts" if self.counts else "expression_values"

    def table(self) -> np.ndarray | None:
        """float32 [max_count + 1]: the stored value of each count (None for float32 values)."""
        if not self.counts:
            return None
        return TRANSFORMS[self.transform][1](np.arange(self.max_count + 1, dtype=np.int64))

    def encode(self, values: np.ndarray, table: np.ndarray | None, where: Any = None) -> np.ndarray:
        """The stored form of float32 non-zero ``values``; refuses any value it would not read back exactly."""
        values = np.asarray(values, dtype=np.float32)
        if not self.counts:
            return values
        inverse = TRANSFORMS[self.transform][0]
        counts = np.rint(inverse(values)) if len(values) else np.zeros(0)
        ok = len(values) == 0 or (counts.min() >= 0 and counts.max() <= self.max_count)
        if ok:
            counts = counts.astype(self.values)
            ok = np.array_equal(table[counts].view(np.uint32), values.view(np.uint32))  # bitwise, not ==
        if not ok:
            raise DataError(where, f"expression values are not {self.transform}(integer count <= {self.max_count}) "
                                   "exactly, so the count encoding would change them; write this store with "
                                   "float32 values (normalize_total makes them non-integer) or report a bug")
        return counts

    def decode(self, stored: np.ndarray, table: np.ndarray | None) -> np.ndarray:
        """float32 values of stored values (a gather through the table for counts)."""
        if not self.counts:
            return np.asarray(stored, dtype=np.float32)
        return np.take(table, stored)

    def to_manifest(self) -> dict[str, Any]:
        return {"indices": self.indices, "values": self.values, "transform": self.transform,
                "max_count": self.max_count}

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], where: Any = None) -> "ValueEncoding":
        raw = manifest.get("expression_encoding")
        if raw is None:
            return LEGACY
        try:
            enc = cls(indices=str(raw["indices"]), values=str(raw["values"]), transform=raw.get("transform"),
                      max_count=None if raw.get("max_count") is None else int(raw["max_count"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(where, f"unreadable expression_encoding {raw!r}: {err}") from None
        if enc.indices not in ("uint16", "int32") or enc.values not in ("float32", "uint16", "uint32") \
                or (enc.counts and (enc.transform not in TRANSFORMS or enc.max_count is None)):
            raise DataError(where, f"expression_encoding {raw!r} is not one this agl reads "
                                   "(written by a newer agl?); rebuild the store with agl ingest")
        return enc


LEGACY = ValueEncoding()  # sparse stores written before the encoding: int32 indices, float32 values


def counts_encoding(n_genes: int, max_count: int, transform: str | None) -> ValueEncoding:
    """Integer counts when ``transform`` maps counts to the values (else float32 values)."""
    if transform is None or max_count >= MAX_TABLE:
        return ValueEncoding(indices=index_dtype(n_genes))
    return ValueEncoding(indices=index_dtype(n_genes), values=count_dtype(max_count), transform=transform,
                         max_count=int(max_count))


def settings_transform(normalize_total: float | None, log1p: bool) -> str | None:
    """The counts -> value transform the preprocessing applies (None: values are not a function of the count)."""
    if normalize_total:
        return None
    return "log1p" if log1p else "identity"


def detect_encoding(values: np.ndarray, n_genes: int) -> ValueEncoding:
    """The count encoding under which float32 non-zero ``values`` read back exactly, or float32 values."""
    values = np.asarray(values, dtype=np.float32)
    for transform, (inverse, _forward) in TRANSFORMS.items():
        if len(values) == 0:
            break
        counts = np.rint(inverse(values))
        if counts.min() < 0 or counts.max() >= MAX_TABLE:
            continue
        enc = counts_encoding(n_genes, int(counts.max()), transform)
        try:
            enc.encode(values, enc.table())
        except DataError:
            continue
        return enc
    return ValueEncoding(indices=index_dtype(n_genes))
