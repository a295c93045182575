"""Telemetry leaves the data plane off the data path: OTLP/HTTP JSON encoding and a batch sender.

``Batcher`` is the one discipline every exporter here follows (Zipkin spans, OTLP spans and logs,
TCP log lines): ``put`` never waits (a full queue drops the item and counts it), one daemon thread
takes batches of up to ``BATCH`` items or ``FLUSH_S`` seconds and hands each group (by
destination) to ``send``, which may block on a slow collector without costing a request anything
but the telemetry it loses.

The OTLP encoding is the OTLP/HTTP JSON mapping (https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding):
lowerCamelCase field names, trace and span ids as hex strings (not base64), 64-bit integers
(``timeUnixNano``) as decimal strings, enums as integers. It is written by hand: the OTLP
protobuf packages bring protobuf, and the SDK exporters want the SDK's own span objects.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.request
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Generic, TypeVar

__all__ = [
    "BATCH",
    "FLUSH_S",
    "POST_TIMEOUT_S",
    "QUEUE_CAP",
    "Batcher",
    "any_value",
    "attributes",
    "logs_body",
    "post_json",
    "traces_body",
]

QUEUE_CAP = 10_000
BATCH = 500
FLUSH_S = 0.2
POST_TIMEOUT_S = 2.0

K = TypeVar("K", bound=Hashable)

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Collectors are reached directly: the sidecar's environment may name an HTTP proxy (its app's)."""


class Batcher(Generic[K]):
    """A bounded queue of (destination, item) drained by one daemon thread in batches."""

    def __init__(
        self,
        name: str,
        send: Callable[[K, list[Any]], None],
        dropped: Callable[[K], None],
        cap: int = QUEUE_CAP,
    ) -> None:
        self._name = name
        self._send = send
        self._dropped = dropped
        self._queue: queue.Queue[tuple[K, Any]] = queue.Queue(cap)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, key: K, item: Any) -> None:
        """Queue ``item`` for ``key``; never waits (full: dropped and counted)."""
        try:
            self._queue.put_nowait((key, item))
        except queue.Full:
            self._dropped(key)
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            end = time.monotonic() + FLUSH_S
            while len(batch) < BATCH:
                left = end - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
            by_key: dict[K, list[Any]] = {}
            for key, item in batch:
                by_key.setdefault(key, []).append(item)
            for key, items in by_key.items():
                try:
                    self._send(key, items)
                except Exception:  # an exporter bug must not end the thread: the next batch tries again
                    continue


def post_json(url: str, body: Any, timeout_s: float = POST_TIMEOUT_S) -> bool:
    """POST ``body`` as JSON; True when the collector answered 2xx."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with _NO_PROXY.open(req, timeout=timeout_s) as resp:
            return 200 <= int(resp.status) < 300
    except (OSError, ValueError):
        return False


def any_value(v: Any) -> dict[str, Any]:
    """A Python value as an OTLP ``AnyValue``."""
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    if isinstance(v, Mapping):
        return {"kvlistValue": {"values": attributes(v.items())}}
    if isinstance(v, list | tuple):
        return {"arrayValue": {"values": [any_value(x) for x in v]}}
    return {"stringValue": "" if v is None else str(v)}


def attributes(pairs: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
    return [{"key": k, "value": any_value(v)} for k, v in pairs]


def _resource(service: str, mesh: str) -> dict[str, Any]:
    pairs = [("service.name", service)]
    if mesh:
        pairs.append(("kuma.mesh", mesh))
    return {"attributes": attributes(pairs)}


_SCOPE = {"name": "meshc"}


def logs_body(service: str, mesh: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """An ``ExportLogsServiceRequest`` for ``POST /v1/logs``: one resource (this data plane)."""
    return {
        "resourceLogs": [
            {"resource": _resource(service, mesh), "scopeLogs": [{"scope": _SCOPE, "logRecords": records}]}
        ]
    }


def traces_body(service: str, mesh: str, spans: list[dict[str, Any]]) -> dict[str, Any]:
    """An ``ExportTraceServiceRequest`` for ``POST /v1/traces``: one resource (this data plane)."""
    return {
        "resourceSpans": [
            {"resource": _resource(service, mesh), "scopeSpans": [{"scope": _SCOPE, "spans": spans}]}
        ]
    }
