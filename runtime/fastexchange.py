"""The fast path's exchange with an upstream, and how an exchange ends.

``Exchange`` holds a client connection's state; ``ClientConn`` (``runtime.fastconn``) adds the
client side (requests in, responses back). Here: the attempts at a target's hosts (pooled or new
connections, per-try and request deadlines watched by ``FastPlane``'s tick, retries with backoff
as ``decide.RetryState`` says, outlier reports), the answers made by the data plane itself
(``decide.Reply``), and the bookkeeping when an exchange ends.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from runtime import h1
from runtime._hosts import Host, Outcome
from runtime._lb import RingHash
from runtime.accesslog import app_entry, head_getter
from runtime.bundle import TrafficLogConf
from runtime.decide import (
    APP,
    NO_HOST,
    Forward,
    Reply,
    RetryState,
    StreamWatch,
    admit,
    failure_reply,
    peer_hop,
    release,
    release_app,
    report_app,
    stream_cut,
)
from runtime.engine import RoutePolicy, Target
from runtime.fastmetrics import Series
from runtime.fastplane import DIRECTION_NAMES, TLS_KEY, FastPlane
from runtime.fastpool import P_UPSTREAM, Upstream, UpstreamClient
from runtime.h1 import path_of
from runtime.headerops import ADD, NO_OPS, REMOVE, HeaderOp
from runtime.tracing import Hop

if TYPE_CHECKING:
    from runtime.identity import PeerIdentity

REASON_HEADER = "x-meshc-reason"
SOURCE_HEADER = b"x-meshc-source-service"
_NO_TLS: tuple[bool, PeerIdentity | None] = (False, None)
HASH_KEY_HEADER = "x-meshc-hash-key"

OUTBOUND, INBOUND, GATEWAY = 0, 1, 2
DIRECTION = DIRECTION_NAMES
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CRLF = b"\r\n"
LAST_CHUNK = h1.LAST_CHUNK

# Why a client connection's reading is paused (a bit each).
_P_UPSTREAM = P_UPSTREAM  # the upstream's write buffer is full
P_QUEUE = 2  # pipelined requests are waiting
P_WAIT = 4  # the body has nowhere to go yet (connecting, fault delay, backoff)
P_UPGRADE = 8  # an Upgrade request waits for its 101


def apply_ops(headers: list[tuple[bytes, bytes]], ops: tuple[HeaderOp, ...]) -> None:
    """Carry out header changes (``runtime.headerops``) on a head's header list."""
    for op, name, value in ops:
        n = name.encode("latin-1")
        if op != ADD:
            low = n.lower()
            headers[:] = [h for h in headers if h[0].lower() != low]
        if op != REMOVE:
            headers.append((n, value.encode("latin-1")))


class Exchange(asyncio.Protocol):
    """A client connection's state, and its exchange with the upstream: attempts, the response,
    the answers made here, the end of the exchange. ``ClientConn`` adds the client side."""

    __slots__ = (
        "attempt",
        "bad",
        "body_at",
        "close_after",
        "closed",
        "continued",
        "counted",
        "deadline_at",
        "dest",
        "dirty",
        "early",
        "fetching",
        "fwd",
        "go_args",
        "head_at",
        "head_out",
        "host",
        "idle_since",
        "key",
        "kind",
        "lingering",
        "out",
        "paused",
        "peer",
        "plane",
        "port",
        "queue",
        "reader",
        "reply_logs",
        "req",
        "resp_bytes",
        "resp_chunked",
        "resp_ops",
        "resp_started",
        "retry",
        "secure",
        "sending",
        "series",
        "slow",
        "slow_end",
        "slow_rate",
        "source",
        "span",
        "stale_retried",
        "status",
        "subset",
        "t0",
        "target",
        "timer",
        "tls_peer",
        "transport",
        "try_timeout",
        "tunnel",
        "up",
        "watch",
        "write_paused",
    )

    def __init__(self, plane: FastPlane, kind: int, port: int = 0) -> None:
        self.plane = plane
        self.kind = kind
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.peer = b""
        self.secure = False
        """The client connection is TLS (for the scheme a redirect keeps)."""
        self.req: h1.Request | None = None
        self.queue: deque[h1.Request] | None = None
        self.paused = 0
        self.write_paused = False
        self.out: list[bytes] = []
        self.closed = False
        self.close_after = False
        self.idle_since = 0.0
        self.head_at = 0.0
        self.body_at = 0.0
        self.counted = False
        """It holds one of its listener's ``max_connections`` places."""
        self.tunnel = False
        self.lingering = False
        self.early = b""
        self.bad: h1.H1Error | None = None
        # The exchange in flight (reset by ``_begin``).
        self.up: Upstream | None = None
        self.target: Target | None = None
        self.span: Hop | None = None
        """This hop's span (its ``Forward.trace``): access log and Zipkin."""
        self.host: Host | None = None
        self.fwd: Forward | None = None
        self.fetching: asyncio.Future[None] | None = None
        """An on-demand fetch of the request's destination (``decide.Fetch``), while it waits."""
        self.retry: RetryState | None = None
        self.stale_retried = False
        self.key: str | None = None
        self.head_out = b""
        self.timer: asyncio.TimerHandle | None = None
        self.deadline_at = 0.0
        self.attempt = 0
        self.go_args: tuple[str, str, int, float | None] = ("", "", 0, None)
        self.try_timeout: float | None = None
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
        self.resp_ops: tuple[HeaderOp, ...] = NO_OPS
        self.slow: deque[bytes] | None = None
        self.slow_rate = 0.0
        self.slow_end = False
        self.tls_peer: tuple[bool, PeerIdentity | None] = _NO_TLS
        self.reply_logs: tuple[TrafficLogConf, ...] = ()
        """The inbound access logs of a request answered before it reached the app."""
        self.watch: StreamWatch | None = None
        """The stream timeouts of the exchange in flight (``FastPlane.watch``)."""

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
                if self.body_at:  # the body's read timeout counts from here, not while paused
                    self.body_at = self.plane.loop.time()

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

    def read_timed_out(self, reason: str) -> None:
        """A head or a body stopped arriving (``ClientConn`` answers 408)."""
        raise NotImplementedError

    # -- upstream attempts ------------------------------------------------------------------

    def _to_target(self, req: h1.Request, target: Target, route: RoutePolicy | None = None) -> None:
        """Send to one of the target's hosts with its timeouts, retries and ejection (``route``:
        the matched route rule's own timeout and retries, ``Forward.policy``)."""
        self.dest = target.service
        self.subset = target.subset
        plane = self.plane
        by_target = plane.series_by_target[self.kind]
        series = by_target.get(target)
        if series is None:
            if len(by_target) > 4096:
                by_target.clear()  # old snapshots' targets; the series live on in the stats
            series = by_target[target] = plane.stats.get(
                DIRECTION[self.kind], self.source, target.service, target.subset
            )
        self.series = series
        refused = admit(target, self.source)
        if refused is not None:
            self._answer(refused)
            return
        now = plane.loop.time()
        length = (None if req.chunked else req.length) if req.has_body else 0
        retry = self.retry = RetryState(target, req.method, length, now, route)
        if retry.allowed and req.has_body:
            req.saved = req.body  # kept for a replay
            req.body = []
        if type(target.balancer) is RingHash:
            self.key = req.header_map().get(HASH_KEY_HEADER) or path_of(req.url)
        else:
            self.key = None
        target.active += 1
        self.target = target
        self._watch(target.stream_idle_timeout_s, target.max_stream_s, now)
        self._attempt(now)

    def _watch(self, idle_s: float | None, max_s: float | None, now: float) -> None:
        """Start the exchange's stream timeouts (``decide.StreamWatch``), when it has any."""
        if idle_s is not None or max_s is not None:
            self.watch = StreamWatch(idle_s, max_s, now)
            self.plane.watch(self)

    def stream_timed_out(self, why: str) -> None:
        """A stream timeout passed (``FastPlane.watch``): 408 before the response began, else the
        client connection is closed on a truncated response (HTTP/1.1's only reset)."""
        if self.req is None or self.tunnel:
            return
        self.attempt += 1  # what the attempt in flight still has scheduled is void
        self.close_after = True  # the request's bytes may still be on their way: not reusable
        if not self.resp_started:
            self._answer(stream_cut(self.source, self.dest, why))
            return
        self.resp_chunked = False
        self.slow = None
        self._finish(False)

    def _attempt(self, now: float) -> None:
        target = self.target
        retry = self.retry
        assert target is not None and retry is not None
        plane = self.plane
        engine = plane.engine
        host = target.pick(engine.clock(), engine.rng, self.key, retry.tried)
        if host is None:
            self._reply(503, NO_HOST)
            return
        self.host = host
        host.active += 1
        key = host.address
        hop = peer_hop(engine.snapshot, plane.creds.client_ctx is not None, self.source, target.service)
        if hop is True:
            key = TLS_KEY + key  # mutual TLS, pooled under its own key so keep-alive reuses it
        elif hop is not False:
            self._answer(hop)
            return
        self._go(key, host.host, host.port, retry.try_timeout(now), target.connect_timeout_s, now)

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
        up.client = cast(UpstreamClient, self)  # a ClientConn, whose response side reads it
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
        """An attempt ended before a response head: retry, or give up with the answer."""
        target = self.target
        retry = self.retry
        if target is not None and retry is not None:
            host = self.host
            if host is not None:
                host.active -= 1
                self.host = None
                if target.report(host, outcome, self.plane.engine.clock()):
                    self.plane.metrics.ejections.labels(target.service, host.address).inc()
            if not self._retry(host, outcome, 0):
                self._answer(retry.give_up(outcome, self.source))
            return
        fwd = self.fwd
        assert fwd is not None
        if fwd.kind == APP and fwd.app.outlier is not None:
            self._report_app(fwd, outcome)
        self._answer(failure_reply(fwd, outcome, type(exc).__name__ if exc else "ServerDisconnectedError"))

    def _report_app(self, fwd: Forward, outcome: int) -> None:
        """One outcome of the local app for its outlier detector (``decide.report_app``)."""
        plane = self.plane
        if report_app(fwd, outcome, plane.engine.clock()):
            plane.metrics.ejections.labels(fwd.dest, plane.app_key).inc()

    def _retry(self, host: Host | None, outcome: int, status: int) -> bool:
        """Schedule another attempt when the policy allows one (``status`` 0: no response)."""
        retry = self.retry
        target = self.target
        if retry is None or target is None:
            return False
        backoff = retry.failed(host, outcome, status, self.plane.engine.rng)
        if backoff is None:
            return False
        self.dirty = True
        self.plane.metrics.retries.labels(target.service, target.subset).inc()
        self.pause(P_WAIT)
        self.attempt += 1
        self.timer = self.plane.loop.call_later(backoff, self._after_backoff, self.attempt)
        return True

    def _after_backoff(self, attempt: int) -> None:
        if attempt != self.attempt or self.req is None:
            return
        self.timer = None
        retry = self.retry
        assert retry is not None
        now = self.plane.loop.time()
        late = retry.resume(now, self.source)
        if late is not None:
            self._answer(late)
            return
        self._attempt(now)

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
        """Answer the request in flight ourselves (its span says why, in ``_finish``)."""
        req = self.req
        assert req is not None
        span = self.span
        if span is not None and not span.reason:
            span.reason = reason
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

    def _answer(self, reply: Reply) -> None:
        """Carry out a ``Reply`` verdict (after its delay, for a fault)."""
        if self.series is None:
            self.source, self.dest = reply.source, reply.dest
        if self.span is None:
            self.span = reply.trace  # the request's answer: its span is reported in ``_finish``
        if reply.overflow:
            self.plane.metrics.overflow.labels(reply.dest).inc()
        if reply.logs:
            self.reply_logs = reply.logs
        if reply.delay_s:
            self.pause(P_WAIT)
            self.timer = self.plane.loop.call_later(reply.delay_s, self._answer_late, reply, self.attempt)
            return
        body = reply.body.encode() if reply.body is not None else None
        self._reply(reply.status, reply.reason, headers=reply.headers, body=body)

    def _answer_late(self, reply: Reply, attempt: int) -> None:
        if attempt == self.attempt and self.req is not None:
            self.timer = None
            reply.delay_s = 0.0
            self._answer(reply)

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
            series = plane.stats.get(DIRECTION[self.kind], self.source, self.dest, self.subset)
        else:
            self.series = None
        series.add(self.status, elapsed, req.body_bytes, self.resp_bytes)
        span = self.span
        if span is not None and span.sampled:
            plane.metrics.spans.record(
                plane.engine.snapshot.trace_backend,
                span,
                service=plane.engine.service,
                direction=DIRECTION[self.kind],
                start_s=time.time() - elapsed,
                duration_s=elapsed,
                method=req.method,
                path=path_of(req.url),
                status=self.status,
            )
        target = self.target
        if target is not None and target.log is not None:
            self._log(target.log, req, elapsed)
        fwd = self.fwd
        if fwd is not None and fwd.app.logs and fwd.kind == APP:
            self._log_app(fwd.app.logs, self.plane.app_key, req, elapsed)
        elif self.reply_logs:
            self._log_app(self.reply_logs, "", req, elapsed)
            self.reply_logs = ()
        self.span = None
        if self.watch is not None:
            plane.unwatch(self)
        self._release_target()
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
        tried = self.retry.tried if self.retry is not None else None
        host = self.host or (tried[-1] if tried else None)
        self.plane.access_log.write(
            conf,
            {
                "time": time.time(),
                "direction": DIRECTION[self.kind],
                "source_service": self.source,
                "destination_service": target.service,
                "destination_subset": target.subset,
                "upstream": host.address if host is not None else "",
                "method": req.method,
                "path": path_of(req.url),
                "response_code": self.status,
                "duration_ms": round(elapsed * 1000.0, 3),
                "trace_id": self.span.trace_id if self.span is not None else "",
            },
            head_getter(req),
        )

    def _log_app(
        self, logs: tuple[TrafficLogConf, ...], upstream: str, req: h1.Request, elapsed: float
    ) -> None:
        """Inbound access log lines (``upstream``: the app, or empty for a request the sidecar
        answered itself)."""
        entry = app_entry(
            self.source,
            self.dest,
            upstream,
            req.method,
            path_of(req.url),
            self.status,
            elapsed,
            self.span.trace_id if self.span is not None else "",
        )
        get = head_getter(req)
        for conf in logs:
            self.plane.access_log.write(conf, entry, get)

    def _abandon(self) -> None:
        """The client went away with an exchange in flight: close its upstream, undo counts."""
        self._cancel_timer()
        self.reply_logs = ()
        if self.watch is not None:
            self.plane.unwatch(self)
        self.attempt += 1
        up = self.up
        if up is not None:
            self.up = None
            up.client = None
            up.close()
        self._release_target()
        self.req = None

    def _release_target(self) -> None:
        """Give back what the exchange held of its target: a slot, a host's, a retry's budget."""
        release(self.target, self.retry, self.host)
        self.target = self.host = None
        release_app(self.fwd)
