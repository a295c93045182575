"""Access logs of every forwarding layer: File, Tcp and OpenTelemetry backends, Plain or Json format.

The byte layers hand ``AccessLog.write`` one entry per request (the fields of meshc's JSON line:
``time``, ``direction``, services, ``upstream``, ``method``, ``path``, ``response_code``,
``duration_ms``, ``trace_id``...) and the request's header getter; each backend of the rule
(``TrafficLogConf.backends``) gets the line in its format:

* no format: meshc's JSON line (the entry itself);
* ``format`` (Kuma's Plain): the string with its command operators replaced (``render``);
* ``json_format`` (Kuma's Json): a JSON object of the keys, each value rendered; a value that is
  one operator alone keeps its type (``%RESPONSE_CODE%`` is a number), as in Envoy's JSON format.

The operators are Envoy's that meshc's entry can answer (``runtime.bundle.LOG_OPERATORS``) and
Kuma's ``%KUMA_*%`` placeholders; a value the data plane does not know is ``-`` in Plain text and
``null`` in Json (left out with ``omit_empty_values``).

File backends are written on the data path (opened on first use, kept open, line-buffered; a file
that cannot be opened is skipped: logging never fails a request). Tcp lines and OpenTelemetry log
records go through ``LogShipper``: a bounded queue and one thread (``runtime.otlp.Batcher``), so a
slow or dead collector never slows a request; what it cannot take is dropped and counted in
``meshc_accesslog_records_dropped{backend, reason}``. OpenTelemetry records are posted as OTLP/HTTP
JSON to ``http://<address>/v1/logs``.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from runtime import otlp
from runtime.bundle import LOG_OPERATOR_RE, LoggingBackend, TrafficLogConf

if TYPE_CHECKING:
    from runtime.decide import RequestHead
    from runtime.engine import Engine

__all__ = ["AccessLog", "LogShipper", "app_entry", "head_getter", "render"]

Getter = Callable[[str], "str | None"]
"""The request's header by lower-case name, or None."""

_OP = re.compile(LOG_OPERATOR_RE)
_OTLP_VALUES = (
    "stringValue",
    "boolValue",
    "intValue",
    "doubleValue",
    "arrayValue",
    "kvlistValue",
    "bytesValue",
)
_TCP_TIMEOUT_S = 2.0
_dumps = json.JSONEncoder(separators=(",", ":")).encode
"""Compact JSON, one encoder for every line (``json.dumps`` with options builds one per call)."""


class _Ctx:
    """What one request's operators are rendered from."""

    __slots__ = ("entry", "get", "mesh")

    def __init__(self, entry: dict[str, Any], get: Getter | None, mesh: str) -> None:
        self.entry = entry
        self.get = get
        self.mesh = mesh


def _start_time(c: _Ctx) -> str:
    start = c.entry["time"] - c.entry["duration_ms"] / 1000.0
    ms = int(start * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start)) + f".{ms:03d}Z"


def _direction(c: _Ctx) -> str:
    return "OUTBOUND" if c.entry.get("direction") == "outbound" else "INBOUND"


_VALUES: dict[str, Callable[[_Ctx], Any]] = {
    "START_TIME": _start_time,
    "DURATION": lambda c: round(c.entry["duration_ms"]),
    "RESPONSE_CODE": lambda c: c.entry.get("response_code"),
    "PROTOCOL": lambda c: c.entry.get("protocol", "HTTP/1.1"),
    "UPSTREAM_HOST": lambda c: c.entry.get("upstream") or None,
    "UPSTREAM_CLUSTER": lambda c: c.entry.get("destination_service") or None,
    "TRACE_ID": lambda c: c.entry.get("trace_id") or None,
    "GRPC_STATUS": lambda c: c.entry.get("grpc_status"),
    "KUMA_MESH": lambda c: c.mesh,
    "KUMA_SOURCE_SERVICE": lambda c: c.entry.get("source_service") or None,
    "KUMA_DESTINATION_SERVICE": lambda c: c.entry.get("destination_service") or None,
    "KUMA_TRAFFIC_DIRECTION": _direction,
    "KUMA_ZONE": lambda c: "",
    "KUMA_WORKLOAD": lambda c: "",
}

_PSEUDO: dict[str, Callable[[_Ctx], Any]] = {
    ":method": lambda c: c.entry.get("method") or None,
    ":path": lambda c: c.entry.get("path") or None,
    ":authority": lambda c: c.get("host") if c.get is not None else None,
}


def _header(c: _Ctx, arg: str) -> Any:
    """``%REQ(A?B)%``: header A, else B (pseudo-headers from the entry)."""
    for name in arg.split("?"):
        n = name.strip().lower()
        if n == "x-envoy-original-path":
            continue  # meshc keeps no original path apart from :path
        pseudo = _PSEUDO.get(n)
        value = pseudo(c) if pseudo is not None else c.get(n) if c.get is not None else None
        if value is not None:
            return value
    return None


Part = str | tuple[str, str | None, int | None]
"""A literal, or an operator (name, its argument, its length limit)."""


def parse_format(fmt: str) -> tuple[Part, ...]:
    parts: list[Part] = []
    at = 0
    for m in _OP.finditer(fmt):
        if m.start() > at:
            parts.append(fmt[at : m.start()])
        parts.append((m.group(1), m.group(2), int(m.group(3)) if m.group(3) else None))
        at = m.end()
    if at < len(fmt):
        parts.append(fmt[at:])
    return tuple(parts)


def _value(op: tuple[str, str | None, int | None], c: _Ctx) -> Any:
    name, arg, limit = op
    if name == "REQ":
        value = _header(c, arg or "")
    else:
        fn = _VALUES.get(name)
        value = fn(c) if fn is not None else None
    if limit is not None and isinstance(value, str):
        value = value[:limit]
    return value


def render(parts: tuple[Part, ...], c: _Ctx, empty: str = "-") -> str:
    """Plain text: each operator's value, ``empty`` where the data plane has none."""
    out: list[str] = []
    for p in parts:
        if isinstance(p, str):
            out.append(p)
        else:
            v = _value(p, c)
            out.append(empty if v is None or v == "" else str(v))
    return "".join(out)


def _typed(parts: tuple[Part, ...], c: _Ctx) -> Any:
    """A Json value: one operator alone keeps its type (None when unknown), else text."""
    if len(parts) == 1 and not isinstance(parts[0], str):
        return _value(parts[0], c)
    return render(parts, c)


class LogShipper:
    """Tcp lines and OTLP log records on their way to collectors, off the data path."""

    def __init__(self, registry: CollectorRegistry, cap: int = otlp.QUEUE_CAP) -> None:
        self.sent = Counter(
            "meshc_accesslog_records_sent",
            "Access log records a Tcp or OpenTelemetry collector took.",
            ["backend"],
            registry=registry,
        )
        self.dropped = Counter(
            "meshc_accesslog_records_dropped",
            "Access log records lost: the queue was full (queue_full) or the collector failed, "
            "refused or did not answer (collector_failed).",
            ["backend", "reason"],
            registry=registry,
        )
        self._batcher: otlp.Batcher[tuple[str, str, str, str]] = otlp.Batcher(
            "accesslog", self._send, lambda key: self.dropped.labels(key[0], "queue_full").inc(), cap
        )
        self._sockets: dict[str, socket.socket] = {}

    def put(self, kind: str, address: str, service: str, mesh: str, item: Any) -> None:
        self._batcher.put((kind, address, service, mesh), item)

    def _send(self, key: tuple[str, str, str, str], items: list[Any]) -> None:
        kind, address, service, mesh = key
        if kind == "otel":
            body = otlp.logs_body(service, mesh, items)
            ok = otlp.post_json(f"http://{address}/v1/logs", body)
        else:
            ok = self._send_tcp(address, "".join(items).encode())
        if ok:
            self.sent.labels(kind).inc(len(items))
        else:
            self.dropped.labels(kind, "collector_failed").inc(len(items))

    def _send_tcp(self, address: str, data: bytes) -> bool:
        """Write on the kept connection, reconnecting once (the collector may have closed it)."""
        for _ in range(2):
            sock = self._sockets.get(address)
            try:
                if sock is None:
                    host, _, port = address.rpartition(":")
                    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=_TCP_TIMEOUT_S)
                    self._sockets[address] = sock
                sock.sendall(data)
                return True
            except (OSError, ValueError):
                self._sockets.pop(address, None)
                if sock is not None:
                    sock.close()
        return False


class AccessLog:
    """One data plane layer's writer: file handles, parsed formats, the shared shipper."""

    def __init__(self, shipper: LogShipper | None = None, engine: Engine | None = None) -> None:
        self._files: dict[str, IO[str]] = {}
        self._formats: dict[str, tuple[Part, ...]] = {}
        self._bodies: dict[str, Any] = {}
        self._shipper = shipper
        self._engine = engine

    def _parts(self, fmt: str) -> tuple[Part, ...]:
        parts = self._formats.get(fmt)
        if parts is None:
            parts = self._formats[fmt] = parse_format(fmt)
        return parts

    def _mesh(self) -> str:
        snap = self._engine.snapshot if self._engine is not None else None
        return snap.mesh.mesh if snap is not None and snap.mesh is not None else ""

    def write(self, conf: TrafficLogConf, entry: dict[str, Any], get: Getter | None = None) -> None:
        """Log one request to every backend of ``conf``; never raises for a backend's sake."""
        first = conf.backend
        if not conf.also and first.type == "file" and not first.json_format and not first.format:
            self._file(first, _dumps(entry) + "\n")  # the common case: meshc's line to a file
            return
        ctx = _Ctx(entry, get, self._mesh())
        for backend in conf.backends:
            if backend.type == "otel":
                self._otel(backend, ctx)
                continue
            line = self.line(backend, ctx)
            if backend.type == "file":
                self._file(backend, line)
            elif self._shipper is not None and backend.address:
                self._shipper.put("tcp", backend.address, "", "", line)

    def line(self, backend: LoggingBackend, ctx: _Ctx) -> str:
        """The backend's line for this request, newline included."""
        if backend.json_format:
            obj: dict[str, Any] = {}
            for key, fmt in backend.json_format:
                v = _typed(self._parts(fmt), ctx)
                if backend.omit_empty_values and (v is None or v == ""):
                    continue
                obj[key] = v
            return _dumps(obj) + "\n"
        if backend.format:
            empty = "" if backend.omit_empty_values else "-"
            text = render(self._parts(backend.format), ctx, empty)
            return text if text.endswith("\n") else text + "\n"
        return _dumps(ctx.entry) + "\n"

    def _file(self, backend: LoggingBackend, line: str) -> None:
        if not backend.path:
            return
        f = self._files.get(backend.path)
        if f is None:
            try:
                f = self._files[backend.path] = open(backend.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            except OSError:
                return
        try:
            f.write(line)
        except (OSError, ValueError):
            return

    def _otel(self, backend: LoggingBackend, ctx: _Ctx) -> None:
        if self._shipper is None or not backend.address:
            return
        entry = ctx.entry
        start_ns = int((entry["time"] - entry["duration_ms"] / 1000.0) * 1e9)
        record: dict[str, Any] = {
            "timeUnixNano": str(start_ns),
            "observedTimeUnixNano": str(time.time_ns()),
            "body": self._body(backend, ctx),
        }
        if backend.attributes:
            record["attributes"] = otlp.attributes(
                (k, render(self._parts(v), ctx)) for k, v in backend.attributes
            )
        trace_id = entry.get("trace_id") or ""
        if trace_id:
            record["traceId"] = f"{trace_id:0>32}"
        service = self._engine.service if self._engine is not None else ""
        self._shipper.put("otel", backend.address, service or "", ctx.mesh, record)

    def _body(self, backend: LoggingBackend, ctx: _Ctx) -> dict[str, Any]:
        """Kuma's body: an OTLP AnyValue with placeholders in its strings and keys, or a string;
        none: meshc's JSON line."""
        if backend.body is None:
            return {"stringValue": _dumps(ctx.entry)}
        raw = self._bodies.get(backend.body)
        if raw is None:
            try:
                raw = json.loads(backend.body)
            except ValueError:
                raw = backend.body
            self._bodies[backend.body] = raw
        if isinstance(raw, dict) and len(raw) == 1 and next(iter(raw)) in _OTLP_VALUES:
            value: dict[str, Any] = self._interpolated(raw, ctx)
            return value
        text = raw if isinstance(raw, str) else backend.body
        return {"stringValue": render(self._parts(text), ctx)}

    def _interpolated(self, value: Any, ctx: _Ctx) -> Any:
        if isinstance(value, str):
            return render(self._parts(value), ctx) if "%" in value else value
        if isinstance(value, list):
            return [self._interpolated(v, ctx) for v in value]
        if isinstance(value, dict):
            return {self._interpolated(k, ctx): self._interpolated(v, ctx) for k, v in value.items()}
        return value

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def head_getter(head: RequestHead | None) -> Getter | None:
    """A request head's headers for ``%REQ(...)%`` (``host``: its authority), read only when a
    format asks."""
    if head is None:
        return None

    def get(name: str) -> str | None:
        if name == "host":
            return head.authority() or None
        return head.header_map().get(name)

    return get


def app_entry(
    source: str,
    service: str,
    app: str,
    method: str,
    path: str,
    status: int,
    elapsed: float,
    trace_id: str,
) -> dict[str, Any]:
    """The line of an inbound request to the local app (Kuma's inbound MeshAccessLog), with the
    fields an outbound line has: the caller as source, this service as destination, the app's
    address as upstream."""
    return {
        "time": time.time(),
        "direction": "inbound",
        "source_service": source,
        "destination_service": service,
        "destination_subset": "",
        "upstream": app,
        "method": method,
        "path": path,
        "response_code": status,
        "duration_ms": round(elapsed * 1000.0, 3),
        "trace_id": trace_id,
    }
