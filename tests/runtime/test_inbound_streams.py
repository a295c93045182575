"""Inbound stream protection on real processes, both data planes and HTTP/2: MeshTimeout's
requestHeadersTimeout (a slowloris sending its head byte by byte is cut), streamIdleTimeout (a
stream that moves no byte is answered 408 or reset), maxStreamDuration (a response that never
ends is cut), HTTP/2 rapid reset (a client that opens and resets streams faster than the budget
gets GOAWAY ENHANCE_YOUR_CALM; other connections go on), and MeshCircuitBreaker's inbound outlier
detection (the app ejected, then restored).

The local app is a raw socket server whose paths misbehave on purpose: ``/hang`` never answers,
``/stall`` sends its head and 10 of 1,000,000 body bytes then goes silent, ``/trickle`` sends a chunk
every 50 ms and never ends. Each wait is for a timeout the test's bundle sets short, polled,
with ``HANG_DEADLINE`` only to turn a hang into a failure.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from h2_frames import HEADERS, RST_STREAM, FrameReader, frame
from hpack import Encoder
from runtime_harness import (
    HANG_DEADLINE,
    Plane,
    ProxyClient,
    endpoint_set,
    mesh_bundle,
    metric_value,
    service_bundle,
    simple_destination,
    wait_until,
    write_bundle,
)

from runtime.bundle import CircuitBreakerConf, Consecutive, Detectors, Inbound, Rule, TimeoutConf

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GOAWAY, ENHANCE_YOUR_CALM = 0x7, 0xB


class MisbehavingApp:
    """An HTTP/1.1 app on a raw socket: one thread per connection, each path misbehaving."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.requests: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            path = buf.split(b" ", 2)[1].decode()
            self.requests.append(path)
            try:
                if path.startswith("/hang"):
                    self.stop.wait(HANG_DEADLINE)
                elif path.startswith("/stall"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n" + b"s" * 10)
                    self.stop.wait(HANG_DEADLINE)
                elif path.startswith("/trickle"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    end = time.monotonic() + HANG_DEADLINE
                    while not self.stop.is_set() and time.monotonic() < end:
                        conn.sendall(b"1\r\nt\r\n")
                        self.stop.wait(0.05)
                else:
                    body = json.dumps({"path": path}).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
            except OSError:
                return  # the sidecar closed the connection: what the test wants to see

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def app() -> Iterator[MisbehavingApp]:
    a = MisbehavingApp()
    yield a
    a.close()


def _sidecar(plane: Callable[..., Plane], tmp_path: Path, app: str, timeout: TimeoutConf) -> Plane:
    inbound = Inbound(timeout=(Rule[TimeoutConf](conf=timeout),))
    return plane(
        "--service", "benigno", "--app", app, "--header-timeout", "30",
        "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", tmp_path / "state",
        "--mesh-bundle", write_bundle(tmp_path, mesh_bundle()),
        "--bundle", write_bundle(tmp_path, service_bundle("benigno", inbound)),
    )  # fmt: skip


def _raw(addr: tuple[str, int], request: bytes) -> tuple[bytes, float]:
    """Send ``request``, read until the sidecar closes: (every byte answered, seconds taken)."""
    start = time.monotonic()
    with socket.create_connection(addr, timeout=HANG_DEADLINE) as s:
        s.sendall(request)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got, time.monotonic() - start


def _refusals(sidecar: Plane, reason: str) -> float:
    return metric_value(sidecar.metrics(), "meshc_listener_refusals_total", reason=reason)


# -- HTTP/1.1 ------------------------------------------------------------------------------------


def test_a_head_sent_byte_by_byte_is_cut_at_the_request_headers_timeout(
    plane: Callable[..., Plane], app: MisbehavingApp, tmp_path: Path
) -> None:
    """requestHeadersTimeout 0.5 s replaces the listener's --header-timeout of 30 s: a client
    that dribbles its head a byte every 50 ms is answered 408 and closed, long before 30 s,
    and never reaches the app; a client that sends its head at once is served."""
    sidecar = _sidecar(plane, tmp_path, app.address, TimeoutConf(http_request_headers_timeout_ms=500))
    assert sidecar.inbound is not None
    head = b"GET /loris HTTP/1.1\r\nhost: benigno\r\nx-pad: " + b"p" * 2000 + b"\r\n\r\n"
    got = b""
    start = time.monotonic()
    with socket.create_connection(sidecar.inbound, timeout=HANG_DEADLINE) as loris:
        for i in range(len(head)):
            try:
                loris.sendall(head[i : i + 1])
            except OSError:
                break  # closed on us after the answer
            loris.settimeout(0.05)
            try:
                chunk = loris.recv(65536)
            except TimeoutError:
                continue
            got += chunk
            if not chunk or got.endswith(b"\r\n\r\n") or b"408" in got:
                break
        loris.settimeout(HANG_DEADLINE)
        with _reset_ok():
            while chunk := loris.recv(65536):
                got += chunk
    elapsed = time.monotonic() - start
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert elapsed < 20.0  # the policy's 0.5 s, not the listener's 30 s
    assert app.requests == []
    status, _, body = ProxyClient(sidecar.inbound).get("/ok")
    assert status == 200 and json.loads(body) == {"path": "/ok"}
    assert _refusals(sidecar, "header_timeout") >= 1


class _reset_ok:
    """A connection reset after the answer counts as the close it is."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return isinstance(exc[1], ConnectionResetError)


def test_a_stream_that_goes_idle_gets_408_before_its_response_and_a_cut_after(
    plane: Callable[..., Plane], app: MisbehavingApp, tmp_path: Path
) -> None:
    """streamIdleTimeout 0.5 s and no request timeout: an app that never answers gets its caller
    a 408 "stream idle timeout"; an app that stops half way through its body gets the client
    connection closed on the truncated body (HTTP/1.1 has no other reset)."""
    conf = TimeoutConf(http_request_timeout_ms=0, http_stream_idle_timeout_ms=500)
    sidecar = _sidecar(plane, tmp_path, app.address, conf)
    assert sidecar.inbound is not None
    got, elapsed = _raw(sidecar.inbound, b"GET /hang HTTP/1.1\r\nhost: benigno\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 408 ") and b"stream idle timeout" in got, got[:300]
    assert 0.5 <= elapsed < HANG_DEADLINE - 10
    got, elapsed = _raw(sidecar.inbound, b"GET /stall HTTP/1.1\r\nhost: benigno\r\n\r\n")
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"s" * 10  # truncated, then closed
    assert 0.5 <= elapsed < HANG_DEADLINE - 10
    assert _refusals(sidecar, "stream_idle_timeout") == 2


def test_a_stream_that_never_ends_is_cut_at_max_stream_duration(
    plane: Callable[..., Plane], app: MisbehavingApp, tmp_path: Path
) -> None:
    """maxStreamDuration 1 s: a response that trickles forever (never idle) is cut about then;
    an app that does not answer at all gets its caller a 408 at the same bound."""
    conf = TimeoutConf(http_request_timeout_ms=0, http_max_stream_duration_ms=1000)
    sidecar = _sidecar(plane, tmp_path, app.address, conf)
    assert sidecar.inbound is not None
    got, elapsed = _raw(sidecar.inbound, b"GET /trickle HTTP/1.1\r\nhost: benigno\r\n\r\n")
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body.count(b"t") >= 2
    assert not body.endswith(b"0\r\n\r\n")  # never a last chunk: the client sees the cut
    assert 1.0 <= elapsed < HANG_DEADLINE - 10
    got, elapsed = _raw(sidecar.inbound, b"GET /hang HTTP/1.1\r\nhost: benigno\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 408 ") and b"max stream duration reached" in got, got[:300]
    assert 1.0 <= elapsed < HANG_DEADLINE - 10
    status, _, _ = ProxyClient(sidecar.inbound).get("/ok")
    assert status == 200


def test_an_outbound_stream_is_cut_at_the_destinations_max_stream_duration(
    plane: Callable[..., Plane], app: MisbehavingApp, tmp_path: Path
) -> None:
    """Outbound MeshTimeout maxStreamDuration 1 s on every data plane: the destination's response
    that trickles forever is cut (never a last chunk), one that never begins is a 408."""
    dest = simple_destination(
        "benigno", timeout=TimeoutConf(http_request_timeout_ms=0, http_max_stream_duration_ms=1000)
    )
    eps = tmp_path / "eps.json"
    eps.write_text(endpoint_set(1, {"benigno": [(app.address, {"version": "v1"})]}).model_dump_json())
    sidecar = plane(
        "--service", "magnanimo", "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--state-dir", tmp_path / "state", "--endpoints", eps,
        "--mesh-bundle", write_bundle(tmp_path, mesh_bundle(destinations={"benigno": dest})),
        "--bundle", write_bundle(tmp_path, service_bundle("magnanimo")),
    )  # fmt: skip
    assert sidecar.outbound is not None
    got, elapsed = _raw(sidecar.outbound, b"GET http://benigno/trickle HTTP/1.1\r\nhost: benigno\r\n\r\n")
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body.count(b"t") >= 2, got[:300]
    assert not body.endswith(b"0\r\n\r\n")  # never a last chunk: the client sees the cut
    assert 1.0 <= elapsed < HANG_DEADLINE - 10
    got, elapsed = _raw(sidecar.outbound, b"GET http://benigno/hang HTTP/1.1\r\nhost: benigno\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 408 ") and b"max stream duration reached" in got, got[:300]
    assert 1.0 <= elapsed < HANG_DEADLINE - 10
    assert _refusals(sidecar, "max_stream_duration_reached") == 2
    status, _, _ = ProxyClient(sidecar.outbound).get("http://benigno/ok")
    assert status == 200


# -- HTTP/2 --------------------------------------------------------------------------------------


class H2Client:
    """An h2c client (prior knowledge) on a blocking socket, driven by the h2 library."""

    def __init__(self, addr: tuple[str, int], window: int | None = None) -> None:
        self.sock = socket.create_connection(addr, timeout=HANG_DEADLINE)
        self.conn = h2.connection.H2Connection()
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.sock.sendall(self.conn.data_to_send())

    def request(self, path: str) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "benigno")]
        self.conn.send_headers(sid, headers, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        return sid

    def until(self, sid: int) -> list[h2.events.Event]:
        """Events of stream ``sid`` until it ends or is reset (the window is never opened)."""
        seen: list[h2.events.Event] = []
        while True:
            data = self.sock.recv(65536)
            if not data:
                return seen
            for e in self.conn.receive_data(data):
                if getattr(e, "stream_id", None) == sid:
                    seen.append(e)
                    if isinstance(e, h2.events.StreamEnded | h2.events.StreamReset):
                        return seen
            out = self.conn.data_to_send()
            if out:
                self.sock.sendall(out)

    def close(self) -> None:
        self.sock.close()


def test_an_idle_h2_stream_gets_408_and_one_whose_client_opens_no_window_is_reset(
    plane: Callable[..., Plane], app: MisbehavingApp, tmp_path: Path
) -> None:
    """HTTP/2 to the inbound sidecar: the app that never answers gets the stream a 408 headers
    frame; a client that announces a zero window and never opens it holds the response's DATA,
    so the stream moves nothing and is reset (CANCEL) at the idle timeout, its connection kept."""
    conf = TimeoutConf(http_request_timeout_ms=0, http_stream_idle_timeout_ms=500)
    sidecar = _sidecar(plane, tmp_path, app.address, conf)
    assert sidecar.inbound is not None
    client = H2Client(sidecar.inbound, window=0)
    try:
        events = client.until(client.request("/hang"))
        (resp,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        assert dict(resp.headers)[b":status"] == b"408"
        assert dict(resp.headers)[b"x-meshc-reason"] == b"stream idle timeout"
        start = time.monotonic()
        events = client.until(client.request("/trickle"))
        assert any(isinstance(e, h2.events.ResponseReceived) for e in events)
        (reset,) = [e for e in events if isinstance(e, h2.events.StreamReset)]
        assert reset.error_code == h2.errors.ErrorCodes.CANCEL
        assert 0.5 <= time.monotonic() - start < HANG_DEADLINE - 10
        assert not any(isinstance(e, h2.events.DataReceived) for e in events)  # window 0: none
    finally:
        client.close()
    assert _refusals(sidecar, "stream_idle_timeout") == 2


def test_a_rapid_reset_flood_gets_goaway_enhance_your_calm_and_others_keep_working(
    plane: Callable[..., Plane], app: MisbehavingApp, tmp_path: Path
) -> None:
    """CVE-2023-44487: 1,500 streams opened and reset at once, past the budget of 1,000: the
    sidecar answers GOAWAY ENHANCE_YOUR_CALM and closes that connection; a second client on its
    own connection is served meanwhile and after."""
    sidecar = _sidecar(plane, tmp_path, app.address, TimeoutConf())
    assert sidecar.inbound is not None
    enc = Encoder()
    block = enc.encode(
        [(":method", "GET"), (":path", "/hang"), (":scheme", "http"), (":authority", "benigno")]
    )
    flood = b"".join(
        frame(HEADERS, 0x5, sid, block) + frame(RST_STREAM, 0, sid, (8).to_bytes(4, "big"))
        for sid in range(1, 3001, 2)
    )
    other = H2Client(sidecar.inbound)
    try:
        with socket.create_connection(sidecar.inbound, timeout=HANG_DEADLINE) as attacker:
            attacker.sendall(PREFACE + frame(0x4, 0, 0, b"") + flood)
            reader = FrameReader()
            frames: list[tuple[int, int, int, bytes]] = []
            with _reset_ok():
                while chunk := attacker.recv(65536):
                    frames += reader.feed(chunk)
        goaways = [f for f in frames if f[0] == GOAWAY]
        assert goaways, [f[0] for f in frames][:20]
        assert int.from_bytes(goaways[-1][3][4:8], "big") == ENHANCE_YOUR_CALM
        events = other.until(other.request("/ok"))
        (resp,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        assert dict(resp.headers)[b":status"] == b"200"
    finally:
        other.close()
    assert ProxyClient(sidecar.inbound).get("/after")[0] == 200
    assert _refusals(sidecar, "rapid_reset") == 1


# -- inbound outlier detection -------------------------------------------------------------------


def _cb_sidecar(plane: Callable[..., Plane], tmp_path: Path, app: str, panic: float | None) -> Plane:
    cb = CircuitBreakerConf(
        base_ejection_time_ms=1000,
        detectors=Detectors(total_errors=Consecutive(consecutive=2)),
        healthy_panic_threshold=panic,
    )
    inbound = Inbound(circuit_breaker=(Rule[CircuitBreakerConf](conf=cb),))
    return plane(
        "--service", "benigno", "--app", app,
        "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-dir", tmp_path / f"state-{panic}",
        "--mesh-bundle", write_bundle(tmp_path, mesh_bundle()),
        "--bundle", write_bundle(tmp_path, service_bundle("benigno", inbound)),
    )  # fmt: skip


def test_inbound_outlier_detection_ejects_the_app_and_restores_it(
    plane: Callable[..., Plane], upstream: Any, tmp_path: Path
) -> None:
    """MeshCircuitBreaker `from` with totalFailures 2, baseEjectionTime 1 s and
    healthyPanicThreshold 0: two 503s from the app eject it; requests then fail fast (503 no
    healthy upstream, HTTP/1.1 and HTTP/2 alike) without reaching it, and once the ejection time
    has passed the app is tried again and serves. With Envoy's default panic threshold (50) the
    one host's ejection leaves 0% healthy, so panic routing keeps sending it traffic."""
    app = upstream("benigno-v1")
    app.status = 503
    sidecar = _cb_sidecar(plane, tmp_path, app.address, 0.0)
    assert sidecar.inbound is not None
    client = ProxyClient(sidecar.inbound)
    assert [client.get(f"/fail{i}")[0] for i in range(2)] == [503, 503]
    assert app.total() == 2
    status, headers, _ = client.get("/while-ejected")
    assert (status, headers["x-meshc-reason"]) == (503, "no healthy upstream")
    h2c = H2Client(sidecar.inbound)
    try:
        events = h2c.until(h2c.request("/h2-while-ejected"))
    finally:
        h2c.close()
    (resp,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert dict(resp.headers)[b":status"] == b"503"
    assert app.total() == 2  # neither reached the app
    labels = {"destination_service": "benigno"}
    assert metric_value(sidecar.metrics(), "meshc_outlier_ejections_total", **labels) == 1
    app.status = 200
    wait_until(lambda: client.get("/after")[0] == 200, "the ejection to end")
    assert app.total() == 3

    panicking = _cb_sidecar(plane, tmp_path, app.address, None)
    assert panicking.inbound is not None
    app.status = 503
    client = ProxyClient(panicking.inbound)
    assert [client.get(f"/p{i}")[0] for i in range(3)] == [503, 503, 503]
    assert app.total() == 6  # the third went to the ejected app: Envoy's panic routing
    assert metric_value(panicking.metrics(), "meshc_outlier_ejections_total", **labels) == 1


# -- HTTP/2 read pause on a next hop's connection ----------------------------------------------


def _rss_mb(p: Plane) -> float:
    for line in Path(f"/proc/{p.pid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_an_h2_app_that_floods_pings_and_never_reads_stops_being_read(
    plane: Callable[..., Plane], tmp_path: Path
) -> None:
    """The read pause on a connection the sidecar opened (to an h2c app here): h2 answers every
    PING by itself, so an app that floods PINGs and reads nothing would pile the answers up in the
    sidecar. Now that connection is not read while more than 1 MiB waits for the app: the flood
    stalls at the app's send, the sidecar stays small, and the caller's connection still works."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # the kernel holds few answers
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    result: dict[str, int] = {}

    def flood() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(HANG_DEADLINE)
            got = b""
            while len(got) < len(PREFACE):
                got += conn.recv(65536)
            conn.sendall(frame(0x4, 0, 0, b""))  # our SETTINGS: the sidecar takes us for h2c
            pings = frame(0x6, 0, 0, b"apppings") * 4096
            conn.settimeout(1.0)  # a stalled send: the sidecar stopped reading
            sent = 0
            try:
                while sent < 60_000_000:
                    conn.sendall(pings)
                    sent += len(pings)
            except (TimeoutError, OSError):
                pass
            result["sent"] = sent

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    sidecar = _sidecar(plane, tmp_path, f"127.0.0.1:{listener.getsockname()[1]}", TimeoutConf())
    assert sidecar.inbound is not None
    before = _rss_mb(sidecar)
    client = H2Client(sidecar.inbound)
    try:
        client.request("/to-the-flooding-app")
        t.join(HANG_DEADLINE)
        grown = _rss_mb(sidecar) - before
        assert result["sent"] < 30_000_000 and grown < 16, (result, grown)
    finally:
        client.close()
        listener.close()
    status, _, _ = ProxyClient(sidecar.inbound).get("/")  # the app is gone: answered all the same
    assert status in (502, 503)
