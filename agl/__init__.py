"""agl: Auxiliary Gene Learning (AGL) with DkGSB for spatial gene expression from H&E.

Sub-packages, each usable on its own:

- ``agl.data``: readers of real slide formats, patches, preprocessing, the Arrow store, loaders
- ``agl.datasets``: the bundled her2st demo (``her2st_demo()``, ``her2st_demo_store()``)
- ``agl.models``, ``agl.selection``, ``agl.training``: the method, its hypergradients and its one loop
- ``agl.evaluation``, ``agl.predict``: protocols, tables and figures; predictions for new slides
- ``agl.distributed``: Ray Train, Ray Tune + Optuna and MLflow
- ``agl.bench``: benchmarks (``agl bench ...``)

Heavy dependencies (torch, Ray, MLflow) load only with the sub-package that needs them.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("agl")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
