"""A client connection of the fast path: the client side of ``Exchange``.

``h1.RequestReader`` (llhttp) parses its requests; pipelined requests queue behind the one in
flight (reading pauses while they wait). The head is routed, rewritten into the next hop's head,
and the body streams to the upstream as it arrives (re-chunked when the client sent it chunked).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import cast

from runtime import h1
from runtime.decide import (
    PASSTHROUGH,
    TARGET,
    Forward,
    Reply,
    decide_gateway,
    decide_inbound,
    decide_outbound,
    request_scheme,
    split_host,
)
from runtime.fastexchange import (
    CRLF,
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
from runtime.headerops import NO_OPS

__all__ = ["ClientConn"]

_PASSTHROUGH_CONNECT_S = 5.0

_PASSTHROUGH_TIMEOUT_S = 15.0

_INBOUND_CONNECT_S = 5.0


_LINGER_S = 2.0
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
        self.idle_since = self.plane.loop.time()
        self.plane.conns.add(self)
        if self.plane.draining:
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
        if self.req is not None:
            self._abandon()
        self.queue = None
        if plane.draining and not plane.conns and plane.drained is not None and not plane.drained.done():
            plane.drained.set_result(None)

    # -- h1.RequestSink ---------------------------------------------------------------------

    def request_head(self, req: h1.Request) -> None:
        if self.req is None and not self.closed:
            self.req = req
            self._begin(req)
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(req)
            self.pause(P_QUEUE)

    def request_body(self, req: h1.Request, data: bytes) -> None:
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
        verdict: Forward | Reply
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
        elif kind == INBOUND:
            src = req.source
            caller = plane.sources.get(src) if src is not None else ""
            if caller is None:
                assert src is not None
                caller = src.decode("latin-1")
                if len(plane.sources) < 4096:
                    plane.sources[src] = caller
            is_tls, identity = self.tls_peer
            verdict = decide_inbound(engine, snap, is_tls, identity, caller)
        else:
            xfp = req.xfp.decode("latin-1") if req.xfp is not None else None
            verdict = decide_gateway(engine, snap, req, self.port, request_scheme(xfp, self.secure))
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
            self._to_target(req, fwd.target)
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
        host, port = plane.app
        self._go(plane.app_key, host, port, None, _INBOUND_CONNECT_S, 0.0)

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
        """Close after an error answer without losing it (nginx's lingering close).

        The client may still be sending the refused request; closing with unread bytes makes the
        kernel send a reset, which can destroy the answer before the client reads it. So: send
        FIN after the answer, read and drop what still comes, and close when the client closes
        or after a short grace period.
        """
        tr = self.transport
        if tr is None:
            return
        if not tr.can_write_eof():  # TLS: no half-close
            tr.close()
            return
        self.lingering = True
        tr.write_eof()
        asyncio.get_running_loop().call_later(_LINGER_S, tr.close)

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
