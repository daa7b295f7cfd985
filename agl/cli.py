"""The ``agl`` command line: ``agl ingest|info|train|evaluate|tune|predict|bench``.

Each feature area registers its own sub-commands (``register(subparsers)`` in the
modules listed in ``_COMMAND_MODULES``), so this file stays a thin dispatcher. Building the
parser imports no torch, scanpy, Ray or MLflow (handlers import them when they run), so
``agl --help`` and ``agl --version`` return at once.

Exit codes: 0 success; 2 usage errors (a bad command line or setting: argparse's errors and
``ConfigError``); 1 runtime failures (what was found on disk is wrong: input data, stores,
checkpoints, an existing output (``OutputExistsError``, the same in every command), an
unwritable or full output location, ``DataError`` / ``CheckpointError``, and any unexpected
error); 3 training stopped on a non-finite loss (``NonFiniteLossError``); 130 interrupted (Ctrl-C,
also when it lands inside compiled code, e.g. numba, that reports it as a SystemError).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any, Callable, Sequence

from agl.errors import AGLError, ConfigError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# One example per command, shown at the end of its --help.
EXAMPLES: dict[str, str] = {
    "ingest": "agl ingest her2st ../shared/data/her2st --sections B4 C2 C3 C4 C5 --out stores/her2st",
    "info": "agl info stores/her2st --split kfold-s0-f0",
    "train": "agl train --store demo --method topk:k=1000 --split loso-B4 --out runs/top1000-B4",
    "evaluate": "agl evaluate --store demo --protocol kfold --seeds 0,1,2 --methods pgl,probe,dkgsb --out runs/eval",
    "study": "agl study --quick --out runs/study/results.md --work runs/study/grids",
    "tune": "agl tune --space default --out results/sweep",
    "tune-sync": "agl tune-sync --out results/sweep",
    "train-ray": "agl train-ray --store demo --split loso-B4 --num-workers 2",
    "predict": "agl predict --tracking-uri sqlite:///results/sweep/mlflow.db --input ../shared/data/her2st "
               "--format her2st --sections B4 --out runs/predict-B4",  # B4: the slide the loso-B4 champion never saw
    "features": "agl features --store demo --num-workers 2",
    "bench": "agl bench core --store demo",
    "bench data": "agl bench data --store demo",
    "bench core": "agl bench core --store demo --repeats 3",
    "bench ray": "agl bench ray --store demo --trials 4",
    "bench load": "agl bench load --store demo",
    "bench scale": "agl bench scale --max-n 8 --out results",
    "bench selection": "agl bench selection --store demo --quick --seeds 5 --out results",
    "bench gpu": "agl bench gpu --out results   (CPU check of the command: --device cpu --quick)",
    "bench cohort": "agl bench cohort --copies 1,4,16 --out results",
    "bench search": "agl bench search --store demo --seeds 2 --budgets 8 --searchers tpe,random --out results",
}


class LazyHelp:
    """An option's help made when shown (e.g. read from a registry that imports torch), not when the parser is built."""

    def __init__(self, make: Callable[[], str]):
        self.make = make

    def __str__(self) -> str:
        return self.make()

    def strip(self) -> str:  # argparse tests the help for blankness before formatting it
        return str(self).strip()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every option's help; descriptions and examples keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if isinstance(action.help, LazyHelp):
            return str(action.help)
        # a required option, a flag or an unset option has no default worth printing
        if action.required or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return action.help
        return super()._get_help_string(action)


class ListArg(argparse.Action):
    """A list option written either way: ``--sections A1 B2 C3`` or ``--sections A1,B2,C3`` (or mixed).

    Every value is split at commas, stripped and converted with ``item``; repeating the flag adds to the list.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, item: Callable[[str], Any] = str, **kw: Any):
        self.item = item
        super().__init__(option_strings, dest, nargs="+", **kw)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parts = [v.strip() for value in values for v in str(value).split(",") if v.strip()]
        if not parts:
            raise argparse.ArgumentError(self, "needs at least one value")
        try:
            items = [self.item(v) for v in parts]
        except ValueError:
            raise argparse.ArgumentError(self, f"{' '.join(values)!r}: every value must be "
                                               f"{getattr(self.item, '__name__', 'valid')}") from None
        previous = getattr(namespace, self.dest, None)
        # a default list is replaced by what is typed; a repeated flag extends it
        keep = previous if isinstance(previous, list) and previous is not self.default else []
        setattr(namespace, self.dest, [*keep, *items])


def add_list_arg(parser: Any, *flags: str, item: Callable[[str], Any] = str, **kw: Any) -> argparse.Action:
    """Add a list option (:class:`ListArg`): the one syntax for lists of sections, seeds, folds, methods."""
    metavar = kw.pop("metavar", flags[-1].lstrip("-").split("-")[-1].rstrip("s").upper())
    return parser.add_argument(*flags, action=ListArg, item=item, metavar=metavar, **kw)


def _decorate(parser: argparse.ArgumentParser, name: str) -> None:
    """Defaults in the help, the command's example, and the same for its sub-commands."""
    parser.formatter_class = HelpFormatter
    if name in EXAMPLES and not parser.epilog:
        parser.epilog = f"example:\n  {EXAMPLES[name]}"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child, sub in action.choices.items():
                _decorate(sub, f"{name} {child}".strip())

# Modules that expose ``register(subparsers: argparse._SubParsersAction) -> None``.
# A sub-command's handler is stored as ``func`` in its parser defaults and returns an exit code.
_COMMAND_MODULES = (
    "agl.data.commands",
    "agl.commands",
    "agl.distributed.commands",
    "agl.bench.commands",
)


def build_parser() -> argparse.ArgumentParser:
    from agl import __version__

    parser = argparse.ArgumentParser(
        prog="agl",
        description="Auxiliary Gene Learning: spatial gene expression from H&E, with DkGSB gene selection.",
        epilog="exit codes: 0 success, 2 usage error (arguments, settings), 1 runtime failure (data, stores, "
               "checkpoints, files on disk; also an existing --out, in every command: pass --overwrite or "
               "--resume where offered, or another --out), 3 training diverged (non-finite loss), "
               "130 interrupted\nexample:\n  agl train --store demo --method dkgsb --split loso-B4 --out runs/dkgsb",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-V", "--version", action="version", version=f"agl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # an optional feature area not present in this install
                continue
            raise
        module.register(sub)
    _decorate(parser, "")
    return parser


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def exit_code(err: AGLError) -> int:
    """2 for a usage error (bad settings, ``ConfigError``), 3 for a non-finite training loss, 1 for any
    other runtime failure (data, checkpoints, an existing or unwritable output)."""
    if getattr(err, "exit_code", None) is not None:
        return int(err.exit_code)
    return EXIT_USAGE if isinstance(err, ConfigError) else EXIT_RUNTIME


def _interrupted(err: BaseException) -> bool:
    """Whether ``err`` is, or was caused by, a Ctrl-C: compiled code (numba's dispatcher) that a
    KeyboardInterrupt lands in returns a SystemError "returned a result with an exception set"."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _run(handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, name: str) -> int:
    """Call ``handler(args)``; an AGLError becomes ``name: error: ...`` on stderr and its exit code."""
    try:
        return int(handler(args) or 0)
    except AGLError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return exit_code(err)
    except BaseException as err:  # noqa: BLE001 - interrupts and file-system refusals handled, the rest re-raised
        if _interrupted(err):
            notes = getattr(err, "__notes__", None) or []  # what to do next, added by the handler (add_note)
            print(f"{name}: interrupted" + "".join(f"; {note}" for note in notes), file=sys.stderr)
            return EXIT_INTERRUPTED
        from agl.fileio import write_refusal

        if isinstance(err, OSError) and write_refusal(err) is not None:  # permissions, read-only, full disk
            print(f"{name}: error: {err.filename or 'a file'}: {err.strerror or err}", file=sys.stderr)
            return EXIT_RUNTIME
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return _run(args.func, args, f"agl {args.command}")


def run_script(add_args: Callable[[argparse.ArgumentParser], None],
               handler: Callable[[argparse.Namespace], int | None], description: str,
               argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of a stand-alone script (``launch/*.py``) that runs one sub-command's handler.

    Parses ``argv`` with the options ``add_args`` adds, sets up logging as ``agl`` does and
    returns the handler's exit code (as ``agl``: 2 usage error, 1 runtime failure, 130 after Ctrl-C).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    add_args(parser)
    args = parser.parse_args(argv)
    _setup_logging()
    return _run(handler, args, parser.prog)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
