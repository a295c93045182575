"""Legacy policies -> targetRef policies, one document at a time (what ``meshc convert`` writes).

Kuma's migration guide is the reference: a legacy policy's source selector becomes the top-level
``targetRef`` (``*``: ``Mesh``; a service and its tags: ``MeshSubset``), its destination a
``to[].targetRef`` (``MeshService``), and its ``conf`` the entry's ``default`` with Kuma's new
field names. Inbound kinds turn around: the destination is the top-level ``targetRef`` and each
source a ``from[]`` entry. Where no exact translation exists (several sources of an outbound
policy, destination subsets, fields the new kind lacks) the policy is not converted and the
reason says why. Every function is pure: raw legacy data in, new data or a reason out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic.alias_generators import to_snake

from compiler.kinds.base import SERVICE_TAG

__all__ = ["Catalog", "Converted", "NotExact", "convert_document"]

MESH_LABEL = "kuma.io/mesh"


class NotExact(Exception):
    """The policy has no exact targetRef translation; the message says why."""


@dataclass(frozen=True)
class Catalog:
    """What a conversion needs to know about the repo: service protocols and gateways."""

    protocols: Mapping[str, str] = field(default_factory=dict)
    """Service name -> ``http`` or ``tcp``."""
    gateways: Mapping[str, str] = field(default_factory=dict)
    """A gateway's service (its selector's ``kuma.io/service``) -> the MeshGateway's name."""


@dataclass(frozen=True)
class Converted:
    kind: str
    data: dict[str, Any]
    also: tuple[dict[str, Any], ...] = ()
    """Further documents written after it (a TrafficRoute's load balancer is a policy of its own)."""


def _get(d: Any, name: str) -> Any:
    """A legacy field in either spelling (camelCase or snake_case)."""
    if not isinstance(d, Mapping):
        return None
    return d[name] if name in d else d.get(to_snake(name))


def _pick(d: Any, mapping: Mapping[str, str], what: str) -> dict[str, Any]:
    """The fields of ``d`` under their new names; a field with no new name is not exact."""
    out: dict[str, Any] = {}
    for key, value in (d or {}).items():
        camel = next((k for k in mapping if key in (k, to_snake(k))), None)
        if camel is None:
            raise NotExact(f"`{what}.{key}` has no counterpart in the targetRef kind")
        if value is not None:
            out[mapping[camel]] = value
    return out


def _same(*names: str) -> dict[str, str]:
    return {n: n for n in names}


def _service_ref(match: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A destination selector as a ``to[].targetRef``: ``*`` is the mesh, a service a MeshService."""
    service = match.get(SERVICE_TAG)
    if set(match) != {SERVICE_TAG}:
        raise NotExact(f"{where} selects tags besides {SERVICE_TAG} (a subset): no targetRef names that here")
    return {"kind": "Mesh"} if service == "*" else {"kind": "MeshService", "name": service}


def _subset_ref(match: Mapping[str, Any]) -> dict[str, Any]:
    """A source selector as a targetRef: ``*`` alone is the mesh, anything else a MeshSubset."""
    if dict(match) == {SERVICE_TAG: "*"}:
        return {"kind": "Mesh"}
    tags = {k: v for k, v in match.items() if not (k == SERVICE_TAG and v == "*")}
    if any(v == "*" for v in tags.values()):
        raise NotExact("a source tag with the value `*` has no MeshSubset form (tags match exact values)")
    return {"kind": "MeshSubset", "tags": tags}


def _one(spec: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    sels = _get(spec, name) or []
    if len(sels) != 1:
        raise NotExact(f"{len(sels)} {name}: a targetRef policy has one top-level targetRef; split it first")
    return _get(sels[0], "match") or {}


def _base(doc: Mapping[str, Any], kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    meta = dict(doc.get("metadata") or {})
    labels = dict(meta.get("labels") or {})
    labels[MESH_LABEL] = doc.get("mesh", "default")
    meta["labels"] = labels
    return {"apiVersion": "kuma.io/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


def _outbound(doc: Mapping[str, Any], kind: str, conf: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    top = _subset_ref(_one(spec, "sources"))
    dests = _get(spec, "destinations") or []
    to = [
        {"targetRef": _service_ref(_get(d, "match") or {}, f"destinations[{i}]"), "default": conf}
        for i, d in enumerate(dests)
    ]
    return _base(doc, kind, {"targetRef": top, "to": to})


def _inbound(
    doc: Mapping[str, Any],
    kind: str,
    default: dict[str, Any],
    *,
    sidecars: bool = False,
    only_mesh_sources: bool = False,
) -> dict[str, Any]:
    """``sidecars``: the destination's proxies are sidecars only (legacy inbound policies never applied
    to gateways), which Kuma spells ``proxyTypes: [Sidecar]`` (required where ``from`` is used)."""
    spec = doc["spec"]
    dest = _one(spec, "destinations")
    top = _subset_ref(dest)
    if sidecars:
        top["proxyTypes"] = ["Sidecar"]
    sources = _get(spec, "sources")
    frm = [{"targetRef": _subset_ref(_get(s, "match") or {}), "default": default} for s in sources]
    if only_mesh_sources and any(f["targetRef"]["kind"] != "Mesh" for f in frm):
        raise NotExact(
            f"{kind} takes `from` the whole mesh (`*`) only: a per-source limit has no targetRef form"
        )
    return _base(doc, kind, {"targetRef": top, "from": frm})


# --- per kind -------------------------------------------------------------------------------------


def _timeout(doc: Mapping[str, Any], _: Catalog) -> Converted:
    conf = _get(doc["spec"], "conf") or {}
    out: dict[str, Any] = _pick(
        {k: v for k, v in conf.items() if k not in ("tcp", "http")},
        {"connectTimeout": "connectionTimeout"},
        "conf",
    )
    tcp = _pick(_get(conf, "tcp"), {"idleTimeout": "idleTimeout"}, "conf.tcp")
    http = _pick(
        _get(conf, "http"),
        {
            "requestTimeout": "requestTimeout",
            "idleTimeout": "idleTimeout",
            "streamIdleTimeout": "streamIdleTimeout",
            "maxStreamDuration": "maxStreamDuration",
        },
        "conf.http",
    )
    idle = {tcp.get("idleTimeout"), http.get("idleTimeout")} - {None}
    if len(idle) > 1:
        raise NotExact("`tcp.idleTimeout` and `http.idleTimeout` differ; MeshTimeout has one `idleTimeout`")
    if idle:
        out["idleTimeout"] = idle.pop()
    http.pop("idleTimeout", None)
    if http:
        out["http"] = http
    return Converted("MeshTimeout", _outbound(doc, "MeshTimeout", out))


_HTTP_RETRY_ON = {
    "all_5xx": "5xx",
    "gateway_error": "GatewayError",
    "reset": "Reset",
    "retriable_4xx": "Retriable4xx",
    "connect_failure": "ConnectFailure",
    "envoy_ratelimited": "EnvoyRatelimited",
    "refused_stream": "RefusedStream",
    "http3_post_connect_failure": "Http3PostConnectFailure",
}
_GRPC_RETRY_ON = {
    "cancelled": "Canceled",
    "deadline_exceeded": "DeadlineExceeded",
    "internal": "Internal",
    "resource_exhausted": "ResourceExhausted",
    "unavailable": "Unavailable",
}


def _retry_on(values: list[str], names: Mapping[str, str], where: str) -> list[str]:
    out = []
    for v in values:
        key = str(v).lower().replace("-", "_")
        if key not in names:
            raise NotExact(f"`{where}` value {v!r} has no MeshRetry counterpart")
        out.append(names[key])
    return out


def _retry(doc: Mapping[str, Any], _: Catalog) -> Converted:
    conf = _get(doc["spec"], "conf") or {}
    out: dict[str, Any] = {}
    common = _same("numRetries", "perTryTimeout", "backOff")
    if (http := _get(conf, "http")) is not None:
        h = _pick(
            http,
            {**common, "retryOn": "retryOn", "retriableStatusCodes": "codes", "retriableMethods": "m"},
            "conf.http",
        )
        retry_on = _retry_on(h.pop("retryOn", []), _HTTP_RETRY_ON, "conf.http.retryOn")
        retry_on += [str(c) for c in h.pop("codes", [])]
        retry_on += [f"HttpMethod{str(m).capitalize()}" for m in h.pop("m", [])]
        if retry_on:
            h["retryOn"] = retry_on
        out["http"] = h
    if (grpc := _get(conf, "grpc")) is not None:
        g = _pick(grpc, {**common, "retryOn": "retryOn"}, "conf.grpc")
        if "retryOn" in g:
            g["retryOn"] = _retry_on(g["retryOn"], _GRPC_RETRY_ON, "conf.grpc.retryOn")
        out["grpc"] = g
    if (tcp := _get(conf, "tcp")) is not None:
        out["tcp"] = _pick(tcp, {"maxConnectAttempts": "maxConnectAttempt"}, "conf.tcp")
    return Converted("MeshRetry", _outbound(doc, "MeshRetry", out))


def _circuit_breaker(doc: Mapping[str, Any], _: Catalog) -> Converted:
    conf = dict(_get(doc["spec"], "conf") or {})
    thresholds = conf.pop("thresholds", None)
    detectors = conf.pop("detectors", None)
    od = _pick(
        conf,
        _same("interval", "baseEjectionTime", "maxEjectionPercent", "splitExternalAndLocalErrors"),
        "conf",
    )
    out: dict[str, Any] = {}
    if detectors is not None:
        d = _pick(
            detectors,
            {
                "totalErrors": "totalFailures",
                "gatewayErrors": "gatewayFailures",
                "localErrors": "localOriginFailures",
                "standardDeviation": "successRate",
                "failure": "failurePercentage",
            },
            "conf.detectors",
        )
        if "successRate" in d:
            d["successRate"] = _pick(
                d["successRate"],
                {
                    "requestVolume": "requestVolume",
                    "minimumHosts": "minimumHosts",
                    "factor": "standardDeviationFactor",
                },
                "conf.detectors.standardDeviation",
            )
            if "standardDeviationFactor" in d["successRate"]:
                d["successRate"]["standardDeviationFactor"] = str(d["successRate"]["standardDeviationFactor"])
        od["detectors"] = d
    if od:
        out["outlierDetection"] = od
    if thresholds is not None:
        names = _same("maxConnections", "maxPendingRequests", "maxRequests", "maxRetries")
        out["connectionLimits"] = _pick(thresholds, names, "conf.thresholds")
    return Converted("MeshCircuitBreaker", _outbound(doc, "MeshCircuitBreaker", out))


def _health_check(doc: Mapping[str, Any], _: Catalog) -> Converted:
    conf = dict(_get(doc["spec"], "conf") or {})
    http, tcp = conf.pop("http", None), conf.pop("tcp", None)
    names = _same(
        "interval", "timeout", "unhealthyThreshold", "healthyThreshold", "initialJitter", "intervalJitter",
        "intervalJitterPercent", "failTrafficOnPanic", "noTrafficInterval", "eventLogPath",
        "alwaysLogHealthCheckFailures", "reuseConnection", "healthyPanicThreshold",
    )  # fmt: skip
    out = _pick(conf, names, "conf")
    if "healthyPanicThreshold" in out:
        out["healthyPanicThreshold"] = str(out["healthyPanicThreshold"])
    if http is not None:
        h = _pick(http, _same("path", "expectedStatuses", "requestHeadersToAdd"), "conf.http")
        if h.pop("requestHeadersToAdd", None):
            raise NotExact("`conf.http.requestHeadersToAdd` entries have another shape in MeshHealthCheck")
        out["http"] = h
    if http is None and tcp is None:
        raise NotExact("`conf` sets neither `http` nor `tcp`; MeshHealthCheck needs one of them")
    if tcp is not None:
        out["tcp"] = _pick(tcp, _same("send", "receive"), "conf.tcp")
    return Converted("MeshHealthCheck", _outbound(doc, "MeshHealthCheck", out))


def _traffic_permission(doc: Mapping[str, Any], _: Catalog) -> Converted:
    return Converted("MeshTrafficPermission", _inbound(doc, "MeshTrafficPermission", {"action": "Allow"}))


def _fault_injection(doc: Mapping[str, Any], _: Catalog) -> Converted:
    conf = _get(doc["spec"], "conf") or {}
    fault: dict[str, Any] = {}
    for key, names in (
        ("abort", _same("httpStatus", "percentage")),
        ("delay", _same("value", "percentage")),
        ("responseBandwidth", _same("limit", "percentage")),
    ):
        if (part := _get(conf, key)) is not None:
            fault[key] = _pick(part, names, f"conf.{key}")
    extra = set(conf) - {"abort", "delay", "responseBandwidth", "response_bandwidth"}
    if extra:
        raise NotExact(f"`conf.{sorted(extra)[0]}` has no counterpart in MeshFaultInjection")
    return Converted(
        "MeshFaultInjection", _inbound(doc, "MeshFaultInjection", {"http": [fault]}, sidecars=True)
    )


def _rate_limit(doc: Mapping[str, Any], _: Catalog) -> Converted:
    conf = _get(doc["spec"], "conf") or {}
    http = _pick(_get(conf, "http"), _same("requests", "interval", "onRateLimit"), "conf.http")
    if "interval" not in http or "requests" not in http:
        raise NotExact("`conf.http` without both `requests` and `interval`: MeshRateLimit needs a full rate")
    local: dict[str, Any] = {"requestRate": {"num": http["requests"], "interval": http["interval"]}}
    if (on := http.get("onRateLimit")) is not None:
        o = _pick(on, _same("status", "headers"), "conf.http.onRateLimit")
        headers = o.pop("headers", [])
        if headers:
            add = [{"name": _get(h, "key"), "value": _get(h, "value")} for h in headers if _get(h, "append")]
            set_ = [
                {"name": _get(h, "key"), "value": _get(h, "value")} for h in headers if not _get(h, "append")
            ]
            o["headers"] = {k: v for k, v in (("add", add), ("set", set_)) if v}
        local["onRateLimit"] = o
    return Converted(
        "MeshRateLimit",
        _inbound(doc, "MeshRateLimit", {"local": {"http": local}}, sidecars=True, only_mesh_sources=True),
    )


def _backend(dest: Mapping[str, Any], weight: Any, where: str) -> dict[str, Any]:
    service = dest.get(SERVICE_TAG)
    if not isinstance(service, str) or service == "*":
        raise NotExact(f"{where} names no single service")
    tags = {k: v for k, v in dest.items() if k != SERVICE_TAG}
    ref: dict[str, Any] = (
        {"kind": "MeshServiceSubset", "name": service, "tags": tags}
        if tags
        else {
            "kind": "MeshService",
            "name": service,
        }
    )
    ref["weight"] = weight
    return ref


def _backends(conf: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    if (dest := _get(conf, "destination")) is not None:
        return [_backend(dest, 100, f"{where}.destination")]  # as the legacy route compiles it
    return [
        _backend(_get(s, "destination") or {}, _get(s, "weight"), f"{where}.split[{i}]")
        for i, s in enumerate(_get(conf, "split") or [])
    ]


_LB_HASH = {"XX_HASH": "XXHash", "MURMUR_HASH_2": "MurmurHash2"}


def _load_balancer(lb: Mapping[str, Any]) -> dict[str, Any]:
    """A legacy ``loadBalancer`` as MeshLoadBalancingStrategy's (the first kind set, as it compiles)."""
    least = _get(lb, "leastRequest")
    if least is not None:
        return {"type": "LeastRequest", "leastRequest": {"choiceCount": _get(least, "choiceCount") or 2}}
    ring = _get(lb, "ringHash")
    if ring is not None:
        out: dict[str, Any] = {"hashFunction": _LB_HASH.get(_get(ring, "hashFunction"), "XXHash")}
        for key in ("minRingSize", "maxRingSize"):
            if _get(ring, key):
                out[key] = _get(ring, key)
        return {"type": "RingHash", "ringHash": out}
    for key, kind in (("random", "Random"), ("maglev", "Maglev")):
        if _get(lb, key) is not None:
            return {"type": kind}
    return {"type": "RoundRobin"}


def _traffic_route(doc: Mapping[str, Any], cat: Catalog) -> Converted:
    spec = doc["spec"]
    conf = _get(spec, "conf") or {}
    extra = {to_snake(k) for k in conf} - {"split", "destination", "load_balancer"}
    if extra:
        raise NotExact(f"`conf.{sorted(extra)[0]}` is not converted (only split/destination routes are)")
    dests = _get(spec, "destinations") or []
    if len(dests) != 1:
        raise NotExact(f"{len(dests)} destinations: a route converts per destination; split it first")
    to_ref = _service_ref(_get(dests[0], "match") or {}, "destinations[0]")
    if to_ref["kind"] != "MeshService":
        raise NotExact("a route for every destination (`*`) has no MeshHTTPRoute form")
    top = _subset_ref(_one(spec, "sources"))
    also: tuple[dict[str, Any], ...] = ()
    lb = _get(conf, "loadBalancer")
    if lb is not None:
        lbs = _base(
            doc,
            "MeshLoadBalancingStrategy",
            {
                "targetRef": top,
                "to": [{"targetRef": to_ref, "default": {"loadBalancer": _load_balancer(lb)}}],
            },
        )
        lbs["metadata"]["name"] = f"{lbs['metadata'].get('name')}-lb"
        also = (lbs,)
    rule: dict[str, Any] = {"default": {"backendRefs": _backends(conf, "conf")}}
    kind = "MeshTCPRoute" if cat.protocols.get(to_ref["name"], "http") == "tcp" else "MeshHTTPRoute"
    if kind == "MeshHTTPRoute":
        rule = {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], **rule}
    route = _base(doc, kind, {"targetRef": top, "to": [{"targetRef": to_ref, "rules": [rule]}]})
    return Converted(kind, route, also)


_PATH_TYPES = {"PREFIX": "PathPrefix", "EXACT": "Exact", "REGEX": "RegularExpression"}


def _gateway_rule(rule: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = set(rule) - {"matches", "filters", "backends"}
    if unknown:
        raise NotExact(f"`{where}.{sorted(unknown)[0]}` is not converted")
    matches = []
    for i, m in enumerate(_get(rule, "matches") or []):
        path = _get(m, "path")
        if set(m) != {"path"} or path is None:
            raise NotExact(f"`{where}.matches[{i}]` matches more than a path (not converted)")
        matches.append({"path": {"type": _PATH_TYPES[_get(path, "match")], "value": _get(path, "value")}})
    filters = []
    for i, f in enumerate(_get(rule, "filters") or []):
        rw = _get(f, "rewrite")
        if set(f) != {"rewrite"} or not isinstance(rw, Mapping):
            raise NotExact(f"`{where}.filters[{i}]` is not a rewrite (not converted)")
        if (prefix := _get(rw, "replacePrefixMatch")) is not None:
            filters.append(
                {
                    "type": "URLRewrite",
                    "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": prefix}},
                }
            )
        elif (full := _get(rw, "replaceFull")) is not None:
            filters.append(
                {
                    "type": "URLRewrite",
                    "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": full}},
                }
            )
        else:
            raise NotExact(f"`{where}.filters[{i}].rewrite` is not converted")
    refs = [
        _backend(_get(b, "destination") or {}, _get(b, "weight"), f"{where}.backends[{i}]")
        for i, b in enumerate(_get(rule, "backends") or [])
    ]
    default: dict[str, Any] = {"backendRefs": refs}
    if filters:
        default = {"filters": filters, **default}
    return {"matches": matches, "default": default}


def _gateway_route(doc: Mapping[str, Any], cat: Catalog) -> Converted:
    spec = doc["spec"]
    match = _one(spec, "selectors")
    service = match.get(SERVICE_TAG)
    if set(match) != {SERVICE_TAG} or not isinstance(service, str) or service not in cat.gateways:
        raise NotExact("the selector names no single MeshGateway (listener tags are not converted)")
    http = _get(_get(spec, "conf"), "http")
    if not isinstance(http, Mapping) or set(http) - {"rules", "hostnames"}:
        raise NotExact("only `conf.http` rules and hostnames are converted")
    to: dict[str, Any] = {"targetRef": {"kind": "Mesh"}}
    if hostnames := _get(http, "hostnames"):
        to["hostnames"] = hostnames
    to["rules"] = [_gateway_rule(r, f"conf.http.rules[{i}]") for i, r in enumerate(_get(http, "rules") or [])]
    top = {"kind": "MeshGateway", "name": cat.gateways[service]}
    return Converted("MeshHTTPRoute", _base(doc, "MeshHTTPRoute", {"targetRef": top, "to": [to]}))


CONVERTERS: dict[str, Callable[[Mapping[str, Any], Catalog], Converted]] = {
    "Timeout": _timeout,
    "Retry": _retry,
    "CircuitBreaker": _circuit_breaker,
    "HealthCheck": _health_check,
    "TrafficPermission": _traffic_permission,
    "FaultInjection": _fault_injection,
    "RateLimit": _rate_limit,
    "TrafficRoute": _traffic_route,
    "MeshGatewayRoute": _gateway_route,
}
"""The legacy kinds ``convert`` rewrites; TrafficLog's backends live in the Mesh, so it stays."""


def convert_document(doc: Mapping[str, Any], cat: Catalog) -> Converted | None:
    """The targetRef form of a legacy policy in Kubernetes form, None for a document that is not one
    (catalog kinds, targetRef kinds); raises ``NotExact`` where no exact translation exists."""
    if "type" in doc and "kind" not in doc:  # the universal form, written out in Kubernetes form
        rest = {k: v for k, v in doc.items() if k not in ("type", "name", "mesh")}
        meta = {"name": doc.get("name")}
        doc = {
            "apiVersion": "kuma.io/v1alpha1",
            "kind": doc["type"],
            "mesh": doc.get("mesh"),
            "metadata": meta,
            "spec": rest,
        }
    kind = doc.get("kind")
    if not isinstance(kind, str) or doc.get("apiVersion") != "kuma.io/v1alpha1":
        return None
    if kind == "TrafficLog":
        raise NotExact("a TrafficLog's backends are the Mesh's `logging`; MeshAccessLog names its own")
    conv = CONVERTERS.get(kind)
    return None if conv is None else conv(doc, cat)
