"""MeshAccessLog: where proxies write access logs (file, TCP, OpenTelemetry) and in what format.

Formats: `Plain` (Envoy's command operators, default Kuma's own line) or `Json` (key/value pairs).
A policy sets `to` (outbound), `from` (inbound) or `rules` (inbound, replacing `to` and `from`).

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshAccessLog
    metadata: {name: all-traffic, labels: {kuma.io/mesh: default}}
    spec:
      targetRef: {kind: Mesh}
      to:
        - targetRef: {kind: Mesh}
          default: {backends: [{type: File, file: {path: /tmp/access.log}}]}

Invalid (no backends)::

    spec: {to: [{targetRef: {kind: Mesh}, default: {}}]}
"""

from __future__ import annotations

import json
from typing import Any

from compiler.diagnostics import Path
from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    BackendResourceRef,
    Bool,
    Found,
    KStr,
    Match,
    TargetRef,
    alias,
    at,
    is_file_path,
    is_url,
    kind_def,
    otel_endpoint_or_ref,
    target_ref,
    top,
    validate_match,
)


class JsonValue(Spec):
    key: KStr = ""
    value: KStr = ""


class Format(Spec):
    type: KStr = ""
    """``Plain`` or ``Json``."""
    plain: KStr | None = None
    """An Envoy format string (``Plain``)."""
    json_: list[JsonValue] | None = alias("json", "json_")
    """Key/value pairs whose values are format strings (``Json``)."""
    omit_empty_values: Bool = False
    """Leave out fields whose value is empty."""


class TcpBackend(Spec):
    format: Format | None = None
    address: KStr = ""
    """``host:port`` of a TCP log collector."""


class FileBackend(Spec):
    format: Format | None = None
    path: KStr = ""
    """The file to append to."""


class OtelAttribute(Spec):
    key: KStr = ""
    value: KStr = ""


class OtelBackend(Spec):
    attributes: list[OtelAttribute] | None = None
    body: Any = None
    """The log record body (any JSON; may use placeholders)."""
    endpoint: KStr = ""
    """``host:port`` of an OpenTelemetry collector (or use ``backendRef``)."""
    backend_ref: BackendResourceRef | None = None


class Backend(Spec):
    type: KStr = ""
    """``File``, ``Tcp`` or ``OpenTelemetry``."""
    tcp: TcpBackend | None = None
    file: FileBackend | None = None
    open_telemetry: OtelBackend | None = None


class Conf(Spec):
    backends: list[Backend] | None = None


class To(Spec):
    target_ref: TargetRef = TargetRef()
    default: Conf | None = None


class From(Spec):
    target_ref: TargetRef = TargetRef()
    default: Conf | None = None


class Rule(Spec):
    matches: list[Match] | None = None
    default: Conf | None = None


class MeshAccessLogSpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    to: list[To] | None = None
    from_: list[From] | None = alias("from", "from_")
    rules: list[Rule] | None = None


_TOP = ("Mesh", "MeshSubset", "MeshGateway", "MeshService", "MeshServiceSubset", "Dataplane")
_MUST_STATIC = "must be a static OpenTelemetry attribute name; placeholders are only supported in values"
_OTEL_NAME = (
    "must start with a lowercase letter, use only lowercase letters, digits, '.' or '_', "
    "avoid consecutive delimiters, and end with a letter or digit"
)


def _format(f: Format) -> Found:
    if f.type == "Plain":
        if f.plain is None:
            yield ("plain",), "must be defined"
        elif f.plain == "":
            yield ("plain",), "must not be empty"
    elif f.type == "Json":
        if f.json_ is None:
            yield ("json",), "must be defined"
            return
        if not f.json_:
            yield ("json",), "must not be empty"
        for i, kv in enumerate(f.json_):
            p: Path = ("json", i)
            if kv.key == "":
                yield (*p, "key"), "key cannot be empty"
            if kv.value == "":
                yield (*p, "value"), "value cannot be empty"
            try:
                json.loads(f'{{"{kv.key}": "{kv.value}"}}')
            except ValueError:
                yield p, "is not a valid JSON object"
    else:
        yield ("type",), f"unknown format type {f.type!r}; use Plain or Json"


def _otel_attribute(path: Path, key: str) -> Found:
    import re

    if key == "":
        yield path, "must be defined"
    elif "%" in key:
        yield path, _MUST_STATIC
    elif key.startswith("otel."):
        yield path, "must not use the reserved OpenTelemetry prefix 'otel.'"
    elif not re.match(r"^[a-z](?:[a-z0-9]|[._][a-z0-9])*$", key):
        yield path, _OTEL_NAME


def _backend(b: Backend) -> Found:
    if b.type == "File":
        if b.file is None:
            yield ("file",), "must be defined"
            return
        if b.file.format is not None:
            yield from at(("file", "format"), _format(b.file.format))
        if not is_file_path(b.file.path):
            yield ("file", "path"), "file backend requires a valid path"
    elif b.type == "Tcp":
        if b.tcp is None:
            yield ("tcp",), "must be defined"
            return
        if b.tcp.format is not None:
            yield from at(("tcp", "format"), _format(b.tcp.format))
        if not is_url(b.tcp.address):
            yield ("tcp", "address"), "tcp backend requires valid address"
    elif b.type == "OpenTelemetry":
        o = b.open_telemetry
        if o is None:
            yield ("openTelemetry",), "must be defined"
            return
        yield from at(("openTelemetry",), otel_endpoint_or_ref(o.endpoint, o.backend_ref))
        for i, a in enumerate(o.attributes or []):
            yield from _otel_attribute(("openTelemetry", "attributes", i, "key"), a.key)
    else:
        yield ("type",), f"unknown backend type {b.type!r}; use File, Tcp or OpenTelemetry"


def _default(path: Path, conf: Conf | None) -> Found:
    c = conf or Conf()
    if c.backends is None:
        yield (*path, "backends"), "must be defined"
        return
    for i, b in enumerate(c.backends):
        yield from at((*path, "backends", i), _backend(b))


def check(spec: MeshAccessLogSpec) -> Found:
    to, frm, rules = spec.to or [], spec.from_ or [], spec.rules or []
    yield from at(
        ("targetRef",), target_ref(top(spec.target_ref), _TOP, gateway_tags=True, inbound=bool(rules or frm))
    )
    if rules and (to or frm):
        yield (), "fields 'to' and 'from' must be empty when 'rules' is defined"
    if not rules and not to and not frm:
        yield (), "at least one of 'from', 'to' or 'rules' has to be defined"
    kind = top(spec.target_ref).kind
    to_kinds = (
        ("Mesh",)
        if kind == "MeshGateway"
        else ("Mesh", "MeshService", "MeshExternalService", "MeshMultiZoneService", "MeshHTTPRoute")
    )
    for i, t in enumerate(to):
        yield from at(("to", i, "targetRef"), target_ref(t.target_ref, to_kinds))
        yield from _default(("to", i, "default"), t.default)
    for i, f in enumerate(frm):
        yield from at(("from", i, "targetRef"), target_ref(f.target_ref, ("Mesh",)))
        yield from _default(("from", i, "default"), f.default)
    for i, r in enumerate(rules):
        for j, m in enumerate(r.matches or []):
            yield from at(("rules", i, "matches", j), validate_match(m))
        yield from _default(("rules", i, "default"), r.default)


KIND = kind_def("MeshAccessLog", MeshAccessLogSpec, check, __doc__ or "")
