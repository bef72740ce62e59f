"""Shared fixtures: real sample data location and small synthetic scenes."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests using it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample rasters not found at {SHARED_DATA} (../shared/data beside the project)")
    return SHARED_DATA
