"""The run settings schema: :class:`TrainConfig`, and the registries its help and errors name.

Every setting of a training run is declared once, as a field made by
:func:`agl.checks.setting` (type hint, default, check, help). Two places declare them:

- the run settings: the fields of :class:`TrainConfig` below (loop, optimiser, model, data);
- each gate's own options: the ``Options`` dataclass next to the gate's code in
  :mod:`agl.selection` (``k``, ``tau``, ``per_gene``, ...), registered with the gate;
- each hypergradient estimator's options: the dataclass registered with it
  (``agl.training.bilevel.register_estimator``; ``ift_iters``, ``ift_damping``, ``ift_alpha``).

``TrainConfig`` is flat: gate and estimator options are read and written like run settings
(``cfg.k``, ``{"method": "topk", "k": 100}``), ``from_dict`` rejects a key that neither
declares, and every value is checked by its declaration. Config files, ``--set``,
``--method topk:k=100``, search spaces (:mod:`agl.distributed.spaces`, which checks
every value a space can produce through :func:`check_settings`) and the generated help
(:func:`describe_settings`) all read this one schema.

Adding a run setting is a one-place edit: add one line to the run-settings block of
``TrainConfig``, e.g.::

    hypergrad: str = setting("reverse", one_of("reverse", "forward"), "how outer gradients are computed")

It is then accepted by config files, ``--set``, ``result.json``'s config and search
spaces, validated everywhere, and listed by ``describe_settings()``. Then read it where
it is used (``cfg.hypergrad``). A setting that must be equal for a checkpoint to be
resumed also goes into ``agl.training.checkpoint.ARCHITECTURE_KEYS``.

Adding a gate or estimator option: a field in its options dataclass; nothing here changes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agl.checks import (
    Setting,
    boolean,
    declared,
    first_problem,
    int_at_least,
    non_empty_string,
    num_in,
    one_of,
    one_of_registry,
    optional,
    positive,
    setting,
)
from agl.errors import ConfigError


# --------------------------------------------------------------------------- registries
def list_gates() -> list[str]:
    """Names of the registered gates (``method`` values), in registration order."""
    from agl.selection import GATES

    return GATES.names()


def list_backbones() -> list[str]:
    """Names of the registered backbones (``backbone`` values)."""
    from agl.models.backbones import BACKBONES

    return sorted(BACKBONES)


def list_readers() -> list[str]:
    """Names of the registered slide readers (``agl ingest FORMAT``, ``agl predict --format``)."""
    from agl.data.readers import READERS

    return sorted(READERS)


def list_hypergradients() -> list[str]:
    """Names of the hypergradient estimators (``hypergrad`` values)."""
    from agl.training.bilevel import ESTIMATORS

    return ESTIMATORS.names()


def list_losses() -> list[str]:
    """Names of the training losses (``loss`` values)."""
    from agl.training.losses import LOSSES

    return LOSSES.names()


def list_schedules() -> list[str]:
    """Names of the schedules (``schedule`` values)."""
    from agl.training.schedules import SCHEDULES

    return SCHEDULES.names()


def _trunk(v: Any) -> str | None:
    from agl.checks import is_int

    ok = isinstance(v, (list, tuple)) and all(is_int(x) and x >= 1 for x in v)
    return None if ok else "must be a list of positive layer widths, e.g. [512] (or [] for none)"


def _device(v: Any) -> str | None:
    ok = isinstance(v, str) and (v in ("auto", "cpu", "cuda", "mps") or v.startswith("cuda:"))
    return None if ok else "must be auto, cpu, cuda, cuda:N or mps"


# --------------------------------------------------------------------------- the schema
# Defaults that depend on the training mode (a setting given explicitly always wins). In features mode a
# bi-level step is cheap, and DkGSB's threshold only moves on signal with a larger outer budget: the outer
# objective on every outer-validation spot, 512-spot batches, 10 outer steps per bi-level pass, each averaging
# 2 batches' hypergradients, outer_lr 0.01 (agl bench selection, docs/results.md "DkGSB on the sharper
# benchmark": k 1,000 -> 365 mean on seeds 0-4, beating PGL and AGL-all with p < 0.001; with the settings'
# own defaults t did not leave t_init). Finetune mode keeps them: 512-spot outer batches through the backbone
# cost 8x the memory of 64, and the full outer objective a backbone pass over every validation patch per step.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "features": {"outer_val": "full", "bilevel_batch_size": 512, "outer_steps": 10, "hypergrad_batches": 2,
                 "outer_lr": 0.01},
}


@dataclass(init=False, eq=False, repr=False)
class TrainConfig:
    """Every setting of one training run; every value is a plain JSON value (MLflow/Tune log it).

    The fields are the run settings; the options of the registered gates and hypergradient
    estimators are held beside them and read as attributes too (``cfg.k``, ``cfg.ift_iters``). Build one with ``from_dict`` (checked,
    errors name the key) or ``TrainConfig(**values)`` (checked by ``validate``/``fit``).
    """

    # ---- run settings: one line per setting (see the module docstring) ----
    method: str = setting("dkgsb", one_of_registry("gates", list_gates), "gene-selection method (a registered gate)")
    lr: float = setting(1e-3, positive, "learning rate of the model (Adam)")
    outer_lr: float = setting(3e-3, positive, "learning rate of the gate's outer parameters (Adam)")
    inner_steps: int = setting(2, int_at_least(1), "unrolled inner steps per hypergradient")
    inner_optimizer: str = setting("adam", one_of("adam", "sgd"), "optimiser of the unrolled inner steps")
    first_order: bool = setting(False, boolean, "drop second-order terms of the hypergradient")
    hypergrad: str = setting("unroll", one_of_registry("hypergradient estimators", list_hypergradients),
                             "estimator of the unrolled hypergradient: unroll (reverse), checkpointed (reverse, "
                             "memory flat in H), first_order (Hessian-free), forward (forward mode, for few outer "
                             "scalars), forward_fd (forward mode with finite-difference Hessian-vector products, no "
                             "activation tangents: for fine-tuning), ift_cg / ift_neumann (implicit)")
    inner_state: str = setting("fresh", one_of("fresh", "warm"),
                               "inner Adam per outer step: fresh = zero moments (the authors' release), "
                               "warm = the training optimiser's moments")
    outer_val: str = setting("batch", one_of("batch", "full"),
                             "outer objective on one validation batch per step, or on the whole outer-validation part")
    hypergrad_batches: int = setting(1, int_at_least(1), "training batches whose hypergradients each outer step averages")
    outer_steps: int | None = setting(None, optional(int_at_least(1)),
                                      "outer steps per bi-level pass; null = one pass over the training spots")
    tau_anneal_steps: int | None = setting(None, optional(int_at_least(1)),
                                           "outer steps from tau to tau_final; null = agl.training.loop.tau_horizon")
    val_outer_fraction: float = setting(0.0, num_in(0.0, 1.0, hi_open=True),
                                        "share of validation spots carved into val_outer (the threshold's "
                                        "objective) when the split has none; 0 = outer steps use val")
    schedule: str = setting("interleaved", one_of_registry("schedules", list_schedules), "when bi-level passes run")
    epochs: int = setting(100, int_at_least(1), "maximum number of epochs")
    patience: int = setting(20, int_at_least(1), "epochs without a better validation PCC before stopping")
    batch_size: int = setting(128, int_at_least(2), "batch size of ordinary training steps")
    bilevel_batch_size: int = setting(64, int_at_least(2), "batch size of bi-level (outer) steps")
    loss: str = setting("pcc", one_of_registry("losses", list_losses), "per-gene training loss")
    mode: str = setting("features", one_of("features", "finetune"),
                        "features: frozen cached backbone features; finetune: train the backbone on patches")
    backbone: str = setting("torchvision/mobilenet_v2", non_empty_string, "image backbone (a registered name)")
    weights: str | None = setting("imagenet", optional(non_empty_string),
                                  "backbone weights: imagenet, a file path, or null for random")
    trunk: list[int] = setting(check=_trunk, help="widths of the shared trunk's hidden layers", factory=lambda: [512])
    dropout: float = setting(0.1, num_in(0.0, 1.0, hi_open=True), "dropout of the trunk")
    seed: int = setting(0, int_at_least(0), "random seed of the run (initialisation, shuffles, random_k)")
    device: str = setting("auto", _device, "auto, cpu, cuda, cuda:N or mps")
    feature_dtype: str = setting("float32", one_of("float32", "float16"),
                                 "features mode: dtype of the frozen-feature cache file (float16 halves its disk "
                                 "and page cache; batches are float32 either way)")
    precision: str = setting("bf16", one_of("bf16", "fp32"),
                             "ordinary steps, prediction and features on CUDA: bf16 autocast + channels_last, "
                             "or fp32 (CPU runs and hypergradient estimators are always float32)")

    def __init__(self, **values: Any):
        run, gate = run_settings(), option_settings()
        unknown = sorted(set(values) - set(run) - set(gate))
        if unknown:
            raise ConfigError(None, _unknown_message(unknown))
        by_mode = MODE_DEFAULTS.get(values.get("mode", run["mode"].default), {})
        for name, spec in run.items():
            value = values.get(name, by_mode.get(name, spec.default))
            object.__setattr__(self, name, list(value) if name == "trunk" and isinstance(value, tuple) else value)
        object.__setattr__(self, "_options", {name: values.get(name, spec.default) for name, spec in gate.items()})

    def __getattr__(self, name: str) -> Any:
        # only reached for names that are not run settings: the options of the registered gates and estimators
        if name.startswith("_"):
            raise AttributeError(name)
        options = self.__dict__.get("_options", {})
        if name in options:
            return options[name]
        spec = option_settings().get(name)  # a gate or estimator registered after this config was built
        if spec is None:
            raise AttributeError(f"TrainConfig has no setting {name!r}")
        return spec.default

    def __setattr__(self, name: str, value: Any) -> None:
        if name in run_settings():
            object.__setattr__(self, name, value)
        elif name in option_settings():
            self._options[name] = value
        else:
            raise AttributeError(f"TrainConfig has no setting {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrainConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"TrainConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | Path | None = None) -> "TrainConfig":
        """Build a config from plain values; unknown keys or bad values raise ConfigError naming the key."""
        if not isinstance(values, dict):
            raise ConfigError(source, f"expected a mapping of settings, got {type(values).__name__}")
        unknown = sorted(set(values) - set(all_settings()))
        if unknown:
            raise ConfigError(source, _unknown_message(unknown))
        cfg = cls(**values)
        cfg.validate(source)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible values: run settings, then every registered gate and estimator option."""
        out = {name: getattr(self, name) for name in run_settings()}
        out["trunk"] = list(out["trunk"])
        out.update({name: getattr(self, name) for name in option_settings()})
        return out

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some fields changed."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def validate(self, source: str | Path | None = None) -> None:
        """Raise ConfigError("source: key: problem") for the first bad value."""
        bad = first_problem(all_settings(), self.to_dict(), owner="TrainConfig")
        if bad:
            raise ConfigError(source, f"{bad[0]}: {bad[1]}")


# --------------------------------------------------------------------------- schema queries
@functools.lru_cache(maxsize=1)
def run_settings() -> dict[str, Setting]:
    """The run settings (TrainConfig's fields)."""
    return declared(TrainConfig)


def _gate_owners() -> tuple[tuple[str, type], ...]:
    from agl.selection import GATES

    return tuple((f"gate {name!r}", cls.Options) for name, cls in GATES.items())


def _estimator_owners() -> tuple[tuple[str, type], ...]:
    from agl.training.bilevel import ESTIMATORS, estimator_options_class

    return tuple((f"estimator {name!r}", estimator_options_class(fn)) for name, fn in ESTIMATORS.items())


def gate_settings() -> dict[str, Setting]:
    """Every option a registered gate declares (one entry per name; a run setting's name reads that setting).

    Two gates that declare an option of the same name must agree on its type and default.
    """
    return _option_settings(_gate_owners())


def estimator_settings() -> dict[str, Setting]:
    """Every option a registered hypergradient estimator declares (as ``gate_settings``)."""
    return _option_settings(_estimator_owners())


def option_settings() -> dict[str, Setting]:
    """The options of every registered gate and estimator (the settings beside TrainConfig's fields)."""
    return _option_settings(_gate_owners() + _estimator_owners())


@functools.lru_cache(maxsize=8)
def _option_settings(owners: tuple[tuple[str, type], ...]) -> dict[str, Setting]:
    run = run_settings()
    out: dict[str, Setting] = {}
    owner: dict[str, str] = {}
    for label, options in owners:
        for name, spec in declared(options).items():
            if name in run:
                if spec.hint != run[name].hint:
                    raise TypeError(f"{label}: option {name!r} is a run setting of another type")
                continue
            if name in out and (out[name].hint, out[name].default) != (spec.hint, spec.default):
                raise TypeError(f"{label}: option {name!r} differs from {owner[name]}'s "
                                f"(type or default); give it another name")
            out.setdefault(name, spec)
            owner.setdefault(name, label)
    return out


def all_settings() -> dict[str, Setting]:
    """Run settings, gate and estimator options: every key a config file, ``--set`` or a search space may use."""
    return {**run_settings(), **option_settings()}


def gate_options(cfg: TrainConfig) -> dict[str, Any]:
    """The options the gate of ``cfg.method`` declares, with their values in ``cfg``."""
    from agl.selection import GATES, gate_option_settings

    return {name: getattr(cfg, name) for name in gate_option_settings(GATES[cfg.method])}


def estimator_options(cfg: TrainConfig) -> dict[str, Any]:
    """The options the hypergradient estimator of ``cfg.hypergrad`` declares, with their values in ``cfg``."""
    from agl.training.bilevel import ESTIMATORS, estimator_options_class

    return {name: getattr(cfg, name) for name in declared(estimator_options_class(ESTIMATORS.get(cfg.hypergrad)))}


def check_settings(values: dict[str, Any], source: str | Path | None = None) -> TrainConfig:
    """Validate a partial mapping of settings (others take defaults); the same check as ``from_dict``."""
    return TrainConfig.from_dict(dict(values), source=source)


def _unknown_message(unknown: list[str]) -> str:
    return f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(all_settings()))}"


def describe_settings() -> str:
    """Every setting with its default and help, and which gates (estimators) read each option (generated help)."""
    lines = ["run settings:"]
    lines += [f"  {name:<20} {spec.default!r:<26} {spec.help}"
              + "".join(f" ({mode} mode: {by_mode[name]!r})" for mode, by_mode in MODE_DEFAULTS.items() if name in by_mode)
              for name, spec in run_settings().items()]
    for what, owners, settings in (("gate", _gate_owners(), gate_settings()),
                                   ("estimator", _estimator_owners(), estimator_settings())):
        readers: dict[str, list[str]] = {}
        for label, options in owners:
            for name in declared(options):
                readers.setdefault(name, []).append(label.split(" ", 1)[1].strip("'"))
        lines.append(f"{what} options (read by the {what}s named):")
        lines += [f"  {name:<20} {spec.default!r:<26} {spec.help} [{', '.join(readers[name])}]"
                  for name, spec in settings.items()]
    lines.append(f"gates: {', '.join(list_gates())}")
    lines.append(f"hypergradient estimators: {', '.join(list_hypergradients())}")
    return "\n".join(lines)


__all__ = [
    "MODE_DEFAULTS", "TrainConfig", "Setting", "all_settings", "check_settings", "describe_settings",
    "estimator_options", "estimator_settings", "gate_options", "gate_settings", "list_backbones", "list_gates",
    "list_hypergradients", "list_losses", "list_readers", "option_settings", "run_settings",
]
