"""Search-space files: the bundled ones load, bad ones fail with ConfigError naming file and key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agl.distributed.spaces import SPACES_DIR, SearchSpace, load_space, parse_space
from agl.errors import ConfigError
from agl.training.loop import TrainConfig

BUNDLED = sorted(SPACES_DIR.glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


MINIMAL = """
fixed: {epochs: 3}
params:
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
"""


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.stem)
def test_bundled_spaces_load_and_make_valid_configs(path: Path) -> None:
    space = load_space(path)
    assert space.params, path
    # fixed values plus any sampled value yield a valid TrainConfig
    for name, dist in space.params.items():
        for value in dist.candidates():
            TrainConfig.from_dict(space.train_config({name: value}))


def test_expected_profiles_exist() -> None:
    assert {"default", "tiny", "finetune-gpu", "large"} <= {p.stem for p in BUNDLED}
    tiny = load_space("tiny")  # by name
    assert tiny.fixed["epochs"] <= 3 and tiny.num_samples <= 3


def test_tune_space_maps_distributions() -> None:
    from ray.tune.search.sample import Categorical, Float, Integer

    space = parse_space({
        "params": {
            "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "k": {"type": "int", "low": 4, "high": 64},
            "method": {"type": "categorical", "choices": ["dkgsb", "topk"]},
            "trunk_width": {"type": "categorical", "choices": [64, 128]},
        }
    })
    tuned = space.tune_space()
    assert isinstance(tuned["lr"], Float) and isinstance(tuned["k"], Integer)
    assert isinstance(tuned["method"], Categorical)
    # the YAML upper bound is inclusive: tune.randint's exclusive bound is high + 1
    assert tuned["k"].upper == 65 and tuned["k"].lower == 4
    samples = [tuned["k"].sample() for _ in range(300)]
    assert min(samples) >= 4 and max(samples) <= 64
    lrs = [tuned["lr"].sample() for _ in range(200)]
    assert 1e-4 <= min(lrs) and max(lrs) <= 1e-2
    cfg = space.train_config({"lr": 0.001, "k": 10, "method": "topk", "trunk_width": 128})
    assert cfg["trunk"] == [128] and "trunk_width" not in cfg
    assert TrainConfig.from_dict(cfg).k == 10


@pytest.mark.parametrize("text, needle", [
    ("params: {lr: {type: float, low: 1.0e-4, high: 1.0e-2}}\nbogus: 1\n", "unknown top-level key"),
    ("params: {lrr: {type: float, low: 0.1, high: 0.2}}\n", "params.lrr: unknown setting"),
    ("fixed: {epoch: 2}\nparams: {lr: {type: float, low: 0.1, high: 0.2}}\n", "fixed.epoch: unknown setting"),
    ("params: {lr: {type: gaussian, low: 0.1, high: 0.2}}\n", "unknown distribution type 'gaussian'"),
    ("params: {lr: {type: float, low: 0.2, high: 0.1}}\n", "params.lr: low (0.2) must be < high (0.1)"),
    ("params: {lr: {type: float, low: 0.0, high: 0.1, log: true}}\n", "log scale needs positive bounds"),
    ("params: {lr: {type: float, low: '1e-4', high: 0.1}}\n", "write it without quotes"),
    ("params: {k: {type: int, low: 1.5, high: 8}}\n", "integer bounds"),
    ("params: {lr: {type: float, low: 0.1, high: 0.2, scale: log}}\n", "unknown key(s) ['scale']"),
    ("params: {method: {type: categorical, choices: [dkgsb, magic]}}\n", "params.method='magic': TrainConfig rejects"),
    ("params: {prior_weight: {type: float, low: 0.5, high: 1.5}}\n", "params.prior_weight=1.5: TrainConfig rejects"),
    ("params: {epochs: {type: float, low: 1.0, high: 5.0}}\n", "TrainConfig.epochs takes ['int']"),
    ("params: {hard: {type: categorical, choices: [1, 0]}}\n", "TrainConfig.hard takes ['bool']"),
    ("fixed: {epochs: 0}\nparams: {lr: {type: float, low: 0.1, high: 0.2}}\n", "fixed: TrainConfig rejects it: epochs"),
    ("fixed: {lr: 0.1}\nparams: {lr: {type: float, low: 0.1, high: 0.2}}\n", "appear in both"),
    ("params: {lr: {type: float, low: 0.1, high: 0.2}}\nmode: maximise\n", "mode: must be one of"),
    ("params: {lr: {type: float, low: 0.1, high: 0.2}}\nscheduler: {name: hyperband}\n", "scheduler: must name"),
    ("params: {lr: {type: float, low: 0.1, high: 0.2}}\nnum_samples: 0\n", "num_samples: must be a positive"),
    ("params: {}\n", "params: must be a non-empty mapping"),
    ("[1, 2]\n", "top level must be a mapping"),
    ("params: {lr: [1, 2\n", "not valid YAML"),
])
def test_bad_spaces_name_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert needle in message, message


def test_missing_space_lists_bundled(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bundled spaces: .*default"):
        load_space(tmp_path / "nope.yaml")


def test_minimal_space_defaults(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, MINIMAL))
    assert isinstance(space, SearchSpace)
    assert (space.metric, space.mode, space.split) == ("val_pcc", "max", "kfold-s0-f0")
    assert space.train_config({"lr": 0.003}) == {"epochs": 3, "lr": 0.003}
    assert yaml.safe_load(MINIMAL)["fixed"] == space.fixed


PINNED = """
num_samples: 4
params:
  method: {type: categorical, choices: [topk, dkgsb, pgl]}
  k: {type: int, low: 16, high: 4096, log: true}
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  tau: {type: float, low: 0.05, high: 0.2}
start_with:
  - {method: dkgsb, k: 100}
  - {method: pgl}
"""


def test_start_with_pins_complete_first_trials() -> None:
    space = parse_space(yaml.safe_load(PINNED), "pinned.yaml")
    first, second = space.start_with
    # given keys kept; open keys take TrainConfig's default where the range allows it (lr = 1e-3),
    # else the range's centre (tau: default 0.01 is outside [0.05, 0.2]; k: default None -> geometric centre)
    assert first == {"method": "dkgsb", "k": 100, "lr": TrainConfig().lr, "tau": pytest.approx(0.125)}
    assert second["method"] == "pgl" and second["k"] == 256 and set(second) == set(space.params)
    for point in space.start_with:
        TrainConfig.from_dict(space.train_config(point))


@pytest.mark.parametrize("bad, message", [
    ("start_with: [{method: uncertainty}]", r"start_with\[0\]\.method: 'uncertainty' is outside"),
    ("start_with: [{k: 8}]", r"start_with\[0\]\.k: 8 is outside"),
    ("start_with: [{epochs: 3}]", r"start_with\[0\]\.epochs: not a searched setting"),
    ("start_with: {method: pgl}", r"start_with: must be a list"),
    ("start_with: [{method: pgl}, {method: pgl}, {method: pgl}, {method: pgl}, {method: pgl}]",
     r"start_with: 5 pinned trials but num_samples is 4"),
])
def test_bad_start_with_names_the_entry(bad: str, message: str) -> None:
    raw = yaml.safe_load(PINNED)
    raw.pop("start_with")
    raw.update(yaml.safe_load(bad))
    with pytest.raises(ConfigError, match=rf"pinned\.yaml: {message}"):
        parse_space(raw, "pinned.yaml")


# --------------------------------------------------------------------------- conditional spaces, cv
CONDITIONAL = {
    "split": "loso-B4", "metric": "cv_pcc", "cv": {"kind": "loso"}, "num_samples": 4,
    "fixed": {"mode": "features", "epochs": 6, "patience": 3},
    "start_with": [{"method": "pgl"}, {"method": "dkgsb", "k": 100}],
    "params": {
        "method": {"type": "categorical", "choices": ["dkgsb", "topk", "pgl"]},
        "k": {"type": "int", "low": 16, "high": 2048, "log": True, "when": {"method": ["dkgsb", "topk"]}},
        "tau": {"type": "float", "low": 0.003, "high": 0.1, "log": True, "when": {"method": "dkgsb"}},
        "lr": {"type": "float", "low": 3.0e-4, "high": 3.0e-3, "log": True},
    },
}


def test_define_by_run_suggests_settings_only_where_the_method_uses_them() -> None:
    import optuna

    space = parse_space(CONDITIONAL)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        space.define_by_run()(trial)
        method = trial.params["method"]
        seen.add(method)
        assert ("k" in trial.params) == (method in ("dkgsb", "topk"))
        assert ("tau" in trial.params) == (method == "dkgsb")
        assert "lr" in trial.params
        study.tell(trial, 0.0)
    assert seen == {"dkgsb", "topk", "pgl"}
    # pinned trials are completed with the settings their method uses, and no others
    pgl, dkgsb = space.start_with
    assert set(pgl) == {"method", "lr"}
    assert set(dkgsb) == {"method", "k", "tau", "lr"} and dkgsb["k"] == 100
    assert space.active_params({"method": "pgl", "k": 5, "tau": 0.01, "lr": 1e-3}) == {"method": "pgl", "lr": 1e-3}


@pytest.mark.parametrize("change, message", [
    ({"params": {**CONDITIONAL["params"], "k": {"type": "int", "low": 1, "high": 9, "when": {"lr": [1]}}}},
     "must be a categorical setting listed before"),
    ({"params": {**CONDITIONAL["params"], "tau": {"type": "float", "low": 0.1, "high": 0.2,
                                                  "when": {"method": ["agl_all"]}}}}, "not among its choices"),
    ({"start_with": [{"method": "pgl", "k": 64}]}, "not used by this trial"),
    ({"metric": "val_pcc"}, "with cv the trials report the fold mean"),
    ({"cv": {"kind": "loso", "folds": 1}}, "cv.folds: must be an integer >= 3"),
    ({"cv": {"kind": "bootstrap"}}, "cv: must be a mapping with kind"),
    ({"min_bilevel_epochs": 5}, "guarantee only 3"),
])
def test_conditional_and_cv_space_errors(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_space({**CONDITIONAL, **change}, source="bad.yaml")


def test_bundled_default_is_cross_slide_and_conditional() -> None:
    space = load_space("default")
    assert space.cv == {"kind": "loso", "folds": 3, "seed": 0, "max_folds": None}
    assert space.split == "loso-B4" and space.metric == "cv_pcc" and space.min_bilevel_epochs >= 1
    pinned = {p["method"]: p for p in space.start_with}
    assert {"k", "tau", "outer_lr"} <= set(pinned["dkgsb"]) and not {"k", "tau", "outer_lr"} & set(pinned["pgl"])
def test_direction_key_and_its_old_name(tmp_path: Path, caplog) -> None:
    base = "params: {lr: {type: float, low: 0.1, high: 0.2}}\n"
    assert load_space(write(tmp_path, base + "direction: min\n")).mode == "min"
    with caplog.at_level("WARNING"):
        assert load_space(write(tmp_path, base + "mode: min\n")).mode == "min"
    assert "'mode' is deprecated; write 'direction: min'" in caplog.text
    with pytest.raises(ConfigError, match="both 'direction' and its old name 'mode'"):
        load_space(write(tmp_path, base + "mode: min\ndirection: min\n"))
    with pytest.raises(ConfigError, match="training mode goes under 'fixed'"):
        load_space(write(tmp_path, base + "direction: finetune\n"))


def test_gate_options_are_searchable_and_checked_by_their_declaration(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, "params: {per_gene: {type: categorical, choices: [true, false]}}\n"))
    assert TrainConfig.from_dict(space.train_config({"per_gene": True})).per_gene is True
    with pytest.raises(ConfigError, match=r"params.per_gene=1: TrainConfig rejects it: per_gene: .*takes \['bool'\]"):
        load_space(write(tmp_path, "params: {per_gene: {type: categorical, choices: [1, 0]}}\n"))


@pytest.mark.parametrize("path", [p for p in BUNDLED if load_space(p).fixed.get("mode", "features") == "features"],
                         ids=lambda p: p.stem)
def test_features_mode_spaces_keep_the_measured_dkgsb_defaults(path: Path) -> None:
    """A bundled features-mode sweep runs DkGSB's outer loop as measured (agl.config.MODE_DEFAULTS): no space
    fixes or pins one of those settings to an unmeasured value (default.yaml pinned bilevel_batch_size: 64)."""
    from agl.config import MODE_DEFAULTS

    space = load_space(path)
    defaults = MODE_DEFAULTS["features"]
    for where, values in (("fixed", space.fixed), *((f"start_with[{i}]", p) for i, p in enumerate(space.start_with))):
        changed = {name: values[name] for name in set(values) & set(defaults) if values[name] != defaults[name]}
        assert not changed, f"{path.name} {where} sets {changed} over the features-mode defaults {defaults}"
    cfg = TrainConfig.from_dict(space.train_config({"method": "dkgsb"}))
    for name, value in defaults.items():  # searched: its range must hold the default, so the search can find it
        assert space.params[name].contains(value) if name in space.params else getattr(cfg, name) == value, name


def test_a_pinned_trial_leaves_open_settings_at_its_modes_defaults() -> None:
    """outer_lr's default depends on the mode (0.01 in features mode, 0.003 in finetune): a pinned trial of a
    finetune space that leaves it open gets finetune's, not the features-mode value."""
    space = {"fixed": {"mode": "finetune", "epochs": 2}, "start_with": [{"method": "dkgsb"}],
             "params": {"method": {"type": "categorical", "choices": ["dkgsb", "pgl"]},
                        "outer_lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True,
                                     "when": {"method": ["dkgsb"]}}}}
    assert parse_space(space).start_with[0]["outer_lr"] == TrainConfig(mode="finetune").outer_lr == 3e-3
    space["fixed"]["mode"] = "features"
    assert parse_space(space).start_with[0]["outer_lr"] == TrainConfig(mode="features").outer_lr == 0.01
