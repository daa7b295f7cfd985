"""One store convention: every command takes a store folder or ``demo``, resolved by agl.data.locate."""
from __future__ import annotations

import argparse

import pytest

from agl.cli import build_parser, main
from agl.data.locate import STORE_HELP, resolve_store


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_info_demo_works(demo_store, capsys) -> None:
    assert main(["info", "demo"]) == 0
    assert f"store      {demo_store}" in capsys.readouterr().out
    assert main(["info"]) == 0  # demo is the default store
    assert resolve_store("demo") == resolve_store(str(demo_store)) == demo_store.resolve()


def test_every_store_argument_has_one_meaning() -> None:
    commands = _subparsers(build_parser())
    bench = _subparsers(commands.pop("bench"))
    assert set(bench) >= {"core", "data", "ray", "load"}
    taking = {}
    for name, parser in {**commands, **{f"bench {k}": v for k, v in bench.items()}}.items():
        for action in parser._actions:
            if action.dest == "store":
                taking[name] = action.help
    assert {"info", "train", "evaluate", "tune", "train-ray", "bench core", "bench data"} <= set(taking)
    assert all(text.startswith(STORE_HELP) for text in taking.values()), taking


def test_a_folder_that_is_not_a_store_is_named(tmp_path) -> None:
    from agl.errors import DataError

    with pytest.raises(DataError, match=f"{tmp_path}.*not an agl store"):
        resolve_store(tmp_path)
