"""MeshTrace: where proxies send traces (Zipkin, Datadog, OpenTelemetry), sampling and span tags.

A single top-level `default` (no `to`/`from`): at most one backend; `sampling.overall`,
`client` and `random` are percentages (Kuma's default 100); each tag takes a `literal` or a
request `header`.

meshc compiles it into the bundles' tracing backend, as Kuma configures Envoy's tracer. The
top-level `targetRef` selects the proxies: `Mesh` (every data plane), or `MeshService` /
`MeshSubset` naming a `kuma.io/service` (that service's data planes only); more specific policies
win and their `default`s merge, as for every targetRef kind. A `Zipkin` backend's data planes
report spans to its `url` (Zipkin v2 JSON) and propagate B3 (`b3` and `X-B3-*`) besides W3C
`traceparent`; an `OpenTelemetry` backend's export spans as OTLP/HTTP JSON to
`http://<endpoint>/v1/traces` (point `endpoint` at the collector's OTLP/HTTP receiver, port 4318
by convention: the data planes do not speak OTLP/gRPC, and an endpoint on 4317 is W3006) and
propagate `traceparent`. A new trace is sampled with `random` x `overall` percent (each 100 by
default; an incoming trace keeps its caller's decision). Each of `tags` is an attribute of every
span: its `literal`, or the request `header`'s value (else its `default`; no attribute when
neither). Spans leave through a bounded queue off the data path (a dead collector never slows a
request; lost spans are counted in `meshc_tracing_spans_dropped` / `_failed`). `backends: []`
turns tracing off for the proxies it selects. Where a MeshTrace and the Mesh's legacy `tracing`
both apply, the MeshTrace wins (W3005). What the data planes cannot honour is reported as having
no effect (W3006): a `Datadog` backend and an OpenTelemetry `backendRef` (those proxies are not
traced), `sampling.client`, `apiVersion: httpProto`; a top-level `MeshGateway`,
`MeshServiceSubset` or `Dataplane`, or a `MeshSubset` with tags other than `kuma.io/service`.
Every request a data plane handles gets a span, those it answers itself too (403, 429, 503, 504, a
fault's abort), tagged `error` and `meshc.reason`.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshTrace
    metadata: {name: tracing, labels: {kuma.io/mesh: default}}
    spec:
      default:
        backends: [{type: Zipkin, zipkin: {url: "http://zipkin:9411/api/v2/spans"}}]
        sampling: {overall: 10}

Invalid (two backends)::

    default: {backends: [{type: Zipkin, zipkin: {url: "http://a:9411"}}, {type: Zipkin, zipkin: {url: "http://b:9411"}}]}
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from urllib.parse import urlsplit

from pydantic import Field

from compiler.diagnostics import Path
from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    OTLP_GRPC_PORT,
    BackendResourceRef,
    Bool,
    Found,
    IntOrString,
    KStr,
    TargetRef,
    at,
    decimal_of,
    is_url,
    kind_def,
    otel_endpoint_or_ref,
    otlp_grpc_port,
    target_ref,
)
from runtime import bundle as b


class Zipkin(Spec):
    url: KStr = ""
    """The collector's span endpoint."""
    trace_id128bit: Bool = Field(
        default=False, validation_alias="traceId128bit", serialization_alias="traceId128bit"
    )
    api_version: KStr = ""
    """``httpJson`` (default) or ``httpProto``."""
    shared_span_context: Bool = False


class Datadog(Spec):
    url: KStr = ""
    """``http://host:port`` of the Datadog agent (no path)."""
    split_service: Bool = False


class OpenTelemetry(Spec):
    endpoint: KStr = ""
    backend_ref: BackendResourceRef | None = None


class Backend(Spec):
    type: KStr = ""
    """``Zipkin``, ``Datadog`` or ``OpenTelemetry``."""
    zipkin: Zipkin | None = None
    datadog: Datadog | None = None
    open_telemetry: OpenTelemetry | None = None


class Sampling(Spec):
    overall: IntOrString | None = None
    client: IntOrString | None = None
    random: IntOrString | None = None


class HeaderTag(Spec):
    name: KStr = ""
    default: KStr | None = None


class Tag(Spec):
    name: KStr = ""
    literal: KStr | None = None
    header: HeaderTag | None = None


class Conf(Spec):
    backends: list[Backend] | None = None
    sampling: Sampling | None = None
    tags: list[Tag] | None = None


class MeshTraceSpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    default: Conf | None = None


_TOP = ("Mesh", "MeshSubset", "MeshGateway", "MeshService", "MeshServiceSubset", "Dataplane")


def _datadog(path: Path, url: str) -> Found:
    p: Path = (*path, "url")
    try:
        u = urlsplit(url)
        if not u.scheme or not (u.netloc or u.path.startswith("/")):
            raise ValueError(url)
        port = u.port if u.netloc else None
    except ValueError:
        if url.startswith(("http://", "https://")) and ":" in url.split("//", 1)[1]:
            yield p, "port must be a valid (1-65535)"
            return
        yield p, "must be a valid url"
        return
    if u.scheme != "http":
        yield p, "scheme must be http"
    if port is None:
        yield p, "port must be defined"
    elif not 0 < port <= 65535:
        yield p, "port must be a valid (1-65535)"
    for name, set_ in (
        ("user", "@" in u.netloc),
        ("path", u.path != ""),
        ("query", u.query != ""),
        ("fragment", u.fragment != ""),
    ):
        if set_:
            yield p, f"{name} must not be defined"


def _backend(path: Path, b: Backend) -> Found:
    if b.type == "Datadog":
        if b.datadog is None:
            yield (*path, "datadog"), "must be defined"
        else:
            yield from _datadog((*path, "datadog"), b.datadog.url)
    elif b.type == "Zipkin":
        if b.zipkin is None:
            yield (*path, "zipkin"), "must be defined"
        elif b.zipkin.url == "":
            yield (*path, "zipkin", "url"), "must not be empty"
        elif not is_url(b.zipkin.url):
            yield (*path, "zipkin", "url"), "must be a valid url"
    elif b.type == "OpenTelemetry":
        if b.open_telemetry is None:
            yield (*path, "openTelemetry"), "must be defined"
        else:
            o = b.open_telemetry
            yield from at((*path, "openTelemetry"), otel_endpoint_or_ref(o.endpoint, o.backend_ref))
    else:
        yield (*path, "type"), f"unknown backend type {b.type!r}; use Zipkin, Datadog or OpenTelemetry"


def _sampling(path: Path, value: int | str) -> Found:
    dec = decimal_of(value)
    if dec is None:
        yield path, "string is not a number"
        yield path, "must be between 0 and 100"
    elif dec < 0 or dec > 100:
        yield path, "must be between 0 and 100"


def check(spec: MeshTraceSpec) -> Found:
    if spec.target_ref is not None:
        yield from at(("targetRef",), target_ref(spec.target_ref, _TOP))
    c = spec.default or Conf()
    bp: Path = ("default", "backends")
    if c.backends is None:
        yield bp, "must be defined"
    elif len(c.backends) == 1:
        yield from _backend((*bp, 0), c.backends[0])
    elif len(c.backends) > 1:
        yield bp, "must have zero or one backend defined"
    for i, t in enumerate(c.tags or []):
        if t.name == "":
            yield ("default", "tags", i, "name"), "must not be empty"
        if (t.header is not None) == (t.literal is not None):
            yield ("default", "tags", i), "tag must have only one type defined: header, literal"
    if (s := c.sampling) is not None:
        for f, v in (("client", s.client), ("random", s.random), ("overall", s.overall)):
            if v is not None:
                yield from _sampling(("default", "sampling", f), v)


def not_applied(conf: Conf | None) -> Iterator[tuple[Path, str]]:
    """(path under ``default``, what) for each setting the data planes cannot honour."""
    if conf is None:
        return
    for i, x in enumerate(conf.backends or ()):
        if x.type == "Datadog":
            yield (
                ("backends", i),
                "a Datadog backend (the data planes report spans to Zipkin and OpenTelemetry only: "
                "Datadog's agent takes its own span model with 64-bit ids and its x-datadog-* "
                "propagation, which they do not speak)",
            )
        elif x.type == "OpenTelemetry" and x.open_telemetry is not None and x.open_telemetry.backend_ref:
            where = ("backends", i, "openTelemetry", "backendRef")
            yield where, "an OpenTelemetry backendRef (meshc has no MeshOpenTelemetryBackend; set `endpoint`)"
        elif (
            x.type == "OpenTelemetry"
            and x.open_telemetry is not None
            and otlp_grpc_port(x.open_telemetry.endpoint)
        ):
            yield ("backends", i, "openTelemetry", "endpoint"), OTLP_GRPC_PORT
        elif x.zipkin is not None and x.zipkin.api_version == "httpProto":
            where = ("backends", i, "zipkin", "apiVersion")
            yield where, "`apiVersion: httpProto` (the data planes send Zipkin v2 JSON)"
    if conf.sampling is not None and conf.sampling.client is not None:
        yield (
            ("sampling", "client"),
            "`sampling.client` (no client-forced tracing: x-client-trace-id is not read)",
        )


def _pct(value: int | str | None) -> Decimal:
    dec = decimal_of(value) if value is not None else None
    return Decimal(100) if dec is None else dec


def _tags(conf: Conf) -> tuple[b.TraceTag, ...]:
    return tuple(
        b.TraceTag(name=t.name, literal=t.literal)
        if t.literal is not None
        else b.TraceTag(
            name=t.name,
            header=t.header.name if t.header is not None else None,
            default=t.header.default if t.header is not None else None,
        )
        for t in conf.tags or ()
    )


def to_backend(conf: Conf, name: str) -> b.TracingBackend | None:
    """A merged, checked ``default`` -> the bundles' tracing backend; None: these proxies are
    not traced (no backend, or one the data planes cannot report to). ``name``: the policy's.
    New traces are sampled with ``random`` x ``overall`` percent: Envoy's random sampling, then
    its overall cap. An OpenTelemetry ``endpoint`` is the collector's OTLP/HTTP receiver."""
    backend = conf.backends[0] if conf.backends else None
    if backend is None:
        return None
    if backend.type == "Zipkin" and backend.zipkin is not None:
        kind, url, b3 = "zipkin", backend.zipkin.url, True
    elif backend.type == "OpenTelemetry" and backend.open_telemetry and backend.open_telemetry.endpoint:
        kind, url, b3 = "otel", f"http://{backend.open_telemetry.endpoint}/v1/traces", False
    else:
        return None
    s = conf.sampling or Sampling()
    sampling = float(_pct(s.random) * _pct(s.overall) / 100)
    return b.TracingBackend(name=name, type=kind, sampling=sampling, url=url, b3=b3, tags=_tags(conf))


KIND = kind_def("MeshTrace", MeshTraceSpec, check, __doc__ or "", compiled=True)
