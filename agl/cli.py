"""The ``agl`` command line: ``agl ingest|info|train|evaluate|tune|predict|bench``.

Each feature area registers its own sub-commands (``register(subparsers)`` in the
modules listed in ``_COMMAND_MODULES``), so this file stays a thin dispatcher.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, Sequence

from agl.errors import AGLError

# Modules that expose ``register(subparsers: argparse._SubParsersAction) -> None``.
# A sub-command's handler is stored as ``func`` in its parser defaults and returns an exit code.
_COMMAND_MODULES = (
    "agl.data.commands",
    "agl.commands",
    "agl.distributed.commands",
    "agl.bench.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agl",
        description="Auxiliary Gene Learning: spatial gene expression from H&E, with DkGSB gene selection.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # an optional feature area not present in this install
                continue
            raise
        module.register(sub)
    return parser


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _run(handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, name: str) -> int:
    """Call ``handler(args)``; an AGLError becomes ``name: error: ...`` on stderr and exit code 2."""
    try:
        return int(handler(args) or 0)
    except AGLError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return _run(args.func, args, f"agl {args.command}")


def run_script(add_args: Callable[[argparse.ArgumentParser], None],
               handler: Callable[[argparse.Namespace], int | None], description: str,
               argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of a stand-alone script (``launch/*.py``) that runs one sub-command's handler.

    Parses ``argv`` with the options ``add_args`` adds, sets up logging as ``agl`` does and
    returns the handler's exit code (2 after an AGLError, 130 after Ctrl-C).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_args(parser)
    args = parser.parse_args(argv)
    _setup_logging()
    return _run(handler, args, parser.prog)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
