"""HTTP/2 frame sequences for fuzzing (issue 17 #2): what a client may send after the preface.

A case is a list of ops drawn by hypothesis; ``render`` turns it into wire bytes with one HPACK
encoder (so header blocks are real HPACK, until a mutation or a raw block breaks them) and tells
which streams the client ended (HEADERS or DATA with END_STREAM, never reset by the client): a
server must answer each of those (a response HEADERS or a RST_STREAM) unless it ends the
connection. Ops cover well-formed requests and the malformed input RFC 9113 says a server
refuses: pseudo-header errors (missing ``:path``, duplicated, after a regular field, unknown),
upper-case or connection-specific names, bad values, content-length mismatches, bad HPACK,
frames on stream 0 or even streams, oversized frames, bad SETTINGS, WINDOW_UPDATE of 0 or past
2^31-1, RST_STREAM on idle streams, CONTINUATION floods, trailers, unknown frame types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hpack import Encoder
from hypothesis import strategies as st

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
PING_PAYLOAD = b"fuzzping"

Op = tuple[Any, ...]


def frame(kind: int, flags: int, sid: int, payload: bytes, length: int | None = None) -> bytes:
    """One frame; ``length`` may lie about the payload (an oversized or cut frame)."""
    size = len(payload) if length is None else length
    return size.to_bytes(3, "big") + bytes((kind & 0xFF, flags & 0xFF)) + sid.to_bytes(4, "big") + payload


def settings_frame(pairs: list[tuple[int, int]] = [], ack: bool = False) -> bytes:  # noqa: B006
    payload = b"".join(k.to_bytes(2, "big") + (v & 0xFFFFFFFF).to_bytes(4, "big") for k, v in pairs)
    return frame(SETTINGS, ACK if ack else 0, 0, payload)


def ping_frame(payload: bytes = PING_PAYLOAD, ack: bool = False) -> bytes:
    return frame(PING, ACK if ack else 0, 0, payload)


PATHS = ["/", "/x?a=1", "/route1/y", "/big/10", "/a%20b", "/%zz", "*", "noslash", "", "/" + "p" * 3000]
AUTHORITIES = [
    "benigno:5000",
    "benigno",
    "magnanimo:4000",
    "BENIGNO:5000",
    "benigno:\xb2",  # "²" is str.isdigit() and not int()
    "benigno:" + "9" * 5000,
    "[::1",
    "[::1]:x",
    "",
    "elsewhere:80",
    "x" * 300,
]
METHODS = ["GET", "POST", "PUT", "HEAD", "DELETE", "CONNECT", "OPTIONS", "get", "", "G E T"]
NAMES = [
    "x-a",
    "X-Upper",
    "content-length",
    "content-type",
    "te",
    "connection",
    "transfer-encoding",
    "host",
    "cookie",
    "grpc-timeout",
    "x-meshc-source-service",
    "x-meshc-hash-key",
    "traceparent",
    "x-forwarded-for",
    ":path",
    ":method",
    ":status",
    ":foo",
    "",
    "bad name",
    "a:b",
    "\xe9",
]
VALUES = [
    "1",
    "0",
    "-1",
    "+5",
    "99999999999",
    "9" * 5000,
    "\xb2",
    "\xb2S",
    "1S",
    "9" * 400 + "H",
    "99999999H",
    "application/grpc",
    "trailers",
    "gzip",
    "close",
    " padded ",
    "a\x01b",
    "a\rb",
    "a\nb",
    "a\x00b",
    "\xff\xfe",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "",
]

stream_ids = st.sampled_from([1, 1, 3, 3, 5, 7, 9, 0, 2, 101, 2**31 - 1])
names = st.one_of(st.sampled_from(NAMES), st.text(max_size=12))
values = st.one_of(st.sampled_from(VALUES), st.text(max_size=40))


@st.composite
def header_lists(draw: st.DrawFn) -> list[tuple[str, str]]:
    """A request's header list: most often a valid one, then a few edits that may break it."""
    method = draw(st.sampled_from(METHODS[:4])) if draw(st.booleans()) else draw(st.sampled_from(METHODS))
    headers = [
        (":method", method),
        (":scheme", draw(st.sampled_from(["http", "https", "ftp", ""]))),
        (":authority", draw(st.sampled_from(AUTHORITIES[:3]) | st.sampled_from(AUTHORITIES))),
        (":path", draw(st.sampled_from(PATHS[:4]) | st.sampled_from(PATHS) | st.text(max_size=30))),
    ]
    for _ in range(draw(st.integers(0, 4))):
        headers.append((draw(names), draw(values)))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.integers(0, 4))
        if op == 0 and headers:  # drop one (a missing :path, :method, :authority)
            del headers[draw(st.integers(0, len(headers) - 1))]
        elif op == 1 and headers:  # duplicate one
            headers.append(headers[draw(st.integers(0, len(headers) - 1))])
        elif op == 2 and headers:  # move one to the end (a pseudo-header after regular ones)
            headers.append(headers.pop(draw(st.integers(0, len(headers) - 1))))
        elif op == 3 and headers:  # upper-case one name
            i = draw(st.integers(0, len(headers) - 1))
            headers[i] = (headers[i][0].upper(), headers[i][1])
        elif op == 4:  # a gRPC call with a grpc-timeout
            headers += [("content-type", "application/grpc"), ("grpc-timeout", draw(values))]
    return headers


def _op() -> st.SearchStrategy[Op]:
    flags = st.integers(0, 255)
    data = st.binary(max_size=64)
    return st.one_of(
        st.tuples(
            st.just("headers"),
            stream_ids,
            header_lists(),
            st.booleans(),  # END_STREAM
            st.integers(0, 3),  # CONTINUATION frames the block is split into
            st.booleans(),  # PADDED
        ),
        st.tuples(st.just("data"), stream_ids, st.binary(max_size=300), st.booleans(), st.booleans()),
        st.tuples(st.just("trailers"), stream_ids, st.lists(st.tuples(names, values), max_size=3)),
        st.tuples(st.just("bad-hpack"), stream_ids, st.binary(min_size=1, max_size=64), flags),
        st.tuples(st.just("continuation"), stream_ids, data, flags),
        st.tuples(st.just("rst"), stream_ids, st.integers(0, 20)),
        st.tuples(
            st.just("settings"),
            st.lists(
                st.tuples(
                    st.integers(0, 10),
                    st.sampled_from([0, 1, 2, 100, 16383, 16384, 65535, 2**24, 2**31 - 1, 2**31, 2**32 - 1]),
                ),
                max_size=4,
            ),
            st.booleans(),
            st.integers(-2, 2),  # a payload length that is not a multiple of 6
        ),
        st.tuples(
            st.just("window"), stream_ids, st.sampled_from([0, 1, 65535, 2**30, 2**31 - 1, 2**31, 2**32 - 1])
        ),
        st.tuples(st.just("ping"), st.binary(min_size=0, max_size=12), st.booleans()),
        st.tuples(st.just("priority"), stream_ids, stream_ids, st.integers(0, 255), st.integers(0, 6)),
        st.tuples(st.just("push-promise"), stream_ids, data),
        st.tuples(st.just("goaway"), st.integers(0, 2**31 - 1), st.integers(0, 20), st.integers(0, 9)),
        st.tuples(st.just("raw"), st.integers(0, 255), flags, stream_ids, data),
        st.tuples(
            st.just("oversized"),
            st.sampled_from([DATA, HEADERS, SETTINGS, GOAWAY, 0xEE]),
            st.integers(16385, 2**24 - 1),
            st.integers(0, 4000),
        ),
        st.tuples(st.just("continuation-flood"), stream_ids, st.integers(1, 120), st.integers(1, 2000)),
    )


@st.composite
def good_requests(draw: st.DrawFn) -> Op:
    """A request h2 takes: valid pseudo-headers, lower-case names; the values still vary (the
    :authority, :path, a ``grpc-timeout``), which is what the layers past h2 read."""
    sid = draw(st.sampled_from([1, 3, 5, 7]))
    headers = [
        (":method", draw(st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE"]))),
        (":scheme", "http"),
        (":authority", draw(st.sampled_from(AUTHORITIES))),
        (":path", draw(st.sampled_from([p for p in PATHS if p]))),
    ]
    forbidden = {"connection", "transfer-encoding", "te", "host"}
    extra = st.sampled_from([n for n in NAMES if n.isascii() and n.islower() and n.replace("-", "").isalpha()
                             and n not in forbidden])  # fmt: skip
    clean = st.sampled_from([v for v in VALUES if v == v.strip() and not set(v) & set("\0\r\n")])
    headers += draw(st.lists(st.tuples(extra, clean), max_size=3))
    return ("headers", sid, headers, draw(st.booleans()), draw(st.integers(0, 2)), draw(st.booleans()))


cases = st.builds(
    lambda good, rest: [*good, *rest],
    st.lists(good_requests(), min_size=1, max_size=2),
    st.lists(_op(), max_size=6),
)


@dataclass
class Rendered:
    wire: bytes
    frames: list[int] = field(default_factory=list)
    """Where each frame ends in ``wire``."""
    ended: set[int] = field(default_factory=set)
    """Streams the client ended and did not reset: each is owed an answer or a connection end."""
    complete: bool = True
    """Every frame is whole (no frame announces more bytes than follow it)."""


def _padded(payload: bytes, pad: bool) -> tuple[bytes, int]:
    if not pad:
        return payload, 0
    return bytes((3,)) + payload + b"\0\0\0", PADDED


def render(ops: list[Op]) -> Rendered:
    enc = Encoder()
    out: list[bytes] = []
    r = Rendered(b"")
    for op in ops:
        kind = op[0]
        if kind == "headers":
            _, sid, headers, end, parts, pad = op
            block = enc.encode(
                [(n.encode("latin-1", "replace"), v.encode("latin-1", "replace")) for n, v in headers]
            )
            step = max(1, len(block) // (parts + 1))
            first, rest = block[:step], block[step:]
            pieces = [rest[i : i + step] for i in range(0, len(rest), step)] if parts else []
            if not parts:
                first = block
            payload, pflag = _padded(first, pad)
            flags = (END_STREAM if end else 0) | (0 if pieces else END_HEADERS) | pflag
            out.append(frame(HEADERS, flags, sid, payload))
            for i, piece in enumerate(pieces):
                out.append(frame(CONTINUATION, END_HEADERS if i == len(pieces) - 1 else 0, sid, piece))
            if end:
                r.ended.add(sid)
        elif kind == "data":
            _, sid, body, end, pad = op
            payload, pflag = _padded(body, pad)
            out.append(frame(DATA, (END_STREAM if end else 0) | pflag, sid, payload))
            if end:
                r.ended.add(sid)
        elif kind == "trailers":
            _, sid, fields = op
            block = enc.encode(
                [(n.encode("latin-1", "replace"), v.encode("latin-1", "replace")) for n, v in fields]
            )
            out.append(frame(HEADERS, END_STREAM | END_HEADERS, sid, block))
            r.ended.add(sid)
        elif kind == "bad-hpack":
            _, sid, block, flags = op
            out.append(frame(HEADERS, flags | END_HEADERS, sid, block))
        elif kind == "continuation":
            _, sid, block, flags = op
            out.append(frame(CONTINUATION, flags, sid, block))
        elif kind == "rst":
            _, sid, code = op
            out.append(frame(RST_STREAM, 0, sid, code.to_bytes(4, "big")))
            r.ended.discard(sid)
        elif kind == "settings":
            _, pairs, ack, skew = op
            raw = settings_frame(pairs, ack)
            payload = raw[9:]
            payload = payload[: len(payload) + skew] if skew < 0 else payload + b"\0" * skew
            out.append(frame(SETTINGS, ACK if ack else 0, 0, payload))
        elif kind == "window":
            _, sid, inc = op
            out.append(frame(WINDOW_UPDATE, 0, sid, (inc & 0xFFFFFFFF).to_bytes(4, "big")))
        elif kind == "ping":
            _, payload, ack = op
            out.append(frame(PING, ACK if ack else 0, 0, payload))
        elif kind == "priority":
            _, sid, dep, weight, length = op
            payload = (dep.to_bytes(4, "big") + bytes((weight,)) + b"\0")[:length]
            out.append(frame(PRIORITY, 0, sid, payload))
        elif kind == "push-promise":
            _, sid, payload = op
            out.append(frame(PUSH_PROMISE, END_HEADERS, sid, payload))
        elif kind == "goaway":
            _, last, code, length = op
            payload = (last.to_bytes(4, "big") + code.to_bytes(4, "big") + b"debug!")[:length]
            out.append(frame(GOAWAY, 0, 0, payload))
        elif kind == "raw":
            _, ftype, flags, sid, payload = op
            out.append(frame(ftype, flags, sid, payload))
        elif kind == "oversized":
            _, ftype, length, sent = op
            out.append(frame(ftype, 0, 1, b"\0" * sent, length=length))
            r.complete = False
        elif kind == "continuation-flood":
            _, sid, n, size = op
            block = enc.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http")])
            out.append(frame(HEADERS, END_STREAM, sid, block))
            out += [frame(CONTINUATION, 0, sid, b"\x40\x01a\x01b" * (size // 5)) for _ in range(n)]
    r.wire = b"".join(out)
    end = 0
    for f in out:
        end += len(f)
        r.frames.append(end)
    return r


@st.composite
def mutate(draw: st.DrawFn, data: bytes) -> bytes:
    """A few byte-level edits: flip, insert, delete, duplicate a span."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1))
        op = draw(st.integers(0, 3))
        if op == 0:
            buf[i] = draw(st.integers(0, 255))
        elif op == 1:
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2:
            del buf[i : i + draw(st.integers(1, 8))]
        else:
            j = draw(st.integers(i, min(len(buf), i + 40)))
            buf[j:j] = buf[i:j]
    return bytes(buf)


class FrameReader:
    """Frames a server sends, read from a byte stream: (type, flags, stream id, payload)."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes]]:
        self.buf += data
        frames = []
        while len(self.buf) >= 9:
            size = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + size:
                break
            kind, flags = self.buf[3], self.buf[4]
            sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            frames.append((kind, flags, sid, self.buf[9 : 9 + size]))
            self.buf = self.buf[9 + size :]
        return frames
