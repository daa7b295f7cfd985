"""The one way a command names a store: a store folder, or ``demo`` for the bundled her2st demo.

Every command that reads a store takes it through :func:`add_store_arg` (``--store STORE``;
``agl info`` takes it as its positional argument, with the same meaning) and opens it with
:func:`open_store_arg`; Ray trials receive the path from :func:`resolve_store`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEMO = "demo"
STORE_HELP = "store folder (from `agl ingest`), or 'demo' for the bundled her2st demo store (built on first use)"


def store_path(spec: str | Path | None) -> Path:
    """The folder ``spec`` names: ``None``/``demo`` -> the demo store (built on first use), else the path."""
    if spec is None or str(spec) == DEMO:
        from agl.datasets import her2st_demo_store

        return Path(her2st_demo_store()).resolve()
    return Path(spec).expanduser().resolve()


def open_store_arg(spec: str | Path | None) -> Any:
    """Open the store ``spec`` names (errors name the store's file and the problem)."""
    from agl.data.store import open_store

    return open_store(store_path(spec))


def resolve_store(spec: str | Path | None) -> Path:
    """The checked path of the store ``spec`` names (opened once, so a bad store fails before any trial)."""
    return Path(open_store_arg(spec).path).resolve()


def add_store_arg(parser: argparse.ArgumentParser, required: bool = False, positional: bool = False) -> None:
    """``--store STORE`` (default ``demo`` unless required), or a positional ``STORE`` (default ``demo``)."""
    if positional:
        parser.add_argument("store", nargs="?", default=DEMO, metavar="STORE", help=STORE_HELP)
    elif required:
        parser.add_argument("--store", required=True, help=STORE_HELP)
    else:
        parser.add_argument("--store", default=DEMO, help=f"{STORE_HELP}; default: demo")
