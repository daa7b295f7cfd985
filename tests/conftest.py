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
