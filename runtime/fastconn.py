"""A client connection of the fast path: the client side of ``Exchange``.

``h1.RequestReader`` (llhttp) parses its requests; pipelined requests queue behind the one in
flight (reading pauses while they wait). Each head goes to ``runtime.decide`` and the verdict is
carried out: a ``Reply``, or a ``Forward`` rewritten into the next hop's head whose body streams
to the upstream as it arrives (re-chunked when the client sent it chunked). The response comes
back here from ``Upstream``: corked writes, chunked re-framing, header changes, the bandwidth
fault, an upgrade spliced as it is.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import cast

from runtime import h1
from runtime._hosts import Outcome
from runtime.decide import (
    APP,
    PASSTHROUGH,
    TARGET,
    Fetch,
    Forward,
    Reply,
    admit_app,
    decide_gateway,
    decide_inbound,
    decide_outbound,
    request_scheme,
    settle,
    split_host,
)
from runtime.fastexchange import (
    CRLF,
    DIRECTION,
    INBOUND,
    LAST_CHUNK,
    OUTBOUND,
    P_QUEUE,
    P_UPGRADE,
    P_WAIT,
    Exchange,
    apply_ops,
)
from runtime.fastplane import FastPlane
from runtime.fastpool import Upstream
from runtime.h1guard import linger_close
from runtime.headerops import NO_OPS

__all__ = ["ClientConn"]

_PASSTHROUGH_CONNECT_S = 5.0

_PASSTHROUGH_TIMEOUT_S = 15.0


_FULL = h1.reply(503, "the listener has reached --max-connections", close=True)

"""How long an error answer's connection keeps draining the client's bytes before it closes."""


class ClientConn(Exchange):
    """One client connection of an outbound, inbound or gateway listener."""

    __slots__ = ()

    def __init__(self, plane: FastPlane, kind: int, port: int = 0) -> None:
        super().__init__(plane, kind, port)
        self.reader = h1.RequestReader(self)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)
        peer = tr.get_extra_info("peername")
        self.peer = str(peer[0]).encode() if peer else b"unknown"
        if self.kind == INBOUND:  # mTLS: the caller's identity, read once per connection
            self.tls_peer = self.plane.peers.of(tr)
        self.secure = tr.get_extra_info("sslcontext") is not None
        plane = self.plane
        self.idle_since = self.head_at = plane.loop.time()
        if plane.open[self.kind] >= plane.limits.max_connections:
            plane.metrics.listener_refusals.labels(DIRECTION[self.kind], "max_connections").inc()
            tr.write(_FULL)
            tr.close()
            return
        plane.open[self.kind] += 1
        self.counted = True
        plane.conns.add(self)
        if plane.draining:
            tr.close()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # the rest of a refused request: read and dropped until the client is done
        if self.tunnel:
            up = self.up
            if up is not None and up.transport is not None:
                up.transport.write(data)
            return
        if self.req is not None and self.req.upgrade is not None and self.paused & P_UPGRADE:
            self.early += data
            return
        try:
            offset = self.reader.feed(data)
        except h1.H1Error as e:
            self._bad_request(e)
            return
        req = self.req
        if req is not None:  # a body still arriving: its read timeout runs from its last read
            if not req.complete:
                self.body_at = self.plane.loop.time()
            elif self.body_at:
                self.body_at = 0.0
        if self.head_at < 0:  # a head completed in this read (and may be answered already)
            self.head_at = 0.0
        elif req is None and not self.head_at:  # a head begins: it has until the timeout
            self.head_at = self.plane.loop.time()
        if offset >= 0:
            self._upgrade_request(data[offset:])
        elif self.out:
            self.flush()

    def eof_received(self) -> bool:
        if self.lingering or self.req is None:
            return False
        self.close_after = True  # half-closed: answer what is in flight, then close
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        up = self.up
        if up is not None and up.transport is not None and not up.paused:
            up.paused = True
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        up = self.up
        if up is not None and up.transport is not None and up.paused and self.slow is None:
            up.paused = False
            up.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        plane = self.plane
        plane.conns.discard(self)
        if self.counted:
            self.counted = False
            plane.open[self.kind] -= 1
        if self.req is not None:
            self._abandon()
        self.queue = None
        if plane.draining and not plane.conns and plane.drained is not None and not plane.drained.done():
            plane.drained.set_result(None)

    # -- h1.RequestSink ---------------------------------------------------------------------

    def request_head(self, req: h1.Request) -> None:
        self.head_at = -1.0
        if self.req is None and not self.closed:
            self.req = req
            self._begin(req)
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(req)
            self.pause(P_QUEUE)

    def request_body(self, req: h1.Request, data: bytes) -> None:
        watch = self.watch
        if watch is not None:
            watch.last = self.plane.loop.time()
        saved = req.saved
        if saved is not None:
            saved.append(data)
        if req is self.req and self.sending:
            up = self.up
            assert up is not None and up.transport is not None
            if req.chunked:
                up.transport.writelines((h1.chunk_size(len(data)), data, CRLF))
            else:
                up.transport.write(data)
        elif saved is None:
            req.body.append(data)
            if req is self.req:
                self.pause(P_WAIT)

    def request_end(self, req: h1.Request) -> None:
        if req is self.req and self.sending and req.chunked:
            up = self.up
            assert up is not None and up.transport is not None
            up.transport.write(LAST_CHUNK)

    # -- routing ----------------------------------------------------------------------------

    def _begin(self, req: h1.Request) -> None:
        self.t0 = time.perf_counter()
        self.status = 0
        self.sending = False
        self.resp_started = False
        self.resp_chunked = False
        self.resp_bytes = 0
        self.subset = ""
        self.series = None
        self.fwd = None
        if self.dirty:
            # Fields only the rarer paths (retries, rewrites, gateway, passthrough) set.
            self.dirty = False
            self.stale_retried = False
            self.continued = False
            self.resp_ops = NO_OPS
        if self.plane.draining:
            self.close_after = True
        if req.method == "CONNECT":
            self.dest = ""
            self.source = self.plane.engine.service
            self._reply(
                405, "CONNECT is served only as the first request of an outbound connection", close=True
            )
            return
        plane = self.plane
        engine = plane.engine
        snap = engine.snapshot
        kind = self.kind
        verdict: Forward | Reply | Fetch
        if kind == OUTBOUND:
            self.source = engine.service
            authority = self._authority(req)
            if authority is None:
                self.dest = ""
                self._reply(400, f"unsupported request target for a proxy: {req.url[:100]!r}", close=True)
                return
            parsed = plane.hosts.get(authority)
            if parsed is None:
                parsed = split_host(authority.decode("latin-1"))
                if len(plane.hosts) < 4096:
                    plane.hosts[authority] = parsed
            verdict = decide_outbound(engine, snap, req, parsed[0], parsed[1], plane.own_addresses)
            if type(verdict) is Fetch:
                # The body (if any) waits in req.body, reading paused, as while connecting.
                self.fetching = asyncio.ensure_future(self._after_fetch(req, verdict, parsed))
                return
        elif kind == INBOUND:
            src = req.source
            caller = plane.sources.get(src) if src is not None else ""
            if caller is None:
                assert src is not None
                caller = src.decode("latin-1")
                if len(plane.sources) < 4096:
                    plane.sources[src] = caller
            is_tls, identity = self.tls_peer
            verdict = decide_inbound(engine, snap, is_tls, identity, caller, req.get)
        else:
            xfp = req.xfp.decode("latin-1") if req.xfp is not None else None
            verdict = decide_gateway(engine, snap, req, self.port, request_scheme(xfp, self.secure))
        if type(verdict) is Reply:
            self._answer(verdict)
        else:
            self._forward(req, cast(Forward, verdict))

    async def _after_fetch(self, req: h1.Request, fetch: Fetch, parsed: tuple[str, int | None]) -> None:
        """A pending destination: fetch its config (bounded), then decide again."""
        plane = self.plane
        engine = plane.engine
        verdict = await settle(
            engine,
            fetch,
            plane.fetch,
            lambda snap: decide_outbound(engine, snap, req, parsed[0], parsed[1], plane.own_addresses),
        )
        self.fetching = None
        if self.closed or req is not self.req:
            return
        if type(verdict) is Reply:
            self._answer(verdict)
        else:
            self._forward(req, cast(Forward, verdict))

    def _authority(self, req: h1.Request) -> bytes | None:
        """The authority an outbound request names (Host, or its absolute URI's); the request
        target becomes origin-form. None: a target a proxy cannot serve."""
        url = req.url
        if url[:1] == b"/":
            return req.host or b""
        if url[:7].lower() != b"http://":
            return None
        rest = url[7:]
        i = rest.find(b"/")
        q = rest.find(b"?")
        if q >= 0 and (i < 0 or q < i):
            i = q
        authority, path_qs = (rest[:i], rest[i:]) if i >= 0 else (rest, b"/")
        if path_qs[:1] == b"?":
            path_qs = b"/" + path_qs
        authority = authority.rpartition(b"@")[2]
        if req.host is None:
            req.host = authority
        req.url = path_qs
        return authority

    def _forward(self, req: h1.Request, fwd: Forward) -> None:
        """Carry out a ``Forward`` verdict: the next hop's head, then the attempts."""
        self.source, self.dest = fwd.source, fwd.dest
        self.span = fwd.trace
        plane = self.plane
        url = req.url
        if fwd.path is not None:
            q = url.find(b"?")
            url = fwd.path.encode("latin-1") + (url[q:] if q >= 0 else b"")
        host = fwd.host.encode("latin-1") if fwd.host is not None else req.host
        headers = req.headers
        if fwd.request_ops:
            headers = list(headers)
            apply_ops(headers, fwd.request_ops)
        if fwd.response_ops:
            self.resp_ops = fwd.response_ops
            self.dirty = True
        source = fwd.source_header
        source_b = (
            None if source is None else plane.service_b if source == plane.engine.service else source.encode()
        )
        self.head_out = self._head(req, url, host, headers, source_b)
        for mirror in fwd.mirrors:
            shadow = (req.host or b"").split(b":", 1)[0] + b"-shadow"
            head = self._head(req, url, shadow, headers, source_b)
            plane.mirror(mirror, head[:-2] + b"connection: close\r\n\r\n")
        kind = fwd.kind
        if kind == TARGET:
            assert fwd.target is not None
            self._to_target(req, fwd.target, fwd.policy)
            return
        self.fwd = fwd
        self.retry = None
        if kind == PASSTHROUGH:
            assert fwd.address is not None
            name, port = fwd.address
            self._go(
                f"{name}:{port}",
                name,
                port,
                _PASSTHROUGH_TIMEOUT_S,
                _PASSTHROUGH_CONNECT_S,
                plane.loop.time(),
            )
            return
        if fwd.bps:
            self.slow_rate = max(1.0, fwd.bps / 8.0)
            self.slow = deque()
        if fwd.delay_s:
            self.pause(P_WAIT)
            self.timer = plane.loop.call_later(fwd.delay_s, self._after_delay, self.attempt)
            return
        self._go_app()

    def _after_delay(self, attempt: int) -> None:
        if attempt == self.attempt and self.req is not None:
            self.timer = None
            self._go_app()

    def _go_app(self) -> None:
        plane = self.plane
        fwd = self.fwd
        assert fwd is not None
        refused = admit_app(fwd, plane.engine.clock())
        if refused is not None:
            self._answer(refused)
            return
        host, port = plane.app
        app = fwd.app
        now = plane.loop.time()
        self._watch(app.stream_idle_s, app.max_stream_s, now)
        self._go(plane.app_key, host, port, app.request_timeout_s, app.connect_s, now)

    def _head(
        self,
        req: h1.Request,
        target: bytes,
        host: bytes | None,
        headers: list[tuple[bytes, bytes]],
        source: bytes | None,
    ) -> bytes:
        """The next hop's request head."""
        parts = [req.method.encode(), b" ", target, b" HTTP/1.1\r\nhost: ", host or b"", CRLF]
        for name, value in headers:
            parts += (name, b": ", value, CRLF)
        if req.chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        elif req.length is not None:
            parts.append(b"content-length: %d\r\n" % req.length)
        if req.upgrade is not None:
            parts += (b"connection: upgrade\r\nupgrade: ", req.upgrade, CRLF)
        if source is None:
            source = req.source
        if source is not None:
            parts += (b"x-meshc-source-service: ", source, CRLF)
        xff = req.xff
        parts += (b"x-forwarded-for: ", xff + b", " + self.peer if xff else self.peer, CRLF)
        parts += (b"x-forwarded-proto: ", req.xfp or b"http", b"\r\n\r\n")
        return b"".join(parts)

    # -- responses --------------------------------------------------------------------------

    def response_head(self, up: Upstream, resp: h1.Response) -> None:
        if up is not self.up:
            return
        self._cancel_timer()
        status = resp.status
        target = self.target
        host = self.host
        if (
            target is not None
            and host is not None
            and (status >= 400 or host.consecutive_5xx or host.consecutive_gateway or host.consecutive_local)
        ):
            # (A success on a host with no failure streak changes nothing in the outlier
            # detector, and a 2xx/3xx is never retried, so that common case skips the calls.)
            engine = self.plane.engine
            outcome = engine.outcome_for_status(status)
            if target.report(host, outcome, engine.clock()):
                self.plane.metrics.ejections.labels(target.service, host.address).inc()
            if status >= 400 and self._retry(host, outcome, status):
                host.active -= 1
                self.host = None
                self._detach(True)  # discard mode: the connection pools itself once drained
                return
        elif (fwd := self.fwd) is not None and fwd.app.outlier is not None and fwd.kind == APP:
            self._report_app(fwd, self.plane.engine.outcome_for_status(status))
        self._respond_head(resp)

    def _respond_head(self, resp: h1.Response) -> None:
        req = self.req
        assert req is not None
        status = resp.status
        self.status = status
        self.resp_started = True
        parts = [h1.status_line(status, resp.reason)]
        headers = resp.headers
        ops = self.resp_ops
        if ops:
            headers = list(headers)
            apply_ops(headers, ops)
        for name, value in headers:
            parts += (name, b": ", value, CRLF)
        close = self.close_after or not req.keep_alive
        if status == 101:
            parts += (b"connection: upgrade\r\nupgrade: ", resp.upgrade or b"", b"\r\n\r\n")
            self.out.append(b"".join(parts))
            return
        if req.method == "HEAD" or status in (204, 304) or status < 200:
            if resp.length is not None and status != 204:
                parts += (b"content-length: ", resp.length, CRLF)
        elif resp.length is not None:
            parts += (b"content-length: ", resp.length, CRLF)
        elif req.http10:
            close = True  # the body ends when the connection does
        else:
            parts.append(b"transfer-encoding: chunked\r\n")
            self.resp_chunked = True
        if req.upgrade is not None:
            close = True  # the parser stopped at the Upgrade head: this connection is spent
        if close:
            self.close_after = True
            parts.append(b"connection: close\r\n\r\n")
        elif req.http10:
            parts.append(b"connection: keep-alive\r\n\r\n")
        else:
            parts.append(CRLF)
        self.out.append(b"".join(parts))

    def response_body(self, data: bytes) -> None:
        if not self.resp_started:
            return
        watch = self.watch
        if watch is not None:
            watch.last = self.plane.loop.time()
        self.resp_bytes += len(data)
        slow = self.slow
        if slow is not None:
            self._slow_body(data)
            return
        if self.resp_chunked:
            self.out += (h1.chunk_size(len(data)), data, CRLF)
        else:
            self.out.append(data)

    def response_end(self, up: Upstream, resp: h1.Response) -> None:
        if up is not self.up or not self.resp_started:
            return
        if self.slow is not None and (self.slow or (self.up is not None and self.up.paused)):
            self.slow_end = True
            return
        if self.resp_chunked:
            self.out.append(LAST_CHUNK)
        req = self.req
        assert req is not None
        self._finish(resp.keep_alive and req.complete)

    def upstream_lost(self, up: Upstream, exc: Exception | None) -> None:
        """The upstream connection of the exchange in flight closed."""
        req = self.req
        if req is None:
            return
        if self.tunnel:
            self.up = None
            if self.transport is not None:
                self.flush()
                self.transport.close()
            return
        if not self.resp_started:
            self._cancel_timer()
            self.up = None
            self.sending = False
            up.client = None
            if (
                up.uses > 1
                and not up.got_bytes
                and not self.stale_retried
                and (req.saved is not None or not req.has_body)
            ):
                # A kept-alive connection the upstream had closed: replay on a fresh one. Not
                # an upstream failure, so it is neither reported nor counted as a retry.
                self.stale_retried = self.dirty = True
                key, host, port, connect_s = self.go_args
                self._go(key, host, port, self.try_timeout, connect_s, self.plane.loop.time())
                return
            self.attempt += 1
            self._failed(Outcome.CONNECT_FAILURE, exc)
            return
        resp = up.resp
        if (
            exc is None
            and resp is not None
            and resp.length is None
            and not resp.chunked
            and not up.ended
            and req.method != "HEAD"
            and resp.status not in (204, 304)
        ):
            # A body delimited by the connection's end: that end completes it.
            up.ended = True
            self.response_end(up, resp)
            return
        # Failed half way: the client must see a truncated message, so close after what we have.
        self.close_after = True
        self.resp_chunked = False
        self._finish(False)

    def upstream_failed(self, up: Upstream, err: h1.H1Error) -> None:
        """The upstream sent something that is not HTTP/1.1 (the connection is closed)."""
        if self.resp_started:
            self.close_after = True
            self._finish(False)
            return
        self._cancel_timer()
        self.up = None
        self.sending = False
        up.client = None
        self.attempt += 1
        self._failed(Outcome.CONNECT_FAILURE, None)

    def upstream_upgraded(self, up: Upstream, rest: bytes) -> None:
        """A 101 arrived: from now on both connections are spliced as they are."""
        req = self.req
        if self.status != 101 or req is None or req.upgrade is None:
            up.close()
            return
        self.tunnel = True
        up.tunnel = True
        self.plane.stats.record(
            DIRECTION[self.kind], self.source, self.dest, self.subset, 101, time.perf_counter() - self.t0
        )
        self.series = None
        if rest:
            self.out.append(rest)
        self.flush()
        early, self.early = self.early, b""
        if early and up.transport is not None:
            up.transport.write(early)
        self.paused = 0
        if self.transport is not None:
            self.transport.resume_reading()

    # -- bandwidth fault ----------------------------------------------------------------------

    def _slow_body(self, data: bytes) -> None:
        slow = self.slow
        assert slow is not None
        step = max(1, min(64 * 1024, int(self.slow_rate / 10)))
        for i in range(0, len(data), step):
            slow.append(data[i : i + step])
        up = self.up
        if up is not None and up.transport is not None and not up.paused:
            up.paused = True
            up.transport.pause_reading()
        if self.timer is None:
            self._slow_pump()

    def _slow_pump(self) -> None:
        self.timer = None
        slow = self.slow
        if slow is None or self.req is None:
            return
        if slow:
            piece = slow.popleft()
            if self.resp_chunked:
                self.out += (h1.chunk_size(len(piece)), piece, CRLF)
            else:
                self.out.append(piece)
            self.flush()
            self.timer = self.plane.loop.call_later(len(piece) / self.slow_rate, self._slow_pump)
            return
        up = self.up
        if self.slow_end and up is not None:
            self.slow = None
            if self.resp_chunked:
                self.out.append(LAST_CHUNK)
            up.paused = False
            req = self.req
            resp = up.resp
            self._finish(bool(resp is not None and resp.keep_alive and req.complete))
            return
        if up is not None and up.transport is not None and up.paused:
            up.paused = False
            up.transport.resume_reading()

    def read_timed_out(self, reason: str) -> None:
        """The sweep found a head or a body that stopped arriving (``ListenerLimits``)."""
        which = "body_timeout" if self.body_at else "header_timeout"
        self.head_at = self.body_at = 0.0
        if self.lingering:  # already answered: only the rest of a refused request was awaited
            if self.transport is not None:
                self.transport.close()
            return
        self.plane.metrics.listener_refusals.labels(DIRECTION[self.kind], which).inc()
        self._bad_request(h1.H1Error(408, reason))

    def _bad_request(self, err: h1.H1Error) -> None:
        """A request that cannot be accepted: answer it (when nothing was answered yet), close."""
        req = self.req
        if req is not None and self.resp_started:
            self.close_after = True
            if self.transport is not None:
                self.flush()
                self.transport.close()
            return
        if req is not None and req.complete:
            # A later pipelined request is malformed: answer the ones before it first.
            self.bad = err
            self.pause(P_QUEUE)
            return
        if req is not None:
            self._abandon()
        self.close_after = True
        if self.transport is not None:
            self.transport.write(h1.reply(err.status, err.reason, close=True))
            self._linger_close()

    def _linger_close(self) -> None:
        """Close after an error answer without losing it (``h1guard.linger_close``)."""
        if self.transport is not None:
            self.lingering = linger_close(self.transport)

    def _upgrade_request(self, rest: bytes) -> None:
        """The parser stopped after an Upgrade or CONNECT head; ``rest`` is the bytes after it."""
        req = self.req
        if req is None:
            # Pipelined behind another request: not supported, refuse it.
            if self.transport is not None:
                self.flush()
                self.transport.write(h1.reply(400, "upgrade pipelined behind another request", close=True))
                self.transport.close()
            return
        if req.method == "CONNECT":
            return  # answered 405 by _begin
        self.early += rest
        if req.upgrade is not None and not self.resp_started:
            self.pause(P_UPGRADE)
