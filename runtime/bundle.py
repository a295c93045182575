"""The bundle contract between the compiler and the data plane (DESIGN §4).

A bundle is fully resolved policy: defaults filled in, durations in integer milliseconds,
selectors already matched. The sidecar never re-interprets policy text, so everything here is
plain data that the engine can precompile into lookup tables on load.

Two bundle types exist:

* ``MeshBundle`` (one per mesh, sent to every data plane): the catalog, mesh settings and, per
  destination, the outbound config that a source without a specific policy gets.
* ``ServiceBundle`` (one per service and one per gateway): the inbound rules of that service and
  the outbound config for every destination that some policy names this service as a source of.

Rules that depend on tags are kept as ordered ``Rule`` lists (most specific first). The data
plane takes the first rule whose ``when`` tags its own instance carries and whose ``peer`` tags
the other side carries (outbound: the chosen destination subset; inbound: the caller).

This module imports only pydantic and the standard library: it is loaded by the sidecar.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    model_serializer,
)

__all__ = [
    "BUNDLE_FORMAT",
    "INBOUND_OPTIONAL",
    "LABEL_KEY",
    "LOG_OPERATORS",
    "LOG_OPERATOR_RE",
    "AnyBundle",
    "BackOff",
    "BundleError",
    "CatalogService",
    "CircuitBreakerConf",
    "Destination",
    "Detectors",
    "FaultInjectionConf",
    "GatewayBackend",
    "GatewayCertificate",
    "GatewayConf",
    "GatewayFilter",
    "GatewayListener",
    "GatewayMatch",
    "GatewayRule",
    "GrpcHealthCheck",
    "HeaderChange",
    "HeaderOps",
    "HealthCheckConf",
    "HttpHealthCheck",
    "HttpRoute",
    "Inbound",
    "LoadBalancer",
    "LoggingBackend",
    "MeshBundle",
    "Mtls",
    "RateLimitConf",
    "RetryConf",
    "RouteConf",
    "Rule",
    "ServiceBundle",
    "ServiceTracing",
    "Split",
    "StringMatch",
    "TcpHealthCheck",
    "TimeoutConf",
    "TraceTag",
    "TracingBackend",
    "TrafficLogConf",
    "bundle_digest",
    "canonical_json",
    "load_bundle",
]

BUNDLE_FORMAT = 1
"""The only format this runtime understands; a sidecar NACKs any other."""

MAX_BUNDLE_BYTES = 16 * 1024 * 1024
"""A push larger than this is refused before it is parsed."""


class BundleError(ValueError):
    """A bundle that must not be applied; the message is the NACK reason."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Sparse(_Frozen):
    """A model whose ``_OPTIONAL`` fields are left out of its JSON while empty: fields added
    after bundles existed keep the digests of the bundles that do not use them."""

    _OPTIONAL: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_unused(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for name in self._OPTIONAL:
            if not out.get(name):
                out.pop(name, None)
        return out


Tags = dict[str, str]
"""Tag name -> value; ``*`` as a value matches any value."""

LABEL_KEY = "label:"
"""A ``Rule.when`` key with this prefix names a Dataplane label of the local instance (Kuma's
Dataplane targetRef ``labels``, ``name`` and ``namespace``), not a tag: tag names cannot hold
a colon, so the two never meet."""

T = TypeVar("T")


class Rule(_Frozen, Generic[T]):
    """One candidate config, valid where both tag conditions hold.

    Lists of rules are ordered most specific first and end, when the kind is configured at all,
    with an unconditional rule, so a lookup always finds an answer.
    """

    when: Tags = Field(
        default_factory=dict,
        description=(
            "Tags the local instance must carry; a key `label:NAME` is its Dataplane label NAME "
            "(a sidecar's `--label`), not a tag."
        ),
    )
    peer: Tags = Field(
        default_factory=dict,
        description=(
            "Tags the other side must carry: the destination subset (outbound) or the caller (inbound)."
        ),
    )
    conf: T


# --- outbound: routing -------------------------------------------------------------------------


class StringMatch(_Frozen):
    """How a request attribute is compared."""

    kind: Literal["exact", "prefix", "regex"]
    value: str


class HeaderChange(_Frozen):
    name: str
    value: str
    append: bool = False


class HeaderOps(_Frozen):
    add: tuple[HeaderChange, ...] = ()
    remove: tuple[str, ...] = ()


class Split(_Frozen):
    """A weighted target: a service and the subset tags its endpoints must carry."""

    weight: int = Field(ge=0)
    service: str
    tags: Tags = Field(default_factory=dict)


class HttpMatch(_Frozen):
    method: StringMatch | None = None
    path: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()


class PathRewrite(_Frozen):
    prefix: str | None = Field(default=None, description="Replaces the matched path prefix.")
    regex: str | None = None
    substitution: str | None = None


class HostRewrite(_Frozen):
    value: str | None = None
    from_path_regex: str | None = None
    from_path_substitution: str | None = None


class HttpModify(_Frozen):
    path: PathRewrite | None = None
    host: HostRewrite | None = None
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()


class HttpRoute(_Sparse):
    """An ordered ``http`` entry of a TrafficRoute: first match wins.

    ``timeout`` and ``retry``: a MeshTimeout or MeshRetry that targets the MeshHTTPRoute this
    rule came from, merged over the destination's own (Kuma's route-level conf); the requests this
    rule matches use them in place of the destination's. Left out of the JSON while None, so a
    route without them keeps the bytes, and the digest, it had before they existed."""

    match: HttpMatch
    modify: HttpModify | None = None
    split: tuple[Split, ...]
    timeout: TimeoutConf | None = Field(
        default=None,
        description=(
            "The rule's own request timeout and stream idle timeout (the other timeouts stay the "
            "destination's); None: the destination's."
        ),
    )
    retry: RetryConf | None = Field(
        default=None,
        description="The rule's own HTTP and gRPC retries; None: the destination's.",
    )

    _OPTIONAL = ("retry", "timeout")


class LoadBalancer(_Frozen):
    type: Literal["round_robin", "least_request", "ring_hash", "random", "maglev"] = "round_robin"
    choice_count: int = 2
    hash_function: Literal["XX_HASH", "MURMUR_HASH_2"] = "XX_HASH"
    min_ring_size: int = 1024
    max_ring_size: int = 8388608


class RouteConf(_Frozen):
    """Where requests to a destination go; the default is the whole service, round robin."""

    split: tuple[Split, ...]
    http: tuple[HttpRoute, ...] = ()
    load_balancer: LoadBalancer = LoadBalancer()


# --- outbound: resilience ----------------------------------------------------------------------


class HttpHealthCheck(_Frozen):
    path: str = "/"
    request_headers: tuple[HeaderChange, ...] = ()
    expected_statuses: tuple[int, ...] = ()


class TcpHealthCheck(_Frozen):
    send: str | None = Field(default=None, description="Base64 payload to send.")
    receive: tuple[str, ...] = ()


class GrpcHealthCheck(_Frozen):
    """The standard ``grpc.health.v1.Health/Check`` call over HTTP/2; only SERVING passes."""

    service_name: str = Field(default="", description="The `service` asked about; empty: the whole server.")
    authority: str | None = Field(
        default=None, description="The request's `:authority`; None: the destination's service name."
    )


class HealthCheckConf(_Frozen):
    interval_ms: int
    timeout_ms: int
    unhealthy_threshold: int
    healthy_threshold: int
    initial_jitter_ms: int = 0
    interval_jitter_ms: int = 0
    interval_jitter_percent: int = 0
    healthy_panic_threshold: float = 50.0
    fail_traffic_on_panic: bool = False
    no_traffic_interval_ms: int = 60000
    reuse_connection: bool = True
    http: HttpHealthCheck | None = None
    tcp: TcpHealthCheck | None = None
    grpc: GrpcHealthCheck | None = None
    """Used when ``http`` is not set (meshc's ``http`` protocol covers gRPC services too, so the
    destination's protocol cannot choose as Kuma's does); ``tcp`` only when neither is set."""

    def check_kind(self) -> str:
        """Which check runs: ``http``, ``grpc`` or ``tcp`` (an empty conf: an HTTP GET of ``/``)."""
        if self.http is not None or (self.grpc is None and self.tcp is None):
            return "http"
        return "grpc" if self.grpc is not None else "tcp"


class Consecutive(_Frozen):
    consecutive: int = 5


class StandardDeviation(_Frozen):
    request_volume: int = 100
    minimum_hosts: int = 5
    factor: float = 1.9


class FailurePercentage(_Frozen):
    request_volume: int = 50
    minimum_hosts: int = 5
    threshold: int = 85


class Detectors(_Frozen):
    total_errors: Consecutive | None = None
    gateway_errors: Consecutive | None = None
    local_errors: Consecutive | None = None
    standard_deviation: StandardDeviation | None = None
    failure: FailurePercentage | None = None


class Thresholds(_Frozen):
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3


class CircuitBreakerConf(_Frozen):
    interval_ms: int = 10000
    base_ejection_time_ms: int = 30000
    max_ejection_percent: int = 10
    split_external_and_local_errors: bool = False
    thresholds: Thresholds = Thresholds()
    detectors: Detectors = Detectors()
    healthy_panic_threshold: float | None = Field(
        default=None,
        description=(
            "MeshCircuitBreaker's outlierDetection.healthyPanicThreshold (percent): below it, "
            "traffic goes to ejected hosts too (Envoy's panic routing); None: Envoy's 50. Left "
            "out of the JSON while None."
        ),
    )

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if out.get("healthy_panic_threshold") is None:
            out.pop("healthy_panic_threshold", None)
        return out


class BackOff(_Frozen):
    base_interval_ms: int
    max_interval_ms: int


class HttpRetry(_Frozen):
    num_retries: int = 5
    per_try_timeout_ms: int = 0
    back_off: BackOff | None = None
    retriable_status_codes: tuple[int, ...] = ()
    retriable_methods: tuple[str, ...] = ()
    retry_on: tuple[str, ...] = ()


class TcpRetry(_Frozen):
    max_connect_attempts: int


class RetryConf(_Frozen):
    http: HttpRetry | None = None
    grpc: HttpRetry | None = None
    tcp: TcpRetry | None = None


class TimeoutConf(_Frozen):
    """Kuma's ``timeout-all-default`` values unless a Timeout policy says otherwise."""

    connect_timeout_ms: int = 5000
    tcp_idle_timeout_ms: int = 3600000
    http_request_timeout_ms: int = 15000
    http_idle_timeout_ms: int = 3600000
    http_stream_idle_timeout_ms: int = 1800000
    http_max_stream_duration_ms: int = 0
    http_max_connection_duration_ms: int = Field(
        default=0, description="Connections to the next hop are retired after this long; 0: never."
    )
    http_request_headers_timeout_ms: int = Field(
        default=0,
        description=(
            "Inbound: the time a request head may take to arrive (replaces the listener's "
            "--header-timeout); 0: the listener's."
        ),
    )

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for name in TIMEOUT_OPTIONAL:
            if not out.get(name):
                out.pop(name, None)
        return out


TIMEOUT_OPTIONAL = ("http_max_connection_duration_ms", "http_request_headers_timeout_ms")
"""``TimeoutConf`` fields written only when set (MeshTimeout's; bundles without them keep their
bytes and digests)."""


class LoggingBackend(_Sparse):
    name: str
    type: Literal["file", "tcp", "otel"]
    format: str | None = None
    """A Plain format string (Envoy command operators, Kuma's ``%KUMA_*%`` placeholders); None
    with no ``json_format``: meshc's JSON line."""
    path: str | None = None
    address: str | None = None
    """``host:port`` of a TCP log collector (``tcp``) or of an OTLP/HTTP collector (``otel``)."""
    json_format: tuple[tuple[str, str], ...] = ()
    """A Json format: (key, format string) pairs, one JSON object per line."""
    omit_empty_values: bool = False
    """Leave out the Json keys (or Plain operators) whose value is empty."""
    body: str | None = None
    """``otel``: the log record body as JSON text (an OTLP AnyValue, or a string); None: the
    Plain ``format`` (or Kuma's default line) as a string."""
    attributes: tuple[tuple[str, str], ...] = ()
    """``otel``: (attribute name, format string) pairs on each log record."""

    _OPTIONAL = ("json_format", "omit_empty_values", "body", "attributes")


LOG_OPERATORS = frozenset(
    {
        "START_TIME",
        "DURATION",
        "RESPONSE_CODE",
        "PROTOCOL",
        "UPSTREAM_HOST",
        "UPSTREAM_CLUSTER",
        "TRACE_ID",
        "GRPC_STATUS",
        "REQ",
        "KUMA_MESH",
        "KUMA_SOURCE_SERVICE",
        "KUMA_DESTINATION_SERVICE",
        "KUMA_TRAFFIC_DIRECTION",
        "KUMA_ZONE",
        "KUMA_WORKLOAD",
    }
)
"""The command operators (Envoy's, without arguments or ``%``) and Kuma placeholders a data plane
fills in a log format (``runtime.accesslog``); any other is written as ``-`` (``null`` in Json)."""
LOG_OPERATOR_RE = r"%([A-Z][A-Z0-9_]*)(?:\(([^)]*)\))?(?::(\d+))?%"
"""A command operator in a log format: ``%NAME%``, ``%NAME(ARG)%``, ``%NAME(ARG):LEN%``."""


class TrafficLogConf(_Sparse):
    backend: LoggingBackend
    also: tuple[LoggingBackend, ...] = ()
    """Further backends of the same rule: each gets the line too (Kuma writes every backend)."""

    _OPTIONAL = ("also",)

    @property
    def backends(self) -> tuple[LoggingBackend, ...]:
        return (self.backend, *self.also)


HttpRoute.model_rebuild()  # its timeout and retry are defined after it
RouteConf.model_rebuild()


class Destination(_Frozen):
    """The full outbound config for one destination service, each kind as an ordered rule list."""

    route: tuple[Rule[RouteConf], ...]
    timeout: tuple[Rule[TimeoutConf], ...]
    retry: tuple[Rule[RetryConf], ...] = ()
    circuit_breaker: tuple[Rule[CircuitBreakerConf], ...] = ()
    health_check: tuple[Rule[HealthCheckConf], ...] = ()
    traffic_log: tuple[Rule[TrafficLogConf], ...] = ()


# --- inbound -----------------------------------------------------------------------------------


class FaultDelay(_Frozen):
    percentage: float
    value_ms: int


class FaultAbort(_Frozen):
    percentage: float
    http_status: int


class FaultBandwidth(_Frozen):
    percentage: float
    limit_bps: int = Field(description="Bits per second.")


class FaultInjectionConf(_Frozen):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    response_bandwidth: FaultBandwidth | None = None


class RateLimitConf(_Frozen):
    requests: int
    interval_ms: int
    status: int = 429
    headers: tuple[HeaderChange, ...] = ()


class Inbound(_Frozen):
    """Inbound rules: ``peer`` matches the caller, ``when`` this instance's own tags.

    ``timeout``, ``circuit_breaker`` and ``traffic_log`` (Kuma's inbound MeshTimeout,
    MeshCircuitBreaker, MeshAccessLog) are left out of the serialized form while empty, so a
    bundle without them keeps the bytes, and the digest, it had before they existed."""

    permissions: tuple[Rule[None], ...] = Field(
        default=(), description="Any matching rule allows the caller (permissions add up)."
    )
    rate_limit: tuple[Rule[RateLimitConf], ...] = ()
    fault_injection: tuple[Rule[FaultInjectionConf], ...] = ()
    timeout: tuple[Rule[TimeoutConf], ...] = Field(
        default=(),
        description=(
            "Requests to the local app: the first matching rule's connect, request (504), stream "
            "idle and max stream duration (408, or a reset once the response began) timeouts; the "
            "rule for every caller's request headers timeout (408) on the inbound listener; none: "
            "no request or stream timeout."
        ),
    )
    circuit_breaker: tuple[Rule[CircuitBreakerConf], ...] = Field(
        default=(),
        description=(
            "The first matching rule's connection limits bound the requests in flight to the local "
            "app (503, counted as an overflow, past them); its detectors eject the app (the "
            "inbound's one host), which fails requests fast (503 no healthy upstream) only where "
            "healthy_panic_threshold is 0: otherwise Envoy's panic routing sends them on."
        ),
    )
    traffic_log: tuple[Rule[TrafficLogConf], ...] = Field(
        default=(),
        description="Every matching rule logs the request to its backend (inbound access logs add up).",
    )

    @model_serializer(mode="wrap")
    def _omit_empty(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for name in INBOUND_OPTIONAL:
            if not out.get(name):
                out.pop(name, None)
        return out


INBOUND_OPTIONAL = ("circuit_breaker", "timeout", "traffic_log")
"""The ``Inbound`` fields written only when they hold rules (``Inbound._omit_empty``)."""


# --- gateway -----------------------------------------------------------------------------------


class GatewayMatch(_Frozen):
    path: StringMatch | None = None
    method: str | None = None
    headers: tuple[tuple[str, Literal["exact", "regex", "present", "absent"], str], ...] = ()
    query: tuple[tuple[str, Literal["exact", "regex"], str], ...] = ()


class GatewayFilter(_Frozen):
    type: Literal["request_header", "response_header", "mirror", "redirect", "rewrite"]
    set: tuple[HeaderChange, ...] = ()
    add: tuple[HeaderChange, ...] = ()
    remove: tuple[str, ...] = ()
    mirror: Split | None = None
    mirror_percentage: float = 100.0
    redirect_scheme: str | None = None
    redirect_hostname: str | None = None
    redirect_port: int | None = None
    redirect_status: int = 302
    redirect_path: str | None = None
    rewrite_full: str | None = None
    rewrite_prefix: str | None = None
    host_to_backend_hostname: bool = False


class GatewayBackend(_Frozen):
    weight: int
    service: str
    tags: Tags = Field(default_factory=dict)


class GatewayRule(_Sparse):
    """One rule; rules are sorted by specificity so the first match wins.

    ``timeout`` and ``retry`` as ``HttpRoute``'s: a MeshTimeout or MeshRetry that targets the
    MeshHTTPRoute (on a MeshGateway) this rule came from, merged over the gateway's own mesh-wide
    conf (Kuma's route-level conf on a gateway route); left out of the JSON while None."""

    hostnames: tuple[str, ...] = ()
    matches: tuple[GatewayMatch, ...]
    filters: tuple[GatewayFilter, ...] = ()
    backends: tuple[GatewayBackend, ...] = ()
    timeout: TimeoutConf | None = Field(
        default=None,
        description="The rule's own request and stream idle timeouts; None: the backend's.",
    )
    retry: RetryConf | None = Field(
        default=None, description="The rule's own HTTP and gRPC retries; None: the backend's."
    )
    rate_limit: RateLimitConf | None = Field(
        default=None,
        description="The rule's local rate limit (a MeshRateLimit on its MeshHTTPRoute); None: none.",
    )

    _OPTIONAL = ("rate_limit", "retry", "timeout")


class GatewayCertificate(_Frozen):
    """A certificate from a Kubernetes ``kubernetes.io/tls`` Secret (Kuma's ``secret`` data
    source): the gateway reads ``tls.crt`` and ``tls.key`` from ``--tls-secrets-dir``/NAME, where
    the Secret is mounted. Only the name is in a bundle, never key material."""

    secret: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)
    """A Secret name (DNS-1123 subdomain): one path component, so it cannot leave the dir."""


class GatewayListener(_Frozen):
    port: int
    protocol: Literal["HTTP", "HTTPS", "TCP", "TLS"]
    hostname: str = "*"
    tags: Tags = Field(default_factory=dict)
    connection_limit: int | None = None
    rules: tuple[GatewayRule, ...] = ()
    tcp_backends: tuple[GatewayBackend, ...] = ()
    certificates: tuple[str | GatewayCertificate, ...] = ()
    """``HTTPS`` with ``tls.mode: TERMINATE``: each a PEM file on the gateway's host holding a
    certificate chain and its private key (Kuma's ``file`` data source, a path string) or a
    mounted Secret (``{secret: NAME}``); the first is the default, the others are chosen by SNI.
    Paths and names, never key material: keys stay out of bundles (a file-only listener
    serializes as before, so its bundle digest did not change)."""


class GatewayConf(_Frozen):
    tags: Tags = Field(default_factory=dict)
    listeners: tuple[GatewayListener, ...]


# --- bundles -----------------------------------------------------------------------------------


class CatalogService(_Frozen):
    port: int
    protocol: Literal["http", "tcp"]
    subsets: tuple[Tags, ...] = ()
    gateway: bool = False


class Mtls(_Frozen):
    enabled: bool = False
    mode: Literal["STRICT", "PERMISSIVE"] = "STRICT"
    backend: str | None = None
    backend_type: Literal["builtin", "provided"] | None = None
    cert_rotation_ms: int = 86400000


class TraceTag(_Frozen):
    """A span attribute: a ``literal`` value, or the request ``header``'s (else ``default``)."""

    name: str
    literal: str | None = None
    header: str | None = None
    default: str | None = None


class TracingBackend(_Sparse):
    """A tracing backend: the Mesh's default one (Kuma's ``tracing.backends``, type ``zipkin``)
    or a MeshTrace's Zipkin or OpenTelemetry backend."""

    name: str
    type: Literal["zipkin", "otel"] = "zipkin"
    sampling: float = 100.0
    """Percentage of new traces sampled (0-100); an incoming trace context keeps its decision."""
    url: str
    """Zipkin v2 spans endpoint (``http://collector:9411/api/v2/spans``), or for ``otel`` the
    OTLP/HTTP traces endpoint (``http://collector:4318/v1/traces``, JSON encoding)."""
    b3: bool = True
    """Read and send B3 headers (``b3`` and ``X-B3-*``) besides ``traceparent``: Envoy's Zipkin
    tracer, which Kuma configures, speaks B3."""
    tags: tuple[TraceTag, ...] = ()
    """Attributes every span of these data planes carries (MeshTrace ``tags``)."""

    _OPTIONAL = ("tags",)


class ServiceTracing(_Frozen):
    """Tracing of this service's data planes when a MeshTrace selects the service itself: it
    replaces the mesh bundle's ``tracing`` for them."""

    backend: TracingBackend | None = None
    """None: not traced (a MeshTrace with ``backends: []``); trace context is still propagated."""


class MeshBundle(_Frozen):
    """Sent to every data plane of the mesh."""

    format: Literal[1] = 1
    type: Literal["mesh"] = "mesh"
    mesh: str
    mtls: Mtls = Mtls()
    passthrough: bool = True
    logging: tuple[LoggingBackend, ...] = ()
    tracing: TracingBackend | None = None
    services: dict[str, CatalogService]
    destinations: dict[str, Destination]


class ServiceBundle(_Sparse):
    """Sent to the data planes of one service (or one gateway)."""

    format: Literal[1] = 1
    type: Literal["service"] = "service"
    mesh: str
    service: str
    inbound: Inbound = Inbound()
    outbound: dict[str, Destination] = Field(default_factory=dict)
    gateway: GatewayConf | None = None
    tracing: ServiceTracing | None = None
    """None: the mesh bundle's ``tracing`` applies (left out of the JSON: the bytes, and the
    digest, of a service bundle from before the field, which older data planes take)."""

    _OPTIONAL = ("tracing",)


AnyBundle = Annotated[MeshBundle | ServiceBundle, Field(discriminator="type")]
_ADAPTER: TypeAdapter[MeshBundle | ServiceBundle] = TypeAdapter(AnyBundle)


def canonical_json(data: Any) -> bytes:
    """Sorted keys, fixed separators, UTF-8: the same data always gives the same bytes."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def bundle_bytes(bundle: MeshBundle | ServiceBundle) -> bytes:
    return canonical_json(bundle.model_dump(mode="json"))


def bundle_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection for a moment: building ~100k acyclic objects at once (a
    mesh bundle, an engine snapshot) otherwise runs several generation-2 passes over all of them
    and doubles the time it takes. Nesting and threads are fine: it only re-enables what it
    disabled."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_bundle(data: bytes, expected_digest: str | None = None) -> MeshBundle | ServiceBundle:
    """Parse and check pushed or stored bytes; raise ``BundleError`` with the NACK reason.

    The common case (a good bundle) is parsed and validated in one pass in pydantic-core, straight
    from the bytes; only a bundle that fails there is parsed again step by step so that the NACK
    names the first check it fails (JSON, object, format, schema) with the same reason as ever.
    """
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle is {len(data)} bytes, over the {MAX_BUNDLE_BYTES} byte limit")
    if expected_digest is not None:
        actual = bundle_digest(data)
        if actual != expected_digest:
            raise BundleError(f"digest mismatch: body hashes to {actual}, not {expected_digest}")
    try:
        with gc_paused():
            bundle = _ADAPTER.validate_json(data)
    except ValueError:
        pass
    else:
        # ``format`` has a default: a bundle that does not say its format is still refused.
        if "format" in bundle.model_fields_set:
            return bundle
    return _load_slowly(data)


def _load_slowly(data: bytes) -> MeshBundle | ServiceBundle:
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle is not JSON: {e}") from e
    if not isinstance(raw, dict):
        raise BundleError("bundle is not a JSON object")
    if raw.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"unknown bundle format {raw.get('format')!r}; this data plane knows {BUNDLE_FORMAT}"
        )
    try:
        return _ADAPTER.validate_python(raw)
    except ValueError as e:
        raise BundleError(f"bundle does not match the schema: {e}") from e


def bundle_json_schema() -> dict[str, Any]:
    return _ADAPTER.json_schema()
