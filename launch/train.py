#!/usr/bin/env python
"""One training run with Ray Train (TorchTrainer, data parallel, resumes after worker failures).

Same options as `agl train-ray`; run `python launch/train.py --help`.
"""
import sys

import _environment  # noqa: E402  (the launch folder is sys.path[0]: stops early under the wrong interpreter)

_environment.check(__file__)

from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from agl.cli import run_script  # noqa: E402
from agl.distributed.commands import add_train_args, cmd_train_ray  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_script(add_train_args, cmd_train_ray, __doc__.splitlines()[0]))
