"""The sans-io decision engine: bundles + endpoints + a request's metadata -> what to do.

``Engine.build(mesh, service, endpoints)`` compiles an immutable ``Snapshot``: per destination
the ordered HTTP routes and split wheels, per split target (service + subset tags) the resolved
timeout, retry, circuit-breaker, health-check and traffic-log rules, the endpoints and a load
balancer; the inbound rate limits, faults and permissions; the gateway listeners. Compiling
raises ``BundleError`` (a NACK) for anything that cannot be enforced. ``Engine.install`` swaps
the snapshot in one assignment; a request keeps the snapshot it started with.

Mutable runtime state lives outside snapshots so it survives reloads: ``Host`` objects (ejection,
health, in-flight counts) in a ``HostRegistry`` and the rate-limit token buckets. Nothing here
touches a socket, a clock or a random source that is not injected.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

from runtime._hosts import Host, HostRegistry, Outcome
from runtime._lb import Balancer, Wheel, make_balancer
from runtime._match import SERVICE_TAG, StrMatcher, compile_string_match, first_rule, tags_match
from runtime._policy import Fault, RetryPolicy, TokenBucket
from runtime.bundle import (
    LABEL_KEY,
    BundleError,
    CatalogService,
    CircuitBreakerConf,
    Destination,
    GatewayFilter,
    GatewayListener,
    GatewayRule,
    HealthCheckConf,
    HttpRoute,
    LoadBalancer,
    MeshBundle,
    RateLimitConf,
    RouteConf,
    ServiceBundle,
    Split,
    TimeoutConf,
    TracingBackend,
    TrafficLogConf,
)
from runtime.headerops import filter_ops, modify_ops
from runtime.protocol import EndpointSet

__all__ = [
    "APP_CONNECT_S",
    "NO_APP_POLICY",
    "AppLimit",
    "AppPolicy",
    "DestinationTable",
    "Engine",
    "GatewayListenerTable",
    "GatewayRoute",
    "InboundTable",
    "RateLimit",
    "Route",
    "RoutePolicy",
    "Snapshot",
    "Target",
    "kube_aliases",
    "subset_label",
]

_DEFAULT_TIMEOUT = TimeoutConf()
_DEFAULT_PANIC = 50.0
_RR = LoadBalancer()


def _seconds(ms: int) -> float | None:
    return ms / 1000.0 if ms > 0 else None


def subset_label(tags: Mapping[str, str]) -> str:
    """``version=v1`` style label of a subset (the service tag left out), for metrics."""
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items()) if k != SERVICE_TAG)


class Target:
    """One split target (a service and subset tags) with everything resolved for it."""

    __slots__ = (
        "_avail",
        "_avail_until",
        "_avail_version",
        "_registry",
        "active",
        "balancer",
        "cb",
        "connect_timeout_s",
        "fail_on_panic",
        "grpc_retry",
        "hc",
        "hosts",
        "idle_timeout_s",
        "log",
        "max_active",
        "max_retries",
        "max_stream_s",
        "panic_threshold",
        "request_timeout_s",
        "retries_active",
        "retry",
        "service",
        "stream_idle_timeout_s",
        "subset",
        "tags",
        "tcp_connect_attempts",
        "tcp_idle_timeout_s",
    )

    def __init__(
        self,
        registry: HostRegistry,
        service: str,
        tags: Mapping[str, str],
        hosts: Sequence[Host],
        balancer: Balancer,
        timeout: TimeoutConf,
        retry: RetryPolicy | None,
        cb: CircuitBreakerConf | None,
        hc: HealthCheckConf | None,
        log: TrafficLogConf | None,
        tcp_connect_attempts: int,
        grpc_retry: RetryPolicy | None = None,
    ) -> None:
        self._registry = registry
        self.service = service
        self.tags = dict(tags)
        self.subset = subset_label(tags)
        self.hosts = tuple(hosts)
        self.balancer = balancer
        self.connect_timeout_s = _seconds(timeout.connect_timeout_ms)
        self.request_timeout_s = _seconds(timeout.http_request_timeout_ms)
        self.idle_timeout_s = _seconds(timeout.http_idle_timeout_ms)
        self.stream_idle_timeout_s = _seconds(timeout.http_stream_idle_timeout_ms)
        self.max_stream_s = _seconds(timeout.http_max_stream_duration_ms)
        """A request and its response, end to end, cut after this long (None: no limit)."""
        self.tcp_idle_timeout_s = _seconds(timeout.tcp_idle_timeout_ms)
        self.retry = retry
        self.grpc_retry = grpc_retry
        """Retry's ``grpc`` conf, for gRPC calls (``retry`` is for the rest)."""
        self.cb = cb
        self.hc = hc
        self.log = log
        self.tcp_connect_attempts = max(1, tcp_connect_attempts)
        thresholds = cb.thresholds if cb else None
        # HTTP/1.1: one request per connection, so in-flight requests are bounded by the
        # connections plus the pending queue, and by max_requests. Overflow answers 503 at once.
        self.max_active = (
            min(thresholds.max_requests, thresholds.max_connections + thresholds.max_pending_requests)
            if thresholds
            else 1024
        )
        self.max_retries = thresholds.max_retries if thresholds else 3
        self.panic_threshold = hc.healthy_panic_threshold if hc else _DEFAULT_PANIC
        self.fail_on_panic = hc.fail_traffic_on_panic if hc else False
        self.active = 0
        self.retries_active = 0
        self._avail: tuple[Host, ...] = ()
        self._avail_version = -1
        self._avail_until = 0.0

    def __repr__(self) -> str:
        return f"Target({self.service}{{{self.subset}}}, {len(self.hosts)} hosts)"

    def available(self, now: float) -> tuple[Host, ...]:
        """Hosts that may take traffic now, with Envoy's panic threshold applied."""
        if self._avail_version == self._registry.version and now < self._avail_until:
            return self._avail
        hosts = self.hosts
        usable = tuple(h for h in hosts if h.usable(now))
        if hosts and len(usable) * 100.0 / len(hosts) < self.panic_threshold:
            # Panic: too few healthy hosts, so spread over all of them (or fail, if told to).
            usable = () if self.fail_on_panic else hosts
        until = min((h.ejected_until for h in hosts if h.ejected_until > now), default=float("inf"))
        self._avail, self._avail_version, self._avail_until = usable, self._registry.version, until
        return usable

    def pick(
        self, now: float, rng: random.Random, key: str | None = None, exclude: Sequence[Host] = ()
    ) -> Host | None:
        """Choose a host; ``exclude`` (hosts already tried) is avoided while others remain."""
        hosts = self.available(now)
        if not hosts:
            return None
        host = self.balancer.pick(hosts, key, rng)
        if exclude and host in exclude:
            others = [h for h in hosts if h not in exclude]
            if others:
                host = self.balancer.pick(others, key, rng)
        return host

    def report(self, host: Host, outcome: int, now: float) -> bool:
        """Feed the outlier detector; True when this outcome ejected the host."""
        cb = self.cb
        if not host.record(outcome, cb) or cb is None or host.is_ejected(now):
            return False
        ejected = sum(1 for h in self.hosts if h.is_ejected(now))
        allowed = max(1, len(self.hosts) * cb.max_ejection_percent // 100)
        if ejected >= allowed:
            return False
        host.eject(now, cb)
        return True


class RoutePolicy:
    """A route rule's own request timeout and retries (a MeshTimeout or MeshRetry that targets
    its MeshHTTPRoute): what it sets replaces the target's for the requests the rule matches."""

    __slots__ = (
        "grpc_retry",
        "has_retry",
        "has_timeout",
        "request_timeout_s",
        "retry",
        "stream_idle_timeout_s",
    )

    def __init__(self, route: HttpRoute) -> None:
        timeout, retry = route.timeout, route.retry
        self.has_timeout = timeout is not None
        self.request_timeout_s = _seconds(timeout.http_request_timeout_ms) if timeout is not None else None
        self.stream_idle_timeout_s = (
            _seconds(timeout.http_stream_idle_timeout_ms) if timeout is not None else None
        )
        self.has_retry = retry is not None
        self.retry = RetryPolicy(retry.http) if retry is not None and retry.http is not None else None
        self.grpc_retry = RetryPolicy(retry.grpc) if retry is not None and retry.grpc is not None else None


class Route:
    """One compiled ``http`` entry of a TrafficRoute."""

    __slots__ = (
        "_headers",
        "_host_regex",
        "_method",
        "_path",
        "_path_prefix",
        "_path_regex",
        "modify",
        "policy",
        "request_ops",
        "response_ops",
        "wheel",
    )

    def __init__(self, route: HttpRoute, wheel: Wheel[Target]) -> None:
        m = route.match
        self.policy = RoutePolicy(route) if route.timeout is not None or route.retry is not None else None
        """The rule's own timeout and retries; None: the target's."""
        self._method = compile_string_match(m.method) if m.method else None
        self._path = compile_string_match(m.path) if m.path else None
        # Header names match case-insensitively on both data planes (their maps are lower-case).
        self._headers = tuple((name.lower(), compile_string_match(sm)) for name, sm in m.headers)
        self.modify = route.modify
        self.wheel = wheel
        self.request_ops = modify_ops(route.modify.request_headers if route.modify else None)
        self.response_ops = modify_ops(route.modify.response_headers if route.modify else None)
        host = route.modify.host if route.modify else None
        self._host_regex: tuple[re.Pattern[str], str] | None = None
        if host is not None and host.value is None and host.from_path_regex is not None:
            self._host_regex = (re.compile(host.from_path_regex), host.from_path_substitution or "")
        self._path_prefix: tuple[str, str] | None = None
        self._path_regex: tuple[re.Pattern[str], str] | None = None
        rewrite = route.modify.path if route.modify else None
        if rewrite is not None and rewrite.prefix is not None:
            if m.path is None or m.path.kind != "prefix":
                raise BundleError("path rewrite by prefix needs a prefix path match")
            self._path_prefix = (m.path.value, rewrite.prefix)
        elif rewrite is not None and rewrite.regex is not None:
            self._path_regex = (re.compile(rewrite.regex), rewrite.substitution or "")

    def matches(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        if self._method is not None and not self._method(method):
            return False
        if self._path is not None and not self._path(path):
            return False
        for name, matcher in self._headers:
            value = headers.get(name)
            if value is None or not matcher(value):
                return False
        return True

    def rewrite_host(self, path: str) -> str | None:
        """The Host a ``modify.host`` sets (a value, or one made from the path); None: kept."""
        host = self.modify.host if self.modify is not None else None
        if host is None:
            return None
        if host.value is not None:
            return host.value
        if self._host_regex is not None:
            pattern, sub = self._host_regex
            return pattern.sub(sub, path)
        return None

    def rewrite_path(self, path: str) -> str:
        if self._path_prefix is not None:
            old, new = self._path_prefix
            return new + path[len(old) :]
        if self._path_regex is not None:
            pattern, sub = self._path_regex
            return pattern.sub(sub, path)
        return path


class DestinationTable:
    """Everything an outbound request to one mesh service needs."""

    __slots__ = ("lacking", "pending", "port", "protocol", "routes", "service", "targets", "wheel")

    def __init__(
        self,
        service: str,
        catalog: CatalogService | None,
        routes: tuple[Route, ...],
        wheel: Wheel[Target],
        targets: tuple[Target, ...],
        pending: bool = False,
        lacking: tuple[str, ...] = (),
    ) -> None:
        self.service = service
        self.lacking = lacking
        """Services it splits to whose endpoints a scoped set does not hold (``runtime.endpoints``)."""
        self.pending = pending or bool(lacking)
        """Its config is named by the mesh manifest but not held yet, or endpoints it routes to
        are not (fetched on demand)."""
        self.port = catalog.port if catalog else None
        self.protocol = catalog.protocol if catalog else "http"
        self.routes = routes
        self.wheel = wheel
        self.targets = targets

    def route(self, method: str, path: str, headers: Mapping[str, str]) -> Route | None:
        for route in self.routes:
            if route.matches(method, path, headers):
                return route
        return None


class RateLimit:
    __slots__ = ("bucket", "conf")

    def __init__(self, bucket: TokenBucket, conf: RateLimitConf) -> None:
        self.bucket = bucket
        self.conf = conf


class AppLimit:
    """The requests in flight to the local app under one inbound circuit breaker rule: HTTP/1.1
    carries one request per connection, so they are bounded as a target's are (``max_requests``,
    and ``max_connections`` plus the pending queue). Kept by the engine across reloads."""

    __slots__ = ("active", "max_active")

    def __init__(self, max_active: int) -> None:
        self.active = 0
        self.max_active = max_active


class AppOutlier:
    """Outlier detection of the local app under one inbound circuit breaker rule (Kuma applies
    MeshCircuitBreaker ``from`` to the inbound cluster, whose one host is the app). Envoy ejects
    at least one host whatever ``max_ejection_percent`` says, and with that one host ejected 0%
    of the cluster is healthy: below ``panic`` percent Envoy routes to it anyway, so only a panic
    threshold of 0 turns an ejection into failing fast. Kept by the engine across reloads."""

    __slots__ = ("cb", "host", "panic")

    def __init__(self, host: Host, cb: CircuitBreakerConf) -> None:
        self.host = host
        self.cb = cb
        self.panic = cb.healthy_panic_threshold if cb.healthy_panic_threshold is not None else 50.0


class AppPolicy:
    """What one caller's requests to the local app get: the inbound timeouts, the connection
    limit and the access logs of the rules that match it (``InboundTable.app``)."""

    __slots__ = (
        "connect_s",
        "limit",
        "logs",
        "max_stream_s",
        "outlier",
        "request_timeout_s",
        "stream_idle_s",
        "tcp_idle_timeout_s",
    )

    def __init__(
        self,
        connect_s: float | None,
        request_timeout_s: float | None,
        tcp_idle_timeout_s: float | None,
        limit: AppLimit | None,
        logs: tuple[TrafficLogConf, ...],
        stream_idle_s: float | None = None,
        max_stream_s: float | None = None,
        outlier: AppOutlier | None = None,
    ) -> None:
        self.connect_s = connect_s
        self.request_timeout_s = request_timeout_s
        """None: no request timeout (no inbound timeout rule matches, or it sets 0s)."""
        self.tcp_idle_timeout_s = tcp_idle_timeout_s
        self.limit = limit
        self.logs = logs
        self.stream_idle_s = stream_idle_s
        """A request whose exchange moves no byte either way for this long is cut (Envoy's
        stream idle timeout); None: no limit (no inbound timeout rule matches)."""
        self.max_stream_s = max_stream_s
        """A request and its response are cut after this long (maxStreamDuration); None: never."""
        self.outlier = outlier
        """The local app's outlier detection (``decide.admit_app``, ``decide.report_app``)."""


APP_CONNECT_S = 5.0
"""Connecting to the local app when no inbound timeout rule says otherwise."""
APP_TCP_IDLE_S = 3600.0
"""A TCP connection to the local app with no data for this long is closed (Kuma's 1h default)."""
NO_APP_POLICY = AppPolicy(APP_CONNECT_S, None, APP_TCP_IDLE_S, None, ())


class InboundTable:
    """Inbound rules with the ``when`` side already matched against this instance's tags."""

    __slots__ = (
        "_app_by_name",
        "_app_cache",
        "_cache",
        "_peer_cache",
        "faults",
        "has_app",
        "headers_timeout_s",
        "limits",
        "logs",
        "outliers",
        "permissions",
        "rate_limits",
        "timeouts",
    )

    def __init__(
        self,
        permissions: tuple[Mapping[str, str], ...],
        rate_limits: tuple[tuple[Mapping[str, str], RateLimit], ...],
        faults: tuple[tuple[Mapping[str, str], Fault], ...],
        timeouts: tuple[tuple[Mapping[str, str], TimeoutConf], ...] = (),
        limits: tuple[tuple[Mapping[str, str], AppLimit], ...] = (),
        logs: tuple[tuple[Mapping[str, str], TrafficLogConf], ...] = (),
        outliers: tuple[tuple[Mapping[str, str], AppOutlier], ...] = (),
    ) -> None:
        self.permissions = permissions
        self.rate_limits = rate_limits
        self.faults = faults
        self.timeouts = timeouts
        self.limits = limits
        self.logs = logs
        self.outliers = outliers
        self.has_app = bool(timeouts or limits or logs or outliers)
        """Whether any rule shapes requests to the local app (else ``app`` is ``NO_APP_POLICY``)."""
        common = next((t for p, t in timeouts if not p), None)
        self.headers_timeout_s = _seconds(common.http_request_headers_timeout_ms) if common else None
        """The inbound listener's time for a request head (Kuma's requestHeadersTimeout, which a
        caller's identity cannot condition: the rule for every caller); None: the listener's own."""
        self._cache: dict[str, tuple[RateLimit | None, Fault | None, bool]] = {}
        self._peer_cache: dict[str, tuple[RateLimit | None, Fault | None, bool]] = {}
        self._app_cache: dict[str, AppPolicy] = {}
        self._app_by_name: dict[str, AppPolicy] = {}

    def app_for_caller(self, caller_service: str) -> AppPolicy:
        """``app`` for a caller named by its service (plaintext: the header); cached per name."""
        if not self.has_app:
            return NO_APP_POLICY
        hit = self._app_by_name.get(caller_service)
        if hit is None:
            hit = self.app({SERVICE_TAG: caller_service} if caller_service else {})
            if len(self._app_by_name) < 4096:
                self._app_by_name[caller_service] = hit
        return hit

    def app(self, peer: Mapping[str, str]) -> AppPolicy:
        """The timeouts, limit and logs of a caller's requests to the local app (``peer``: its
        tags, or ``{kuma.io/service: name}`` in plaintext; empty: an unnamed caller)."""
        if not self.has_app:
            return NO_APP_POLICY
        key = "\0".join(f"{k}={v}" for k, v in sorted(peer.items()))
        hit = self._app_cache.get(key)
        if hit is not None:
            return hit
        timeout = next((t for p, t in self.timeouts if tags_match(p, peer)), None)
        policy = AppPolicy(
            _seconds(timeout.connect_timeout_ms) if timeout is not None else APP_CONNECT_S,
            _seconds(timeout.http_request_timeout_ms) if timeout is not None else None,
            _seconds(timeout.tcp_idle_timeout_ms) if timeout is not None else APP_TCP_IDLE_S,
            next((lim for p, lim in self.limits if tags_match(p, peer)), None),
            tuple(log for p, log in self.logs if tags_match(p, peer)),
            _seconds(timeout.http_stream_idle_timeout_ms) if timeout is not None else None,
            _seconds(timeout.http_max_stream_duration_ms) if timeout is not None else None,
            next((o for p, o in self.outliers if tags_match(p, peer)), None),
        )
        if len(self._app_cache) < 4096:
            self._app_cache[key] = policy
        return policy

    def for_caller(self, caller_service: str) -> tuple[RateLimit | None, Fault | None, bool]:
        """(rate limit, fault, permitted) for a caller named by its service; cached per name."""
        hit = self._cache.get(caller_service)
        if hit is not None:
            return hit
        peer = {SERVICE_TAG: caller_service} if caller_service else {}
        result = (
            next((rl for p, rl in self.rate_limits if tags_match(p, peer)), None),
            next((f for p, f in self.faults if tags_match(p, peer)), None),
            any(tags_match(p, peer) for p in self.permissions),
        )
        if len(self._cache) < 4096:
            self._cache[caller_service] = result
        return result

    def for_peer(self, peer: Mapping[str, str]) -> tuple[RateLimit | None, Fault | None, bool]:
        """(rate limit, fault, permitted) for a caller named by all its tags (its certificate's
        identity under mTLS, so permissions can match a subset such as ``version: v1``)."""
        key = "\0".join(f"{k}={v}" for k, v in sorted(peer.items()))
        hit = self._peer_cache.get(key)
        if hit is not None:
            return hit
        result = (
            next((rl for p, rl in self.rate_limits if tags_match(p, peer)), None),
            next((f for p, f in self.faults if tags_match(p, peer)), None),
            any(tags_match(p, peer) for p in self.permissions),
        )
        if len(self._peer_cache) < 4096:
            self._peer_cache[key] = result
        return result


def _host_matcher(pattern: str) -> Callable[[str], bool]:
    pattern = pattern.lower()
    if pattern in ("", "*"):
        return lambda h: True
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return lambda h: h.endswith(suffix) and len(h) > len(suffix)
    return lambda h: h == pattern


_NO_MATCH: tuple[bool, str | None] = (False, None)
_MATCH: tuple[bool, str | None] = (True, None)


_CompiledMatch = tuple[
    StrMatcher | None,
    str | None,
    str | None,
    tuple[tuple[str, str, Callable[[str | None], bool]], ...],
    tuple[tuple[str, StrMatcher], ...],
]


class GatewayRoute:
    """One MeshGatewayRoute rule: matches, filters and weighted backends."""

    __slots__ = (
        "_hostnames",
        "_matches",
        "mirrors",
        "redirect",
        "request_ops",
        "response_ops",
        "rewrite_full",
        "rewrite_prefix",
        "wheel",
    )

    def __init__(
        self, rule: GatewayRule, wheel: Wheel[Target], mirrors: tuple[tuple[float, Target], ...] = ()
    ) -> None:
        self.mirrors = mirrors
        """(percentage, target) of each ``mirror`` filter: a copy of the request, answer ignored."""
        self._hostnames = tuple(_host_matcher(h) for h in rule.hostnames)
        matches: list[_CompiledMatch] = []
        for m in rule.matches:
            path: StrMatcher | None = None
            prefix: str | None = None
            if m.path is not None:
                if m.path.kind == "prefix":
                    prefix = m.path.value.rstrip("/") or "/"
                    path = _gateway_prefix(prefix)
                else:
                    path = compile_string_match(m.path)
            headers = tuple((n.lower(), kind, _header_value_matcher(kind, v)) for n, kind, v in m.headers)
            query = tuple((n, compile_string_match_kind(kind, v)) for n, kind, v in m.query)
            matches.append((path, prefix, m.method.upper() if m.method else None, headers, query))
        self._matches = tuple(matches)
        self.wheel = wheel
        self.redirect: GatewayFilter | None = None
        self.rewrite_full: str | None = None
        self.rewrite_prefix: str | None = None
        for f in rule.filters:
            if f.type == "redirect":
                self.redirect = f
            elif f.type == "rewrite":
                self.rewrite_full, self.rewrite_prefix = f.rewrite_full, f.rewrite_prefix
        self.request_ops = filter_ops(f for f in rule.filters if f.type == "request_header")
        self.response_ops = filter_ops(f for f in rule.filters if f.type == "response_header")

    def match(
        self, host: str, method: str, path: str, headers: Mapping[str, str], query: Mapping[str, str]
    ) -> tuple[bool, str | None]:
        """(applies, the matched path prefix for ``replacePrefixMatch``)."""
        if self._hostnames and not any(h(host) for h in self._hostnames):
            return _NO_MATCH
        if not self._matches:
            return _MATCH
        for path_m, prefix, want_method, header_ms, query_ms in self._matches:
            if path_m is not None and not path_m(path):
                continue
            if want_method is not None and method != want_method:
                continue
            if not all(fn(headers.get(name)) for name, _, fn in header_ms):
                continue
            if not all((v := query.get(n)) is not None and fn(v) for n, fn in query_ms):
                continue
            return (True, prefix)
        return _NO_MATCH

    def rewrite(self, path: str, prefix: str | None) -> str:
        if self.rewrite_full is not None:
            return self.rewrite_full
        if self.rewrite_prefix is not None and prefix is not None:
            rest = path[len(prefix) :] if prefix != "/" else path[1:]
            new = self.rewrite_prefix
            if not rest:
                return new or "/"
            if new.endswith("/") and rest.startswith("/"):
                return new + rest[1:]
            if not new.endswith("/") and not rest.startswith("/"):
                return new + "/" + rest
            return new + rest
        return path


def _gateway_prefix(prefix: str) -> StrMatcher:
    """Gateway API PathPrefix: matches whole path segments (``/a`` matches ``/a/b``, not ``/ab``)."""
    if prefix == "/":
        return lambda s: True
    with_slash = prefix + "/"
    return lambda s: s == prefix or s.startswith(with_slash)


def compile_string_match_kind(kind: str, value: str) -> StrMatcher:
    if kind == "regex":
        pattern = re.compile(value)
        return lambda s: pattern.fullmatch(s) is not None
    return lambda s: s == value


def _header_value_matcher(kind: str, value: str) -> Callable[[str | None], bool]:
    if kind == "present":
        return lambda v: v is not None
    if kind == "absent":
        return lambda v: v is None
    inner = compile_string_match_kind(kind, value)
    return lambda v: v is not None and inner(v)


class GatewayListenerTable:
    __slots__ = ("connection_limit", "hostname", "port", "protocol", "routes", "tcp_wheel")

    def __init__(
        self, listener: GatewayListener, routes: tuple[GatewayRoute, ...], tcp_wheel: Wheel[Target] | None
    ) -> None:
        self.port = listener.port
        self.protocol = listener.protocol
        self.hostname = _host_matcher(listener.hostname)
        self.connection_limit = listener.connection_limit
        self.routes = routes
        self.tcp_wheel = tcp_wheel

    def route(
        self, host: str, method: str, path: str, headers: Mapping[str, str], query: Mapping[str, str]
    ) -> tuple[GatewayRoute, str | None] | None:
        if not self.hostname(host):
            return None
        for route in self.routes:
            ok, prefix = route.match(host, method, path, headers, query)
            if ok:
                return route, prefix
        return None


class Snapshot:
    """An immutable, compiled view of the bundles and endpoints; swapped as a whole."""

    def __init__(
        self,
        mesh: MeshBundle | None,
        service: ServiceBundle | None,
        endpoints: EndpointSet | None,
        destinations: dict[str, DestinationTable],
        inbound: InboundTable,
        gateway: dict[int, GatewayListenerTable],
        targets: tuple[Target, ...],
        pending: Collection[str] = (),
    ) -> None:
        self.mesh = mesh
        self.service = service
        self.endpoints = endpoints
        self.destinations = destinations
        self.inbound = inbound
        self.gateway = gateway
        self.targets = targets
        self.passthrough = mesh.passthrough if mesh else False
        tracing = mesh.tracing if mesh else None
        if service is not None and service.tracing is not None:
            tracing = service.tracing.backend  # a MeshTrace that selects this service
        self.trace_sampling: float | None = tracing.sampling if tracing is not None else None
        """The tracing sampling percentage; None: no tracing backend (traces unsampled)."""
        self.trace_backend: TracingBackend | None = tracing
        """Where sampled spans go (``runtime.zipkin``)."""
        self.trace_tags = tracing.tags if tracing is not None else ()
        """The MeshTrace ``tags`` a sampled span carries (``runtime.tracing.tag_values``)."""
        self.trace_b3: bool = tracing is not None and tracing.b3
        """Read and send B3 besides ``traceparent`` (a Zipkin backend)."""
        # Hosts an outbound request may name a service by: name, name.mesh (ports are ignored),
        # and for Kuma's Kubernetes names the cluster DNS names of the Service.
        # A destination whose piece is pending (``pending``, not in ``destinations``) gets its
        # table at its first lookup: a scoped sidecar of a 10,000-service mesh has ~10,000 of them.
        self._names = dict(destinations)  # ``name.mesh`` is looked up as ``name`` (no alias each)
        self._pending = pending
        self._catalog = mesh.services if mesh is not None else {}
        own = service.service if service is not None else ""
        every = {n: n for n in destinations}
        every.update((n, n) for n in pending if n not in destinations)
        self._aliases = kube_aliases(every, own)

    @property
    def ready(self) -> bool:
        return self.mesh is not None and self.service is not None

    def destination(self, host: str) -> DestinationTable | None:
        """The mesh service an outbound Host names (``benigno``, ``benigno.mesh``), port ignored."""
        table = self._names.get(host)
        if table is not None or not host:
            return table
        if host[-1] == ".":
            host = host[:-1]
            table = self._names.get(host)
            if table is not None:
                return table
        table = self._lazy(host)
        if table is None:
            alias = self._aliases.get(host)
            table = self._names.get(alias) or self._lazy(alias) if alias is not None else None
        if table is None and host.endswith(".mesh"):
            table = self._names.get(host[:-5]) or self._lazy(host[:-5])
        return table

    def _lazy(self, name: str) -> DestinationTable | None:
        """The table of a pending destination (nothing routes there before its piece comes)."""
        if name not in self._pending or name in self._names:
            return None
        table = self._names[name] = DestinationTable(
            name, self._catalog.get(name), (), _NO_WHEEL, (), pending=True
        )
        return table

    def health_checks(self) -> dict[tuple[str, str], tuple[Host, HealthCheckConf, Target]]:
        """(address, check kind) -> the host, its check config and one target using it."""
        out: dict[tuple[str, str], tuple[Host, HealthCheckConf, Target]] = {}
        for target in self.targets:
            hc = target.hc
            if hc is None:
                continue
            kind = hc.check_kind()
            if kind == "http" and hc.http is not None:
                kind = f"http:{hc.http.path}"
            elif kind == "grpc" and hc.grpc is not None:
                kind = f"grpc:{hc.grpc.service_name}"
            for host in target.hosts:
                out.setdefault((host.address, kind), (host, hc, target))
        return out


T = TypeVar("T")

_KUBE_NAME = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?)_([a-z0-9]([-a-z0-9]*[a-z0-9])?)_svc_([0-9]{1,5})")
"""Kuma's name of a Kubernetes Service port: ``<name>_<namespace>_svc_<port>``."""


def kube_aliases(destinations: Mapping[str, T], own_service: str) -> dict[str, T]:
    """The names a pod's code calls a Kuma-on-Kubernetes service by: ``benigno.kong-mesh-app``,
    ``.svc``, ``.svc.cluster.local`` and, from the same namespace, ``benigno``. A Service with
    several mesh ports has no alias (the Host's port is not looked at), so that no call is ever
    sent to the wrong port's service: such a service is named in full."""
    own = _KUBE_NAME.fullmatch(own_service)
    own_ns = own.group(3) if own else None
    found: dict[str, list[str]] = {}
    for name in destinations:
        m = _KUBE_NAME.fullmatch(name)
        if m is None:
            continue
        svc, ns = m.group(1), m.group(3)
        aliases = [f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local"]
        if ns == own_ns:
            aliases.append(svc)
        for alias in aliases:
            found.setdefault(alias, []).append(name)
    return {alias: destinations[names[0]] for alias, names in found.items() if len(names) == 1}


_NO_WHEEL: Wheel[Target] = Wheel(())


class Engine:
    """Holds the current snapshot and the state that outlives it."""

    def __init__(
        self,
        service: str,
        tags: Mapping[str, str],
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.service = service
        self.tags = {**tags, SERVICE_TAG: service}
        self.labels = {LABEL_KEY + k: v for k, v in (labels or {}).items()}
        """The instance's Dataplane labels as ``Rule.when`` keys (``LABEL_KEY``)."""
        self.rng = rng or random.Random()
        self.clock = clock
        self.registry = HostRegistry()
        self._buckets: dict[str, TokenBucket] = {}
        self._app_limits: dict[str, AppLimit] = {}
        """Inbound circuit breaker limits by rule: their in-flight counts outlive a reload."""
        self._app_hosts = HostRegistry()
        """The local app as the inbound's host, one per circuit breaker rule (its ejection
        outlives a reload)."""
        self.snapshot = Snapshot(None, None, None, {}, InboundTable((), (), ()), {}, ())

    def install(self, snapshot: Snapshot) -> None:
        """Swap in a snapshot built by ``build`` (one reference assignment: atomic)."""
        live = {h.address for t in snapshot.targets for h in t.hosts}
        if snapshot.endpoints is not None:
            live |= {ep.address for eps in snapshot.endpoints.services.values() for ep in eps}
        self.snapshot = snapshot
        self.registry.retain(live)

    def build(
        self,
        mesh: MeshBundle | None,
        service: ServiceBundle | None,
        endpoints: EndpointSet | None,
        pending: Collection[str] = (),
    ) -> Snapshot:
        """Compile a snapshot; raise ``BundleError`` if it cannot be enforced. ``pending`` names
        the catalog services whose mesh-wide config is not held (``runtime.pieces``)."""
        try:
            return self._build(mesh, service, endpoints, pending)
        except BundleError:
            raise
        except (ValueError, re.error) as e:
            raise BundleError(f"bundle cannot be compiled: {e}") from e

    # -- compilation ------------------------------------------------------------------------

    def _build(
        self,
        mesh: MeshBundle | None,
        service: ServiceBundle | None,
        endpoints: EndpointSet | None,
        pending: Collection[str],
    ) -> Snapshot:
        if service is not None and service.service != self.service:
            raise BundleError(
                f"service bundle is for {service.service!r}, this data plane is {self.service!r}"
            )
        if mesh is not None and service is not None and mesh.mesh != service.mesh:
            raise BundleError(
                f"service bundle is for mesh {service.mesh!r}, the mesh bundle is {mesh.mesh!r}"
            )
        local = {**self.tags, **self.labels}
        if service is not None and service.gateway is not None:
            local = {**service.gateway.tags, **local}
        by_service: dict[str, list[Host]] = {}
        host_tags: dict[str, Mapping[str, str]] = {}
        if endpoints is not None:
            for name, eps in endpoints.services.items():
                hosts = by_service.setdefault(name, [])
                for ep in eps:
                    host = self.registry.get(ep.address)
                    hosts.append(host)
                    host_tags[ep.address] = ep.tags
        targets: dict[tuple[str, tuple[tuple[str, str], ...]], Target] = {}
        held = endpoints.services if endpoints is not None and endpoints.scoped else None
        """A scoped set: the services it does not name are not held (rather than empty)."""

        def config_for(name: str) -> Destination | None:
            if service is not None and name in service.outbound:
                return service.outbound[name]
            if mesh is not None:
                return mesh.destinations.get(name)
            return None

        def target(split_service: str, tags: Mapping[str, str], route: RouteConf | None) -> Target:
            subset = {k: v for k, v in tags.items() if not (k == SERVICE_TAG and v == split_service)}
            key = (split_service, tuple(sorted(subset.items())))
            found = targets.get(key)
            if found is not None:
                return found
            peer = {**subset, SERVICE_TAG: split_service}
            conf = config_for(split_service)
            hosts = [h for h in by_service.get(split_service, ()) if tags_match(subset, host_tags[h.address])]
            if route is None and conf is not None:
                rule = first_rule(conf.route, local, {})
                route = rule.conf if rule else None
            lb = make_balancer(route.load_balancer, hosts) if route else make_balancer(_RR, hosts)
            timeout = _pick(conf.timeout, local, peer) if conf else None
            retry = _pick(conf.retry, local, peer) if conf else None
            http_retry = retry.http if retry else None
            tcp_retry = retry.tcp if retry else None
            made = Target(
                self.registry,
                split_service,
                subset,
                hosts,
                lb,
                timeout or _DEFAULT_TIMEOUT,
                RetryPolicy(http_retry) if http_retry else None,
                _pick(conf.circuit_breaker, local, peer) if conf else None,
                _pick(conf.health_check, local, peer) if conf else None,
                _pick(conf.traffic_log, local, peer) if conf else None,
                tcp_retry.max_connect_attempts if tcp_retry else 1,
                RetryPolicy(retry.grpc) if retry and retry.grpc else None,
            )
            targets[key] = made
            return made

        def wheel(splits: Sequence[Split], route: RouteConf | None) -> Wheel[Target]:
            return Wheel([(s.weight, target(s.service, s.tags, route)) for s in splits])

        destinations: dict[str, DestinationTable] = {}
        catalog = mesh.services if mesh is not None else {}
        names = set(catalog)
        if service is not None:
            names |= set(service.outbound)
        for name in sorted(names):
            if name in pending and (service is None or name not in service.outbound):
                # Nothing routes there before its piece is fetched: no table now (a scoped data
                # plane has thousands of these and builds one snapshot per push), see Snapshot.
                continue
            conf = config_for(name)
            rule = first_rule(conf.route, local, {}) if conf else None
            route = rule.conf if rule else None
            if route is None:
                default: Wheel[Target] = wheel([Split(weight=1, service=name)], None)
                routes: tuple[Route, ...] = ()
            else:
                default = wheel(route.split, route)
                routes = tuple(Route(r, wheel(r.split, route)) for r in route.http)
            used = {id(t): t for t in default.items}
            for r in routes:
                used.update((id(t), t) for t in r.wheel.items)
            lacking = () if held is None else tuple(sorted({t.service for t in used.values()} - held.keys()))
            destinations[name] = DestinationTable(
                name,
                catalog.get(name),
                routes,
                default,
                tuple(used.values()),
                lacking=lacking,
            )

        gateway: dict[int, GatewayListenerTable] = {}
        if service is not None and service.gateway is not None:
            for listener in service.gateway.listeners:
                if listener.protocol == "TLS":
                    continue  # TLS passthrough listeners are not served yet
                g_routes = tuple(
                    GatewayRoute(
                        rule,
                        Wheel([(b.weight, target(b.service, b.tags, None)) for b in rule.backends]),
                        tuple(
                            (f.mirror_percentage, target(f.mirror.service, f.mirror.tags, None))
                            for f in rule.filters
                            if f.type == "mirror" and f.mirror is not None
                        ),
                    )
                    for rule in listener.rules
                )
                tcp = (
                    Wheel([(b.weight, target(b.service, b.tags, None)) for b in listener.tcp_backends])
                    if listener.tcp_backends
                    else None
                )
                gateway[listener.port] = GatewayListenerTable(listener, g_routes, tcp)

        for address, tags in host_tags.items():
            self.registry.get(address).tags = tags
        if endpoints is not None:
            for eps in endpoints.services.values():
                for ep in eps:
                    host = self.registry.get(ep.address)
                    if host.cp_healthy != ep.healthy:
                        host.cp_healthy = ep.healthy
                        self.registry.bump()

        return Snapshot(
            mesh,
            service,
            endpoints,
            destinations,
            self._inbound(service, local),
            gateway,
            tuple(targets.values()),
            pending,
        )

    def _inbound(self, service: ServiceBundle | None, local: Mapping[str, str]) -> InboundTable:
        if service is None:
            return InboundTable((), (), ())
        inbound = service.inbound
        now = self.clock()
        rate_limits: list[tuple[Mapping[str, str], RateLimit]] = []
        for i, rl in enumerate(inbound.rate_limit):
            if not tags_match(rl.when, local):
                continue
            key = f"{i}|{sorted(rl.peer.items())}|{rl.conf.requests}/{rl.conf.interval_ms}"
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(rl.conf, now)
            rate_limits.append((rl.peer, RateLimit(bucket, rl.conf)))
        faults = tuple((f.peer, Fault(f.conf)) for f in inbound.fault_injection if tags_match(f.when, local))
        permissions = tuple(p.peer for p in inbound.permissions if tags_match(p.when, local))
        timeouts = tuple((t.peer, t.conf) for t in inbound.timeout if tags_match(t.when, local))
        limits: list[tuple[Mapping[str, str], AppLimit]] = []
        outliers: list[tuple[Mapping[str, str], AppOutlier]] = []
        for i, cb in enumerate(inbound.circuit_breaker):
            if not tags_match(cb.when, local):
                continue
            th = cb.conf.thresholds
            most = min(th.max_requests, th.max_connections + th.max_pending_requests)
            key = f"{i}|{sorted(cb.peer.items())}|{most}"
            limit = self._app_limits.get(key)
            if limit is None:
                limit = self._app_limits[key] = AppLimit(most)
            limits.append((cb.peer, limit))
            if _detects(cb.conf):
                host = self._app_hosts.get(f"app{i}-{sorted(cb.peer.items())}:0")
                outliers.append((cb.peer, AppOutlier(host, cb.conf)))
        logs = tuple((x.peer, x.conf) for x in inbound.traffic_log if tags_match(x.when, local))
        return InboundTable(
            permissions, tuple(rate_limits), faults, timeouts, tuple(limits), logs, tuple(outliers)
        )

    # -- outcomes ---------------------------------------------------------------------------

    def outcome_for_status(self, status: int) -> int:
        if status in (502, 503, 504):
            return Outcome.GATEWAY
        if status >= 500:
            return Outcome.HTTP_5XX
        return Outcome.OK


def _detects(cb: CircuitBreakerConf) -> bool:
    """Whether a circuit breaker has a detector that ejects (the consecutive ones meshc runs)."""
    d = cb.detectors
    return d.total_errors is not None or d.gateway_errors is not None or d.local_errors is not None


def _pick(rules: Sequence[Any], local: Mapping[str, str], peer: Mapping[str, str]) -> Any:
    rule = first_rule(rules, local, peer)
    return rule.conf if rule is not None else None
