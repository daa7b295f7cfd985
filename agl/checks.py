"""Declaring a setting once: its type, default, allowed values and help, as a dataclass field.

``setting(default, check, help)`` is the one way a value-carrying option is declared, both
for the run settings (:class:`agl.config.TrainConfig`) and for each gate's own options
(``Gate.Options`` in :mod:`agl.selection`). From that one declaration come validation of
config files, ``--set`` and search spaces, and the generated help texts.

A check maps a value to ``None`` (fine) or a short problem ("must be an integer >= 1").
The type of a value is checked against the field's type hint first (:func:`type_problem`),
so a check only states the range. This module imports nothing heavy (no torch): a gate
module and the settings module both import it, and it imports neither.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

Check = Callable[[Any], "str | None"]


def setting(default: Any = None, check: Check | None = None, help: str = "", *,
            factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field carrying its check and help (``factory`` for a list default)."""
    metadata = {"check": check, "help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Setting:
    """One declared setting: what a config file, ``--set`` or a search space may give it."""

    name: str
    hint: Any
    default: Any
    check: Check | None
    help: str

    def problem(self, value: Any, owner: str = "") -> str | None:
        """Why ``value`` is not allowed (type first, then range), or None; ``owner`` prefixes type errors."""
        wrong_type = type_problem(self.hint, value, f"{owner}.{self.name} " if owner else "")
        if wrong_type:
            return wrong_type
        return self.check(value) if self.check is not None else None


def declared(cls: type) -> dict[str, Setting]:
    """The settings a dataclass declares, in order (type hints resolved)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[f.name] = Setting(f.name, hints[f.name], default, f.metadata.get("check"), f.metadata.get("help", ""))
    return out


def first_problem(settings: dict[str, Setting], values: dict[str, Any], owner: str = "") -> tuple[str, str] | None:
    """``(name, "problem (got value)")`` of the first value that its setting rejects, or None."""
    for name, value in values.items():
        problem = settings[name].problem(value, owner)
        if problem:
            return name, f"{problem} (got {value!r})"
    return None


# --------------------------------------------------------------------------- types from hints
def allowed_types(hint: Any) -> tuple[type, ...]:
    """Python types a JSON/YAML value may have for a type hint (an int is a valid float)."""
    import numpy as np  # numpy scalars come out of samplers and arrays

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in allowed_types(arg))
    if origin in (list, tuple) or hint in (list, tuple):
        return (list, tuple)
    if hint is type(None) or hint is None:
        return (type(None),)
    if hint is float:
        return (float, int, np.floating, np.integer)
    if hint is int:
        return (int, np.integer)
    if hint is bool:
        return (bool, np.bool_)
    return (hint,) if isinstance(hint, type) else (object,)


def type_problem(hint: Any, value: Any, label: str = "") -> str | None:
    """``"1.5 has type float; <label>takes ['int']"`` when ``value`` does not fit ``hint``, else None."""
    allowed = allowed_types(hint)
    is_bool = isinstance(value, bool)
    bool_ok = any(t is bool for t in allowed)
    if (is_bool and not bool_ok) or not isinstance(value, allowed):
        names = sorted({t.__name__ for t in allowed if t.__module__ == "builtins"})
        return f"{value!r} has type {type(value).__name__}; {label}takes {names}"
    return None


# --------------------------------------------------------------------------- range checks
def is_int(v: Any) -> bool:
    import numpy as np

    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    import numpy as np

    return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            and math.isfinite(v))


def int_at_least(lo: int) -> Check:
    return lambda v: None if is_int(v) and v >= lo else f"must be an integer >= {lo}"


def num_in(lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        ok = is_number(v) and (v > lo if lo_open else v >= lo)
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if ok:
            return None
        left, right = "(" if lo_open else "[", ")" if hi_open or hi is None else "]"
        return f"must be a number in {left}{lo}, {'inf' if hi is None else hi}{right}"
    return check


def positive(v: Any) -> str | None:
    return num_in(0.0, lo_open=True)(v)


def one_of(*options: str) -> Check:
    return lambda v: None if v in options else f"must be one of {', '.join(options)}"


def one_of_registry(what: str, names: Callable[[], list[str]]) -> Check:
    """A choice among the names of a registry, read when checking (so later registrations count)."""
    def check(v: Any) -> str | None:
        known = names()
        return None if v in known else f"must be one of the registered {what}: {', '.join(known)}"
    return check


def optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def non_empty_string(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "must be a non-empty string"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


# --------------------------------------------------------------------------- numbers in YAML
# YAML 1.1 (PyYAML) reads a float only with a dot ("1.0e-4"); "1e-4" and "1E+3" stay strings.
# YAML 1.2 and JSON read them as numbers, and so does every place agl reads a number.
_EXPONENT_FLOAT = r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"


def _number_loader() -> type:
    import re

    import yaml

    class NumberSafeLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that also reads ``1e-4``, ``1E+3``, ``-2e5`` as floats (YAML 1.2 / JSON numbers)."""

    NumberSafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_EXPONENT_FLOAT),
                                       list("-+0123456789"))
    return NumberSafeLoader


_LOADER: type | None = None


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, except that exponent numbers without a dot (``1e-4``) are floats.

    The one reader of YAML settings: config files, ``--set`` values, ``--method k=v`` options and
    search spaces all go through it. Raises ``yaml.YAMLError`` as ``safe_load`` does.
    """
    import yaml

    global _LOADER
    if _LOADER is None:
        _LOADER = _number_loader()
    NumberSafeLoader = _LOADER  # a yaml.SafeLoader subclass: builds no objects from tags
    return yaml.load(text, Loader=NumberSafeLoader)  # noqa: S506
