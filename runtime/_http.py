"""Just enough HTTP/1.1 over asyncio streams for the control channel, without aiohttp.

The admin API (a few requests a minute from the control plane) and the control-plane client
(register, heartbeat, renew, deregister) move small JSON bodies; importing aiohttp for them costs a
fast-path data plane ~11 MB of idle RSS. ``serve_admin`` answers HTTP/1.1 with keep-alive and
Content-Length or chunked request bodies; ``post`` sends one request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["AdminRequest", "AdminResponse", "BodyTooLarge", "post", "serve_admin"]

MAX_HEAD = 64 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
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

    async def drain(self) -> bool:
        """Read and drop a body the handler did not read; False when that was not possible."""
        if self._body_read:
            return self._drained
        try:
            await self.read(16 * 1024 * 1024)
        except BodyTooLarge:
            return False
        return True


class _ChunkIter:
    def __init__(self, request: AdminRequest) -> None:
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


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest
        headers[name.lower()] = value.strip()
    if "content-length" in headers and "transfer-encoding" in headers:
        raise _BadRequest
    return parts[0], parts[1], parts[2], headers


def _response(resp: AdminResponse, head_only: bool, close: bool) -> bytes:
    reason = _REASONS.get(resp.status, "Unknown")
    head = (
        f"HTTP/1.1 {resp.status} {reason}\r\nContent-Type: {resp.content_type}\r\n"
        f"Content-Length: {len(resp.body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    ).encode("latin-1")
    return head if head_only else head + resp.body


async def serve_admin(
    sock: socket.socket, handler: Callable[[AdminRequest], Awaitable[AdminResponse]]
) -> asyncio.Server:
    """An HTTP/1.1 server on the bound socket ``sock``; each request goes to ``handler``."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    writer.write(_response(AdminResponse(431, b"{}"), False, True))
                    return
                try:
                    method, target, version, headers = _parse_head(head[:-4])
                    request = AdminRequest(method, target.split("?", 1)[0], headers, reader)
                    resp = await handler(request)
                    complete = await request.drain()
                except (_BadRequest, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    writer.write(_response(AdminResponse(400, b'{"error": "bad request"}'), False, True))
                    return
                except (ConnectionError, OSError):
                    raise
                except Exception as e:  # a bug in a handler: answer 500 rather than hang up
                    print(f"meshc: admin API: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    writer.write(_response(AdminResponse(500, b'{"error": "internal error"}'), False, True))
                    return
                conn = headers.get("connection", "").lower()
                close = (
                    resp.close
                    or not complete
                    or conn == "close"
                    or (version == "HTTP/1.0" and conn != "keep-alive")
                )
                writer.write(_response(resp, method == "HEAD", close))
                await writer.drain()
                if close:
                    return
        except (ConnectionError, OSError):
            return
        except asyncio.CancelledError:
            # The loop is closing (after the drain): end quietly. A cancelled connection task
            # makes asyncio's start_server callback print a traceback on Python 3.11.
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    return await asyncio.start_server(connection, sock=sock, limit=MAX_HEAD)


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
            request = AdminRequest("POST", path, resp_headers, reader)
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
