"""The sans-io side of HTTP/2 (``runtime.h2conn``), gRPC retries in ``decide.RetryState`` and the
``grpc_response_status`` label: no sockets, two real h2 state machines talking to each other."""

from __future__ import annotations

import random

import h2.events as ev
import pytest

from runtime._hosts import HostRegistry, Outcome
from runtime._lb import RoundRobin
from runtime._policy import RetryPolicy
from runtime.bundle import HttpRetry, TimeoutConf
from runtime.decide import APP, TARGET, Forward, Reply, RetryState
from runtime.engine import Target
from runtime.fastmetrics import RequestStats
from runtime.h2conn import (
    PREFACE,
    GoawayFilter,
    client_connection,
    goaway_frame,
    grpc_status,
    grpc_timeout_s,
    h1_request_head,
    h2_response_head,
    next_hop_headers,
    parse_request,
    preface_state,
    reply_headers,
    server_connection,
)
from runtime.headerops import ADD, REMOVE, SET


def test_preface_detection_needs_only_enough_bytes_to_tell() -> None:
    assert preface_state(PREFACE + b"\x00\x00") is True
    assert preface_state(b"PRI * HT") is None  # could still be the preface
    assert preface_state(b"P") is None  # ... or POST
    assert preface_state(b"POST / HTTP/1.1\r\n") is False
    assert preface_state(b"GET / HTTP/1.1\r\n") is False


def _request(headers: list[tuple[str, str]], end: bool = True) -> list[ev.Event]:
    """Send ``headers`` from a real h2 client to a real h2 server; the server's events."""
    client, server = client_connection(), server_connection()
    events = server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, headers, end_stream=end)
    events += server.receive_data(client.data_to_send())
    return events


def test_a_received_request_becomes_the_head_decide_reads() -> None:
    events = _request(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "benigno:5000"),
            (":path", "/pkg.Svc/Call%20x?y=1"),
            ("content-type", "application/grpc"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("te", "trailers"),
        ],
        end=False,
    )
    req = next(e for e in events if isinstance(e, ev.RequestReceived))
    head = parse_request(list(req.headers), req.stream_ended is not None)  # type: ignore[arg-type]
    assert not isinstance(head, str)
    assert (head.method, head.authority(), head.path(), head.query_string()) == (
        "POST",
        "benigno:5000",
        "/pkg.Svc/Call x",
        "y=1",
    )
    assert head.grpc and head.has_body and head.upgrade is None
    assert head.header_map()["cookie"] == "a=1; b=2"  # RFC 9113 §8.2.3: joined again


def test_connect_and_missing_pseudo_headers_are_refused() -> None:
    assert isinstance(parse_request([(":method", "CONNECT"), (":authority", "x:443")], True), str)
    assert isinstance(parse_request([(":method", "GET")], True), str)


def _head() -> object:
    head = parse_request(
        [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "benigno"),
            (":path", "/a?q=1"),
            ("te", "trailers"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-meshc-source-service", "spoofed"),
            ("x-drop", "1"),
        ],
        True,
    )
    assert not isinstance(head, str)
    return head


def test_the_next_hop_headers_carry_out_the_forward() -> None:
    head = _head()
    fwd = Forward(
        TARGET,
        "magnanimo",
        "benigno",
        path="/b",
        host="benigno.mesh",
        request_ops=((SET, "x-route", "r1"), (REMOVE, "x-drop", ""), (ADD, "x-add", "1")),
        source_header="magnanimo",
    )
    out = next_hop_headers(head, fwd, "127.0.0.1", secure_hop=True)  # type: ignore[arg-type]
    assert out[:4] == [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "benigno.mesh"),
        (":path", "/b?q=1"),
    ]
    rest = dict(out[4:])
    assert rest["te"] == "trailers" and "x-drop" not in rest
    assert (rest["x-route"], rest["x-add"]) == ("r1", "1")
    assert rest["x-meshc-source-service"] == "magnanimo"  # the claim is replaced, not kept
    assert rest["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    # Inbound in plaintext: no source header of its own, the caller's goes on as it came.
    kept = dict(next_hop_headers(head, Forward(APP, "x", "benigno"), "127.0.0.1", False)[4:])  # type: ignore[arg-type]
    assert kept["x-meshc-source-service"] == "spoofed"


def test_replies_are_grpc_statuses_for_grpc_callers() -> None:
    headers, body = reply_headers(Reply(403, "no TrafficPermission allows magnanimo"), grpc=True)
    assert body == b"" and headers[:3] == [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", "7"),
    ]
    assert dict(headers)["grpc-message"] == "no TrafficPermission allows magnanimo"
    assert grpc_status(reply_headers(Reply(503, "no healthy upstream"), True)[0]) == 14
    assert grpc_status(reply_headers(Reply(504, "upstream request timeout"), True)[0]) == 4
    assert (
        dict(reply_headers(Reply(503, "100% ünavailable"), True)[0])["grpc-message"]
        == "100%25 %C3%BCnavailable"
    )
    plain, body = reply_headers(Reply(503, "no healthy upstream"), grpc=False)
    assert plain[0] == (":status", "503") and body == b"no healthy upstream"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1S", 1.0),
        ("250m", 0.25),
        ("2M", 120.0),
        ("1H", 3600.0),
        ("5000u", 0.005),
        ("x", None),
        ("10", None),
        (None, None),
    ],
)
def test_grpc_timeout(value: str | None, seconds: float | None) -> None:
    assert grpc_timeout_s(value) == (pytest.approx(seconds) if seconds is not None else None)


def test_translation_to_and_from_http11() -> None:
    head, chunked = h1_request_head(
        [(":method", "POST"), (":scheme", "http"), (":authority", "app"), (":path", "/x"), ("a", "1")], True
    )
    assert chunked and head == b"POST /x HTTP/1.1\r\nhost: app\r\na: 1\r\ntransfer-encoding: chunked\r\n\r\n"
    _, chunked = h1_request_head([(":method", "POST"), (":path", "/"), ("content-length", "3")], True)
    assert not chunked
    assert h2_response_head(200, [(b"Content-Type", b"text/plain"), (b"Keep-Alive", b"5")], b"3") == [
        (":status", "200"),
        ("content-type", "text/plain"),
        ("content-length", "3"),
    ]


def _target(retry: HttpRetry | None, grpc: HttpRetry | None) -> Target:
    return Target(
        HostRegistry(),
        "benigno",
        {},
        (),
        RoundRobin(),
        TimeoutConf(http_request_timeout_ms=15_000),
        RetryPolicy(retry) if retry else None,
        None,
        None,
        None,
        1,
        RetryPolicy(grpc) if grpc else None,
    )


def test_grpc_calls_retry_by_the_grpc_conf_and_its_status_names() -> None:
    rng = random.Random(1)
    target = _target(HttpRetry(num_retries=2), HttpRetry(num_retries=2, retry_on=("unavailable",)))
    state = RetryState(target, "POST", 0, 0.0, grpc=True)
    assert state.allowed  # POST is fine for gRPC: every call is one
    assert state.failed(None, Outcome.OK, 200, rng, grpc_status=5) is None  # NOT_FOUND: not listed
    state = RetryState(target, "POST", 0, 0.0, grpc=True)
    assert state.failed(None, Outcome.OK, 200, rng, grpc_status=14) is not None
    state.end()
    # An HTTP request to the same target keeps the http conf (and its method rule).
    assert not RetryState(target, "POST", 0, 0.0).allowed
    # The caller's deadline replaces the route's request timeout.
    assert RetryState(target, "POST", 0, 100.0, grpc=True, deadline_s=0.5).deadline == pytest.approx(100.5)
    assert RetryState(target, "POST", 0, 100.0, grpc=True).deadline == pytest.approx(115.0)
    # A body that outgrew the replay buffer cannot be retried.
    state = RetryState(target, "POST", 0, 0.0, grpc=True)
    state.unreplayable()
    assert state.failed(None, Outcome.OK, 200, rng, grpc_status=14) is None


def test_grpc_statuses_label_istio_series_and_add_up_in_meshc_series() -> None:
    stats = RequestStats()
    stats.record("outbound", "magnanimo", "benigno", "", 200, 0.01, grpc=0)
    stats.record("outbound", "magnanimo", "benigno", "", 200, 0.01, grpc=14)
    stats.record("outbound", "magnanimo", "benigno", "", 200, 0.01)
    families = {f.name: f for f in stats.collect()}
    meshc = [s for s in families["meshc_requests"].samples if s.name == "meshc_requests_total"]
    assert [(s.labels["response_code"], s.value) for s in meshc] == [("200", 3.0)]
    istio = {
        (s.labels["request_protocol"], s.labels["grpc_response_status"]): s.value
        for s in families["istio_requests"].samples
        if s.name == "istio_requests_total"
    }
    assert istio == {("http", ""): 1.0, ("grpc", "0"): 1.0, ("grpc", "14"): 1.0}


def test_goaway_frames_are_taken_out_before_h2_sees_them() -> None:
    client, server = client_connection(), server_connection()
    wire = client.data_to_send()  # the preface and SETTINGS
    server_bytes = server.data_to_send()
    client.receive_data(server_bytes)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/")])
    wire += client.data_to_send() + goaway_frame(sid, 0)
    filt = GoawayFilter(server_side=True)
    fed: list[bytes] = []
    goaways = []
    for i in range(0, len(wire), 7):  # in pieces that cut frames (and the preface) anywhere
        data, found = filt.feed(wire[i : i + 7])
        fed.append(data)
        goaways += found
    assert goaways == [(sid, 0)]
    events = server.receive_data(b"".join(fed))
    assert any(isinstance(e, ev.RequestReceived) for e in events)
    assert not any(isinstance(e, ev.ConnectionTerminated) for e in events)
    # The connection is still open: the stream can be answered after the GOAWAY.
    server.send_headers(sid, [(":status", "200")], end_stream=True)
    assert any(isinstance(e, ev.ResponseReceived) for e in client.receive_data(server.data_to_send()))
