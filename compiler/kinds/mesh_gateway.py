"""MeshGateway: a built-in ingress gateway, its listeners, and the gateway service it declares.

The ``kuma.io/service`` of its selector names the gateway service (it needs no Service entry);
MeshGatewayRoutes attach to its listeners by tags.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshGateway
    mesh: default
    metadata: {name: edge}
    spec:
      selectors: [{match: {kuma.io/service: edge-gateway}}]
      conf:
        listeners: [{port: 8080, protocol: HTTP, tags: {port: http-8080}}]

Invalid (port out of range)::

    conf: {listeners: [{port: 0, protocol: HTTP}]}
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from compiler.kinds.base import SERVICE_TAG, Finding, KindDef, Selector, Spec, check_selectors, tag_findings

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", re.IGNORECASE)


class Tls(Spec):
    mode: str | None = None
    certificates: list[dict[str, Any]] | None = None
    options: dict[str, Any] | None = None


class Resources(Spec):
    connection_limit: int | None = None


class Listener(Spec):
    hostname: str | None = None
    port: int | None = None
    protocol: str | None = None
    tls: Tls | None = None
    tags: dict[str, str] | None = None
    cross_mesh: bool | None = None
    resources: Resources | None = None


class Conf(Spec):
    listeners: list[Listener] | None = None


class MeshGatewaySpec(Spec):
    selectors: list[Selector] | None = None
    tags: dict[str, str] | None = None
    conf: Conf | None = None


def _hostname(h: str) -> str | None:
    if h == "*":
        return None
    if len(h) > 253:
        return "must be at most 253 characters"
    labels = h.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if not labels:
            return "invalid wildcard domain"
    elif "*" in h:
        return "invalid wildcard domain"
    if not all(_LABEL.match(x) and len(x) <= 63 for x in labels):
        return "invalid hostname"
    return None


_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def certificate(cert: dict[str, Any]) -> str | dict[str, str] | None:
    """What the bundle carries for a Kuma certificate data source meshc reads: a ``file`` path,
    or ``{"secret": NAME}`` (a ``kubernetes.io/tls`` Secret mounted on the gateway); None for
    the others (inline bytes would put key material in bundles)."""
    if set(cert) == {"file"} and isinstance(cert["file"], str) and cert["file"]:
        return cert["file"]
    name = cert.get("secret")
    if set(cert) == {"secret"} and isinstance(name, str) and len(name) <= 253 and _SECRET_NAME.match(name):
        return {"secret": name}
    return None


def _unread(cert: dict[str, Any]) -> str | None:
    """Why meshc does not read this certificate (None: it does)."""
    if certificate(cert) is not None:
        return None
    if set(cert) == {"secret"}:
        return (
            "meshc reads a secret from the Kubernetes Secret of that name (type kubernetes.io/tls, "
            "mounted on the gateway): this is not a valid Secret name (lowercase letters, digits, "
            "'-' and '.', at most 253 characters)"
        )
    if set(cert) & {"inline", "inlineString", "inline_string"}:
        return (
            "meshc does not read inline certificates (the key would travel in every bundle): give "
            "{secret: NAME} (a kubernetes.io/tls Secret) or {file: PATH}"
        )
    return (
        "meshc does not read this certificate: it reads {secret: NAME} (a kubernetes.io/tls "
        "Secret with tls.crt and tls.key) or {file: PATH} (a PEM file with the chain and its key)"
    )


def check(spec: MeshGatewaySpec) -> Iterator[Finding]:
    if not spec.selectors:
        yield Finding(("selectors",), "E1003", "must have at least one element")
    else:
        yield from check_selectors("selectors", spec.selectors)
        services = {(s.match or {}).get(SERVICE_TAG) for s in spec.selectors}
        listeners = (spec.conf.listeners if spec.conf else None) or []
        if len(spec.selectors) > 1 and any(lst.cross_mesh for lst in listeners):
            yield Finding(("selectors", 1), "E1005", "there can be at most one selector")
        elif len(services) > 1:
            yield Finding(("selectors", 1), "E1005", "every selector must name the same gateway service")
    if spec.tags and SERVICE_TAG in spec.tags:
        yield Finding(("tags", SERVICE_TAG), "E1005", f'tag name must not be "{SERVICE_TAG}"', True)
    if spec.tags:
        yield from tag_findings(("tags",), dict(spec.tags))
    if spec.conf is None or not spec.conf.listeners:
        yield Finding(("conf",), "E1003", "cannot be empty")
        return
    seen: dict[int, list[tuple[int, str, str]]] = {}
    for i, lst in enumerate(spec.conf.listeners):
        p = ("conf", "listeners", i)
        if lst.port is None or not 1 <= lst.port <= 65535:
            yield Finding((*p, "port"), "E1005", "port must be in the range [1, 65535]")
        proto = (lst.protocol or "").upper()
        if not proto:
            yield Finding((*p, "protocol"), "E1003", "cannot be empty")
        elif proto not in ("HTTP", "HTTPS", "TCP", "TLS"):
            yield Finding((*p, "protocol"), "E1005", "must be one of HTTP, HTTPS, TCP or TLS")
        if lst.hostname is not None and (msg := _hostname(lst.hostname)):
            yield Finding((*p, "hostname"), "E1005", msg)
        if lst.cross_mesh and proto not in ("HTTP", ""):
            yield Finding((*p, "protocol"), "E1005", "protocol is not supported with crossMesh")
        if proto in ("HTTPS", "TLS"):
            tls = lst.tls or Tls()
            mode = (tls.mode or "").upper()
            if lst.tls is not None and not mode:
                yield Finding((*p, "tls", "mode"), "E1003", "cannot be empty")
            elif proto == "HTTPS" and mode == "PASSTHROUGH":
                yield Finding((*p, "tls", "mode"), "E1005", "mode is not supported on HTTPS listeners")
            for ci, cert in enumerate(tls.certificates or []):
                if (why := _unread(cert)) is not None:
                    yield Finding((*p, "tls", "certificates", ci), "W1005", why)  # valid for Kuma
            if (
                mode in ("TERMINATE", "")
                and not tls.certificates
                and (lst.tls is not None or proto == "HTTPS")
            ):
                if lst.tls is not None and mode == "":
                    pass
                else:
                    yield Finding(
                        (*p, "tls", "certificates"), "E1003", "cannot be empty in TLS termination mode"
                    )
        if (
            lst.resources
            and lst.resources.connection_limit is not None
            and lst.resources.connection_limit < 0
        ):
            yield Finding((*p, "resources", "connectionLimit"), "E1005", "must not be negative")
        if lst.port is not None:
            seen.setdefault(lst.port, []).append((i, proto, lst.hostname or "*"))
    limits: dict[int, dict[int, int]] = {}
    for i, lst in enumerate(spec.conf.listeners):
        if lst.port is not None and lst.resources and lst.resources.connection_limit is not None:
            limits.setdefault(lst.port, {})[i] = lst.resources.connection_limit
    for by_listener in limits.values():
        if len(set(by_listener.values())) > 1:
            for i in by_listener:
                yield Finding(
                    ("conf", "listeners", i, "resources", "connectionLimit"),
                    "E1005",
                    "conflicting values for this port; listeners on one port share one connection limit",
                )
    for entries in seen.values():
        protos = {e[1] for e in entries}
        for i, _proto, host in entries:
            if len(protos) > 1:
                yield Finding(
                    ("conf", "listeners", i), "E1005", "protocol conflicts with other listeners on this port"
                )
            if [e[2] for e in entries].count(host) > 1:
                yield Finding(
                    ("conf", "listeners", i), "E1005", "multiple listeners for hostname on this port"
                )


KIND = KindDef("MeshGateway", "kuma.io/v1alpha1", MeshGatewaySpec, check, "none", __doc__ or "")
