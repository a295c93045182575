"""TrafficRoute: where a source's requests to a destination go (split, L7 matches, load balancer).

Outbound: configures the ``sources`` data planes. ``http`` entries are ordered and the first
match wins; a request that matches none takes the top-level ``split``/``destination``. Weights are
relative, not percentages; at least one must be above 0.

Valid (the seed's canary)::

    apiVersion: kuma.io/v1alpha1
    kind: TrafficRoute
    mesh: default
    metadata: {name: benigno-canary}
    spec:
      sources: [{match: {kuma.io/service: magnanimo}}]
      destinations: [{match: {kuma.io/service: benigno}}]
      conf:
        split:
          - {weight: 90, destination: {kuma.io/service: benigno, version: v1}}
          - {weight: 10, destination: {kuma.io/service: benigno, version: v2}}

Invalid (``split`` and ``destination`` together, E1008)::

    conf: {split: [...], destination: {kuma.io/service: benigno}}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from compiler.diagnostics import Path
from compiler.kinds.base import (
    SERVICE_TAG,
    ConfContext,
    Finding,
    SelectorSpec,
    Spec,
    TagMap,
    extra_tags,
    selector_kind,
    selector_service,
    tag_findings,
)
from runtime import bundle as b


class StringMatch(Spec):
    prefix: str | None = None
    exact: str | None = None
    regex: str | None = None


class Match(Spec):
    method: StringMatch | None = None
    path: StringMatch | None = None
    headers: dict[str, StringMatch] | None = None


class HeaderAdd(Spec):
    name: str | None = None
    value: str | None = None
    append: bool = False


class HeaderRemove(Spec):
    name: str | None = None


class HeaderOps(Spec):
    add: list[HeaderAdd] = []
    remove: list[HeaderRemove] = []


class RegexRewrite(Spec):
    pattern: str | None = None
    substitution: str | None = None


class PathModify(Spec):
    rewrite_prefix: str | None = None
    regex: RegexRewrite | None = None


class HostModify(Spec):
    value: str | None = None
    from_path: RegexRewrite | None = None


class Modify(Spec):
    path: PathModify | None = None
    host: HostModify | None = None
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None


class SplitEntry(Spec):
    weight: int | None = None
    """Relative weight (not a percentage); 0 sends nothing to this entry."""
    destination: TagMap | None = None


class Http(Spec):
    match: Match | None = None
    modify: Modify | None = None
    split: list[SplitEntry] | None = None
    destination: TagMap | None = None


class LeastRequest(Spec):
    choice_count: int = 2


class RingHash(Spec):
    hash_function: str | None = None
    min_ring_size: int | None = None
    max_ring_size: int | None = None


class LoadBalancer(Spec):
    round_robin: dict[str, Any] | None = None
    least_request: LeastRequest | None = None
    ring_hash: RingHash | None = None
    random: dict[str, Any] | None = None
    maglev: dict[str, Any] | None = None


class Conf(Spec):
    split: list[SplitEntry] | None = None
    destination: TagMap | None = None
    load_balancer: LoadBalancer | None = None
    http: list[Http] | None = None


class TrafficRouteSpec(SelectorSpec):
    conf: Conf | None = None


_FORBIDDEN_HEADERS = {"host"}


def _route_target(path: Path, split: list[SplitEntry] | None, dest: TagMap | None) -> Iterator[Finding]:
    if split is not None and dest is not None:
        yield Finding(
            (*path, "destination"),
            "E1008",
            '"split" cannot be defined at the same time as "destination"; keep one of them',
            True,
        )
        return
    if split is None and dest is None:
        yield Finding(path, "E1003", 'requires either "destination" or "split"')
        return
    if dest is not None:
        yield from _destination((*path, "destination"), dest)
        return
    assert split is not None
    for i, entry in enumerate(split):
        p = (*path, "split", i)
        if entry.weight is None:
            yield Finding((*p, "weight"), "E1003", "needs to be defined")
        elif entry.weight < 0:
            yield Finding((*p, "weight"), "E1009", "weight must not be negative")
        yield from _destination((*p, "destination"), entry.destination or {})
    if split and not any((e.weight or 0) > 0 for e in split):
        yield Finding((*path, "split"), "E1009", "there must be at least one split entry with weight above 0")


def _destination(path: Path, dest: TagMap) -> Iterator[Finding]:
    if not dest:
        yield Finding(path, "E1007", "must have at least one tag")
    if SERVICE_TAG not in dest:
        yield Finding(path, "E1007", f'mandatory tag "{SERVICE_TAG}" is missing')
    yield from tag_findings(path, dest)


def _string_match(path: Path, m: StringMatch | None, name: str) -> Iterator[Finding]:
    if m is None:
        return
    set_ = [
        (k, v) for k, v in (("prefix", m.prefix), ("exact", m.exact), ("regex", m.regex)) if v is not None
    ]
    if not set_:
        yield Finding(
            path, "E1003", f'{name} cannot be empty. Available options: "exact", "prefix" or "regex"'
        )
    for k, v in set_:
        if v == "":
            yield Finding((*path, k), "E1005", "cannot be empty")
    if len(set_) > 1:
        yield Finding(path, "E1005", "only one of exact, prefix or regex may be set")


def _header_ops(path: Path, ops: HeaderOps | None) -> Iterator[Finding]:
    if ops is None:
        return
    for i, add in enumerate(ops.add):
        p = (*path, "add", i)
        if not add.name:
            yield Finding((*p, "name"), "E1005", "cannot be empty")
        elif add.name.lower() in _FORBIDDEN_HEADERS or add.name.startswith(":"):
            yield Finding(
                (*p, "name"), "E1005", "host header and HTTP/2 pseudo-headers are not allowed to be modified"
            )
        if not add.value:
            yield Finding((*p, "value"), "E1005", "cannot be empty")
    for i, rm in enumerate(ops.remove):
        p = (*path, "remove", i)
        if not rm.name:
            yield Finding((*p, "name"), "E1005", "cannot be empty")
        elif rm.name.lower() in _FORBIDDEN_HEADERS or rm.name.startswith(":"):
            yield Finding(
                (*p, "name"), "E1005", "host header and HTTP/2 pseudo-headers are not allowed to be modified"
            )


def _http(path: Path, h: Http) -> Iterator[Finding]:
    m = h.match
    if m is None or (m.method is None and m.path is None and m.headers is None):
        yield Finding(
            (*path, "match"),
            "E1003",
            'must be present and contain at least one of the elements: "method", "path" or "headers"',
        )
    else:
        yield from _string_match((*path, "match", "method"), m.method, "method")
        yield from _string_match((*path, "match", "path"), m.path, "path")
        if m.headers is not None:
            if not m.headers:
                yield Finding((*path, "match", "headers"), "E1005", "must contain at least one element")
            for name, hm in m.headers.items():
                yield from _string_match((*path, "match", "headers", name), hm, "header")
    if h.modify is not None:
        mod = h.modify
        if mod.path is not None:
            pp = (*path, "modify", "path")
            if mod.path.rewrite_prefix is not None and mod.path.regex is not None:
                yield Finding(pp, "E1005", "only one of rewritePrefix or regex may be set")
            if mod.path.rewrite_prefix is not None:
                if mod.path.rewrite_prefix == "":
                    yield Finding((*pp, "rewritePrefix"), "E1005", "cannot be empty")
                elif m is None or m.path is None or not m.path.prefix:
                    yield Finding(
                        (*pp, "rewritePrefix"),
                        "E1010",
                        "can only be set when .http.match.path.prefix is not empty",
                    )
            if mod.path.regex is not None:
                yield from _regex((*pp, "regex"), mod.path.regex)
            if mod.path.rewrite_prefix is None and mod.path.regex is None:
                yield Finding(pp, "E1003", "either rewritePrefix or regex has to be set")
        if mod.host is not None:
            hp = (*path, "modify", "host")
            if mod.host.value is not None and mod.host.value == "":
                yield Finding((*hp, "value"), "E1005", "cannot be empty")
            if mod.host.from_path is not None:
                yield from _regex((*hp, "fromPath"), mod.host.from_path)
            if mod.host.value is None and mod.host.from_path is None:
                yield Finding(hp, "E1003", "either value or fromPath has to be set")
        yield from _header_ops((*path, "modify", "requestHeaders"), mod.request_headers)
        yield from _header_ops((*path, "modify", "responseHeaders"), mod.response_headers)
    yield from _route_target(path, h.split, h.destination)


def _regex(path: Path, r: RegexRewrite) -> Iterator[Finding]:
    if not r.pattern:
        yield Finding((*path, "pattern"), "E1005", "cannot be empty")
    if not r.substitution:
        yield Finding((*path, "substitution"), "E1005", "cannot be empty")


def check_conf(spec: TrafficRouteSpec) -> Iterator[Finding]:
    conf = spec.conf
    if conf is None or (
        conf.split is None and conf.destination is None and not conf.http and not conf.load_balancer
    ):
        yield Finding(("conf",), "E1003", "cannot be empty")
        return
    yield from _route_target(("conf",), conf.split, conf.destination)
    for i, h in enumerate(conf.http or []):
        yield from _http(("conf", "http", i), h)
    lb = conf.load_balancer
    if lb is not None:
        if lb.least_request is not None and lb.least_request.choice_count < 2:
            yield Finding(
                ("conf", "loadBalancer", "leastRequest", "choiceCount"),
                "E1012",
                "value must be greater than or equal to 2",
            )
        if lb.ring_hash is not None and lb.ring_hash.hash_function not in (
            None,
            "",
            "XX_HASH",
            "MURMUR_HASH_2",
        ):
            yield Finding(
                ("conf", "loadBalancer", "ringHash", "hashFunction"),
                "E1005",
                "must have a valid hash function (XX_HASH or MURMUR_HASH_2)",
            )
        chosen = [
            n
            for n in ("round_robin", "least_request", "ring_hash", "random", "maglev")
            if getattr(lb, n) is not None
        ]
        if len(chosen) > 1:
            yield Finding(("conf", "loadBalancer"), "E1005", "choose one load balancer")


def split_of(entries: list[SplitEntry] | None, dest: dict[str, str | None] | None) -> tuple[b.Split, ...]:
    if dest is not None:
        return (b.Split(weight=100, service=selector_service(dest), tags=extra_tags(dest)),)
    return tuple(
        b.Split(
            weight=e.weight or 0,
            service=selector_service(e.destination or {}),
            tags=extra_tags(e.destination or {}),
        )
        for e in entries or []
    )


def _sm(m: StringMatch | None) -> b.StringMatch | None:
    if m is None:
        return None
    for kind in ("exact", "prefix", "regex"):
        v = getattr(m, kind)
        if v is not None:
            return b.StringMatch(kind=kind, value=v)
    return None


def _ops(ops: HeaderOps | None) -> b.HeaderOps:
    if ops is None:
        return b.HeaderOps()
    return b.HeaderOps(
        add=tuple(b.HeaderChange(name=a.name or "", value=a.value or "", append=a.append) for a in ops.add),
        remove=tuple(r.name or "" for r in ops.remove),
    )


def _modify(m: Modify | None) -> b.HttpModify | None:
    if m is None:
        return None
    path = None
    if m.path is not None:
        path = b.PathRewrite(
            prefix=m.path.rewrite_prefix,
            regex=m.path.regex.pattern if m.path.regex else None,
            substitution=m.path.regex.substitution if m.path.regex else None,
        )
    host = None
    if m.host is not None:
        host = b.HostRewrite(
            value=m.host.value,
            from_path_regex=m.host.from_path.pattern if m.host.from_path else None,
            from_path_substitution=m.host.from_path.substitution if m.host.from_path else None,
        )
    return b.HttpModify(
        path=path,
        host=host,
        request_headers=_ops(m.request_headers),
        response_headers=_ops(m.response_headers),
    )


def _lb(lb: LoadBalancer | None) -> b.LoadBalancer:
    if lb is None:
        return b.LoadBalancer()
    if lb.least_request is not None:
        return b.LoadBalancer(type="least_request", choice_count=lb.least_request.choice_count)
    if lb.ring_hash is not None:
        rh = lb.ring_hash
        fn = rh.hash_function if rh.hash_function in ("XX_HASH", "MURMUR_HASH_2") else "XX_HASH"
        return b.LoadBalancer(
            type="ring_hash",
            hash_function=fn,
            min_ring_size=rh.min_ring_size or 1024,
            max_ring_size=rh.max_ring_size or 8388608,
        )
    if lb.random is not None:
        return b.LoadBalancer(type="random")
    if lb.maglev is not None:
        return b.LoadBalancer(type="maglev")
    return b.LoadBalancer()


def to_conf(spec: TrafficRouteSpec, ctx: ConfContext) -> b.RouteConf:
    c = spec.conf
    assert c is not None
    http = tuple(
        b.HttpRoute(
            match=b.HttpMatch(
                method=_sm(h.match.method) if h.match else None,
                path=_sm(h.match.path) if h.match else None,
                headers=tuple(
                    (name, sm)
                    for name, m in sorted((h.match.headers or {}).items())
                    if (sm := _sm(m)) is not None
                )
                if h.match
                else (),
            ),
            modify=_modify(h.modify),
            split=split_of(h.split, h.destination),
        )
        for h in c.http or []
    )
    return b.RouteConf(split=split_of(c.split, c.destination), http=http, load_balancer=_lb(c.load_balancer))


def default_route(service: str) -> b.RouteConf:
    """What a source with no TrafficRoute to ``service`` gets: all of it, any instance."""
    return b.RouteConf(split=(b.Split(weight=100, service=service),))


KIND = selector_kind(
    "TrafficRoute",
    TrafficRouteSpec,
    check_conf,
    "outbound",
    __doc__ or "",
    bundle_field="route",
    to_conf=to_conf,
    default=default_route,
)
