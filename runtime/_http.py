"""Just enough HTTP/1.1 for the control channel, without aiohttp.

The admin API (a few requests a minute from the control plane) and the control-plane client
(register, heartbeat, renew, deregister) move small JSON bodies; importing aiohttp for them costs a
fast-path data plane ~11 MB of idle RSS. ``serve_admin`` reads requests with the data listeners'
strict parser (``runtime.h1``, llhttp: duplicate or malformed Content-Length, Content-Length with
Transfer-Encoding, a Transfer-Encoding not ending in chunked, NUL and other control bytes, obs-fold
and bare LF are all 400) under ``ListenerLimits``: a complete head within ``header_timeout_s`` of
the connection (or of the previous answer), the body within ``body_timeout_s`` of its head (408
and close otherwise), and at most ``max_connections`` at once (503 and close beyond). ``post``
sends one request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from runtime.limits import ListenerLimits

__all__ = ["AdminRequest", "AdminResponse", "BodyTooLarge", "ListenerLimits", "post", "serve_admin"]

MAX_HEAD = 64 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class BodyTooLarge(Exception):
    """The request body is over the limit the handler asked for."""


class _BadRequest(Exception):
    pass


@dataclass
class AdminResponse:
    status: int
    body: bytes
    content_type: str = "application/json"
    close: bool = False


@dataclass
class AdminRequest:
    """One request, its body read whole (``None``: over the listener's body limit)."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes | None = b""

    async def read(self, limit: int) -> bytes:
        """The body; ``BodyTooLarge`` when it is over ``limit``."""
        if self.body is None or len(self.body) > limit:
            raise BodyTooLarge
        return self.body


@dataclass
class _StreamBody:
    """A response body read from a stream (the client side, ``post``)."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    _reader: asyncio.StreamReader
    _body_read: bool = False
    _drained: bool = False

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None else None

    async def read(self, limit: int) -> bytes:
        """The whole body; ``BodyTooLarge`` when it is over ``limit``. An oversize body is read
        and dropped (up to 4x the limit) so the client sees the answer instead of a reset; beyond
        that the connection is closed after the answer."""
        self._body_read = True
        chunks: list[bytes] = []
        size = 0
        over = False
        async for chunk in _ChunkIter(self):
            size += len(chunk)
            if size > limit:
                over = True
                chunks.clear()
                if size > 4 * limit:
                    raise BodyTooLarge
            elif not over:
                chunks.append(chunk)
        self._drained = True
        if over:
            raise BodyTooLarge
        return b"".join(chunks)


class _ChunkIter:
    def __init__(self, request: _StreamBody) -> None:
        self._r = request._reader
        self._chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            raise _BadRequest
        self._left = 0 if self._chunked else int(length or 0)
        self._done = False

    def __aiter__(self) -> _ChunkIter:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        if not self._chunked:
            if self._left <= 0:
                self._done = True
                raise StopAsyncIteration
            data = await self._r.read(min(self._left, 256 * 1024))
            if not data:
                raise _BadRequest
            self._left -= len(data)
            return data
        if self._left <= 0:
            line = await self._r.readuntil(b"\r\n")
            try:
                self._left = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as e:
                raise _BadRequest from e
            if self._left == 0:
                while (await self._r.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                self._done = True
                raise StopAsyncIteration
        data = await self._r.read(min(self._left, 256 * 1024))
        if not data:
            raise _BadRequest
        self._left -= len(data)
        if self._left == 0 and await self._r.readexactly(2) != b"\r\n":
            raise _BadRequest
        return data


def _response(resp: AdminResponse, head_only: bool, close: bool) -> bytes:
    reason = _REASONS.get(resp.status, "Unknown")
    head = (
        f"HTTP/1.1 {resp.status} {reason}\r\nContent-Type: {resp.content_type}\r\n"
        f"Content-Length: {len(resp.body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    ).encode("latin-1")
    return head if head_only else head + resp.body


_MAX_BODY = 4 * 16 * 1024 * 1024
"""Bytes of body read (and dropped past ``max_body``) before an oversize request is cut off."""


class _AdminConnection(asyncio.Protocol):
    """One admin connection: bytes -> ``h1.RequestReader`` -> requests handled one at a time."""

    def __init__(
        self,
        handler: Callable[[AdminRequest], Awaitable[AdminResponse]],
        limits: ListenerLimits,
        live: set[_AdminConnection],
        max_body: int,
    ) -> None:
        from runtime.h1 import RequestReader

        self._handler = handler
        self._limits = limits
        self._live = live
        self._max_body = max_body
        self._reader = RequestReader(self)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._queue: list[tuple[AdminRequest, bool]] = []
        self._task: asyncio.Task[None] | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._closing = False

    # -- transport events --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)  # uvloop's is not a subclass
        if len(self._live) >= self._limits.max_connections:
            self._fail(503, "the admin API has reached --max-connections")
            return
        self._live.add(self)
        self._arm(self._limits.header_timeout_s, "no complete request head in time")

    def connection_lost(self, exc: Exception | None) -> None:
        self._live.discard(self)
        self._disarm()
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        self._queue.clear()
        self._body = []

    def data_received(self, data: bytes) -> None:
        from runtime.h1 import H1Error

        if self._closing:
            return
        try:
            if self._reader.feed(data) >= 0:
                raise H1Error(400, "the admin API does not upgrade connections")
        except H1Error as e:
            self._fail(e.status, e.reason)

    # -- h1 sink ----------------------------------------------------------------------------

    def request_head(self, req: Any) -> None:
        self._body, self._size = [], 0
        self._arm(self._limits.body_timeout_s, "the request body did not arrive in time")

    def request_body(self, req: Any, data: bytes) -> None:
        from runtime.h1 import H1Error

        self._size += len(data)
        if self._size > _MAX_BODY:
            raise H1Error(413, "request body too large")
        if self._size <= self._max_body:
            self._body.append(data)
        else:
            self._body = []

    def request_end(self, req: Any) -> None:
        self._disarm()
        body = b"".join(self._body) if self._size <= self._max_body else None
        self._body = []
        headers = req.header_map()
        request = AdminRequest(req.method, req.url.decode("latin-1").split("?", 1)[0], headers, body)
        self._queue.append((request, req.keep_alive))
        if len(self._queue) > 1 and self._transport is not None:
            self._transport.pause_reading()  # pipelining: one at a time, no unbounded backlog
        if self._task is None:
            self._task = asyncio.ensure_future(self._serve())

    # -- answering ---------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while self._queue and not self._closing:
                request, keep_alive = self._queue.pop(0)
                try:
                    resp = await self._handler(request)
                except Exception as e:  # a bug in a handler: answer 500 rather than hang up
                    print(f"meshc: admin API: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    resp = AdminResponse(500, b'{"error": "internal error"}', close=True)
                close = resp.close or not keep_alive or request.body is None
                if self._transport is None or self._transport.is_closing():
                    return
                self._transport.write(_response(resp, request.method == "HEAD", close))
                if close:
                    self._closing = True
                    self._transport.close()
                    return
                if not self._queue:
                    self._arm(self._limits.header_timeout_s, "idle keep-alive connection")
                    self._transport.resume_reading()
        except asyncio.CancelledError:
            return
        finally:
            self._task = None

    def _fail(self, status: int, reason: str) -> None:
        self._disarm()
        self._closing = True
        if self._transport is not None and not self._transport.is_closing():
            body = json.dumps({"error": reason}).encode()
            self._transport.write(_response(AdminResponse(status, body), False, True))
            self._transport.close()

    def _arm(self, seconds: float, why: str) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(seconds, self._fail, 408, why)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def serve_admin(
    sock: socket.socket,
    handler: Callable[[AdminRequest], Awaitable[AdminResponse]],
    limits: ListenerLimits | None = None,
    max_body: int = 16 * 1024 * 1024,
) -> asyncio.Server:
    """An HTTP/1.1 server on the bound socket ``sock``; each request goes to ``handler``. A body
    over ``max_body`` reaches it as ``body=None`` (answered, then the connection is closed)."""
    limits = limits or ListenerLimits()
    live: set[_AdminConnection] = set()
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _AdminConnection(handler, limits, live, max_body), sock=sock)


async def post(
    url: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    """POST ``body`` to ``url`` + ``path`` on a new connection; (status, body). OSError,
    TimeoutError or ValueError when the server cannot be reached or answers garbage."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"unsupported control plane URL {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    base = parts.path.rstrip("/")
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            parts.hostname,
            port,
            ssl=(ssl_context or ssl.create_default_context()) if tls else None,
            limit=MAX_HEAD,
        )
        try:
            host = parts.netloc.rpartition("@")[2]
            lines = [
                f"POST {base}{path} HTTP/1.1",
                f"Host: {host}",
                f"Content-Length: {len(body)}",
                "Connection: close",
                *(f"{k}: {v}" for k, v in headers.items()),
            ]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                raise OSError("the control plane closed the connection without an answer") from e
            status_line, _, rest = head[:-4].decode("latin-1").partition("\r\n")
            fields = status_line.split(" ", 2)
            if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
                raise ValueError(f"not an HTTP response: {status_line[:100]!r}")
            resp_headers = {}
            for line in rest.split("\r\n"):
                name, _, value = line.partition(":")
                resp_headers[name.strip().lower()] = value.strip()
            request = _StreamBody("POST", path, resp_headers, reader)
            if "content-length" not in resp_headers and "chunked" not in resp_headers.get(
                "transfer-encoding", ""
            ):
                data = await reader.read()  # until the server closes
            else:
                try:
                    data = await request.read(64 * 1024 * 1024)
                except (_BadRequest, BodyTooLarge, asyncio.IncompleteReadError) as e:
                    raise ValueError("malformed response body from the control plane") from e
            return int(fields[1]), data
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
