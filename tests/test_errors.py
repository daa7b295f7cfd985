"""agl's exception types survive pickle and copy.copy: Ray and Tune re-raise a remote trial's error that way."""
from __future__ import annotations

import ast
import copy
import importlib
import inspect
import pickle
from pathlib import Path

import pytest

import agl

AGL_ROOT = Path(agl.__file__).parent


def _error_classes() -> list[type[BaseException]]:
    """Every exception class defined in agl's sources (found by reading them, so a new one is tested too)."""
    found = []
    for source in sorted(AGL_ROOT.rglob("*.py")):
        tree = ast.parse(source.read_text())
        names = [node.name for node in tree.body if isinstance(node, ast.ClassDef)
                 and any(isinstance(b, (ast.Name, ast.Attribute)) and
                         (getattr(b, "id", None) or getattr(b, "attr", "")).endswith(("Error", "Exception", "Unsupported",
                                                                                        "Unavailable"))
                         for b in node.bases)]
        if not names:
            continue
        module = importlib.import_module(".".join(source.relative_to(AGL_ROOT.parent).with_suffix("").parts))
        found += [cls for cls in (getattr(module, n) for n in names)
                  if isinstance(cls, type) and issubclass(cls, BaseException)]
    return found


ERROR_CLASSES = _error_classes()


def _instance(cls: type[BaseException]) -> BaseException:
    """An error built as agl code builds it: a file path first where the signature has one."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
              and p.default is p.empty]
    if not params:
        return cls("stores/demo/manifest.json: missing: not an agl store")
    values = {"path": "stores/demo/manifest.json", "source": "--store", "problem": "missing: not an agl store",
              "value": float("inf"), "epoch": 2}  # NonFiniteLossError: numbers (inf, not NaN: NaN != NaN)
    return cls(*[values.get(p.name, f"the {p.name}") for p in params])


def test_every_error_type_is_found() -> None:
    names = {cls.__name__ for cls in ERROR_CLASSES}
    assert {"AGLError", "DataError", "ConfigError", "CheckpointError", "StoreExistsError", "TrackingUnavailable",
            "ForwardModeUnsupported"} <= names, names


@pytest.mark.reliability(kind="fault", case="an agl error raised in a Ray trial on another node (Ray and Tune pickle "
                                            "and copy it to re-raise it in the driver)",
                         outcome="the driver sees the same type, message, file and problem; not TypeError: __init__() "
                                 "missing 1 required positional argument")
@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_error_survives_pickle_and_copy(cls: type[BaseException]) -> None:
    error = _instance(cls)
    for again in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
        assert type(again) is cls
        assert str(again) == str(error)
        assert again.args == error.args
        assert vars(again) == vars(error)  # path, problem, source, operator...
    if hasattr(error, "path"):
        assert str(pickle.loads(pickle.dumps(error))).startswith("stores/demo/manifest.json: ")


def test_error_survives_ray_cloudpickle() -> None:
    """Ray serialises a task's exception with its own cloudpickle; the user's error comes back whole."""
    from ray import cloudpickle

    from agl.errors import DataError

    error = DataError("/home/ray/.cache/agl/stores/her2st-demo/manifest.json", "missing: not an agl store")
    again = cloudpickle.loads(cloudpickle.dumps(error))
    assert (type(again), again.path, again.problem, str(again)) == (DataError, error.path, error.problem, str(error))
