"""Fixtures for runtime tests: upstream apps and data plane processes, always stopped by PID."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from runtime_harness import Plane, TcpEcho, Upstream


@pytest.fixture
def upstream() -> Iterator[Callable[[str], Upstream]]:
    made: list[Upstream] = []

    def make(name: str) -> Upstream:
        u = Upstream(name)
        made.append(u)
        return u

    yield make
    for u in made:
        u.close()


@pytest.fixture
def tcp_echo() -> Iterator[Callable[[str], TcpEcho]]:
    made: list[TcpEcho] = []

    def make(name: str) -> TcpEcho:
        e = TcpEcho(name)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Callable[..., Plane]]:
    made: list[Plane] = []

    def make(*args: Any, module: str = "runtime.sidecar") -> Plane:
        p = Plane([str(a) for a in args], tmp_path, module=module)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
