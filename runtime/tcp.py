"""L4 byte moving: TCP services, ``CONNECT`` tunnels and the outbound listener's protocol sniffer.

The outbound listener accepts both plain HTTP (handed to aiohttp) and ``CONNECT host:port``:
the first bytes of a connection decide. A ``CONNECT`` to a mesh TCP service is split per
connection by the destination's weighted split and tunnelled to the chosen endpoint (whose
inbound listener pipes it to its app); one to a host outside the mesh passes through when the
Mesh allows it and is refused with 403 and a reason header otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from runtime._hosts import Host, Outcome
from runtime.decide import (
    NO_HOST,
    TARGET,
    Fetcher,
    Reply,
    admit,
    admit_app,
    decide_connect,
    decide_tcp_gateway,
    decide_tcp_inbound,
    no_fetcher,
    peer_hop,
    release_app,
    settle,
)
from runtime.engine import Engine, Target
from runtime.metrics import Metrics
from runtime.security import Credentials, PeerCache

__all__ = ["OutboundSniffer", "TcpProxy"]

_CHUNK = 64 * 1024
_StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
_MAX_HEAD = 64 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle_s: float | None) -> None:
    try:
        while True:
            async with asyncio.timeout(idle_s):
                data = await reader.read(_CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


async def _splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    idle_s: float | None,
) -> None:
    """Copy both ways until both sides are done (or idle too long), then close both."""
    try:
        await asyncio.gather(_pipe(a_reader, b_writer, idle_s), _pipe(b_reader, a_writer, idle_s))
    finally:
        for w in (a_writer, b_writer):
            w.close()
        for w in (a_writer, b_writer):
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await w.wait_closed()


def _http_error(status: int, reason: str) -> bytes:
    body = reason.encode()
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return (
        f"HTTP/1.1 {status} {phrase}\r\nx-meshc-reason: {reason}\r\ncontent-type: text/plain\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class TcpProxy:
    """Tunnels and TCP listeners of one data plane; tracks live tunnels for draining."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        app_address: str | None = None,
        own_addresses: set[tuple[str, int]] | None = None,
    ) -> None:
        self.engine = engine
        self.own_addresses = own_addresses if own_addresses is not None else set()
        self.metrics = metrics
        self.app_address = app_address
        self.tasks: set[asyncio.Task[None]] = set()
        self.creds = Credentials()
        self.fetch: Fetcher = no_fetcher
        """Fetches a pending destination's config (``decide.Fetch``); set by the server."""
        self.peers = PeerCache()

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drain(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while self.tasks and loop.time() < deadline:
            await asyncio.wait(set(self.tasks), timeout=max(0.0, deadline - loop.time()))
        for task in list(self.tasks):
            task.cancel()

    def _count(self, direction: str, source: str, dest: str, subset: str, result: str) -> None:
        self.metrics.tcp_connections.labels(direction, source, dest, subset, result).inc()

    async def _connect_target(
        self, target: Target
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        engine = self.engine
        tried: list[Host] = []
        hop = peer_hop(engine.snapshot, self.creds.client_ctx is not None, engine.service, target.service)
        if isinstance(hop, Reply):
            return None  # no certificate yet: a STRICT peer would refuse plaintext
        ssl_ctx = self.creds.client_ctx if hop else None
        for _ in range(target.tcp_connect_attempts):
            host = target.pick(engine.clock(), engine.rng, None, tried)
            if host is None:
                return None
            tried.append(host)
            try:
                async with asyncio.timeout(target.connect_timeout_s):
                    if ssl_ctx is not None:
                        conn = await asyncio.open_connection(
                            host.host, host.port, ssl=ssl_ctx, server_hostname=host.host
                        )
                    else:
                        conn = await asyncio.open_connection(host.host, host.port)
            except TimeoutError:
                outcome = Outcome.TIMEOUT
            except OSError:
                outcome = Outcome.CONNECT_FAILURE
            else:
                target.report(host, Outcome.OK, engine.clock())
                return conn
            if target.report(host, outcome, engine.clock()):
                self.metrics.ejections.labels(target.service, host.address).inc()
        return None

    async def to_target(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        target: Target,
        direction: str,
        source: str,
        dest: str,
        established: bytes = b"",
    ) -> None:
        """Connect to one of the target's hosts and splice; ``established`` is sent on success."""
        refused = admit(target, source)
        if refused is not None:
            self._refuse(writer, refused, direction, bool(established))
            return
        target.active += 1
        try:
            conn = await self._connect_target(target)
            if conn is None:
                if established:
                    writer.write(_http_error(503, NO_HOST))
                writer.close()
                self._count(direction, source, dest, target.subset, "connect_failure")
                return
            self._count(direction, source, dest, target.subset, "connected")
            if established:
                writer.write(established)
            await _splice(reader, writer, conn[0], conn[1], target.tcp_idle_timeout_s)
        finally:
            target.active -= 1

    async def to_address(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: tuple[str, int],
        direction: str,
        source: str,
        dest: str,
        established: bytes = b"",
        connect_s: float | None = 5.0,
        idle_s: float | None = 3600.0,
    ) -> None:
        try:
            async with asyncio.timeout(connect_s):
                conn = await asyncio.open_connection(*address)
        except (OSError, TimeoutError):
            if established:
                writer.write(_http_error(502, f"cannot connect to {address[0]}:{address[1]}"))
            writer.close()
            self._count(direction, source, dest, "", "connect_failure")
            return
        self._count(direction, source, dest, "", "connected")
        if established:
            writer.write(established)
        await _splice(reader, writer, conn[0], conn[1], idle_s)

    # -- listeners --------------------------------------------------------------------------

    def _refuse(self, writer: asyncio.StreamWriter, reply: Reply, direction: str, http: bool) -> None:
        """Carry out a ``Reply`` on a connection: an HTTP answer to a ``CONNECT``, else a close."""
        if reply.overflow:
            self.metrics.overflow.labels(reply.dest).inc()
        if http:
            writer.write(_http_error(reply.status, reply.reason))
        writer.close()
        result = "denied" if reply.status == 403 and direction == "inbound" else "refused"
        self._count(direction, reply.source, reply.dest, "", result)

    def _adopt(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def inbound_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Inbound listener of a TCP service: pipe to the app."""
        assert self.app_address is not None
        host, _, port = self.app_address.rpartition(":")
        self._adopt()
        is_tls, peer = self.peers.of(writer.transport)
        verdict = decide_tcp_inbound(self.engine, self.engine.snapshot, is_tls, peer)
        if isinstance(verdict, Reply):
            self._refuse(writer, verdict, "inbound", False)
            return
        refused = admit_app(verdict, self.engine.clock())
        if refused is not None:
            self._refuse(writer, refused, "inbound", False)
            return
        app = verdict.app
        try:
            await self.to_address(
                reader,
                writer,
                (host, int(port)),
                "inbound",
                verdict.source,
                verdict.dest,
                connect_s=app.connect_s,
                idle_s=app.tcp_idle_timeout_s,
            )
        finally:
            release_app(verdict)

    def gateway_handler(self, port: int) -> _StreamHandler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._adopt()
            verdict = decide_tcp_gateway(self.engine, self.engine.snapshot, port)
            if isinstance(verdict, Reply):
                self._refuse(writer, verdict, "gateway", False)
                return
            assert verdict.target is not None
            await self.to_target(reader, writer, verdict.target, "gateway", verdict.source, verdict.dest)

        return handle

    async def connect_request(self, head: bytes, rest: bytes, transport: asyncio.Transport) -> None:
        """Serve one ``CONNECT`` whose request head (through the blank line) is ``head``."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_CHUNK, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        if rest:
            reader.feed_data(rest)
        transport.resume_reading()
        try:
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            _method, authority, _version = line.split(" ", 2)
            name, _, port_s = authority.rpartition(":")
            name = name.strip("[]").lower()
            port = int(port_s)
        except ValueError:
            writer.write(_http_error(400, "malformed CONNECT request"))
            writer.close()
            return
        ok = b"HTTP/1.1 200 Connection Established\r\n\r\n"
        verdict = await settle(
            self.engine,
            decide_connect(self.engine, self.engine.snapshot, name, port, self.own_addresses),
            self.fetch,
            lambda s: decide_connect(self.engine, s, name, port, self.own_addresses),
        )
        if isinstance(verdict, Reply):
            self._refuse(writer, verdict, "outbound", True)
        elif verdict.kind == TARGET:
            assert verdict.target is not None
            await self.to_target(reader, writer, verdict.target, "outbound", verdict.source, name, ok)
        else:
            assert verdict.address is not None
            await self.to_address(reader, writer, verdict.address, "outbound", verdict.source, name, ok)


class OutboundSniffer(asyncio.Protocol):
    """First bytes decide: ``CONNECT`` is tunnelled here, anything else goes to aiohttp."""

    def __init__(
        self, http_factory: Callable[[], asyncio.Protocol], tcp: TcpProxy, header_timeout_s: float = 10.0
    ) -> None:
        self._http_factory = http_factory
        self._tcp = tcp
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._header_timeout_s = header_timeout_s
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        # A client that sends nothing (or too little to tell) is bounded by the header timeout.
        self._timer = asyncio.get_running_loop().call_later(self._header_timeout_s, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._tcp.metrics.listener_refusals.labels("outbound", "header_timeout").inc()
            self._transport.write(_http_error(408, "no complete request head in time"))
            self._transport.close()

    def _decided(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        buf = self._buf + data
        probe = buf[:8]
        if not b"CONNECT ".startswith(probe) and not probe.startswith(b"CONNECT "):
            self._handoff(buf)
            return
        if len(buf) < 8:
            self._buf = buf
            return
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self._transport.write(_http_error(400, "request head too large"))
                self._transport.close()
                return
            self._buf = buf
            return
        self._buf = b""
        self._decided()
        self._transport.pause_reading()
        self._tcp._track(self._tunnel(buf[: end + 4], buf[end + 4 :]))

    async def _tunnel(self, head: bytes, rest: bytes) -> None:
        assert self._transport is not None
        await self._tcp.connect_request(head, rest, self._transport)

    def _handoff(self, buf: bytes) -> None:
        assert self._transport is not None
        self._decided()
        proto = self._http_factory()
        self._transport.set_protocol(proto)
        proto.connection_made(self._transport)
        proto.data_received(buf)

    def connection_lost(self, exc: Exception | None) -> None:
        self._decided()
        self._transport = None
