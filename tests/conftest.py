"""Shared test helpers: where the repo and ``../shared`` are, a throw-away PostgreSQL."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from pg_cluster import PostgresCluster, unavailable_reason

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def _own_parse_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every `meshc` the tests run (in process or as a child) keeps its parse cache in a temp dir,
    never the user's: a cache another meshc version wrote there is warned about on stderr, which
    tests that expect a quiet stderr would see."""
    old = os.environ.get("MESHC_CACHE_DIR")
    os.environ["MESHC_CACHE_DIR"] = str(tmp_path_factory.mktemp("meshc-cache"))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MESHC_CACHE_DIR", None)
        else:
            os.environ["MESHC_CACHE_DIR"] = old


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One throw-away PostgreSQL cluster for the session (``tests/pg_cluster.py``)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def pg_url(postgres: PostgresCluster) -> str:
    """A fresh database of the session's cluster."""
    return postgres.create_database()
