"""One small registry for every extension point (gates, backbones, hypergradient estimators, losses, ...).

In the manner of timm's ``register_model``: a :class:`Registry` maps names to things of one kind.
Add an entry with the decorator, or, for a built-in whose module is heavy (torch), as a lazy
``"module:attr"`` string that is imported only when the entry is used, so listing names (help
texts, config checks) imports nothing::

    from agl.registry import Registry

    LOSSES: Registry[LossFn] = Registry("loss", setting="loss")

    @LOSSES.register("pcc")              # a decorator ...
    def pearson_loss(pred, target): ...

    LOSSES.register("mse", mse_loss)     # ... or a plain call
    LOSSES.register_lazy("huber", "mypackage.losses:huber")   # imported on first use

    LOSSES.names()        # ['pcc', 'mse', 'huber'], registration order, imports nothing
    LOSSES.get("pcc")     # the function; an unknown name is a ConfigError naming `setting` and the known names

A registry is a read-only ``Mapping`` too (``name in R``, ``R[name]``, ``list(R)``, ``R.items()``),
so code written against the dicts it replaces keeps working. This module imports only the
standard library and ``agl.errors``.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar, overload

from agl.errors import ConfigError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one ``kind``; ``setting`` is the config key or flag that errors name."""

    def __init__(self, kind: str, setting: str | None = None):
        self.kind = kind
        self.setting = setting
        self._entries: dict[str, Any] = {}   # name -> the object, or a _Lazy "module:attr"

    # -- adding ------------------------------------------------------------------------------
    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: Any = None) -> Any:
        """Add ``obj`` under ``name``; without ``obj``, a decorator that adds what it decorates.

        A name is registered once; the module that a lazy entry points at may register the same
        object itself when it is imported (its decorator), which fills the lazy entry in.
        """
        if obj is None:
            return lambda target: self.register(name, target)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind}: a name must be a non-empty string, got {name!r}")
        existing = self._entries.get(name)
        if existing is not None and not (isinstance(existing, _Lazy) and existing.names(obj)):
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = obj
        return obj

    def register_lazy(self, name: str, target: str) -> None:
        """Add ``"module:attr"`` under ``name``, imported when first used."""
        module, sep, attr = target.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"{self.kind} {name!r}: a lazy entry must look like 'module:attr', got {target!r}")
        existing = self._entries.get(name)
        if existing is not None and not (isinstance(existing, _Lazy) and existing.target == target):
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = _Lazy(target)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a plug-in's tests clean up after themselves)."""
        self._entries.pop(name, None)

    def pop(self, name: str, default: Any = None) -> Any:
        """Remove ``name`` and return its entry (``dict.pop`` for code written against the old dicts)."""
        if name not in self._entries:
            return default
        value = self[name]
        del self._entries[name]
        return value

    # -- reading -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The registered names in registration order (imports nothing)."""
        return list(self._entries)

    def get(self, name: str, default: Any = ...) -> T:  # type: ignore[override]
        """The entry ``name``, imported if lazy; unknown: ``default`` if given, else a ConfigError listing the names."""
        if name not in self._entries:
            if default is not ...:
                return default
            raise ConfigError(self.setting, f"unknown {self.kind} {name!r}; known: {', '.join(self._entries) or 'none'}")
        return self[name]

    def __getitem__(self, name: str) -> T:
        entry = self._entries[name]
        if isinstance(entry, _Lazy):
            entry = entry.load()
            if isinstance(self._entries.get(name), _Lazy):  # the module did not register it itself
                self._entries[name] = entry
            entry = self._entries[name]
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


class _Lazy:
    """A ``"module:attr"`` entry, imported on first use."""

    def __init__(self, target: str):
        self.target = target

    def load(self) -> Any:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def names(self, obj: Any) -> bool:
        """Whether ``obj`` is what this entry points at (its module registering it on import)."""
        return f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', '')}" == self.target


__all__ = ["Registry"]
