"""Sans-io HTTP/1.1 framing for the fast data path, over httptools (llhttp).

``RequestReader`` and ``ResponseReader`` turn bytes into message heads, body pieces and ends and
hand them to a sink; they never touch a socket. llhttp runs in its strict mode, which already
refuses request smuggling (``Content-Length`` with ``Transfer-Encoding``, duplicate or malformed
lengths, a request ``Transfer-Encoding`` that does not end in ``chunked``, obs-fold, bare LF);
the readers add the size limits llhttp lacks (request line -> 414, header section -> 431) and
sort headers as they arrive: hop-by-hop and framing headers are taken out of the forwarded list
and kept as fields, so building the next hop's head is a join over what is left.

The builders (``status_line``, ``reply``, ``chunk_size``) produce bytes; a body is never copied
to frame it: a chunk is written as (size line, data, CRLF) with ``writelines``.
"""

from __future__ import annotations

import http
from collections.abc import Iterable, Sequence
from typing import Any, Protocol
from urllib.parse import unquote

import httptools

__all__ = [
    "LAST_CHUNK",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_URL",
    "H1Error",
    "Request",
    "RequestReader",
    "RequestSink",
    "Response",
    "ResponseReader",
    "ResponseSink",
    "chunk_size",
    "connection_tokens",
    "reply",
    "status_line",
]

MAX_URL = 8 * 1024
"""Longest request target (nginx's ``large_client_header_buffers`` line size); longer -> 414."""
MAX_HEADER_BYTES = 32 * 1024
"""Largest header section (names + values); larger -> 431."""
MAX_HEADERS = 128
"""Most header fields in one message; more -> 431."""
_MAX_HEAD_FED = MAX_URL + MAX_HEADER_BYTES + 16 * 1024
"""Bytes fed while a head is still incomplete: bounds what llhttp itself buffers."""

LAST_CHUNK = b"0\r\n\r\n"
CRLF = b"\r\n"


def _feed(parser: Any, data: bytes, status: int, what: str) -> int:
    """``feed_data`` with httptools' exceptions turned into ``H1Error(status)``; returns the
    offset after an Upgrade / CONNECT / 101 head, else -1. A callback's own ``H1Error`` (size
    limits, smuggling checks) passes through unchanged."""
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade as e:
        return int(e.args[0])
    except httptools.HttpParserCallbackError as e:
        cause = e.__context__
        if cause is not None:
            raise cause from None
        raise H1Error(status, str(e)) from None
    except httptools.HttpParserError as e:
        raise H1Error(status, f"malformed {what}: {e}") from None
    return -1


class H1Error(Exception):
    """A message that cannot be accepted: answer ``status`` (400, 414, 431, 502) and close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


# How a request header is handled: kept in the forwarded list (absent from the table), dropped
# (hop-by-hop) or taken out into a field.
_KEEP = -1
_DROP, _HOST, _LENGTH, _TE, _CONNECTION, _XFF, _XFP, _SOURCE, _EXPECT, _UPGRADE = range(10)

_REQUEST_HEADERS: dict[bytes, int] = {
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"transfer-encoding": _TE,
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"proxy-authorization": _DROP,
    b"proxy-authenticate": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"trailers": _DROP,
    b"upgrade": _UPGRADE,
    b"expect": _EXPECT,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFP,
    b"x-meshc-source-service": _SOURCE,
}

_RESPONSE_HEADERS: dict[bytes, int] = {
    b"content-length": _LENGTH,
    b"transfer-encoding": _TE,
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"proxy-authenticate": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"trailers": _DROP,
    b"upgrade": _UPGRADE,
}


def _exact(table: dict[bytes, int], kept: tuple[bytes, ...]) -> dict[bytes, int]:
    """The table under its usual spellings, plus common end-to-end names: no ``lower()`` for them."""
    out: dict[bytes, int] = {}
    for name in (*table, *kept):
        kind = table.get(name, _KEEP)
        for spelling in (name, b"-".join(p.capitalize() for p in name.split(b"-"))):
            out[spelling] = kind
    return out


_REQUEST_EXACT = _exact(
    _REQUEST_HEADERS,
    (b"user-agent", b"accept", b"accept-encoding", b"accept-language", b"content-type", b"cookie",
     b"authorization", b"referer", b"origin", b"cache-control", b"if-none-match", b"if-modified-since"),
)  # fmt: skip
_RESPONSE_EXACT = _exact(
    _RESPONSE_HEADERS,
    (b"server", b"date", b"content-type", b"cache-control", b"etag", b"last-modified", b"vary",
     b"set-cookie", b"expires", b"location", b"content-encoding", b"accept-ranges", b"age"),
)  # fmt: skip
_REQUEST_EXACT[b"ETag"] = _RESPONSE_EXACT[b"ETag"] = _KEEP

_PLAIN_CONNECTION = frozenset({b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade"})

_METHODS: dict[bytes, str] = {}


def connection_tokens(value: bytes) -> list[bytes]:
    """Lower-case tokens of a ``Connection`` header other than keep-alive, close and upgrade."""
    out = []
    for token in value.split(b","):
        t = token.strip().lower()
        if t and t not in (b"keep-alive", b"close", b"upgrade"):
            out.append(t)
    return out


class Request:
    """One request head as read from a client, plus the state of its body."""

    __slots__ = (
        "body",
        "body_bytes",
        "chunked",
        "complete",
        "conn_tokens",
        "expect_continue",
        "headers",
        "host",
        "http10",
        "keep_alive",
        "length",
        "method",
        "nbytes",
        "saved",
        "source",
        "upgrade",
        "url",
        "xff",
        "xfp",
    )

    def __init__(self) -> None:
        self.method = ""
        self.url = b""
        self.http10 = False
        self.keep_alive = True
        self.headers: list[tuple[bytes, bytes]] = []
        self.host: bytes | None = None
        self.length: int | None = None
        self.chunked = False
        self.conn_tokens: list[bytes] | None = None
        self.xff: bytes | None = None
        self.xfp: bytes | None = None
        self.source: bytes | None = None
        self.expect_continue = False
        self.upgrade: bytes | None = None
        self.nbytes = 0
        self.body_bytes = 0
        """Body bytes read so far (for the request-size metrics)."""
        self.complete = False
        self.body: list[bytes] = []
        """Body pieces read but not yet sent on (while no upstream is attached)."""
        self.saved: list[bytes] | None = None
        """Every body piece so far, kept when the request may be retried."""

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)

    def authority(self) -> str:
        return self.host.decode("latin-1") if self.host is not None else ""

    def path(self) -> str:
        """The decoded path (no query), as route matches see it."""
        return path_of(self.url)

    def query_string(self) -> str:
        return self.url.partition(b"?")[2].decode("latin-1")

    def header(self, name: bytes) -> str | None:
        """The first value of the header ``name`` (lower case), without building a map."""
        for n, v in self.headers:
            if n.lower() == name:
                return v.decode("latin-1")
        return None

    def get(self, name: str) -> str | None:
        """``header`` by a ``str`` name (a ``tracing.Getter``)."""
        return self.header(name.encode("latin-1"))

    def header_map(self) -> dict[str, str]:
        """Lower-case name -> value (the first of repeated fields), for route matching."""
        out: dict[str, str] = {}
        if self.host is not None:
            out["host"] = self.host.decode("latin-1")
        if self.source is not None:
            out["x-meshc-source-service"] = self.source.decode("latin-1")
        for name, value in self.headers:
            out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        return out


class RequestSink(Protocol):
    def request_head(self, req: Request) -> None: ...
    def request_body(self, req: Request, data: bytes) -> None: ...
    def request_end(self, req: Request) -> None: ...


class RequestReader:
    """Reads requests from one client connection (pipelined ones included) into a sink."""

    __slots__ = ("_fed", "_in_head", "_parser", "_req", "_sink")

    def __init__(self, sink: RequestSink) -> None:
        self._sink = sink
        self._parser = httptools.HttpRequestParser(self)
        self._req = Request()
        self._in_head = False
        self._fed = 0

    def feed(self, data: bytes) -> int:
        """Parse ``data``; -1, or the offset of the bytes after an Upgrade / CONNECT head.

        Raises ``H1Error`` for a message that cannot be accepted; the connection must then be
        answered (when nothing was answered for that request yet) and closed.
        """
        offset = _feed(self._parser, data, 400, "request")
        if offset >= 0:
            return offset
        if self._in_head:
            self._fed += len(data)
            if self._fed > _MAX_HEAD_FED:
                raise H1Error(431, "request header fields too large")
        return -1

    @property
    def in_head(self) -> bool:
        """A request head has begun and is not complete yet."""
        return self._in_head

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._req = Request()
        self._in_head = True
        self._fed = 0

    def on_url(self, url: bytes) -> None:
        req = self._req
        req.url = req.url + url if req.url else url
        if len(req.url) > MAX_URL:
            raise H1Error(414, "request URI too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._req
        n = req.nbytes = req.nbytes + len(name) + len(value) + 4
        if n > MAX_HEADER_BYTES or len(req.headers) >= MAX_HEADERS:
            raise H1Error(431, "request header fields too large")
        kind = _REQUEST_EXACT.get(name)
        if kind is None:
            kind = _REQUEST_HEADERS.get(name.lower(), _KEEP)
        if kind == _KEEP:
            req.headers.append((name, value))
        elif kind == _HOST:
            if req.host is not None:
                raise H1Error(400, "more than one Host header")
            req.host = value
        elif kind == _LENGTH:
            req.length = int(value)  # llhttp has checked the digits and refused duplicates
        elif kind == _TE:
            req.chunked = True  # llhttp refuses a request whose coding does not end in chunked
        elif kind == _CONNECTION:
            if value not in _PLAIN_CONNECTION:
                tokens = connection_tokens(value)
                if tokens:
                    req.conn_tokens = (req.conn_tokens or []) + tokens
        elif kind == _XFF:
            req.xff = value if req.xff is None else req.xff + b", " + value
        elif kind == _XFP:
            req.xfp = value
        elif kind == _SOURCE:
            req.source = value
        elif kind == _EXPECT:
            req.expect_continue = value.lower() == b"100-continue"
        elif kind == _UPGRADE:
            req.upgrade = value

    def on_headers_complete(self) -> None:
        req = self._req
        parser = self._parser
        self._in_head = False
        raw = parser.get_method()
        method = _METHODS.get(raw)
        if method is None:
            method = raw.decode("ascii")
            if len(_METHODS) < 64:
                _METHODS[raw] = method
        req.method = method
        req.http10 = parser.get_http_version() == "1.0"
        req.keep_alive = parser.should_keep_alive()
        if req.host is None and not req.http10:
            raise H1Error(400, "HTTP/1.1 request without Host")
        if req.upgrade is not None and not parser.should_upgrade():
            req.upgrade = None
        if req.conn_tokens:
            drop = set(req.conn_tokens)
            req.headers = [(n, v) for n, v in req.headers if n.lower() not in drop]
        self._sink.request_head(req)

    def on_body(self, data: bytes) -> None:
        req = self._req
        req.body_bytes += len(data)
        self._sink.request_body(req, data)

    def on_message_complete(self) -> None:
        req = self._req
        req.complete = True
        self._sink.request_end(req)


class Response:
    """One response head as read from an upstream."""

    __slots__ = ("chunked", "headers", "keep_alive", "length", "reason", "status", "upgrade")

    def __init__(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: bytes | None = None
        self.chunked = False
        self.keep_alive = True
        self.upgrade: bytes | None = None


class ResponseSink(Protocol):
    def response_head(self, resp: Response) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_end(self, resp: Response) -> None: ...


class ResponseReader:
    """Reads the responses of one upstream connection into a sink."""

    __slots__ = ("_conn_tokens", "_fed", "_in_head", "_parser", "_resp", "_sink")

    def __init__(self, sink: ResponseSink) -> None:
        self._sink = sink
        self._parser = httptools.HttpResponseParser(self)
        self._resp = Response()
        self._in_head = False
        self._fed = 0
        self._conn_tokens: list[bytes] | None = None

    def feed(self, data: bytes) -> int:
        """Parse ``data``; -1, or the offset of the bytes after a 101 head. Raises ``H1Error``."""
        offset = _feed(self._parser, data, 502, "response")
        if offset >= 0:
            return offset
        if self._in_head:
            self._fed += len(data)
            if self._fed > _MAX_HEAD_FED:
                raise H1Error(502, "upstream response head too large")
        return -1

    def on_message_begin(self) -> None:
        self._resp = Response()
        self._in_head = True
        self._fed = 0
        self._conn_tokens = None

    def on_status(self, reason: bytes) -> None:
        resp = self._resp
        resp.reason = resp.reason + reason if resp.reason else reason

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self._resp  # (its head is bounded by the bytes ``feed`` lets in)
        kind = _RESPONSE_EXACT.get(name)
        if kind is None:
            kind = _RESPONSE_HEADERS.get(name.lower(), _KEEP)
        if kind == _KEEP:
            resp.headers.append((name, value))
        elif kind == _LENGTH:
            resp.length = value
        elif kind == _TE:
            resp.chunked = value.rstrip().lower().endswith(b"chunked")
        elif kind == _CONNECTION:
            if value not in _PLAIN_CONNECTION:
                tokens = connection_tokens(value)
                if tokens:
                    self._conn_tokens = (self._conn_tokens or []) + tokens
        elif kind == _UPGRADE:
            resp.upgrade = value

    def on_headers_complete(self) -> None:
        resp = self._resp
        self._in_head = False
        parser = self._parser
        resp.status = parser.get_status_code()
        if resp.status < 100:  # llhttp takes any three digits; RFC 9110 §15: under 100 is invalid
            raise H1Error(502, f"upstream status code {resp.status:03d}")
        resp.keep_alive = parser.should_keep_alive()
        if resp.chunked:
            resp.length = None
        if self._conn_tokens:
            drop = set(self._conn_tokens)
            resp.headers = [(n, v) for n, v in resp.headers if n.lower() not in drop]
        self._sink.response_head(resp)

    def on_body(self, data: bytes) -> None:
        self._sink.response_body(data)

    def on_message_complete(self) -> None:
        self._sink.response_end(self._resp)


# -- builders -------------------------------------------------------------------------------

_STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in http.HTTPStatus
}


def status_line(status: int, reason: bytes | None = None) -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n`` (the standard phrase when ``reason`` is None)."""
    if reason is None:
        line = _STATUS_LINES.get(status)
        return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def chunk_size(n: int) -> bytes:
    """The size line that precedes an ``n``-byte chunk."""
    return b"%x\r\n" % n


def reply(
    status: int,
    reason: str,
    *,
    close: bool = False,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    http10_keep_alive: bool = False,
) -> bytes:
    """A response made by the data plane itself: ``x-meshc-reason`` names why."""
    data = reason.encode() if body is None else body
    parts = [
        status_line(status),
        b"x-meshc-reason: ",
        reason.encode("latin-1", "replace"),
        b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n" % len(data),
    ]
    for name, value in headers:
        parts += (name.encode("latin-1"), b": ", value.encode("latin-1"), CRLF)
    if close:
        parts.append(b"connection: close\r\n")
    elif http10_keep_alive:
        parts.append(b"connection: keep-alive\r\n")
    parts += (CRLF, data)
    return b"".join(parts)


def join_headers(parts: list[bytes], headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Append ``name: value\\r\\n`` lines to ``parts``."""
    for name, value in headers:
        parts += (name, b": ", value, CRLF)


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
