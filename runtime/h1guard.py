"""``ListenerLimits`` and the strict parser in front of an HTTP server that is not ours (aiohttp).

The fast data listeners and the admin API parse with ``runtime.h1`` and check the limits
themselves. aiohttp's ``web.Server`` has neither a head or body read timeout nor a connection
limit, and its parser lets through framing that ``runtime.h1`` refuses (duplicate
Content-Length, ``Transfer-Encoding: chunked, identity``, NUL bytes). ``GuardedListener`` wraps
such a server's protocol factory: every byte is first read by ``runtime.h1`` (a parse only, the
bytes go on unchanged), so a request the data listeners would refuse is answered the same way
(400/414/431) before the server sees it; a head that stops arriving, or a body that stops while
the server is reading it, is answered 408; connections beyond the limit are answered 503. Used by
the aiohttp data plane and the control plane's API, so that every listener keeps one set of rules.

An idle keep-alive connection is the wrapped server's to close (``keepalive_timeout``): the guard
cannot tell when an answer has been sent, only when the next request begins.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from runtime import h1
from runtime.limits import ListenerLimits

__all__ = ["GuardedListener", "linger_close"]

_LINGER_S = 2.0
_FULL = h1.reply(503, "the listener has reached --max-connections", close=True)


def linger_close(tr: asyncio.WriteTransport) -> bool:
    """Close after an error answer without losing it (nginx's lingering close).

    The client may still be sending the refused request; closing with unread bytes makes the
    kernel send a reset, which can destroy the answer before the client reads it. So: send FIN
    after the answer and close when the client closes or after a short grace period. False when
    the transport cannot half-close (TLS) and was closed at once.
    """
    if not tr.can_write_eof():
        tr.close()
        return False
    tr.write_eof()
    asyncio.get_running_loop().call_later(_LINGER_S, tr.close)
    return True


class GuardedListener:
    """One listener's protocol factory with its limits and its count of open connections.

    ``refused(reason)`` is called for every refusal (``header_timeout``, ``body_timeout``,
    ``max_connections``) so that the owner counts it in its own metrics.
    """

    def __init__(
        self,
        factory: Callable[[], Any],
        limits: ListenerLimits,
        refused: Callable[[str], None] = lambda reason: None,
        header_timeout: Callable[[], float] | None = None,
    ) -> None:
        self.factory = factory
        self.limits = limits
        self.refused = refused
        self.open = 0
        self.header_timeout = header_timeout or (lambda: limits.header_timeout_s)
        """The time a request head may take, asked at each head (an inbound listener's follows
        the bundle's requestHeadersTimeout, ``decide.inbound_header_timeout``)."""

    def __call__(self) -> asyncio.Protocol:
        return _Guard(self)


class _Watched:
    """The transport as the wrapped server sees it: notes whether it has written an answer, so
    that the guard never writes a second one after it."""

    __slots__ = ("_tr", "wrote")

    def __init__(self, tr: Any) -> None:
        self._tr = tr
        self.wrote = False

    def write(self, data: bytes) -> None:
        self.wrote = True
        self._tr.write(data)

    def writelines(self, lines: Any) -> None:
        self.wrote = True
        self._tr.writelines(lines)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tr, name)


class _Guard(asyncio.Protocol):
    """One connection: reads every byte with ``runtime.h1`` before the wrapped protocol does."""

    def __init__(self, listener: GuardedListener) -> None:
        self._listener = listener
        self._reader = h1.RequestReader(self)
        self._inner: Any = None
        self._tr: asyncio.Transport | None = None
        self._watched: _Watched | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""
        self._body_last = 0.0
        self._passthrough = False  # after an Upgrade / CONNECT head: bytes are not HTTP any more
        self._done = False  # answered by the guard (or refused): nothing more goes on

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr: Any = transport  # uvloop's transports are not asyncio's classes
        self._tr = tr
        lst = self._listener
        if lst.open >= lst.limits.max_connections:
            self._done = True
            lst.refused("max_connections")
            tr.write(_FULL)
            linger_close(tr)
            return
        lst.open += 1
        self._inner = lst.factory()
        self._watched = _Watched(tr)
        self._inner.connection_made(self._watched)
        self._arm("header", lst.header_timeout())  # a client that sends nothing at all

    def data_received(self, data: bytes) -> None:
        if self._done:
            return  # lingering after an answer: the rest of a refused request is dropped
        if not self._passthrough:
            try:
                if self._reader.feed(data) >= 0:
                    self._passthrough = True
                    self._cancel()
            except h1.H1Error as e:
                self._answer(e.status, e.reason)
                return
            if not self._passthrough and self._reader.in_head and self._timer_kind != "header":
                self._arm("header", self._listener.header_timeout())  # a later head began
                if self._watched is not None:
                    self._watched.wrote = False
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is None:
            return None
        return bool(self._inner.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        if self._inner is not None:
            self._listener.open -= 1
            inner, self._inner = self._inner, None
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- runtime.h1 RequestSink ---------------------------------------------------------------

    def request_head(self, req: h1.Request) -> None:
        self._cancel()
        if req.has_body:
            self._body_last = asyncio.get_running_loop().time()
            self._arm("body", self._listener.limits.body_timeout_s)

    def request_body(self, req: h1.Request, data: bytes) -> None:
        self._body_last = asyncio.get_running_loop().time()

    def request_end(self, req: h1.Request) -> None:
        self._cancel()

    # -- timers -------------------------------------------------------------------------------

    def _arm(self, kind: str, delay: float) -> None:
        self._cancel()
        self._timer_kind = kind
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_kind = ""

    def _fire(self) -> None:
        kind, self._timer, self._timer_kind = self._timer_kind, None, ""
        tr = self._tr
        if tr is None or tr.is_closing() or self._done:
            return
        limit = self._listener.limits.body_timeout_s
        if kind == "body":
            now = asyncio.get_running_loop().time()
            if not tr.is_reading():  # the server is not reading (back-pressure): not the client's fault
                self._body_last = now
                self._arm("body", limit / 4)
                return
            left = self._body_last + limit - now
            if left > 0:
                self._arm("body", left)
                return
        self._listener.refused(f"{kind}_timeout")
        what = "no complete request head in time" if kind == "header" else "the request body stopped arriving"
        self._answer(408, what)

    def _answer(self, status: int, reason: str) -> None:
        """Answer for the guard and close; the wrapped server sees nothing more of this request.
        Where the server has begun its own answer (one that did not wait for the body), the
        connection is only closed: a second answer would be read as the next response."""
        self._done = True
        self._cancel()
        tr = self._tr
        if tr is None or tr.is_closing():
            return
        if self._watched is not None and self._watched.wrote:
            tr.close()
            return
        tr.write(h1.reply(status, reason, close=True))
        linger_close(tr)
