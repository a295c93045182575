"""The gRPC health check (``grpc.health.v1.Health/Check``) without sockets: bytes in, a verdict out.

A ``HealthProbe`` drives one client HTTP/2 connection (the ``h2`` state machine of
``runtime.h2conn``) through sequential checks, so that ``reuse_connection`` can keep it: the
caller writes ``data_to_send()`` to the socket and feeds what it reads to ``receive``, which
returns the check's ``Verdict`` once the call has ended. The two messages are tiny and encoded
here by hand, so the data plane needs no protobuf or grpcio::

    message HealthCheckRequest { string service = 1; }
    message HealthCheckResponse { enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2;
                                  SERVICE_UNKNOWN = 3; } ServingStatus status = 1; }

Only an answer with HTTP 200, ``grpc-status: 0`` and ``status: SERVING`` passes (Envoy's rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import h2.events as ev
from h2.exceptions import ProtocolError

from runtime.h2conn import Header, client_connection, grpc_status

__all__ = [
    "CHECK_PATH",
    "SERVING_STATUS",
    "HealthProbe",
    "Verdict",
    "decode_response",
    "encode_request",
    "request_headers",
]

CHECK_PATH = "/grpc.health.v1.Health/Check"

SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}

MAX_MESSAGE = 64 * 1024
"""A health answer is a few bytes; a peer that sends more is not a health service."""


@dataclass(frozen=True)
class Verdict:
    """How one check ended: ``ok`` only for SERVING; ``reason`` says why not, for logs and tests."""

    ok: bool
    reason: str


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def encode_request(service: str) -> bytes:
    """A length-prefixed, uncompressed ``HealthCheckRequest`` message (an empty service: no field)."""
    raw = service.encode()
    msg = b"\x0a" + _varint(len(raw)) + raw if raw else b""
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


def decode_response(msg: bytes) -> int:
    """The ``status`` of a ``HealthCheckResponse`` (the message without its 5-byte prefix); fields
    it does not know are skipped, as protobuf readers do; an absent status is UNKNOWN (0)."""
    status, i = 0, 0
    while i < len(msg):
        key, i = _read_varint(msg, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(msg, i)
            if field == 1:
                status = value
        elif wire == 1:
            i += 8
        elif wire == 2:
            size, i = _read_varint(msg, i)
            i += size
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"wire type {wire}")
        if i > len(msg):
            raise ValueError("truncated field")
    return status


def request_headers(authority: str, tls: bool, timeout_ms: int) -> list[Header]:
    return [
        (":method", "POST"),
        (":scheme", "https" if tls else "http"),
        (":path", CHECK_PATH),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", f"{max(1, timeout_ms)}m"),
        ("user-agent", "meshc-health-check"),
    ]


class HealthProbe:
    """One HTTP/2 connection to an upstream, one check at a time."""

    def __init__(self) -> None:
        self.conn = client_connection()
        self.stream_id: int | None = None
        self.closed = False
        """The connection cannot carry another check (GOAWAY, reset, a protocol error)."""
        self._status: int | None = None
        self._grpc: int | None = None
        self._body = b""

    @property
    def answered(self) -> bool:
        """The current (or last) check got a response head: the peer took the call."""
        return self._status is not None

    def data_to_send(self) -> bytes:
        return self.conn.data_to_send()

    def start(self, service: str, authority: str, tls: bool, timeout_ms: int) -> None:
        """Open the check's stream: headers and the request, END_STREAM on the message."""
        if self.stream_id is not None:
            raise RuntimeError("a check is already under way")
        sid = self.conn.get_next_available_stream_id()
        self.stream_id, self._status, self._grpc, self._body = sid, None, None, b""
        self.conn.send_headers(sid, request_headers(authority, tls, timeout_ms))
        self.conn.send_data(sid, encode_request(service), end_stream=True)

    def receive(self, data: bytes) -> Verdict | None:
        """Feed bytes read from the connection; the verdict once the check's stream has ended.
        An empty ``data`` is the peer closing the connection."""
        if not data:
            self.closed = True
            return self._end(Verdict(False, "connection closed")) if self.stream_id is not None else None
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as e:
            self.closed = True
            return self._end(Verdict(False, f"HTTP/2 protocol error: {e}"))
        found: Verdict | None = None
        for event in events:
            verdict = self._event(event)
            if verdict is not None and found is None:
                found = self._end(verdict)
        return found

    def _end(self, verdict: Verdict) -> Verdict:
        self.stream_id = None
        return verdict

    def _event(self, e: ev.Event) -> Verdict | None:
        if isinstance(e, ev.ConnectionTerminated):
            self.closed = True
            return Verdict(False, f"GOAWAY {e.error_code}") if self.stream_id is not None else None
        sid = getattr(e, "stream_id", None)
        if sid is None or sid != self.stream_id:
            return None
        if isinstance(e, ev.ResponseReceived):
            head = cast(list[Header], list(e.headers or ()))  # str pairs: header_encoding is set
            self._status = next((int(v) for n, v in head if n == ":status" and v.isdigit()), None)
            self._grpc = grpc_status(head)
        elif isinstance(e, ev.TrailersReceived):
            self._grpc = grpc_status(cast(list[Header], list(e.headers or ())))
        elif isinstance(e, ev.DataReceived):
            self.conn.acknowledge_received_data(e.flow_controlled_length, sid)
            self._body += e.data
            if len(self._body) > MAX_MESSAGE:
                self.conn.reset_stream(sid)
                return Verdict(False, "answer too large")
        elif isinstance(e, ev.StreamReset):
            return Verdict(False, f"stream reset {e.error_code}")
        elif isinstance(e, ev.StreamEnded):
            return self._verdict()
        return None

    def _verdict(self) -> Verdict:
        if self._status != 200:
            return Verdict(False, f"HTTP status {self._status}")
        if self._grpc is None:
            return Verdict(False, "no grpc-status")
        if self._grpc != 0:
            return Verdict(False, f"grpc-status {self._grpc}")
        body = self._body
        if len(body) < 5:
            return Verdict(False, "no response message")
        if body[0] != 0:
            return Verdict(False, "compressed response message")
        size = int.from_bytes(body[1:5], "big")
        if len(body) != 5 + size:
            return Verdict(False, "malformed response message")
        try:
            status = decode_response(body[5:])
        except ValueError as err:
            return Verdict(False, f"malformed response message: {err}")
        name = SERVING_STATUS.get(status, str(status))
        return Verdict(status == 1, name)
