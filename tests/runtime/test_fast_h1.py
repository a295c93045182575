"""Sans-io tests of the fast path's HTTP/1.1 framing (runtime.h1) and its metrics (runtime.fastmetrics).

No sockets: bytes go into the readers, events come out into a recording sink.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from runtime import h1
from runtime.fastmetrics import Identity
from runtime.metrics import Metrics


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def request_head(self, req: h1.Request) -> None:
        self.events.append(("head", req))

    def request_body(self, req: h1.Request, data: bytes) -> None:
        self.events.append(("body", data))

    def request_end(self, req: h1.Request) -> None:
        self.events.append(("end", req))

    def response_head(self, resp: h1.Response) -> None:
        self.events.append(("head", resp))

    def response_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def response_end(self, resp: h1.Response) -> None:
        self.events.append(("end", resp))

    def heads(self) -> list[Any]:
        return [e[1] for e in self.events if e[0] == "head"]

    def body(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "body")


def read_requests(data: bytes, pieces: list[int] | None = None) -> tuple[Sink, int]:
    sink = Sink()
    reader = h1.RequestReader(sink)
    offset = -1
    cuts = sorted(set(pieces or []))
    start = 0
    for cut in [*cuts, len(data)]:
        if cut <= start:
            continue
        offset = reader.feed(data[start:cut])
        start = cut
    return sink, offset


def test_request_head_is_sorted_into_forwarded_headers_and_fields() -> None:
    sink, _ = read_requests(
        b"GET http://benigno:5000/a?b=1 HTTP/1.1\r\nHost: benigno:5000\r\nUser-Agent: t\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\nX-Meshc-Source-Service: web\r\nX-End: 2\r\n\r\n"
    )
    (req,) = sink.heads()
    assert req.method == "GET" and req.url == b"http://benigno:5000/a?b=1" and not req.http10
    assert req.host == b"benigno:5000" and req.xff == b"1.2.3.4" and req.source == b"web"
    assert req.headers == [(b"User-Agent", b"t"), (b"X-End", b"2")]  # hop-by-hop and X-Hop gone
    assert req.keep_alive and req.complete and not req.has_body
    assert req.header_map()["x-end"] == "2"


def test_pipelined_requests_and_bodies() -> None:
    data = (
        b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        b"GET /3 HTTP/1.0\r\n\r\n"
    )
    sink, _ = read_requests(data)
    kinds = [e[0] for e in sink.events]
    assert kinds == ["head", "body", "end", "head", "body", "body", "end", "head", "end"]
    one, two, three = sink.heads()
    assert (one.length, one.chunked, two.chunked, two.length) == (5, False, True, None)
    assert three.http10 and not three.keep_alive and three.host is None
    assert sink.body() == b"helloabcde"


REQUESTS = (
    b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\n"
    b"PUT /y HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world"
    b"POST /z HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(REQUESTS) - 1), max_size=12))
def test_any_split_of_the_bytes_reads_the_same(cuts: list[int]) -> None:
    sink, _ = read_requests(REQUESTS, cuts)
    heads = sink.heads()
    assert [(r.method, r.url, r.headers, r.length, r.chunked) for r in heads] == [
        ("GET", b"/x", [(b"X-A", b"1")], None, False),
        ("PUT", b"/y", [], 11, False),
        ("POST", b"/z", [], None, True),
    ]
    assert sink.body() == b"hello worldhello world"
    assert [e[0] for e in sink.events].count("end") == 3


@pytest.mark.parametrize(
    "data,status",
    [
        (b"GET /" + b"a" * (h1.MAX_URL + 10) + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"b" * h1.MAX_HEADER_BYTES + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", 431),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ],
)
def test_refused_requests(data: bytes, status: int) -> None:
    with pytest.raises(h1.H1Error) as err:
        read_requests(data)
    assert err.value.status == status


def test_an_endless_head_is_cut_off() -> None:
    reader = h1.RequestReader(Sink())
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Endless: ")
    with pytest.raises(h1.H1Error) as err:
        for _ in range(100):
            reader.feed(b"v" * 4096)
    assert err.value.status == 431


def test_upgrade_and_connect_return_the_offset_of_the_tunnel_bytes() -> None:
    head = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    sink, offset = read_requests(head + b"FRAME")
    assert offset == len(head) and sink.heads()[0].upgrade == b"websocket"
    head = b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"
    sink, offset = read_requests(head + b"TLS")
    assert offset == len(head) and sink.heads()[0].method == "CONNECT"


def read_responses(data: bytes) -> tuple[Sink, int]:
    sink = Sink()
    return sink, h1.ResponseReader(sink).feed(data)


def test_responses_framing_and_hop_by_hop() -> None:
    sink, _ = read_responses(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 Fine\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n"
        b"Server: s\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"
    )
    interim, ok, created = sink.heads()
    assert interim.status == 100
    assert (ok.status, ok.reason, ok.length, ok.chunked, ok.keep_alive) == (200, b"Fine", b"2", False, True)
    assert ok.headers == [(b"Server", b"s")]
    assert (created.status, created.chunked, created.length) == (201, True, None)
    assert sink.body() == b"okab"


def test_a_101_returns_the_offset_of_the_tunnel_bytes() -> None:
    head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    sink, offset = read_responses(head + b"DATA")
    assert offset == len(head) and sink.heads()[0].upgrade == b"websocket"


def test_a_malformed_response_is_502() -> None:
    with pytest.raises(h1.H1Error) as err:
        read_responses(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
    assert err.value.status == 502


def test_reply_bytes() -> None:
    data = h1.reply(429, "local_rate_limited", headers=[("x-rl", "1")], close=True)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b"x-meshc-reason: local_rate_limited" in head and b"x-rl: 1" in head
    assert b"connection: close" in head and body == b"local_rate_limited"
    assert b"content-length: 18" in head
    assert h1.status_line(299) == b"HTTP/1.1 299 Unknown\r\n"
    assert h1.chunk_size(255) == b"ff\r\n"


# --- metrics ---------------------------------------------------------------------------------------


# Istio's standard labels, as https://istio.io/latest/docs/reference/config/metrics/ lists them
# (written out here, not imported, so that a change to the code cannot change what it is held to).
ISTIO_STANDARD_LABELS = {
    "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
    "source_version", "source_canonical_service", "source_canonical_revision", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal",
    "destination_app", "destination_version", "destination_service", "destination_service_name",
    "destination_service_namespace", "destination_canonical_service",
    "destination_canonical_revision", "destination_cluster", "request_protocol", "response_code",
    "grpc_response_status", "response_flags", "connection_security_policy",
}  # fmt: skip


def _families(metrics: Metrics) -> dict[str, list[Any]]:
    text = generate_latest(metrics.registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_request_metrics_in_meshc_and_istio_vocabularies() -> None:
    metrics = Metrics(Identity(service="web", mesh="default", tags={"version": "v3"}, mtls=True))
    metrics.stats.record("inbound", "magnanimo", "web", "", 200, 0.002, 10, 100)  # the aiohttp way
    stats = metrics.stats
    stats.record("outbound", "web", "benigno", "version=v1", 200, 0.0004, 0, 1500)
    stats.record("outbound", "web", "benigno", "version=v1", 200, 0.003, 0, 20)
    stats.record("outbound", "web", "benigno", "version=v2", 503, 0.02)
    stats.get("inbound", "magnanimo", "web", "").add(200, 0.002, 10, 100)  # the fast path's way
    fams = _families(metrics)
    for name in ("istio_requests", "istio_request_duration_milliseconds", "istio_request_bytes"):
        for sample in fams[name]:
            assert set(sample.labels) - {"le"} == ISTIO_STANDARD_LABELS, (name, sample.labels)
    assert "istio_response_bytes" in fams
    counts = {
        (s.labels["reporter"], s.labels["destination_workload"], s.labels["response_code"]): s.value
        for s in fams["istio_requests"]
        if s.name == "istio_requests_total"
    }
    assert counts == {
        ("source", "benigno-v1", "200"): 2.0,
        ("source", "benigno-v2", "503"): 1.0,
        ("destination", "web-v3", "200"): 2.0,
    }
    inbound = next(s for s in fams["istio_requests"] if s.labels["reporter"] == "destination")
    assert inbound.labels["source_principal"] == "spiffe://default/magnanimo"
    assert inbound.labels["connection_security_policy"] == "mutual_tls"
    assert inbound.labels["destination_version"] == "v3" and inbound.labels["source_version"] == "unknown"
    # bytes: the two 200 answers to web's outbound calls were 1500 and 20 bytes long
    out_resp = {
        s.labels["le"]: s.value
        for s in fams["istio_response_bytes"]
        if s.name.endswith("_bucket") and s.labels["destination_workload"] == "benigno-v1"
    }
    assert out_resp["100.0"] == 1.0 and out_resp["10000.0"] == 2.0
    ms = {
        s.labels["le"]: s.value
        for s in fams["istio_request_duration_milliseconds"]
        if s.name.endswith("_bucket") and s.labels["destination_workload"] == "benigno-v1"
    }
    assert ms["0.5"] == 1.0 and ms["5.0"] == 2.0 and ms["+Inf"] == 2.0
    # meshc's own families: the new labels, and the histogram has response_code
    own = [s for s in fams["meshc_requests"] if s.name == "meshc_requests_total"]
    v2 = next(s for s in own if s.labels["destination_subset"] == "version=v2")
    assert v2.labels["reporter"] == "source" and v2.labels["source_workload"] == "web-v3"
    assert v2.labels["destination_version"] == "v2" and v2.labels["response_code"] == "503"
    hist = [s for s in fams["meshc_request_duration_seconds"] if s.name.endswith("_count")]
    assert {s.labels["response_code"] for s in hist} == {"200", "503"}
    text = generate_latest(metrics.registry).decode()
    assert text.count("# TYPE meshc_requests_total counter") == 1
    assert text.count("# TYPE istio_requests_total counter") == 1
