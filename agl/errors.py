"""Error types with messages that name the offending file and the problem."""
from __future__ import annotations

from pathlib import Path


def _rebuild(cls: type[BaseException], args: tuple, state: dict) -> BaseException:
    """An exception of ``cls`` with ``args`` and attributes ``state``, without calling ``cls.__init__``."""
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class RebuiltError(BaseException):
    """Mixin: pickle and ``copy.copy`` rebuild the error from its message and attributes.

    BaseException pickles as ``cls(*self.args)``, which fails for an ``__init__`` whose parameters are
    not the message (``DataError(path, problem)``); Ray and Tune pickle a remote trial's error to
    re-raise it in the driver, and the user then saw ``TypeError: __init__() missing ...`` instead."""

    def __reduce__(self) -> tuple:
        return _rebuild, (type(self), self.args, dict(self.__dict__))


class AGLError(RebuiltError, Exception):
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


class OutputExistsError(DataError):
    """An output location that already holds something the command was not asked to replace.

    One rule for every command (ingest, train, evaluate, tune, predict, study): exit 1, a runtime
    failure, since what is on disk decides it (the same command line succeeds with an empty --out);
    the message names the folder and the flag that changes the outcome (--overwrite, --resume).
    """


class ResourceError(AGLError):
    """A run stopped by its machines running out of a resource (memory) more often than it may be restarted."""


class NonFiniteLossError(AGLError):
    """Training met a non-finite loss (NaN or inf): a diverging run or non-finite values in the data.

    The CLI exits with :data:`exit_code` (3), distinct from other failures, so a script can tell a
    diverged run from a broken one. ``outcome`` says what was kept (added by the caller that knows:
    ``agl train`` names the last good checkpoint). Pickles by its fields (worker processes raise it).
    """

    exit_code = 3

    def __init__(self, what: str, value: float, epoch: int, step: int | None = None, lr: float | None = None,
                 outcome: str | None = None):
        self.what, self.value, self.epoch, self.step, self.lr = what, float(value), int(epoch), step, lr
        self.outcome = outcome
        super().__init__(self._message())

    def with_outcome(self, outcome: str) -> "NonFiniteLossError":
        """The same error, saying what was kept (the last good checkpoint, the earlier run)."""
        return NonFiniteLossError(self.what, self.value, self.epoch, self.step, self.lr, outcome)

    def __reduce__(self) -> tuple:
        return (NonFiniteLossError, (self.what, self.value, self.epoch, self.step, self.lr, self.outcome))

    def _message(self) -> str:
        at = f"epoch {self.epoch}" + (f", step {self.step}" if self.step is not None else "")
        lr = f" (lr is {self.lr:g})" if self.lr is not None else ""
        outcome = f"; {self.outcome}" if self.outcome else ""
        return (f"training stopped: the {self.what} is {self.value} at {at}{outcome}. The run diverged or the "
                f"data holds non-finite values: lower the learning rate{lr}, e.g. --set lr=1e-4, or check the "
                f"store's data for NaN/inf values")


def show(value: object) -> str:
    """``value`` as a message shows it: numbers plainly (``nan``, ``0.5``, ``3``), never numpy's repr
    (``np.float64(nan)`` under numpy 2), strings quoted, sequences and arrays element by element."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():  # a numpy scalar or 0-d array
        py = item()
        if isinstance(py, (bool, int, float)):
            return str(value)  # numpy's str is plain and as short as its precision: 0.1 for float32(0.1)
        value = py
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest round-trip form: 0.1, nan, inf
    if isinstance(value, (str, bytes)):
        return repr(value)
    tolist = getattr(value, "tolist", None)
    if callable(tolist):  # numpy arrays, pandas Index/Series: element by element, each shown as above
        value = list(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(show(v) for v in value)
        return f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
    return repr(value)
