"""A real gRPC server (grpcio) for the HTTP/2 tests, with raw-bytes messages (no protoc step).

``test.Echo``: ``Unary`` echoes; ``Stream`` streams ``n`` messages back; ``Collect`` joins a
client stream; ``Slow`` waits until the caller's deadline; ``Missing`` fails trailers-only with
NOT_FOUND; ``Flaky`` answers UNAVAILABLE to the first call of each key, then succeeds;
``Watch`` streams one message and then waits until the call is cancelled (``cancelled``).
Every server also serves the standard ``grpc.health.v1.Health`` (grpcio-health-checking):
``set_health`` changes what it answers for a service (``""``: the server as a whole).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "test.Echo"
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
"""The client talks to its sidecar directly, and never retries on its own (the mesh does)."""


class EchoServer:
    def __init__(self, name: str = "benigno", options: list[tuple[str, Any]] | None = None) -> None:
        self.name = name
        self.calls: Counter[str] = Counter()
        self.metadata: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.cancelled = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options or [])
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "Stream": grpc.unary_stream_rpc_method_handler(self._stream),
            "Collect": grpc.stream_unary_rpc_method_handler(self._collect),
            "Slow": grpc.unary_unary_rpc_method_handler(self._slow),
            "Missing": grpc.unary_unary_rpc_method_handler(self._missing),
            "Flaky": grpc.unary_unary_rpc_method_handler(self._flaky),
            "Watch": grpc.unary_stream_rpc_method_handler(self._watch),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.health = health.HealthServicer()
        self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _seen(self, method: str, context: Any) -> None:
        with self.lock:
            self.calls[method] += 1
            self.metadata.append(dict(context.invocation_metadata()))

    def _unary(self, request: bytes, context: Any) -> bytes:
        self._seen("Unary", context)
        return self.name.encode() + b":" + request

    def _stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        self._seen("Stream", context)
        for i in range(int(request)):
            yield b"%d:" % i + b"x" * 10_000

    def _collect(self, requests: Iterator[bytes], context: Any) -> bytes:
        self._seen("Collect", context)
        total = b"".join(requests)
        return b"%d" % len(total)

    def _slow(self, request: bytes, context: Any) -> bytes:
        self._seen("Slow", context)
        self.release.wait(30)
        return b"late"

    def _missing(self, request: bytes, context: Any) -> bytes:
        self._seen("Missing", context)
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        raise AssertionError("unreachable")

    def _flaky(self, request: bytes, context: Any) -> bytes:
        with self.lock:
            self.calls["Flaky:" + request.decode()] += 1
            first = self.calls["Flaky:" + request.decode()] == 1
        if first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return b"ok:" + request

    def _watch(self, request: bytes, context: Any) -> Iterator[bytes]:
        self._seen("Watch", context)
        context.add_callback(self.cancelled.set)  # runs when the call ends: here, by a reset
        yield b"first"
        self.cancelled.wait(30)

    def set_health(self, status: str, service: str = SERVICE) -> None:
        """``SERVING``, ``NOT_SERVING``, ``UNKNOWN``..., as the health service answers it."""
        self.health.set(service, health_pb2.HealthCheckResponse.ServingStatus.Value(status))

    def close(self) -> None:
        self.release.set()
        self.server.stop(0)


def method(channel: grpc.Channel, name: str, kind: str = "unary_unary") -> Any:
    """A raw-bytes stub for ``/test.Echo/<name>``."""
    factory = getattr(channel, kind)
    return factory(f"/{SERVICE}/{name}")
