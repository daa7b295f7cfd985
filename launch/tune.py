#!/usr/bin/env python
"""The gene-subset sweep (Ray Tune + Optuna + MLflow): the README's first command.

Same options as `agl tune`; run `python launch/tune.py --help`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from agl.distributed.commands import cmd_tune, add_tune_args  # noqa: E402
from agl.errors import AGLError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tune_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return cmd_tune(args)
    except AGLError as err:
        print(f"{Path(__file__).name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
