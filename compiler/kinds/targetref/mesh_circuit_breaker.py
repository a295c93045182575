"""MeshCircuitBreaker: connection limits and outlier detection (ejecting failing endpoints).

Kuma's defaults: maxConnections, maxPendingRequests, maxRequests 1024, maxRetries 3;
outlierDetection.interval 10s, baseEjectionTime 30s, maxEjectionPercent 10.
A policy sets `to` (outbound), `from` (inbound) or `rules` (inbound, replacing `to` and `from`).

Inbound, the merged `connectionLimits` (for every caller, as Kuma's `MatchesAllIncomingTraffic`)
bound the requests in flight to the local app: past them the sidecar answers 503 at once (Envoy's
overflow, counted in `meshc_upstream_overflow`). Inbound `outlierDetection` is Kuma's outlier
detection of the inbound cluster, whose one host is the local app: the consecutive detectors
(totalFailures, gatewayFailures, localOriginFailures) eject it for baseEjectionTime times the
number of ejections (Envoy ejects one host whatever maxEjectionPercent says; counted in
`meshc_outlier_ejections`). With the app ejected none of the cluster is healthy, so under
healthyPanicThreshold (Envoy's default 50) panic routing still sends it every request: only
`healthyPanicThreshold: 0` makes an ejection fail requests fast (503 no healthy upstream) until it
ends. successRate and failurePercentage are not applied inbound (W3006).

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshCircuitBreaker
    metadata: {name: benigno-cb, labels: {kuma.io/mesh: default}}
    spec:
      to:
        - targetRef: {kind: MeshService, name: benigno}
          default:
            connectionLimits: {maxConnections: 2}
            outlierDetection: {detectors: {totalFailures: {consecutive: 3}}}

Invalid (outlier detection without detectors)::

    default: {outlierDetection: {interval: 5s}}
"""

from __future__ import annotations

from compiler.diagnostics import Path
from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    U32,
    Bool,
    Found,
    GoDuration,
    IntOrString,
    TargetRef,
    alias,
    at,
    decimal_of,
    duration_positive,
    int_positive,
    kind_def,
    percentage,
    target_ref,
)


class ConnectionLimits(Spec):
    max_connections: U32 | None = None
    """Connections to all endpoints of the destination (default 1024)."""
    max_connection_pools: U32 | None = None
    max_pending_requests: U32 | None = None
    """Requests queued while waiting for a connection (default 1024)."""
    max_retries: U32 | None = None
    """Retries in flight at once (default 3)."""
    max_requests: U32 | None = None
    """Requests in flight at once (default 1024)."""


class Consecutive(Spec):
    consecutive: U32 | None = None
    """Consecutive failures that eject an endpoint."""


class SuccessRate(Spec):
    minimum_hosts: U32 | None = None
    request_volume: U32 | None = None
    standard_deviation_factor: IntOrString | None = None


class FailurePercentage(Spec):
    minimum_hosts: U32 | None = None
    request_volume: U32 | None = None
    threshold: U32 | None = None


class Detectors(Spec):
    total_failures: Consecutive | None = None
    gateway_failures: Consecutive | None = None
    local_origin_failures: Consecutive | None = None
    success_rate: SuccessRate | None = None
    failure_percentage: FailurePercentage | None = None


class OutlierDetection(Spec):
    disabled: Bool | None = None
    interval: GoDuration | None = None
    """Time between ejection sweeps (default 10s)."""
    base_ejection_time: GoDuration | None = None
    """How long an endpoint stays ejected, times the number of ejections (default 30s)."""
    max_ejection_percent: U32 | None = None
    """The most endpoints that may be ejected, in percent (default 10)."""
    split_external_and_local_errors: Bool | None = None
    detectors: Detectors | None = None
    healthy_panic_threshold: IntOrString | None = None


class Conf(Spec):
    connection_limits: ConnectionLimits | None = None
    outlier_detection: OutlierDetection | None = None


class To(Spec):
    target_ref: TargetRef = TargetRef()
    default: Conf | None = None


class From(Spec):
    target_ref: TargetRef = TargetRef()
    default: Conf | None = None


class Rule(Spec):
    default: Conf | None = None


class MeshCircuitBreakerSpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    to: list[To] | None = None
    from_: list[From] | None = alias("from", "from_")
    rules: list[Rule] | None = None


_TOP = ("Mesh", "MeshSubset", "MeshService", "MeshGateway", "MeshServiceSubset", "Dataplane")
_DETECTORS = ("totalFailures", "gatewayFailures", "localOriginFailures", "successRate", "failurePercentage")


def _pct(path: Path, value: int | None) -> Found:
    if value is not None and value > 100:
        yield path, "must be in inclusive range [0, 100]"


def _outlier(path: Path, o: OutlierDetection) -> Found:
    yield from duration_positive((*path, "interval"), o.interval)
    yield from duration_positive((*path, "baseEjectionTime"), o.base_ejection_time)
    yield from _pct((*path, "maxEjectionPercent"), o.max_ejection_percent)
    yield from percentage((*path, "healthyPanicThreshold"), o.healthy_panic_threshold, required=False)
    dp: Path = (*path, "detectors")
    d = o.detectors
    if d is None:
        yield dp, "must be defined"
        return
    if all(
        x is None
        for x in (
            d.total_failures,
            d.gateway_failures,
            d.local_origin_failures,
            d.success_rate,
            d.failure_percentage,
        )
    ):
        yield dp, "must have at least one defined: " + ", ".join(_DETECTORS)
        return
    for f, c in (
        ("totalFailures", d.total_failures),
        ("gatewayFailures", d.gateway_failures),
        ("localOriginFailures", d.local_origin_failures),
    ):
        if c is not None:
            yield from int_positive((*dp, f, "consecutive"), c.consecutive)
    if (s := d.success_rate) is not None:
        yield from int_positive((*dp, "successRate", "minimumHosts"), s.minimum_hosts)
        yield from int_positive((*dp, "successRate", "requestVolume"), s.request_volume)
        if s.standard_deviation_factor is not None:
            dec = decimal_of(s.standard_deviation_factor)
            if dec is None:
                yield (*dp, "successRate", "standardDeviationFactor"), "invalid number"
            elif dec <= 0:
                yield (*dp, "successRate", "standardDeviationFactor"), "must be greater than 0"
    if (fp := d.failure_percentage) is not None:
        yield from int_positive((*dp, "failurePercentage", "minimumHosts"), fp.minimum_hosts)
        yield from int_positive((*dp, "failurePercentage", "requestVolume"), fp.request_volume)
        yield from _pct((*dp, "failurePercentage", "threshold"), fp.threshold)


def _default(path: Path, conf: Conf | None) -> Found:
    c = conf or Conf()
    if c.connection_limits is None and c.outlier_detection is None:
        yield path, "at least one of: 'connectionLimits' or 'outlierDetection' should be configured"
        return
    if (cl := c.connection_limits) is not None:
        for f, v in (
            ("maxConnections", cl.max_connections),
            ("maxConnectionPools", cl.max_connection_pools),
            ("maxPendingRequests", cl.max_pending_requests),
            ("maxRetries", cl.max_retries),
            ("maxRequests", cl.max_requests),
        ):
            yield from int_positive((*path, "connectionLimits", f), v)
    if c.outlier_detection is not None:
        yield from _outlier((*path, "outlierDetection"), c.outlier_detection)


def check(spec: MeshCircuitBreakerSpec) -> Found:
    to, frm, rules = spec.to or [], spec.from_ or [], spec.rules or []
    if spec.target_ref is not None:
        yield from at(
            ("targetRef",), target_ref(spec.target_ref, _TOP, gateway_tags=True, inbound=bool(rules or frm))
        )
    if not rules and not to and not frm:
        yield (), "at least one of 'from', 'to' or 'rules' has to be defined"
    if rules and (to or frm):
        yield (), "fields 'to' and 'from' must be empty when 'rules' is defined"
    for i, r in enumerate(rules):
        yield from _default(("rules", i, "default"), r.default)
    for i, f in enumerate(frm):
        yield from at(("from", i, "targetRef"), target_ref(f.target_ref, ("Mesh",)))
        yield from _default(("from", i, "default"), f.default)
    for i, t in enumerate(to):
        kinds = ("Mesh", "MeshService", "MeshExternalService", "MeshMultiZoneService")
        yield from at(("to", i, "targetRef"), target_ref(t.target_ref, kinds))
        yield from _default(("to", i, "default"), t.default)


KIND = kind_def("MeshCircuitBreaker", MeshCircuitBreakerSpec, check, __doc__ or "", compiled=True)
