"""Upstream connections of the fast path and the keep-alive pool they return to.

``Upstream`` is one connection to an endpoint, lent to one client exchange at a time; it parses
responses with ``h1.ResponseReader`` and feeds the exchange it is lent to (``UpstreamClient``).
``Pool`` keeps idle ones per address, most recently used first.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

from runtime import h1

__all__ = ["Pool", "Upstream", "UpstreamClient", "UpstreamOwner"]

_MAX_IDLE_PER_HOST = 256
P_UPSTREAM = 1
"""The pause bit a client connection's reading gets while an upstream's write buffer is full."""


class UpstreamClient(Protocol):
    """The client exchange an upstream connection is lent to."""

    @property
    def up(self) -> Upstream | None: ...
    @property
    def transport(self) -> asyncio.Transport | None: ...
    @property
    def out(self) -> list[bytes]: ...

    def flush(self) -> None: ...
    def pause(self, bit: int) -> None: ...
    def resume(self, bit: int) -> None: ...
    def response_head(self, up: Upstream, resp: h1.Response) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_end(self, up: Upstream, resp: h1.Response) -> None: ...
    def upstream_lost(self, up: Upstream, exc: Exception | None) -> None: ...
    def upstream_failed(self, up: Upstream, err: h1.H1Error) -> None: ...
    def upstream_upgraded(self, up: Upstream, rest: bytes) -> None: ...


class UpstreamOwner(Protocol):
    """Where an upstream connection goes back to when an exchange is done with it."""

    @property
    def pool(self) -> Pool: ...

    def release(self, up: Upstream, reusable: bool) -> None: ...


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

    def __init__(self, plane: UpstreamOwner, key: str) -> None:
        self.plane = plane
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.reader = h1.ResponseReader(self)
        self.client: UpstreamClient | None = None
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
            client.pause(P_UPSTREAM)

    def resume_writing(self) -> None:
        client = self.client
        if client is not None:
            client.resume(P_UPSTREAM)

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
