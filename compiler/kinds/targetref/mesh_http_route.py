"""MeshHTTPRoute: how outbound HTTP requests to a destination are matched, changed and routed.

Each `to[]` entry names the destination and its `rules`: `matches` (path Exact/PathPrefix/
RegularExpression, method, query parameters, headers) select requests; `default.filters`
change them (header modifiers, redirect, URL rewrite, mirror) and `default.backendRefs` split
them by weight. Rules of several routes merge by their `matches`. `to` only; `hostnames` only
for a MeshGateway route. A MeshTimeout or MeshRetry that targets the route (top-level, or in
`to`) sets its rules' own request timeout and retries, over the destination's.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshHTTPRoute
    metadata: {name: benigno-canary, labels: {kuma.io/mesh: default}}
    spec:
      to:
        - targetRef: {kind: MeshService, name: benigno}
          rules:
            - matches: [{path: {type: PathPrefix, value: /api}}]
              default:
                backendRefs:
                  - {kind: MeshServiceSubset, name: benigno, tags: {version: v1}, weight: 90}
                  - {kind: MeshServiceSubset, name: benigno, tags: {version: v2}, weight: 10}

Invalid (a prefix with a trailing slash)::

    matches: [{path: {type: PathPrefix, value: /api/}}]
"""

from __future__ import annotations

import ipaddress

from compiler.diagnostics import Path
from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    I32,
    BackendRef,
    Bool,
    Found,
    HeaderMatch,
    IntOrString,
    KStr,
    TargetRef,
    at,
    backend_ref,
    dns1123_subdomain,
    kind_def,
    target_ref,
    top,
)
from compiler.kinds.targetref.mesh_tcp_route import BACKEND_KINDS, TOP_KINDS, to_kinds


class PathMatch(Spec):
    value: KStr = ""
    type: KStr = ""
    """``Exact``, ``PathPrefix`` or ``RegularExpression``."""


class QueryParamsMatch(Spec):
    type: KStr = ""
    """``Exact`` or ``RegularExpression``."""
    name: KStr = ""
    value: KStr = ""


class Match(Spec):
    path: PathMatch | None = None
    method: KStr | None = None
    query_params: list[QueryParamsMatch] | None = None
    headers: list[HeaderMatch] | None = None


class HeaderKeyValue(Spec):
    name: KStr = ""
    value: KStr = ""


class HeaderModifier(Spec):
    set: list[HeaderKeyValue] | None = None
    add: list[HeaderKeyValue] | None = None
    remove: list[KStr] | None = None


class PathRewrite(Spec):
    type: KStr = ""
    """``ReplaceFullPath`` or ``ReplacePrefixMatch``."""
    replace_full_path: KStr | None = None
    replace_prefix_match: KStr | None = None


class RequestRedirect(Spec):
    scheme: KStr | None = None
    hostname: KStr | None = None
    path: PathRewrite | None = None
    port: I32 | None = None
    status_code: I32 = 0
    """301, 302, 303, 307 or 308."""


class UrlRewrite(Spec):
    hostname: KStr | None = None
    path: PathRewrite | None = None
    host_to_backend_hostname: Bool | None = None


class RequestMirror(Spec):
    percentage: IntOrString | None = None
    backend_ref: BackendRef = BackendRef()


class Filter(Spec):
    type: KStr = ""
    """RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite or RequestMirror."""
    request_header_modifier: HeaderModifier | None = None
    response_header_modifier: HeaderModifier | None = None
    request_redirect: RequestRedirect | None = None
    url_rewrite: UrlRewrite | None = None
    request_mirror: RequestMirror | None = None


class RuleConf(Spec):
    filters: list[Filter] | None = None
    backend_refs: list[BackendRef] | None = None


class Rule(Spec):
    matches: list[Match] | None = None
    default: RuleConf | None = None


class To(Spec):
    hostnames: list[KStr] | None = None
    """Host names the route answers for (MeshGateway routes only)."""
    target_ref: TargetRef = TargetRef()
    rules: list[Rule] | None = None


class MeshHTTPRouteSpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    to: list[To] | None = None


_PREFIX_ONLY = "can only appear if all matches match a path prefix"
UNRESOLVED_BACKEND = "kuma.io/unresolved-backend"


def _path(p: PathMatch) -> Found:
    if p.type == "PathPrefix" and p.value != "/":
        if p.value.endswith("/"):
            yield (
                ("value",),
                "does not need a trailing slash because only a `/`-separated prefix or an entire path "
                "is matched",
            )
        if not p.value.startswith("/"):
            yield ("value",), "must be an absolute path"
    elif p.type == "Exact" and not p.value.startswith("/"):
        yield ("value",), "must be an absolute path"


def _matches(matches: list[Match]) -> Found:
    for i, m in enumerate(matches):
        if m.path is not None:
            yield from at((i, "path"), _path(m.path))
        seen: set[str] = set()
        for j, q in enumerate(m.query_params or []):
            if q.name in seen:
                yield (i, "queryParams", j, "name"), f"multiple entries for name {q.name}"
            seen.add(q.name)
        for j, h in enumerate(m.headers or []):
            if (h.type or "Exact") in ("Present", "Absent") and h.value != "":
                yield (i, "headers", j, "value"), "must not be defined"


def _hostname(hostname: str | None) -> Found:
    if hostname is None:
        return
    try:
        ipaddress.ip_address(hostname)
        yield (), "cannot be an IP address"
        return
    except ValueError:
        pass
    for v in dns1123_subdomain(hostname):
        yield (), v


def _header_modifier(m: HeaderModifier) -> Found:
    if m.set is None and m.add is None and m.remove is None:
        yield (), "must have at least one defined: set, add, remove"
        return
    seen: set[str] = set()
    names = [("set", i, h.name) for i, h in enumerate(m.set or [])]
    names += [("add", i, h.name) for i, h in enumerate(m.add or [])]
    names += [("remove", i, n) for i, n in enumerate(m.remove or [])]
    for field, i, name in names:
        if name in seen:
            yield (field, i, "name"), "duplicate header name"
        seen.add(name)


def _without_prefix(matches: list[Match]) -> bool:
    return any(m.path is None or m.path.type != "PathPrefix" for m in matches)


def _filters(top_kind: str, filters: list[Filter], matches: list[Match]) -> Found:
    for i, f in enumerate(filters):
        if f.type in ("RequestHeaderModifier", "ResponseHeaderModifier"):
            field = "requestHeaderModifier" if f.type == "RequestHeaderModifier" else "responseHeaderModifier"
            mod = (
                f.request_header_modifier if f.type == "RequestHeaderModifier" else f.response_header_modifier
            )
            if mod is None:
                yield (i, field), "must be defined"
            else:
                yield from at((i, field), _header_modifier(mod))
        elif f.type == "RequestRedirect":
            r = f.request_redirect
            if r is None:
                yield (i, "requestRedirect"), "must be defined"
                continue
            if r.path is not None and r.path.replace_prefix_match is not None and _without_prefix(matches):
                yield (i, "requestRedirect", "path", "replacePrefixMatch"), _PREFIX_ONLY
            yield from at((i, "requestRedirect", "hostname"), _hostname(r.hostname))
        elif f.type == "URLRewrite":
            u = f.url_rewrite
            if u is None:
                yield (i, "urlRewrite"), "must be defined"
                continue
            if u.path is not None and u.path.replace_prefix_match is not None and _without_prefix(matches):
                yield (i, "urlRewrite", "path", "replacePrefixMatch"), _PREFIX_ONLY
            yield from at((i, "urlRewrite", "hostname"), _hostname(u.hostname))
            if u.host_to_backend_hostname:
                if top_kind != "MeshGateway":
                    yield (i, "urlRewrite", "hostToBackendHostname"), "can only be set with MeshGateway"
                if u.hostname is not None:
                    yield (i, "urlRewrite", "hostToBackendHostname"), "cannot be set together with hostname"
        elif f.type == "RequestMirror":
            if f.request_mirror is None:
                yield (i, "requestMirror"), "must be defined"
                continue
            kinds = ("MeshService", "MeshServiceSubset")
            yield from at((i, "requestMirror", "backendRef"), target_ref(f.request_mirror.backend_ref, kinds))


def _backend_refs(top_kind: str, refs: list[BackendRef], filters: list[Filter]) -> Found:
    if not refs and top_kind == "MeshGateway" and not any(f.type == "RequestRedirect" for f in filters):
        yield (), "must not be empty"
    for i, b in enumerate(refs):
        yield from at((i,), target_ref(b, BACKEND_KINDS, allowed_invalid_names=(UNRESOLVED_BACKEND,)))
        yield from at((i,), backend_ref(b))


def check(spec: MeshHTTPRouteSpec) -> Found:
    if spec.target_ref is not None:
        yield from at(("targetRef",), target_ref(spec.target_ref, TOP_KINDS, gateway_tags=True))
    kind = top(spec.target_ref).kind
    for i, t in enumerate(spec.to or []):
        p: Path = ("to", i)
        yield from at((*p, "targetRef"), target_ref(t.target_ref, to_kinds(kind)))
        for j, r in enumerate(t.rules or []):
            rp: Path = (*p, "rules", j)
            matches = r.matches or []
            conf = r.default or RuleConf()
            yield from at((*rp, "matches"), _matches(matches))
            if conf.filters is not None:
                yield from at((*rp, "default", "filters"), _filters(kind, conf.filters, matches))
            refs = conf.backend_refs or []
            yield from at((*rp, "default", "backendRefs"), _backend_refs(kind, refs, conf.filters or []))
        if kind != "MeshGateway" and t.hostnames:
            yield (*p, "hostnames"), "must not be defined"


KIND = kind_def("MeshHTTPRoute", MeshHTTPRouteSpec, check, __doc__ or "", compiled=True)
