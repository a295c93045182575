"""Fixtures for runtime tests: upstream apps and data plane processes, always stopped by PID.

Every test that starts a data plane (``plane``) runs once per HTTP data plane: ``fast``
(runtime.fastproxy) and ``aiohttp`` (runtime.proxy). ``MESHC_DATAPLANES=fast`` (a comma list)
narrows that for a local run. A module whose tests choose the data plane themselves (the
conformance suite parametrizes its own proxies) sets ``DATAPLANE_CHOSEN_BY_TEST = True``; a test
about one data plane only says ``@pytest.mark.parametrize("dataplane", ["fast"], indirect=True)``. Where
the aiohttp path cannot do something, the test marks it with ``aiohttp_cannot`` (a strict xfail
with the reason), never a skip.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from runtime_harness import DATAPLANES, Plane, TcpEcho, Upstream


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "dataplane" not in metafunc.fixturenames or getattr(
        metafunc.module, "DATAPLANE_CHOSEN_BY_TEST", False
    ):
        return
    marks = metafunc.definition.iter_markers("parametrize")
    if not any(m.args and m.args[0] == "dataplane" for m in marks):  # else the test chose its own
        metafunc.parametrize("dataplane", DATAPLANES, indirect=True)


@pytest.fixture
def dataplane(request: pytest.FixtureRequest) -> str:
    """The HTTP data plane this test's processes run (``--dataplane``)."""
    chosen: str = getattr(request, "param", os.environ.get("MESHC_DATAPLANE", "fast"))
    return chosen


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
def plane(tmp_path: Path, dataplane: str) -> Iterator[Callable[..., Plane]]:
    made: list[Plane] = []

    def make(*args: Any, module: str = "runtime.sidecar") -> Plane:
        p = Plane([str(a) for a in args], tmp_path, module=module, dataplane=dataplane)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
