"""Search spaces for the gene-subset sweep: YAML files in ``agl/search_spaces/``.

A space file names the training settings to search (``params``), the ones to hold
fixed (``fixed``), the data split, the metric and the scheduler::

    split: kfold-s0-f0
    metric: val_pcc            # reported by agl.training.loop.fit every epoch
    direction: max             # max or min: whether a larger metric is better
    num_samples: 8
    scheduler: {name: asha, grace_period: 2, reduction_factor: 2}
    fixed:   {mode: features, epochs: 6}
    params:
      method:       {type: categorical, choices: [dkgsb, topk, pgl]}
      k:            {type: int, low: 16, high: 2000, log: true}
      lr:           {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
      trunk_width:  {type: categorical, choices: [128, 256, 512]}

Distributions follow Optuna's ``suggest_*`` vocabulary (``float``, ``int``,
``categorical``, with ``log`` and ``step``), so an Optuna user reads them as is.
Every key must be a setting of :mod:`agl.config` (a run setting or a registered gate's
option, or a derived key such as ``trunk_width``), and every value a space can produce
is checked by that same schema when the file is loaded, so a bad space fails before any
trial runs. The metric direction is ``direction`` (the YAML key ``mode`` is its old
name: it is still read, with a deprecation warning, as ``mode`` under ``fixed`` is the
training mode, features or finetune).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from agl.config import TrainConfig, all_settings
from agl.errors import AGLError, ConfigError

log = logging.getLogger(__name__)

SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"  # shipped in the wheel
DIST_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
SCHEDULERS = {"asha": {"name", "grace_period", "reduction_factor"}, "fifo": {"name"}}
METRIC_MODES = ("max", "min")

# Search keys that are not TrainConfig fields but expand into one (Optuna cannot sample lists).
DERIVED: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "trunk_width": ("trunk", lambda v: [int(v)]),
}


@dataclass(frozen=True)
class Distribution:
    """One searched setting: ``float``/``int`` over [low, high] (optionally log/step) or ``categorical``."""

    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def contains(self, value: Any) -> bool:
        """Whether the distribution can produce ``value``."""
        if self.type == "categorical":
            return value in self.choices
        if not _is_number(value) or (self.type == "int" and not float(value).is_integer()):
            return False
        return self.low <= value <= self.high

    def candidates(self) -> list[Any]:
        """Values that bound what the distribution can produce (checked against TrainConfig)."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]

    def to_tune(self) -> Any:
        """The equivalent ``ray.tune`` sampler (``OptunaSearch`` converts it back to Optuna)."""
        from ray import tune

        if self.type == "categorical":
            return tune.choice(list(self.choices))
        if self.type == "int":
            if self.step and self.step != 1:
                return tune.qrandint(int(self.low), int(self.high), int(self.step))
            # tune.randint / lograndint exclude the upper bound; YAML bounds are inclusive
            return (tune.lograndint if self.log else tune.randint)(int(self.low), int(self.high) + 1)
        if self.step:
            return (tune.qloguniform if self.log else tune.quniform)(self.low, self.high, self.step)
        return (tune.loguniform if self.log else tune.uniform)(self.low, self.high)


@dataclass(frozen=True)
class SearchSpace:
    """A validated search-space file."""

    source: str
    params: dict[str, Distribution]
    fixed: dict[str, Any] = field(default_factory=dict)
    split: str = "kfold-s0-f0"
    metric: str = "val_pcc"
    mode: str = "max"  # the metric direction (YAML key ``direction``; Ray Tune calls it mode)
    num_samples: int = 8
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "asha"})
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1})
    seed: int = 0
    description: str = ""
    # complete parameter sets of the first trials (from partial ones in the file, see _default_value);
    # Optuna runs them first, then samples
    start_with: tuple[dict[str, Any], ...] = ()

    def tune_space(self) -> dict[str, Any]:
        """The Tune ``param_space`` (searched keys only; fixed values are merged per trial)."""
        return {name: dist.to_tune() for name, dist in self.params.items()}

    def train_config(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """TrainConfig keyword arguments for one trial: fixed values, then sampled, derived keys expanded."""
        return expand({**self.fixed, **{k: v for k, v in sampled.items() if k in self.params}})


# YAML top-level keys: SearchSpace's fields, with the direction under its own name
DIRECTION_KEY, OLD_DIRECTION_KEY = "direction", "mode"
TOP_KEYS = {f.name for f in dataclasses.fields(SearchSpace)} - {"source", "mode"} | {DIRECTION_KEY}


def expand(values: Mapping[str, Any]) -> dict[str, Any]:
    """Replace derived search keys (``trunk_width``) by the TrainConfig fields they set."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in DERIVED:
            target, convert = DERIVED[key]
            out[target] = convert(value)
        else:
            out[key] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """numpy scalars from samplers -> plain Python values (TrainConfig holds JSON values)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, tuple, dict, str)) else value


def resolve_space_path(name_or_path: str | Path) -> Path:
    """A path as given, or a bundled space by name (``tiny`` -> agl/search_spaces/tiny.yaml)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return SPACES_DIR / f"{name_or_path}.yaml"


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Read and validate a space file; raise :class:`ConfigError` naming the file and key."""
    path = resolve_space_path(name_or_path)
    if not path.is_file():
        available = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
        raise ConfigError(path, f"search space not found (bundled spaces: {', '.join(available)})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(path, f"not valid YAML: {err}") from None
    return parse_space(raw, source=str(path))


def parse_space(raw: Any, source: str = "<space>") -> SearchSpace:
    """Validate a space already parsed from YAML (a dict)."""
    err = _Errors(source)
    if not isinstance(raw, dict):
        raise err("top level must be a mapping with 'params' (and optionally 'fixed', 'split', ...)")
    direction_key = _direction_key(err, raw, source)
    unknown = sorted(set(raw) - TOP_KEYS - {direction_key})
    if unknown:
        raise err(f"unknown top-level key(s) {unknown}; allowed: {sorted(TOP_KEYS)}")
    fields = all_settings()
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise err("fixed: must be a mapping of TrainConfig fields to values")
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise err("params: must be a non-empty mapping of setting -> distribution")
    for key in list(fixed) + list(params_raw):
        if key not in fields and key not in DERIVED:
            raise err(f"{'fixed' if key in fixed else 'params'}.{key}: unknown setting; "
                      f"TrainConfig fields are {sorted(fields)} (plus {sorted(DERIVED)})")
    both = sorted(set(fixed) & set(params_raw))
    if both:
        raise err(f"{both} appear in both 'fixed' and 'params'")
    params = {key: _parse_dist(err, f"params.{key}", spec) for key, spec in params_raw.items()}

    # every value the space can produce must make a valid TrainConfig
    fixed_expanded = expand(fixed)
    _check_config(err, "fixed", fixed_expanded)
    for key, dist in params.items():
        for value in dist.candidates():
            _check_config(err, f"params.{key}={value!r}", {**fixed_expanded, **expand({key: value})})

    metric = raw.get("metric", "val_pcc")
    mode = raw.get(direction_key, "max")
    if not isinstance(metric, str):
        raise err("metric: must be a metric name such as 'val_pcc'")
    if mode not in METRIC_MODES:
        hint = " (the training mode goes under 'fixed' or 'params')" if mode in ("features", "finetune") else ""
        raise err(f"{direction_key}: must be one of {METRIC_MODES}, got {mode!r}{hint}")
    num_samples = raw.get("num_samples", 8)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise err(f"num_samples: must be a positive integer, got {num_samples!r}")
    split = raw.get("split", "kfold-s0-f0")
    if not isinstance(split, str) or not split:
        raise err(f"split: must be a split name such as 'kfold-s0-f0', got {split!r}")
    scheduler = _parse_scheduler(err, raw.get("scheduler", {"name": "asha"}))
    resources = raw.get("resources", {"cpu": 1})
    if not isinstance(resources, dict) or not all(
        k in ("cpu", "gpu") and _is_number(v) and v >= 0 for k, v in resources.items()
    ):
        raise err(f"resources: must map 'cpu'/'gpu' to non-negative numbers, got {resources!r}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise err(f"seed: must be an integer, got {seed!r}")
    start_with = _parse_start_with(err, raw.get("start_with") or [], params, fixed_expanded)
    if len(start_with) > num_samples:
        raise err(f"start_with: {len(start_with)} pinned trials but num_samples is {num_samples}")
    return SearchSpace(
        source=source, params=params, fixed=dict(fixed), split=split, metric=metric, mode=mode,
        num_samples=num_samples, scheduler=scheduler, resources=dict(resources), seed=seed,
        description=str(raw.get("description", "")), start_with=start_with,
    )


def _direction_key(err: "_Errors", raw: Mapping[str, Any], source: str) -> str:
    """``direction``, or its old name ``mode`` (read with a deprecation warning); never both."""
    if OLD_DIRECTION_KEY not in raw:
        return DIRECTION_KEY
    if DIRECTION_KEY in raw:
        raise err(f"both '{DIRECTION_KEY}' and its old name '{OLD_DIRECTION_KEY}' are given; keep '{DIRECTION_KEY}'")
    log.warning("%s: top-level '%s' is deprecated; write '%s: %s' (the metric direction)", source,
                OLD_DIRECTION_KEY, DIRECTION_KEY, raw[OLD_DIRECTION_KEY])
    return OLD_DIRECTION_KEY


def _parse_start_with(err: "_Errors", raw: Any, params: Mapping[str, Distribution],
                      fixed: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """``start_with``: a list of partial settings for the first trials, each inside its distribution."""
    if not isinstance(raw, list):
        raise err("start_with: must be a list of mappings of searched settings to values")
    points = []
    for i, point in enumerate(raw):
        where = f"start_with[{i}]"
        if not isinstance(point, dict) or not point:
            raise err(f"{where}: must be a non-empty mapping of searched settings to values")
        for key, value in point.items():
            if key not in params:
                raise err(f"{where}.{key}: not a searched setting (params are {sorted(params)})")
            if not params[key].contains(value):
                raise err(f"{where}.{key}: {value!r} is outside its distribution {params[key]}")
        full = {key: point[key] if key in point else _default_value(key, dist) for key, dist in params.items()}
        _check_config(err, where, {**fixed, **expand(full)})
        points.append(full)
    return tuple(points)


def _default_value(key: str, dist: Distribution) -> Any:
    """A pinned trial's value for a key it leaves open (Ray's OptunaSearch needs complete points):
    TrainConfig's default when the distribution allows it, else the distribution's centre."""
    target = DERIVED[key][0] if key in DERIVED else key
    default = getattr(TrainConfig(), target, None)
    if key in DERIVED and isinstance(default, list) and len(default) == 1:
        default = default[0]
    if dist.contains(default):
        return default
    if dist.type == "categorical":
        return dist.choices[0]
    centre = math.sqrt(dist.low * dist.high) if dist.log else (dist.low + dist.high) / 2
    return int(round(centre)) if dist.type == "int" else float(centre)


class _Errors:
    """Builds ConfigErrors that name the space file."""

    def __init__(self, source: str):
        self.source = source

    def __call__(self, problem: str) -> ConfigError:
        return ConfigError(self.source, problem)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_dist(err: _Errors, where: str, spec: Any) -> Distribution:
    if not isinstance(spec, dict) or "type" not in spec:
        raise err(f"{where}: must be a mapping with 'type' (one of {sorted(DIST_KEYS)})")
    kind = spec["type"]
    if kind not in DIST_KEYS:
        raise err(f"{where}: unknown distribution type {kind!r}; use one of {sorted(DIST_KEYS)}")
    unknown = sorted(set(spec) - DIST_KEYS[kind])
    if unknown:
        raise err(f"{where}: unknown key(s) {unknown} for type {kind!r}; allowed: {sorted(DIST_KEYS[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise err(f"{where}: 'choices' must be a non-empty list")
        for choice in choices:
            if not (choice is None or isinstance(choice, (bool, int, float, str))):
                raise err(f"{where}: choice {choice!r} is not a scalar (Optuna samples None/bool/int/float/str; "
                          f"use trunk_width for the trunk)")
        return Distribution("categorical", choices=tuple(choices))
    bounds = {}
    for key in ("low", "high"):
        if key not in spec:
            raise err(f"{where}: missing '{key}'")
        value = spec[key]
        if isinstance(value, str):
            hint = " (YAML reads 1e-4 as text; write 1.0e-4)" if _looks_numeric(value) else ""
            raise err(f"{where}.{key}: expected a number, got the string {value!r}{hint}")
        if not _is_number(value) or not math.isfinite(value):
            raise err(f"{where}.{key}: expected a finite number, got {value!r}")
        if kind == "int" and not float(value).is_integer():
            raise err(f"{where}.{key}: int distribution needs integer bounds, got {value!r}")
        bounds[key] = value
    low, high = bounds["low"], bounds["high"]
    if low >= high:
        raise err(f"{where}: low ({low}) must be < high ({high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise err(f"{where}.log: must be true or false, got {log!r}")
    if log and low <= 0:
        raise err(f"{where}: log scale needs positive bounds, got low={low}")
    step = spec.get("step")
    if step is not None:
        if not _is_number(step) or step <= 0:
            raise err(f"{where}.step: must be a positive number, got {step!r}")
        if log and kind == "int" and step != 1:
            raise err(f"{where}: int with log=true cannot use step != 1 (as in Optuna)")
    return Distribution(kind, low=low, high=high, log=log, step=step)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _parse_scheduler(err: _Errors, spec: Any) -> dict[str, Any]:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or spec.get("name") not in SCHEDULERS:
        raise err(f"scheduler: must name one of {sorted(SCHEDULERS)}, got {spec!r}")
    unknown = sorted(set(spec) - SCHEDULERS[spec["name"]])
    if unknown:
        raise err(f"scheduler: unknown key(s) {unknown} for {spec['name']!r}")
    for key in ("grace_period", "reduction_factor"):
        if key in spec and (not isinstance(spec[key], int) or isinstance(spec[key], bool) or spec[key] < 1):
            raise err(f"scheduler.{key}: must be a positive integer, got {spec[key]!r}")
    return dict(spec)


def _check_config(err: _Errors, where: str, values: dict[str, Any]) -> None:
    """Validate through the settings schema (agl.config) so its rejections surface at load time."""
    try:
        TrainConfig.from_dict(values)
    except AGLError as exc:
        raise err(f"{where}: TrainConfig rejects it: {getattr(exc, 'problem', None) or exc}") from None


__all__ = [
    "Distribution", "SearchSpace", "DERIVED", "SPACES_DIR", "expand",
    "load_space", "parse_space", "resolve_space_path",
]
