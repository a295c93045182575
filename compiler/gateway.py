"""Gateways: MeshGateway listeners with the MeshGatewayRoute rules that attach to them.

A route attaches to every listener whose tags (the gateway service, the gateway's tags and the
listener's tags) carry the route's selector tags. Each (rule, match) becomes one bundle rule,
sorted as Kuma sorts them: exact path, then longer prefixes, then regex, then rules with a
method, more headers and more query parameters. Two rules with the same match on one listener
are an error (E3003): one of them could never be reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compiler.catalog import Catalog, check_tags
from compiler.diagnostics import Diagnostic, Path
from compiler.kinds import mesh_gateway as mg
from compiler.kinds import mesh_gateway_route as mgr
from compiler.kinds.base import SERVICE_TAG, selector_service
from compiler.parse import Doc
from compiler.resolve_targetref import gateway_routes
from runtime import bundle as b

__all__ = ["GatewayBuild", "build_gateways"]


@dataclass
class GatewayBuild:
    service: str
    conf: b.GatewayConf
    docs: list[Doc]
    origins: list[list[tuple[Doc, Path]]] = field(default_factory=list)
    """Per listener, per rule of ``conf`` (its order): the route and the match it came from."""


def _matches_tags(selector: dict[str, str | None], tags: dict[str, str]) -> bool:
    return all(k in tags and (v == "*" or tags[k] == v) for k, v in selector.items())


def _backend(x: mgr.Backend) -> b.GatewayBackend:
    dest = x.destination or {}
    return b.GatewayBackend(
        weight=1 if x.weight is None else x.weight,
        service=selector_service(dest),
        tags={k: v for k, v in dest.items() if k != SERVICE_TAG and v is not None},
    )


def _headers(f: mgr.HeaderFilter) -> dict[str, tuple[b.HeaderChange, ...]]:
    return {
        "set": tuple(b.HeaderChange(name=h.name or "", value=h.value or "") for h in f.set or []),
        "add": tuple(
            b.HeaderChange(name=h.name or "", value=h.value or "", append=True) for h in f.add or []
        ),
    }


def _filter(f: mgr.Filter) -> b.GatewayFilter:
    if f.request_header is not None:
        return b.GatewayFilter(
            type="request_header", remove=tuple(f.request_header.remove or ()), **_headers(f.request_header)
        )
    if f.response_header is not None:
        return b.GatewayFilter(
            type="response_header",
            remove=tuple(f.response_header.remove or ()),
            **_headers(f.response_header),
        )
    if f.mirror is not None:
        assert f.mirror.backend is not None
        mb = _backend(f.mirror.backend)
        return b.GatewayFilter(
            type="mirror",
            mirror=b.Split(weight=mb.weight, service=mb.service, tags=mb.tags),
            mirror_percentage=100.0 if f.mirror.percentage is None else f.mirror.percentage,
        )
    if f.redirect is not None:
        r = f.redirect
        return b.GatewayFilter(
            type="redirect",
            redirect_scheme=r.scheme or None,
            redirect_hostname=r.hostname or None,
            redirect_port=r.port,
            redirect_status=r.status_code or 302,
            redirect_path=(r.path or {}).get("replaceFull") or (r.path or {}).get("replace_full"),
        )
    rw = f.rewrite or mgr.Rewrite()
    return b.GatewayFilter(
        type="rewrite",
        rewrite_full=rw.replace_full,
        rewrite_prefix=rw.replace_prefix_match,
        host_to_backend_hostname=bool(rw.host_to_backend_hostname),
    )


def _match(m: mgr.Match) -> b.GatewayMatch:
    path = None
    if m.path is not None and m.path.value:
        kind = {"EXACT": "exact", "PREFIX": "prefix", "REGEX": "regex"}[(m.path.match or "EXACT").upper()]
        path = b.StringMatch(kind=kind, value=m.path.value)
    return b.GatewayMatch(
        path=path,
        method=m.method.upper() if m.method else None,
        headers=tuple((h.name or "", (h.match or "EXACT").lower(), h.value or "") for h in m.headers or []),
        query=tuple(
            (q.name or "", (q.match or "EXACT").lower(), q.value or "") for q in m.query_parameters or []
        ),
    )


def _sort_key(r: b.GatewayRule) -> tuple[int, int, int, int, int]:
    m = r.matches[0]
    order = {"exact": 0, "prefix": 1, "regex": 2}
    kind = order[m.path.kind] if m.path else 3
    plen = -len(m.path.value) if m.path else 0
    return (kind, plen, 0 if m.method else 1, -len(m.headers), -len(m.query))


def build_gateways(cat: Catalog, mesh: str, docs: list[Doc]) -> tuple[list[GatewayBuild], list[Diagnostic]]:
    gateways = [d for d in docs if d.kind == "MeshGateway"]
    translated, findings = gateway_routes(docs)
    routes = [d for d in docs if d.kind == "MeshGatewayRoute"] + translated
    attached: set[int] = set()
    out: list[GatewayBuild] = []
    for gw in gateways:
        sels = gw.spec.selectors or []
        service = selector_service(dict(sels[0].match or {})) if sels else "*"
        if service == "*" or cat.service(mesh, service) is None or cat.service(mesh, service).doc is not gw:  # type: ignore[union-attr]
            continue
        used = [gw]
        listeners = []
        origins: list[list[tuple[Doc, Path]]] = []
        for li, lst in enumerate(gw.spec.conf.listeners if gw.spec.conf else []):
            tags = {SERVICE_TAG: service, **(gw.spec.tags or {}), **(lst.tags or {})}
            rules: list[tuple[b.GatewayRule, Doc, Path]] = []
            tcp: list[b.GatewayBackend] = []
            for r in routes:
                if not any(_matches_tags(dict(s.match or {}), tags) for s in r.spec.selectors or []):
                    continue
                attached.add(id(r))
                used.append(r)
                conf = r.spec.conf
                if conf.http is not None:
                    hostnames = tuple(conf.http.hostnames or ())
                    for ri, rule in enumerate(conf.http.rules or []):
                        filters = tuple(_filter(f) for f in rule.filters or [])
                        backends = tuple(_backend(x) for x in rule.backends or [])
                        for mi, m in enumerate(rule.matches or []):
                            br = b.GatewayRule(
                                hostnames=hostnames,
                                matches=(_match(m),),
                                filters=filters,
                                backends=backends,
                                timeout=getattr(r, "timeout", None),
                                retry=getattr(r, "retry", None),
                                rate_limit=getattr(r, "rate_limit", None),
                            )
                            rules.append((br, r, ("conf", "http", "rules", ri, "matches", mi)))
                if conf.tcp is not None:
                    for tr in conf.tcp.rules or []:
                        tcp.extend(_backend(x) for x in tr.backends or [])
            seen: dict[tuple[object, ...], tuple[Doc, Path]] = {}
            for br, r, path in rules:
                key = (br.hostnames, br.matches)
                if key in seen:
                    first_doc, first_path = seen[key]
                    findings.append(
                        Diagnostic(
                            "E3003",
                            f"this match is already routed on listener {li} of MeshGateway {gw.name!r} "
                            f"by {first_doc.kind} {first_doc.name!r}; this rule can never be reached",
                            r.loc(path),
                            related_locs=((first_doc.loc(first_path), "the first rule with this match"),),
                        )
                    )
                else:
                    seen[key] = (r, path)
            ordered = sorted(rules, key=lambda x: _sort_key(x[0]))  # stable: equal keys keep their order
            origins.append([(r, path) for _, r, path in ordered])
            listeners.append(
                b.GatewayListener(
                    port=lst.port or 0,
                    protocol=(lst.protocol or "HTTP").upper(),
                    hostname=lst.hostname or "*",
                    tags=dict(lst.tags or {}),
                    connection_limit=lst.resources.connection_limit if lst.resources else None,
                    rules=tuple(x[0] for x in ordered),
                    tcp_backends=tuple(tcp),
                    certificates=_certificates(lst),
                )
            )
        out.append(
            GatewayBuild(
                service,
                b.GatewayConf(tags=dict(gw.spec.tags or {}), listeners=tuple(listeners)),
                used,
                origins,
            )
        )
    for r in routes:
        conf = r.spec.conf
        if id(r) not in attached:
            findings.append(
                Diagnostic(
                    "W1001",
                    "no MeshGateway listener carries these tags: this route is attached to nothing",
                    r.loc(("selectors",)),
                )
            )
        for ri, rule in enumerate((conf.http.rules or []) if conf.http else []):
            for bi, x in enumerate(rule.backends or []):
                findings.extend(
                    _backend_ref(cat, r, ("conf", "http", "rules", ri, "backends", bi, "destination"), x)
                )
            for fi, f in enumerate(rule.filters or []):
                if f.mirror is not None and f.mirror.backend is not None:
                    p = ("conf", "http", "rules", ri, "filters", fi, "mirror", "backend", "destination")
                    findings.extend(_backend_ref(cat, r, p, f.mirror.backend))
        for ti, tr in enumerate((conf.tcp.rules or []) if conf.tcp else []):
            for bi, x in enumerate(tr.backends or []):
                findings.extend(
                    _backend_ref(cat, r, ("conf", "tcp", "rules", ti, "backends", bi, "destination"), x)
                )
    return out, findings


def _certificates(lst: mg.Listener) -> tuple[str | b.GatewayCertificate, ...]:
    """An HTTPS listener's certificates meshc reads, in order (W1005 reports the others)."""
    if (lst.protocol or "").upper() != "HTTPS" or lst.tls is None:
        return ()
    out: list[str | b.GatewayCertificate] = []
    for c in lst.tls.certificates or []:
        got = mg.certificate(c)
        if isinstance(got, str):
            out.append(got)
        elif got is not None:
            out.append(b.GatewayCertificate(secret=got["secret"]))
    return tuple(out)


def _backend_ref(cat: Catalog, r: Doc, path: tuple[str | int, ...], x: mgr.Backend) -> list[Diagnostic]:
    found = list(check_tags(cat, r, path, x.destination or {}, role="backend"))
    return [
        Diagnostic("E2004", f"gateway backend: {d.message}", d.loc, related_locs=d.related_locs)
        if d.code == "E2001"
        else d
        for d in found
    ]
