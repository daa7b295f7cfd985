"""The command line as users meet it: --version, --help (defaults, examples, no heavy imports),
exit codes (2 usage, 1 runtime), errors naming the flag typed, launch scripts' interpreter guard."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agl import __version__
from agl.cli import EXAMPLES, build_parser, main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "scanpy", "anndata", "ray", "mlflow", "optuna", "timm", "pandas", "numpy")


def _commands(parser) -> dict[str, object]:
    """Every (sub-)command parser by its name as typed ("train", "bench core")."""
    import argparse

    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{parser.prog.removeprefix('agl').strip()} {name}".strip()
                found[full] = sub
                found.update(_commands(sub))
    return found


def test_building_the_parser_imports_no_heavy_library() -> None:
    code = ("import sys; from agl.cli import build_parser; build_parser(); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_version_and_help_show_defaults_and_an_example_per_command(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"agl {__version__}"
    commands = _commands(build_parser())
    assert {"ingest", "info", "train", "evaluate", "tune", "predict", "bench", "bench core"} <= set(commands)
    for name, parser in commands.items():
        text = parser.format_help()
        assert "example:" in text and f"agl {name}" in text, name
        assert EXAMPLES[name].startswith(f"agl {name}")
    evaluate = commands["evaluate"].format_help()
    assert "(default: 1)" in evaluate and "--store STORE" in evaluate  # defaults shown, required ones without
    assert "(default: None)" not in evaluate
    assert "exit codes: 0 success, 2 usage error" in build_parser().format_help()


def test_exit_codes_usage_2_runtime_1(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as done:  # argparse: an unknown flag
        main(["train", "--no-such-flag"])
    assert done.value.code == 2
    not_a_store = tmp_path / "empty"
    not_a_store.mkdir()
    assert main(["info", str(not_a_store)]) == 1  # runtime: the data is not what it should be
    assert str(not_a_store) in capsys.readouterr().err
    assert main(["evaluate", "--store", "demo", "--protocol", "kfold", "--methods", "pgl,pgl",
                 "--out", str(tmp_path / "o")]) == 2  # usage: a bad value
    assert "--methods: a method is listed twice" in capsys.readouterr().err


def test_bad_method_and_set_values_name_the_flag_typed(tmp_path, capsys) -> None:
    base = ["train", "--store", "demo", "--split", "kfold-s0-f0", "--out", str(tmp_path / "run")]
    assert main([*base, "--method", "nosuch"]) == 2
    assert "--method nosuch: method: must be one of" in capsys.readouterr().err
    assert main([*base, "--method", "topk:k"]) == 2
    assert "--method: 'topk:k': option 'k' must look like key=value" in capsys.readouterr().err
    assert main([*base, "--method", "pgl", "--set", "lr=-1"]) == 2
    assert "--set: lr: must be a number" in capsys.readouterr().err
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"epochs": 0}))
    assert main([*base, "--method", "pgl", "--config", str(config), "--set", "lr=0.1"]) == 2
    assert f"{config}: epochs: must be an integer >= 1" in capsys.readouterr().err
    assert main(["evaluate", "--store", "demo", "--protocol", "kfold", "--methods", "pgl,probe:probe_alpha=-2",
                 "--out", str(tmp_path / "e")]) == 2
    assert "--methods probe:probe_alpha=-2: probe_alpha: must be hest, val or a positive number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_launch_scripts_under_the_wrong_interpreter_say_how_to_run_them(monkeypatch, capsys) -> None:
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import _environment
    finally:
        sys.path.remove(str(REPO / "launch"))
    _environment.check(str(REPO / "launch" / "tune.py"))  # this interpreter is the right one: no exit
    monkeypatch.setattr(_environment, "REQUIRED", ("torch", "agl_no_such_dependency"))
    with pytest.raises(SystemExit) as done:
        _environment.check(str(REPO / "launch" / "tune.py"))
    err = capsys.readouterr().err
    assert done.value.code == 2 and "lacks agl_no_such_dependency" in err
    assert ".venv/bin/python launch/tune.py" in err and "scripts/setup.sh" in err
    for script in ("tune.py", "train.py", "predict.py"):
        text = (REPO / "launch" / script).read_text()
        assert text.index("_environment.check(__file__)") < text.index("from agl")  # before any agl import
