"""The fast data path: outbound, inbound and gateway HTTP/1.1 listeners as asyncio Protocols.

The engine decides exactly as on the aiohttp path (``runtime.proxy``): the same snapshot lookups,
routes, split wheels, balancers, retry policies, outlier detection, rate limits and faults. This
module only moves bytes, with no coroutine, task or policy object per request:

* ``ClientConn`` is one client connection. ``h1.RequestReader`` (llhttp) parses its requests;
  pipelined requests queue behind the one in flight (reading pauses while they wait). The head
  is routed, rewritten into the next hop's head, and the body streams to the upstream as it
  arrives (re-chunked when the client sent it chunked); a request that may be retried keeps its
  (at most 64 KiB) body for the replay.
* ``Upstream`` is one keep-alive connection to an endpoint, kept in ``Pool`` per address; it
  parses responses with ``h1.ResponseReader`` and feeds the client connection it is lent to.
  Writes to the client are corked for the duration of one upstream read, so a small response
  leaves in one ``writev``.
* Back-pressure both ways: a transport whose write buffer fills pauses reading on the other side
  (``pause_writing`` / ``resume_writing``); nothing is queued beyond one read.
* The per-try / request timeout up to the response head (504) costs no loop timer per request:
  the connection notes its deadline and joins ``FastHttp.timed``, which one 25 ms tick scans
  while it is not empty. Retry backoff and fault delays use loop timers; a sweep every few
  seconds closes idle connections.
* A connection whose exchange failed half way is never reused: an upstream that closes mid-body
  makes the client connection close before the body is complete (the client sees a truncated
  message, never a hang); a client that goes away closes the upstream connection.

Counters go to ``fastmetrics.RequestStats`` (plain dicts, rendered on scrape); access logs are
written only when a TrafficLog applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, cast
from urllib.parse import quote, unquote

from runtime import h1
from runtime._hosts import Host, Outcome
from runtime._lb import RingHash
from runtime._policy import MAX_RETRY_BODY
from runtime.accesslog import AccessLog
from runtime.bundle import HeaderChange, HeaderOps, TrafficLogConf
from runtime.engine import Engine, GatewayRoute, Target
from runtime.fastmetrics import RequestStats, Series
from runtime.metrics import Metrics
from runtime.security import DENIED_HEADER, Credentials, PeerCache, wrong_peer

if TYPE_CHECKING:
    from runtime.identity import PeerIdentity

__all__ = ["ClientConn", "FastHttp", "Pool", "Upstream"]

REASON_HEADER = "x-meshc-reason"
SOURCE_HEADER = b"x-meshc-source-service"
_TLS_KEY = "tls|"
"""Pool key prefix of mutual-TLS connections to peer data planes."""
_NO_TLS: tuple[bool, PeerIdentity | None] = (False, None)
HASH_KEY_HEADER = "x-meshc-hash-key"

OUTBOUND, INBOUND, GATEWAY = 0, 1, 2
_DIRECTION = ("outbound", "inbound", "gateway")
_NO_HOST = "no healthy upstream"
_RESET = "upstream connect error or disconnect/reset before headers"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CRLF = b"\r\n"
_LAST_CHUNK = h1.LAST_CHUNK
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"

# Why a client connection's reading is paused (a bit each).
_P_UPSTREAM = 1  # the upstream's write buffer is full
_P_QUEUE = 2  # pipelined requests are waiting
_P_WAIT = 4  # the body has nowhere to go yet (connecting, fault delay, backoff)
_P_UPGRADE = 8  # an Upgrade request waits for its 101

_KEEPALIVE_S = 75.0
_UPSTREAM_IDLE_S = 30.0
_SWEEP_S = 5.0
_TICK_S = 0.025
_MAX_IDLE_PER_HOST = 256
_PASSTHROUGH_CONNECT_S = 5.0
_PASSTHROUGH_TIMEOUT_S = 15.0
_INBOUND_CONNECT_S = 5.0


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


def _set_header(headers: list[tuple[bytes, bytes]], name: str, value: str, append: bool) -> None:
    n = name.encode("latin-1")
    if not append:
        low = n.lower()
        headers[:] = [h for h in headers if h[0].lower() != low]
    headers.append((n, value.encode("latin-1")))


def _remove_header(headers: list[tuple[bytes, bytes]], name: str) -> None:
    low = name.encode("latin-1").lower()
    headers[:] = [h for h in headers if h[0].lower() != low]


def _apply_ops(headers: list[tuple[bytes, bytes]], ops: HeaderOps) -> None:
    for name in ops.remove:
        _remove_header(headers, name)
    for change in ops.add:
        _set_header(headers, change.name, change.value, change.append)


def _gateway_filter(
    headers: list[tuple[bytes, bytes]],
    set_: Iterable[HeaderChange],
    add: Iterable[HeaderChange],
    remove: Iterable[str],
) -> None:
    for change in set_:
        _set_header(headers, change.name, change.value, False)
    for change in add:
        _set_header(headers, change.name, change.value, True)
    for name in remove:
        _remove_header(headers, name)


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


class Pool:
    """Idle keep-alive upstream connections per address, most recently used first."""

    __slots__ = ("idle",)

    def __init__(self) -> None:
        self.idle: dict[str, list[Upstream]] = {}

    def take(self, key: str) -> Upstream | None:
        conns = self.idle.get(key)
        while conns:
            up = conns.pop()
            if not up.closed:
                return up
        return None

    def put(self, up: Upstream, now: float) -> None:
        conns = self.idle.get(up.key)
        if conns is None:
            conns = self.idle[up.key] = []
        if len(conns) >= _MAX_IDLE_PER_HOST:
            up.close()
            return
        up.idle_since = now
        conns.append(up)

    def discard(self, up: Upstream) -> None:
        conns = self.idle.get(up.key)
        if conns and up in conns:
            conns.remove(up)

    def sweep(self, older_than: float) -> None:
        for conns in self.idle.values():
            stale = [u for u in conns if u.idle_since < older_than]
            for up in stale:
                conns.remove(up)
                up.close()

    def close(self) -> None:
        for conns in self.idle.values():
            for up in conns:
                up.close()
        self.idle.clear()


class Upstream(asyncio.Protocol):
    """One connection to an upstream; lent to one client exchange at a time."""

    __slots__ = (
        "client",
        "closed",
        "discarding",
        "ended",
        "got_bytes",
        "head_only",
        "idle_since",
        "key",
        "paused",
        "plane",
        "reader",
        "reset_reader",
        "resp",
        "transport",
        "tunnel",
        "uses",
    )

    def __init__(self, plane: FastHttp, key: str) -> None:
        self.plane = plane
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.reader = h1.ResponseReader(self)
        self.client: ClientConn | None = None
        self.head_only = False
        self.got_bytes = False
        self.ended = False
        self.discarding = False
        self.reset_reader = False
        self.resp: h1.Response | None = None
        self.uses = 0
        self.closed = False
        self.paused = False
        self.tunnel = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if self.tunnel:
            if client is not None and client.transport is not None:
                client.transport.write(data)
            return
        if client is None and not self.discarding:
            self.close()  # bytes on an idle connection: it cannot be trusted any more
            return
        self.got_bytes = True
        try:
            offset = self.reader.feed(data)
        except h1.H1Error as e:
            self.close()
            if client is not None and client.up is self:
                client.upstream_failed(self, e)
            return
        if offset >= 0:
            if client is not None and client.up is self and self.resp is not None:
                client.upstream_upgraded(self, data[offset:])
            else:
                self.close()
            return
        if self.reset_reader:
            self.reset_reader = False
            self.reader = h1.ResponseReader(self)
        if client is not None and client.out:
            client.flush()

    # -- h1.ResponseSink --------------------------------------------------------------------

    def response_head(self, resp: h1.Response) -> None:
        status = resp.status
        if status < 200 and status != 101:
            return  # interim (100 Continue, 103 Early Hints): not forwarded
        self.resp = resp
        client = self.client
        if client is not None:
            client.response_head(self, resp)
        if self.head_only and status != 101 and not self.ended:
            # A response to HEAD has no body whatever its length headers say; llhttp cannot be
            # told, so the message ends here and the next response gets a fresh reader.
            self.reset_reader = True
            self.response_end(resp)

    def response_body(self, data: bytes) -> None:
        client = self.client
        if client is not None:
            client.response_body(data)

    def response_end(self, resp: h1.Response) -> None:
        if resp.status < 200 or self.ended:
            return
        self.ended = True
        client = self.client
        if client is not None:
            client.response_end(self, resp)
        elif self.discarding:
            # A discarded response (a retried attempt) ran to its end: the connection is clean.
            self.discarding = False
            self.plane.release(self, resp.keep_alive)

    # -- flow control and teardown ----------------------------------------------------------

    def pause_writing(self) -> None:
        client = self.client
        if client is not None:
            client.pause(_P_UPSTREAM)

    def resume_writing(self) -> None:
        client = self.client
        if client is not None:
            client.resume(_P_UPSTREAM)

    def eof_received(self) -> bool:
        client = self.client
        if self.tunnel and client is not None and client.transport is not None:
            client.transport.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.plane.pool.discard(self)
        client = self.client
        if client is not None and client.up is self:
            client.upstream_lost(self, exc)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.plane.pool.discard(self)
            if self.transport is not None:
                self.transport.close()


class ClientConn(asyncio.Protocol):
    """One client connection of an outbound, inbound or gateway listener."""

    __slots__ = (
        "attempt",
        "backing_off",
        "bad",
        "can_retry",
        "close_after",
        "closed",
        "continued",
        "deadline",
        "deadline_at",
        "dest",
        "dirty",
        "early",
        "go_args",
        "gw_route",
        "head_out",
        "host",
        "idle_since",
        "key",
        "kind",
        "lingering",
        "out",
        "overall",
        "passthrough",
        "paused",
        "peer",
        "plane",
        "port",
        "queue",
        "reader",
        "req",
        "resp_chunked",
        "resp_ops",
        "resp_started",
        "retries",
        "sending",
        "series",
        "slow",
        "slow_end",
        "slow_rate",
        "source",
        "stale_retried",
        "status",
        "subset",
        "t0",
        "target",
        "timer",
        "tls_peer",
        "transport",
        "tried",
        "try_timeout",
        "tunnel",
        "up",
        "write_paused",
    )

    def __init__(self, plane: FastHttp, kind: int, port: int = 0) -> None:
        self.plane = plane
        self.kind = kind
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.reader = h1.RequestReader(self)
        self.peer = b""
        self.req: h1.Request | None = None
        self.queue: deque[h1.Request] | None = None
        self.paused = 0
        self.write_paused = False
        self.out: list[bytes] = []
        self.closed = False
        self.close_after = False
        self.idle_since = 0.0
        self.tunnel = False
        self.lingering = False
        self.early = b""
        self.bad: h1.H1Error | None = None
        # The exchange in flight (reset by ``_begin``).
        self.up: Upstream | None = None
        self.target: Target | None = None
        self.host: Host | None = None
        self.tried: list[Host] | None = None
        self.passthrough: tuple[str, int] | None = None
        self.retries = 0
        self.can_retry = False
        self.backing_off = False
        self.stale_retried = False
        self.key: str | None = None
        self.head_out = b""
        self.timer: asyncio.TimerHandle | None = None
        self.deadline_at = 0.0
        self.deadline: float | None = None
        self.attempt = 0
        self.go_args: tuple[str, str, int, float | None] = ("", "", 0, None)
        self.try_timeout: float | None = None
        self.overall = False
        self.t0 = 0.0
        self.source = ""
        self.dest = ""
        self.subset = ""
        self.status = 0
        self.sending = False
        self.continued = False
        self.dirty = False
        self.series: Series | None = None
        self.resp_started = False
        self.resp_chunked = False
        self.resp_ops: HeaderOps | None = None
        self.gw_route: GatewayRoute | None = None
        self.slow: deque[bytes] | None = None
        self.slow_rate = 0.0
        self.slow_end = False
        self.tls_peer: tuple[bool, PeerIdentity | None] = _NO_TLS

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
        if self.req is not None and self.req.upgrade is not None and self.paused & _P_UPGRADE:
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

    # -- reading control --------------------------------------------------------------------

    def pause(self, bit: int) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused |= bit

    def resume(self, bit: int) -> None:
        if self.paused & bit:
            self.paused &= ~bit
            if not self.paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def flush(self) -> None:
        out = self.out
        if out and self.transport is not None:
            if len(out) == 1:
                self.transport.write(out[0])
            else:
                self.transport.writelines(out)
        self.out = []

    # -- h1.RequestSink ---------------------------------------------------------------------

    def request_head(self, req: h1.Request) -> None:
        if self.req is None and not self.closed:
            self.req = req
            self._begin(req)
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(req)
            self.pause(_P_QUEUE)

    def request_body(self, req: h1.Request, data: bytes) -> None:
        saved = req.saved
        if saved is not None:
            saved.append(data)
        if req is self.req and self.sending:
            up = self.up
            assert up is not None and up.transport is not None
            if req.chunked:
                up.transport.writelines((h1.chunk_size(len(data)), data, _CRLF))
            else:
                up.transport.write(data)
        elif saved is None:
            req.body.append(data)
            if req is self.req:
                self.pause(_P_WAIT)

    def request_end(self, req: h1.Request) -> None:
        if req is self.req and self.sending and req.chunked:
            up = self.up
            assert up is not None and up.transport is not None
            up.transport.write(_LAST_CHUNK)

    # -- routing ----------------------------------------------------------------------------

    def _begin(self, req: h1.Request) -> None:
        self.t0 = time.perf_counter()
        self.status = 0
        self.sending = False
        self.resp_started = False
        self.resp_chunked = False
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
            path = _path_of(path_qs)
            route = dest.route(req.method, path, req.header_map())
        wheel = route.wheel if route is not None else dest.wheel
        target = wheel.choose(engine.rng)
        if target is None:
            self._reply(503, _NO_HOST)
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
            _apply_ops(headers, modify.request_headers)
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
                self.pause(_P_WAIT)
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
            self._reply(503, _NO_HOST)
            return
        headers = req.headers
        if route.request_headers:
            headers = list(headers)
            for f in route.request_headers:
                _gateway_filter(headers, f.set, f.add, f.remove)
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
        parts = [req.method.encode(), b" ", target, b" HTTP/1.1\r\nhost: ", host or b"", _CRLF]
        for name, value in headers:
            parts += (name, b": ", value, _CRLF)
        if req.chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        elif req.length is not None:
            parts.append(b"content-length: %d\r\n" % req.length)
        if req.upgrade is not None:
            parts += (b"connection: upgrade\r\nupgrade: ", req.upgrade, _CRLF)
        if source is None:
            source = req.source
        if source is not None:
            parts += (b"x-meshc-source-service: ", source, _CRLF)
        xff = req.xff
        parts += (b"x-forwarded-for: ", xff + b", " + self.peer if xff else self.peer, _CRLF)
        parts += (b"x-forwarded-proto: ", req.xfp or b"http", b"\r\n\r\n")
        return b"".join(parts)

    # -- upstream attempts ------------------------------------------------------------------

    def _to_target(self, req: h1.Request, target: Target) -> None:
        """Send to one of the target's hosts with its timeouts, retries and ejection."""
        self.dest = target.service
        self.subset = target.subset
        plane = self.plane
        by_target = plane.series_by_target[self.kind]
        series = by_target.get(target)
        if series is None:
            if len(by_target) > 4096:
                by_target.clear()  # old snapshots' targets; the series live on in the stats
            series = by_target[target] = plane.stats.get(
                _DIRECTION[self.kind], self.source, target.service, target.subset
            )
        self.series = series
        if target.active >= target.max_active:
            self.plane.metrics.overflow.labels(target.service).inc()
            self._reply(503, "upstream connection limit reached")
            return
        retry = target.retry
        can_retry = retry is not None and retry.num_retries > 0 and retry.method_allowed(req.method)
        if req.has_body:
            length = req.length
            if can_retry and not req.chunked and length is not None and length <= MAX_RETRY_BODY:
                req.saved = req.body
                req.body = []
            else:
                can_retry = False
        self.can_retry = can_retry
        timeout = target.request_timeout_s
        now = plane.loop.time()
        self.deadline = now + timeout if timeout else None
        if type(target.balancer) is RingHash:
            self.key = req.header_map().get(HASH_KEY_HEADER) or _path_of(req.url)
        else:
            self.key = None
        target.active += 1
        self.target = target
        self._attempt(now)

    def _attempt(self, now: float) -> None:
        target = self.target
        assert target is not None
        engine = self.plane.engine
        host = target.pick(engine.clock(), engine.rng, self.key, self.tried or ())
        if host is None:
            self._reply(503, _NO_HOST)
            return
        self.host = host
        host.active += 1
        retry = target.retry
        try_timeout = retry.per_try_timeout_s if retry is not None else None
        deadline = self.deadline
        self.overall = False
        if deadline is not None:
            left = deadline - now
            if try_timeout is None or left <= try_timeout:
                try_timeout, self.overall = max(left, 0.0), True
        key = host.address
        mesh = self.plane.engine.snapshot.mesh
        if mesh is not None and mesh.mtls.enabled:
            # Peer hops are mutual TLS; pooled under their own key, so keep-alive reuses them.
            if self.plane.creds.client_ctx is not None:
                key = _TLS_KEY + key
            elif mesh.mtls.mode == "STRICT":
                self._reply(503, "mTLS is on and this data plane has no certificate yet")
                return
        self._go(key, host.host, host.port, try_timeout, target.connect_timeout_s, now)

    def _go(
        self, key: str, host: str, port: int, try_timeout: float | None, connect_s: float | None, now: float
    ) -> None:
        self.attempt += 1
        self.go_args = (key, host, port, connect_s)
        self.try_timeout = try_timeout
        plane = self.plane
        if try_timeout is not None:
            self.deadline_at = now + try_timeout
            plane.time(self)
        req = self.req
        assert req is not None
        up = plane.pool.take(key) if req.upgrade is None else None
        if up is not None:
            self._send(up)
        else:
            if not req.complete:
                self.pause(_P_WAIT)
            plane.connect(self, key, host, port, connect_s, self.attempt)

    def connected(self, attempt: int, up: Upstream) -> None:
        if attempt != self.attempt or self.closed or self.req is None:
            if up.transport is not None and not up.closed:
                self.plane.release(up, True)
            return
        self._send(up)

    def connect_failed(self, attempt: int, outcome: int, exc: BaseException | None) -> None:
        if attempt != self.attempt or self.closed or self.req is None:
            return
        self._cancel_timer()
        self.attempt += 1
        self._failed(outcome, exc)

    def _send(self, up: Upstream) -> None:
        req = self.req
        assert req is not None and up.transport is not None
        up.client = self
        up.head_only = req.method == "HEAD"
        up.got_bytes = False
        up.ended = False
        up.discarding = False
        up.resp = None
        up.uses += 1
        self.up = up
        tr = up.transport
        body = req.saved if req.saved is not None else req.body
        if body:
            if req.chunked:
                pieces = [self.head_out]
                for data in body:
                    pieces += (h1.chunk_size(len(data)), data, _CRLF)
            else:
                pieces = [self.head_out, *body]
            if req.complete and req.chunked:
                pieces.append(_LAST_CHUNK)
            tr.writelines(pieces)
            if req.saved is None:
                req.body = []
        elif req.complete and req.chunked:
            tr.writelines((self.head_out, _LAST_CHUNK))
        else:
            tr.write(self.head_out)
        self.sending = True
        if self.write_paused and not up.paused:
            up.paused = True
            tr.pause_reading()
        if req.expect_continue and not req.complete and not self.continued and not req.http10:
            self.continued = self.dirty = True
            assert self.transport is not None
            self.transport.write(_CONTINUE)
        if self.paused:
            self.resume(_P_WAIT)

    def _cancel_timer(self) -> None:
        if self.deadline_at:
            self.deadline_at = 0.0
            self.plane.timed.discard(self)
        timer = self.timer
        if timer is not None:
            timer.cancel()
            self.timer = None

    def _detach(self, reusable: bool) -> None:
        """Let go of the upstream connection of this exchange: back to the pool, or closed."""
        up = self.up
        if up is None:
            return
        self.up = None
        self.sending = False
        up.client = None
        if reusable and up.ended and not up.tunnel:
            self.plane.release(up, True)
        elif reusable and not up.closed:
            up.discarding = True  # it pools itself when the rest of its response has been read
        else:
            up.close()

    def _on_timeout(self, attempt: int) -> None:
        if attempt != self.attempt or self.resp_started or self.req is None:
            return
        self.attempt += 1
        self._detach(False)
        self._failed(Outcome.TIMEOUT, None)

    def _failed(self, outcome: int, exc: BaseException | None) -> None:
        """An attempt ended before a response head: retry, or answer 503/504."""
        target = self.target
        if target is not None:
            host = self.host
            if host is not None:
                host.active -= 1
                self.host = None
                if target.report(host, outcome, self.plane.engine.clock()):
                    self.plane.metrics.ejections.labels(target.service, host.address).inc()
                if self.tried is None:
                    self.tried = [host]
                    self.dirty = True
                else:
                    self.tried.append(host)
            if self._retry(outcome, 0):
                return
            if outcome == Outcome.TIMEOUT:
                self._reply(504, "upstream request timeout")
            else:
                self._reply(503, _RESET)
            return
        if self.passthrough is not None:
            name, port = self.passthrough
            if outcome == Outcome.TIMEOUT:
                self._reply(504, "upstream request timeout")
            else:
                kind = type(exc).__name__ if exc is not None else "ServerDisconnectedError"
                self._reply(502, f"passthrough to {name}:{port} failed: {kind}")
            return
        if outcome == Outcome.TIMEOUT:
            self._reply(504, "app timeout")
        else:
            self._reply(503, _RESET)

    def _retry(self, outcome: int, status: int) -> bool:
        """Schedule another attempt when the policy allows one (``status`` 0: no response)."""
        target = self.target
        retry = target.retry if target is not None else None
        if (
            not self.can_retry
            or retry is None
            or target is None
            or self.retries >= retry.num_retries
            or (self.overall and outcome == Outcome.TIMEOUT)  # the request deadline is spent
        ):
            return False
        if target.retries_active >= target.max_retries:
            return False
        if status:
            if not retry.retriable_status(status):
                return False
        elif not retry.retriable_failure(outcome):
            return False
        self.retries += 1
        self.dirty = True
        self.plane.metrics.retries.labels(target.service, target.subset).inc()
        target.retries_active += 1
        self.backing_off = True
        self.pause(_P_WAIT)
        self.attempt += 1
        self.timer = self.plane.loop.call_later(
            retry.backoff_s(self.retries, self.plane.engine.rng), self._after_backoff, self.attempt
        )
        return True

    def _after_backoff(self, attempt: int) -> None:
        if attempt != self.attempt or self.req is None:
            return
        self.timer = None
        self.backing_off = False
        target = self.target
        if target is not None:
            target.retries_active -= 1
        deadline = self.deadline
        now = self.plane.loop.time()
        if deadline is not None and now >= deadline:
            self._reply(504, "upstream request timeout")
            return
        self._attempt(now)

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
            and (status >= 500 or host.consecutive_5xx or host.consecutive_gateway or host.consecutive_local)
        ):
            # (A success on a host with no failure streak changes nothing in the outlier
            # detector, so that common case skips the call.)
            engine = self.plane.engine
            outcome = engine.outcome_for_status(status)
            if target.report(host, outcome, engine.clock()):
                self.plane.metrics.ejections.labels(target.service, host.address).inc()
            if outcome != Outcome.OK and self._retry(outcome, status):
                host.active -= 1
                self.host = None
                if self.tried is None:
                    self.tried = [host]
                    self.dirty = True
                else:
                    self.tried.append(host)
                self._detach(True)  # discard mode: the connection pools itself once drained
                return
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
        gw = self.gw_route
        if ops is not None or (gw is not None and gw.response_headers):
            headers = list(headers)
            if ops is not None:
                _apply_ops(headers, ops)
            if gw is not None:
                for f in gw.response_headers:
                    _gateway_filter(headers, f.set, f.add, f.remove)
        for name, value in headers:
            parts += (name, b": ", value, _CRLF)
        close = self.close_after or not req.keep_alive
        if status == 101:
            parts += (b"connection: upgrade\r\nupgrade: ", resp.upgrade or b"", b"\r\n\r\n")
            self.out.append(b"".join(parts))
            return
        if req.method == "HEAD" or status in (204, 304) or status < 200:
            if resp.length is not None and status != 204:
                parts += (b"content-length: ", resp.length, _CRLF)
        elif resp.length is not None:
            parts += (b"content-length: ", resp.length, _CRLF)
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
            parts.append(_CRLF)
        self.out.append(b"".join(parts))

    def response_body(self, data: bytes) -> None:
        if not self.resp_started:
            return
        slow = self.slow
        if slow is not None:
            self._slow_body(data)
            return
        if self.resp_chunked:
            self.out += (h1.chunk_size(len(data)), data, _CRLF)
        else:
            self.out.append(data)

    def response_end(self, up: Upstream, resp: h1.Response) -> None:
        if up is not self.up or not self.resp_started:
            return
        if self.slow is not None and (self.slow or (self.up is not None and self.up.paused)):
            self.slow_end = True
            return
        if self.resp_chunked:
            self.out.append(_LAST_CHUNK)
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
            _DIRECTION[self.kind], self.source, self.dest, self.subset, 101, time.perf_counter() - self.t0
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
                self.out += (h1.chunk_size(len(piece)), piece, _CRLF)
            else:
                self.out.append(piece)
            self.flush()
            self.timer = self.plane.loop.call_later(len(piece) / self.slow_rate, self._slow_pump)
            return
        up = self.up
        if self.slow_end and up is not None:
            self.slow = None
            if self.resp_chunked:
                self.out.append(_LAST_CHUNK)
            up.paused = False
            req = self.req
            resp = up.resp
            self._finish(bool(resp is not None and resp.keep_alive and req.complete))
            return
        if up is not None and up.transport is not None and up.paused:
            up.paused = False
            up.transport.resume_reading()

    # -- endings ----------------------------------------------------------------------------

    def _reply(
        self,
        status: int,
        reason: str,
        *,
        close: bool = False,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
    ) -> None:
        """Answer the request in flight ourselves."""
        req = self.req
        assert req is not None
        self._cancel_timer()
        self._detach(False)
        close = close or self.close_after or not req.keep_alive or not req.complete or req.upgrade is not None
        self.close_after = close
        self.status = status
        self.resp_started = True
        self.resp_chunked = False
        self.slow = None
        self.out.append(
            h1.reply(
                status,
                reason,
                close=close,
                headers=headers,
                body=body,
                http10_keep_alive=req.http10 and not close,
            )
        )
        self._finish(False)

    def _finish(self, reusable: bool) -> None:
        """The exchange in flight is over: count it, release its upstream, go on to the next."""
        req = self.req
        assert req is not None
        self._cancel_timer()
        self.flush()
        plane = self.plane
        elapsed = time.perf_counter() - self.t0
        series = self.series
        if series is None:
            series = plane.stats.get(_DIRECTION[self.kind], self.source, self.dest, self.subset)
        else:
            self.series = None
        series.add(self.status, elapsed)
        target = self.target
        if target is not None:
            if target.log is not None:
                self._log(target.log, req, elapsed)
            target.active -= 1
            if self.backing_off:
                self.backing_off = False
                target.retries_active -= 1
            self.target = None
        host = self.host
        if host is not None:
            host.active -= 1
            self.host = None
        up = self.up
        if up is not None:
            if up.paused and up.transport is not None:
                up.paused = False
                up.transport.resume_reading()
            self._detach(reusable)
        self.slow = None
        self.slow_end = False
        self.req = None
        if not req.complete or req.upgrade is not None:
            self.close_after = True
        tr = self.transport
        if self.close_after or tr is None:
            self.queue = None
            if tr is not None:
                tr.close()
            return
        queue = self.queue
        if queue:
            nxt = queue.popleft()
            if not queue and self.bad is None:
                self.resume(_P_QUEUE)
            self.req = nxt
            self._begin(nxt)
            return
        if self.bad is not None:
            err, self.bad = self.bad, None
            tr.write(h1.reply(err.status, err.reason, close=True))
            tr.close()
            return
        self.idle_since = plane.now
        if self.paused:
            self.resume(_P_WAIT | _P_UPSTREAM)

    def _log(self, conf: TrafficLogConf, req: h1.Request, elapsed: float) -> None:
        target = self.target
        assert target is not None
        tried = self.tried
        host = self.host or (tried[-1] if tried else None)
        self.plane.access_log.write(
            conf,
            {
                "time": time.time(),
                "direction": _DIRECTION[self.kind],
                "source_service": self.source,
                "destination_service": target.service,
                "destination_subset": target.subset,
                "upstream": host.address if host is not None else "",
                "method": req.method,
                "path": _path_of(req.url),
                "response_code": self.status,
                "duration_ms": round(elapsed * 1000.0, 3),
            },
        )

    def _abandon(self) -> None:
        """The client went away with an exchange in flight: close its upstream, undo counts."""
        self._cancel_timer()
        self.attempt += 1
        up = self.up
        if up is not None:
            self.up = None
            up.client = None
            up.close()
        target = self.target
        if target is not None:
            target.active -= 1
            if self.backing_off:
                self.backing_off = False
                target.retries_active -= 1
            self.target = None
        host = self.host
        if host is not None:
            host.active -= 1
            self.host = None
        self.req = None

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
            self.pause(_P_QUEUE)
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
            self.pause(_P_UPGRADE)


def _path_of(path_qs: bytes) -> str:
    """The decoded path of a request target (no query), as route matches see it."""
    i = path_qs.find(b"?")
    raw = path_qs if i < 0 else path_qs[:i]
    if raw[:1] != b"/":
        rest = raw.partition(b"://")[2]
        j = rest.find(b"/")
        raw = rest[j:] if j >= 0 else b"/"
    text = raw.decode("latin-1")
    return unquote(text) if "%" in text else text


class FastHttp:
    """The HTTP listeners of one data plane on the fast path, and what they share."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        app_address: str | None = None,
        own_addresses: set[tuple[str, int]] | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.stats = RequestStats(metrics)
        self.stats.install()
        self.own_addresses = own_addresses if own_addresses is not None else set()
        self.app_key = app_address or ""
        if app_address:
            host, _, port = app_address.rpartition(":")
            self.app: tuple[str, int] = (host.strip("[]"), int(port))
        else:
            self.app = ("", 0)
        self.pool = Pool()
        self.creds = Credentials()
        self.peers = PeerCache()
        self.conns: set[ClientConn] = set()
        self.hosts: dict[bytes, tuple[str, int | None]] = {}
        self.sources: dict[bytes, str] = {}
        self.access_log = AccessLog()
        self.draining = False
        self.drained: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.timed: set[ClientConn] = set()
        self.now = 0.0
        """Loop time, refreshed by the ticks: good enough for idle bookkeeping."""
        self.series_by_target: tuple[dict[Target, Series], ...] = ({}, {}, {})
        self._ticker: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._service_b: tuple[str, bytes] = ("", b"")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self.now = loop.time()
            self._sweeper = loop.call_later(_SWEEP_S, self._sweep)
        return loop

    @property
    def service_b(self) -> bytes:
        name = self.engine.service
        cached = self._service_b
        if cached[0] != name:
            cached = self._service_b = (name, name.encode("latin-1"))
        return cached[1]

    def factory(self, kind: str, port: int = 0) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server``: ``outbound``, ``inbound`` or ``gateway``."""
        code = {"outbound": OUTBOUND, "inbound": INBOUND, "gateway": GATEWAY}[kind]
        _ = self.loop
        return lambda: ClientConn(self, code, port)

    def connect(
        self, client: ClientConn, key: str, host: str, port: int, timeout: float | None, attempt: int
    ) -> None:
        task = self.loop.create_task(self._connect(client, key, host, port, timeout, attempt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(
        self, client: ClientConn, key: str, host: str, port: int, timeout: float | None, attempt: int
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                if key.startswith(_TLS_KEY):
                    ctx = self.creds.client_ctx
                    if ctx is None:
                        raise OSError("no mesh certificate")
                    _, up = await self.loop.create_connection(
                        lambda: Upstream(self, key), host, port, ssl=ctx, server_hostname=host
                    )
                    why = wrong_peer(self.peers, up.transport, client.dest)
                    if why is not None:
                        up.close()
                        raise OSError(why)
                else:
                    _, up = await self.loop.create_connection(lambda: Upstream(self, key), host, port)
        except TimeoutError:
            client.connect_failed(attempt, Outcome.TIMEOUT, None)
            return
        except OSError as e:
            client.connect_failed(attempt, Outcome.CONNECT_FAILURE, e)
            return
        client.connected(attempt, up)

    def mirror(self, target: Target, head: bytes) -> None:
        """Send a bodyless request to one of ``target``'s hosts and drop the answer."""
        host = target.pick(self.loop.time(), self.engine.rng)
        if host is None:
            return
        self.metrics.mirrors.labels(target.service).inc()
        task = self.loop.create_task(self._mirror(target, host.address, head))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mirror(self, target: Target, address: str, head: bytes) -> None:
        name, _, port = address.rpartition(":")
        name = name.strip("[]")
        mesh = self.engine.snapshot.mesh
        ctx = self.creds.client_ctx if mesh is not None and mesh.mtls.enabled else None
        with contextlib.suppress(OSError, TimeoutError, ValueError):
            async with asyncio.timeout(target.request_timeout_s or 15.0):
                if mesh is not None and mesh.mtls.enabled and ctx is None:
                    return  # no certificate yet: the peer would refuse plaintext
                reader, writer = await asyncio.open_connection(
                    name, int(port), ssl=ctx, server_hostname=name if ctx is not None else None
                )
                try:
                    if ctx is None or wrong_peer(self.peers, writer.transport, target.service) is None:
                        writer.write(head)
                        while await reader.read(65536):
                            pass
                finally:
                    writer.close()

    def on_new_certificate(self) -> None:
        """A new certificate or mTLS mode: new connections use it; pooled ones stay usable."""

    def time(self, conn: ClientConn) -> None:
        """Watch ``conn.deadline_at`` (a per-try deadline) from the 25 ms tick."""
        self.timed.add(conn)
        if self._ticker is None:
            self._ticker = self.loop.call_later(_TICK_S, self._tick)

    def _tick(self) -> None:
        loop = self.loop
        now = self.now = loop.time()
        due = [c for c in self.timed if c.deadline_at <= now]
        for conn in due:
            self.timed.discard(conn)
            if conn.deadline_at:
                conn.deadline_at = 0.0
                conn._on_timeout(conn.attempt)
        self._ticker = loop.call_later(_TICK_S, self._tick) if self.timed else None

    def release(self, up: Upstream, reusable: bool) -> None:
        if reusable and not up.closed and not self.draining:
            if up.paused and up.transport is not None:
                up.paused = False
                up.transport.resume_reading()
            self.pool.put(up, self.now)
        else:
            up.close()

    def _sweep(self) -> None:
        loop = self.loop
        now = self.now = loop.time()
        self.pool.sweep(now - _UPSTREAM_IDLE_S)
        limit = now - _KEEPALIVE_S
        for conn in [c for c in self.conns if c.req is None and not c.tunnel and c.idle_since < limit]:
            if conn.transport is not None:
                conn.transport.close()
        self._sweeper = loop.call_later(_SWEEP_S, self._sweep)

    async def drain(self, deadline: float) -> None:
        """Stop keeping connections alive, let exchanges in flight finish (until ``deadline``)."""
        loop = self.loop
        self.draining = True
        self.drained = loop.create_future()
        for conn in list(self.conns):
            conn.close_after = True
            if conn.req is None and not conn.tunnel and conn.transport is not None:
                conn.transport.close()
        if self.conns:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.drained), max(0.0, deadline - loop.time()))
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
        for task in list(self._tasks):
            task.cancel()
        self.pool.close()
        self.access_log.close()
