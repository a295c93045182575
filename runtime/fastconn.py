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
from urllib.parse import quote, unquote

from runtime import h1
from runtime.fastexchange import (
    CRLF,
    INBOUND,
    LAST_CHUNK,
    NO_HOST,
    OUTBOUND,
    P_QUEUE,
    P_UPGRADE,
    P_WAIT,
    Exchange,
    apply_ops,
    gateway_filter,
    path_of,
)
from runtime.fastplane import FastPlane
from runtime.security import DENIED_HEADER

__all__ = ["ClientConn"]

_PASSTHROUGH_CONNECT_S = 5.0

_PASSTHROUGH_TIMEOUT_S = 15.0

_INBOUND_CONNECT_S = 5.0

_PATH_SAFE = "/:@!$&'()*+,;=-._~%"


def _split_host(value: bytes) -> tuple[str, int | None]:
    """``name[:port]`` / ``[v6]:port`` -> (lower-case name, port or None)."""
    text = value.decode("latin-1").strip()
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end], text[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.partition(":")
    return host.lower(), int(port) if port.isdigit() else None


def _query_map(qs: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in qs.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        out.setdefault(unquote(k.replace("+", " ")), unquote(v.replace("+", " ")))
    return out


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
        if self.dirty:
            # Fields only the rarer paths (retries, rewrites, gateway, passthrough) set.
            self.dirty = False
            self.tried = None
            self.passthrough = None
            self.retries = 0
            self.stale_retried = False
            self.continued = False
            self.resp_ops = None
            self.gw_route = None
        if self.plane.draining:
            self.close_after = True
        if req.method == "CONNECT":
            self.dest = ""
            self.source = self.plane.engine.service
            self._reply(
                405, "CONNECT is served only as the first request of an outbound connection", close=True
            )
            return
        kind = self.kind
        if kind == OUTBOUND:
            self._outbound(req)
        elif kind == INBOUND:
            self._inbound(req)
        else:
            self._gateway(req)

    def _outbound(self, req: h1.Request) -> None:
        plane = self.plane
        engine = plane.engine
        self.source = engine.service
        url = req.url
        if url[:1] == b"/":
            authority = req.host or b""
            path_qs = url
        elif url[:7].lower() == b"http://":
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
        else:
            self.dest = ""
            self._reply(400, f"unsupported request target for a proxy: {url[:100]!r}", close=True)
            return
        parsed = plane.hosts.get(authority)
        if parsed is None:
            parsed = _split_host(authority)
            if len(plane.hosts) < 4096:
                plane.hosts[authority] = parsed
        name, port = parsed
        self.dest = name
        snap = engine.snapshot
        dest = snap.destination(name)
        if dest is None:
            self._passthrough(
                req, snap.ready, snap.passthrough, snap.mesh.mesh if snap.mesh else "?", name, port
            )
            return
        if dest.protocol == "tcp":
            self._reply(400, f"{name} is a TCP service; open it with CONNECT")
            return
        route = None
        path = ""
        if dest.routes:
            path = path_of(path_qs)
            route = dest.route(req.method, path, req.header_map())
        wheel = route.wheel if route is not None else dest.wheel
        target = wheel.choose(engine.rng)
        if target is None:
            self._reply(503, NO_HOST)
            return
        headers = req.headers
        host = req.host
        if route is not None and route.modify is not None:
            modify = route.modify
            new_path = route.rewrite_path(path)
            if new_path != path:
                q = path_qs.find(b"?")
                path_qs = new_path.encode("latin-1") + (path_qs[q:] if q >= 0 else b"")
            if modify.host is not None:
                if modify.host.value is not None:
                    host = modify.host.value.encode("latin-1")
                elif modify.host.from_path_regex is not None:
                    import re

                    host = re.sub(
                        modify.host.from_path_regex, modify.host.from_path_substitution or "", path
                    ).encode("latin-1")
            headers = list(headers)
            apply_ops(headers, modify.request_headers)
            self.resp_ops = modify.response_headers
            self.dirty = True
        self.head_out = self._head(req, path_qs, host, headers, plane.service_b)
        self._to_target(req, target)

    def _passthrough(
        self, req: h1.Request, ready: bool, allowed: bool, mesh: str, name: str, port: int | None
    ) -> None:
        if not name:
            self._reply(400, "request names no host")
            return
        if not ready:
            self._reply(503, "no configuration yet")
            return
        if not allowed:
            self._reply(403, f"passthrough disabled by Mesh {mesh}: {name} is not a mesh service")
            return
        port = port or 80
        own = self.plane.own_addresses
        if (name, port) in own or (name == "localhost" and ("127.0.0.1", port) in own):
            self._reply(508, "request names this proxy itself")
            return
        url = req.url
        if url[:1] != b"/":
            rest = url[7:]
            i = rest.find(b"/")
            q = rest.find(b"?")
            if q >= 0 and (i < 0 or q < i):
                i = q
            url = rest[i:] if i >= 0 else b"/"
            if url[:1] == b"?":
                url = b"/" + url
        self.head_out = self._head(req, url, req.host, req.headers, None)
        self.passthrough = (name, port)
        self.dirty = True
        now = self.plane.loop.time()
        self.deadline = now + _PASSTHROUGH_TIMEOUT_S
        self.can_retry = False
        self._go(f"{name}:{port}", name, port, _PASSTHROUGH_TIMEOUT_S, _PASSTHROUGH_CONNECT_S, now)

    def _inbound(self, req: h1.Request) -> None:
        plane = self.plane
        engine = plane.engine
        src = req.source
        caller = plane.sources.get(src) if src is not None else ""
        if caller is None:
            assert src is not None
            caller = src.decode("latin-1")
            if len(plane.sources) < 4096:
                plane.sources[src] = caller
        self.source = caller
        self.dest = engine.service
        snap = engine.snapshot
        is_tls, peer = self.tls_peer
        source_b: bytes | None = None
        if is_tls:
            # mTLS: the caller is the peer certificate's identity, never the header (DESIGN §6).
            mesh = snap.mesh
            if peer is None or (mesh is not None and peer.mesh != mesh.mesh):
                self._deny("peer certificate names no identity in this mesh")
                return
            caller = self.source = peer.service
            source_b = caller.encode("latin-1")
            rate_limit, fault, permitted = snap.inbound.for_peer(peer.tags)
            if not permitted:
                self._deny(f"no TrafficPermission allows {caller}")
                return
        else:
            # Plaintext (mTLS off, or PERMISSIVE): the header is only a metrics label, as in Kuma.
            rate_limit, fault, _permitted = snap.inbound.for_caller(caller)
        if rate_limit is not None and not rate_limit.bucket.take(engine.clock()):
            conf = rate_limit.conf
            self._reply(conf.status, "local_rate_limited", headers=[(h.name, h.value) for h in conf.headers])
            return
        self.head_out = self._head(req, req.url, req.host, req.headers, source_b)
        self.can_retry = False
        self.deadline = None
        if fault is not None:
            delay, abort, bps = fault.decide(engine.rng)
            if bps:
                self.slow_rate = max(1.0, bps / 8.0)
                self.slow = deque()
            if delay:
                self.pause(P_WAIT)
                self.backing_off = False
                self.timer = plane.loop.call_later(delay, self._after_delay, abort, self.attempt)
                return
            if abort:
                self._reply(abort, "fault filter abort")
                return
        self._inbound_go()

    def _after_delay(self, abort: int, attempt: int) -> None:
        if attempt != self.attempt or self.req is None:
            return
        self.timer = None
        if abort:
            self._reply(abort, "fault filter abort")
            return
        self._inbound_go()

    def _deny(self, reason: str) -> None:
        self._reply(403, reason, headers=[(DENIED_HEADER, reason)])

    def _inbound_go(self) -> None:
        plane = self.plane
        host, port = plane.app
        self._go(plane.app_key, host, port, None, _INBOUND_CONNECT_S, 0.0)

    def _gateway(self, req: h1.Request) -> None:
        plane = self.plane
        engine = plane.engine
        self.source = engine.service
        self.dest = ""
        snap = engine.snapshot
        listener = snap.gateway.get(self.port)
        if listener is None:
            self._reply(404, "no gateway listener")
            return
        hostname, _ = _split_host(req.host or b"")
        raw_path, _, raw_qs = req.url.partition(b"?")
        path = unquote(raw_path.decode("latin-1"))
        qs = raw_qs.decode("latin-1")
        query = _query_map(qs) if qs else {}
        found = listener.route(hostname, req.method, path, req.header_map(), query)
        if found is None:
            self._reply(404, "no route")
            return
        route, prefix = found
        if route.redirect is not None:
            f = route.redirect
            scheme = f.redirect_scheme or "http"
            name = f.redirect_hostname or hostname
            portpart = f":{f.redirect_port}" if f.redirect_port else ""
            new_path = f.redirect_path if f.redirect_path is not None else route.rewrite(path, prefix)
            location = f"{scheme}://{name}{portpart}{new_path}" + (f"?{qs}" if qs else "")
            self._reply(f.redirect_status, "redirect", headers=[("Location", location)], body=b"")
            return
        target = route.wheel.choose(engine.rng)
        if target is None:
            self._reply(503, NO_HOST)
            return
        headers = req.headers
        if route.request_headers:
            headers = list(headers)
            for f in route.request_headers:
                gateway_filter(headers, f.set, f.add, f.remove)
        new_path = route.rewrite(path, prefix)
        path_qs = quote(new_path, safe=_PATH_SAFE).encode("latin-1") + (b"?" + raw_qs if raw_qs else b"")
        self.gw_route = route
        self.dirty = True
        self.head_out = self._head(req, path_qs, req.host, headers, plane.service_b)
        if route.mirrors and not req.has_body and req.upgrade is None:
            # Fire and forget, as Envoy's request mirror policy: the Host gets "-shadow" and the
            # mirror's answer (or failure) never touches this exchange. Requests with a body are
            # not mirrored (the body streams to the backend and is not kept).
            for percentage, mirror in route.mirrors:
                if percentage >= 100.0 or engine.rng.random() * 100.0 < percentage:
                    shadow = (req.host or b"").split(b":", 1)[0] + b"-shadow"
                    head = self._head(req, path_qs, shadow, headers, plane.service_b)
                    plane.mirror(mirror, head[:-2] + b"connection: close\r\n\r\n")
        self._to_target(req, target)

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
