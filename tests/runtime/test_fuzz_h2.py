"""Fuzzing the HTTP/2 layer over real sockets (issue 17 #2): malformed frame sequences to a
running sidecar chain's h2c listeners (magnanimo's outbound -> benigno's inbound -> an HTTP/1.1
app; an edge gateway whose one route goes to benigno), on each data plane.

Each case is the preface, a client SETTINGS, frames from ``h2_frames`` (well-formed requests,
then malformed frames of every kind; a fifth of the cases byte-mutated on top), and a PING. The
properties, per case:

* the connection is alive or ended by the server: the PING is answered, or a GOAWAY or the
  connection's end comes; every stream the client ended gets a response HEADERS or RST_STREAM
  (or the connection ends) — no stream is left hanging;
* once the client half-closes, the server closes the connection (nothing wedged);
* after the case, a well-formed request on a fresh connection is served (200 from the app);
* no traceback ever reaches any data plane's stderr, the processes live, and their memory
  stays bounded over the run (RSS growth under ``RSS_GROWTH_MB``).

A fixed seed and ``MESHC_FUZZ_H2_EXAMPLES`` (default 200 per data plane) examples; ``bench/fuzz.py
--h2`` runs it long with fresh seeds.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2_frames
import pytest
from h2_frames import ACK, GOAWAY, HEADERS, PING, PING_PAYLOAD, RST_STREAM, Rendered
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from runtime_harness import (
    DATAPLANES,
    Plane,
    Upstream,
    endpoint_set,
    mesh_bundle,
    service_bundle,
    write_bundle,
)

from runtime.bundle import (
    CatalogService,
    GatewayBackend,
    GatewayConf,
    GatewayListener,
    GatewayMatch,
    GatewayRule,
    StringMatch,
)
from runtime.h2conn import PREFACE

DATAPLANE_CHOSEN_BY_TEST = True
EXAMPLES = int(os.environ.get("MESHC_FUZZ_H2_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=EXAMPLES <= 1000,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
CASE_DEADLINE = 10.0
"""How long a server may take to answer a case, and then to close (generous for a busy CI host,
and under the 15 s route timeout: a request that only that timeout answers is a hang)."""
RSS_GROWTH_MB = 64
SERVICES = {
    "benigno": CatalogService(port=5000, protocol="http", subsets=({"version": "v1"},)),
    "magnanimo": CatalogService(port=4000, protocol="http"),
}


@dataclass
class Chain:
    outbound: Plane
    inbound: Plane
    gateway: Plane
    app: Upstream
    stderr_seen: list[int] = field(default_factory=lambda: [0, 0, 0])

    def planes(self) -> tuple[Plane, Plane, Plane]:
        return self.outbound, self.inbound, self.gateway

    def address(self, which: str) -> tuple[str, int]:
        if which == "gateway":
            host, _, port = self.gateway.listening["listener:8080"].rpartition(":")
            return host, int(port)
        addr = self.outbound.outbound if which == "outbound" else self.inbound.inbound
        assert addr is not None
        return addr


@pytest.fixture(scope="module", params=DATAPLANES)
def chain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    """Passthrough is off: a fuzzed :authority never makes the sidecar dial an address."""
    tmp = tmp_path_factory.mktemp(f"h2fuzz-{request.param}")
    app = Upstream("benigno-v1")
    mesh = write_bundle(tmp, mesh_bundle(SERVICES, passthrough=False))
    made: list[Plane] = []
    try:
        inbound = Plane(
            ["--service", "benigno", "--tag", "version=v1", "--app", app.address,
             "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
             "--mesh-bundle", str(mesh), "--bundle", str(write_bundle(tmp, service_bundle("benigno")))],
            tmp, dataplane=request.param,
        )  # fmt: skip
        made.append(inbound)
        assert inbound.inbound is not None
        eps = tmp / "eps.json"
        eps.write_text(
            endpoint_set(
                1, {"benigno": [(f"127.0.0.1:{inbound.inbound[1]}", {"version": "v1"})]}
            ).model_dump_json()
        )
        outbound = Plane(
            ["--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
             "--mesh-bundle", str(mesh), "--bundle", str(write_bundle(tmp, service_bundle("magnanimo"))),
             "--endpoints", str(eps)],
            tmp, dataplane=request.param,
        )  # fmt: skip
        made.append(outbound)
        route = GatewayRule(
            matches=(GatewayMatch(path=StringMatch(kind="prefix", value="/")),),
            backends=(GatewayBackend(weight=1, service="benigno"),),
        )
        listener = GatewayListener(port=8080, protocol="HTTP", rules=(route,))
        gw_bundle = service_bundle("edge-gateway", gateway=GatewayConf(listeners=(listener,)))
        gateway = Plane(
            ["--service", "edge-gateway", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
             "--mesh-bundle", str(mesh), "--bundle", str(write_bundle(tmp, gw_bundle)),
             "--endpoints", str(eps)],
            tmp, module="runtime.gateway", dataplane=request.param,
        )  # fmt: skip
        made.append(gateway)
        yield Chain(outbound, inbound, gateway, app)
    finally:
        for p in made:
            p.close()
        app.close()


# --- a client that speaks frames ---------------------------------------------------------------


@dataclass
class Seen:
    ping: bool = False
    goaway: int | None = None
    eof: bool = False
    answered: frozenset[int] = frozenset()
    unanswered: frozenset[int] = frozenset()
    closed_after_half_close: bool = False


def converse(
    addr: tuple[str, int], wire: bytes, owed: set[int] | None, deadline: float = CASE_DEADLINE
) -> Seen:
    """Send a case and a PING; read until the PING is answered and every ``owed`` stream has a
    HEADERS or RST_STREAM (``owed`` None: the bytes may end inside a frame, so only the end of
    the connection is waited for), or the server ends the connection; then half-close and wait
    for the server to close."""
    seen = Seen()
    answered: set[int] = set()
    reader = h2_frames.FrameReader()
    end = time.monotonic() + deadline
    with socket.create_connection(addr, timeout=deadline) as sock:
        sock.settimeout(0.5)
        try:
            sock.sendall(PREFACE + h2_frames.settings_frame() + wire + h2_frames.ping_frame())
        except OSError:  # the server ended the connection while the case was still being sent
            seen.eof = True

        def read() -> bool:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return True
            except OSError:
                chunk = b""
            if not chunk:
                seen.eof = True
                return False
            for kind, flags, sid, payload in reader.feed(chunk):
                if kind == PING and flags & ACK and payload == PING_PAYLOAD:
                    seen.ping = True
                elif kind == GOAWAY and len(payload) >= 8:
                    seen.goaway = int.from_bytes(payload[4:8], "big")
                elif kind in (HEADERS, RST_STREAM) and sid:
                    answered.add(sid)
            return True

        while owed is not None and not seen.eof and seen.goaway is None and time.monotonic() < end:
            if seen.ping and owed <= answered:
                break
            if not read():
                break
        with_owed = owed or set()
        seen.unanswered = frozenset(with_owed - answered)
        if not seen.eof:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                seen.eof = True
        end = time.monotonic() + deadline  # the close has a deadline of its own
        while not seen.eof and time.monotonic() < end and read():
            pass
        seen.closed_after_half_close = seen.eof
    seen.answered = frozenset(answered)
    return seen


def served(addr: tuple[str, int], path: str = "/after-fuzz") -> int:
    """A well-formed request on a fresh connection (h2 as a client): its status."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    headers = [(":method", "GET"), (":scheme", "http"), (":authority", "benigno:5000"), (":path", path)]
    conn.send_headers(1, headers, end_stream=True)
    status = 0
    end = time.monotonic() + CASE_DEADLINE
    with socket.create_connection(addr, timeout=CASE_DEADLINE) as sock:
        sock.sendall(conn.data_to_send())
        while time.monotonic() < end:
            data = sock.recv(65536)
            if not data:
                break
            for e in conn.receive_data(data):
                if isinstance(e, h2.events.ResponseReceived):
                    status = int(dict(e.headers or ())[":status"])
                elif isinstance(e, h2.events.DataReceived):
                    conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                elif isinstance(e, h2.events.StreamEnded | h2.events.StreamReset):
                    return status
            sock.sendall(conn.data_to_send())
    return status


def rss_mb(plane: Plane) -> float:
    for line in Path(f"/proc/{plane.pid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def no_tracebacks(chain: Chain) -> None:
    """Neither data plane exited or wrote a traceback since the last check (so a failing case
    is the one that caused it, and hypothesis shrinks that one)."""
    for i, plane in enumerate(chain.planes()):
        assert plane.proc.poll() is None, f"the data plane exited: {plane.stderr()}"
        text = plane.stderr()
        new, chain.stderr_seen[i] = text[chain.stderr_seen[i] :], len(text)
        assert "Traceback" not in new and "exception" not in new.lower(), new[-3000:]


# --- the properties ----------------------------------------------------------------------------


def check_case(chain: Chain, which: str, rendered: Rendered, wire: bytes) -> Seen:
    intact = wire == rendered.wire and rendered.complete
    seen = converse(chain.address(which), wire, set(rendered.ended) if intact else None)
    event(
        f"{which}: "
        + (
            "GOAWAY"
            if seen.goaway is not None
            else "closed"
            if seen.eof
            else "PING answered"
            if seen.ping
            else "?"
        )
    )
    assert seen.closed_after_half_close, f"the connection stayed open after the client's half-close: {seen}"
    if intact:
        assert seen.ping or seen.goaway is not None or seen.eof, seen
        assert not seen.unanswered or seen.goaway is not None or seen.eof, f"streams left hanging: {seen}"
    assert served(chain.address("outbound")) == 200
    no_tracebacks(chain)
    return seen


def test_malformed_h2_never_crashes_hangs_or_grows_a_sidecar(chain: Chain) -> None:
    assert served(chain.address("outbound"), "/warm-up") == 200
    before = [rss_mb(p) for p in chain.planes()]

    @FUZZ
    @given(
        st.sampled_from(["outbound", "inbound", "gateway"]),
        h2_frames.cases.map(h2_frames.render).flatmap(
            lambda r: st.tuples(st.just(r), st.just(r.wire) | h2_frames.mutate(r.wire))
        ),
    )
    def one(which: str, case: tuple[Rendered, bytes]) -> None:
        check_case(chain, which, *case)

    one()
    after = [rss_mb(p) for p in chain.planes()]
    grown = [a - b for a, b in zip(after, before, strict=True)]
    assert all(g < RSS_GROWTH_MB for g in grown), (before, after)


# --- regressions the fuzzing found ---------------------------------------------------------------


def test_an_oversized_frame_gets_frame_size_error_at_once(chain: Chain) -> None:
    """A frame announcing 16 MiB used to be buffered whole (and the connection held open for
    it); its 9-byte header now ends the connection with GOAWAY FRAME_SIZE_ERROR."""
    oversized = h2_frames.frame(h2_frames.DATA, 0, 1, b"x" * 200_000, length=(1 << 24) - 1)
    for which in ("outbound", "inbound", "gateway"):
        seen = converse(chain.address(which), oversized, set())
        assert seen.goaway == 6 and seen.closed_after_half_close, seen  # FRAME_SIZE_ERROR
    assert served(chain.address("outbound")) == 200
    no_tracebacks(chain)


def test_headers_whose_numbers_are_no_ascii_digits_are_answered(chain: Chain) -> None:
    """``grpc-timeout: ²S`` and ``:authority: benigno:²`` used to raise in the stream's task (a
    traceback, and the stream never answered); now each stream gets its answer."""
    grpc = [("content-type", "application/grpc"), ("te", "trailers")]
    cases = [
        [(":authority", "benigno:5000"), *grpc, ("grpc-timeout", "\xb2S")],
        [(":authority", "benigno:5000"), *grpc, ("grpc-timeout", "9" * 400 + "H")],
        [(":authority", "benigno:\xb2")],
        [(":authority", "benigno:" + "9" * 5000)],
    ]
    for which in ("outbound", "inbound", "gateway"):
        for extra in cases:
            headers = [(":method", "GET"), (":scheme", "http"), (":path", "/n"), *extra]
            rendered = h2_frames.render([("headers", 1, headers, True, 0, False)])
            seen = converse(chain.address(which), rendered.wire, {1})
            assert 1 in seen.answered and seen.goaway is None, (which, extra[0], seen)
    no_tracebacks(chain)


def test_a_content_length_the_body_does_not_reach_is_refused_at_once(chain: Chain) -> None:
    """Regression (found fuzzing): h2 compares content-length with the body only at a DATA
    frame's END_STREAM, so ``content-length: 1`` on a HEADERS with END_STREAM, or a body cut
    short by trailers, was forwarded and the app waited for the rest (answered only by the
    route's 15 s timeout). Now a 400 and a RST_STREAM PROTOCOL_ERROR, at once."""
    head = [(":method", "POST"), (":scheme", "http"), (":authority", "benigno:5000"), (":path", "/cl")]
    no_body = h2_frames.render([("headers", 1, [*head, ("content-length", "1")], True, 0, False)])
    short = h2_frames.render(
        [
            ("headers", 1, [*head, ("content-length", "5")], False, 0, False),
            ("data", 1, b"ab", False, False),
            ("trailers", 1, [("x-t", "1")]),
        ]
    )
    for which in ("outbound", "inbound", "gateway"):
        for rendered in (no_body, short):
            seen = converse(chain.address(which), rendered.wire, {1}, deadline=5.0)
            assert 1 in seen.answered and seen.goaway is None, (which, seen)
    assert chain.app.hits["/cl"] == 0
    no_tracebacks(chain)


def test_empty_trailers_end_the_stream(chain: Chain) -> None:
    """Regression (found by the socket fuzzer, aiohttp plane): trailers that were empty, or only
    fields the proxy drops (``host``), became an empty header block, and h2 raised IndexError in
    the task that pumps the request on: a traceback, and the next hop never saw the end."""
    head = [(":method", "POST"), (":scheme", "http"), (":authority", "benigno:5000"), (":path", "/tr")]
    for trailers in ([], [("host", "x")]):
        rendered = h2_frames.render(
            [
                ("headers", 1, head, False, 0, False),
                ("data", 1, b"ab", False, False),
                ("trailers", 1, trailers),
            ]
        )
        for which in ("outbound", "inbound", "gateway"):
            seen = converse(chain.address(which), rendered.wire, {1}, deadline=5.0)
            assert 1 in seen.answered and seen.goaway is None, (which, trailers, seen)
    assert chain.app.hits["/tr"] == 6
    no_tracebacks(chain)


def test_a_client_that_floods_pings_and_never_reads_stops_being_read(chain: Chain) -> None:
    """Regression: h2 answers each PING by itself, and the answers of a client that never reads
    piled up in the sidecar (60 MB of PINGs: +52 MB RSS). Now the connection is not read while
    more than 1 MiB waits for the client, so the flood stalls at the client's send."""
    addr = chain.address("outbound")
    before = rss_mb(chain.outbound)
    sent = 0
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # the kernel holds few answers
        sock.settimeout(CASE_DEADLINE)
        sock.connect(addr)
        sock.sendall(PREFACE + h2_frames.settings_frame())
        pings = h2_frames.ping_frame() * 4096
        sock.settimeout(1.0)  # a stalled send: the sidecar stopped reading
        with contextlib.suppress(TimeoutError):
            while sent < 60_000_000:
                sock.sendall(pings)
                sent += len(pings)
        grown = rss_mb(chain.outbound) - before
        assert sent < 30_000_000 and grown < 16, (sent, grown)
        # Reading the answers lets the connection be read again: the PINGs keep being answered.
        sock.settimeout(CASE_DEADLINE)
        got = 0
        while got < 4 * len(pings):
            got += len(sock.recv(1 << 20))
    assert served(addr) == 200
    no_tracebacks(chain)


def test_a_stream_left_open_when_its_client_goes_away_is_let_go_quietly(chain: Chain) -> None:
    """Regression (found by the socket fuzzer, at the gateway): a GET without END_STREAM, then
    the client's half-close; the sidecar that forwarded it wrote to the next hop's connection
    from a ``call_soon`` after that uvloop handle had closed, and uvloop raised RuntimeError (a
    traceback on the outbound sidecar's and the gateway's stderr, every time)."""
    head = [(":method", "GET"), (":scheme", "http"), (":authority", "benigno:5000"), (":path", "/")]
    rendered = h2_frames.render([("headers", 1, head, False, 0, False)])
    for which in ("gateway", "outbound"):
        for _ in range(10):
            seen = converse(chain.address(which), rendered.wire, None)
            assert seen.closed_after_half_close, seen
    assert served(chain.address("outbound")) == 200
    no_tracebacks(chain)
