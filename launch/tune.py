#!/usr/bin/env python
"""The gene-subset sweep (Ray Tune + Optuna + MLflow): the README's first command.

Same options as `agl tune`; run `python launch/tune.py --help`.
"""
import sys

import _environment  # noqa: E402  (the launch folder is sys.path[0]: stops early under the wrong interpreter)

_environment.check(__file__)

from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from agl.cli import run_script  # noqa: E402
from agl.distributed.commands import add_tune_args, cmd_tune  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_script(add_tune_args, cmd_tune, __doc__.splitlines()[0]))
