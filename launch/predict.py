#!/usr/bin/env python
"""Predict a new slide with a checkpoint or the MLflow champion: .h5ad + PNG maps.

Same options as `agl predict`; run `python launch/predict.py --help`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from agl.distributed.commands import cmd_predict, add_predict_args  # noqa: E402
from agl.errors import AGLError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_predict_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return cmd_predict(args)
    except AGLError as err:
        print(f"{Path(__file__).name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
