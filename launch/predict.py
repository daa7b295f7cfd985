#!/usr/bin/env python
"""Predict a new slide with a checkpoint or the MLflow champion: .h5ad + PNG maps.

Same options as `agl predict`; run `python launch/predict.py --help`.
"""
import sys

import _environment  # noqa: E402  (the launch folder is sys.path[0]: stops early under the wrong interpreter)

_environment.check(__file__)

from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from agl.cli import run_script  # noqa: E402
from agl.distributed.commands import add_predict_args, cmd_predict  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_script(add_predict_args, cmd_predict, __doc__.splitlines()[0]))
