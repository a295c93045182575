"""MeshAccessLog: where proxies write access logs (file, TCP, OpenTelemetry) and in what format.

Formats: `Plain` (Envoy's command operators, default Kuma's own line) or `Json` (key/value pairs).
A policy sets `to` (outbound), `from` (inbound) or `rules` (inbound, replacing `to` and `from`).

meshc compiles `to` into the destination's log rule, with every backend: each request's line goes
to each of them. `from` and `rules` (Kuma 2.x inbound rules) are the service's inbound access
logs: every rule logs, gated by its match (a `spiffeID` match: the callers it covers), to each of
its backends, per request to the local app (`direction: inbound`) and per request the sidecar
answers itself (a deny, a rate limit, a fault's abort: no `upstream`).

A File backend appends to its `path`, a Tcp backend sends lines to its `address`, an OpenTelemetry
backend exports log records as OTLP/HTTP JSON to `http://<endpoint>/v1/logs` (point `endpoint` at
the collector's OTLP/HTTP receiver, port 4318 by convention; the data planes do not speak
OTLP/gRPC: an endpoint on 4317 is W3006), with its `body` (default: meshc's JSON line) and
`attributes`. With no format a line is meshc's JSON object (`time`, `direction`, `source_service`,
`destination_service`, `upstream`, `method`, `path`, `response_code`, `duration_ms`, `trace_id`);
`Plain` is a format string, `Json` one JSON object per line of the given keys (a value that is one
operator alone keeps its type). The data planes fill `%START_TIME%`, `%DURATION%`,
`%RESPONSE_CODE%`, `%PROTOCOL%`, `%UPSTREAM_HOST%`, `%UPSTREAM_CLUSTER%`, `%TRACE_ID%`,
`%GRPC_STATUS%`, `%REQ(header)%` (`:method`, `:path`, `:authority` included), `%KUMA_MESH%`,
`%KUMA_SOURCE_SERVICE%`, `%KUMA_DESTINATION_SERVICE%`, `%KUMA_TRAFFIC_DIRECTION%`, `%KUMA_ZONE%`
and `%KUMA_WORKLOAD%` (both empty: no zones); any other operator is written as `-` (W3006 at it).
An OpenTelemetry `backendRef` is not applied (no MeshOpenTelemetryBackend here: W3006). Tcp and
OpenTelemetry records leave through a bounded queue off the data path: a slow or dead collector
never slows a request; what is lost is counted in `meshc_accesslog_records_dropped`.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshAccessLog
    metadata: {name: all-traffic, labels: {kuma.io/mesh: default}}
    spec:
      targetRef: {kind: Mesh}
      to:
        - targetRef: {kind: Mesh}
          default: {backends: [{type: File, file: {path: /tmp/access.log}}]}

Invalid (no backends)::

    spec: {to: [{targetRef: {kind: Mesh}, default: {}}]}
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from compiler.diagnostics import Path
from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    OTLP_GRPC_PORT,
    BackendResourceRef,
    Bool,
    Found,
    KStr,
    Match,
    TargetRef,
    alias,
    at,
    is_file_path,
    is_url,
    kind_def,
    otel_endpoint_or_ref,
    otlp_grpc_port,
    target_ref,
    top,
    validate_match,
)
from runtime import bundle as b


class JsonValue(Spec):
    key: KStr = ""
    value: KStr = ""


class Format(Spec):
    type: KStr = ""
    """``Plain`` or ``Json``."""
    plain: KStr | None = None
    """An Envoy format string (``Plain``)."""
    json_: list[JsonValue] | None = alias("json", "json_")
    """Key/value pairs whose values are format strings (``Json``)."""
    omit_empty_values: Bool = False
    """Leave out fields whose value is empty."""


class TcpBackend(Spec):
    format: Format | None = None
    address: KStr = ""
    """``host:port`` of a TCP log collector."""


class FileBackend(Spec):
    format: Format | None = None
    path: KStr = ""
    """The file to append to."""


class OtelAttribute(Spec):
    key: KStr = ""
    value: KStr = ""


class OtelBackend(Spec):
    attributes: list[OtelAttribute] | None = None
    body: Any = None
    """The log record body (any JSON; may use placeholders)."""
    endpoint: KStr = ""
    """``host:port`` of an OpenTelemetry collector (or use ``backendRef``)."""
    backend_ref: BackendResourceRef | None = None


class Backend(Spec):
    type: KStr = ""
    """``File``, ``Tcp`` or ``OpenTelemetry``."""
    tcp: TcpBackend | None = None
    file: FileBackend | None = None
    open_telemetry: OtelBackend | None = None


class Conf(Spec):
    backends: list[Backend] | None = None


class To(Spec):
    target_ref: TargetRef = TargetRef()
    default: Conf | None = None


class From(Spec):
    target_ref: TargetRef = TargetRef()
    default: Conf | None = None


class Rule(Spec):
    matches: list[Match] | None = None
    default: Conf | None = None


class MeshAccessLogSpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    to: list[To] | None = None
    from_: list[From] | None = alias("from", "from_")
    rules: list[Rule] | None = None


_TOP = ("Mesh", "MeshSubset", "MeshGateway", "MeshService", "MeshServiceSubset", "Dataplane")
_MUST_STATIC = "must be a static OpenTelemetry attribute name; placeholders are only supported in values"
_OTEL_NAME = (
    "must start with a lowercase letter, use only lowercase letters, digits, '.' or '_', "
    "avoid consecutive delimiters, and end with a letter or digit"
)


def _format(f: Format) -> Found:
    if f.type == "Plain":
        if f.plain is None:
            yield ("plain",), "must be defined"
        elif f.plain == "":
            yield ("plain",), "must not be empty"
    elif f.type == "Json":
        if f.json_ is None:
            yield ("json",), "must be defined"
            return
        if not f.json_:
            yield ("json",), "must not be empty"
        for i, kv in enumerate(f.json_):
            p: Path = ("json", i)
            if kv.key == "":
                yield (*p, "key"), "key cannot be empty"
            if kv.value == "":
                yield (*p, "value"), "value cannot be empty"
            try:
                json.loads(f'{{"{kv.key}": "{kv.value}"}}')
            except ValueError:
                yield p, "is not a valid JSON object"
    else:
        yield ("type",), f"unknown format type {f.type!r}; use Plain or Json"


def _otel_attribute(path: Path, key: str) -> Found:
    import re

    if key == "":
        yield path, "must be defined"
    elif "%" in key:
        yield path, _MUST_STATIC
    elif key.startswith("otel."):
        yield path, "must not use the reserved OpenTelemetry prefix 'otel.'"
    elif not re.match(r"^[a-z](?:[a-z0-9]|[._][a-z0-9])*$", key):
        yield path, _OTEL_NAME


def _backend(b: Backend) -> Found:
    if b.type == "File":
        if b.file is None:
            yield ("file",), "must be defined"
            return
        if b.file.format is not None:
            yield from at(("file", "format"), _format(b.file.format))
        if not is_file_path(b.file.path):
            yield ("file", "path"), "file backend requires a valid path"
    elif b.type == "Tcp":
        if b.tcp is None:
            yield ("tcp",), "must be defined"
            return
        if b.tcp.format is not None:
            yield from at(("tcp", "format"), _format(b.tcp.format))
        if not is_url(b.tcp.address):
            yield ("tcp", "address"), "tcp backend requires valid address"
    elif b.type == "OpenTelemetry":
        o = b.open_telemetry
        if o is None:
            yield ("openTelemetry",), "must be defined"
            return
        yield from at(("openTelemetry",), otel_endpoint_or_ref(o.endpoint, o.backend_ref))
        for i, a in enumerate(o.attributes or []):
            yield from _otel_attribute(("openTelemetry", "attributes", i, "key"), a.key)
    else:
        yield ("type",), f"unknown backend type {b.type!r}; use File, Tcp or OpenTelemetry"


def _default(path: Path, conf: Conf | None) -> Found:
    c = conf or Conf()
    if c.backends is None:
        yield (*path, "backends"), "must be defined"
        return
    for i, be in enumerate(c.backends):
        yield from at((*path, "backends", i), _backend(be))


def check(spec: MeshAccessLogSpec) -> Found:
    to, frm, rules = spec.to or [], spec.from_ or [], spec.rules or []
    yield from at(
        ("targetRef",), target_ref(top(spec.target_ref), _TOP, gateway_tags=True, inbound=bool(rules or frm))
    )
    if rules and (to or frm):
        yield (), "fields 'to' and 'from' must be empty when 'rules' is defined"
    if not rules and not to and not frm:
        yield (), "at least one of 'from', 'to' or 'rules' has to be defined"
    kind = top(spec.target_ref).kind
    to_kinds = (
        ("Mesh",)
        if kind == "MeshGateway"
        else ("Mesh", "MeshService", "MeshExternalService", "MeshMultiZoneService", "MeshHTTPRoute")
    )
    for i, t in enumerate(to):
        yield from at(("to", i, "targetRef"), target_ref(t.target_ref, to_kinds))
        yield from _default(("to", i, "default"), t.default)
    for i, f in enumerate(frm):
        yield from at(("from", i, "targetRef"), target_ref(f.target_ref, ("Mesh",)))
        yield from _default(("from", i, "default"), f.default)
    for i, r in enumerate(rules):
        for j, m in enumerate(r.matches or []):
            yield from at(("rules", i, "matches", j), validate_match(m))
        yield from _default(("rules", i, "default"), r.default)


def _json_body(body: Any) -> str | None:
    return None if body is None else json.dumps(body, sort_keys=True, separators=(",", ":"))


def bundle_backend(x: dict[str, Any]) -> b.LoggingBackend | None:
    """One backend of a merged ``default`` (snake_case) as the bundle's; None for one the data
    planes cannot write (an OpenTelemetry ``backendRef``: meshc has no MeshOpenTelemetryBackend)."""
    kind = x.get("type")
    if kind == "OpenTelemetry":
        o = x.get("open_telemetry") or {}
        endpoint = o.get("endpoint") or ""
        if not endpoint:
            return None
        attrs = tuple((a.get("key") or "", a.get("value") or "") for a in o.get("attributes") or ())
        return b.LoggingBackend(
            name=f"otel:{endpoint}",
            type="otel",
            address=endpoint,
            body=_json_body(o.get("body")),
            attributes=attrs,
        )
    conf = (x.get("file") if kind == "File" else x.get("tcp") if kind == "Tcp" else None) or {}
    if not conf:
        return None
    fmt = conf.get("format") or {}
    plain = fmt.get("plain") if fmt.get("type") == "Plain" else None
    pairs = (
        tuple((kv.get("key") or "", kv.get("value") or "") for kv in fmt.get("json_") or ())
        if fmt.get("type") == "Json"
        else ()
    )
    omit = bool(fmt.get("omit_empty_values"))
    where = {"path": conf.get("path") or ""} if kind == "File" else {"address": conf.get("address") or ""}
    (value,) = where.values()
    return b.LoggingBackend(
        name=f"{str(kind).lower()}:{value}",
        type="file" if kind == "File" else "tcp",
        format=plain,
        json_format=pairs,
        omit_empty_values=omit,
        **where,
    )


def bundle_backends(m: dict[str, Any]) -> list[b.LoggingBackend]:
    """Every backend of a merged ``default`` the data planes write, in order."""
    return [x for x in (bundle_backend(y or {}) for y in m.get("backends") or ()) if x is not None]


def traffic_log(m: dict[str, Any]) -> b.TrafficLogConf | None:
    """A merged ``default`` (snake_case) as the bundle's log rule: its first backend, the rest in
    ``also`` (each gets every line); None when it has none (``backends: []`` turns logging off)."""
    backends = bundle_backends(m)
    if not backends:
        return None
    return b.TrafficLogConf(backend=backends[0], also=tuple(backends[1:]))


_OP = re.compile(b.LOG_OPERATOR_RE)


def _unknown_operators(text: str) -> list[str]:
    """The operators of a format string the data planes do not fill (written as ``-``)."""
    out: list[str] = []
    for m in _OP.finditer(text):
        name, arg = m.group(1), m.group(2)
        if name not in b.LOG_OPERATORS or (arg is not None and name != "REQ"):
            out.append(m.group(0))
    return out


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _formats(x: Backend) -> Iterator[tuple[Path, str]]:
    """(path under the backend, format string) for every string the data plane renders."""
    inner = x.file if x.type == "File" else x.tcp if x.type == "Tcp" else None
    if inner is not None and inner.format is not None:
        f = inner.format
        if f.type == "Plain" and f.plain:
            yield (x.type.lower(), "format", "plain"), f.plain
        for j, kv in enumerate(f.json_ or () if f.type == "Json" else ()):
            yield (x.type.lower(), "format", "json", j, "value"), kv.value
    o = x.open_telemetry if x.type == "OpenTelemetry" else None
    if o is not None:
        for j, a in enumerate(o.attributes or ()):
            yield ("openTelemetry", "attributes", j, "value"), a.value
        for text in _strings(o.body):
            yield ("openTelemetry", "body"), text


def not_applied(conf: Conf | None) -> Iterator[tuple[Path, str]]:
    """(path under ``default``, what) for each backend or operator the data planes cannot honour."""
    for i, x in enumerate((conf.backends if conf else None) or ()):
        if (
            x.type == "OpenTelemetry"
            and x.open_telemetry is not None
            and x.open_telemetry.backend_ref is not None
        ):
            where = ("backends", i, "openTelemetry", "backendRef")
            yield where, "an OpenTelemetry backendRef (meshc has no MeshOpenTelemetryBackend; set `endpoint`)"
            continue
        if (
            x.type == "OpenTelemetry"
            and x.open_telemetry is not None
            and otlp_grpc_port(x.open_telemetry.endpoint)
        ):
            yield ("backends", i, "openTelemetry", "endpoint"), OTLP_GRPC_PORT
        seen: set[str] = set()
        for path, text in _formats(x):
            for op in _unknown_operators(text):
                if op not in seen:
                    seen.add(op)
                    yield ("backends", i, *path), f"the operator {op} (the data planes write it as '-')"


KIND = kind_def("MeshAccessLog", MeshAccessLogSpec, check, __doc__ or "", compiled=True)
