"""MeshPassthrough: which destinations outside the mesh proxies pass traffic through to.

A single top-level `default`: `passthroughMode` (All, Matched, None) and `appendMatch` entries
by `Domain` (wildcards `*.example.com`), `IP` or `CIDR`, with a `port` and a `protocol`
(tcp, tls, grpc, http, http2, mysql).

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshPassthrough
    metadata: {name: egress, labels: {kuma.io/mesh: default}}
    spec:
      default:
        passthroughMode: Matched
        appendMatch: [{type: Domain, value: api.example.com, port: 443, protocol: tls}]

Invalid (a domain over plain TCP)::

    appendMatch: [{type: Domain, value: api.example.com, port: 80, protocol: tcp}]
"""

from __future__ import annotations

import ipaddress
import re

from compiler.diagnostics import Path
from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    U32,
    Found,
    KStr,
    TargetRef,
    at,
    kind_def,
    must_be_one_of,
    target_ref,
)


class Match(Spec):
    type: KStr = ""
    """``Domain``, ``IP`` or ``CIDR``."""
    value: KStr = ""
    port: U32 | None = None
    protocol: KStr = ""
    """tcp, tls, grpc, http, http2 or mysql."""


class Conf(Spec):
    passthrough_mode: KStr | None = None
    """``All``, ``Matched`` or ``None``."""
    append_match: list[Match] | None = None


class MeshPassthroughSpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    default: Conf | None = None


_PROTOCOLS = ("tcp", "tls", "grpc", "http", "http2", "mysql")
_L7 = ("grpc", "http", "http2")
_DNS = re.compile(r"^([a-zA-Z0-9_]{1}[a-zA-Z0-9_-]{0,62}){1}(\.[a-zA-Z0-9_]{1}[a-zA-Z0-9_-]{0,62})*[\._]?$")


def _is_ip(v: str) -> bool:
    try:
        ipaddress.ip_address(v)
        return True
    except ValueError:
        return False


def _is_cidr(v: str) -> bool:
    try:
        ipaddress.ip_network(v, strict=False)
        return "/" in v
    except ValueError:
        return False


def _is_dns(v: str) -> bool:
    """govalidator's ``IsDNSName``."""
    if v == "" or len(v.replace(".", "")) > 255 or _is_ip(v):
        return False
    return bool(_DNS.match(v))


def check(spec: MeshPassthroughSpec) -> Found:
    if spec.target_ref is not None:
        yield from at(("targetRef",), target_ref(spec.target_ref, ("Mesh", "MeshSubset", "Dataplane")))
    port_protocol: dict[int, str] = {}
    domains: dict[tuple[int, str], set[str]] = {}
    for i, m in enumerate((spec.default.append_match if spec.default else None) or []):
        p: Path = ("default", "appendMatch", i)
        if m.protocol == "mysql" and m.port is None:
            yield (*p, "port"), "port must be defined for Mysql protocol"
        if m.port is not None and not 0 < m.port <= 65535:
            yield (*p, "port"), "port must be a valid (1-65535)"
        if m.port is not None:
            seen = port_protocol.get(m.port)
            if seen is not None and seen != m.protocol and m.protocol in _L7:
                yield (
                    (*p, "port"),
                    (
                        "using the same port in multiple matches requires the same protocol for the "
                        "following "
                        "protocols: [grpc http http2]"
                    ),
                )
            else:
                port_protocol[m.port] = m.protocol
            values = domains.setdefault((m.port, m.protocol), set())
            if m.value in values:
                yield (*p, "value"), f"value {m.value} is already defiend for this port and protocol"
            values.add(m.value)
        if m.protocol not in _PROTOCOLS:
            yield (*p, "protocol"), must_be_one_of("protocol", _PROTOCOLS)
        if m.type == "CIDR":
            if not _is_cidr(m.value):
                yield (*p, "value"), "provided CIDR has incorrect value"
        elif m.type == "IP":
            if not _is_ip(m.value):
                yield (*p, "value"), "provided IP has incorrect value"
        elif m.type == "Domain":
            if m.protocol in ("tcp", "mysql"):
                yield (*p, "protocol"), f"protocol {m.protocol} is not supported for a domain"
            if re.match(r"^\*[^.]+", m.value):
                yield (
                    (*p, "value"),
                    "provided DNS has incorrect value, partial wildcard is currently not supported",
                )
            if m.port is None and m.value.startswith("*") and m.protocol in _L7:
                yield (*p, "port"), "wildcard domains doesn't work for all ports and layer 7 protocol"
            host = m.value[2:] if m.value.startswith("*.") else m.value
            if not host.startswith("*") and not _is_dns(host):
                yield (*p, "value"), "provided DNS has incorrect value"
        else:
            yield (
                (*p, "type"),
                f"provided type {m.type} is not supported, one of Domain, IP, or CIDR is supported",
            )


KIND = kind_def("MeshPassthrough", MeshPassthroughSpec, check, __doc__ or "")
