"""Which protocol a listener's connection speaks, and the HTTP/2 layer built on its first use.

Every HTTP listener serves HTTP/1.1 and HTTP/2 on one port, so each connection starts in a
``PrefaceSniffer`` that reads ALPN or the first bytes and hands over. Most sidecars never see an
HTTP/2 connection: importing ``h2`` and building ``runtime.h2proxy.H2Plane`` costs about 4 MB of
resident memory, so ``LazyH2`` defers both to the first connection (or gRPC health probe) that
needs them. Nothing here imports ``h2``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from runtime.decide import Fetcher
    from runtime.engine import Engine
    from runtime.h2proxy import H2Plane
    from runtime.metrics import Metrics
    from runtime.security import Credentials

__all__ = ["PREFACE", "LazyH2", "PrefaceSniffer", "preface_state"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""The client connection preface (RFC 9113 §3.4): how a listener tells h2c from HTTP/1.1."""


def preface_state(buf: bytes) -> bool | None:
    """True: the bytes start with the HTTP/2 preface; False: they cannot; None: too few to tell."""
    if buf[: len(PREFACE)] == PREFACE:
        return True
    if PREFACE.startswith(buf):
        return None
    return False


_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\nx-meshc-reason: no complete request head in time\r\n"
    b"content-length: 0\r\nconnection: close\r\n\r\n"
)


class PrefaceSniffer(asyncio.Protocol):
    """A listener's first protocol: HTTP/2 (ALPN ``h2``, or the h2c preface) or HTTP/1.1."""

    def __init__(
        self,
        h1: Callable[[], asyncio.BaseProtocol],
        h2: Callable[[], asyncio.Protocol],
        timeout_s: float = 10.0,
        on_timeout: Callable[[], None] | None = None,
    ) -> None:
        self._on_timeout = on_timeout
        self._h1 = h1
        self._h2 = h2
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._timeout_s = timeout_s
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = tr = cast(asyncio.Transport, transport)
        sslobj = tr.get_extra_info("ssl_object")
        if sslobj is not None:
            alpn = sslobj.selected_alpn_protocol()
            if alpn is not None:
                self._hand_over(self._h2 if alpn == "h2" else self._h1, b"")
                return
        # Until the first bytes tell (a "P" may be POST or the preface), the header timeout runs.
        self._timer = asyncio.get_running_loop().call_later(self._timeout_s, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self._transport is not None:
            if self._on_timeout is not None:
                self._on_timeout()
            self._transport.write(_TIMED_OUT)
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data
        state = preface_state(buf)
        if state is None:
            self._buf = buf
            return
        self._buf = b""
        self._hand_over(self._h2 if state else self._h1, buf)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _hand_over(self, factory: Callable[[], asyncio.BaseProtocol], buf: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tr = self._transport
        if tr is None:
            return
        proto = factory()
        tr.set_protocol(proto)
        proto.connection_made(tr)
        if buf:
            cast(asyncio.Protocol, proto).data_received(buf)


class LazyH2:
    """The data plane's HTTP/2 layer, built (and ``h2`` imported) when a connection first needs it."""

    def __init__(self, engine: Engine, metrics: Metrics, creds: Credentials, **options: Any) -> None:
        self._args = (engine, metrics, creds)
        self._options = options
        self.header_timeout_s: float = options.get("header_timeout_s", 10.0)
        self._metrics = metrics
        self._plane: H2Plane | None = None
        self._fetch: Fetcher | None = None
        self._draining = False

    @property
    def built(self) -> H2Plane | None:
        return self._plane

    @property
    def plane(self) -> H2Plane:
        if self._plane is None:
            from runtime.h2proxy import H2Plane

            self._plane = plane = H2Plane(*self._args, **self._options)
            if self._fetch is not None:
                plane.fetch = self._fetch
            # A connection sniffed before the listeners closed may arrive while draining.
            plane.draining = self._draining
        return self._plane

    @property
    def fetch(self) -> Fetcher | None:
        return self._fetch

    @fetch.setter
    def fetch(self, fetch: Fetcher) -> None:
        self._fetch = fetch
        if self._plane is not None:
            self._plane.fetch = fetch

    def sniffer(
        self, h1: Callable[[], asyncio.BaseProtocol], kind: str, port: int = 0
    ) -> Callable[[], asyncio.Protocol]:
        """A listener's protocol factory that serves HTTP/2 here and HTTP/1.1 with ``h1``."""

        def h2() -> asyncio.Protocol:
            return self.plane.factory(kind, port)()

        refusals = self._metrics.listener_refusals.labels(kind, "header_timeout")
        timeout = self.header_timeout_s
        return lambda: PrefaceSniffer(h1, h2, timeout, refusals.inc)

    def client_ctx(self) -> ssl.SSLContext | None:
        """The mesh client context with ALPN ``h2``, ``http/1.1`` (for gRPC health probes)."""
        return self.plane.client_ctx()

    async def drain(self, deadline: float) -> None:
        self._draining = True
        if self._plane is not None:
            await self._plane.drain(deadline)

    async def close(self) -> None:
        if self._plane is not None:
            await self._plane.close()
