"""A route rule's own timeout and retry (Kuma's MeshTimeout / MeshRetry on a MeshHTTPRoute) on real
processes: they apply to the requests that rule matches and to no other, over HTTP/1.1 on both
data planes and over HTTP/2 (curl h2c), with the destination's own timeout and retry elsewhere.

The bundles are the shape ``tests/compiler/test_targetref_route_policies.py`` holds the compiler to.
The last test runs a Dataplane-label condition (``label:NAME``) against ``--label`` and ``--tag``.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runtime_harness import (
    HANG_DEADLINE,
    Plane,
    ProxyClient,
    Upstream,
    endpoint_set,
    mesh_bundle,
    metric_value,
    service_bundle,
    wait_until,
    write_bundle,
)

from runtime.bundle import (
    BackOff,
    Destination,
    HttpMatch,
    HttpRetry,
    HttpRoute,
    RetryConf,
    RouteConf,
    Rule,
    Split,
    StringMatch,
    TimeoutConf,
)
from runtime.decide import Forward, RetryState, decide_outbound
from runtime.engine import Engine

SPLIT = (Split(weight=1, service="benigno"),)
FAST = TimeoutConf(http_request_timeout_ms=300)
"""The route rule's timeout; the destination's is the 60 s the hang deadline allows."""
RETRY = RetryConf(
    http=HttpRetry(
        num_retries=1, back_off=BackOff(base_interval_ms=1, max_interval_ms=5), retry_on=("gateway_error",)
    )
)


def _prefix(value: str) -> HttpMatch:
    return HttpMatch(path=StringMatch(kind="prefix", value=value))


def _destination() -> Destination:
    """``/hang-fast`` has the rule's 300 ms timeout, ``/retried`` the rule's retry; ``/hang`` and
    ``/plain`` go by the destination's catch-all with its own 60 s timeout and no retry."""
    route = RouteConf(
        split=SPLIT,
        http=(
            HttpRoute(match=_prefix("/hang-fast"), split=SPLIT, timeout=FAST),
            HttpRoute(match=_prefix("/retried"), split=SPLIT, retry=RETRY),
        ),
    )
    slow = TimeoutConf(http_request_timeout_ms=int(HANG_DEADLINE * 1000))
    return Destination(route=(Rule[RouteConf](conf=route),), timeout=(Rule[TimeoutConf](conf=slow),))


def _start(plane: Callable[..., Plane], tmp_path: Path, eps: list[tuple[str, dict[str, str]]]) -> Plane:
    mesh = mesh_bundle(destinations={"benigno": _destination()})
    ep_file = tmp_path / "eps.json"
    ep_file.write_text(endpoint_set(1, {"benigno": eps}).model_dump_json())
    return plane(
        "--service", "magnanimo", "--tag", "version=v1",
        "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--state-dir", tmp_path / "state",
        "--mesh-bundle", write_bundle(tmp_path, mesh),
        "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
        "--endpoints", ep_file,
    )  # fmt: skip


Send = Callable[[str], tuple[int, str]]
"""GET a path of benigno through the sidecar: (status, x-meshc-reason)."""


def _h1(sidecar: Plane) -> Send:
    assert sidecar.outbound is not None
    address = sidecar.outbound

    def send(path: str) -> tuple[int, str]:
        status, headers, _ = ProxyClient(address).get(f"http://benigno{path}")  # a connection each
        return status, headers.get("x-meshc-reason", "")

    return send


def _h2(sidecar: Plane) -> Send:
    assert sidecar.outbound is not None
    port = sidecar.outbound[1]

    def send(path: str) -> tuple[int, str]:
        out = subprocess.run(
            [
                "curl", "-sS", "--http2-prior-knowledge", "-H", "host: benigno:5000", "-o", "/dev/null",
                "-D", "-", "-w", "%{http_version} %{http_code}", f"http://127.0.0.1:{port}{path}",
            ],
            capture_output=True, text=True, timeout=HANG_DEADLINE, check=True,
        )  # fmt: skip
        *head, last = out.stdout.splitlines()
        version, _, code = last.rpartition(" ")
        assert version.endswith("2"), out.stdout  # the head's last line has no newline: "...\r\n2 504"
        reasons = [h.split(":", 1)[1].strip() for h in head if h.lower().startswith("x-meshc-reason")]
        return int(code), reasons[0] if reasons else ""

    return send


def _timeout_only_on_its_rule(app: Upstream, send: Send) -> None:
    """A request on the destination's catch-all hangs past the rule's timeout and is answered
    when the app is: the rule's 504 came while it was still waiting, so it was not given it."""
    other: list[tuple[int, str]] = []
    waiting = threading.Thread(target=lambda: other.append(send("/hang/other")))
    waiting.start()
    wait_until(lambda: app.hits["/hang/other"] == 1, "the app to hold the catch-all's request")
    assert send("/hang-fast/x") == (504, "upstream request timeout")
    assert app.hits["/hang-fast/x"] == 1 and waiting.is_alive() and other == []
    app.release.set()
    waiting.join(HANG_DEADLINE)
    assert other == [(200, "")]


def _retry_only_on_its_rule(failing: Upstream, healthy: Upstream, send: Send, sidecar: Plane) -> None:
    """Round robin over a failing and a healthy host: the rule's requests are retried onto the
    healthy one (every one answers 200); the catch-all's are not (the failing host's 503 comes back)."""
    failing.status = 503
    assert [send("/retried/x")[0] for _ in range(6)] == [200] * 6
    retried = failing.hits["/retried/x"]
    assert retried >= 1
    assert metric_value(sidecar.metrics(), "meshc_retries_total", destination_service="benigno") == retried
    plain = [send("/plain/x")[0] for _ in range(6)]
    assert 503 in plain and 200 in plain
    assert failing.hits["/plain/x"] == plain.count(503) and healthy.hits["/plain/x"] == plain.count(200)
    assert metric_value(sidecar.metrics(), "meshc_retries_total", destination_service="benigno") == retried


def test_a_route_timeout_fires_for_its_rule_only(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    app = upstream("slow")
    sidecar = _start(plane, tmp_path, [(app.address, {})])
    _timeout_only_on_its_rule(app, _h1(sidecar))


def test_a_route_retry_retries_its_rule_only(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    failing, healthy = upstream("a"), upstream("b")
    sidecar = _start(plane, tmp_path, [(failing.address, {}), (healthy.address, {})])
    _retry_only_on_its_rule(failing, healthy, _h1(sidecar), sidecar)


needs_curl = pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is not installed (scripts/ensure-system-deps.sh)"
)


@needs_curl
def test_route_timeout_and_retry_apply_to_http2_streams(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    app = upstream("slow")
    sidecar = _start(plane, tmp_path, [(app.address, {})])
    _timeout_only_on_its_rule(app, _h2(sidecar))
    failing, healthy = upstream("a"), upstream("b")
    (tmp_path / "retry").mkdir()
    retrying = _start(plane, tmp_path / "retry", [(failing.address, {}), (healthy.address, {})])
    _retry_only_on_its_rule(failing, healthy, _h2(retrying), retrying)


class _Head:
    """A GET request head as a decision reads it."""

    method = "GET"
    has_body = False
    upgrade = None

    def __init__(self, path: str) -> None:
        self._path = path

    def authority(self) -> str:
        return "benigno"

    def path(self) -> str:
        return self._path

    def query_string(self) -> str:
        return ""

    def header_map(self) -> dict[str, str]:
        return {}


def test_the_verdict_carries_the_rules_policy_and_retry_state_takes_it() -> None:
    """Sans-io: the decision names the matched rule's own conf (``Forward.policy``) and the
    attempt state every byte layer builds from it uses it, else the target's."""
    engine = Engine("magnanimo", {}, rng=random.Random(1))
    eps = endpoint_set(1, {"benigno": [("127.0.0.1:1", {})]})
    mesh = mesh_bundle(destinations={"benigno": _destination()})
    engine.install(engine.build(mesh, service_bundle("magnanimo"), eps))
    states = {}
    for path in ("/hang-fast/x", "/retried/x", "/plain/x"):
        fwd = decide_outbound(engine, engine.snapshot, _Head(path), "benigno", None, ())
        assert isinstance(fwd, Forward) and fwd.target is not None
        states[path] = (fwd.policy, RetryState(fwd.target, "GET", 0, 100.0, route=fwd.policy))
    fast_policy, fast = states["/hang-fast/x"]
    assert fast_policy is not None and fast.deadline == 100.3 and not fast.allowed
    retried_policy, retried = states["/retried/x"]
    assert retried_policy is not None and retried.allowed and retried.deadline == 100.0 + HANG_DEADLINE
    plain_policy, plain = states["/plain/x"]
    assert plain_policy is None and not plain.allowed and plain.deadline == 100.0 + HANG_DEADLINE
    # A gRPC caller's own deadline still replaces the rule's timeout.
    assert fast_policy is not None
    grpc = RetryState(fwd.target, "POST", 0, 100.0, grpc=True, deadline_s=5.0, route=fast_policy)
    assert grpc.deadline == 105.0


def test_a_dataplane_label_condition_matches_a_sidecars_label_not_its_tag(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    """A rule conditioned on a Dataplane label (``label:team``, a Dataplane targetRef's
    ``labels``) applies to the sidecar started with ``--label team=a`` and not to the one whose
    *tag* is ``team=a``: the tagged one's request is still waiting when the labelled one's times out."""
    app = upstream("slow")
    fast = Rule[TimeoutConf](when={"label:team": "a"}, conf=FAST)
    slow = Rule[TimeoutConf](conf=TimeoutConf(http_request_timeout_ms=int(HANG_DEADLINE * 1000)))
    dest = Destination(route=(Rule[RouteConf](conf=RouteConf(split=SPLIT)),), timeout=(fast, slow))
    mesh = write_bundle(tmp_path, mesh_bundle(destinations={"benigno": dest}))
    eps = tmp_path / "eps.json"
    eps.write_text(endpoint_set(1, {"benigno": [(app.address, {})]}).model_dump_json())
    sidecars = {}
    for name, flag in (("labelled", "--label"), ("tagged", "--tag")):
        sidecars[name] = plane(
            "--service", "magnanimo", flag, "team=a",
            "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
            "--state-dir", tmp_path / name,
            "--mesh-bundle", mesh,
            "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
            "--endpoints", eps,
        )  # fmt: skip
    tagged: list[tuple[int, str]] = []
    waiting = threading.Thread(target=lambda: tagged.append(_h1(sidecars["tagged"])("/hang/tagged")))
    waiting.start()
    wait_until(lambda: app.hits["/hang/tagged"] == 1, "the app to hold the tagged sidecar's request")
    assert _h1(sidecars["labelled"])("/hang/labelled") == (504, "upstream request timeout")
    assert waiting.is_alive() and tagged == []
    app.release.set()
    waiting.join(HANG_DEADLINE)
    assert tagged == [(200, "")]
