"""Shared fixtures: where the real data lives, and thread limits for a 2-core machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def shared_data_dir() -> Path:
    """../shared/data beside the repository, or $MOMKD_SHARED_DATA."""
    env = os.environ.get("MOMKD_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"real data folder {d} is absent (set MOMKD_SHARED_DATA); this test needs the TCGA/HEROHE fixtures")
    return d
