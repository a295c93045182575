"""Prometheus metrics of one data plane, Istio-style names and labels (DESIGN §7).

``meshc_requests_total{direction, source_service, destination_service, destination_subset,
response_code}`` counts every request a listener answered (``direction`` is ``outbound``,
``inbound`` or ``gateway``); ``meshc_request_duration_seconds`` is its latency histogram.
Labelled children are cached so recording a request costs two dict lookups.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "meshc_requests",
            "Requests answered, by source and destination service, subset and response code.",
            ["direction", "source_service", "destination_service", "destination_subset", "response_code"],
            registry=r,
        )
        self.duration = Histogram(
            "meshc_request_duration_seconds",
            "Time from request received to response complete.",
            ["direction", "source_service", "destination_service"],
            buckets=_BUCKETS,
            registry=r,
        )
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
            "Pushes refused by the signature check (unsigned, bad_signature, untrusted).",
            ["kind", "reason"],
            registry=r,
        )
        self._req_children: dict[tuple[str, str, str, str, int], MetricWrapperBase] = {}
        self._dur_children: dict[tuple[str, str, str], MetricWrapperBase] = {}
        self._digests: dict[str, str] = {}

    def request(self, direction: str, source: str, dest: str, subset: str, code: int, seconds: float) -> None:
        key = (direction, source, dest, subset, code)
        child = self._req_children.get(key)
        if child is None:
            if len(self._req_children) > 10_000:
                self._req_children.clear()
            child = self._req_children[key] = self.requests.labels(direction, source, dest, subset, str(code))
        child.inc()  # type: ignore[attr-defined]
        dkey = (direction, source, dest)
        hist = self._dur_children.get(dkey)
        if hist is None:
            if len(self._dur_children) > 10_000:
                self._dur_children.clear()
            hist = self._dur_children[dkey] = self.duration.labels(direction, source, dest)
        hist.observe(seconds)  # type: ignore[attr-defined]

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
