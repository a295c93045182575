"""The HTTP/2 byte layer: h2c and h2-over-mTLS client connections, their streams carried out.

One layer for both data planes (``--dataplane fast`` and ``aiohttp``): a listener's
``PrefaceSniffer`` hands a connection that starts with the HTTP/2 preface (or negotiated ``h2``
by ALPN) to ``H2Downstream``, and anything else to the HTTP/1.1 protocol it already had.

* ``H2Downstream`` is a client connection: each request stream is decided by
  ``runtime.decide`` exactly as an HTTP/1.1 request is (routes, splits, permissions, faults,
  rate limits, header changes) and carried out by one ``_Exchange`` task.
* ``H2Upstream`` is a connection to a next hop (a peer sidecar, over mTLS with ALPN ``h2``; the
  local app or a passthrough address, h2c with prior knowledge); streams of many exchanges share
  it, as long as the peer's ``MAX_CONCURRENT_STREAMS`` and a GOAWAY allow.
* Bodies stream frame by frame, never buffered whole: a DATA frame is acknowledged (its window
  given back to the sender) only once the other side has taken it, so flow control is end to end.
  A request that may be retried keeps its body (at most 64 KiB) for the replay. Trailers go on
  as trailers; a RST_STREAM on one side resets the other with the same code; a GOAWAY refuses the
  streams it did not take (``REFUSED_STREAM``, retriable) and retires the connection.
* Gateway mirrors go as bodyless streams whose answers are dropped; the bandwidth fault paces
  the response's DATA frames.
* gRPC (``content-type: application/grpc``): ``grpc-timeout`` is the call's deadline, answers
  made here are gRPC statuses in a trailers-only answer with HTTP 200 (``runtime.h2conn``), and
  Retry's ``grpc`` conditions are read from ``grpc-status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

import h2.events as ev
import h2.exceptions
from h2.connection import H2Connection
from h2.errors import ErrorCodes

from runtime import h1
from runtime._hosts import Host, Outcome
from runtime._policy import MAX_RETRY_BODY
from runtime.accesslog import AccessLog, app_entry, head_getter
from runtime.bundle import TrafficLogConf
from runtime.decide import (
    APP,
    NO_HOST,
    PASSTHROUGH,
    Fetcher,
    Forward,
    Reply,
    RetryState,
    StreamWatch,
    admit,
    admit_app,
    decide_gateway,
    decide_inbound,
    decide_outbound,
    failure_reply,
    no_fetcher,
    peer_hop,
    release,
    release_app,
    report_app,
    request_scheme,
    settle,
    split_host,
    stream_cut,
    stream_watch,
)
from runtime.engine import Engine, Target
from runtime.h2conn import (
    RESET_BURST,
    GoawayFilter,
    H2Head,
    Header,
    client_connection,
    goaway_frame,
    grpc_status,
    grpc_timeout_s,
    h1_request_head,
    h2_response_head,
    next_hop_headers,
    parse_request,
    reply_headers,
    reset_budget,
    response_headers,
    server_connection,
)
from runtime.h2sniff import PrefaceSniffer
from runtime.metrics import Metrics
from runtime.security import Credentials, PeerCache, wrong_peer
from runtime.tracing import Hop

__all__ = ["H2Downstream", "H2Plane", "H2Upstream"]

OUTBOUND, INBOUND, GATEWAY = 0, 1, 2
DIRECTION = ("outbound", "inbound", "gateway")
_PASSTHROUGH_TIMEOUT_S = 15.0
_CONNECT_S = 5.0
_TLS_KEY = "tls|"
_H1_HIGH = 1 << 20
_SETTINGS_FRAME = 0x4
_KEEPALIVE_S = 75.0
_UPSTREAM_IDLE_S = 30.0
_SWEEP_S = 5.0
_MAX_UNREAD = 1 << 20
"""Bytes queued for a client past which its connection is not read until they drain: h2 answers
PING and SETTINGS by itself, so a client that sends them and never reads grew this process by
what it sent (60 MB of PINGs: +52 MB RSS). DATA already waits for ``resume_writing``."""

Item = tuple[Any, ...]
"""What arrived on a stream: ("head", headers, ended), ("data", bytes, flow), ("trailers",
headers), ("end",), ("reset", code)."""


def _status(headers: list[Header]) -> int:
    """A next hop's ``:status`` (first, three ASCII digits, RFC 9113 §8.3.2), else 502."""
    if headers and headers[0][0] == ":status":
        value = headers[0][1]
        if len(value) == 3 and value.isascii() and value.isdigit():
            return int(value)
    return 502


def _trailers(side: _Side | H1Upstream, sid: int, headers: list[Header]) -> None:
    """Trailers on to the other side, ending the stream; with none left once connection-specific
    fields are dropped (or none at all: an empty HEADERS frame), just the end of the stream (h2
    cannot send an empty header block: it raised IndexError)."""
    out = response_headers(headers, ())
    if out:
        side.send_headers(sid, out, True)
    else:
        side.end_stream(sid)


def _write(tr: asyncio.Transport, data: bytes) -> bool:
    """Write unless the transport is gone; whether it was written. The connection is lost only a
    loop turn after a close or a reset by the peer, and meanwhile uvloop raises RuntimeError on a
    write to the closed handle (found fuzzing: a traceback from a ``flush_now`` call_soon)."""
    if tr.is_closing():
        return False
    try:
        tr.write(data)
    except RuntimeError:
        return False
    return True


class StreamGone(Exception):
    """The stream (or its connection) is gone: nothing more can be sent on it."""


class _Stream:
    """One stream's inbox on one connection, and the wake-up for its send window."""

    __slots__ = ("expect", "got", "inbox", "task", "window")

    def __init__(self, expect: int | None = None) -> None:
        self.inbox: asyncio.Queue[Item] = asyncio.Queue()
        self.window = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.expect = expect
        """A request's ``content-length`` (a client stream), checked when trailers end it."""
        self.got = 0


class _Side(asyncio.Protocol):
    """An h2 connection on a transport: events into stream inboxes, flow-controlled sends."""

    conn: H2Connection

    def __init__(self, plane: H2Plane, server_side: bool) -> None:
        self.plane = plane
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed = False
        self._flush_soon = False
        self.frames = GoawayFilter(server_side)
        self.read_paused = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            data, goaways = self.frames.feed(data)
        except h2.exceptions.ProtocolError as refused:  # a frame or header block past our limits
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection(refused.error_code)
            self.flush_now()
            if self.transport is not None:
                self.transport.close()
            return
        try:
            events = self.conn.receive_data(data) if data else []
        except h2.exceptions.ProtocolError:
            self.flush_now()
            if self.transport is not None:
                self.transport.close()
            return
        for e in events:
            self.on_event(e)
        for last, code in goaways:
            self.on_goaway(last, code)
        self.flush_now()
        tr = self.transport
        if (
            not self.read_paused
            and tr is not None
            and not tr.is_closing()
            and tr.get_write_buffer_size() > _MAX_UNREAD  # the peer does not read what it is sent
        ):
            # h2 answers PING and SETTINGS by itself: a peer (client or next hop) that floods
            # them and never reads would grow this buffer without bound. Reading waits for the
            # writes to drain.
            self.read_paused = True
            tr.pause_reading()

    def on_goaway(self, last_stream_id: int, error_code: int) -> None:
        """The peer sent GOAWAY: the streams up to ``last_stream_id`` may still complete."""

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()
        tr = self.transport
        if self.read_paused and tr is not None and not tr.is_closing():
            self.read_paused = False
            tr.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable.set()
        for s in self.streams.values():
            s.inbox.put_nowait(("reset", ErrorCodes.CONNECT_ERROR))
            s.window.set()

    # -- events -----------------------------------------------------------------------------

    def on_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.DataReceived):
            s = self.streams.get(e.stream_id)
            if s is not None:
                s.inbox.put_nowait(("data", e.data, e.flow_controlled_length))
            else:  # nobody reads this stream any more: give the window back at once
                self.ack(e.stream_id, e.flow_controlled_length)
        elif isinstance(e, ev.TrailersReceived):
            self._put(e.stream_id, ("trailers", e.headers))
        elif isinstance(e, ev.StreamEnded):
            self._put(e.stream_id, ("end",))
        elif isinstance(e, ev.StreamReset):
            self._put(e.stream_id, ("reset", e.error_code))
            s = self.streams.get(e.stream_id)
            if s is not None:
                s.window.set()
        elif isinstance(e, ev.WindowUpdated):
            if e.stream_id:
                s = self.streams.get(e.stream_id)
                if s is not None:
                    s.window.set()
            else:
                for s in self.streams.values():
                    s.window.set()
        elif isinstance(e, ev.RemoteSettingsChanged):
            for s in self.streams.values():  # a new initial window size may open every stream
                s.window.set()

    def _put(self, stream_id: int, item: Item) -> None:
        s = self.streams.get(stream_id)
        if s is not None:
            s.inbox.put_nowait(item)

    # -- sending ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what h2 has to send at the end of this loop iteration: the frames that several
        streams (and both directions of one) produce meanwhile leave in one write."""
        if not self._flush_soon:
            self._flush_soon = True
            self.plane.loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_soon = False
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.closed:
            _write(self.transport, data)

    def send_headers(self, sid: int, headers: list[Header], end: bool) -> None:
        if self.closed:
            raise StreamGone
        try:
            self.conn.send_headers(sid, headers, end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            raise StreamGone from e
        self.flush()

    async def send_data(self, sid: int, data: bytes, end: bool = False) -> None:
        """Send ``data`` as the peer's windows allow (waiting for WINDOW_UPDATE when shut)."""
        view = memoryview(data)
        while True:
            if self.closed:
                raise StreamGone
            if not self.writable.is_set():
                await self.writable.wait()
                continue
            s = self.streams.get(sid)
            try:
                window = self.conn.local_flow_control_window(sid)
            except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError) as e:
                raise StreamGone from e
            n = min(window, self.conn.max_outbound_frame_size, len(view))
            if n <= 0 and len(view):
                if s is None:
                    raise StreamGone
                s.window.clear()
                await s.window.wait()
                continue
            try:
                self.conn.send_data(sid, bytes(view[:n]), end_stream=end and n == len(view))
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
                raise StreamGone from e
            self.flush()
            view = view[n:]
            if not view:
                return

    def end_stream(self, sid: int) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.conn.end_stream(sid)
            self.flush()

    def reset(self, sid: int, code: int = ErrorCodes.CANCEL) -> None:
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.conn.reset_stream(sid, code)
            self.flush()

    def ack(self, sid: int, flow: int) -> None:
        """The other side took ``flow`` bytes of this stream: the sender may send more."""
        if flow and not self.closed:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.conn.acknowledge_received_data(flow, sid)
                self.flush()


class H2Downstream(_Side):
    """A client connection that speaks HTTP/2; one ``_Exchange`` task per request stream."""

    def __init__(self, plane: H2Plane, kind: int, port: int = 0) -> None:
        super().__init__(plane, True)
        self.kind = kind
        self.last_sid = 0
        """The highest request stream taken (what a GOAWAY of ours names)."""
        self.refusing = False
        """A GOAWAY went either way: no new streams; close once the open ones are done."""
        self.counted = False
        """It holds one of its listener's ``max_connections`` places."""
        self.idle_since = 0.0
        self.port = port
        self.peer = "unknown"
        self.secure = False
        self.tls_peer: tuple[bool, Any] = (False, None)
        self.reset_tokens = float(RESET_BURST)
        self.reset_at = 0.0
        """The client's RST_STREAM budget (``h2conn.reset_budget``) and when it was last drawn on."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)
        peer = tr.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "unknown"
        self.secure = tr.get_extra_info("sslcontext") is not None
        if self.kind == INBOUND:
            self.tls_peer = self.plane.peers.of(tr)
        self.conn = server_connection()
        plane = self.plane
        if plane.open[self.kind] >= plane.max_connections:  # the listener's --max-connections
            plane.metrics.listener_refusals.labels(DIRECTION[self.kind], "max_connections").inc()
            self.conn.close_connection(ErrorCodes.NO_ERROR, b"the listener has reached --max-connections")
            self.flush_now()
            tr.close()
            return
        plane.open[self.kind] += 1
        self.counted = True
        plane.downstreams.add(self)
        self.idle_since = plane.loop.time()
        self.flush()
        if plane.draining:
            self.goaway()

    def on_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.RequestReceived):
            assert e.stream_id is not None and e.headers is not None
            if self.refusing:  # after our GOAWAY: never processed, the client may retry it
                self.reset(e.stream_id, ErrorCodes.REFUSED_STREAM)
                return
            self.last_sid = max(self.last_sid, e.stream_id)
            headers = cast(list[Header], list(e.headers))  # str pairs: header_encoding is set
            length = next((v for n, v in headers if n == "content-length"), None)
            new = _Stream(int(length) if length is not None else None)  # h2 checked its digits
            self.streams[e.stream_id] = new
            exchange = _Exchange(self, e.stream_id, new, headers, e.stream_ended is not None)
            new.task = self.plane.loop.create_task(exchange.run())
            return
        if isinstance(e, ev.DataReceived):
            s = self.streams.get(e.stream_id)
            if s is not None and s.expect is not None:
                s.got += len(e.data)
        elif isinstance(e, ev.TrailersReceived):
            s = self.streams.get(e.stream_id)
            if s is not None and s.expect is not None and s.expect != s.got:
                # Malformed (RFC 9113 §8.1.1): h2 compares content-length with the body only at a
                # DATA frame's END_STREAM, so a body cut short by trailers would reach the next
                # hop, which would wait for the rest. A stream error; the exchange is cancelled.
                self.reset(e.stream_id, ErrorCodes.PROTOCOL_ERROR)
                if s.task is not None:
                    s.task.cancel()
                return
        elif isinstance(e, ev.StreamReset):  # the client cancelled: so is its exchange
            s = self.streams.get(e.stream_id)
            if s is not None and s.task is not None:
                s.task.cancel()
            if s is not None and not self.refusing:  # a reset before its answer ended
                now = self.plane.loop.time()
                self.reset_tokens, ok = reset_budget(self.reset_tokens, self.reset_at or now, now)
                self.reset_at = now
                if not ok:
                    self.calm_down()
                    return
        super().on_event(e)

    def calm_down(self) -> None:
        """Rapid reset (CVE-2023-44487): GOAWAY ENHANCE_YOUR_CALM and close; no stream after
        ``last_sid`` is taken, and the ones in flight end with the connection."""
        self.refusing = True
        self.plane.metrics.listener_refusals.labels(DIRECTION[self.kind], "rapid_reset").inc()
        tr = self.transport
        if tr is not None and not self.closed and not tr.is_closing():
            self.flush_now()
            _write(tr, goaway_frame(self.last_sid, ErrorCodes.ENHANCE_YOUR_CALM))
            tr.close()

    def on_goaway(self, last_stream_id: int, error_code: int) -> None:
        self.refusing = True
        self.close_if_idle()

    def goaway(self) -> None:
        """Drain: GOAWAY naming the last stream taken; those streams run to their end."""
        tr = self.transport
        if not self.refusing and tr is not None and not self.closed and not tr.is_closing():
            self.refusing = True
            self.flush_now()  # what h2 holds goes first, then the frame written beside it
            _write(tr, goaway_frame(self.last_sid))
        self.close_if_idle()

    def close_if_idle(self) -> None:
        if self.refusing and not self.streams and self.transport is not None and not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection(last_stream_id=self.last_sid)
            self.flush_now()
            self.transport.close()

    def stream_done(self, sid: int) -> None:
        self.idle_since = self.plane.loop.time()
        s = self.streams.pop(sid, None)
        if s is not None:
            while not s.inbox.empty():  # what the exchange never read: give its window back
                item = s.inbox.get_nowait()
                if item[0] == "data":
                    self.ack(sid, item[2])
        self.close_if_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.counted:
            self.counted = False
            self.plane.open[self.kind] -= 1
        self.plane.downstreams.discard(self)
        for s in list(self.streams.values()):
            if s.task is not None:
                s.task.cancel()
        self.plane.check_drained()


class H2Upstream(_Side):
    """A connection to a next hop; streams of many exchanges share it."""

    def __init__(self, plane: H2Plane, key: str) -> None:
        super().__init__(plane, False)
        self.key = key
        self.going_away = False
        self.alpn: str | None = None
        self.idle_since = plane.loop.time()
        self.settled: asyncio.Future[bool] = plane.loop.create_future()
        """True once the peer's SETTINGS arrived; False when it answered in HTTP/1.1."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)
        sslobj = tr.get_extra_info("ssl_object")
        if sslobj is not None:
            self.alpn = sslobj.selected_alpn_protocol()
            if self.alpn != "h2":  # an HTTP/1.1 peer: the plane moves this connection to H1Upstream
                return
        self.conn = client_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        if not self.settled.done() and len(data) >= 4 and data[3] != _SETTINGS_FRAME:
            # An HTTP/2 server's first frame is SETTINGS; anything else (an HTTP/1.1 error
            # answer to the preface, most likely) means this next hop speaks no h2c.
            self.settled.set_result(False)
            if self.transport is not None:
                self.transport.close()
            return
        super().data_received(data)

    def usable(self) -> bool:
        if self.closed or self.going_away:
            return False
        limit = self.conn.remote_settings.max_concurrent_streams
        return self.conn.open_outbound_streams < min(limit, 1000)

    def open(self, headers: list[Header], end: bool) -> tuple[int, _Stream]:
        sid = self.conn.get_next_available_stream_id()
        s = _Stream()
        self.streams[sid] = s
        self.send_headers(sid, headers, end)
        return sid, s

    def done(self, sid: int) -> None:
        self.idle_since = self.plane.loop.time()
        s = self.streams.pop(sid, None)
        if s is not None:
            while not s.inbox.empty():
                item = s.inbox.get_nowait()
                if item[0] == "data":
                    self.ack(sid, item[2])
        if self.going_away and not self.streams and self.transport is not None:
            self.flush_now()
            self.transport.close()

    def on_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.RemoteSettingsChanged) and not self.settled.done():
            self.settled.set_result(True)
        if isinstance(e, ev.ResponseReceived):
            assert e.stream_id is not None
            self._put(e.stream_id, ("head", list(e.headers or ()), e.stream_ended is not None))
            return
        super().on_event(e)

    def on_goaway(self, last_stream_id: int, error_code: int) -> None:
        self.going_away = True
        for sid, s in self.streams.items():
            if sid > last_stream_id:  # never processed: safe to retry elsewhere
                s.inbox.put_nowait(("reset", ErrorCodes.REFUSED_STREAM))
        self.plane.retire(self)
        if not self.streams and self.transport is not None:
            self.flush_now()
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.settled.done():
            self.settled.set_exception(ConnectionResetError("closed before its SETTINGS"))
            self.settled.exception()  # retrieved: the dial that waits sees the close itself
        self.plane.retire(self)


class H1Upstream(asyncio.Protocol):
    """A next hop that speaks only HTTP/1.1 (so its ALPN said, or its answer to the h2c
    preface): one exchange per connection, the stream translated both ways (a body of unknown
    length goes chunked; request trailers are dropped, HTTP/1.1 servers rarely read them).
    Reading pauses while more than ``_H1_HIGH`` bytes wait for the client to take them."""

    SID = 1

    def __init__(self, plane: H2Plane, key: str) -> None:
        self.plane = plane
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.streams: dict[int, _Stream] = {}
        self.writable = asyncio.Event()
        self.writable.set()
        self.reader = h1.ResponseReader(self)
        self.chunked = False
        self.head_only = False
        self.resp: h1.Response | None = None
        self.ended = False
        self.pending = 0
        self.paused = False

    def usable(self) -> bool:
        return False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def _gone(self) -> bool:
        return self.transport is None or self.closed or self.transport.is_closing()

    def open(self, headers: list[Header], end: bool) -> tuple[int, _Stream]:
        if self._gone():
            raise StreamGone
        head, self.chunked = h1_request_head(headers, not end)
        self.head_only = any(n == ":method" and v == "HEAD" for n, v in headers)
        s = self.streams[self.SID] = _Stream()
        assert self.transport is not None
        if not _write(self.transport, head):
            raise StreamGone
        return self.SID, s

    async def send_data(self, sid: int, data: bytes, end: bool = False) -> None:
        await self.writable.wait()
        if self._gone() or self.transport is None:
            raise StreamGone
        if not _write(
            self.transport, b"".join((h1.chunk_size(len(data)), data, b"\r\n")) if self.chunked else data
        ):
            raise StreamGone
        if end:
            self.end_stream(sid)

    def end_stream(self, sid: int) -> None:
        if self.chunked and not self._gone() and self.transport is not None:
            _write(self.transport, h1.LAST_CHUNK)

    def send_headers(self, sid: int, headers: list[Header], end: bool) -> None:
        self.end_stream(sid)

    def reset(self, sid: int, code: int = ErrorCodes.CANCEL) -> None:
        if self.transport is not None:
            self.transport.close()

    def ack(self, sid: int, flow: int) -> None:
        self.pending -= flow
        if self.paused and self.pending < _H1_HIGH // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def done(self, sid: int) -> None:
        self.streams.pop(sid, None)
        if self.transport is not None:
            self.transport.close()

    def _put(self, item: Item) -> None:
        s = self.streams.get(self.SID)
        if s is not None:
            s.inbox.put_nowait(item)

    # -- asyncio.Protocol / h1.ResponseSink -------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
        except h1.H1Error:
            self._put(("reset", ErrorCodes.PROTOCOL_ERROR))
            if self.transport is not None:
                self.transport.close()

    def response_head(self, resp: h1.Response) -> None:
        if resp.status < 200:
            return  # 100 Continue and friends: HTTP/2 callers need none of them
        self.resp = resp
        ended = self.head_only or resp.status in (204, 304)
        self._put(("head", h2_response_head(resp.status, resp.headers, resp.length), ended))
        if ended:
            self.ended = True

    def response_body(self, data: bytes) -> None:
        if self.resp is None or self.ended:
            return
        self.pending += len(data)
        self._put(("data", data, len(data)))
        if self.pending > _H1_HIGH and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def response_end(self, resp: h1.Response) -> None:
        if self.resp is not None and not self.ended:
            self.ended = True
            self._put(("end",))

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable.set()
        resp = self.resp
        if resp is not None and not self.ended and exc is None and resp.length is None and not resp.chunked:
            self.ended = True  # a body delimited by the connection's end: that end completes it
            self._put(("end",))
        elif not self.ended:
            self._put(("reset", ErrorCodes.CONNECT_ERROR))


Upstream = H2Upstream | H1Upstream


class H2Plane:
    """What the HTTP/2 connections of one data plane share: engine, upstream connections, drain."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        creds: Credentials,
        *,
        app_address: str | None = None,
        own_addresses: set[tuple[str, int]] | None = None,
        header_timeout_s: float = 10.0,
        max_connections: int = 1024,
        open_counts: list[int] | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.creds = creds
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.open = open_counts if open_counts is not None else [0, 0, 0]
        """Client connections open per listener kind; the fast path's own list when it runs,
        so one ``--max-connections`` bounds HTTP/1.1 and HTTP/2 connections together."""
        self._sweeper: asyncio.TimerHandle | None = None
        self.peers = PeerCache()
        self.own_addresses = own_addresses if own_addresses is not None else set()
        if app_address:
            host, _, port = app_address.rpartition(":")
            self.app: tuple[str, int] = (host.strip("[]"), int(port))
        else:
            self.app = ("", 0)
        self.access_log = AccessLog(metrics.logs, engine)
        self.upstreams: dict[str, list[H2Upstream]] = {}
        self.h1_only: set[str] = set()
        """Plaintext next hops that answered the h2c preface in HTTP/1.1."""
        self._locks: dict[str, asyncio.Lock] = {}
        self.downstreams: set[H2Downstream] = set()
        self.fetch: Fetcher = no_fetcher
        """Fetches a pending destination's config (``decide.Fetch``); set by the server."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self._drained: asyncio.Future[None] | None = None
        self._alpn: tuple[ssl.SSLContext | None, ssl.SSLContext | None] = (None, None)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(_SWEEP_S, self._sweep)
        return self._loop

    def _sweep(self) -> None:
        """Close client connections idle past the keep-alive, and idle upstream connections."""
        loop = self.loop
        now = loop.time()
        for d in list(self.downstreams):
            if not d.streams and d.idle_since < now - _KEEPALIVE_S:
                d.goaway()
        for conns in list(self.upstreams.values()):
            for up in list(conns):
                if not up.streams and up.idle_since < now - _UPSTREAM_IDLE_S and up.transport is not None:
                    self.retire(up)
                    up.transport.close()
        self._sweeper = loop.call_later(_SWEEP_S, self._sweep)

    def factory(self, kind: str, port: int = 0) -> Callable[[], asyncio.Protocol]:
        code = {"outbound": OUTBOUND, "inbound": INBOUND, "gateway": GATEWAY}[kind]
        return lambda: H2Downstream(self, code, port)

    def sniffer(
        self, h1: Callable[[], asyncio.BaseProtocol], kind: str, port: int = 0
    ) -> Callable[[], asyncio.Protocol]:
        """A listener's protocol factory that serves HTTP/2 here and HTTP/1.1 with ``h1``."""
        h2f = self.factory(kind, port)
        timeout = self.header_timeout_s
        refusals = self.metrics.listener_refusals.labels(kind, "header_timeout")
        return lambda: PrefaceSniffer(h1, h2f, timeout, refusals.inc)

    def client_ctx(self) -> ssl.SSLContext | None:
        """The mesh client context with ALPN ``h2``, ``http/1.1`` (made once per certificate)."""
        base = self.creds.client_ctx
        if base is None:
            return None
        made_from, ctx = self._alpn
        if made_from is not base or ctx is None:
            ident = self.creds.identity
            assert ident is not None
            from runtime.identity import client_context

            ctx = client_context(ident)
            ctx.set_alpn_protocols(["h2", "http/1.1"])
            self._alpn = (base, ctx)
        return ctx

    async def upstream(self, key: str, host: str, port: int, tls: bool, dest: str) -> Upstream:
        """A usable connection to ``host:port``: a pooled one, else a new one (one dial at a time
        per address, so a burst of streams shares one connection)."""
        for up in self.upstreams.get(key, ()):
            if up.usable():
                return up
        if key in self.h1_only:
            _, h1up = await self.loop.create_connection(lambda: H1Upstream(self, key), host, port)
            return h1up
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            for up in self.upstreams.get(key, ()):
                if up.usable():
                    return up
            found = await self._dial(key, host, port, tls, dest)
            if isinstance(found, H2Upstream):
                self.upstreams.setdefault(key, []).append(found)
            return found

    async def _dial(self, key: str, host: str, port: int, tls: bool, dest: str) -> Upstream:
        """A new connection: HTTP/2 when the peer speaks it (ALPN over TLS; in plaintext, its
        SETTINGS in answer to the preface), else HTTP/1.1 (and that address is remembered)."""
        loop = self.loop
        if tls:
            ctx = self.client_ctx()
            if ctx is None:
                raise OSError("no mesh certificate")
            _, up = await loop.create_connection(
                lambda: H2Upstream(self, key), host, port, ssl=ctx, server_hostname=host
            )
            why = wrong_peer(self.peers, up.transport, dest)
            if why is not None:
                if up.transport is not None:
                    up.transport.close()
                raise OSError(why)
            if up.alpn != "h2" and up.transport is not None:  # an HTTP/1.1 peer: same connection
                h1up = H1Upstream(self, key)
                up.transport.set_protocol(h1up)
                h1up.connection_made(up.transport)
                return h1up
            return up
        _, plain = await loop.create_connection(lambda: H2Upstream(self, key), host, port)
        if await plain.settled:
            return plain
        if len(self.h1_only) < 4096:
            self.h1_only.add(key)
        _, h1up = await loop.create_connection(lambda: H1Upstream(self, key), host, port)
        return h1up

    def mirror(self, target: Target, head: H2Head, fwd: Forward, peer: str) -> None:
        """A bodyless copy of the request to one of ``target``'s hosts, its answer dropped
        (Envoy's request mirror; its authority gets ``-shadow``, as on HTTP/1.1)."""
        host = target.pick(self.loop.time(), self.engine.rng)
        if host is None:
            return
        self.metrics.mirrors.labels(target.service).inc()
        hop = peer_hop(self.engine.snapshot, self.creds.client_ctx is not None, "", target.service)
        if isinstance(hop, Reply):
            return  # no certificate yet: the peer would refuse plaintext
        headers = next_hop_headers(head, fwd, peer, hop)
        name = split_host(head.authority())[0]
        headers[2] = (":authority", f"{name}-shadow")
        task = self.loop.create_task(self._mirror(target, host, hop, headers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mirror(self, target: Target, host: Host, tls: bool, headers: list[Header]) -> None:
        key = (_TLS_KEY if tls else "") + host.address
        with contextlib.suppress(OSError, TimeoutError, StreamGone, h2.exceptions.ProtocolError):
            async with asyncio.timeout(target.request_timeout_s or _PASSTHROUGH_TIMEOUT_S):
                up = await self.upstream(key, host.host, host.port, tls, target.service)
                sid, stream = up.open(headers, True)
                try:
                    while (item := await stream.inbox.get())[0] not in ("end", "reset", "trailers"):
                        if item[0] == "data":
                            up.ack(sid, item[2])
                        elif item[0] == "head" and item[2]:
                            break
                finally:
                    up.reset(sid)
                    up.done(sid)

    def retire(self, up: H2Upstream) -> None:
        conns = self.upstreams.get(up.key)
        if conns is not None and up in conns:
            conns.remove(up)
            if not conns:
                del self.upstreams[up.key]

    def check_drained(self) -> None:
        if self.draining and not self.downstreams and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self, deadline: float) -> None:
        """GOAWAY to every client connection; wait for their streams (until ``deadline``)."""
        self.draining = True
        loop = self.loop
        self._drained = loop.create_future()
        for d in list(self.downstreams):
            d.goaway()
        self.check_drained()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._drained), max(0.0, deadline - loop.time()))
        for d in list(self.downstreams):
            if d.transport is not None:
                d.transport.abort()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        self.access_log.close()
        for conns in list(self.upstreams.values()):
            for up in conns:
                if up.transport is not None:
                    up.transport.close()
        self.upstreams.clear()


class _Exchange:
    """One request stream, from its head to the end of its response (a task)."""

    def __init__(
        self, down: H2Downstream, sid: int, stream: _Stream, headers: list[Header], end: bool
    ) -> None:
        self.down = down
        self.plane = down.plane
        self.sid = sid
        self.inbox = stream.inbox
        self.headers = headers
        self.end = end
        self.head: H2Head | None = None
        self.grpc = False
        self.source = ""
        self.dest = ""
        self.subset = ""
        self.status = 0
        self.grpc_status: int | None = None
        self.span: Hop | None = None
        """This hop's span (its ``Forward.trace``): access log and Zipkin."""
        self.req_bytes = 0
        self.resp_bytes = 0
        self.started = False
        """The response head went to the client."""
        self.req_done = end
        self.req_trailers: list[Header] | None = None
        self.replay: list[bytes] | None = None
        self.replay_len = 0
        self.retry: RetryState | None = None
        self.target: Target | None = None
        self.host: Host | None = None
        self.app: Forward | None = None
        """A request to the local app: its slot and access logs (``AppPolicy``)."""
        self.reply_logs: tuple[TrafficLogConf, ...] = ()
        """The inbound access logs of a request answered before it reached the app."""
        self.up: Upstream | None = None
        self.usid = 0
        self.pump: asyncio.Task[None] | None = None
        self.deadline: float | None = None
        self.t0 = time.perf_counter()
        self.watch: StreamWatch | None = None
        self.watch_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self.cut: str | None = None
        """The stream timeout that cancelled this exchange (``decide.StreamWatch``)."""

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            self.status = self.status or 499  # the client reset the stream or went away
            if self.cut is not None and not self.down.closed:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()  # our own cancellation: the stream is answered, or reset
                with contextlib.suppress(StreamGone, asyncio.CancelledError):
                    await self._cut(self.cut)
        except StreamGone:
            self.status = self.status or 499
        finally:
            if self.watch_timer is not None:
                self.watch_timer.cancel()
            self._stop_upstream(ErrorCodes.CANCEL)
            elapsed = time.perf_counter() - self.t0
            target = self.target
            if target is not None and target.log is not None:
                self._log(target, elapsed)
            app = self.app
            if app is not None and app.app.logs:
                host, port = self.plane.app
                self._log_app(app.app.logs, f"{host}:{port}", elapsed)
            elif self.reply_logs:
                self._log_app(self.reply_logs, "", elapsed)
            self._release()
            self.plane.metrics.stats.record(
                DIRECTION[self.down.kind],
                self.source,
                self.dest,
                self.subset,
                self.status,
                elapsed,
                self.req_bytes,
                self.resp_bytes,
                grpc=self.grpc_status,
            )
            head = self.head
            self.plane.metrics.spans.record(
                self.plane.engine.snapshot.trace_backend,
                self.span,
                service=self.plane.engine.service,
                direction=DIRECTION[self.down.kind],
                start_s=time.time() - elapsed,
                duration_s=elapsed,
                method=head.method if head is not None else "",
                path=head.path() if head is not None else "",
                status=self.status,
                grpc_status=self.grpc_status,
            )
            if not self.started and not self.down.closed:
                # No answer went out (a bug raised before one): a reset, never a stream left open.
                self.down.reset(self.sid, ErrorCodes.INTERNAL_ERROR)
            elif not self.req_done and not self.down.closed:
                self.down.reset(self.sid, ErrorCodes.NO_ERROR)  # answered before the body ended
            self.down.stream_done(self.sid)

    # -- deciding ---------------------------------------------------------------------------

    async def _run(self) -> None:
        parsed = parse_request(self.headers, self.end)
        engine = self.plane.engine
        if isinstance(parsed, str):
            await self._answer(Reply(400, parsed, engine.service))
            return
        head = self.head = parsed
        self.grpc = head.grpc
        snap = engine.snapshot
        down = self.down
        verdict: Forward | Reply
        if down.kind == OUTBOUND:
            name, port = split_host(head.authority())
            own = self.plane.own_addresses
            verdict = await settle(
                engine,
                decide_outbound(engine, snap, head, name, port, own),
                self.plane.fetch,
                lambda snap: decide_outbound(engine, snap, head, name, port, own),
            )
        elif down.kind == INBOUND:
            is_tls, identity = down.tls_peer
            hmap = head.header_map()
            caller = hmap.get("x-meshc-source-service", "")
            verdict = decide_inbound(engine, snap, is_tls, identity, caller, hmap.get)
        else:
            xfp = head.header_map().get("x-forwarded-proto")
            verdict = decide_gateway(engine, snap, head, down.port, request_scheme(xfp, down.secure))
        if isinstance(verdict, Reply):
            await self._answer(verdict)
            return
        fwd = verdict
        self.source, self.dest = fwd.source, fwd.dest
        self.span = fwd.trace
        watch = stream_watch(fwd, self.plane.loop.time())
        if watch is not None:
            self._watch(watch)
        timeout = grpc_timeout_s(head.header_map().get("grpc-timeout")) if head.grpc else None
        if timeout is not None:
            self.deadline = self.plane.loop.time() + timeout
        for mirror in fwd.mirrors:
            self.plane.mirror(mirror, head, fwd, self.down.peer)
        if fwd.delay_s:
            await asyncio.sleep(fwd.delay_s)
        if fwd.target is not None:
            await self._to_target(head, fwd, fwd.target, timeout)
            return
        if fwd.kind == PASSTHROUGH:
            assert fwd.address is not None
            name, port = fwd.address
            await self._once(head, fwd, f"{name}:{port}", name, port, timeout or _PASSTHROUGH_TIMEOUT_S)
            return
        assert fwd.kind == APP
        refused = admit_app(fwd, engine.clock())
        if refused is not None:
            await self._answer(refused)
            return
        self.app = fwd
        host, port = self.plane.app
        # A caller's grpc-timeout replaces the request timeout, as for outbound requests.
        limit = timeout if timeout is not None else fwd.app.request_timeout_s
        await self._once(head, fwd, f"{host}:{port}", host, port, limit)

    # -- stream timeouts ---------------------------------------------------------------------

    def _watch(self, watch: StreamWatch) -> None:
        self.watch = watch
        self._task = asyncio.current_task()
        self.watch_timer = self.plane.loop.call_at(watch.next_check(), self._check_watch)

    def _moved(self) -> None:
        """A byte of the request or the response moved (the stream idle timer starts again)."""
        watch = self.watch
        if watch is not None:
            watch.last = self.plane.loop.time()

    def _check_watch(self) -> None:
        watch = self.watch
        if watch is None:
            return
        loop = self.plane.loop
        why = watch.due(loop.time())
        if why is None:
            self.watch_timer = loop.call_at(watch.next_check(), self._check_watch)
            return
        self.watch_timer = None
        self.watch = None
        self.cut = why
        self.plane.metrics.listener_refusals.labels(DIRECTION[self.down.kind], why.replace(" ", "_")).inc()
        if self._task is not None:
            self._task.cancel()

    async def _cut(self, why: str) -> None:
        """A stream timeout passed: before the response, a 408 (a gRPC status for gRPC) with no
        body, since a client that opens no window would hold a body; after it, RST_STREAM."""
        self._stop_upstream(ErrorCodes.CANCEL)
        if self.started:
            self.down.reset(self.sid, ErrorCodes.CANCEL)
            return
        reply = stream_cut(self.source, self.dest, why)
        reply.body = ""
        await self._answer(reply)

    # -- carrying out -----------------------------------------------------------------------

    async def _once(
        self, head: H2Head, fwd: Forward, key: str, host: str, port: int, timeout: float | None
    ) -> None:
        """One attempt, no retry (the local app, a passthrough address)."""
        outcome, resp = await self._attempt(head, fwd, key, host, port, False, timeout)
        if fwd.kind == APP and fwd.app.outlier is not None:
            engine = self.plane.engine
            if resp is not None:
                outcome = engine.outcome_for_status(resp[0])
            if report_app(fwd, outcome, engine.clock()):
                self.plane.metrics.ejections.labels(fwd.dest, key).inc()
        if resp is None:
            await self._answer(failure_reply(fwd, outcome, "connection failed"))
            return
        await self._relay(fwd, *resp)

    async def _to_target(self, head: H2Head, fwd: Forward, target: Target, timeout: float | None) -> None:
        plane = self.plane
        engine = plane.engine
        loop = plane.loop
        self.dest, self.subset = target.service, target.subset
        refused = admit(target, self.source)
        if refused is not None:
            await self._answer(refused)
            return
        length = head.header_map().get("content-length", "0") if head.has_body else "0"
        retry = self.retry = RetryState(
            target,
            head.method,
            int(length) if length.isdigit() else 0,
            loop.time(),
            fwd.policy,
            grpc=head.grpc,
            deadline_s=timeout,
        )
        if retry.allowed and head.has_body:
            self.replay = []
        target.active += 1
        self.target = target
        key_header = head.header_map().get("x-meshc-hash-key") or head.path()
        while True:
            host = target.pick(engine.clock(), engine.rng, key_header, retry.tried)
            if host is None:
                await self._answer(Reply(503, NO_HOST, self.source, target.service))
                return
            hop = peer_hop(
                engine.snapshot, self.plane.creds.client_ctx is not None, self.source, target.service
            )
            if isinstance(hop, Reply):
                await self._answer(hop)
                return
            host.active += 1
            self.host = host
            key = (_TLS_KEY if hop else "") + host.address
            try_s = retry.try_timeout(loop.time())
            outcome, resp = await self._attempt(head, fwd, key, host.host, host.port, hop, try_s)
            status = resp[0] if resp is not None else 0
            gs = grpc_status(resp[1]) if resp is not None and resp[2] and head.grpc else None
            if resp is not None:
                outcome = engine.outcome_for_status(status)
            if resp is None or status >= 400 or gs:
                if target.report(host, outcome, engine.clock()):
                    plane.metrics.ejections.labels(target.service, host.address).inc()
            elif host.consecutive_5xx or host.consecutive_gateway or host.consecutive_local:
                target.report(host, outcome, engine.clock())
            if resp is not None and status < 400 and not gs:
                await self._relay(fwd, *resp)
                return
            backoff = retry.failed(host, outcome, status, engine.rng, gs)
            host.active -= 1
            self.host = None
            if backoff is None:
                if resp is not None:
                    await self._relay(fwd, *resp)
                else:
                    await self._answer(retry.give_up(outcome, self.source))
                return
            self._stop_upstream(ErrorCodes.CANCEL)
            plane.metrics.retries.labels(target.service, target.subset).inc()
            await asyncio.sleep(backoff)
            late = retry.resume(loop.time(), self.source)
            if late is not None:
                await self._answer(late)
                return

    async def _attempt(
        self,
        head: H2Head,
        fwd: Forward,
        key: str,
        host: str,
        port: int,
        tls: bool,
        timeout: float | None,
    ) -> tuple[int, tuple[int, list[Header], bool] | None]:
        """Open a stream to the next hop and wait for its response head: (outcome, the head as
        (status, headers, ended) or None when the attempt failed before one)."""
        headers = next_hop_headers(head, fwd, self.down.peer, tls)
        try:
            async with asyncio.timeout(timeout):
                try:
                    async with asyncio.timeout(fwd.app.connect_s if fwd.kind == APP else _CONNECT_S):
                        up = await self.plane.upstream(key, host, port, tls, fwd.dest)
                except TimeoutError:
                    return Outcome.TIMEOUT, None
                no_body = self.req_done and not self.replay and self.req_trailers is None
                self.usid, stream = up.open(headers, no_body)
                self.up = up
                if not no_body:
                    self.pump = self.plane.loop.create_task(self._pump_request(up, self.usid))
                while True:
                    item = await stream.inbox.get()
                    if item[0] == "head":
                        status = _status(item[1])
                        return Outcome.OK, (status, item[1], item[2])
                    if item[0] == "reset":
                        self._stop_upstream(None)
                        return Outcome.CONNECT_FAILURE, None
                    if item[0] == "end":
                        self._stop_upstream(None)
                        return Outcome.CONNECT_FAILURE, None
        except TimeoutError:
            self._stop_upstream(ErrorCodes.CANCEL)
            return Outcome.TIMEOUT, None
        except (OSError, StreamGone, h2.exceptions.ProtocolError):
            self._stop_upstream(None)
            return Outcome.CONNECT_FAILURE, None

    async def _pump_request(self, up: Upstream, usid: int) -> None:
        """The request body (replayed first when this is a retry), then its end or trailers."""
        try:
            for chunk in list(self.replay or ()):
                await up.send_data(usid, chunk)
            while not self.req_done:
                item = await self.inbox.get()
                kind = item[0]
                if kind == "data":
                    data: bytes = item[1]
                    self._moved()
                    try:
                        if self.replay is not None:
                            self.replay_len += len(data)
                            if self.replay_len > MAX_RETRY_BODY:
                                self.replay = None
                                if self.retry is not None:
                                    self.retry.unreplayable()
                            else:
                                self.replay.append(data)
                        self.req_bytes += len(data)
                        await up.send_data(usid, data)
                        self._moved()
                    finally:
                        self.down.ack(self.sid, item[2])
                elif kind == "trailers":
                    self.req_trailers = item[1]
                elif kind == "end":
                    self.req_done = True
                else:  # reset: the exchange task is cancelled by the client connection
                    return
            if self.req_trailers is not None:
                _trailers(up, usid, self.req_trailers)
            else:
                up.end_stream(usid)
        except StreamGone:
            return

    async def _relay(self, fwd: Forward, status: int, headers: list[Header], ended: bool) -> None:
        """The response from the next hop to the client: head, body, trailers, or a reset."""
        up, usid = self.up, self.usid
        assert up is not None
        down, sid = self.down, self.sid
        self._moved()  # the response head is progress too
        self.status = status
        out = response_headers(headers, fwd.response_ops)
        if ended:
            self.grpc_status = grpc_status(headers) if self.grpc else None
        down.send_headers(sid, out, ended)
        self.started = True
        if ended:
            return
        stream = up.streams.get(usid)
        if stream is None:
            down.reset(sid, ErrorCodes.INTERNAL_ERROR)
            return
        try:
            async with asyncio.timeout_at(self.deadline):
                while True:
                    item = await stream.inbox.get()
                    kind = item[0]
                    if kind == "data":
                        self._moved()
                        try:
                            self.resp_bytes += len(item[1])
                            if fwd.bps:  # the bandwidth fault: the body at ``bps`` bits/s
                                await self._slow_send(item[1], fwd.bps)
                            else:
                                await down.send_data(sid, item[1])
                            self._moved()
                        finally:
                            up.ack(usid, item[2])
                    elif kind == "trailers":
                        if self.grpc:
                            self.grpc_status = grpc_status(item[1])
                        _trailers(down, sid, item[1])
                        return
                    elif kind == "end":
                        down.end_stream(sid)
                        return
                    else:
                        code = item[1]
                        down.reset(
                            sid, code if code != ErrorCodes.REFUSED_STREAM else ErrorCodes.INTERNAL_ERROR
                        )
                        self._stop_upstream(None)
                        return
        except TimeoutError:  # the caller's grpc-timeout passed mid-stream
            self._stop_upstream(ErrorCodes.CANCEL)
            self.grpc_status = 4
            down.send_headers(sid, [("grpc-status", "4"), ("grpc-message", "deadline exceeded")], True)

    async def _slow_send(self, data: bytes, bps: int) -> None:
        rate = max(1.0, bps / 8.0)
        step = max(1, min(64 * 1024, int(rate / 10)))
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            await self.down.send_data(self.sid, piece)
            await asyncio.sleep(len(piece) / rate)

    async def _answer(self, reply: Reply) -> None:
        """Carry out a ``Reply``: HTTP status and reason, or for gRPC a trailers-only status."""
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.overflow:
            self.plane.metrics.overflow.labels(reply.dest).inc()
        if reply.logs:
            self.reply_logs = reply.logs
        if not self.source and not self.dest:
            self.source, self.dest = reply.source, reply.dest
        span = self.span
        if span is None:
            self.span = reply.trace  # the request's answer: its span is reported in ``run``
        elif not span.reason:
            span.reason = reply.reason  # an answer made after forwarding began
        self._stop_upstream(ErrorCodes.CANCEL)
        headers, body = reply_headers(reply, self.grpc)
        if self.started:  # a head is out already: only trailers (gRPC) or a reset can follow
            if self.grpc:
                self.down.send_headers(self.sid, headers[2:], True)
            else:
                self.down.reset(self.sid, ErrorCodes.INTERNAL_ERROR)
            return
        self.status = int(headers[0][1])
        if self.grpc:
            self.grpc_status = int(headers[2][1])
        self.down.send_headers(self.sid, headers, not body)
        self.started = True
        if body:
            self.resp_bytes = len(body)
            await self.down.send_data(self.sid, body, True)

    # -- cleaning up ------------------------------------------------------------------------

    def _log(self, target: Target, elapsed: float) -> None:
        """The access log line of a TrafficLog, as the HTTP/1.1 layers write it (plus gRPC)."""
        assert target.log is not None
        tried = self.retry.tried if self.retry is not None else None
        host = self.host or (tried[-1] if tried else None)
        head = self.head
        entry: dict[str, Any] = {
            "time": time.time(),
            "direction": DIRECTION[self.down.kind],
            "source_service": self.source,
            "destination_service": target.service,
            "destination_subset": target.subset,
            "upstream": host.address if host is not None else "",
            "method": head.method if head is not None else "",
            "path": head.path() if head is not None else "",
            "response_code": self.status,
            "duration_ms": round(elapsed * 1000.0, 3),
            "protocol": "HTTP/2",
            "trace_id": self.span.trace_id if self.span is not None else "",
        }
        if self.grpc_status is not None:
            entry["grpc_status"] = self.grpc_status
        self.plane.access_log.write(target.log, entry, head_getter(head))

    def _stop_upstream(self, code: int | None) -> None:
        """Let go of the stream to the next hop (reset it with ``code`` when it is still open)."""
        pump, self.pump = self.pump, None
        if pump is not None and not pump.done():
            pump.cancel()
        up, self.up = self.up, None
        if up is None:
            return
        if code is not None:
            s = up.streams.get(self.usid)
            if s is not None:
                up.reset(self.usid, code)
        up.done(self.usid)

    def _release(self) -> None:
        release(self.target, self.retry, self.host)
        self.target = self.host = None
        release_app(self.app)

    def _log_app(self, logs: tuple[TrafficLogConf, ...], upstream: str, elapsed: float) -> None:
        """Inbound access log lines (plus gRPC's status); ``upstream``: the app, or empty for a
        request the sidecar answered itself."""
        head = self.head
        entry = app_entry(
            self.source,
            self.dest,
            upstream,
            head.method if head is not None else "",
            head.path() if head is not None else "",
            self.status,
            elapsed,
            self.span.trace_id if self.span is not None else "",
        )
        entry["protocol"] = "HTTP/2"
        if self.grpc_status is not None:
            entry["grpc_status"] = self.grpc_status
        get = head_getter(head)
        for conf in logs:
            self.plane.access_log.write(conf, entry, get)
