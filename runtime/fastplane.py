"""The state the fast path's client connections share, and the work done for all of them.

One ``FastPlane`` per data plane: the engine and counters, the upstream ``Pool``, connecting
(one task per new upstream connection), gateway mirrors, the 25 ms tick that fires per-try
deadlines (no loop timer per request), the sweep (idle keep-alive connections, and the
listeners' header and body read timeouts of ``ListenerLimits``) and the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from runtime._hosts import Outcome
from runtime.accesslog import AccessLog
from runtime.decide import Fetcher, Reply, StreamWatch, inbound_header_timeout, no_fetcher, peer_hop
from runtime.engine import Engine, Target
from runtime.fastmetrics import Series
from runtime.fastpool import Pool, Upstream
from runtime.limits import ListenerLimits
from runtime.metrics import Metrics
from runtime.security import Credentials, PeerCache, wrong_peer

__all__ = ["TLS_KEY", "Conn", "FastPlane"]

TLS_KEY = "tls|"
"""Pool key prefix of mutual-TLS connections to peer data planes."""
_KEEPALIVE_S = 75.0
_UPSTREAM_IDLE_S = 30.0
_SWEEP_S = 5.0
_TICK_S = 0.025
DIRECTION_NAMES = ("outbound", "inbound", "gateway")
"""The metrics' direction label per listener kind (``fastexchange.DIRECTION``)."""


class Conn(Protocol):
    """A client connection, as the shared machinery sees it."""

    tunnel: bool
    idle_since: float
    head_at: float
    """Loop time a request head began to arrive (0: none is pending)."""
    body_at: float
    """Loop time of the last read of a request body still arriving (0: none is)."""
    paused: int
    close_after: bool
    deadline_at: float
    attempt: int
    dest: str
    kind: int
    watch: StreamWatch | None
    """The stream timeouts of the exchange in flight (``FastPlane.watch``)."""

    @property
    def req(self) -> object: ...
    @property
    def transport(self) -> asyncio.Transport | None: ...

    def on_timeout(self, attempt: int) -> None: ...
    def read_timed_out(self, reason: str) -> None: ...
    def stream_timed_out(self, why: str) -> None: ...
    def connected(self, attempt: int, up: Upstream) -> None: ...
    def connect_failed(self, attempt: int, outcome: int, exc: BaseException | None) -> None: ...


class FastPlane:
    """What the fast path's connections share: engine, pool, counters, timers, drain."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        app_address: str | None = None,
        own_addresses: set[tuple[str, int]] | None = None,
        limits: ListenerLimits | None = None,
    ) -> None:
        self.engine = engine
        self.limits = limits or ListenerLimits()
        self.open = [0, 0, 0]
        """Client connections open per listener kind (outbound, inbound, gateway)."""
        self._sweep_s = min(_SWEEP_S, self.limits.header_timeout_s / 4, self.limits.body_timeout_s / 4)
        self.metrics = metrics
        self.stats = metrics.stats
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
        self.conns: set[Conn] = set()
        self.hosts: dict[bytes, tuple[str, int | None]] = {}
        self.sources: dict[bytes, str] = {}
        self.access_log = AccessLog(metrics.logs, engine)
        self.draining = False
        self.fetch: Fetcher = no_fetcher
        """Fetches a pending destination's config (``decide.Fetch``); set by the server."""
        self.drained: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.timed: set[Conn] = set()
        self.now = 0.0
        """Loop time, refreshed by the ticks: good enough for idle bookkeeping."""
        self.series_by_target: tuple[dict[Target, Series], ...] = ({}, {}, {})
        self._ticker: asyncio.TimerHandle | None = None
        self.watched: set[Conn] = set()
        """Exchanges in flight with stream timeouts (``decide.StreamWatch``)."""
        self._watcher: asyncio.TimerHandle | None = None
        self._watch_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._service_b: tuple[str, bytes] = ("", b"")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self.now = loop.time()
            self._sweeper = loop.call_later(self._sweep_s, self._sweep)
        return loop

    @property
    def service_b(self) -> bytes:
        name = self.engine.service
        cached = self._service_b
        if cached[0] != name:
            cached = self._service_b = (name, name.encode("latin-1"))
        return cached[1]

    def connect(
        self, client: Conn, key: str, host: str, port: int, timeout: float | None, attempt: int
    ) -> None:
        task = self.loop.create_task(self._connect(client, key, host, port, timeout, attempt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(
        self, client: Conn, key: str, host: str, port: int, timeout: float | None, attempt: int
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                if key.startswith(TLS_KEY):
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
        hop = peer_hop(self.engine.snapshot, self.creds.client_ctx is not None, "", target.service)
        if isinstance(hop, Reply):
            return  # no certificate yet: the peer would refuse plaintext
        ctx = self.creds.client_ctx if hop else None
        with contextlib.suppress(OSError, TimeoutError, ValueError):
            async with asyncio.timeout(target.request_timeout_s or 15.0):
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

    def time(self, conn: Conn) -> None:
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
                conn.on_timeout(conn.attempt)
        self._ticker = loop.call_later(_TICK_S, self._tick) if self.timed else None

    def watch(self, conn: Conn) -> None:
        """Check ``conn.watch`` when it may be due: one loop timer for every watched exchange,
        set for the earliest (progress only moves a limit later, so an early check re-arms)."""
        assert conn.watch is not None
        self.watched.add(conn)
        at = conn.watch.next_check()
        if self._watcher is None or at < self._watch_at:
            self._arm_watcher(at)

    def unwatch(self, conn: Conn) -> None:
        conn.watch = None
        self.watched.discard(conn)

    def _arm_watcher(self, at: float) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        loop = self.loop
        self._watch_at = at
        self._watcher = loop.call_at(at, self._check_watched)

    def _check_watched(self) -> None:
        self._watcher = None
        now = self.loop.time()
        soonest = float("inf")
        for conn in list(self.watched):
            w = conn.watch
            if w is None:
                self.watched.discard(conn)
                continue
            why = w.due(now)
            if why is not None:
                self.unwatch(conn)
                self.metrics.listener_refusals.labels(DIRECTION_NAMES[conn.kind], why.replace(" ", "_")).inc()
                conn.stream_timed_out(why)
            else:
                soonest = min(soonest, w.next_check())
        if soonest != float("inf"):
            self._arm_watcher(soonest)

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
        head_s = self.limits.header_timeout_s
        inbound_s = inbound_header_timeout(self.engine.snapshot, head_s)
        head_limits = (now - head_s, now - inbound_s, now - head_s)
        body_limit = now - self.limits.body_timeout_s
        for conn in list(self.conns):
            if conn.tunnel or conn.transport is None:
                continue
            if conn.req is None:
                if conn.head_at:
                    if conn.head_at < head_limits[conn.kind]:
                        conn.read_timed_out("no complete request head in time")
                elif conn.idle_since < limit:
                    conn.transport.close()
            elif conn.body_at and not conn.paused and conn.body_at < body_limit:
                conn.read_timed_out("the request body stopped arriving")
        # An inbound requestHeadersTimeout shorter than the listener's is checked as often.
        self._sweeper = loop.call_later(min(self._sweep_s, inbound_s / 4), self._sweep)

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
        if self._watcher is not None:
            self._watcher.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
        for task in list(self._tasks):
            task.cancel()
        self.pool.close()
        self.access_log.close()
