"""The reader registry (two :class:`agl.registry.Registry`): a format name -> its reader, the keyword that picks a subset of its slides and
how to list them. A reader module registers itself with :func:`register_reader`; nothing else names it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import anndata as ad

from agl.errors import DataError
from agl.registry import Registry


@dataclass(frozen=True)
class ReaderEntry:
    """One registered format."""

    name: str
    read: Callable[..., ad.AnnData]  # read(path, **options) -> canonical AnnData
    subset: str | None = None  # keyword of ``read`` that selects slides (``--sections``), None: one unit
    list_units: Callable[..., list[str]] | None = None  # list_units(path, **options): the slides ``subset`` takes
    help: str = ""  # one line for ``agl ingest --help``


READERS: Registry[Callable[..., ad.AnnData]] = Registry("reader", setting="format")  # what ``agl ingest FORMAT`` accepts
READER_ENTRIES: Registry[ReaderEntry] = Registry("reader entry", setting="format")


def register_reader(name: str, *, subset: str | None = None, list_units: Callable[..., list[str]] | None = None,
                    aliases: tuple[str, ...] = (), help: str = "") -> Callable[[Callable[..., ad.AnnData]],
                                                                              Callable[..., ad.AnnData]]:
    """Decorator: register ``read`` under ``name`` (and ``aliases``); a name taken by another reader is an error."""
    def add(read: Callable[..., ad.AnnData]) -> Callable[..., ad.AnnData]:
        entry = ReaderEntry(name, read, subset, list_units, help)
        for key in (name, *aliases):
            if key in READERS and READERS[key] is not read:
                raise ValueError(f"reader name {key!r} already registered by {READERS[key].__module__}")
            if key not in READERS:
                READERS.register(key, read)
                READER_ENTRIES.register(key, entry)
        return read
    return add


def reader_entry(fmt: str, path: str | Path | None = None) -> ReaderEntry:
    """The entry registered under ``fmt``; DataError listing the known formats otherwise."""
    entry = READER_ENTRIES.get(fmt, None)
    if entry is None:
        raise DataError(path, f"unknown format {fmt!r}; known: {sorted(READERS)}")
    return entry


def read_slides(fmt: str, path: str | Path, **kw: Any) -> ad.AnnData:
    """Read ``path`` with the reader registered under ``fmt`` (see :data:`READERS`)."""
    return reader_entry(fmt, path).read(path, **kw)


def list_units(fmt: str, path: str | Path, **kw: Any) -> list[str]:
    """The slides of ``path`` the ``fmt`` reader can read one at a time (empty: the input is one unit)."""
    entry = reader_entry(fmt, path)
    return [] if entry.list_units is None else list(entry.list_units(Path(path), **kw))
