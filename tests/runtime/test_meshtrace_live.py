"""MeshTrace through real data plane processes: a policy repo compiled by meshc, its bundles run
by real sidecars, spans received by a real in-test Zipkin collector over HTTP. B3 in keeps its
trace; the data plane's own answers (403, 503, a fault's abort) are spans tagged ``error``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from runtime_harness import Plane, ProxyClient, endpoint_set, wait_until
from test_tracing_live import Collector

from compiler.pipeline import compile_dir
from runtime.bundle import bundle_digest
from runtime.tracing import parse

SERVICES = """---
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {name: benigno}
spec: {port: 5000, subsets: [{version: v1}]}
---
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {name: magnanimo}
spec: {port: 4000}
---
apiVersion: meshc/v1alpha1
kind: Service
mesh: default
metadata: {name: ghost}
spec: {port: 6000}
"""


def _mesh(passthrough: bool = True) -> str:
    return (
        "apiVersion: kuma.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\n"
        f"spec: {{networking: {{outbound: {{passthrough: {str(passthrough).lower()}}}}}}}\n"
    )


def _trace(name: str, top: str, url: str) -> str:
    return (
        f"---\napiVersion: kuma.io/v1alpha1\nkind: MeshTrace\n"
        f"metadata: {{name: {name}, labels: {{kuma.io/mesh: default}}}}\n"
        f"spec:\n  targetRef: {top}\n"
        f"  default: {{backends: [{{type: Zipkin, zipkin: {{url: '{url}'}}}}]}}\n"
    )


@pytest.fixture
def collectors() -> Iterator[Callable[[], Collector]]:
    made: list[Collector] = []

    def make() -> Collector:
        c = Collector()
        made.append(c)
        return c

    yield make
    for c in made:
        c.server.shutdown()
        c.server.server_close()


def _chain(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path, repo: str, inbound_rules: str = ""
) -> tuple[Any, Plane, Plane]:
    """Compile ``repo``, then magnanimo's sidecar (outbound) -> benigno's sidecar (inbound) -> app."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policies.yaml").write_text(repo + inbound_rules, encoding="utf-8")
    result = compile_dir(policies)
    assert not result.errors, result.diagnostics
    files: dict[str, Path] = {}
    for key, data in result.bundles.items():
        path = tmp_path / f"{bundle_digest(data)}.json"
        path.write_bytes(data)
        files[key] = path
    app = upstream("benigno-v1")
    inbound = plane(
        "--service", "benigno", "--tag", "version=v1", "--app", app.address,
        "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", tmp_path / "benigno-state",
        "--mesh-bundle", files["default"], "--bundle", files["default/benigno"],
    )  # fmt: skip
    assert inbound.inbound is not None
    eps = tmp_path / "eps.json"
    eps.write_text(
        endpoint_set(
            1, {"benigno": [(f"127.0.0.1:{inbound.inbound[1]}", {"version": "v1"})]}
        ).model_dump_json()
    )
    outbound = plane(
        "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--mesh-bundle", files["default"], "--bundle", files["default/magnanimo"], "--endpoints", eps,
    )  # fmt: skip
    return app, outbound, inbound


def test_a_compiled_meshtrace_reports_each_sidecars_spans_to_its_own_collector(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path, collectors: Callable[[], Collector]
) -> None:
    """A Mesh-wide MeshTrace sends benigno's spans to one collector; a MeshService one sends
    magnanimo's (only) to another."""
    wide, mine = collectors(), collectors()
    repo = (
        _mesh()
        + SERVICES
        + _trace("everyone", "{kind: Mesh}", wide.url)
        + _trace("magnanimo-own", "{kind: MeshService, name: magnanimo}", mine.url)
    )
    app, outbound, _ = _chain(plane, upstream, tmp_path, repo)
    client = ProxyClient(outbound.outbound)  # type: ignore[arg-type]
    assert client.get("http://benigno:5000/traced")[0] == 200
    got = parse(app.seen_headers[-1].get("traceparent"))
    assert got is not None and got[2]  # sampling 100% by default
    trace_id = got[0]
    (server,) = wait_until(lambda: wide.of(trace_id), "benigno's span at the Mesh-wide collector")
    (client_span,) = wait_until(lambda: mine.of(trace_id), "magnanimo's span at its own collector")
    assert server["kind"] == "SERVER" and server["localEndpoint"]["serviceName"] == "benigno"
    assert client_span["kind"] == "CLIENT" and client_span["localEndpoint"]["serviceName"] == "magnanimo"
    assert server["parentId"] == client_span["id"]
    assert "error" not in server["tags"]
    # A Zipkin backend: the app got B3 as well, naming the same trace and the same span.
    h = app.seen_headers[-1]
    assert h["x-b3-traceid"] == trace_id and h["x-b3-spanid"] == server["id"] == got[1]
    assert h["x-b3-parentspanid"] == client_span["id"] and h["x-b3-sampled"] == "1"
    assert h["b3"] == f"{trace_id}-{server['id']}-1-{client_span['id']}"


TRACE64, SPAN = "a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACE128 = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize(
    ("incoming", "trace_id"),
    [
        ({"X-B3-TraceId": TRACE64, "X-B3-SpanId": SPAN, "X-B3-Sampled": "1"}, TRACE64),
        ({"b3": f"{TRACE128}-{SPAN}-1"}, TRACE128),
    ],
    ids=["multi-header-64bit", "single-header"],
)
def test_an_incoming_b3_context_continues_the_same_trace(
    plane: Callable[..., Plane],
    upstream: Any,
    tmp_path: Path,
    collectors: Callable[[], Collector],
    incoming: dict[str, str],
    trace_id: str,
) -> None:
    zipkin = collectors()
    app, outbound, _ = _chain(
        plane, upstream, tmp_path, _mesh() + SERVICES + _trace("t", "{kind: Mesh}", zipkin.url)
    )
    client = ProxyClient(outbound.outbound)  # type: ignore[arg-type]
    assert client.get("http://benigno:5000/b3", incoming)[0] == 200
    h = app.seen_headers[-1]
    spans = wait_until(
        lambda: len(zipkin.of(trace_id)) >= 2 and zipkin.of(trace_id), "both spans, same trace"
    )
    by_kind = {s["kind"]: s for s in spans}
    out_span, in_span = by_kind["CLIENT"], by_kind["SERVER"]
    assert out_span["parentId"] == SPAN and out_span["id"] != SPAN  # a new span, the caller's its parent
    assert in_span["parentId"] == out_span["id"]
    # Out: both B3 forms and traceparent, consistent (a 64-bit id zero-padded in traceparent).
    assert h["x-b3-traceid"] == trace_id and h["x-b3-spanid"] == in_span["id"]
    assert h["x-b3-parentspanid"] == out_span["id"] and h["x-b3-sampled"] == "1"
    assert h["b3"] == f"{trace_id}-{in_span['id']}-1-{out_span['id']}"
    assert parse(h["traceparent"]) == (trace_id.rjust(32, "0"), in_span["id"], True)


def test_replies_the_data_plane_makes_itself_are_spans_tagged_error(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path, collectors: Callable[[], Collector]
) -> None:
    """503 (ghost has no endpoint), 403 (passthrough off) on the outbound side, a fault's abort
    on the inbound side: each reaches the collector with its status, ``error`` and the reason."""
    zipkin = collectors()
    fault = """---
apiVersion: kuma.io/v1alpha1
kind: MeshFaultInjection
metadata: {name: teapot, labels: {kuma.io/mesh: default}}
spec:
  targetRef: {kind: MeshService, name: benigno}
  from:
    - targetRef: {kind: Mesh}
      default: {http: [{abort: {httpStatus: 418, percentage: 100}}]}
"""
    repo = _mesh(passthrough=False) + SERVICES + _trace("t", "{kind: Mesh}", zipkin.url)
    app, outbound, _ = _chain(plane, upstream, tmp_path, repo, fault)
    client = ProxyClient(outbound.outbound)  # type: ignore[arg-type]
    cases = [("http://ghost:6000/x", 503, "CLIENT"), ("http://outside.example/y", 403, "CLIENT")]
    cases.append(("http://benigno:5000/z", 418, "SERVER"))
    for url, status, kind in cases:
        tp = f"00-{TRACE128[:-4]}{status:04d}-{SPAN}-01"
        got, _, _ = client.get(url, {"traceparent": tp})
        assert got == status, url
        trace_id = parse(tp)[0]  # type: ignore[index]
        spans = wait_until(
            lambda t=trace_id, k=kind: [s for s in zipkin.of(t) if s["kind"] == k], f"{url}'s span"
        )
        tags = spans[0]["tags"]
        assert tags["http.status_code"] == str(status) and tags["error"] == "true", tags
        assert tags["meshc.reason"], tags
    assert not app.seen_headers  # the fault answered for the app


def test_a_timeout_after_forwarding_is_the_forwarded_requests_span_tagged_error(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path, collectors: Callable[[], Collector]
) -> None:
    """The 504 is made once the request went upstream: the span is the forward's own (the
    app saw it as its parent's), with the 504, ``error`` and the reason."""
    zipkin = collectors()
    timeout = """---
apiVersion: kuma.io/v1alpha1
kind: MeshTimeout
metadata: {name: quick, labels: {kuma.io/mesh: default}}
spec:
  targetRef: {kind: Mesh}
  to:
    - targetRef: {kind: MeshService, name: benigno}
      default: {http: {requestTimeout: 300ms}}
"""
    repo = _mesh() + SERVICES + _trace("t", "{kind: Mesh}", zipkin.url)
    app, outbound, _ = _chain(plane, upstream, tmp_path, repo, timeout)
    client = ProxyClient(outbound.outbound)  # type: ignore[arg-type]
    try:
        status, _, _ = client.get("http://benigno:5000/hang")
    finally:
        app.release.set()
    assert status == 504
    trace_id = wait_until(
        lambda: app.seen_headers and app.seen_headers[-1]["x-b3-traceid"], "the app's request"
    )
    spans = wait_until(lambda: [s for s in zipkin.of(trace_id) if s["kind"] == "CLIENT"], "magnanimo's span")
    tags = spans[0]["tags"]
    assert tags["http.status_code"] == "504" and tags["error"] == "true", tags
    assert tags["meshc.reason"] == "upstream request timeout"
    assert app.seen_headers[-1]["x-b3-parentspanid"] == spans[0]["id"]
