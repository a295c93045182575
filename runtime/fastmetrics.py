"""Request metrics of both data paths: plain dicts on the hot path, Prometheus text on scrape.

``RequestStats.record`` (or ``Series.add`` on a series a connection keeps) costs a dict lookup
and three bisects; nothing touches prometheus-client until ``/metrics`` is scraped. One record
feeds two sets of families, so dashboards of either world read them unchanged:

* meshc's own: ``meshc_requests_total`` and ``meshc_request_duration_seconds`` (the control
  plane's traffic view reads these), now with ``reporter``, ``source_workload``,
  ``destination_workload``, ``destination_version`` and, on the histogram, ``response_code``;
* Istio's standard metrics: ``istio_requests_total``, ``istio_request_duration_milliseconds``,
  ``istio_request_bytes`` and ``istio_response_bytes`` with Istio's label set, so the Istio and
  Kiali Grafana dashboards work as they are.

meshc has no Kubernetes namespace: the mesh name stands in for it (``*_namespace``), a workload
is ``<service>-<version>`` (or the service when it has no version tag), principals are the
SPIFFE ids a mesh with mTLS issues, and what is not known on this side is ``unknown`` as in
Istio (a caller's version on the inbound side, for instance).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["BUCKETS", "BYTE_BUCKETS", "ISTIO_LABELS", "Identity", "RequestStats", "Series"]

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Latency buckets in seconds (rendered in milliseconds for the Istio histogram)."""

BYTE_BUCKETS = (1, 10, 100, 1000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000)
"""Istio's body-size buckets."""

ISTIO_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
"""Istio's standard label set, in its documented order."""

MESHC_LABELS = (
    "direction",
    "reporter",
    "source_service",
    "source_workload",
    "destination_service",
    "destination_subset",
    "destination_workload",
    "destination_version",
    "response_code",
)
_MAX_SERIES = 10_000
_N = len(BUCKETS) + 1  # duration counts, the last one +Inf
_NB = len(BYTE_BUCKETS) + 1
_SUM = _N
_REQ = _N + 1
_REQ_SUM = _REQ + _NB
_RESP = _REQ_SUM + 1
_RESP_SUM = _RESP + _NB
_LEN = _RESP_SUM + 1

_SeriesKey = tuple[str, str, str, str]


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


@dataclass
class Identity:
    """Who this data plane is: what its metrics say on their own side of each request."""

    service: str = ""
    mesh: str = "default"
    tags: Mapping[str, str] = field(default_factory=dict)
    mtls: bool = False
    """Whether the mesh runs mutual TLS (set when a mesh bundle is applied)."""

    @property
    def version(self) -> str:
        return self.tags.get("version", "unknown")

    def workload(self) -> str:
        return workload(self.service, self.tags.get("version"))


def workload(service: str, version: str | None) -> str:
    return f"{service}-{version}" if version else service


def _subset_version(subset: str) -> str | None:
    for part in subset.split(","):
        k, _, v = part.partition("=")
        if k == "version" and v:
            return v
    return None


class Series:
    """One (direction, source, destination, subset): per response code, the latency histogram
    and the request and response body-size histograms (with their sums)."""

    __slots__ = ("by_code",)

    def __init__(self) -> None:
        self.by_code: dict[int | tuple[int, int], list[float]] = {}
        """By response code, or (code, gRPC status) for a gRPC call."""

    def add(
        self, code: int, seconds: float, req_bytes: int = 0, resp_bytes: int = 0, grpc: int | None = None
    ) -> None:
        key: int | tuple[int, int] = code if grpc is None else (code, grpc)
        h = self.by_code.get(key)
        if h is None:
            h = self.by_code[key] = [0.0] * _LEN
        h[bisect_left(BUCKETS, seconds)] += 1
        h[_SUM] += seconds
        h[_REQ + bisect_left(BYTE_BUCKETS, req_bytes)] += 1
        h[_REQ_SUM] += req_bytes
        h[_RESP + bisect_left(BYTE_BUCKETS, resp_bytes)] += 1
        h[_RESP_SUM] += resp_bytes


class RequestStats(Collector):
    """Aggregated request counts and histograms, rendered in both vocabularies when collected."""

    def __init__(self, identity: Identity | None = None) -> None:
        self.series: dict[_SeriesKey, Series] = {}
        self.identity = identity or Identity()
        self._overflow = Series()

    def get(self, direction: str, source: str, dest: str, subset: str) -> Series:
        """The series for these labels (callers may keep it: it is the same object from then on)."""
        key = (direction, source, dest, subset)
        found = self.series.get(key)
        if found is None:
            if len(self.series) >= _MAX_SERIES:
                return self._overflow  # counted nowhere rather than without bound
            found = self.series[key] = Series()
        return found

    def record(
        self,
        direction: str,
        source: str,
        dest: str,
        subset: str,
        code: int,
        seconds: float,
        req_bytes: int = 0,
        resp_bytes: int = 0,
        grpc: int | None = None,
    ) -> None:
        """``grpc``: a gRPC call's status (the ``grpc_response_status`` label)."""
        self.get(direction, source, dest, subset).add(code, seconds, req_bytes, resp_bytes, grpc)

    # -- labels -----------------------------------------------------------------------------

    def _sides(self, direction: str, source: str, dest: str, subset: str) -> tuple[dict[str, str], str]:
        """The Istio labels of one series but the response code, and its reporter."""
        me = self.identity
        peer_version = _subset_version(subset)
        if direction == "inbound":
            reporter = "destination"
            src_wl, src_ver = workload(source, None), "unknown"
            dst_wl, dst_ver = me.workload(), me.version
        else:  # outbound and gateway: this data plane is the client
            reporter = "source"
            src_wl, src_ver = me.workload(), me.version
            dst_wl, dst_ver = workload(dest, peer_version), peer_version or "unknown"
        ns = me.mesh

        def principal(svc: str) -> str:
            return f"spiffe://{ns}/{svc}" if me.mtls and svc else "unknown"

        # the client side does not know the server's policy: Istio says "unknown" there
        security = ("mutual_tls" if me.mtls else "none") if reporter == "destination" else "unknown"
        labels = {
            "reporter": reporter,
            "source_workload": src_wl or "unknown",
            "source_workload_namespace": ns,
            "source_principal": principal(source),
            "source_app": source or "unknown",
            "source_version": src_ver,
            "source_canonical_service": source or "unknown",
            "source_canonical_revision": src_ver if src_ver != "unknown" else "latest",
            "source_cluster": "unknown",
            "destination_workload": dst_wl or "unknown",
            "destination_workload_namespace": ns,
            "destination_principal": principal(dest),
            "destination_app": dest or "unknown",
            "destination_version": dst_ver,
            "destination_service": f"{dest}.{ns}" if dest else "unknown",
            "destination_service_name": dest or "unknown",
            "destination_service_namespace": ns,
            "destination_canonical_service": dest or "unknown",
            "destination_canonical_revision": dst_ver if dst_ver != "unknown" else "latest",
            "destination_cluster": "unknown",
            "request_protocol": "http",
            "grpc_response_status": "",
            "response_flags": "-",
            "connection_security_policy": security,
        }
        return labels, reporter

    # -- rendering --------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        bounds = [*BUCKETS, float("inf")]
        ms_bounds = [b * 1000 for b in BUCKETS] + [float("inf")]
        byte_bounds = [float(b) for b in BYTE_BUCKETS] + [float("inf")]
        m_names, i_names = list(MESHC_LABELS), list(ISTIO_LABELS)
        requests = CounterMetricFamily("meshc_requests", _HELP["meshc_requests"], labels=m_names)
        duration = _histogram("meshc_request_duration_seconds", m_names)
        i_requests = CounterMetricFamily("istio_requests", _HELP["istio_requests"], labels=i_names)
        i_duration = _histogram("istio_request_duration_milliseconds", i_names)
        i_req_bytes = _histogram("istio_request_bytes", i_names)
        i_resp_bytes = _histogram("istio_response_bytes", i_names)
        for (d, src, dst, sub), series in sorted(self.series.items()):
            istio, reporter = self._sides(d, src, dst, sub)
            merged: dict[int, list[float]] = {}  # meshc's families have no gRPC label
            for key, h in series.by_code.items():
                code = key if isinstance(key, int) else key[0]
                into = merged.get(code)
                merged[code] = h if into is None else [a + b for a, b in zip(into, h, strict=True)]
            for code, h in sorted(merged.items()):
                count = float(sum(h[:_N]))
                own = [
                    d,
                    reporter,
                    src,
                    istio["source_workload"],
                    dst,
                    sub,
                    istio["destination_workload"],
                    istio["destination_version"],
                    str(code),
                ]
                requests.add_metric(own, count)
                duration.add_metric(own, _cumulative(bounds, h[:_N]), h[_SUM])
            for key, h in sorted(series.by_code.items(), key=_code_order):
                code, grpc = (key, "") if isinstance(key, int) else (key[0], str(key[1]))
                count = float(sum(h[:_N]))
                ilabels = [str(code) if k == "response_code" else istio[k] for k in ISTIO_LABELS]
                if grpc:
                    ilabels[_GRPC_LABEL] = grpc
                    ilabels[_PROTOCOL_LABEL] = "grpc"
                i_requests.add_metric(ilabels, count)
                i_duration.add_metric(ilabels, _cumulative(ms_bounds, h[:_N]), h[_SUM] * 1000)
                i_req_bytes.add_metric(ilabels, _cumulative(byte_bounds, h[_REQ:_REQ_SUM]), h[_REQ_SUM])
                i_resp_bytes.add_metric(ilabels, _cumulative(byte_bounds, h[_RESP:_RESP_SUM]), h[_RESP_SUM])
        yield from (requests, duration, i_requests, i_duration, i_req_bytes, i_resp_bytes)


_HELP = {
    "meshc_requests": "Requests answered, by source and destination service, subset and response code.",
    "meshc_request_duration_seconds": "Time from request received to response complete.",
    "istio_requests": "Requests handled by this proxy (Istio standard metric).",
    "istio_request_duration_milliseconds": "Request duration in milliseconds (Istio standard metric).",
    "istio_request_bytes": "HTTP request body sizes (Istio standard metric).",
    "istio_response_bytes": "HTTP response body sizes (Istio standard metric).",
}


_GRPC_LABEL = ISTIO_LABELS.index("grpc_response_status")
_PROTOCOL_LABEL = ISTIO_LABELS.index("request_protocol")


def _code_order(item: tuple[int | tuple[int, int], list[float]]) -> tuple[int, int]:
    key = item[0]
    return (key, -1) if isinstance(key, int) else key


def _histogram(name: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, _HELP[name], labels=labels)


def _cumulative(bounds: list[float], counts: list[float]) -> list[tuple[str, float]]:
    running = 0.0
    out: list[tuple[str, float]] = []
    for bound, c in zip(bounds, counts, strict=True):
        running += c
        out.append((_le(bound), running))
    return out
