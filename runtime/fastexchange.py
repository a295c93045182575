"""The fast path's exchange with an upstream, and how an exchange ends.

``Exchange`` holds a client connection's state; ``ClientConn`` (``runtime.fastconn``) adds the
client side. Here: the attempts to a target's hosts (pooled or new connections, per-try and
request deadlines watched by ``FastPlane``'s tick, retries with backoff, outlier reports), the
response relayed back (corked writes, chunked re-framing, response header changes, the bandwidth
fault), the answers made by the data plane itself, and the bookkeeping when an exchange ends.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import unquote

from runtime import h1
from runtime._hosts import Host, Outcome
from runtime._lb import RingHash
from runtime._policy import MAX_RETRY_BODY
from runtime.bundle import HeaderChange, HeaderOps, TrafficLogConf
from runtime.engine import GatewayRoute, Target
from runtime.fastmetrics import Series
from runtime.fastplane import TLS_KEY, FastPlane
from runtime.fastpool import P_UPSTREAM, Upstream

if TYPE_CHECKING:
    from runtime.identity import PeerIdentity

REASON_HEADER = "x-meshc-reason"
SOURCE_HEADER = b"x-meshc-source-service"
_NO_TLS: tuple[bool, PeerIdentity | None] = (False, None)
HASH_KEY_HEADER = "x-meshc-hash-key"

OUTBOUND, INBOUND, GATEWAY = 0, 1, 2
_DIRECTION = ("outbound", "inbound", "gateway")
NO_HOST = "no healthy upstream"
_RESET = "upstream connect error or disconnect/reset before headers"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CRLF = b"\r\n"
LAST_CHUNK = h1.LAST_CHUNK

# Why a client connection's reading is paused (a bit each).
_P_UPSTREAM = P_UPSTREAM  # the upstream's write buffer is full
P_QUEUE = 2  # pipelined requests are waiting
P_WAIT = 4  # the body has nowhere to go yet (connecting, fault delay, backoff)
P_UPGRADE = 8  # an Upgrade request waits for its 101


def _set_header(headers: list[tuple[bytes, bytes]], name: str, value: str, append: bool) -> None:
    n = name.encode("latin-1")
    if not append:
        low = n.lower()
        headers[:] = [h for h in headers if h[0].lower() != low]
    headers.append((n, value.encode("latin-1")))


def _remove_header(headers: list[tuple[bytes, bytes]], name: str) -> None:
    low = name.encode("latin-1").lower()
    headers[:] = [h for h in headers if h[0].lower() != low]


def apply_ops(headers: list[tuple[bytes, bytes]], ops: HeaderOps) -> None:
    for name in ops.remove:
        _remove_header(headers, name)
    for change in ops.add:
        _set_header(headers, change.name, change.value, change.append)


def gateway_filter(
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


def path_of(path_qs: bytes) -> str:
    """The decoded path of a request target (no query), as route matches see it."""
    i = path_qs.find(b"?")
    raw = path_qs if i < 0 else path_qs[:i]
    if raw[:1] != b"/":
        rest = raw.partition(b"://")[2]
        j = rest.find(b"/")
        raw = rest[j:] if j >= 0 else b"/"
    text = raw.decode("latin-1")
    return unquote(text) if "%" in text else text


class Exchange(asyncio.Protocol):
    """A client connection's state, and its exchange with the upstream: attempts, the response,
    the answers made here, the end of the exchange. ``ClientConn`` adds the client side."""

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
        "resp_bytes",
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

    def __init__(self, plane: FastPlane, kind: int, port: int = 0) -> None:
        self.plane = plane
        self.kind = kind
        self.port = port
        self.transport: asyncio.Transport | None = None
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
        self.resp_bytes = 0
        self.resp_ops: HeaderOps | None = None
        self.gw_route: GatewayRoute | None = None
        self.slow: deque[bytes] | None = None
        self.slow_rate = 0.0
        self.slow_end = False
        self.tls_peer: tuple[bool, PeerIdentity | None] = _NO_TLS

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

    def _begin(self, req: h1.Request) -> None:
        """Start the next request of the connection (``ClientConn`` routes it)."""
        raise NotImplementedError

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
            self.key = req.header_map().get(HASH_KEY_HEADER) or path_of(req.url)
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
            self._reply(503, NO_HOST)
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
                key = TLS_KEY + key
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
                self.pause(P_WAIT)
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
                    pieces += (h1.chunk_size(len(data)), data, CRLF)
            else:
                pieces = [self.head_out, *body]
            if req.complete and req.chunked:
                pieces.append(LAST_CHUNK)
            tr.writelines(pieces)
            if req.saved is None:
                req.body = []
        elif req.complete and req.chunked:
            tr.writelines((self.head_out, LAST_CHUNK))
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
            self.resume(P_WAIT)

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

    def on_timeout(self, attempt: int) -> None:
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
        self.pause(P_WAIT)
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
                apply_ops(headers, ops)
            if gw is not None:
                for f in gw.response_headers:
                    gateway_filter(headers, f.set, f.add, f.remove)
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
        self.resp_bytes = len(body) if body else 0
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
        series.add(self.status, elapsed, req.body_bytes, self.resp_bytes)
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
                self.resume(P_QUEUE)
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
            self.resume(P_WAIT | _P_UPSTREAM)

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
                "path": path_of(req.url),
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
