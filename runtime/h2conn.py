"""HTTP/2 without sockets: what the h2 byte layer (``runtime.h2proxy``) asks before moving bytes.

The ``h2`` library is the connection state machine (frames, HPACK, flow-control windows, stream
states); this module turns its header lists into what ``runtime.decide`` reads (``H2Head``, a
``RequestHead``), rewrites a ``Forward`` into the next hop's header list, turns a ``Reply`` into
frames (for gRPC: HTTP 200 and a ``grpc-status`` in trailers-only form, as Envoy answers gRPC
callers), reads ``grpc-timeout`` and ``grpc-status``, and tells an HTTP/2 connection preface
from HTTP/1.1 on a shared listener. Nothing here touches a socket or a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import unquote

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import DenialOfServiceError, FrameTooLargeError
from h2.settings import SettingCodes

from runtime.decide import Forward, Reply
from runtime.h2sniff import PREFACE, preface_state
from runtime.headerops import ADD, REMOVE, HeaderOp

__all__ = [
    "GRPC_NAMES",
    "MAX_FRAME_SIZE",
    "MAX_HEADER_BLOCK",
    "PREFACE",
    "RESET_BURST",
    "RESET_RATE",
    "GoawayFilter",
    "H2Head",
    "Header",
    "client_connection",
    "goaway_frame",
    "grpc_reply",
    "grpc_status",
    "grpc_status_for_http",
    "grpc_timeout_s",
    "h1_request_head",
    "h2_response_head",
    "next_hop_headers",
    "parse_request",
    "preface_state",
    "reply_headers",
    "reset_budget",
    "response_headers",
    "server_connection",
]

Header = tuple[str, str]

STREAM_WINDOW = 1 << 20
"""Initial per-stream receive window we advertise (bytes are acknowledged only once the other
side of the proxy has taken them, so this bounds what one stream buffers here)."""
CONNECTION_WINDOW = 16 << 20
MAX_STREAMS = 1000

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host", "http2-settings"}
)
"""Connection-specific fields HTTP/2 forbids (RFC 9113 §8.2.2); ``host`` becomes ``:authority``."""

GRPC_NAMES = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    16: "UNAUTHENTICATED",
}

_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def _config(client_side: bool) -> H2Configuration:
    """Received headers are validated (RFC 9113 §8.2); what we send is built here from them, all
    names lower-case, so h2's outbound validation and normalisation (a third of the CPU a
    proxied stream costs) are skipped."""
    return H2Configuration(
        client_side=client_side,
        header_encoding="latin-1",
        validate_inbound_headers=True,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )


def _settings(conn: H2Connection) -> None:
    conn.update_settings(
        {
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            SettingCodes.ENABLE_PUSH: 0,
        }
    )
    conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)


def server_connection() -> H2Connection:
    """The h2 state machine of a client connection to one of our listeners (preface sent)."""
    conn = H2Connection(_config(False))
    conn.initiate_connection()
    _settings(conn)
    return conn


def client_connection() -> H2Connection:
    """The h2 state machine of a connection to an upstream (preface sent)."""
    conn = H2Connection(_config(True))
    conn.initiate_connection()
    _settings(conn)
    return conn


_GOAWAY = 0x7
_HEADERS, _PUSH_PROMISE, _CONTINUATION = 0x1, 0x5, 0x9
_END_HEADERS = 0x4

MAX_FRAME_SIZE = 16384
"""The SETTINGS_MAX_FRAME_SIZE both sides of the proxy advertise (h2's default, never raised):
a longer frame is a connection error (RFC 9113 §4.2)."""
MAX_HEADER_BLOCK = 80 * 1024
"""The most header block bytes (HEADERS or PUSH_PROMISE and its CONTINUATIONs) held for one
field section: a little over what h2's 64 KiB decoded header list limit can need."""


def goaway_frame(last_stream_id: int, error_code: int = 0) -> bytes:
    """A GOAWAY frame, written beside h2 (see ``GoawayFilter``)."""
    payload = (last_stream_id & 0x7FFFFFFF).to_bytes(4, "big") + error_code.to_bytes(4, "big")
    return len(payload).to_bytes(3, "big") + bytes((_GOAWAY, 0)) + b"\0\0\0\0" + payload


RESET_BURST = 1000
RESET_RATE = 33.0
"""nghttp2's defaults for ``nghttp2_option_set_stream_reset_rate_limit`` (1.57.0, the fix for
CVE-2023-44487): a client may reset 1,000 streams at once, then 33 a second."""


def reset_budget(tokens: float, last: float, now: float) -> tuple[float, bool]:
    """One RST_STREAM from a client against its connection's token bucket (sans-io, the clock
    passed in): (tokens left, whether it was within the budget). A client that resets streams
    faster than the bucket refills (HTTP/2 rapid reset: each reset stream has cost a decision and
    an upstream stream, but frees its concurrency slot at once) is out of budget: the connection
    gets GOAWAY ENHANCE_YOUR_CALM, as nghttp2 does. Start with ``RESET_BURST`` tokens."""
    tokens = min(RESET_BURST, tokens + (now - last) * RESET_RATE)
    if tokens < 1.0:
        return tokens, False
    return tokens - 1.0, True


class GoawayFilter:
    """Takes GOAWAY frames out of the bytes a connection receives, before h2 sees them, and
    bounds what a peer can make this side buffer.

    h2 treats a GOAWAY, sent or received, as the end of the connection: no frame of any stream
    may pass after it. RFC 9113 §6.8 lets the streams a GOAWAY covers run to completion, which
    a proxy's graceful drain needs. So GOAWAY frames are handled here (and sent as raw frames
    with ``goaway_frame``), and h2 keeps its connection open until the streams are done.

    h2 checks a frame's length only once the whole frame has arrived, so a peer that announces a
    16 MiB frame (the 24-bit maximum) and trickles it in would be buffered whole, here and in h2;
    and h2 keeps up to 64 CONTINUATION frames of one header block (1 MiB). Both are refused here
    as each frame header arrives: ``FrameTooLargeError`` past ``MAX_FRAME_SIZE``,
    ``DenialOfServiceError`` past ``MAX_HEADER_BLOCK`` (the caller closes the connection).
    """

    __slots__ = ("_block", "_preface", "_rest")

    def __init__(self, server_side: bool) -> None:
        self._preface = len(PREFACE) if server_side else 0
        self._rest = b""
        self._block = 0

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, int]]]:
        """(the bytes for h2, the GOAWAYs received as (last stream id, error code))."""
        buf = self._rest + data if self._rest else data
        start = 0
        if self._preface:
            start = min(self._preface, len(buf))
            self._preface -= start
            if self._preface:
                self._rest = b""
                return buf, []
        i = start  # frames start after the preface; what goes to h2 includes the preface
        start = 0
        n = len(buf)
        goaways: list[tuple[int, int]] = []
        keep: list[bytes] = []
        while n - i >= 9:
            size = int.from_bytes(buf[i : i + 3], "big")
            if size > MAX_FRAME_SIZE:
                raise FrameTooLargeError(f"a {size}-byte frame (the limit is {MAX_FRAME_SIZE})")
            end = i + 9 + size
            if end > n:
                break
            kind = buf[i + 3]
            if kind == _GOAWAY and size >= 8:
                keep.append(buf[start:i])
                last = int.from_bytes(buf[i + 9 : i + 13], "big") & 0x7FFFFFFF
                goaways.append((last, int.from_bytes(buf[i + 13 : i + 17], "big")))
                start = end
            elif kind in (_HEADERS, _PUSH_PROMISE, _CONTINUATION):
                self._block = size if kind != _CONTINUATION else self._block + size
                if self._block > MAX_HEADER_BLOCK:
                    raise DenialOfServiceError(f"a header block over {MAX_HEADER_BLOCK} bytes")
                if buf[i + 4] & _END_HEADERS:
                    self._block = 0
            i = end
        self._rest = buf[i:]
        if not goaways:
            return buf[:i] if self._rest else buf, goaways
        keep.append(buf[start:i])
        return b"".join(keep), goaways


class H2Head:
    """A request head as ``runtime.decide`` reads it (``decide.RequestHead``)."""

    __slots__ = ("_authority", "_map", "_path", "grpc", "has_body", "headers", "method", "raw_path", "scheme")

    upgrade = None

    def __init__(
        self, method: str, scheme: str, authority: str, raw_path: str, headers: list[Header], end: bool
    ) -> None:
        self.method = method
        self.scheme = scheme
        self._authority = authority
        self.raw_path = raw_path
        """The ``:path`` as received (with its query)."""
        self.headers = headers
        """The regular fields, in order, lower-case names."""
        self.has_body = not end
        self._map: dict[str, str] | None = None
        self._path: str | None = None
        self.grpc = self.header_map().get("content-type", "").startswith("application/grpc")

    def authority(self) -> str:
        return self._authority

    def path(self) -> str:
        if self._path is None:
            self._path = unquote(self.raw_path.partition("?")[0])
        return self._path

    def query_string(self) -> str:
        return self.raw_path.partition("?")[2]

    def header_map(self) -> Mapping[str, str]:
        found = self._map
        if found is None:
            found = {}
            for name, value in self.headers:
                found.setdefault(name, value)
            self._map = found
        return found


def parse_request(headers: Iterable[Header], end_stream: bool) -> H2Head | str:
    """A received header list -> the head, or why it is no request we can forward."""
    pseudo: dict[str, str] = {}
    regular: list[Header] = []
    for name, value in headers:
        if name.startswith(":"):
            pseudo[name] = value
        elif name == "cookie" and regular and any(n == "cookie" for n, _ in regular):
            # RFC 9113 §8.2.3: split cookie fields are joined again for an HTTP/1.1 reader.
            i = next(i for i, (n, _) in enumerate(regular) if n == "cookie")
            regular[i] = ("cookie", f"{regular[i][1]}; {value}")
        else:
            regular.append((name, value))
    method = pseudo.get(":method", "")
    if method == "CONNECT":
        return "CONNECT over HTTP/2 is not served"
    authority = pseudo.get(":authority") or next((v for n, v in regular if n == "host"), "")
    path = pseudo.get(":path", "")
    if not method or not path:
        return "a request needs :method and :path"
    if end_stream and any(n == "content-length" and v.strip("0") for n, v in regular):
        # RFC 9113 §8.1.1: the length must be the body's, and h2 checks it only against DATA
        # frames; forwarded, the next hop would wait for a body that never comes.
        return "a content-length but no body"
    return H2Head(method, pseudo.get(":scheme", "http"), authority, path, regular, end_stream)


def _apply_ops(headers: list[Header], ops: tuple[HeaderOp, ...]) -> list[Header]:
    for op, name, value in ops:
        low = name.lower()
        if op != ADD:
            headers = [h for h in headers if h[0] != low]
        if op != REMOVE:
            headers.append((low, value))
    return headers


def next_hop_headers(head: H2Head, fwd: Forward, peer: str, secure_hop: bool) -> list[Header]:
    """The next hop's header list: the ``Forward``'s path, host and header changes, the caller's
    service name, ``x-forwarded-for`` / ``-proto``; connection-specific fields dropped."""
    path = head.raw_path
    if fwd.path is not None:
        q = path.find("?")
        path = fwd.path + (path[q:] if q >= 0 else "")
    authority = fwd.host if fwd.host is not None else head.authority()
    out: list[Header] = [
        (":method", head.method),
        (":scheme", "https" if secure_hop else "http"),
        (":authority", authority),
        (":path", path),
    ]
    regular = [
        (n, v)
        for n, v in head.headers
        if n not in _HOP_BY_HOP and (n != "te" or v.strip().lower() == "trailers")
    ]
    if fwd.request_ops:
        regular = _apply_ops(regular, fwd.request_ops)
    xff = ""
    xfp = ""
    source = fwd.source_header
    kept: list[Header] = []
    for n, v in regular:
        if n == "x-forwarded-for":
            xff = xff or v
        elif n == "x-forwarded-proto":
            xfp = xfp or v
        elif n == "x-meshc-source-service" and source is not None:
            continue
        else:
            kept.append((n, v))
    out += kept
    if source is not None:
        out.append(("x-meshc-source-service", source))
    out.append(("x-forwarded-for", f"{xff}, {peer}" if xff else peer))
    out.append(("x-forwarded-proto", xfp or head.scheme or "http"))
    return out


def h1_request_head(headers: list[Header], has_body: bool) -> tuple[bytes, bool]:
    """A next-hop header list (``next_hop_headers``) as an HTTP/1.1 request head, for a next hop
    that speaks only HTTP/1.1; and whether its body goes chunked (no ``content-length``)."""
    pseudo = {n: v for n, v in headers if n.startswith(":")}
    method, path = pseudo.get(":method", "GET"), pseudo.get(":path", "/")
    parts = [f"{method} {path} HTTP/1.1\r\nhost: {pseudo.get(':authority', '')}\r\n"]
    length = False
    for name, value in headers:
        if name.startswith(":"):
            continue
        length = length or name == "content-length"
        parts.append(f"{name}: {value}\r\n")
    chunked = has_body and not length
    if chunked:
        parts.append("transfer-encoding: chunked\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1"), chunked


def h2_response_head(
    status: int, headers: Iterable[tuple[bytes, bytes]], length: bytes | None
) -> list[Header]:
    """An HTTP/1.1 response head as an HTTP/2 header list (lower-case names, no hop-by-hop)."""
    out: list[Header] = [(":status", str(status))]
    for name, value in headers:
        n = name.decode("latin-1").lower()
        if n not in _HOP_BY_HOP:
            out.append((n, value.decode("latin-1")))
    if length is not None:
        out.append(("content-length", length.decode("latin-1")))
    return out


def response_headers(headers: Iterable[Header], ops: tuple[HeaderOp, ...]) -> list[Header]:
    """A response head (or trailers) for the client: hop-by-hop fields dropped, route changes."""
    out = [(n, v) for n, v in headers if n not in _HOP_BY_HOP]
    if ops:
        status = [h for h in out if h[0].startswith(":")]
        out = status + _apply_ops([h for h in out if not h[0].startswith(":")], ops)
    return out


def grpc_status_for_http(status: int) -> int:
    """The gRPC status a data-plane answer becomes (gRPC's HTTP-to-status mapping, with the
    answers this data plane makes itself named as Envoy names them)."""
    if status == 403:
        return 7  # PERMISSION_DENIED
    if status == 504:
        return 4  # DEADLINE_EXCEEDED
    if status == 401:
        return 16
    if status == 404:
        return 12
    if status in (429, 502, 503):
        return 14  # UNAVAILABLE
    if status == 400:
        return 13
    return 2


def grpc_reply(code: int, message: str) -> list[Header]:
    """A trailers-only gRPC answer (one HEADERS frame with END_STREAM)."""
    return [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", str(code)),
        ("grpc-message", _grpc_message(message)),
    ]


def _grpc_message(text: str) -> str:
    """gRPC's percent-encoding of ``grpc-message``."""
    out = []
    for b in text.encode():
        out.append(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}")
    return "".join(out)


def reply_headers(reply: Reply, grpc: bool) -> tuple[list[Header], bytes]:
    """A data-plane answer as (header list, body); for a gRPC caller a trailers-only answer."""
    extra = [(n.lower(), v) for n, v in reply.headers]
    if grpc:
        reason = ("x-meshc-reason", reply.reason)
        return [*grpc_reply(grpc_status_for_http(reply.status), reply.reason), reason, *extra], b""
    body = (reply.body if reply.body is not None else reply.reason).encode()
    head = [
        (":status", str(reply.status)),
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("x-meshc-reason", reply.reason),
        *extra,
    ]
    return head, body


def grpc_timeout_s(value: str | None) -> float | None:
    """``grpc-timeout`` (``1S``, ``250m``...) in seconds; None when absent or malformed (gRPC's
    grammar: 1 to 8 ASCII digits and a unit; ``str.isdigit`` alone takes "²", which int() refuses)."""
    if not value or not 2 <= len(value) <= 9 or value[-1] not in _GRPC_UNITS:
        return None
    digits = value[:-1]
    if not digits.isascii() or not digits.isdigit():
        return None
    return int(digits) * _GRPC_UNITS[value[-1]]


def grpc_status(headers: Iterable[Header]) -> int | None:
    """The ``grpc-status`` of a header list (response head or trailers), if it has one."""
    for name, value in headers:
        if name == "grpc-status":
            return int(value) if len(value) <= 3 and value.isascii() and value.isdigit() else 2
    return None
