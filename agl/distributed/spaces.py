"""Search spaces for the gene-subset sweep: YAML files in ``search_spaces/`` (the repository's top level;
an installed wheel carries them as ``agl/search_spaces/``).

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
training mode, features or finetune). A setting
that only some methods use says so with ``when`` (``tau: {type: float, ..., when: {method:
[dkgsb]}}``): the space is sampled define-by-run (Optuna suggests ``tau`` only in trials whose
``method`` is listed), so a PGL trial neither searches nor logs k, tau or outer_lr.

Cross-validated objective (``cv``): the outer ``split`` names the sweep's test part (``loso-B4``:
slide B4), which no trial ever sees; each trial trains on the folds
:func:`agl.data.splits.inner_folds` cuts from the remaining spots and reports ``cv_pcc`` (the
mean of the folds' held-out PCC) and ``cv_pcc_se`` (its standard error)::

    split: loso-B4
    metric: cv_pcc
    cv: {kind: loso}                   # or {kind: spatial, folds: 3, seed: 0}; max_folds: N
    min_bilevel_epochs: 3              # every DkGSB fold runs at least 3 bi-level epochs

With ``cv`` the scheduler counts folds (ASHA's ``grace_period`` is in folds) and the pinned
``start_with`` trials are never stopped early; after the search the best configuration is
refit on every non-test spot and scored once on the test part (the champion).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from agl.checks import load_yaml
from agl.config import TrainConfig, all_settings
from agl.errors import AGLError, ConfigError

log = logging.getLogger(__name__)

def _spaces_dir() -> Path:
    """``agl/search_spaces`` in an installed wheel (setup.py maps the top-level folder there), else the checkout's."""
    packaged = Path(__file__).resolve().parents[1] / "search_spaces"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "search_spaces"


SPACES_DIR = _spaces_dir()
DIST_KEYS = {
    "float": {"type", "low", "high", "log", "step", "when"},
    "int": {"type", "low", "high", "log", "step", "when"},
    "categorical": {"type", "choices", "when"},
}
CV_KEYS = {"kind", "folds", "seed", "max_folds"}
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
    when: tuple[tuple[str, tuple], ...] = ()   # ((setting, allowed values), ...): sampled only then

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether this setting is searched in a trial whose earlier settings are ``values``."""
        return all(key in values and values[key] in allowed for key, allowed in self.when)

    def suggest(self, trial: Any, name: str) -> Any:
        """Ask an Optuna trial (define-by-run) for this setting's value."""
        if self.type == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)

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
    # complete parameter sets of the first trials (from partial ones in the file, see default_value);
    # Optuna runs them first, then samples
    start_with: tuple[dict[str, Any], ...] = ()
    cv: dict[str, Any] | None = None       # cross-validation folds (see the module docstring); None: one split
    min_bilevel_epochs: int = 0
    max_concurrent: int | None = None      # trials at once; None: from the resources of a local Ray, else num_samples

    def define_by_run(self) -> "DefineByRun":
        """The Optuna define-by-run function of this space (conditional settings only where active)."""
        return DefineByRun(dict(self.params))

    def active_params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` without the settings their trial does not use (for pinned trials and tables)."""
        kept: dict[str, Any] = {}
        for name, dist in self.params.items():
            if name in values and dist.active(kept):
                kept[name] = values[name]
        return kept

    def tune_space(self) -> dict[str, Any]:
        """The Tune ``param_space`` (searched keys only; fixed values are merged per trial)."""
        return {name: dist.to_tune() for name, dist in self.params.items()}

    def train_config(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """TrainConfig keyword arguments for one trial: fixed values, then sampled, derived keys expanded."""
        return expand({**self.fixed, **{k: v for k, v in sampled.items() if k in self.params}})


# YAML top-level keys: SearchSpace's fields, with the direction under its own name
DIRECTION_KEY, OLD_DIRECTION_KEY = "direction", "mode"
TOP_KEYS = {f.name for f in dataclasses.fields(SearchSpace)} - {"source", "mode"} | {DIRECTION_KEY}


class DefineByRun:
    """Optuna define-by-run space for Ray's ``OptunaSearch(space=...)``: settings in file order,
    each suggested only when its ``when`` conditions hold (a picklable object, saved with the sweep)."""

    def __init__(self, params: Mapping[str, Distribution]):
        self.params = dict(params)

    def __call__(self, trial: Any) -> None:
        values: dict[str, Any] = {}
        for name, dist in self.params.items():
            if dist.active(values):
                values[name] = dist.suggest(trial, name)
        return None


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
    """A path as given, or a bundled space by name (``tiny`` -> search_spaces/tiny.yaml)."""
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
        raw = load_yaml(path.read_text())  # 1e-4 is a number, as in YAML 1.2
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
    _check_conditions(err, params)

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
    cv = _parse_cv(err, raw.get("cv"), split)
    if cv is not None and not metric.startswith("cv_"):
        raise err(f"metric: with cv the trials report the fold mean 'cv_pcc' (and 'cv_pcc_se'), got {metric!r}")
    if cv is None and metric.startswith("cv_"):
        raise err(f"metric: {metric!r} needs a 'cv' section (cross-validation folds)")
    min_bilevel = raw.get("min_bilevel_epochs", 0)
    if not isinstance(min_bilevel, int) or isinstance(min_bilevel, bool) or min_bilevel < 0:
        raise err(f"min_bilevel_epochs: must be a non-negative integer, got {min_bilevel!r}")
    _check_bilevel_budget(err, min_bilevel, params, fixed_expanded)
    if len(start_with) > num_samples:
        raise err(f"start_with: {len(start_with)} pinned trials but num_samples is {num_samples}")
    max_concurrent = raw.get("max_concurrent")
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or isinstance(max_concurrent, bool)
                                       or max_concurrent < 1):
        raise err(f"max_concurrent: must be a positive integer (trials at once), got {max_concurrent!r}")
    return SearchSpace(
        source=source, params=params, fixed=dict(fixed), split=split, metric=metric, mode=mode,
        num_samples=num_samples, scheduler=scheduler, resources=dict(resources), seed=seed,
        description=str(raw.get("description", "")), start_with=start_with, cv=cv,
        min_bilevel_epochs=min_bilevel, max_concurrent=max_concurrent,
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


def _check_conditions(err: "_Errors", params: Mapping[str, Distribution]) -> None:
    """``when`` names a categorical setting listed earlier and values among its choices."""
    seen: list[str] = []
    for name, dist in params.items():
        for key, allowed in dist.when:
            if key not in seen or params[key].type != "categorical":
                raise err(f"params.{name}.when: {key!r} must be a categorical setting listed before {name!r}")
            outside = [v for v in allowed if v not in params[key].choices]
            if outside:
                raise err(f"params.{name}.when.{key}: {outside} are not among its choices {list(params[key].choices)}")
        seen.append(name)


def _parse_cv(err: "_Errors", raw: Any, split: str) -> dict[str, Any] | None:
    """``cv: {kind: loso | spatial | kfold, folds: N, seed: S, max_folds: M}``."""
    if raw is None:
        return None
    from agl.data.splits import SPLIT_KINDS

    if not isinstance(raw, dict) or raw.get("kind") not in SPLIT_KINDS:
        raise err(f"cv: must be a mapping with kind one of {tuple(SPLIT_KINDS)}, got {raw!r}")
    unknown = sorted(set(raw) - CV_KEYS)
    if unknown:
        raise err(f"cv: unknown key(s) {unknown}; allowed: {sorted(CV_KEYS)}")
    cv = {"kind": raw["kind"], "folds": raw.get("folds", 3), "seed": raw.get("seed", 0),
          "max_folds": raw.get("max_folds")}
    for key, low in (("folds", 3), ("seed", 0), ("max_folds", 2)):
        value = cv[key]
        if value is None and key == "max_folds":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise err(f"cv.{key}: must be an integer >= {low}, got {value!r}")
    return cv


def _check_bilevel_budget(err: "_Errors", min_bilevel: int, params: Mapping[str, Distribution],
                          fixed: Mapping[str, Any]) -> None:
    """Early stopping (patience) must leave every bi-level method at least ``min_bilevel`` outer epochs."""
    from agl.selection import gates_with
    from agl.training.loop import TrainConfig
    from agl.training.schedules import first_bilevel_epoch

    methods = params["method"].choices if "method" in params else (fixed.get("method", TrainConfig().method),)
    # methods whose gate has outer parameters trained by bi-level steps
    if not min_bilevel or not any(m in gates_with(bilevel=True) for m in methods):
        return
    cfg = TrainConfig.from_dict(dict(fixed))
    first = first_bilevel_epoch(cfg)
    guaranteed = min(cfg.epochs, cfg.patience + 1) - first             # patience ends a run no sooner
    if guaranteed < min_bilevel:
        raise err(f"min_bilevel_epochs: {min_bilevel} bi-level epochs, but epochs={cfg.epochs}, "
                  f"patience={cfg.patience} and schedule={cfg.schedule} guarantee only {guaranteed}; "
                  f"raise fixed.epochs / fixed.patience")


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
        full: dict[str, Any] = {}
        for key, dist in params.items():   # in file order, so conditions see the settings they name
            if dist.active(full):
                full[key] = point[key] if key in point else default_value(key, dist, fixed.get("mode"))
        unused = sorted(set(point) - set(full))
        if unused:
            raise err(f"{where}: {unused} are not used by this trial (their 'when' conditions do not hold)")
        _check_config(err, where, {**fixed, **expand(full)})
        points.append(full)
    return tuple(points)


def default_value(key: str, dist: Distribution, mode: str | None = None) -> Any:
    """A pinned trial's value for a key it leaves open (Ray's OptunaSearch needs complete points):
    TrainConfig's default in the space's training ``mode`` when the distribution allows it, else the
    distribution's centre."""
    target = DERIVED[key][0] if key in DERIVED else key
    # the mode picks some defaults (agl.config.MODE_DEFAULTS): a finetune space's pinned trial gets finetune's
    default = getattr(TrainConfig(**({"mode": mode} if mode else {})), target, None)
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
    when = _parse_when(err, where, spec.get("when"))
    dist = _parse_bounds(err, where, kind, {k: v for k, v in spec.items() if k != "when"})
    return Distribution(**{**dist.__dict__, "when": when})


def _parse_when(err: "_Errors", where: str, raw: Any) -> tuple[tuple[str, tuple], ...]:
    """``when: {method: [dkgsb, topk]}`` (a single value may stand for a one-element list)."""
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        raise err(f"{where}.when: must map a categorical setting to the values it is used with")
    return tuple((str(k), tuple(v if isinstance(v, list) else [v])) for k, v in raw.items())


def _parse_bounds(err: _Errors, where: str, kind: str, spec: dict[str, Any]) -> Distribution:
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
            hint = " (a quoted number is text; write it without quotes)" if _looks_numeric(value) else ""
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
    "DefineByRun", "Distribution", "SearchSpace", "DERIVED", "SPACES_DIR", "expand",
    "load_space", "parse_space", "resolve_space_path",
]
