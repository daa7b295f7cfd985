"""Shared fixtures: the real her2st data beside the repository, and a built demo store."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """The original her2st release (../shared/data/her2st, or $AGL_HER2ST_DIR)."""
    path = Path(os.environ.get("AGL_HER2ST_DIR", REPO.parent / "shared" / "data" / "her2st"))
    if not (path / "ST-cnts").is_dir():
        pytest.fail(f"real her2st data not found at {path}; set AGL_HER2ST_DIR")
    return path


@pytest.fixture(scope="session")
def demo_store() -> Path:
    """The store built from the bundled her2st demo (built once into $AGL_CACHE_DIR or ~/.cache/agl)."""
    from agl.datasets import her2st_demo_store

    return her2st_demo_store()


@pytest.fixture(scope="session")
def small_store(her2st_dir, tmp_path_factory) -> Path:
    """A small real store (her2st C2 + C3, 32 px patches, seed 0), built once per session."""
    from agl.data.ingest import build_store
    from agl.data.readers import read_her2st

    adata = read_her2st(her2st_dir, ["C2", "C3"])
    return build_store(adata, tmp_path_factory.mktemp("stores") / "small", patch_px=32, seeds=(0,),
                       split_kinds=("kfold", "spatial", "loso"))


@pytest.fixture(scope="module")
def ray_local():
    """One small local Ray per test module (2 CPUs, no dashboard, listening on 127.0.0.1 only),
    shut down at the module's end."""
    import ray

    from agl.distributed.runtime import init_ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_ray(num_cpus=2, object_store_memory=300 * 1024**2)
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------- reliability cases
# Tests of slide layouts read, bad input, faults, load and secure defaults carry
#   @pytest.mark.reliability(kind="layout" | "bad input" | "use" | "fault" | "load" | "secure default",
#                            case="what was given or done", outcome="what must happen")
# `scripts/reliability.py` runs them with AGL_RELIABILITY_JSON=<file> and turns the
# recorded cases and their outcomes into docs/reliability.md.
RELIABILITY_KINDS = ("layout", "bad input", "use", "fault", "load", "secure default")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reliability(kind, case, outcome): a case of docs/reliability.md")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for mark in item.iter_markers("reliability"):
            missing = {"kind", "case", "outcome"} - set(mark.kwargs)
            if missing or mark.kwargs.get("kind") not in RELIABILITY_KINDS:
                raise pytest.UsageError(f"{item.nodeid}: reliability marker needs kind in {RELIABILITY_KINDS}, "
                                        f"case and outcome (got {mark.kwargs})")


_RELIABILITY_ROWS: list[dict] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    mark = item.get_closest_marker("reliability")
    if mark is None or not os.environ.get("AGL_RELIABILITY_JSON"):
        return
    # one row per test: the call phase decides, a setup failure or skip counts too
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _RELIABILITY_ROWS.append({**mark.kwargs, "test": item.nodeid, "outcome_status": report.outcome,
                                  "seconds": round(report.duration, 2)})


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("AGL_RELIABILITY_JSON")
    if path and _RELIABILITY_ROWS:
        from agl.fileio import atomic_write_json

        atomic_write_json(path, _RELIABILITY_ROWS)
