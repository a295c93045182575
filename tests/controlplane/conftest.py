"""Fixtures for the control plane's end-to-end tests: the seed mesh as real processes on
127.0.0.1 (OS-chosen free ports), its control plane following ``main`` of a temp Git repo."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cp_harness import make_policy_repo

from compiler.demo import DemoMesh, free_port


@pytest.fixture(scope="module")
def policy_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_policy_repo(tmp_path_factory.mktemp("gitops") / "repo")


@pytest.fixture(scope="module")
def cp_extra_args() -> tuple[str, ...]:
    """More ``meshc controlplane`` flags for a module's mesh (override in the module)."""
    return ()


@pytest.fixture(scope="module")
def mesh(
    policy_repo: Path, tmp_path_factory: pytest.TempPathFactory, cp_extra_args: tuple[str, ...]
) -> Iterator[DemoMesh]:
    m = DemoMesh(
        policy_dir=policy_repo / "policies",
        work_dir=tmp_path_factory.mktemp("mesh"),
        cp_port=free_port(),
        gateway_port=free_port(),
        cp_args=(
            "--repo",
            str(policy_repo),
            "--ref",
            "main",
            "--poll-interval",
            "0.1",
            "--heartbeat-interval",
            "0.3",
            *cp_extra_args,
        ),
    )
    try:
        m.start_all()
        m.wait_ready(timeout=120)
        yield m
    finally:
        m.stop_all()
