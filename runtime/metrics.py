"""Prometheus metrics of one data plane.

Requests are counted by ``runtime.fastmetrics.RequestStats`` (``self.stats``), for both data
paths: ``meshc_requests_total`` / ``meshc_request_duration_seconds`` and Istio's standard
``istio_*`` families, rendered from plain counters on scrape. The rest (retries, ejections,
health checks, reloads, certificates...) are ordinary prometheus-client metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from runtime.accesslog import LogShipper
from runtime.fastmetrics import Identity, RequestStats
from runtime.zipkin import SpanReporter

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, identity: Identity | None = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.stats = RequestStats(identity)
        r.register(self.stats)
        self.spans = SpanReporter(r)
        """Sampled spans on their way to the tracing backend (every layer records here)."""
        self.logs = LogShipper(r)
        """Tcp and OpenTelemetry access log records on their way to collectors (every layer)."""
        self.retries = Counter(
            "meshc_retries", "Upstream retries.", ["destination_service", "destination_subset"], registry=r
        )
        self.ejections = Counter(
            "meshc_outlier_ejections",
            "Hosts ejected by outlier detection.",
            ["destination_service", "host"],
            registry=r,
        )
        self.health_checks = Counter(
            "meshc_health_checks",
            "Active health check results.",
            ["destination_service", "host", "result"],
            registry=r,
        )
        self.mirrors = Counter(
            "meshc_gateway_mirrors",
            "Copies of gateway requests sent to a mirror backend (the decision, before any I/O).",
            ["destination_service"],
            registry=r,
        )
        self.overflow = Counter(
            "meshc_upstream_overflow",
            "Requests refused at once by a connection limit.",
            ["destination_service"],
            registry=r,
        )
        self.tcp_connections = Counter(
            "meshc_tcp_connections",
            "TCP connections and CONNECT tunnels, by result (connected, connect_failure, refused).",
            ["direction", "source_service", "destination_service", "destination_subset", "result"],
            registry=r,
        )
        self.bundle_info = Gauge(
            "meshc_bundle_info", "The running bundle of each slot (value 1).", ["role", "digest"], registry=r
        )
        self.reloads = Counter(
            "meshc_reloads", "Pushes and loads by kind and result.", ["kind", "result"], registry=r
        )
        self.endpoints_generation = Gauge(
            "meshc_endpoints_generation", "Generation of the running endpoint set.", registry=r
        )
        self.inbound_connections = Counter(
            "meshc_inbound_connections",
            "Inbound connections by transport (mtls, plaintext) and result (accepted, refused, "
            "handshake_failed, no_certificate).",
            ["tls", "result"],
            registry=r,
        )
        self.certificate_expiry = Gauge(
            "meshc_certificate_expiry_timestamp_seconds",
            "When this data plane's mesh certificate expires (0: none yet).",
            registry=r,
        )
        self.certificate_rotations = Counter(
            "meshc_certificate_rotations",
            "Mesh certificates obtained (registration and renewals).",
            registry=r,
        )
        self.push_rejections = Counter(
            "meshc_push_rejections",
            "Pushes refused by the signature check (unsigned, bad_signature, untrusted, unregistered).",
            ["kind", "reason"],
            registry=r,
        )
        self.listener_refusals = Counter(
            "meshc_listener_refusals",
            "Client connections a listener closed under its limits (reason: max_connections, "
            "header_timeout, body_timeout).",
            ["listener", "reason"],
            registry=r,
        )
        self.push_bytes = Counter(
            "meshc_push_received_bytes",
            "Bytes of pushed bodies received on the admin API, by slot (endpoints, mesh, service).",
            ["slot"],
            registry=r,
        )
        self.pieces = Counter(
            "meshc_mesh_pieces",
            "Mesh pieces taken in, by how (pushed, fetched: on demand) and result (ok, failed).",
            ["how", "result"],
            registry=r,
        )
        self._digests: dict[str, str] = {}

    def set_bundle(self, role: str, digest: str) -> None:
        old = self._digests.get(role)
        if old == digest:
            return
        if old is not None:
            self.bundle_info.remove(role, old)
        self.bundle_info.labels(role, digest).set(1)
        self._digests[role] = digest

    def render(self) -> bytes:
        return generate_latest(self.registry)
