"""The decision layer without sockets, Playbook style (as mitmproxy's ``tutils.Playbook``): each
test feeds a sequence of inputs to one engine/state and checks every verdict in order.

The verdicts are what both HTTP data planes and the TCP layer carry out, so a drift between
them can only come from carrying out, never from deciding."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runtime._hosts import Outcome
from runtime.bundle import (
    BackOff,
    CatalogService,
    CircuitBreakerConf,
    Destination,
    FaultAbort,
    FaultDelay,
    FaultInjectionConf,
    GatewayBackend,
    GatewayConf,
    GatewayFilter,
    GatewayListener,
    GatewayMatch,
    GatewayRule,
    HeaderChange,
    HeaderOps,
    HostRewrite,
    HttpMatch,
    HttpModify,
    HttpRetry,
    HttpRoute,
    Inbound,
    MeshBundle,
    Mtls,
    PathRewrite,
    RateLimitConf,
    RetryConf,
    RouteConf,
    Rule,
    ServiceBundle,
    ServiceTracing,
    Split,
    StringMatch,
    Thresholds,
    TimeoutConf,
    TracingBackend,
)
from runtime.decide import (
    APP,
    PASSTHROUGH,
    TARGET,
    Forward,
    Reply,
    RetryState,
    admit,
    decide_connect,
    decide_gateway,
    decide_inbound,
    decide_outbound,
    decide_tcp_gateway,
    decide_tcp_inbound,
    failure_reply,
    peer_hop,
    request_scheme,
)
from runtime.engine import Engine, Snapshot, Target
from runtime.headerops import ADD, REMOVE, SET
from runtime.identity import PeerIdentity
from runtime.protocol import Endpoint, EndpointSet
from runtime.security import DENIED_HEADER

OWN = {("127.0.0.1", 15001)}


@dataclass
class Head:
    """A request head as a decision reads it (what h1.Request and the aiohttp adapter provide)."""

    method: str = "GET"
    target: str = "/"
    host: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    has_body: bool = False
    upgrade: object = None

    def authority(self) -> str:
        return self.host

    def path(self) -> str:
        return self.target.partition("?")[0]

    def query_string(self) -> str:
        return self.target.partition("?")[2]

    def header_map(self) -> Mapping[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}


def show(verdict: Forward | Reply) -> tuple[Any, ...]:
    """A verdict as a comparable tuple."""
    if isinstance(verdict, Reply):
        return ("reply", verdict.status, verdict.reason)
    if verdict.kind == TARGET:
        assert verdict.target is not None
        return ("target", verdict.target.service, verdict.target.subset, verdict.path, verdict.host)
    if verdict.kind == PASSTHROUGH:
        return ("passthrough", verdict.address)
    return ("app", verdict.source, verdict.source_header)


Step = tuple[Callable[[], Any], Any]


def playbook(steps: list[Step]) -> None:
    """Run each input in order; every output must be the expected one."""
    for i, (feed, expected) in enumerate(steps):
        got = feed()
        assert got == expected, f"step {i}: {got!r} != {expected!r}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _engine(tags: dict[str, str] | None = None, service: str = "magnanimo") -> tuple[Engine, Clock]:
    clock = Clock()
    return Engine(service, tags or {}, rng=random.Random(7), clock=clock), clock


def _mesh(
    passthrough: bool = True, destinations: dict[str, Destination] | None = None, **kw: Any
) -> MeshBundle:
    return MeshBundle(
        mesh="default",
        passthrough=passthrough,
        services={
            "benigno": CatalogService(port=5000, protocol="http"),
            "db": CatalogService(port=5432, protocol="tcp"),
        },
        destinations=destinations or {},
        **kw,
    )


def _eps() -> EndpointSet:
    return EndpointSet(
        generation=1,
        services={
            "benigno": [
                Endpoint(address="127.0.0.1:7001", tags={"version": "v1"}),
                Endpoint(address="127.0.0.1:7002", tags={"version": "v2"}),
            ],
            "db": [Endpoint(address="127.0.0.1:7003", tags={})],
        },
    )


def _snap(engine: Engine, mesh: MeshBundle | None, svc: ServiceBundle | None = None) -> Snapshot:
    if svc is None and mesh is not None:
        svc = ServiceBundle(mesh="default", service=engine.service)
    snap = engine.build(mesh, svc, _eps())
    engine.install(snap)
    return snap


# -- outbound, CONNECT and the passthrough verdict -------------------------------------------------


def test_outbound_playbook() -> None:
    engine, _ = _engine()
    snap = _snap(engine, _mesh())

    def out(host: str, port: int | None = None, target: str = "/x") -> Callable[[], Any]:
        return lambda: show(decide_outbound(engine, snap, Head(target=target, host=host), host, port, OWN))

    playbook(
        [
            (out("benigno", 5000), ("target", "benigno", "", None, None)),
            (out("benigno.mesh"), ("target", "benigno", "", None, None)),
            (out("db"), ("reply", 400, "db is a TCP service; open it with CONNECT")),
            (out("example.org", 8080), ("passthrough", ("example.org", 8080))),
            (out("example.org"), ("passthrough", ("example.org", 80))),
            (out(""), ("reply", 400, "request names no host")),
            (out("127.0.0.1", 15001), ("reply", 508, "request names this proxy itself")),
            (out("localhost", 15001), ("reply", 508, "request names this proxy itself")),
        ]
    )


def test_one_passthrough_verdict_for_http_and_connect() -> None:
    """The drift this layer removed: before any configuration HTTP said 503, CONNECT 403."""
    engine, _ = _engine()
    cases = [
        (None, ("reply", 503, "no configuration yet")),
        (
            _mesh(passthrough=False),
            ("reply", 403, "passthrough disabled by Mesh default: example.org is not a mesh service"),
        ),
        (_mesh(passthrough=True), ("passthrough", ("example.org", 443))),
    ]
    for mesh, expected in cases:
        snap = _snap(engine, mesh)
        http = decide_outbound(engine, snap, Head(host="example.org:443"), "example.org", 443, OWN)
        tunnel = decide_connect(engine, snap, "example.org", 443, OWN)
        assert show(http) == show(tunnel) == expected


def test_connect_playbook() -> None:
    engine, _ = _engine()
    snap = _snap(engine, _mesh())
    playbook(
        [
            (lambda: show(decide_connect(engine, snap, "db", 5432, OWN)), ("target", "db", "", None, None)),
            (
                lambda: show(decide_connect(engine, snap, "benigno", 5000, OWN)),
                ("reply", 400, "benigno is an HTTP mesh service; send plain HTTP requests"),
            ),
            (
                lambda: show(decide_connect(engine, snap, "127.0.0.1", 15001, OWN)),
                ("reply", 508, "request names this proxy itself"),
            ),
        ]
    )


def test_route_rewrites_are_decided_once() -> None:
    route = RouteConf(
        split=(Split(weight=1, service="benigno", tags={"version": "v1"}),),
        http=(
            HttpRoute(
                match=HttpMatch(
                    path=StringMatch(kind="prefix", value="/canary/"),
                    headers=(("X-Beta", StringMatch(kind="exact", value="1")),),
                ),
                modify=HttpModify(
                    path=PathRewrite(prefix="/"),
                    host=HostRewrite(value="benigno.internal"),
                    request_headers=HeaderOps(
                        remove=("x-debug",), add=(HeaderChange(name="x-route", value="canary", append=True),)
                    ),
                    response_headers=HeaderOps(add=(HeaderChange(name="x-served-by", value="canary"),)),
                ),
                split=(Split(weight=1, service="benigno", tags={"version": "v2"}),),
            ),
        ),
    )
    dest = Destination(route=(Rule[RouteConf](conf=route),), timeout=(Rule[TimeoutConf](conf=TimeoutConf()),))
    engine, _ = _engine()
    snap = _snap(engine, _mesh(destinations={"benigno": dest}))

    def out(target: str, headers: dict[str, str]) -> Forward | Reply:
        return decide_outbound(
            engine, snap, Head(target=target, host="benigno", headers=headers), "benigno", None, OWN
        )

    canary = out("/canary/hw2?q=1", {"x-beta": "1"})
    assert show(canary) == ("target", "benigno", "version=v2", "/hw2", "benigno.internal")
    assert isinstance(canary, Forward)
    assert canary.request_ops[:-1] == ((REMOVE, "x-debug", ""), (ADD, "x-route", "canary"))
    assert canary.trace is not None
    assert canary.request_ops[-1] == (SET, "traceparent", canary.trace.header())
    assert canary.response_ops == ((SET, "x-served-by", "canary"),)
    assert canary.source_header == "magnanimo"
    # The header match is case-insensitive on both data planes; without it the default split.
    assert show(out("/canary/hw2", {"X-BETA": "1"}))[2] == "version=v2"
    assert show(out("/canary/hw2", {})) == ("target", "benigno", "version=v1", None, None)


# -- inbound ---------------------------------------------------------------------------------------


def test_inbound_playbook_plaintext_rate_limit_and_fault() -> None:
    inbound = Inbound(
        rate_limit=(
            Rule[RateLimitConf](
                peer={"kuma.io/service": "gw"},
                conf=RateLimitConf(
                    requests=2, interval_ms=60000, headers=(HeaderChange(name="x-rl", value="1"),)
                ),
            ),
        ),
        fault_injection=(
            Rule[FaultInjectionConf](
                peer={"kuma.io/service": "chaos"},
                conf=FaultInjectionConf(
                    delay=FaultDelay(percentage=100, value_ms=250),
                    abort=FaultAbort(percentage=100, http_status=503),
                ),
            ),
        ),
    )
    engine, _ = _engine(service="benigno")
    snap = _snap(engine, _mesh(), ServiceBundle(mesh="default", service="benigno", inbound=inbound))

    def inb(caller: str) -> Forward | Reply:
        return decide_inbound(engine, snap, False, None, caller)

    playbook(
        [
            (lambda: show(inb("gw")), ("app", "gw", None)),
            (lambda: show(inb("gw")), ("app", "gw", None)),
            (lambda: show(inb("gw")), ("reply", 429, "local_rate_limited")),
            (lambda: inb("gw").headers, (("x-rl", "1"),)),  # type: ignore[union-attr]
            (lambda: show(inb("other")), ("app", "other", None)),
            (lambda: (show(r := inb("chaos")), r.delay_s), (("reply", 503, "fault filter abort"), 0.25)),
        ]
    )


def test_inbound_playbook_mutual_tls() -> None:
    inbound = Inbound(
        permissions=(Rule[None](peer={"kuma.io/service": "magnanimo", "version": "v1"}, conf=None),)
    )
    engine, _ = _engine(service="benigno")
    snap = _snap(
        engine,
        _mesh(mtls=Mtls(enabled=True, mode="STRICT")),
        ServiceBundle(mesh="default", service="benigno", inbound=inbound),
    )
    v1 = PeerIdentity("default", "magnanimo", {"kuma.io/service": "magnanimo", "version": "v1"})
    v2 = PeerIdentity("default", "magnanimo", {"kuma.io/service": "magnanimo", "version": "v2"})
    alien = PeerIdentity("other", "magnanimo", {"kuma.io/service": "magnanimo", "version": "v1"})
    no_cert = "peer certificate names no identity in this mesh"
    playbook(
        [
            # The caller is the certificate's identity; a header claiming otherwise is overwritten.
            (
                lambda: show(decide_inbound(engine, snap, True, v1, "intruder")),
                ("app", "magnanimo", "magnanimo"),
            ),
            (
                lambda: show(decide_inbound(engine, snap, True, v2, "")),
                ("reply", 403, "no TrafficPermission allows magnanimo"),
            ),
            (lambda: show(decide_inbound(engine, snap, True, alien, "")), ("reply", 403, no_cert)),
            (lambda: show(decide_inbound(engine, snap, True, None, "")), ("reply", 403, no_cert)),
        ]
    )
    denied = decide_inbound(engine, snap, True, v2, "")
    assert isinstance(denied, Reply) and dict(denied.headers) == {DENIED_HEADER: denied.reason}
    # TCP listeners decide the same way.
    assert show(decide_tcp_inbound(engine, snap, True, v1)) == ("app", "magnanimo", None)
    assert show(decide_tcp_inbound(engine, snap, True, v2)) == show(denied)
    assert show(decide_tcp_inbound(engine, snap, True, alien)) == ("reply", 403, no_cert)


# -- gateway ---------------------------------------------------------------------------------------


def _gateway(rules: tuple[GatewayRule, ...]) -> tuple[Engine, Snapshot]:
    engine, _ = _engine(service="edge")
    gw = GatewayConf(
        listeners=(
            GatewayListener(port=8080, protocol="HTTP", rules=rules),
            GatewayListener(
                port=9000, protocol="TCP", tcp_backends=(GatewayBackend(weight=1, service="db"),)
            ),
        )
    )
    return engine, _snap(engine, _mesh(), ServiceBundle(mesh="default", service="edge", gateway=gw))


def test_gateway_redirect_keeps_the_request_scheme() -> None:
    """The drift this layer removed: the fast path redirected to http:// whatever the request."""
    rule = GatewayRule(
        matches=(GatewayMatch(path=StringMatch(kind="exact", value="/old")),),
        filters=(GatewayFilter(type="redirect", redirect_path="/new", redirect_status=301),),
    )
    engine, snap = _gateway((rule,))

    def location(head: Head, scheme: str) -> str:
        reply = decide_gateway(engine, snap, head, 8080, scheme)
        assert isinstance(reply, Reply) and reply.status == 301 and reply.body == ""
        return dict(reply.headers)["Location"]

    head = Head(target="/old?q=2", host="edge.example:8080")
    assert location(head, request_scheme(None, False)) == "http://edge.example/new?q=2"
    assert location(head, request_scheme(None, True)) == "https://edge.example/new?q=2"
    assert location(head, request_scheme("https", False)) == "https://edge.example/new?q=2"
    assert request_scheme("gopher", True) == "https" and request_scheme("HTTP, https", True) == "http"


def test_gateway_playbook_routes_filters_and_mirrors() -> None:
    """The drift this layer removed: mirrors were chosen on the fast path only."""
    rules = (
        GatewayRule(
            matches=(GatewayMatch(path=StringMatch(kind="prefix", value="/route1")),),
            filters=(
                GatewayFilter(type="rewrite", rewrite_prefix="/"),
                GatewayFilter(
                    type="request_header",
                    set=(HeaderChange(name="x-gw", value="edge"),),
                    remove=("x-drop",),
                ),
                GatewayFilter(type="response_header", add=(HeaderChange(name="x-from", value="gateway"),)),
                GatewayFilter(type="mirror", mirror=Split(weight=1, service="db"), mirror_percentage=100),
            ),
            backends=(GatewayBackend(weight=1, service="benigno", tags={"version": "v1"}),),
        ),
    )
    engine, snap = _gateway(rules)

    def gw(target: str, **kw: Any) -> Forward | Reply:
        return decide_gateway(engine, snap, Head(target=target, host="edge", **kw), 8080, "http")

    fwd = gw("/route1/a b?x=1")
    assert isinstance(fwd, Forward)
    assert show(fwd) == ("target", "benigno", "version=v1", "/a%20b", None)
    assert fwd.request_ops[:-1] == ((SET, "x-gw", "edge"), (REMOVE, "x-drop", ""))
    assert fwd.trace is not None and fwd.request_ops[-1] == (SET, "traceparent", fwd.trace.header())
    assert fwd.response_ops == ((ADD, "x-from", "gateway"),)
    assert [m.service for m in fwd.mirrors] == ["db"]
    playbook(
        [
            (lambda: [m.service for m in gw("/route1", has_body=True).mirrors], []),  # type: ignore[union-attr]
            (lambda: [m.service for m in gw("/route1", upgrade=b"websocket").mirrors], []),  # type: ignore[union-attr]
            (lambda: show(gw("/other")), ("reply", 404, "no route")),
            (
                lambda: show(decide_gateway(engine, snap, Head(), 8081, "http")),
                ("reply", 404, "no gateway listener"),
            ),
            (lambda: show(decide_tcp_gateway(engine, snap, 9000)), ("target", "db", "", None, None)),
            (lambda: show(decide_tcp_gateway(engine, snap, 8081)), ("reply", 503, "no healthy upstream")),
        ]
    )


# -- admission, peer hops, failures ----------------------------------------------------------------


def test_admission_peer_hop_and_failure_answers() -> None:
    engine, _ = _engine()
    snap = _snap(engine, _mesh())
    target = snap.destinations["benigno"].wheel.items[0]
    assert admit(target, "magnanimo") is None
    target.active = target.max_active
    over = admit(target, "magnanimo")
    assert isinstance(over, Reply) and (over.status, over.overflow) == (503, True)
    target.active = 0
    assert peer_hop(snap, False, "magnanimo", "benigno") is False  # mTLS off
    strict = _snap(engine, _mesh(mtls=Mtls(enabled=True, mode="STRICT")))
    permissive = _snap(engine, _mesh(mtls=Mtls(enabled=True, mode="PERMISSIVE")))
    assert peer_hop(strict, True, "magnanimo", "benigno") is True
    assert show(peer_hop(strict, False, "magnanimo", "benigno")) == (  # type: ignore[arg-type]
        "reply",
        503,
        "mTLS is on and this data plane has no certificate yet",
    )
    assert peer_hop(permissive, False, "magnanimo", "benigno") is False
    outside = Forward(PASSTHROUGH, "magnanimo", "example.org", address=("example.org", 80))
    app = Forward(APP, "gw", "benigno")
    assert show(failure_reply(outside, Outcome.CONNECT_FAILURE, "ClientConnectorError")) == (
        "reply",
        502,
        "passthrough to example.org:80 failed: ClientConnectorError",
    )
    assert show(failure_reply(outside, Outcome.TIMEOUT, "")) == ("reply", 504, "upstream request timeout")
    assert show(failure_reply(app, Outcome.TIMEOUT, "")) == ("reply", 504, "app timeout")
    assert failure_reply(app, Outcome.CONNECT_FAILURE, "").status == 503


# -- retries ---------------------------------------------------------------------------------------


def _retry_target(retry: HttpRetry, max_retries: int = 3, request_timeout_ms: int = 2500) -> Target:
    dest = Destination(
        route=(Rule[RouteConf](conf=RouteConf(split=(Split(weight=1, service="benigno"),))),),
        timeout=(Rule[TimeoutConf](conf=TimeoutConf(http_request_timeout_ms=request_timeout_ms)),),
        retry=(Rule[RetryConf](conf=RetryConf(http=retry)),),
        circuit_breaker=(
            Rule[CircuitBreakerConf](conf=CircuitBreakerConf(thresholds=Thresholds(max_retries=max_retries))),
        ),
    )
    engine, _ = _engine()
    snap = _snap(engine, _mesh(destinations={"benigno": dest}))
    target: Target = snap.destinations["benigno"].wheel.items[0]
    return target


def _backoff(value: float | None) -> str:
    return "give up" if value is None else "back off" if 0.0 <= value <= 0.08 else f"bad {value}"


def test_retry_playbook_connect_failures_then_give_up() -> None:
    target = _retry_target(
        HttpRetry(
            num_retries=2,
            per_try_timeout_ms=1000,
            back_off=BackOff(base_interval_ms=20, max_interval_ms=80),
            retry_on=("connect_failure",),
        )
    )
    rng = random.Random(3)
    h1, h2 = target.hosts
    state = RetryState(target, "GET", 0, now=0.0)
    playbook(
        [
            (lambda: state.allowed, True),
            (lambda: state.try_timeout(0.0), 1.0),
            (lambda: _backoff(state.failed(h1, Outcome.CONNECT_FAILURE, 0, rng)), "back off"),
            (lambda: target.retries_active, 1),  # the budget shared by all requests to the target
            (lambda: state.resume(0.05, "magnanimo"), None),
            (lambda: target.retries_active, 0),
            (lambda: state.try_timeout(2.0), 0.5),  # cut to what is left of the 2.5 s request
            (lambda: state.overall, True),
            # A timeout of the request's own deadline is never retried.
            (lambda: _backoff(state.failed(h2, Outcome.TIMEOUT, 0, rng)), "give up"),
            (
                lambda: show(state.give_up(Outcome.TIMEOUT, "magnanimo")),
                ("reply", 504, "upstream request timeout"),
            ),
            (lambda: state.try_timeout(0.1), 1.0),
            (lambda: _backoff(state.failed(h2, Outcome.CONNECT_FAILURE, 0, rng)), "back off"),
            (lambda: state.resume(0.2, "magnanimo"), None),
            # Two retries spent.
            (lambda: _backoff(state.failed(h1, Outcome.CONNECT_FAILURE, 0, rng)), "give up"),
            (
                lambda: show(state.give_up(Outcome.CONNECT_FAILURE, "magnanimo")),
                ("reply", 503, "upstream connect error or disconnect/reset before headers"),
            ),
            (lambda: state.tried, [h1, h2, h2, h1]),
        ]
    )


def test_retry_playbook_statuses_methods_bodies_budget_and_deadline() -> None:
    policy = HttpRetry(
        num_retries=5, back_off=BackOff(base_interval_ms=20, max_interval_ms=80), retry_on=("5xx",)
    )
    target = _retry_target(policy, max_retries=1)
    rng = random.Random(5)
    host = target.hosts[0]
    a = RetryState(target, "GET", 0, now=0.0)
    b = RetryState(target, "GET", 10, now=0.0)
    playbook(
        [
            (lambda: _backoff(a.failed(host, Outcome.HTTP_5XX, 500, rng)), "back off"),
            # The circuit breaker's max_retries (1) is held by a's backoff: b gives up.
            (lambda: _backoff(b.failed(host, Outcome.HTTP_5XX, 500, rng)), "give up"),
            (lambda: a.resume(0.01, "magnanimo"), None),
            (lambda: _backoff(b.failed(host, Outcome.HTTP_5XX, 502, rng)), "back off"),
            (lambda: b.end(), None),  # the exchange ended during the backoff: budget given back
            (lambda: target.retries_active, 0),
            (lambda: _backoff(a.failed(host, Outcome.OK, 404, rng)), "give up"),  # not retriable
            (lambda: _backoff(a.failed(host, Outcome.HTTP_5XX, 503, rng)), "back off"),
            (
                lambda: show(a.resume(2.6, "magnanimo")),
                ("reply", 504, "upstream request timeout"),
            ),  # deadline
        ]
    )
    assert not RetryState(target, "POST", 0, 0.0).allowed  # not idempotent
    assert not RetryState(target, "GET", None, 0.0).allowed  # a chunked body cannot be replayed
    assert not RetryState(target, "PUT", 65 * 1024, 0.0).allowed  # nor one over 64 KiB
    assert RetryState(target, "PUT", 64 * 1024, 0.0).allowed
    codes = _retry_target(HttpRetry(num_retries=1, retry_on=("retriable_4xx",)))
    c = RetryState(codes, "GET", 0, 0.0)
    assert _backoff(c.failed(host, Outcome.OK, 409, rng)) == "back off"


def _plain_dest() -> Destination:
    route = RouteConf(split=(Split(weight=1, service="benigno"),))
    return Destination(route=(Rule[RouteConf](conf=route),), timeout=(Rule[TimeoutConf](conf=TimeoutConf()),))


def test_every_forward_carries_this_hops_traceparent() -> None:
    """Outbound, inbound and gateway verdicts continue a valid incoming trace with a new span of
    their own, and start a sampled one (the Mesh's sampling 100%) when the header is bad."""
    engine, _ = _engine()
    snap = _snap(
        engine,
        _mesh(destinations={"benigno": _plain_dest()}, tracing=TracingBackend(name="z", url="http://x")),
    )
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    out = decide_outbound(
        engine, snap, Head(host="benigno", headers={"Traceparent": incoming}), "benigno", None, OWN
    )
    inb = decide_inbound(engine, snap, False, None, "magnanimo", incoming)
    for fwd in (out, inb):
        assert isinstance(fwd, Forward) and fwd.trace is not None
        assert fwd.trace.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert fwd.trace.parent_id == "00f067aa0ba902b7" and fwd.trace.span_id != "00f067aa0ba902b7"
        assert not fwd.trace.sampled  # the caller's decision stands
        ops = {op[1]: op for op in fwd.request_ops}
        assert ops["traceparent"] == (SET, "traceparent", fwd.trace.header())
        # A Zipkin backend: both B3 forms too, naming the same trace and span.
        assert ops["b3"] == (SET, "b3", f"{fwd.trace.trace_id}-{fwd.trace.span_id}-0-00f067aa0ba902b7")
        assert ops["x-b3-traceid"][2] == fwd.trace.trace_id and ops["x-b3-spanid"][2] == fwd.trace.span_id
    fresh = decide_inbound(engine, snap, False, None, "magnanimo", "00-zz-00f067aa0ba902b7-01")
    assert isinstance(fresh, Forward) and fresh.trace is not None
    assert fresh.trace.parent_id == "" and fresh.trace.sampled
    assert fresh.trace.trace_id != "4bf92f3577b34da6a3ce929d0e0e4736"


def test_replies_the_data_plane_makes_are_spans_of_the_request() -> None:
    """A refusal continues the caller's trace like a forward would, and says why (the reason
    the Zipkin reporter tags as the error); a B3 caller's too."""
    engine, _ = _engine(service="benigno")
    inbound = Inbound(
        fault_injection=(
            Rule[FaultInjectionConf](
                conf=FaultInjectionConf(abort=FaultAbort(percentage=100, http_status=418))
            ),
        )
    )
    zipkin = TracingBackend(name="z", url="http://x")
    snap = _snap(
        engine, _mesh(tracing=zipkin), ServiceBundle(mesh="default", service="benigno", inbound=inbound)
    )
    incoming = {"b3": "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1"}
    r = decide_inbound(engine, snap, False, None, "magnanimo", incoming.get)
    assert isinstance(r, Reply) and r.status == 418 and r.trace is not None
    assert r.trace.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and r.trace.parent_id == "00f067aa0ba902b7"
    assert r.trace.reason == "fault filter abort" and r.trace.sampled
    out_engine, _ = _engine()
    closed = _snap(
        out_engine, _mesh(passthrough=False, destinations={"benigno": _plain_dest()}, tracing=zipkin)
    )
    r = decide_outbound(out_engine, closed, Head(host="elsewhere"), "elsewhere", None, OWN)
    assert isinstance(r, Reply) and r.status == 403 and r.trace is not None
    assert r.trace.parent_id == "" and r.trace.sampled and r.trace.reason == r.reason  # a new trace
    # A service bundle's own tracing (a MeshTrace naming the service) replaces the mesh's.
    off = ServiceBundle(mesh="default", service="magnanimo", tracing=ServiceTracing(backend=None))
    quiet = _snap(out_engine, _mesh(destinations={"benigno": _plain_dest()}, tracing=zipkin), off)
    assert quiet.trace_backend is None and quiet.trace_sampling is None and not quiet.trace_b3
