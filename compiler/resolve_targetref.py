"""Resolve targetRef policies into the same rule lists as the legacy kinds (issue 12, items 2-3).

Each ``to`` (outbound) or ``from`` (inbound) item of a policy names who it configures (the
top-level ``targetRef``: Mesh, MeshSubset, MeshService, MeshServiceSubset) and the other side (the
item's ``targetRef``). For every (source, destination) key a bundle looks up, the items that
cover it are put in Kuma's order (``compiler.precedence``) and their ``default`` confs merged,
lowest precedence first; the merged conf becomes one ``Entry`` per distinct set of tag
conditions, filed under the legacy kind that owns the same bundle field, so ``build`` writes
both dialects the same way. Their ranks sit above every legacy rank: where both dialects
configure a key, the targetRef policy wins (Kuma: a proxy matched by a new policy ignores the
old policy of its type), and W3005 says so.

Kuma 2.x inbound rules (``rules`` sections, and the ``from`` items of the kinds Kuma reads as
rules) of MeshTrafficPermission, MeshRateLimit, MeshFaultInjection, MeshTimeout,
MeshCircuitBreaker and MeshAccessLog go through ``compiler.resolve_inbound``: one rule per caller a
``spiffeID`` match covers, plus the rule for all callers, per service and instance tags. The last
three fill ``Inbound`` fields no legacy kind has (``resolve.TARGETREF_INBOUND``: their entries are
filed under the targetRef kind itself). A top-level Dataplane by ``labels`` selects the instances
whose tags carry them.

A MeshTimeout or MeshRetry whose top-level or ``to`` targetRef is a MeshHTTPRoute
(``_route_level``) is filed under ``route``: its conf goes on that route's rules (keyed by their
matches, as Kuma keys route-level rules by the hash of the matches), merged over the
destination's own MeshTimeout or MeshRetry (``_bases``), into each bundle rule's ``timeout`` and
``retry``. A Dataplane's ``labels`` are a sidecar's own (``--label``; ``b.LABEL_KEY`` conditions),
apart from its tags; by name and namespace it selects the sidecars whose ``kuma.io/display-name``
and ``k8s.kuma.io/namespace`` labels say so; its ``sectionName`` is the inbound's port; a Dataplane
and ``proxyTypes: [Sidecar]`` leave gateways out (a gateway resolves its own entry without them),
``proxyTypes: [Gateway]`` names the gateways.

Not resolved yet (W3006 at the place, saying what is not applied): a top-level MeshGateway (but
for MeshHTTPRoute, ``gateway_routes``), a MeshHTTPRoute for the other kinds (a bundle route has
no log, limit or load balancer of its own) or on a MeshGateway, what Kuma sets on the cluster
rather than on a route; a ``to`` item other than Mesh, MeshService or (MeshTimeout, MeshRetry)
MeshHTTPRoute; the MeshTimeout settings the sidecar does not carry out (http
maxConnectionDuration; inbound, idleTimeout on an HTTP service; outbound,
requestHeadersTimeout), inbound MeshCircuitBreaker successRate and failurePercentage detectors;
an ``sni`` match; a deny or a lifted limit that a broader bundle rule would still cover;
MeshHTTPRoute filters other than header modifiers and URL rewrites, query matches; log format
operators the data planes do not fill and OpenTelemetry ``backendRef``s
(``mesh_access_log.not_applied``); what the legacy load balancer has no place for (each kind's
``not_applied`` names it). W3007 where, as in Kuma, ``rules`` replace a MeshTrafficPermission's
or MeshFaultInjection's ``from``.

MeshTrace has no ``to``/``from``: ``index_tracing`` merges the policies that select every data
plane into the mesh bundle's ``tracing`` and those naming a service into that service's bundle.

Every merged rule keeps the items it was merged from (``Entry.merged``) so that ``meshc explain``
can say which policy set what, and which lost: provenance as data, nothing re-derived.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel

from compiler import resolve_inbound as rin
from compiler.diagnostics import Diagnostic, Loc, Path
from compiler.kinds import REGISTRY
from compiler.kinds.base import PROTOCOL_TAG, SERVICE_TAG, extra_tags
from compiler.kinds.fault_injection import bandwidth_bps
from compiler.kinds.mesh import mesh_settings, tracing_backend
from compiler.kinds.targetref import mesh_access_log as mal
from compiler.kinds.targetref import mesh_health_check as mhc
from compiler.kinds.targetref import mesh_load_balancing_strategy as mlbs
from compiler.kinds.targetref import mesh_retry as mre
from compiler.kinds.targetref import mesh_timeout as mto
from compiler.kinds.targetref import mesh_trace as mtr
from compiler.parse import Doc
from compiler.precedence import Ranked, in_order, merged, name_ties, policy_key, target_rank
from compiler.resolve import TARGETREF_INBOUND, Entry, PolicyIndex, Tracing
from runtime import bundle as b

__all__ = [
    "RESOLVED_KINDS",
    "TARGETREF_FIELDS",
    "allowed_services",
    "gateway_routes",
    "index_targetref",
    "index_tracing",
    "is_targetref",
    "legacy_shadowed",
]

Tags = tuple[tuple[str, str], ...]

_RANK_BASE = 1000
"""Above any legacy rank (a count of selector tags)."""


@dataclass(frozen=True)
class _Item:
    src: str
    dst: str
    when: Tags
    peer: Tags
    ranked: Ranked
    sidecars: bool = False
    """Sidecars only (``proxyTypes: [Sidecar]``, or a Dataplane targetRef, which never selects a
    gateway in Kuma): a gateway's own bundle entries are resolved without it."""


def _dump(m: BaseModel | None) -> dict[str, Any]:
    return m.model_dump(exclude_unset=True) if m is not None else {}


DISPLAY_NAME = "kuma.io/display-name"
NAMESPACE_TAG = "k8s.kuma.io/namespace"


def _top(tr: Any) -> tuple[str, Tags] | None:
    """The proxies a top-level targetRef selects: (service or ``*``, tag conditions).

    A meshc sidecar is Kuma's Dataplane resource, and its Dataplane labels are its own (a
    sidecar's ``--label``), apart from its tags, as Kuma reads a Dataplane targetRef's ``labels``
    against the resource's labels and a MeshSubset's ``tags`` against the inbound's tags: a
    Dataplane by ``labels`` selects the instances that carry them; by ``name`` (and
    ``namespace``), those whose ``kuma.io/display-name`` (and ``k8s.kuma.io/namespace``) label
    says so, the labels Kuma gives every Dataplane for its name and namespace (``b.LABEL_KEY``
    conditions); one without name, namespace or labels, every instance. ``proxyTypes`` and a
    Dataplane's ``sectionName`` are read by ``_proxy_type`` and ``_by_section``."""
    kind = tr.kind if tr is not None and tr.kind else "Mesh"
    if kind == "Mesh":
        return "*", ()
    tags = {k: v for k, v in (tr.tags or {}).items() if isinstance(v, str)}
    if kind == "MeshSubset":
        return tags.get(SERVICE_TAG, "*"), tuple(sorted(extra_tags(tags).items()))
    if kind == "MeshService" and tr.name:
        return tr.name, ()
    if kind == "MeshServiceSubset" and tr.name:
        return tr.name, tuple(sorted(extra_tags(tags).items()))
    if kind == "Dataplane":
        # Kuma: no name, namespace or labels selects every sidecar (``allDataplanesSelected``).
        labels = {k: v for k, v in (tr.labels or {}).items() if isinstance(v, str)}
        if tr.name:
            labels[DISPLAY_NAME] = tr.name
        if tr.namespace:
            labels[NAMESPACE_TAG] = tr.namespace
        return "*", tuple(sorted((b.LABEL_KEY + k, v) for k, v in labels.items()))
    return None


def _proxy_type(tr: Any) -> str:
    """``Sidecar`` or ``Gateway`` when a top-level targetRef selects one kind of proxy only, else
    ``""``: Mesh and MeshSubset by ``proxyTypes`` (Kuma's ``isSupportedProxyType``), a Dataplane
    always ``Sidecar`` (Kuma: a Dataplane targetRef never selects a built-in gateway)."""
    kind = tr.kind if tr is not None and tr.kind else "Mesh"
    if kind == "Dataplane":
        return "Sidecar"
    types = set(tr.proxy_types or ()) if tr is not None and kind in ("Mesh", "MeshSubset") else set()
    return next(iter(types)) if len(types) == 1 else ""


def _by_section(d: Doc, section: str, src: str, ports: dict[str, str], out: list[Diagnostic]) -> list[str]:
    """The services whose inbound a Dataplane's ``sectionName`` names: a meshc instance has one
    inbound, whose Kuma section name is its port (the catalog Service's, as a string; an inbound
    has no name of its own). W3006 when no selected service has that port."""
    found = [s for s, port in sorted(ports.items()) if port == section and src in ("*", s)]
    if not found:
        what = (
            f"a Dataplane sectionName {section!r} that names no inbound (a meshc instance's one "
            "inbound is named by its Service's port)"
        )
        out.append(_unresolved(d, what, ("targetRef", "sectionName")))
    return found


def _outbound_sources(
    d: Doc, src: str, proxy: str, gateways: set[str], out: list[Diagnostic]
) -> list[tuple[str, bool]]:
    """The sources a policy's ``to`` items configure, as (source, sidecars only): proxyTypes
    ``Gateway`` names each gateway it selects; ``Sidecar`` keeps the source but leaves gateways
    out (``_Item.sidecars``). W3006 when no proxy of that type is selected."""
    if proxy == "Gateway":
        found = [(g, False) for g in sorted(gateways) if src in ("*", g)]
        if not found and getattr(d.spec, "to", None):
            out.append(_unresolved(d, "proxyTypes [Gateway] that selects no gateway", ("targetRef",)))
        return found
    if proxy == "Sidecar":
        if src in gateways:
            if getattr(d.spec, "to", None):
                out.append(_unresolved(d, f"a Sidecar selection of the gateway {src}", ("targetRef",)))
            return []
        return [(src, src == "*" and bool(gateways))]
    return [(src, False)]


def _top_unresolved(d: Doc, tr: Any, kind: str, routes: set[str]) -> Diagnostic:
    """W3006 for a top-level targetRef ``_top`` does not resolve, saying what is not applied."""
    if kind == _ROUTE:
        missing = "" if tr.name in routes else f"; the repo has no MeshHTTPRoute {tr.name!r} either"
        what = (
            f"a top-level MeshHTTPRoute targetRef ({tr.name!r}): a bundle route has no "
            f"{_PER_ROUTE.get(d.kind, d.kind)} of its own, so the policy configures none of its rules"
            f"{missing}"
        )
        return _unresolved(d, what, ("targetRef", "kind"))
    return _unresolved(d, f"a top-level targetRef of kind {kind}", ("targetRef", "kind"))


_PER_ROUTE = {
    "MeshTimeout": "timeout",
    "MeshRetry": "retry policy",
    "MeshAccessLog": "access log",
    "MeshRateLimit": "rate limit",
    "MeshLoadBalancingStrategy": "load balancer",
}
"""What a policy targeting a MeshHTTPRoute sets on that route's rules in Kuma."""


def allowed_services(docs: Iterable[Doc]) -> set[str]:
    """The services (``*``: all) that some MeshTrafficPermission lets some caller into."""
    out = set()
    for d in docs:
        if d.kind != _PERMISSION:
            continue
        top = _top(d.spec.target_ref)
        if top is not None and (
            any(
                fr.default is not None and fr.default.action in ("Allow", "AllowWithShadowDeny")
                for fr in d.spec.from_ or ()
            )
            or any(
                r.default is not None and (r.default.allow or r.default.allow_with_shadow_deny)
                for r in d.spec.rules or ()
            )
        ):
            out.add(top[0])
    return out


def _peer(tr: Any) -> Tags | None:
    """The callers a ``from`` targetRef names, as the tags a permission's ``peer`` carries."""
    kind = tr.kind or "Mesh"
    tags = {k: v for k, v in (tr.tags or {}).items() if isinstance(v, str)}
    if kind == "Mesh":
        return ()
    if kind == "MeshSubset":
        pass
    elif kind in ("MeshService", "MeshServiceSubset") and tr.name:
        tags = {**(tags if kind == "MeshServiceSubset" else {}), SERVICE_TAG: tr.name}
    else:
        return None
    return tuple(sorted((k, v) for k, v in tags.items() if k != PROTOCOL_TAG and v != "*"))


def _dest(tr: Any) -> str | None:
    kind = tr.kind or "Mesh"
    if kind == "Mesh":
        return "*"
    if kind == "MeshService" and tr.name:
        return str(tr.name)
    return None


# --- merged default -> bundle conf ------------------------------------------------------------


def _g(m: dict[str, Any], *path: str, default: Any = None) -> Any:
    for p in path:
        if not isinstance(m, dict) or m.get(p) is None:
            return default
        m = m[p]
    return m


def _timeout(m: dict[str, Any]) -> b.TimeoutConf:
    d = b.TimeoutConf()
    idle = _g(m, "idle_timeout")
    return b.TimeoutConf(
        connect_timeout_ms=_g(m, "connection_timeout", default=d.connect_timeout_ms),
        tcp_idle_timeout_ms=d.tcp_idle_timeout_ms if idle is None else idle,
        http_request_timeout_ms=_g(m, "http", "request_timeout", default=d.http_request_timeout_ms),
        http_idle_timeout_ms=d.http_idle_timeout_ms if idle is None else idle,
        http_stream_idle_timeout_ms=_g(
            m, "http", "stream_idle_timeout", default=d.http_stream_idle_timeout_ms
        ),
        http_max_stream_duration_ms=_g(
            m, "http", "max_stream_duration", default=d.http_max_stream_duration_ms
        ),
        http_max_connection_duration_ms=_g(m, "http", "max_connection_duration", default=0),
        http_request_headers_timeout_ms=_g(m, "http", "request_headers_timeout", default=0),
    )


def _snake(word: str) -> str:
    """``GatewayError`` -> ``gateway_error``, ``Retriable4xx`` -> ``retriable_4xx``."""
    out = ""
    for i, ch in enumerate(word):
        if (ch.isupper() and i) or (ch.isdigit() and i and not word[i - 1].isdigit()):
            out += "_"
        out += ch.lower()
    return out


_GRPC_ON = {"Canceled": "cancelled"}


def _http_retry(m: dict[str, Any], grpc: bool) -> b.HttpRetry:
    back = None
    base = _g(m, "back_off", "base_interval")
    if isinstance(m.get("back_off"), dict):
        base = 25 if base is None else base
        back = b.BackOff(
            base_interval_ms=base, max_interval_ms=_g(m, "back_off", "max_interval", default=base * 10)
        )
    codes, on = [], []
    for r in m.get("retry_on") or ():
        if r.isdigit():
            codes.append(int(r))
        else:
            on.append(_GRPC_ON.get(r, _snake(r)) if grpc else ("5xx" if r == "5XX" else _snake(r)))
    if codes:
        on.append("retriable_status_codes")
    return b.HttpRetry(
        num_retries=_g(m, "num_retries", default=1),
        per_try_timeout_ms=_g(m, "per_try_timeout", default=0),
        back_off=back,
        retriable_status_codes=tuple(codes),
        retry_on=tuple(on),
    )


def _retry(m: dict[str, Any]) -> b.RetryConf:
    tcp = _g(m, "tcp", "max_connect_attempt")
    return b.RetryConf(
        http=_http_retry(m["http"], False) if isinstance(m.get("http"), dict) else None,
        grpc=_http_retry(m["grpc"], True) if isinstance(m.get("grpc"), dict) else None,
        tcp=b.TcpRetry(max_connect_attempts=tcp) if tcp is not None else None,
    )


def _consecutive(m: dict[str, Any], name: str) -> b.Consecutive | None:
    if not isinstance(m.get(name), dict):
        return None
    return b.Consecutive(consecutive=_g(m, name, "consecutive", default=5))


def _circuit_breaker(m: dict[str, Any]) -> b.CircuitBreakerConf:
    d = b.CircuitBreakerConf()
    od = m.get("outlier_detection") or {}
    limits = m.get("connection_limits") or {}
    det = {} if od.get("disabled") else od.get("detectors") or {}
    sr, fp = det.get("success_rate"), det.get("failure_percentage")
    return b.CircuitBreakerConf(
        interval_ms=_g(od, "interval", default=d.interval_ms),
        base_ejection_time_ms=_g(od, "base_ejection_time", default=d.base_ejection_time_ms),
        max_ejection_percent=_g(od, "max_ejection_percent", default=d.max_ejection_percent),
        split_external_and_local_errors=bool(od.get("split_external_and_local_errors")),
        thresholds=b.Thresholds(
            max_connections=_g(limits, "max_connections", default=1024),
            max_pending_requests=_g(limits, "max_pending_requests", default=1024),
            max_requests=_g(limits, "max_requests", default=1024),
            max_retries=_g(limits, "max_retries", default=3),
        ),
        detectors=b.Detectors(
            total_errors=_consecutive(det, "total_failures"),
            gateway_errors=_consecutive(det, "gateway_failures"),
            local_errors=_consecutive(det, "local_origin_failures"),
            standard_deviation=None
            if not isinstance(sr, dict)
            else b.StandardDeviation(
                request_volume=_g(sr, "request_volume", default=100),
                minimum_hosts=_g(sr, "minimum_hosts", default=5),
                factor=float(_g(sr, "standard_deviation_factor", default=1.9)),
            ),
            failure=None
            if not isinstance(fp, dict)
            else b.FailurePercentage(
                request_volume=_g(fp, "request_volume", default=50),
                minimum_hosts=_g(fp, "minimum_hosts", default=5),
                threshold=_g(fp, "threshold", default=85),
            ),
        ),
        # An IntOrString percentage: 0 to 100, "12.5" too.
        healthy_panic_threshold=None
        if od.get("healthy_panic_threshold") is None
        else _percent(str(od["healthy_panic_threshold"])),
    )


def _header_changes(mod: dict[str, Any] | None) -> tuple[b.HeaderChange, ...]:
    mod = mod or {}
    return (
        *(b.HeaderChange(name=h["name"], value=h["value"]) for h in mod.get("set") or ()),
        *(b.HeaderChange(name=h["name"], value=h["value"], append=True) for h in mod.get("add") or ()),
    )


def _health_check(m: dict[str, Any]) -> b.HealthCheckConf:
    http, tcp, grpc = m.get("http"), m.get("tcp"), m.get("grpc")
    return b.HealthCheckConf(
        interval_ms=_g(m, "interval", default=60000),
        timeout_ms=_g(m, "timeout", default=15000),
        unhealthy_threshold=_g(m, "unhealthy_threshold", default=5),
        healthy_threshold=_g(m, "healthy_threshold", default=1),
        initial_jitter_ms=_g(m, "initial_jitter", default=0),
        interval_jitter_ms=_g(m, "interval_jitter", default=0),
        interval_jitter_percent=_g(m, "interval_jitter_percent", default=0),
        healthy_panic_threshold=float(_g(m, "healthy_panic_threshold", default=50.0)),
        fail_traffic_on_panic=bool(m.get("fail_traffic_on_panic")),
        no_traffic_interval_ms=_g(m, "no_traffic_interval", default=60000),
        reuse_connection=_g(m, "reuse_connection", default=True),
        http=None
        if not isinstance(http, dict) or http.get("disabled")
        else b.HttpHealthCheck(
            path=http.get("path") or "/",
            request_headers=_header_changes(http.get("request_headers_to_add")),
            expected_statuses=tuple(http.get("expected_statuses") or ()),
        ),
        tcp=None
        if not isinstance(tcp, dict) or tcp.get("disabled")
        else b.TcpHealthCheck(send=tcp.get("send"), receive=tuple(tcp.get("receive") or ())),
        grpc=None
        if not isinstance(grpc, dict) or grpc.get("disabled")
        else b.GrpcHealthCheck(
            service_name=grpc.get("service_name") or "", authority=grpc.get("authority") or None
        ),
    )


@dataclass(frozen=True)
class _Outbound:
    field: str
    convert: Callable[[dict[str, Any]], BaseModel | None]


_OUTBOUND: dict[str, _Outbound] = {
    "MeshTimeout": _Outbound("timeout", _timeout),
    "MeshRetry": _Outbound("retry", _retry),
    "MeshCircuitBreaker": _Outbound("circuit_breaker", _circuit_breaker),
    "MeshHealthCheck": _Outbound("health_check", _health_check),
    "MeshAccessLog": _Outbound("traffic_log", mal.traffic_log),
}


def _percent(value: Any) -> float:
    return float(value or 0)


def _fault(m: dict[str, Any]) -> b.FaultInjectionConf | None:
    """Kuma's list of faults as the bundle's one delay, abort and bandwidth limit (None: a
    list with two of one kind, which the bundle cannot hold)."""
    found: dict[str, dict[str, Any]] = {}
    for fault in m.get("http") or ():
        for key, value in (fault or {}).items():
            if value is None:
                continue
            if key in found:
                return None
            found[key] = value
    delay, abort, bw = found.get("delay"), found.get("abort"), found.get("response_bandwidth")
    try:
        limit_bps = bandwidth_bps(bw.get("limit") or "0kbps") if bw else 0
    except ValueError:
        return None
    return b.FaultInjectionConf(
        delay=b.FaultDelay(percentage=_percent(delay.get("percentage")), value_ms=delay.get("value") or 0)
        if delay
        else None,
        abort=b.FaultAbort(
            percentage=_percent(abort.get("percentage")), http_status=abort.get("http_status") or 503
        )
        if abort
        else None,
        response_bandwidth=b.FaultBandwidth(percentage=_percent(bw.get("percentage")), limit_bps=limit_bps)
        if bw
        else None,
    )


def _rate_limit(m: dict[str, Any]) -> b.RateLimitConf | None:
    """The local HTTP limit; an empty conf (no rate, or disabled) adds no rule."""
    http = _g(m, "local", "http") or {}
    rate = http.get("request_rate")
    if http.get("disabled") or not rate:
        return b.RateLimitConf(requests=0, interval_ms=0)
    on = http.get("on_rate_limit") or {}
    mod = on.get("headers") or {}
    headers = [
        b.HeaderChange(name=h.get("name") or "", value=h.get("value") or "", append=append)
        for append, key in ((False, "set"), (True, "add"))
        for h in mod.get(key) or ()
    ]
    return b.RateLimitConf(
        requests=rate.get("num") or 1,
        interval_ms=rate.get("interval") or 1000,
        status=on.get("status") or 429,
        headers=tuple(headers),
    )


_INBOUND: dict[str, _Outbound] = {
    "MeshFaultInjection": _Outbound("fault_injection", _fault),
    "MeshRateLimit": _Outbound("rate_limit", _rate_limit),
}
"""The inbound kinds that take a ``from`` list, as permissions do (merged per caller)."""
_NO_RULE = (b.FaultInjectionConf(), b.RateLimitConf(requests=0, interval_ms=0))
_PERMISSION = "MeshTrafficPermission"
_ROUTE = "MeshHTTPRoute"
_TCP_ROUTE = "MeshTCPRoute"
_LB = "MeshLoadBalancingStrategy"
_LOG = "MeshAccessLog"
TARGETREF_FIELDS = {
    **{k: v.field for k, v in {**_OUTBOUND, **_INBOUND}.items()},
    _PERMISSION: "permissions",
    _ROUTE: "route",
    _TCP_ROUTE: "route",
    _LB: "route",
}
"""The targetRef kinds this module compiles, and the bundle field each fills. Three fill ``route``,
each under its own key of the merged patch (so they never override one another): MeshHTTPRoute
``rules``, MeshTCPRoute ``tcp``, MeshLoadBalancingStrategy ``load_balancing``."""

_TRACE = "MeshTrace"
RESOLVED_KINDS = frozenset({*TARGETREF_FIELDS, _TRACE})
"""Every kind ``index_targetref`` resolves: merged across documents, so a change to one of them
rebuilds every bundle of its mesh. MeshTrace fills the bundles' ``tracing`` (``index_tracing``)."""


# --- MeshHTTPRoute ----------------------------------------------------------------------------

_PATH_KIND = {"Exact": "exact", "PathPrefix": "prefix", "RegularExpression": "regex"}
_HEADER_KIND = {"": "exact", "Exact": "exact", "Prefix": "prefix", "RegularExpression": "regex"}


def _backends(refs: list[dict[str, Any]] | None, dst: str) -> tuple[b.Split, ...]:
    if not refs:
        return (b.Split(weight=100, service=dst),)
    out = []
    for r in refs:
        tags = r.get("tags") or {} if r.get("kind") == "MeshServiceSubset" else {}
        out.append(b.Split(weight=_g(r, "weight", default=1), service=r.get("name") or dst, tags=tags))
    return tuple(out)


def _http_match(match: dict[str, Any]) -> b.HttpMatch | None:
    """A rule's match in the bundle's terms; None when it uses what the bundle cannot express."""
    if match.get("query_params"):
        return None
    path = match.get("path")
    sm_path = None
    if isinstance(path, dict):
        kind = _PATH_KIND.get(path.get("type") or "PathPrefix")
        if kind is None:
            return None
        sm_path = b.StringMatch(kind=kind, value=path.get("value") or "/")
    headers = []
    for h in match.get("headers") or ():
        hk = _HEADER_KIND.get(h.get("type") or "")
        if hk is None:
            return None
        headers.append((str(h.get("name", "")).lower(), b.StringMatch(kind=hk, value=h.get("value", ""))))
    method = match.get("method")
    return b.HttpMatch(
        method=b.StringMatch(kind="exact", value=method) if method else None,
        path=sm_path,
        headers=tuple(sorted(headers)),
    )


def _modify(filters: list[dict[str, Any]] | None) -> b.HttpModify | bool | None:
    """The filters as a bundle rewrite; False when one cannot be expressed."""
    if not filters:
        return None
    req: list[b.HeaderChange] = []
    resp: list[b.HeaderChange] = []
    req_rm: list[str] = []
    resp_rm: list[str] = []
    path = host = None
    for f in filters:
        t = f.get("type")
        if t == "RequestHeaderModifier":
            req += _header_changes(f.get("request_header_modifier"))
            req_rm += (f.get("request_header_modifier") or {}).get("remove") or []
        elif t == "ResponseHeaderModifier":
            resp += _header_changes(f.get("response_header_modifier"))
            resp_rm += (f.get("response_header_modifier") or {}).get("remove") or []
        elif t == "URLRewrite":
            rw = f.get("url_rewrite") or {}
            p = rw.get("path") or {}
            if p.get("type") == "ReplacePrefixMatch":
                path = b.PathRewrite(prefix=p.get("replace_prefix_match"))
            elif p:
                return False
            if rw.get("hostname"):
                host = b.HostRewrite(value=rw["hostname"])
        else:
            return False
    return b.HttpModify(
        path=path,
        host=host,
        request_headers=b.HeaderOps(add=tuple(req), remove=tuple(req_rm)),
        response_headers=b.HeaderOps(add=tuple(resp), remove=tuple(resp_rm)),
    )


def _catch_all(matches: list[dict[str, Any]]) -> bool:
    return matches == [{"path": {"type": "PathPrefix", "value": "/"}}] or not matches


def _route_of(
    m: dict[str, Any], dst: str, real: set[str], bases: dict[str, dict[str, Any]]
) -> b.RouteConf | None:
    """The merged route patch: MeshHTTPRoute rules (they beat a MeshTCPRoute, as in Kuma), else the
    MeshTCPRoute's split, with the MeshLoadBalancingStrategy's load balancer. ``real``: the rule
    keys some MeshHTTPRoute wrote (a route-level policy's patch of another rule is dropped);
    ``bases``: the destination's merged MeshTimeout and MeshRetry, under route-level ones."""
    rules = {k: v for k, v in (m.get("rules") or {}).items() if k in real}
    conf = _route(rules, dst, bases)
    if conf is None:
        return None
    tcp = m.get("tcp")
    if not rules and isinstance(tcp, dict):
        conf = b.RouteConf(split=_backends(tcp.get("backend_refs"), dst))
    lb = m.get("load_balancing")
    if isinstance(lb, dict):
        conf = conf.model_copy(update={"load_balancer": mlbs.load_balancer(lb)})
    return conf


def _route(
    rules: dict[str, dict[str, Any]], dst: str, bases: dict[str, dict[str, Any]]
) -> b.RouteConf | None:
    """Rules merged by their ``matches`` (JSON key) -> a RouteConf; a ``/`` prefix is the default
    (one with a route-level timeout or retry is also the last ``http`` entry, which carries them)."""
    split: tuple[b.Split, ...] = (b.Split(weight=100, service=dst),)
    http = []
    tail: list[b.HttpRoute] = []
    for key, conf in rules.items():
        matches = json.loads(key)
        modify = _modify(conf.get("filters"))
        if modify is False:
            return None
        targets = _backends(conf.get("backend_refs"), dst)
        own = _route_policies(conf, bases)
        if _catch_all(matches) and modify is None:
            split = targets
            if own:
                every = b.HttpMatch(path=b.StringMatch(kind="prefix", value="/"))
                tail.append(b.HttpRoute(match=every, split=targets, **own))
            continue
        for m in matches or [{}]:
            hm = _http_match(m)
            if hm is None:
                return None
            route = b.HttpRoute(match=hm, modify=modify or None, split=targets, **own)
            http.append((_route_order(m), route))
    http.sort(key=lambda x: x[0])
    return b.RouteConf(split=split, http=(*(r for _, r in http), *tail))


def _route_policies(conf: dict[str, Any], bases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A rule's route-level MeshTimeout and MeshRetry (``_route_level``) merged over the
    destination's own (Kuma: a MeshHTTPRoute is more specific than its MeshService)."""
    out: dict[str, Any] = {}
    if isinstance(conf.get("timeout"), dict):
        out["timeout"] = _timeout(merged((bases.get("timeout") or {}, conf["timeout"])))
    if isinstance(conf.get("retry"), dict):
        out["retry"] = _retry(merged((bases.get("retry") or {}, conf["retry"])))
    return out


def _route_order(m: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """Gateway API precedence: Exact, then the longest prefix, then regex; method; headers; query."""
    p = m.get("path") or {}
    t = {"Exact": 0, "PathPrefix": 1, "RegularExpression": 2}.get(p.get("type") or "PathPrefix", 3)
    return (t, -len(p.get("value") or ""), 0 if m.get("method") else 1, -len(m.get("headers") or ()), 0)


# --- indexing -----------------------------------------------------------------------------------

_LEGACY_KIND = {d.bundle_field: k for k, d in REGISTRY.items() if d.indexed}
"""Bundle field -> the legacy kind whose table ``build`` reads for it."""


def _unresolved(d: Doc, what: str, path: Path) -> Diagnostic:
    msg = f"meshc does not resolve {what} of a {d.kind} yet: it has no effect"
    return Diagnostic("W3006", msg, d.loc(path))


_INBOUND_ONLY = {kind: field for field, kind in TARGETREF_INBOUND.items()}
"""Kinds whose inbound rules fill an ``Inbound`` field no legacy kind has (filed under themselves)."""
_RULES_RESOLVED = (_PERMISSION, "MeshRateLimit", "MeshFaultInjection", *sorted(_INBOUND_ONLY))
"""Kinds whose inbound rules ``compiler.resolve_inbound`` compiles."""
_TIMEOUT_NOT_APPLIED = {"max_connection_duration": "maxConnectionDuration"}
"""MeshTimeout ``http`` settings meshc's inbound does not carry out (``mesh_timeout`` says what
it does)."""


def _inbound_not_applied(d: Doc, section: str, out: list[Diagnostic]) -> None:
    """W3006 at each setting of an inbound rule (``rules`` or ``from`` item) that a bundle's
    inbound holds but the sidecar does not carry out, saying which."""
    for i, item in enumerate(getattr(d.spec, "from_" if section == "from" else section) or ()):
        m = _dump(item.default)
        where: Path = (section, i, "default")
        if d.kind == "MeshTimeout":
            for key, name in _TIMEOUT_NOT_APPLIED.items():
                if _g(m, "http", key) is not None:
                    what = (
                        f"the inbound http.{name} (the sidecar's connections to its app are not "
                        "retired by age)"
                    )
                    out.append(_unresolved(d, what, (*where, "http", name)))
        elif d.kind == "MeshCircuitBreaker":
            det = _g(m, "outlier_detection", "detectors") or {}
            for key, name in (("success_rate", "successRate"), ("failure_percentage", "failurePercentage")):
                if det.get(key) is not None:
                    what = (
                        f"the inbound outlierDetection.detectors.{name} (meshc runs the consecutive "
                        "detectors; a success rate, compared across hosts, never ejects the app alone)"
                    )
                    out.append(_unresolved(d, what, (*where, "outlierDetection", "detectors", name)))
        elif d.kind == _LOG:
            for path, what in mal.not_applied(item.default):
                out.append(_unresolved(d, what, (*where, *path)))


def _idle_on_http(rules: list[rin.InboundRule], http: set[str], out: list[Diagnostic]) -> None:
    """W3006 at an inbound idleTimeout that selects an HTTP service: the sidecar applies it to a
    TCP service's connections only (its pooled connections to an HTTP app keep their own)."""
    for r in rules:
        if r.ranked.default.get("idle_timeout") is None:
            continue
        hit = sorted(http) if r.dst == "*" else [r.dst] if r.dst in http else []
        if hit:
            d = r.ranked.policy
            what = (
                f"the inbound idleTimeout of the HTTP service {hit[0]} (the sidecar applies it to a TCP "
                "service's connections only)"
            )
            _once(out, _unresolved(d, what, (*r.ranked.where[:2], "default", "idleTimeout")))


def _log_backends(m: dict[str, Any]) -> list[BaseModel]:
    """An inbound rule's ``default`` as one log conf per backend (they all log)."""
    return [b.TrafficLogConf(backend=x) for x in mal.bundle_backends(m)]


def _items(
    docs: Iterable[Doc], out: list[Diagnostic]
) -> tuple[dict[str, list[_Item]], dict[str, list[rin.InboundRule]]]:
    """Every resolvable ``to``/``from`` item, by bundle field; and Kuma's inbound rules by kind."""
    by_field: dict[str, list[_Item]] = defaultdict(list)
    rules: dict[str, list[rin.InboundRule]] = defaultdict(list)
    docs = list(docs)
    routes = {d.name for d in docs if d.kind == _ROUTE}
    route_docs = [d for d in docs if d.kind == _ROUTE]
    gateways = _gateways(docs)
    ports = {d.name: str(d.spec.port) for d in docs if d.kind == "Service"}
    for d in docs:
        field = TARGETREF_FIELDS.get(d.kind)
        if field is None:
            continue
        spec = d.spec
        if d.kind == _ROUTE and spec.target_ref is not None and spec.target_ref.kind == "MeshGateway":
            continue  # a gateway route: ``gateway_routes``
        top = _top(spec.target_ref)
        top_kind = spec.target_ref.kind if spec.target_ref is not None and spec.target_ref.kind else "Mesh"
        if top is None and top_kind == _ROUTE and d.kind in _ROUTE_LEVEL:
            key = policy_key(top_kind, dict(d.labels), d.name)
            found = _routes_of(d, spec.target_ref, ("targetRef",), route_docs, out)
            for i, to in enumerate(spec.to or ()):
                if (to.target_ref.kind or "Mesh") != "Mesh":
                    what = f"a `to` targetRef of kind {to.target_ref.kind}"
                    out.append(_unresolved(d, what, ("to", i, "targetRef", "kind")))
                    continue
                by_field["route"].extend(_route_level(d, i, to, key, top_kind, None, found, out))
            continue
        if top is None:
            out.append(_top_unresolved(d, spec.target_ref, top_kind, routes))
            continue
        src, when = top
        key = policy_key(top_kind, dict(d.labels), d.name)
        proxy = _proxy_type(spec.target_ref)
        has_rules = bool(getattr(spec, "rules", None))
        from_as_rules = d.kind in rin.FROM_AS_RULES and bool(getattr(spec, "from_", None))
        inbound = has_rules or bool(getattr(spec, "from_", None))
        inbound_srcs = [src]
        if inbound and top_kind == "Dataplane" and spec.target_ref.section_name:
            inbound_srcs = _by_section(d, spec.target_ref.section_name, src, ports, out)
        if inbound and proxy == "Gateway":
            what = "proxyTypes [Gateway] on inbound traffic (a meshc gateway has no inbound)"
            out.append(_unresolved(d, what, ("targetRef", "proxyTypes")))
            inbound_srcs = []
        if has_rules or from_as_rules:
            section = "rules" if has_rules else "from"
            for s in inbound_srcs:
                rules[d.kind].extend(rin.rule_items(d, s, when, key, top_kind, section))
            if d.kind in _INBOUND_ONLY:
                _inbound_not_applied(d, section, out)
        if d.kind == _PERMISSION or d.kind in _INBOUND:
            if d.kind in rin.FROM_AS_RULES:
                continue  # its `from` items are rules
            for i, fr in enumerate(spec.from_ or ()):
                peer = _peer(fr.target_ref)
                if peer is None:
                    what = f"a `from` targetRef of kind {fr.target_ref.kind}"
                    out.append(_unresolved(d, what, ("from", i, "targetRef", "kind")))
                    continue
                item_kind = fr.target_ref.kind or "Mesh"
                r = Ranked(
                    key, target_rank(item_kind), _dump(fr.default), d, ("from", i), (top_kind, item_kind)
                )
                by_field[field].extend(_Item("*", s, when, peer, r) for s in inbound_srcs)
            continue
        sources = _outbound_sources(d, src, proxy, gateways, out)
        for i, to in enumerate(spec.to or ()):
            if to.target_ref.kind == _ROUTE and d.kind in _ROUTE_LEVEL:
                found = _routes_of(d, to.target_ref, ("to", i, "targetRef"), route_docs, out)
                for s, sidecars in sources:
                    made = _route_level(d, i, to, key, top_kind, (s, when), found, out)
                    by_field["route"].extend(replace(it, sidecars=sidecars) for it in made)
                continue
            dst = _dest(to.target_ref)
            if dst is None:
                what = f"a `to` targetRef of kind {to.target_ref.kind}"
                out.append(_unresolved(d, what, ("to", i, "targetRef", "kind")))
                continue
            default = _to_default(d, i, to, out)
            item_kind = to.target_ref.kind or "Mesh"
            r = Ranked(key, target_rank(item_kind), default, d, ("to", i), (top_kind, item_kind))
            by_field[field].extend(_Item(s, dst, when, (), r, sidecars) for s, sidecars in sources)
    return by_field, rules


def _gateways(docs: Iterable[Doc]) -> set[str]:
    """The gateways' services (a MeshGateway's ``kuma.io/service`` selectors)."""
    return {
        name
        for d in docs
        if d.kind == "MeshGateway"
        for sel in d.spec.selectors or ()
        if isinstance(name := (sel.match or {}).get(SERVICE_TAG), str) and name not in ("", "*")
    }


_GW = "MeshGateway"
_ROUTE_LEVEL = {"MeshTimeout": "timeout", "MeshRetry": "retry"}
"""Kinds whose confs a MeshHTTPRoute's rules carry (top-level or ``to`` targetRef MeshHTTPRoute),
and the key each is filed under in a rule of the route patch."""
_PER_RULE = {"MeshTimeout": mto.PER_ROUTE, "MeshRetry": mre.PER_ROUTE}
"""What a route-level conf sets on a route rule (each kind's module says); the rest stays the
destination cluster's."""


def _routes_of(d: Doc, ref: Any, at: Path, route_docs: list[Doc], out: list[Diagnostic]) -> list[Doc]:
    """The MeshHTTPRoutes a targetRef names (by name, or by their labels), not those on a
    MeshGateway (a gateway rule has no timeout or retry of its own): W3006 when none is left."""
    if ref.name:
        found = [r for r in route_docs if r.name == ref.name]
    else:
        want = {k: v for k, v in (ref.labels or {}).items() if isinstance(v, str)}
        found = [r for r in route_docs if want and want.items() <= dict(r.labels).items()]
    on_gateway = [r for r in found if r.spec.target_ref is not None and r.spec.target_ref.kind == _GW]
    which = f"{ref.name!r}" if ref.name else f"with labels {dict(ref.labels or {})}"
    if on_gateway:
        what = (
            f"a MeshHTTPRoute {which} on a MeshGateway (a gateway rule has no {_ROUTE_LEVEL[d.kind]} "
            "of its own)"
        )
        out.append(_unresolved(d, what, at))
    elif not found:
        out.append(_unresolved(d, f"a MeshHTTPRoute {which} that the mesh does not have", at))
    return [r for r in found if r not in on_gateway]


def _route_level(
    d: Doc,
    i: int,
    to: Any,
    key: tuple[int, int, int, str],
    top_kind: str,
    selected: tuple[str, Tags] | None,
    found: list[Doc],
    out: list[Diagnostic],
) -> list[_Item]:
    """A MeshTimeout's or MeshRetry's ``to`` item as route-field items: one per ``to`` item of
    each MeshHTTPRoute it targets, whose ``default`` sets the conf on that item's rules (keyed by
    their matches, as Kuma keys route-level rules by the hash of the matches), on the proxies
    ``selected`` (None: those the route selects, for a top-level MeshHTTPRoute). W3006 at each
    setting Kuma applies to the cluster rather than to the route."""
    m = _dump(to.default)
    patch: dict[str, Any] = {}
    for path in _PER_RULE[d.kind]:
        value = _g(m, *path)
        if value is not None:
            at = patch
            for seg in path[:-1]:
                at = at.setdefault(seg, {})
            at[path[-1]] = value
    for path in _leaf_paths(m):
        if not any(path[: len(p)] == p for p in _PER_RULE[d.kind]):
            camel = tuple(_camel(x) for x in path)
            what = (
                f"{'.'.join(camel)} for a MeshHTTPRoute (Kuma applies it to the destination's "
                "cluster, never to a route)"
            )
            out.append(_unresolved(d, what, ("to", i, "default", *camel)))
    if not patch:
        return []
    field = _ROUTE_LEVEL[d.kind]
    item_kind = to.target_ref.kind or "Mesh"
    items = []
    for route in found:
        sel = selected if selected is not None else _top(route.spec.target_ref)
        if sel is None:
            continue  # the route itself is not resolved (W3006 at it)
        for rt in route.spec.to or ():
            dst = _dest(rt.target_ref)
            if dst is None:
                continue
            keys = _route_rules(rt.rules)["rules"]
            default = {"rules": {k: {field: patch} for k in keys}}
            r = Ranked(key, target_rank(item_kind), default, d, ("to", i), (top_kind, item_kind))
            items.append(_Item(sel[0], dst, sel[1], (), r))
    return items


def _leaf_paths(m: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The paths of the settings a dumped conf makes (a map's keys, recursively)."""
    if not isinstance(m, dict) or not m:
        if prefix:
            yield prefix
        return
    for k, v in m.items():
        yield from _leaf_paths(v, (*prefix, k))


def _camel(word: str) -> str:
    head, *rest = word.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def _to_default(d: Doc, i: int, to: Any, out: list[Diagnostic]) -> dict[str, Any]:
    """A ``to`` item's patch, keyed as its bundle field's converter reads it; W3006 for each of
    its settings the bundle has no place for."""
    if d.kind == _ROUTE:
        return _route_rules(to.rules)
    if d.kind == _TCP_ROUTE:
        rules = to.rules or []
        for j in range(1, len(rules)):
            out.append(
                _unresolved(d, "a second MeshTCPRoute rule (Kuma uses the first)", ("to", i, "rules", j))
            )
        return {"tcp": _dump(rules[0].default) if rules else {}}
    not_applied = _NOT_APPLIED.get(d.kind, _none)
    for path, what in not_applied(to.default):
        out.append(_unresolved(d, what, ("to", i, "default", *path)))
    return {"load_balancing": _dump(to.default)} if d.kind == _LB else _dump(to.default)


def _none(_: Any) -> Iterator[tuple[Path, str]]:
    return iter(())


_NOT_APPLIED: dict[str, Callable[[Any], Iterator[tuple[Path, str]]]] = {
    _LB: mlbs.not_applied,
    _LOG: mal.not_applied,
    "MeshHealthCheck": mhc.not_applied,
    "MeshTimeout": mto.not_applied,
}
"""A kind's settings the bundle has no place for (W3006 at each)."""


def _route_rules(rules: list[Any] | None) -> dict[str, Any]:
    """A MeshHTTPRoute ``to`` item as a patch: its rules keyed by their matches (merged by them)."""
    out = {_canon([_dump_match(m) for m in r.matches or []]): _dump(r.default) for r in rules or ()}
    return {"rules": out}


def _dump_match(m: BaseModel) -> dict[str, Any]:
    return m.model_dump(exclude_unset=True, exclude_none=True)


_canon = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def _keys(items: list[_Item]) -> set[tuple[str, str]]:
    """The (source, destination) keys a bundle looks up that these items shape (see the module doc)."""
    named = {(it.src, it.dst) for it in items}
    dsts = {it.dst for it in items if it.dst != "*"}
    for s, d in list(named):
        if s != "*" and d == "*":
            named.update((s, x) for x in dsts)
    return named


def _covers(it: _Item, src: str, dst: str, when: Tags) -> bool:
    return it.src in (src, "*") and it.dst in (dst, "*") and set(it.when) <= set(when)


def _rank(src: str, dst: str, when: Tags) -> tuple[int, int]:
    return (_RANK_BASE + 100 * (src != "*") * 2 + 100 * (dst != "*") + len(when), 0)


def index_targetref(idx: PolicyIndex, docs: list[Doc]) -> list[Diagnostic]:
    """Add the targetRef policies of one mesh to ``idx``; returns the warnings (ties, limits)."""
    out: list[Diagnostic] = []
    index_tracing(idx, docs, out)
    by_field, rules = _items(docs, out)
    mesh = next((d.mesh for d in docs), "")
    mesh_doc = next((d for d in docs if d.kind == "Mesh"), None)
    mtls = mesh_settings(mesh_doc.spec if mesh_doc is not None else None)[0].enabled
    services = sorted({d.name for d in docs if d.kind == "Service"})
    callers = _callers(docs, services)
    gateways = _gateways(docs)
    http = {d.name for d in docs if d.kind == "Service" and d.spec.protocol == "http"}
    _idle_on_http(rules.get("MeshTimeout") or [], http, out)
    for kind in _RULES_RESOLVED:
        if rules.get(kind):
            _inbound_rules(idx, kind, rules[kind], mesh, services, callers if mtls else [], out)
    seen_ties: set[tuple[int, int]] = set()
    applied: set[int] = set()
    """The route-level items (``_route_level``) that some bundle route rule carries."""
    for field, items in sorted(by_field.items()):
        kind = _LEGACY_KIND[field]
        if field == "permissions" or field in _INBOUND_FIELDS:
            tr_kind = _PERMISSION if field == "permissions" else "MeshFaultInjection"
            if rules.get(tr_kind):
                items = _without_ruled(items, rules[tr_kind], services, out)
            _inbound(idx, kind, field, items, out)
            continue
        route_keys = _keys([it for it in items if it.ranked.policy.kind not in _ROUTE_LEVEL])
        # A gateway resolves its own entry where a sidecars-only item would reach it through `*`.
        own = {(g, it.dst) for it in items if it.sidecars for g in gateways}
        for src, dst in sorted(_keys(items) | own):
            covering = [it for it in items if _over(it, src, dst, gateways)]
            bases: dict[str, dict[str, Any]] = {}
            whens = [it.when for it in covering]
            level = False
            if field == "route":
                covering, whens, level = _route_level_covering(covering, by_field, src, dst, gateways)
                if not covering or ((src, dst) not in route_keys | own and not level):
                    continue  # no route here, or nothing route-level where the route was resolved
            if not covering:
                _sidecars_only(items, src, dst, out)
                continue
            for when in rin.tag_sets(whens):
                members = in_order(it.ranked for it in covering if _covers(it, src, dst, when))
                if not members:
                    continue
                if level:
                    if all(r.policy.kind in _ROUTE_LEVEL for r in members):
                        continue
                    bases = _bases(by_field, src, dst, when, gateways)
                    applied.update(id(r) for r in members if r.policy.kind in _ROUTE_LEVEL)
                for a, z in name_ties(members):
                    pair = (id(a), id(z))
                    if pair not in seen_ties:
                        seen_ties.add(pair)
                        out.append(_tie(a, z, src, dst))
                conf = _conf(field, members, dst, bases)
                if conf is None and field == "traffic_log":
                    _log_off(members, out)
                    continue
                if field == "route":
                    _tcp_beaten(members, out)
                if conf is None:
                    top = members[-1]
                    what = "a route filter or match the bundle cannot express"
                    out.append(_unresolved(top.policy, what, top.where))
                    continue
                _add(idx, kind, _entry(members, src, dst, when, (), conf))
    _route_level_unused(by_field.get("route") or (), applied, out)
    return out


def _route_level_unused(items: Iterable[_Item], applied: set[int], out: list[Diagnostic]) -> None:
    """W3006 at a route-level ``to`` item that no bundle route rule carries: the MeshHTTPRoute
    routes nothing on the proxies the policy selects."""
    for it in items:
        r = it.ranked
        if r.policy.kind in _ROUTE_LEVEL and id(r) not in applied:
            what = (
                "a conf for a MeshHTTPRoute that routes none of the proxies this policy selects "
                "(or none of its rules resolved)"
            )
            _once(out, _unresolved(r.policy, what, r.where))


def _log_off(members: list[Ranked], out: list[Diagnostic]) -> None:
    """No backend after the merge: no rule, which a broader policy's rule cannot be turned off by."""
    if any(r.default.get("backends") for r in members[:-1]):
        top = members[-1]
        what = "`backends: []` under a broader MeshAccessLog (a bundle cannot turn its log off)"
        _once(out, _unresolved(top.policy, what, top.where))


def _once(out: list[Diagnostic], d: Diagnostic) -> None:
    """Add a finding made per key once per place (a policy shapes many keys)."""
    if d not in out:
        out.append(d)


def _over(it: _Item, src: str, dst: str, gateways: set[str]) -> bool:
    """Whether an item is merged into the entry of a (source, destination) key."""
    return it.src in (src, "*") and it.dst in (dst, "*") and not (it.sidecars and src in gateways)


def _sidecars_only(items: list[_Item], src: str, dst: str, out: list[Diagnostic]) -> None:
    """W3006 where a gateway would still get a sidecars-only conf through the mesh bundle: no
    other policy configures it there, and a bundle has no rule that says "none"."""
    for it in items:
        if it.sidecars and it.dst in (dst, "*"):
            r = it.ranked
            what = (
                f"a sidecars-only selection for the gateway {src}, which no other policy configures "
                f"for {dst} (it gets the mesh-wide conf that includes this one)"
            )
            _once(out, _unresolved(r.policy, what, ("targetRef",)))


def _route_level_covering(
    covering: list[_Item], by_field: dict[str, list[_Item]], src: str, dst: str, gateways: set[str]
) -> tuple[list[_Item], list[Tags], bool]:
    """For one route key: the items that shape it (route-level ones only where one of their rules
    is a rule some MeshHTTPRoute writes here; none at all without such a route), the tag
    conditions to resolve for (with route-level items, those of the destination's MeshTimeouts
    and MeshRetries too, whose merged conf a route-level one goes over), and whether any
    route-level item is among them."""
    shaping = [it for it in covering if it.ranked.policy.kind not in _ROUTE_LEVEL]
    real = {k for it in shaping if it.ranked.policy.kind == _ROUTE for k in it.ranked.default["rules"]}
    level = [
        it
        for it in covering
        if it.ranked.policy.kind in _ROUTE_LEVEL and real & set(it.ranked.default["rules"])
    ]
    if not shaping:
        return [], [], False
    whens = [it.when for it in (*shaping, *level)]
    if level:
        under = (it for f in _ROUTE_LEVEL.values() for it in by_field.get(f, ()))
        whens += [it.when for it in under if _over(it, src, dst, gateways)]
    return [*shaping, *level], whens, bool(level)


def _bases(
    by_field: dict[str, list[_Item]], src: str, dst: str, when: Tags, gateways: set[str]
) -> dict[str, dict[str, Any]]:
    """The destination's merged MeshTimeout and MeshRetry for one key and tag set (what a
    route-level conf is merged over)."""
    out = {}
    for f in _ROUTE_LEVEL.values():
        mine = (it for it in by_field.get(f, ()) if _over(it, src, dst, gateways))
        members = in_order(it.ranked for it in mine if _covers(it, src, dst, when))
        out[f] = merged(r.default for r in members)
    return out


def _tcp_beaten(members: list[Ranked], out: list[Diagnostic]) -> None:
    if any(r.policy.kind == _ROUTE and r.default.get("rules") for r in members):
        for r in members:
            if "tcp" in r.default:
                what = "a MeshTCPRoute where a MeshHTTPRoute routes the same destination (it wins)"
                _once(out, _unresolved(r.policy, what, r.where))


def _conf(field: str, members: list[Ranked], dst: str, bases: dict[str, dict[str, Any]]) -> BaseModel | None:
    m = merged(r.default for r in members)
    if field == "route":
        real = {k for r in members if r.policy.kind == _ROUTE for k in r.default["rules"]}
        return _route_of(m, dst, real, bases)
    conv = next(v.convert for v in _OUTBOUND.values() if v.field == field)
    return conv(m)


def _entry(members: list[Ranked], src: str, dst: str, when: Tags, peer: Tags, conf: Any) -> Entry:
    """The merged rule, shown as its highest-precedence policy (the others in ``also``)."""
    top = members[-1]
    also: list[Doc] = []
    for r in members:
        if r.policy is not top.policy and all(r.policy is not x for x in also):
            also.append(r.policy)
    rank = _rank(src, dst, when)
    return Entry(top.policy, src, dst, when, peer, rank, conf, top.where, tuple(also), tuple(members))


def _add(idx: PolicyIndex, kind: str, e: Entry) -> None:
    idx.targetref = True
    idx.by_kind.setdefault(kind, {}).setdefault((e.src, e.dst), []).append(e)
    idx.by_dst.setdefault(kind, {}).setdefault(e.dst, []).append(e)
    if REGISTRY[kind].direction == "outbound":
        named = idx.sources[e.src]
        named[e.dst] = named.get(e.dst, 0) + 1


_INBOUND_FIELDS = {v.field: v.convert for v in _INBOUND.values()}


def _inbound(idx: PolicyIndex, kind: str, field: str, items: list[_Item], out: list[Diagnostic]) -> None:
    """One rule per (service, conditions, caller): a permission whose merged action allows, or
    a fault injection / rate limit whose merged default says one."""
    groups: dict[tuple[str, Tags, Tags], list[Ranked]] = defaultdict(list)
    for it in items:
        groups[(it.dst, it.when, it.peer)].append(it.ranked)
    for (dst, when, peer), rs in sorted(groups.items()):
        members = in_order(rs)
        for a, z in name_ties(members):
            out.append(_tie(a, z, dict(peer).get(SERVICE_TAG, "*"), dst))
        m = merged(r.default for r in members)
        src = dict(peer).get(SERVICE_TAG, "*")
        if field != "permissions":
            conf = _INBOUND_FIELDS[field](m)
            if conf is None:
                top = members[-1]
                out.append(_unresolved(top.policy, "a default the bundle cannot express", top.where))
            elif conf not in _NO_RULE:
                _add(idx, kind, _entry(members, src, dst, when, peer, conf))
            continue
        action = m.get("action")
        if action == "Deny":
            top = members[-1]
            what = "a Deny that a broader Allow may still override (bundle permissions only allow)"
            out.append(_unresolved(top.policy, what, top.where))
        if action in ("Allow", "AllowWithShadowDeny"):
            _add(idx, kind, _entry(members, src, dst, when, peer, None))


def _callers(docs: Iterable[Doc], services: list[str]) -> list[str]:
    """Every service that can call another: the catalog's services and gateways."""
    return sorted({*services, *_gateways(docs)})


def _inbound_rules(
    idx: PolicyIndex,
    kind: str,
    rules: list[rin.InboundRule],
    mesh: str,
    services: list[str],
    callers: list[str],
    out: list[Diagnostic],
) -> None:
    """Kuma's inbound rules of one kind (``compiler.resolve_inbound``) as entries of its legacy kind."""
    legacy = kind if kind in _INBOUND_ONLY else _LEGACY_KIND[TARGETREF_FIELDS[kind]]
    if kind == _PERMISSION:
        resolved = rin.permission_rules(rules, mesh, services, callers, out, _unresolved)
    elif kind == "MeshRateLimit":
        resolved = rin.rate_limit_rules(rules, mesh, services, callers, _rate_limit, out, _unresolved, _tie)
    elif kind == "MeshTimeout":
        resolved = rin.timeout_rules(rules, mesh, services, callers, _timeout, out, _unresolved, _tie)
    elif kind == "MeshCircuitBreaker":
        resolved = rin.limit_rules(rules, services, _circuit_breaker, out, _tie)
    elif kind == _LOG:
        resolved = rin.log_rules(rules, mesh, callers, _log_backends, out, _unresolved)
    else:
        resolved = rin.fault_rules(rules, mesh, services, callers, _fault, out, _unresolved)
    for r in resolved:
        src = dict(r.peer).get(SERVICE_TAG, "*")
        _add(idx, legacy, _entry(list(r.members), src, r.dst, r.when, r.peer, r.conf))


def _without_ruled(
    items: list[_Item], rules: list[rin.InboundRule], services: list[str], out: list[Diagnostic]
) -> list[_Item]:
    """The ``from`` items of a kind whose plugin reads Kuma's inbound rules alone where a policy
    with ``rules`` selects the proxy: dropped there (W3007), per service; W3006 where only some
    of an item's instances are selected by such a policy (a bundle cannot subtract them)."""
    kept: list[_Item] = []
    for it in items:
        targets = services if it.dst == "*" else [it.dst]
        free = []
        for svc in targets:
            over = [r for r in rules if r.dst in (svc, "*") and rin.compatible(r.when, it.when)]
            full = next((r for r in over if set(r.when) <= set(it.when)), None)
            if full is not None:
                _once(out, _ruled(it.ranked, full.ranked))
                continue
            if over:
                d, r = it.ranked.policy, over[0].ranked.policy
                msg = (
                    f"{d.kind} {d.name!r} `from` still applies to the instances of {svc} that {r.kind} "
                    f"{r.name!r} selects with `rules`, where Kuma uses the rules alone (a bundle cannot "
                    "take some instances out of a rule)"
                )
                _once(out, Diagnostic("W3006", msg, d.loc(it.ranked.where)))
            free.append(svc)
        if len(free) == len(targets):
            kept.append(it)
        else:
            kept.extend(_Item(it.src, svc, it.when, it.peer, it.ranked) for svc in free)
    return kept


def _ruled(item: Ranked, by: Ranked) -> Diagnostic:
    d, r = item.policy, by.policy
    return Diagnostic(
        "W3007",
        f"{d.kind} {d.name!r} `from` has no effect where {r.kind} {r.name!r} has `rules`: as in Kuma 2.x, "
        "a proxy that inbound rules select uses them alone",
        d.loc(item.where),
        related_locs=((r.loc(by.where), f"{r.kind} {r.name!r} is here"),),
    )


def _tie(a: Ranked, z: Ranked, src: str, dst: str) -> Diagnostic:
    da, dz = a.policy, z.policy
    return Diagnostic(
        "W3004",
        f"{dz.kind} {dz.name!r} overrides {da.kind} {da.name!r} for {src} -> {dst} only because its name "
        "sorts first (Kuma's last tie-break: the smaller name wins); make one targetRef more specific "
        "if that is not meant",
        dz.loc(z.where),
        related_locs=((da.loc(a.where), f"{da.kind} {da.name!r} is here"),),
    )


def is_targetref(e: Entry) -> bool:
    """Whether an entry comes from targetRef policies (its rank sits above every legacy rank)."""
    return e.rank[0] >= _RANK_BASE


def legacy_shadowed(idx: PolicyIndex) -> Iterator[Diagnostic]:
    """W3005 where a targetRef policy shadows a legacy one in some bundle (the legacy one loses).

    A legacy entry is shadowed where an unconditional targetRef entry of its kind is looked up
    with it (``build``: the keys (src, dst), (src, *), (*, dst), (*, *); inbound, by destination),
    since targetRef ranks come first. Permissions add up: there both policies of one key are named.
    """
    if not idx.targetref:
        return
    for kind, table in idx.by_kind.items():
        if REGISTRY[kind].additive:
            yield from _same_key(table)
            continue
        inbound = REGISTRY[kind].direction == "inbound"
        new = [e for es in table.values() for e in es if is_targetref(e) and not e.when and not e.peer]
        if not new:
            continue
        for es in table.values():
            for o in es:
                if is_targetref(o):
                    continue
                n = next((n for n in new if _meet(n.dst, o.dst) and (inbound or _meet(n.src, o.src))), None)
                if n is not None:
                    src = o.src if n.src == "*" else n.src
                    yield _w3005(n, o, src, o.dst if n.dst == "*" else n.dst)


def _meet(a: str, b: str) -> bool:
    return a == b or "*" in (a, b)


def _same_key(table: dict[tuple[str, str], list[Entry]]) -> Iterator[Diagnostic]:
    for (src, dst), entries in table.items():
        new = [e for e in entries if is_targetref(e)]
        old = [e for e in entries if not is_targetref(e)]
        if new and old:
            yield _w3005(new[0], old[0], src, dst)


def _w3005(n: Entry, o: Entry, src: str, dst: str) -> Diagnostic:
    return Diagnostic(
        "W3005",
        f"{n.doc.kind} {n.doc.name!r} and the legacy {o.doc.kind} {o.doc.name!r} both configure "
        f"{src} -> {dst}; as in Kuma, the targetRef policy wins",
        o.doc.loc(o.path),
        related_locs=((n.doc.loc(n.path), f"{n.doc.kind} {n.doc.name!r} is here"),),
    )


# --- MeshHTTPRoute on a MeshGateway -----------------------------------------------------------

_GW_PATH = {"Exact": "EXACT", "PathPrefix": "PREFIX", "RegularExpression": "REGEX"}
_GW_VALUE = {"Exact": "EXACT", "": "EXACT", "RegularExpression": "REGEX", "Prefix": "PREFIX"}


def _gw_match(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(m.get("path"), dict):
        p = m["path"]
        out["path"] = {
            "match": _GW_PATH.get(p.get("type") or "PathPrefix", "PREFIX"),
            "value": p.get("value"),
        }
    if m.get("method"):
        out["method"] = m["method"]
    if m.get("headers"):
        out["headers"] = [_gw_value(h) for h in m["headers"]]
    if m.get("query_params"):
        out["query_parameters"] = [_gw_value(q) for q in m["query_params"]]
    return out


def _gw_value(h: dict[str, Any]) -> dict[str, Any]:
    return {
        "match": _GW_VALUE.get(h.get("type") or "", "EXACT"),
        "name": h.get("name"),
        "value": h.get("value"),
    }


def _gw_destination(ref: dict[str, Any]) -> dict[str, Any]:
    tags = ref.get("tags") or {} if ref.get("kind") == "MeshServiceSubset" else {}
    return {SERVICE_TAG: ref.get("name"), **tags}


def _gw_filter(f: dict[str, Any]) -> dict[str, Any] | None:
    t = f.get("type")
    if t in ("RequestHeaderModifier", "ResponseHeaderModifier"):
        mod = (
            f.get("request_header_modifier" if t == "RequestHeaderModifier" else "response_header_modifier")
            or {}
        )
        return {"request_header" if t == "RequestHeaderModifier" else "response_header": mod}
    if t == "URLRewrite":
        rw = f.get("url_rewrite") or {}
        if rw.get("hostname"):
            return None
        p = rw.get("path") or {}
        out: dict[str, Any] = {}
        if p.get("type") == "ReplacePrefixMatch":
            out["replace_prefix_match"] = p.get("replace_prefix_match")
        elif p.get("type") == "ReplaceFullPath":
            out["replace_full"] = p.get("replace_full_path")
        if rw.get("host_to_backend_hostname") is not None:
            out["host_to_backend_hostname"] = rw["host_to_backend_hostname"]
        return {"rewrite": out}
    if t == "RequestRedirect":
        rd = f.get("request_redirect") or {}
        if rd.get("path"):
            return None
        keep = ("scheme", "hostname", "port", "status_code")
        return {"redirect": {k: rd[k] for k in keep if rd.get(k) is not None}}
    if t == "RequestMirror":
        mr = f.get("request_mirror") or {}
        out = {"backend": {"destination": _gw_destination(mr.get("backend_ref") or {})}}
        if mr.get("percentage") is not None:
            out["percentage"] = float(mr["percentage"])
        return {"mirror": out}
    return None


_GW_RULE_KEYS = {"backends": ("default", "backendRefs"), "filters": ("default", "filters")}


@dataclass(frozen=True)
class _GatewayRouteDoc(Doc):
    """One ``to`` item of a MeshHTTPRoute read as a MeshGatewayRoute: the paths of its
    MeshGatewayRoute form point back into the MeshHTTPRoute as written (diagnostics, explain)."""

    to_index: int = 0
    rule_index: tuple[int, ...] = ()
    """The written rule of each rule kept (one with a filter meshc cannot express is left out)."""

    def loc(self, path: Path = (), on_key: bool = False) -> Loc:
        to: Path = ("to", self.to_index)
        if path[:3] == ("conf", "http", "rules") and len(path) > 3 and isinstance(path[3], int):
            rule: Path = (
                *to,
                "rules",
                self.rule_index[path[3]] if path[3] < len(self.rule_index) else path[3],
            )
            rest = path[4:]
            if rest and rest[0] in _GW_RULE_KEYS:
                rest = (*_GW_RULE_KEYS[str(rest[0])], *rest[1:2])
            return super().loc((*rule, *rest), on_key)
        return super().loc(("targetRef",) if path[:1] == ("selectors",) else to, on_key)


def gateway_routes(docs: list[Doc]) -> tuple[list[Doc], list[Diagnostic]]:
    """MeshHTTPRoutes whose top-level targetRef is a MeshGateway, as MeshGatewayRoute documents
    (same file and position) for ``compiler.gateway`` to attach: one per ``to`` item."""
    from compiler.kinds import mesh_gateway_route as mgr

    gateways = {(d.mesh, d.name): d for d in docs if d.kind == "MeshGateway"}
    out: list[Doc] = []
    findings: list[Diagnostic] = []
    for d in docs:
        tr = d.spec.target_ref if d.kind == _ROUTE else None
        if tr is None or tr.kind != "MeshGateway":
            continue
        gw = gateways.get((d.mesh, tr.name or ""))
        if gw is None:
            findings.append(
                _unresolved(d, f"a MeshGateway {tr.name!r} that the mesh does not have", ("targetRef",))
            )
            continue
        extra = {k: v for k, v in (tr.tags or {}).items() if isinstance(v, str)}
        selectors = [{"match": {**(s.match or {}), **extra}} for s in gw.spec.selectors or []]
        for i, to in enumerate(d.spec.to or ()):
            if (to.target_ref.kind or "Mesh") != "Mesh":
                findings.append(_unresolved(d, f"a `to` targetRef of kind {to.target_ref.kind}", ("to", i)))
                continue
            rules = []
            kept: list[int] = []
            for ri, r in enumerate(to.rules or ()):
                conf = _dump(r.default)
                filters = [_gw_filter(f) for f in conf.get("filters") or ()]
                if any(f is None for f in filters):
                    findings.append(_unresolved(d, "a filter", ("to", i, "rules", ri, "default", "filters")))
                    continue
                kept.append(ri)
                rules.append(
                    {
                        "matches": [_gw_match(_dump_match(m)) for m in r.matches or []] or [{}],
                        "filters": filters,
                        "backends": [
                            {"weight": _g(x, "weight", default=1), "destination": _gw_destination(x)}
                            for x in conf.get("backend_refs") or ()
                        ],
                    }
                )
            http: dict[str, Any] = {"rules": rules}
            if to.hostnames:
                http["hostnames"] = list(to.hostnames)
            spec = mgr.MeshGatewayRouteSpec.model_validate({"selectors": selectors, "conf": {"http": http}})
            out.append(
                _GatewayRouteDoc(
                    d.file, d.index, "MeshHTTPRoute", d.mesh, d.name, spec, d.prefix, d.labels, i, tuple(kept)
                )
            )
    return out, findings


# --- MeshTrace ------------------------------------------------------------------------------------


def _trace_top(d: Doc, out: list[Diagnostic]) -> str | None:
    """The service (``*``: every one) a MeshTrace's top-level targetRef selects; None (and W3006)
    for a selection a bundle's per-service tracing cannot express."""
    tr = d.spec.target_ref
    kind = tr.kind if tr is not None and tr.kind else "Mesh"
    top = _top(tr) if kind in ("Mesh", "MeshService", "MeshSubset") else None
    if top is None:
        out.append(_unresolved(d, f"a top-level targetRef of kind {kind}", ("targetRef", "kind")))
        return None
    if top[1]:
        what = "a MeshSubset with tags other than kuma.io/service (a bundle traces a whole service)"
        out.append(_unresolved(d, what, ("targetRef", "tags")))
        return None
    return top[0]


def _traced(
    members: list[Ranked], out: list[Diagnostic], scope: str, seen: set[tuple[int, int]]
) -> b.TracingBackend | None:
    for a, z in name_ties(members):
        if (id(a.policy), id(z.policy)) not in seen:  # Mesh-wide ones meet again under each service
            seen.add((id(a.policy), id(z.policy)))
            out.append(_tie(a, z, scope, "*"))
    conf = mtr.Conf.model_validate(merged(r.default for r in members))
    return mtr.to_backend(conf, members[-1].policy.name)


def _tracing_shadowed(mesh_doc: Doc, top: Ranked, scope: str) -> Diagnostic:
    d = top.policy
    return Diagnostic(
        "W3005",
        f"{d.kind} {d.name!r} and the Mesh's legacy `tracing` both configure tracing of {scope}; "
        "as in Kuma, the MeshTrace wins",
        mesh_doc.loc(("tracing",)),
        related_locs=((d.loc(top.where), f"{d.kind} {d.name!r} is here"),),
    )


def index_tracing(idx: PolicyIndex, docs: list[Doc], out: list[Diagnostic]) -> None:
    """Resolve the mesh's tracing into ``idx.tracing``: the MeshTraces that select every data
    plane give the mesh bundle's backend (else the Mesh's legacy ``tracing`` does), those that
    name a service merge over them into that service's bundle (Kuma's precedence)."""
    mesh_doc = next((d for d in docs if d.kind == "Mesh"), None)
    legacy_spec = mesh_doc.spec if mesh_doc is not None else None
    legacy_set = (
        legacy_spec is not None and legacy_spec.tracing is not None and bool(legacy_spec.tracing.backends)
    )
    items: list[tuple[str, Ranked]] = []
    for d in docs:
        if d.kind != _TRACE:
            continue
        for path, what in mtr.not_applied(d.spec.default):
            out.append(_unresolved(d, what, ("default", *path)))
        service = _trace_top(d, out)
        if service is None:
            continue
        tr = d.spec.target_ref
        kind = tr.kind if tr is not None and tr.kind else "Mesh"
        default = d.spec.default.model_dump(by_alias=True, exclude_unset=True) if d.spec.default else {}
        r = Ranked(policy_key(kind, dict(d.labels), d.name), 0, default, d, ("default",), (kind, "Mesh"))
        items.append((service, r))
    wide = in_order(r for s, r in items if s == "*")
    seen: set[tuple[int, int]] = set()
    if wide:
        mesh_backend = _traced(wide, out, "*", seen)
        if legacy_set and mesh_doc is not None:
            out.append(_tracing_shadowed(mesh_doc, wide[-1], "every data plane"))
    else:
        mesh_backend = tracing_backend(legacy_spec)
    services: dict[str, tuple[b.ServiceTracing, tuple[Doc, ...]]] = {}
    for name in sorted({s for s, _ in items if s != "*"}):
        members = in_order(r for s, r in items if s in (name, "*"))
        backend = _traced(members, out, name, seen)
        if legacy_set and not wide and mesh_doc is not None:
            out.append(_tracing_shadowed(mesh_doc, members[-1], name))
        used = _policies(members)
        services[name] = (b.ServiceTracing(backend=backend), used)
    idx.tracing = Tracing(mesh_backend, _policies(wide), services)


def _policies(members: list[Ranked]) -> tuple[Doc, ...]:
    """The documents of these items, each once, in order."""
    out: list[Doc] = []
    for r in members:
        if all(r.policy is not x for x in out):
            out.append(r.policy)
    return tuple(out)
