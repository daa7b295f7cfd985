"""Guard for the launch scripts: stop early, saying how to run them, under the wrong interpreter.

Imported first by every ``launch/*.py``. Written without f-strings or annotations so that
an old system Python can parse it and print the hint instead of a SyntaxError.
"""
import importlib.util
import os
import sys

REQUIRED = ("torch", "ray", "optuna", "mlflow", "scanpy", "timm")  # what the scripts' commands import
EXIT_USAGE = 2  # as `agl`: the script was run the wrong way


def check(script):
    """Exit with a hint when this interpreter is not the project's Python 3.11 environment."""
    name = os.path.relpath(script)
    problems = []
    if sys.version_info[:2] != (3, 11):
        problems.append("it is Python {0}.{1}, agl needs 3.11".format(*sys.version_info[:2]))
    else:
        missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
        if missing:
            problems.append("it lacks {0}".format(", ".join(missing)))
    if not problems:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(script)))
    venv_python = os.path.relpath(os.path.join(root, ".venv", "bin", "python"))
    sys.stderr.write(
        "{0}: this interpreter ({1}) cannot run agl: {2}.\n"
        "Run it with the project's environment:\n"
        "  bash scripts/setup.sh            # once: creates .venv with the pinned dependencies\n"
        "  {3} {0}\n"
        "or `source .venv/bin/activate` first, or `pip install -e .` into your own Python 3.11 environment.\n"
        .format(name, sys.executable, "; ".join(problems), venv_python))
    sys.exit(EXIT_USAGE)
