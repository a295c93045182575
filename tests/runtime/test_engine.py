"""The sans-io engine, without sockets: seeded randomness and a fake clock."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from runtime._hosts import Outcome
from runtime._match import tags_match
from runtime._policy import Fault, RetryPolicy, TokenBucket
from runtime.bundle import (
    BackOff,
    BundleError,
    CatalogService,
    CircuitBreakerConf,
    Consecutive,
    Destination,
    Detectors,
    FaultAbort,
    FaultDelay,
    FaultInjectionConf,
    GatewayBackend,
    GatewayConf,
    GatewayFilter,
    GatewayListener,
    GatewayMatch,
    GatewayRule,
    HealthCheckConf,
    HttpMatch,
    HttpModify,
    HttpRetry,
    HttpRoute,
    Inbound,
    LoadBalancer,
    MeshBundle,
    PathRewrite,
    RateLimitConf,
    RetryConf,
    RouteConf,
    Rule,
    ServiceBundle,
    Split,
    StringMatch,
    TimeoutConf,
)
from runtime.engine import Engine
from runtime.protocol import Endpoint, EndpointSet


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _mesh(destinations: dict[str, Destination] | None = None, **services: CatalogService) -> MeshBundle:
    services = services or {"benigno": CatalogService(port=5000, protocol="http")}
    return MeshBundle(mesh="default", services=services, destinations=destinations or {})


def _svc(name: str = "magnanimo", **kw: object) -> ServiceBundle:
    return ServiceBundle(mesh="default", service=name, **kw)  # type: ignore[arg-type]


def _eps(**services: list[tuple[str, dict[str, str]]]) -> EndpointSet:
    return EndpointSet(
        generation=1,
        services={s: [Endpoint(address=a, tags=t) for a, t in eps] for s, eps in services.items()},
    )


def _dest(route: RouteConf, **kinds: object) -> Destination:
    return Destination(
        route=(Rule[RouteConf](conf=route),), timeout=(Rule[TimeoutConf](conf=TimeoutConf()),), **kinds
    )  # type: ignore[arg-type]


V1V2 = {
    "benigno": [("10.0.0.1:80", {"version": "v1"}), ("10.0.0.2:80", {"version": "v2"})],
}


def _engine(seed: int = 1, tags: dict[str, str] | None = None) -> tuple[Engine, Clock]:
    clock = Clock()
    return Engine("magnanimo", tags or {}, rng=random.Random(seed), clock=clock), clock


def _install(
    engine: Engine, mesh: MeshBundle, svc: ServiceBundle | None = None, eps: EndpointSet | None = None
) -> None:
    engine.install(engine.build(mesh, svc or _svc(), eps or _eps(**V1V2)))


def test_tags_match_wildcard_and_missing() -> None:
    assert tags_match({"version": "*"}, {"version": "v9"})
    assert not tags_match({"version": "*"}, {})
    assert not tags_match({"version": "v1"}, {"version": "v2"})
    assert tags_match({}, {})


def test_weighted_split_is_binomially_close() -> None:
    engine, _ = _engine(seed=7)
    split = (
        Split(weight=90, service="benigno", tags={"version": "v1"}),
        Split(weight=10, service="benigno", tags={"version": "v2"}),
    )
    _install(engine, _mesh({"benigno": _dest(RouteConf(split=split))}))
    dest = engine.snapshot.destination("benigno")
    assert dest is not None
    n = 20_000
    counts = Counter(dest.wheel.choose(engine.rng).subset for _ in range(n))  # type: ignore[union-attr]
    p = counts["version=v2"] / n
    assert abs(p - 0.1) <= 5.3 * math.sqrt(0.09 / n)


def test_zero_weight_target_gets_nothing_and_all_zero_means_no_target() -> None:
    engine, _ = _engine()
    split = (Split(weight=0, service="benigno", tags={"version": "v2"}),)
    _install(engine, _mesh({"benigno": _dest(RouteConf(split=split))}))
    dest = engine.snapshot.destination("benigno")
    assert dest is not None and dest.wheel.choose(engine.rng) is None


def test_round_robin_without_route_alternates_over_all_endpoints() -> None:
    engine, clock = _engine()
    _install(engine, _mesh())
    dest = engine.snapshot.destination("benigno.mesh")
    assert dest is not None
    target = dest.wheel.choose(engine.rng)
    assert target is not None
    picks = [target.pick(clock(), engine.rng).address for _ in range(6)]  # type: ignore[union-attr]
    assert picks == ["10.0.0.1:80", "10.0.0.2:80"] * 3


def test_http_route_first_match_wins_and_rewrites_prefix() -> None:
    engine, _ = _engine()
    route = RouteConf(
        split=(Split(weight=1, service="benigno", tags={"version": "v1"}),),
        http=(
            HttpRoute(
                match=HttpMatch(path=StringMatch(kind="prefix", value="/api/")),
                modify=HttpModify(path=PathRewrite(prefix="/")),
                split=(Split(weight=1, service="benigno", tags={"version": "v2"}),),
            ),
            HttpRoute(
                match=HttpMatch(headers=(("x-canary", StringMatch(kind="exact", value="1")),)),
                split=(Split(weight=1, service="benigno", tags={"version": "v2"}),),
            ),
        ),
    )
    _install(engine, _mesh({"benigno": _dest(route)}))
    dest = engine.snapshot.destination("benigno")
    assert dest is not None
    r = dest.route("GET", "/api/x", {})
    assert r is not None and r.rewrite_path("/api/x") == "/x"
    assert dest.route("GET", "/other", {"x-canary": "1"}) is not None
    assert dest.route("GET", "/other", {}) is None


def test_tag_conditioned_rules_use_local_tags() -> None:
    v2_only = Rule[RouteConf](
        when={"version": "v2"},
        conf=RouteConf(split=(Split(weight=1, service="benigno", tags={"version": "v2"}),)),
    )
    default = Rule[RouteConf](
        conf=RouteConf(split=(Split(weight=1, service="benigno", tags={"version": "v1"}),))
    )
    dest = Destination(route=(v2_only, default), timeout=(Rule[TimeoutConf](conf=TimeoutConf()),))
    for tags, subset in (({"version": "v2"}, "version=v2"), ({"version": "v1"}, "version=v1")):
        engine, _ = _engine(tags=tags)
        _install(engine, _mesh({"benigno": dest}))
        table = engine.snapshot.destination("benigno")
        assert table is not None and table.wheel.choose(engine.rng).subset == subset  # type: ignore[union-attr]


def test_outbound_rules_match_the_peer_subset() -> None:
    split = (
        Split(weight=1, service="benigno", tags={"version": "v1"}),
        Split(weight=1, service="benigno", tags={"version": "v2"}),
    )
    fast = Rule[TimeoutConf](peer={"version": "v2"}, conf=TimeoutConf(http_request_timeout_ms=100))
    slow = Rule[TimeoutConf](conf=TimeoutConf(http_request_timeout_ms=9000))
    dest = Destination(route=(Rule[RouteConf](conf=RouteConf(split=split)),), timeout=(fast, slow))
    engine, _ = _engine()
    _install(engine, _mesh({"benigno": dest}))
    table = engine.snapshot.destination("benigno")
    assert table is not None
    by_subset = {t.subset: t.request_timeout_s for t in table.targets}
    assert by_subset == {"version=v1": 9.0, "version=v2": 0.1}


def test_service_bundle_outbound_wins_over_mesh_default() -> None:
    mesh_dest = _dest(RouteConf(split=(Split(weight=1, service="benigno", tags={"version": "v1"}),)))
    svc_dest = _dest(RouteConf(split=(Split(weight=1, service="benigno", tags={"version": "v2"}),)))
    engine, _ = _engine()
    _install(engine, _mesh({"benigno": mesh_dest}), _svc(outbound={"benigno": svc_dest}))
    table = engine.snapshot.destination("benigno")
    assert table is not None and table.wheel.choose(engine.rng).subset == "version=v2"  # type: ignore[union-attr]


def _cb(consecutive: int = 3, pct: int = 50, base_ms: int = 1000) -> CircuitBreakerConf:
    return CircuitBreakerConf(
        base_ejection_time_ms=base_ms,
        max_ejection_percent=pct,
        detectors=Detectors(total_errors=Consecutive(consecutive=consecutive)),
    )


def test_ejection_after_consecutive_5xx_and_return_after_base_time_times_n() -> None:
    engine, clock = _engine()
    route = RouteConf(split=(Split(weight=1, service="benigno"),))
    _install(
        engine, _mesh({"benigno": _dest(route, circuit_breaker=(Rule[CircuitBreakerConf](conf=_cb()),))})
    )
    target = engine.snapshot.destination("benigno").wheel.items[0]  # type: ignore[union-attr]
    bad = target.hosts[0]
    assert not target.report(bad, Outcome.HTTP_5XX, clock())
    assert not target.report(bad, Outcome.OK, clock())  # a success resets the streak
    ejected = [target.report(bad, Outcome.GATEWAY, clock()) for _ in range(3)]
    assert ejected == [False, False, True]
    assert [h.address for h in target.available(clock())] == ["10.0.0.2:80"]
    clock.now += 1.0
    assert len(target.available(clock())) == 2
    for _ in range(3):
        target.report(bad, Outcome.HTTP_5XX, clock())
    clock.now += 1.5  # second ejection lasts 2 x base
    assert len(target.available(clock())) == 1
    clock.now += 0.5
    assert len(target.available(clock())) == 2


def test_ejection_respects_max_percent_but_always_one() -> None:
    engine, clock = _engine()
    route = RouteConf(split=(Split(weight=1, service="benigno"),))
    cb = Rule[CircuitBreakerConf](conf=_cb(consecutive=1, pct=10))
    _install(engine, _mesh({"benigno": _dest(route, circuit_breaker=(cb,))}))
    target = engine.snapshot.destination("benigno").wheel.items[0]  # type: ignore[union-attr]
    a, b = target.hosts
    assert target.report(a, Outcome.HTTP_5XX, clock())  # 10% of 2 rounds to 0: still one
    assert not target.report(b, Outcome.HTTP_5XX, clock())
    assert [h.address for h in target.available(clock())] == [b.address]


def test_panic_threshold_spreads_over_all_hosts() -> None:
    engine, clock = _engine()
    hc = HealthCheckConf(interval_ms=1000, timeout_ms=100, unhealthy_threshold=1, healthy_threshold=1)
    eps = _eps(benigno=[(f"10.0.0.{i}:80", {}) for i in range(1, 5)])
    route = RouteConf(split=(Split(weight=1, service="benigno"),))
    _install(
        engine, _mesh({"benigno": _dest(route, health_check=(Rule[HealthCheckConf](conf=hc),))}), eps=eps
    )
    target = engine.snapshot.destination("benigno").wheel.items[0]  # type: ignore[union-attr]
    hosts = target.hosts
    assert hosts[0].health_result(False, hc)
    assert len(target.available(clock())) == 3
    hosts[1].health_result(False, hc)
    assert len(target.available(clock())) == 2  # 50% healthy is not below the 50% threshold
    hosts[2].health_result(False, hc)
    assert len(target.available(clock())) == 4  # panic: everyone
    hosts[0].health_result(True, hc)
    assert len(target.available(clock())) == 2


def test_endpoints_marked_unhealthy_by_control_plane_are_skipped() -> None:
    engine, clock = _engine()
    eps = EndpointSet(
        generation=1,
        services={
            "benigno": [
                Endpoint(address="10.0.0.1:80"),
                Endpoint(address="10.0.0.2:80"),
                Endpoint(address="10.0.0.3:80", healthy=False),
            ]
        },
    )
    _install(engine, _mesh(), eps=eps)
    target = engine.snapshot.destination("benigno").wheel.items[0]  # type: ignore[union-attr]
    assert {h.address for h in target.available(clock())} == {"10.0.0.1:80", "10.0.0.2:80"}


def test_least_request_prefers_idle_hosts() -> None:
    engine, clock = _engine()
    route = RouteConf(
        split=(Split(weight=1, service="benigno"),), load_balancer=LoadBalancer(type="least_request")
    )
    _install(engine, _mesh({"benigno": _dest(route)}))
    target = engine.snapshot.destination("benigno").wheel.items[0]  # type: ignore[union-attr]
    target.hosts[0].active = 5
    picks = Counter(target.pick(clock(), engine.rng).address for _ in range(200))  # type: ignore[union-attr]
    assert picks["10.0.0.2:80"] > picks["10.0.0.1:80"]


def test_ring_hash_is_sticky_and_random_spreads() -> None:
    engine, clock = _engine()
    eps = _eps(benigno=[(f"10.0.0.{i}:80", {}) for i in range(1, 6)])
    for lb_type in ("ring_hash", "random"):
        route = RouteConf(
            split=(Split(weight=1, service="benigno"),), load_balancer=LoadBalancer(type=lb_type)
        )
        _install(engine, _mesh({"benigno": _dest(route)}), eps=eps)
        target = engine.snapshot.destination("benigno").wheel.items[0]  # type: ignore[union-attr]
        if lb_type == "ring_hash":
            assert len({target.pick(clock(), engine.rng, "user-42").address for _ in range(50)}) == 1  # type: ignore[union-attr]
            assert len({target.pick(clock(), engine.rng, f"u{i}").address for i in range(200)}) == 5  # type: ignore[union-attr]
        else:
            assert len({target.pick(clock(), engine.rng).address for _ in range(200)}) == 5  # type: ignore[union-attr]


def test_pick_avoids_hosts_already_tried() -> None:
    engine, clock = _engine()
    _install(engine, _mesh())
    target = engine.snapshot.destination("benigno").wheel.items[0]  # type: ignore[union-attr]
    first = target.hosts[0]
    for _ in range(10):
        assert target.pick(clock(), engine.rng, None, [first]) is target.hosts[1]


def test_retry_policy_decisions() -> None:
    p = RetryPolicy(HttpRetry(num_retries=2, back_off=BackOff(base_interval_ms=10, max_interval_ms=40)))
    assert p.method_allowed("GET") and not p.method_allowed("POST")
    assert p.retriable_status(503) and not p.retriable_status(500)
    assert p.retriable_failure(Outcome.CONNECT_FAILURE)
    rng = random.Random(3)
    assert all(0 <= p.backoff_s(5, rng) <= 0.04 for _ in range(100))
    q = RetryPolicy(HttpRetry(retry_on=("5xx",), retriable_methods=("POST",), retriable_status_codes=(418,)))
    assert q.retriable_status(500) and q.retriable_status(418) and q.method_allowed("POST")
    assert not q.method_allowed("GET")


def test_token_bucket_refills_at_rate() -> None:
    bucket = TokenBucket(RateLimitConf(requests=2, interval_ms=1000), now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert not bucket.take(0.4)
    assert bucket.take(0.5)


def test_fault_decisions_follow_percentages() -> None:
    rng = random.Random(5)
    always = Fault(FaultInjectionConf(delay=FaultDelay(percentage=100, value_ms=250)))
    assert always.decide(rng) == (0.25, 0, 0)
    half = Fault(FaultInjectionConf(abort=FaultAbort(percentage=50, http_status=503)))
    aborted = sum(1 for _ in range(4000) if half.decide(rng)[1] == 503)
    assert abs(aborted / 4000 - 0.5) <= 5.3 * math.sqrt(0.25 / 4000)


def test_inbound_rules_by_caller_and_permissions() -> None:
    engine, _ = _engine(tags={"version": "v1"})
    inbound = Inbound(
        permissions=(Rule[None](peer={"kuma.io/service": "magnanimo"}, conf=None),),
        rate_limit=(
            Rule[RateLimitConf](
                peer={"kuma.io/service": "magnanimo"}, conf=RateLimitConf(requests=1, interval_ms=1000)
            ),
        ),
        fault_injection=(
            Rule[FaultInjectionConf](
                when={"version": "v2"},
                conf=FaultInjectionConf(abort=FaultAbort(percentage=100, http_status=500)),
            ),
        ),
    )
    engine.install(engine.build(_mesh(), _svc(inbound=inbound), _eps(**V1V2)))
    rl, fault, allowed = engine.snapshot.inbound.for_caller("magnanimo")
    assert rl is not None and fault is None and allowed
    rl2, _, allowed2 = engine.snapshot.inbound.for_caller("other")
    assert rl2 is None and not allowed2


def test_rate_limit_bucket_survives_reload() -> None:
    engine, _ = _engine()
    inbound = Inbound(rate_limit=(Rule[RateLimitConf](conf=RateLimitConf(requests=1, interval_ms=60000)),))
    engine.install(engine.build(_mesh(), _svc(inbound=inbound), None))
    rl, _, _ = engine.snapshot.inbound.for_caller("")
    assert rl is not None and rl.bucket.take(engine.clock())
    engine.install(engine.build(_mesh(), _svc(inbound=inbound), None))
    rl, _, _ = engine.snapshot.inbound.for_caller("")
    assert rl is not None and not rl.bucket.take(engine.clock())


def test_bad_bundles_do_not_compile() -> None:
    engine, _ = _engine()
    bad_regex = RouteConf(
        split=(Split(weight=1, service="benigno"),),
        http=(HttpRoute(match=HttpMatch(path=StringMatch(kind="regex", value="(")), split=()),),
    )
    with pytest.raises(BundleError):
        engine.build(_mesh({"benigno": _dest(bad_regex)}), _svc(), None)
    with pytest.raises(BundleError, match="this data plane is"):
        engine.build(_mesh(), _svc("someone-else"), None)
    with pytest.raises(BundleError):
        engine.build(_mesh(), _svc(), _eps(benigno=[("no-port", {})]))


def test_hosts_keep_state_across_endpoint_reloads() -> None:
    engine, clock = _engine()
    route = RouteConf(split=(Split(weight=1, service="benigno"),))
    mesh = _mesh(
        {"benigno": _dest(route, circuit_breaker=(Rule[CircuitBreakerConf](conf=_cb(consecutive=1)),))}
    )
    _install(engine, mesh)
    target = engine.snapshot.destination("benigno").wheel.items[0]  # type: ignore[union-attr]
    assert target.report(target.hosts[0], Outcome.HTTP_5XX, clock())
    more = dict(V1V2)
    more["benigno"] = [*V1V2["benigno"], ("10.0.0.3:80", {})]
    _install(engine, mesh, eps=_eps(**more))
    target = engine.snapshot.destination("benigno").wheel.items[0]  # type: ignore[union-attr]
    assert {h.address for h in target.available(clock())} == {"10.0.0.2:80", "10.0.0.3:80"}


def test_gateway_routes_match_rewrite_and_redirect() -> None:
    engine = Engine("edge", {}, rng=random.Random(1))
    rules = (
        GatewayRule(
            matches=(GatewayMatch(path=StringMatch(kind="exact", value="/exact")),),
            filters=(GatewayFilter(type="redirect", redirect_hostname="example.org", redirect_status=301),),
        ),
        GatewayRule(
            matches=(GatewayMatch(path=StringMatch(kind="prefix", value="/route1")),),
            filters=(GatewayFilter(type="rewrite", rewrite_prefix="/"),),
            backends=(GatewayBackend(weight=1, service="magnanimo"),),
        ),
        GatewayRule(
            matches=(GatewayMatch(path=StringMatch(kind="regex", value="/v[0-9]+/.*"), method="POST"),),
            backends=(GatewayBackend(weight=1, service="benigno", tags={"version": "v2"}),),
        ),
    )
    gw = GatewayConf(listeners=(GatewayListener(port=8080, protocol="HTTP", rules=rules),))
    mesh = _mesh(
        benigno=CatalogService(port=5000, protocol="http"),
        magnanimo=CatalogService(port=4000, protocol="http"),
    )
    engine.install(engine.build(mesh, ServiceBundle(mesh="default", service="edge", gateway=gw), None))
    listener = engine.snapshot.gateway[8080]
    found = listener.route("any", "GET", "/route1/hw2", {}, {})
    assert found is not None
    route, prefix = found
    assert route.rewrite("/route1/hw2", prefix) == "/hw2"
    assert route.rewrite("/route1", prefix) == "/"
    assert listener.route("any", "GET", "/route10", {}, {}) is None
    exact = listener.route("any", "GET", "/exact", {}, {})
    assert exact is not None and exact[0].redirect is not None
    assert listener.route("any", "GET", "/v1/x", {}, {}) is None
    regex = listener.route("any", "POST", "/v1/x", {}, {})
    assert regex is not None and regex[0].wheel.items[0].subset == "version=v2"


def test_tcp_retry_and_timeouts_compile() -> None:
    engine, _ = _engine()
    dest = _dest(
        RouteConf(split=(Split(weight=1, service="db"),)),
        retry=(Rule[RetryConf](conf=RetryConf(tcp={"max_connect_attempts": 3})),),  # type: ignore[arg-type]
    )
    _install(
        engine,
        _mesh({"db": dest}, db=CatalogService(port=5432, protocol="tcp")),
        eps=_eps(db=[("10.0.0.9:5432", {})]),
    )
    table = engine.snapshot.destination("db")
    assert table is not None and table.protocol == "tcp"
    assert table.wheel.items[0].tcp_connect_attempts == 3
