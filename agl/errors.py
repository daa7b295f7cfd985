"""Error types with messages that name the offending file and the problem."""
from __future__ import annotations

from pathlib import Path


class AGLError(Exception):
    """Base class for errors that the CLI reports cleanly (message, exit code 2, no traceback)."""


class DataError(AGLError):
    """Bad input data: a missing, malformed or inconsistent file.

    The message always starts with the path so a user can find the problem.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(AGLError):
    """Bad configuration: unknown keys, wrong types, values out of range."""

    def __init__(self, source: str | Path | None, problem: str):
        self.source = None if source is None else str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}" if self.source else problem)


class CheckpointError(AGLError):
    """A checkpoint that is truncated, corrupt, unsafe or incompatible with the run."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
