"""Shared test helpers: where the repo and ``../shared`` are."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(
            f"{SHARED} is absent: conformance data lives beside the repo in CI, not in a user's clone"
        )
    return SHARED
