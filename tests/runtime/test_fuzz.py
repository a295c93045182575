"""Fuzzing what a data plane reads from the network (issue 17 #2), sans-io, with hypothesis:

* bytes -> ``runtime.h1`` request and response readers (random and mutated valid messages, cut at
  random points): a message, or ``H1Error`` with 400/414/431/502, never another exception;
* every request head that parses -> the decision layer (``decide_outbound`` on magnanimo's
  sidecar, ``decide_gateway`` on the seed's gateway, both from the compiled seed): a ``Forward``
  or a ``Reply`` with a real status, never an exception;
* bundle and endpoint pushes whose bodies are mutated good ones or noise, each signed with the
  real key the data plane trusts (so they reach the parsers): an ACK of a valid body, else a NACK
  and nothing running changed (the engine's snapshot is the same object, the slots the same);
* HTTP/2 frame sequences (``h2_frames``: well-formed requests, then malformed frames of every
  kind, or noise) -> the GOAWAY filter and h2's server connection as ``runtime.h2proxy`` runs
  them: events or ``h2.exceptions.ProtocolError``, never another exception, and every request
  head a 400 reason or a verdict of the decision layer; the GOAWAY filter, cut anywhere, passes
  every other frame through unchanged. Over real sockets: ``test_fuzz_h2.py``.

A fixed seed and a short run here (``derandomize``); ``bench/fuzz.py`` runs the same properties
with ``MESHC_FUZZ_EXAMPLES`` examples each.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
from pathlib import Path
from typing import Any, cast

import h2.events
import h2.exceptions
import h2_frames
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from compiler.ca import PushSigner
from compiler.pipeline import compile_dir
from runtime import h1
from runtime.bundle import load_bundle
from runtime.decide import Forward, Reply, decide_gateway, decide_outbound, split_host
from runtime.engine import Engine, Snapshot
from runtime.h2conn import (
    MAX_FRAME_SIZE,
    PREFACE,
    GoawayFilter,
    grpc_status,
    grpc_timeout_s,
    parse_request,
    server_connection,
)
from runtime.metrics import Metrics
from runtime.protocol import Endpoint, EndpointSet, PushTarget
from runtime.pushes import Pushes
from runtime.security import PushTrust

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("MESHC_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=EXAMPLES <= 1000,  # the suite's short run is the same every time
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
OWN = {("127.0.0.1", 15001)}

REQUESTS = [
    b"GET /route1/x?a=1 HTTP/1.1\r\nHost: benigno:5000\r\nUser-Agent: t\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: benigno\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT /c HTTP/1.1\r\nHost: magnanimo\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET http://benigno:5000/abs HTTP/1.1\r\nHost: benigno\r\nConnection: keep-alive, x-a\r\nX-A: 1\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: benigno\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nrest",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nframes",
]


@st.composite
def mutated(draw: st.DrawFn, samples: list[bytes]) -> bytes:
    """A sample with a few byte-level edits (flip, insert, delete, duplicate a span), or noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.integers(0, 3))
        if op == 0:
            data[i] = draw(st.integers(0, 255))
        elif op == 1:
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2:
            del data[i : i + draw(st.integers(1, 8))]
        else:
            j = draw(st.integers(i, min(len(data), i + 40)))
            data[j:j] = data[i:j]
    return bytes(data)


class Sink:
    def __init__(self) -> None:
        self.heads: list[Any] = []
        self.body = 0

    def request_head(self, req: h1.Request) -> None:
        self.heads.append(req)

    def request_body(self, req: h1.Request, data: bytes) -> None:
        self.body += len(data)

    def request_end(self, req: h1.Request) -> None:
        pass

    def response_head(self, resp: h1.Response) -> None:
        self.heads.append(resp)

    def response_body(self, data: bytes) -> None:
        self.body += len(data)

    def response_end(self, resp: h1.Response) -> None:
        pass


def _feed(reader: h1.RequestReader | h1.ResponseReader, data: bytes, cuts: list[int]) -> None:
    start = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        if cut > start:
            if reader.feed(data[start:cut]) >= 0:
                return  # an Upgrade / CONNECT / 101: the rest is not HTTP
            start = cut


@FUZZ
@given(mutated(REQUESTS), st.lists(st.integers(0, 4096), max_size=4))
def test_the_request_reader_answers_or_refuses_never_crashes(data: bytes, cuts: list[int]) -> None:
    sink = Sink()
    try:
        _feed(h1.RequestReader(sink), data, cuts)
    except h1.H1Error as e:
        assert e.status in (400, 414, 431), e.status
    assert sink.body <= len(data)
    for req in sink.heads:
        assert isinstance(req.method, str) and req.method
        assert req.path().startswith("/") or req.method in ("CONNECT", "OPTIONS")


@FUZZ
@given(mutated(RESPONSES), st.lists(st.integers(0, 4096), max_size=4))
def test_the_response_reader_reads_or_refuses_never_crashes(data: bytes, cuts: list[int]) -> None:
    sink = Sink()
    try:
        _feed(h1.ResponseReader(sink), data, cuts)
    except h1.H1Error as e:
        assert e.status == 502, e.status
    assert sink.body <= len(data)
    for resp in sink.heads:
        assert 100 <= resp.status <= 999


# --- the decision layer, on the compiled seed -------------------------------------------------


def _endpoints(generation: int = 1) -> EndpointSet:
    eps = {
        "benigno": [
            Endpoint(address="127.0.0.1:7001", tags={"version": "v1"}),
            Endpoint(address="127.0.0.1:7002", tags={"version": "v2"}),
        ],
        "magnanimo": [Endpoint(address="127.0.0.1:7003", tags={"version": "v1"})],
    }
    return EndpointSet(generation=generation, services=eps)


@pytest.fixture(scope="module")
def seed() -> dict[str, bytes]:
    result = compile_dir(REPO / "policies")
    assert result.errors == 0
    return result.bundles


def _engine(seed: dict[str, bytes], service: str, tags: dict[str, str]) -> tuple[Engine, Snapshot]:
    engine = Engine(service, tags, rng=random.Random(1))
    mesh, svc = load_bundle(seed["default"]), load_bundle(seed[f"default/{service}"])
    snap = engine.build(mesh, svc, _endpoints())  # type: ignore[arg-type]
    engine.install(snap)
    return engine, snap


@pytest.fixture(scope="module")
def planes(seed: dict[str, bytes]) -> dict[str, tuple[Engine, Snapshot]]:
    gateway = next(k.split("/")[1] for k, v in seed.items() if b'"gateway":{' in v)
    return {
        "sidecar": _engine(seed, "magnanimo", {"version": "v1"}),
        "gateway": _engine(seed, gateway, {}),
    }


def _verdict_ok(v: Forward | Reply) -> None:
    assert isinstance(v, Forward | Reply), v
    if isinstance(v, Reply):
        assert 200 <= v.status <= 599, v


def test_the_seed_has_a_gateway_and_the_sidecar_routes_the_samples(
    planes: dict[str, tuple[Engine, Snapshot]],
) -> None:
    """The fuzzed decisions below run on real routes: a sample request is forwarded."""
    engine, snap = planes["sidecar"]
    sink = Sink()
    h1.RequestReader(sink).feed(REQUESTS[0])
    name, port = split_host(sink.heads[0].authority())
    assert isinstance(decide_outbound(engine, snap, sink.heads[0], name, port, OWN), Forward)


@FUZZ
@given(mutated(REQUESTS))
def test_every_request_that_parses_gets_a_verdict(
    planes: dict[str, tuple[Engine, Snapshot]], data: bytes
) -> None:
    sink = Sink()
    with contextlib.suppress(h1.H1Error):
        h1.RequestReader(sink).feed(data)
    for req in sink.heads:
        name, port = split_host(req.authority())
        engine, snap = planes["sidecar"]
        _verdict_ok(decide_outbound(engine, snap, req, name, port, OWN))
        engine, snap = planes["gateway"]
        for listener in snap.gateway:
            _verdict_ok(decide_gateway(engine, snap, req, listener, "http"))


# --- pushes -------------------------------------------------------------------------------------


class Signed:
    """A fresh data plane's ``Pushes`` running the seed, pinned to a real key, and that key to
    sign with (a new one per example: what a push is fuzzed against never depends on the last)."""

    def __init__(self, signer: PushSigner, seed: dict[str, bytes]) -> None:
        self.signer = signer
        trust = PushTrust(None, trust_key=signer.public_key_hex)
        self.engine = Engine("magnanimo", {"version": "v1"}, rng=random.Random(1))

        async def nothing() -> None:
            return None

        self.pushes = Pushes(self.engine, Metrics(), None, trust, lambda snap: None, nothing)
        self.generation = 1
        self.good = {"mesh": seed["default"], "service": seed["default/magnanimo"]}
        for role, body in self.good.items():
            assert self.bundle(body, role)[0] == 200
        assert self.endpoints(_endpoints(1).model_dump_json().encode())[0] == 200

    def _target(self) -> PushTarget:
        target = self.pushes.target()
        assert target is not None
        return target

    def bundle(self, body: bytes, role: str) -> tuple[int, dict[str, str]]:
        self.generation += 1
        gen, digest = self.generation, hashlib.sha256(body).hexdigest()
        sig = self.signer.sign(self._target(), role, digest, gen)
        return asyncio.run(self.pushes.push_bundle(body, digest, gen, role, sig))

    def endpoints(self, body: bytes) -> tuple[int, dict[str, str]]:
        try:  # the generation header must be the body's: take it from there when it has one
            gen = EndpointSet.model_validate_json(body).generation
        except ValueError:
            gen = 2
        sig = self.signer.sign(self._target(), "endpoints", hashlib.sha256(body).hexdigest(), gen)
        return asyncio.run(self.pushes.push_endpoints(body, gen, sig))


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> PushSigner:
    return PushSigner(tmp_path_factory.mktemp("fuzz-pushes"))


NEWER_ENDPOINTS = _endpoints(2).model_dump_json().encode()


def _running(s: Signed) -> tuple[Snapshot, dict[str, Any], Any]:
    return s.engine.snapshot, dict(s.pushes.slots), s.pushes.endpoints


@FUZZ
@given(st.data())
def test_a_bad_push_is_nacked_and_nothing_running_changes(
    signer: PushSigner, seed: dict[str, bytes], data: st.DataObject
) -> None:
    signed = Signed(signer, seed)
    role = data.draw(st.sampled_from(["mesh", "service", "endpoints"]))
    body = data.draw(mutated([signed.good.get(role) or NEWER_ENDPOINTS]))
    before = _running(signed)
    status, reply = signed.endpoints(body) if role == "endpoints" else signed.bundle(body, role)
    event(f"{role}: {status}")  # --hypothesis-show-statistics: how many were refused, and why
    if status == 200:  # the edit left a valid body: it runs
        assert "ack" in reply
        return
    assert status in (400, 409, 413), (status, reply)
    assert reply.get("nack")
    after = _running(signed)
    assert after[0] is before[0], "the running snapshot was replaced by a refused push"
    assert after[1] == before[1] and after[2] == before[2]


# --- HTTP/2, sans-io: the h2 connection meshc configures, the GOAWAY filter, request heads -------


settings_frame = h2_frames.settings_frame


def _h2_server(wire: bytes, cuts: list[int]) -> list[Any]:
    """``wire`` after the preface into a server connection as ``runtime.h2proxy`` runs one (the
    GOAWAY filter first, h2 next), cut at ``cuts``: the events, until h2 or the filter refuses."""
    conn, frames = server_connection(), GoawayFilter(server_side=True)
    data = PREFACE + settings_frame() + wire
    events: list[Any] = []
    start = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        if cut <= start:
            continue
        try:
            chunk, _ = frames.feed(data[start:cut])
            events += conn.receive_data(chunk) if chunk else []
        except h2.exceptions.ProtocolError:  # what h2proxy catches: a GOAWAY, then the close
            conn.data_to_send()
            break
        start = cut
        assert len(frames._rest) <= 9 + MAX_FRAME_SIZE  # never a whole oversized frame held
    return events


@FUZZ
@given(st.one_of(h2_frames.cases.map(h2_frames.render), st.binary(max_size=300)),
       st.lists(st.integers(0, 4096), max_size=3))  # fmt: skip
def test_h2_frames_give_events_or_a_protocol_error_and_every_request_a_verdict(
    planes: dict[str, tuple[Engine, Snapshot]], case: h2_frames.Rendered | bytes, cuts: list[int]
) -> None:
    """Only ``h2.exceptions.ProtocolError`` escapes the connection (what ``_Side.data_received``
    catches), and every request head h2 lets through is a 400 reason or a head that the decision
    layer answers, on the outbound sidecar and the gateway alike. (Rendered frames go in one by
    one, besides the random cuts, so the requests before a bad frame are still seen.)"""
    if isinstance(case, h2_frames.Rendered):
        skip = len(PREFACE) + len(settings_frame())
        wire, cuts = case.wire, cuts + [skip + end for end in case.frames]
    else:
        wire = case
    for e in _h2_server(wire, cuts):
        if not isinstance(e, h2.events.RequestReceived):
            continue
        parsed = parse_request(cast(list[tuple[str, str]], list(e.headers or ())), e.stream_ended is not None)
        event("refused" if isinstance(parsed, str) else "a request")
        if isinstance(parsed, str):
            continue
        assert parsed.path() is not None and parsed.query_string() is not None
        grpc_timeout_s(parsed.header_map().get("grpc-timeout"))
        name, port = split_host(parsed.authority())
        assert port is None or 0 <= port <= 99999
        engine, snap = planes["sidecar"]
        _verdict_ok(decide_outbound(engine, snap, parsed, name, port, OWN))
        engine, snap = planes["gateway"]
        for listener in snap.gateway:
            _verdict_ok(decide_gateway(engine, snap, parsed, listener, "http"))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 255), st.binary(max_size=40)), max_size=12),
       st.lists(st.integers(0, 4096), max_size=5))  # fmt: skip
def test_the_goaway_filter_passes_every_other_frame_through_unchanged(
    frames: list[tuple[int, int, bytes]], cuts: list[int]
) -> None:
    """Cut anywhere, the filter gives h2 exactly the frames that are not GOAWAY, in order, and
    reports each GOAWAY once."""
    wire = b"".join(h2_frames.frame(kind, flags, 0, payload) for kind, flags, payload in frames)
    want = b"".join(
        h2_frames.frame(k, f, 0, p) for k, f, p in frames if not (k == h2_frames.GOAWAY and len(p) >= 8)
    )
    filt = GoawayFilter(server_side=True)
    data = PREFACE + wire
    out, goaways, start = [], [], 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        if cut > start:
            chunk, found = filt.feed(data[start:cut])
            out.append(chunk)
            goaways += found
            start = cut
    assert b"".join(out) == PREFACE + want
    assert len(goaways) == sum(1 for k, _, p in frames if k == h2_frames.GOAWAY and len(p) >= 8)


def test_an_oversized_frame_is_refused_at_its_header_not_buffered() -> None:
    """Regression (found fuzzing): a frame announcing 16 MiB was held whole (the filter and h2
    both wait for the full frame before checking its length); now its 9-byte header is enough."""
    filt = GoawayFilter(server_side=True)
    filt.feed(PREFACE)
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        filt.feed(h2_frames.frame(h2_frames.DATA, 0, 1, b"x" * 1000, length=(1 << 24) - 1))
    # A CONTINUATION flood stops at MAX_HEADER_BLOCK bytes, not at h2's 64 frames of 16 KiB.
    filt = GoawayFilter(server_side=True)
    filt.feed(PREFACE + h2_frames.frame(h2_frames.HEADERS, 0, 1, b"\x82"))
    with pytest.raises(h2.exceptions.DenialOfServiceError):
        for _ in range(64):
            filt.feed(h2_frames.frame(h2_frames.CONTINUATION, 0, 1, b"\0" * 16000))


@pytest.mark.parametrize("digits", ["\xb2", "9" * 5000, "9" * 400])
def test_numbers_that_are_no_ascii_digits_are_refused_not_raised(digits: str) -> None:
    """Regression (found fuzzing): "²" passed ``str.isdigit`` and int() raised (and more than
    4300 digits, or a float overflow), which ended an HTTP/2 stream's task with a traceback and
    left the stream unanswered: a ``grpc-timeout``, an ``:authority`` port, a ``grpc-status``."""
    for unit in "SHm":
        assert grpc_timeout_s(digits + unit) is None
    assert grpc_status([("grpc-status", digits)]) == 2
    assert split_host("benigno:" + digits) == ("benigno", None)
    assert (grpc_timeout_s("250m"), grpc_status([("grpc-status", "14")]), split_host("b:80")) == (
        0.25,
        14,
        ("b", 80),
    )


def test_a_request_that_ends_with_its_head_has_no_content_length_but_0() -> None:
    """Regression (found fuzzing): h2 let ``content-length: 1`` on a HEADERS with END_STREAM
    through, and the next hop waited for that byte."""
    head = [(":method", "POST"), (":scheme", "http"), (":authority", "b"), (":path", "/")]
    assert isinstance(parse_request([*head, ("content-length", "1")], True), str)
    assert not isinstance(parse_request([*head, ("content-length", "0")], True), str)
    assert not isinstance(parse_request([*head, ("content-length", "1")], False), str)


@pytest.mark.parametrize("status", [b"000", b"099", b"042"])
def test_an_upstream_status_under_100_is_a_502(status: bytes) -> None:
    """Regression (found by atheris, bench/atheris_h1.py): llhttp takes any three digits, and
    ``HTTP/1.1 000`` reached the data plane as status 0 (RFC 9110 §15: invalid)."""
    with pytest.raises(h1.H1Error) as err:
        h1.ResponseReader(Sink()).feed(b"HTTP/1.1 " + status + b" OK\r\nContent-Length: 2\r\n\r\nok")
    assert err.value.status == 502
    sink = Sink()
    h1.ResponseReader(sink).feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 599 X\r\nContent-Length: 0\r\n\r\n")
    assert [r.status for r in sink.heads] == [100, 599]
