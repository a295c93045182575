"""MeshGatewayRoute: HTTP (or TCP) routes on the listeners of a MeshGateway.

Rules are sorted by specificity (exact path, then the longest prefix, then regex; then method,
headers and query parameters), so the most specific match wins whatever the order in the file.

Valid (the seed's ``/route1`` ingress, prefix stripped)::

    apiVersion: kuma.io/v1alpha1
    kind: MeshGatewayRoute
    mesh: default
    metadata: {name: route1}
    spec:
      selectors: [{match: {kuma.io/service: edge-gateway}}]
      conf:
        http:
          rules:
            - matches: [{path: {match: PREFIX, value: /route1}}]
              filters: [{rewrite: {replacePrefixMatch: /}}]
              backends: [{weight: 1, destination: {kuma.io/service: magnanimo}}]

Invalid (``replacePrefixMatch`` without a prefix match, E1010)::

    rules:
      - matches: [{path: {match: EXACT, value: /a}}]
        filters: [{rewrite: {replacePrefixMatch: /}}]
"""

from __future__ import annotations

from collections.abc import Iterator

from compiler.diagnostics import Path
from compiler.kinds.base import SERVICE_TAG, Finding, KindDef, Selector, Spec, TagMap, check_selectors


class PathMatch(Spec):
    match: str | None = None
    """``EXACT`` (the default, as in Kuma's proto enum), ``PREFIX`` or ``REGEX``."""
    value: str | None = None


class HeaderMatch(Spec):
    match: str | None = None
    name: str | None = None
    value: str | None = None


class QueryMatch(Spec):
    match: str | None = None
    name: str | None = None
    value: str | None = None


class Match(Spec):
    path: PathMatch | None = None
    method: str | None = None
    headers: list[HeaderMatch] | None = None
    query_parameters: list[QueryMatch] | None = None


class Header(Spec):
    name: str | None = None
    value: str | None = None


class HeaderFilter(Spec):
    set: list[Header] | None = None
    add: list[Header] | None = None
    remove: list[str] | None = None


class Backend(Spec):
    weight: int | None = None
    destination: TagMap | None = None


class Mirror(Spec):
    backend: Backend | None = None
    percentage: float | None = None


class Redirect(Spec):
    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    status_code: int | None = None
    path: dict[str, str] | None = None


class Rewrite(Spec):
    replace_full: str | None = None
    replace_prefix_match: str | None = None
    host_to_backend_hostname: bool | None = None


class Filter(Spec):
    request_header: HeaderFilter | None = None
    response_header: HeaderFilter | None = None
    mirror: Mirror | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None


class Rule(Spec):
    matches: list[Match] | None = None
    filters: list[Filter] | None = None
    backends: list[Backend] | None = None


class HttpConf(Spec):
    hostnames: list[str] | None = None
    rules: list[Rule] | None = None


class TcpRule(Spec):
    backends: list[Backend] | None = None


class TcpConf(Spec):
    rules: list[TcpRule] | None = None


class Conf(Spec):
    http: HttpConf | None = None
    tcp: TcpConf | None = None


class MeshGatewayRouteSpec(Spec):
    selectors: list[Selector] | None = None
    conf: Conf | None = None


def _backend(path: Path, b: Backend) -> Iterator[Finding]:
    if SERVICE_TAG not in (b.destination or {}):
        yield Finding(path, "E1007", f'mandatory tag "{SERVICE_TAG}" is missing')
    if b.weight is not None and b.weight < 0:
        yield Finding((*path, "weight"), "E1009", "weight must not be negative")


def _headers(path: Path, f: HeaderFilter) -> Iterator[Finding]:
    if not (f.set or f.add or f.remove):
        yield Finding(path, "E1003", "cannot be empty")
    for op in ("set", "add"):
        for i, h in enumerate(getattr(f, op) or []):
            if not h.name:
                yield Finding((*path, op, i, "name"), "E1005", "cannot be empty")
            if not h.value:
                yield Finding((*path, op, i, "value"), "E1005", "cannot be empty")
    for i, name in enumerate(f.remove or []):
        if not name:
            yield Finding((*path, "remove", i), "E1005", "cannot be empty")


def _match(path: Path, m: Match) -> Iterator[Finding]:
    if m.path is None and m.method is None and not m.headers and not m.query_parameters:
        yield Finding(path, "E1003", "cannot be empty")
    if m.path is not None:
        kind = (m.path.match or "EXACT").upper()
        v = m.path.value
        vp = (*path, "path", "value")
        if not v:
            yield Finding(vp, "E1005", "cannot be empty")
        elif kind in ("EXACT", "PREFIX") and not v.startswith("/"):
            yield Finding(vp, "E1005", "must be an absolute path")
        elif kind == "PREFIX" and len(v) > 1 and v.endswith("/"):
            yield Finding(vp, "E1005", "must be an absolute path without a trailing slash")
        if kind not in ("EXACT", "PREFIX", "REGEX"):
            yield Finding((*path, "path", "match"), "E1005", "must be EXACT, PREFIX or REGEX")
    for i, h in enumerate(m.headers or []):
        kind = (h.match or "EXACT").upper()
        if not h.name:
            yield Finding((*path, "headers", i, "name"), "E1005", "cannot be empty")
        if kind in ("PRESENT", "ABSENT"):
            if h.value:
                yield Finding((*path, "headers", i, "value"), "E1005", "cannot be set")
        elif not h.value:
            yield Finding((*path, "headers", i, "value"), "E1005", "cannot be empty")
    for i, q in enumerate(m.query_parameters or []):
        if not q.name:
            yield Finding((*path, "query_parameters", i, "name"), "E1005", "cannot be empty")
        if not q.value:
            yield Finding((*path, "query_parameters", i, "value"), "E1005", "cannot be empty")


def _rule(path: Path, r: Rule) -> Iterator[Finding]:
    if not r.matches:
        yield Finding((*path, "matches"), "E1003", "cannot be empty")
    for i, m in enumerate(r.matches or []):
        yield from _match((*path, "matches", i), m)
    filters = r.filters or []
    redirects = [f for f in filters if f.redirect is not None]
    if redirects and len(filters) > 1:
        yield Finding((*path, "filters"), "E1005", "redirects cannot be used with other filters")
    if redirects and r.backends:
        yield Finding((*path, "backends"), "E1005", "must be empty when using redirect filters")
    if not redirects and not r.backends:
        yield Finding((*path, "backends"), "E1003", "cannot be empty")
    host_rewrite = any(f.rewrite is not None and f.rewrite.host_to_backend_hostname for f in filters)
    for i, f in enumerate(filters):
        p = (*path, "filters", i)
        set_ = [
            n for n in ("request_header", "response_header", "mirror", "redirect", "rewrite") if getattr(f, n)
        ]
        if not set_ and not any(n in f.model_fields_set for n in type(f).model_fields):
            yield Finding(p, "E1003", "cannot be empty")
        for name in ("request_header", "response_header"):
            hf = getattr(f, name)
            if name in f.model_fields_set and hf is None:
                yield Finding((*p, name), "E1003", "cannot be empty")
            elif hf is not None:
                yield from _headers((*p, name), hf)
                if host_rewrite and name == "request_header":
                    for j, h in enumerate(hf.set or []):
                        if (h.name or "").lower() == "host":
                            yield Finding(
                                (*p, name, "set", j),
                                "E1005",
                                "cannot modify 'host' header, when route has set "
                                "'rewrite.host_to_backend_hostname' option",
                            )
        if f.mirror is not None:
            if f.mirror.backend is None:
                yield Finding((*p, "mirror", "backend"), "E1003", "cannot be empty")
            else:
                yield from _backend((*p, "mirror", "backend"), f.mirror.backend)
            if f.mirror.percentage is not None and not 0 <= f.mirror.percentage <= 100:
                yield Finding((*p, "mirror", "percentage"), "E1005", "has to be in [0.0 - 100.0] range")
        elif "mirror" in f.model_fields_set:
            yield Finding((*p, "mirror"), "E1003", "cannot be empty")
        if f.redirect is not None:
            rd = f.redirect
            if rd.port is not None and not 1 <= rd.port <= 65535:
                yield Finding((*p, "redirect", "port"), "E1005", "port must be in the range [1, 65535]")
            if rd.status_code is not None and not 300 <= rd.status_code <= 308:
                yield Finding((*p, "redirect", "status_code"), "E1005", "must be in the range [300, 308]")
        if f.rewrite is not None and f.rewrite.replace_prefix_match is not None:
            prefixes = [
                m
                for m in r.matches or []
                if m.path is not None and (m.path.match or "EXACT").upper() == "PREFIX"
            ]
            if not r.matches or len(prefixes) != len(r.matches):
                yield Finding(
                    (*p, "rewrite", "replacePrefixMatch"),
                    "E1010",
                    "cannot be used without a match on path prefix",
                )
    for i, b in enumerate(r.backends or []):
        yield from _backend((*path, "backends", i), b)


def check(spec: MeshGatewayRouteSpec) -> Iterator[Finding]:
    yield from check_selectors("selectors", spec.selectors, require_service=False)
    c = spec.conf
    if c is None or (c.http is None and c.tcp is None):
        yield Finding(("conf",), "E1003", "cannot be empty")
        return
    if c.http is not None:
        if not c.http.rules:
            yield Finding(("conf", "http", "rules"), "E1003", "cannot be empty")
        for i, r in enumerate(c.http.rules or []):
            yield from _rule(("conf", "http", "rules", i), r)
    if c.tcp is not None:
        if not c.tcp.rules:
            yield Finding(("conf", "tcp", "rules"), "E1003", "cannot be empty")
        for i, tr in enumerate(c.tcp.rules or []):
            if not tr.backends:
                yield Finding(("conf", "tcp", "rules", i, "backends"), "E1003", "cannot be empty")
            for j, b in enumerate(tr.backends or []):
                yield from _backend(("conf", "tcp", "rules", i, "backends", j), b)


KIND = KindDef("MeshGatewayRoute", "kuma.io/v1alpha1", MeshGatewayRouteSpec, check, "none", __doc__ or "")
