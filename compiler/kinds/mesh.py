"""Mesh: the mesh itself, with its mTLS backends, logging backends and outbound passthrough.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: Mesh
    metadata: {name: default}
    spec:
      mtls:
        enabledBackend: ca-1
        backends: [{name: ca-1, type: builtin, dpCert: {rotation: {expiration: 1d}}}]
      networking: {outbound: {passthrough: true}}

Invalid (``enabledBackend`` names no backend)::

    spec: {mtls: {enabledBackend: ca-2, backends: [{name: ca-1, type: builtin}]}}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import AliasChoices, Field

from compiler.kinds.base import Duration, Finding, KindDef, Spec
from runtime import bundle as b


class Rotation(Spec):
    expiration: Duration | None = None
    """How long a data plane certificate lives before it is rotated (default 1d)."""


class DpCert(Spec):
    rotation: Rotation | None = None
    request_timeout: Duration | None = None


class CaCert(Spec):
    model_config = Spec.model_config | {"alias_generator": None}
    RSAbits: int | None = None
    expiration: Duration | None = None


class MtlsBackendConf(Spec):
    caCert: CaCert | None = None
    cert: dict[str, Any] | None = None
    key: dict[str, Any] | None = None


class MtlsBackend(Spec):
    name: str
    type: Literal["builtin", "provided"]
    mode: Literal["STRICT", "PERMISSIVE"] = "STRICT"
    dp_cert: DpCert | None = None
    conf: MtlsBackendConf | None = None
    root_chain: dict[str, Any] | None = None


class Mtls(Spec):
    enabled_backend: str | None = None
    """The backend in use; mTLS is off when empty."""
    skip_validation: bool = False
    backends: list[MtlsBackend] = []


class LoggingBackendConf(Spec):
    path: str | None = None
    address: str | None = None


class LoggingBackend(Spec):
    name: str
    format: str | None = None
    type: Literal["file", "tcp"]
    conf: LoggingBackendConf | None = None


class Logging(Spec):
    default_backend: str | None = None
    backends: list[LoggingBackend] = []


class MetricsBackend(Spec):
    name: str
    type: Literal["prometheus"] = "prometheus"
    conf: dict[str, Any] | None = None


class Metrics(Spec):
    enabled_backend: str | None = None
    backends: list[MetricsBackend] = []


class Outbound(Spec):
    passthrough: bool = True
    """Whether traffic to hosts outside the mesh passes through (Kuma's default: true)."""


class TracingBackendConf(Spec):
    """Kuma's zipkin (``url``, ``traceId128bit``, ``apiVersion``, ``sharedSpanContext``) and
    datadog (``address``, ``port``, ``splitService``) backend confs."""

    url: str | None = None
    trace_id128bit: bool | None = Field(
        default=None,
        validation_alias=AliasChoices("traceId128bit", "trace_id128bit"),
        serialization_alias="traceId128bit",
    )
    api_version: str | None = None
    shared_span_context: bool | None = None
    address: str | None = None
    port: int | None = None
    split_service: bool | None = None


class TracingBackend(Spec):
    name: str
    type: Literal["zipkin", "datadog"]
    sampling: float | None = None
    """Percentage of new traces sampled (Kuma's default: 100)."""
    conf: TracingBackendConf | None = None


class Tracing(Spec):
    default_backend: str | None = None
    backends: list[TracingBackend] = []


class Networking(Spec):
    outbound: Outbound | None = None


class MeshSpec(Spec):
    mtls: Mtls | None = None
    metrics: Metrics | None = None
    logging: Logging | None = None
    tracing: Tracing | None = None
    """Tracing backends: a ``zipkin`` default one is where the data planes report spans (and
    they propagate B3 besides ``traceparent``); a MeshTrace that applies wins (W3005)."""
    routing: dict[str, Any] | None = None
    networking: Networking | None = None
    constraints: dict[str, Any] | None = None
    skip_creating_initial_policies: list[str] | None = None
    mesh_services: dict[str, Any] | None = None


def check(spec: MeshSpec) -> Iterator[Finding]:
    if spec.mtls is not None:
        names = [b.name for b in spec.mtls.backends]
        if spec.mtls.enabled_backend and spec.mtls.enabled_backend not in names:
            yield Finding(
                ("mtls", "enabledBackend"), "E1005", f"has to be set to one of the backends: {names}"
            )
        for i, n in enumerate(names):
            if n in names[:i]:
                yield Finding(("mtls", "backends", i, "name"), "E1005", f"backend name {n!r} is used twice")
    if spec.tracing is not None:
        yield from _check_tracing(spec.tracing)
    if spec.logging is not None:
        names = [b.name for b in spec.logging.backends]
        if spec.logging.default_backend and spec.logging.default_backend not in names:
            yield Finding(
                ("logging", "defaultBackend"), "E1005", f"has to be set to one of the backends: {names}"
            )
        for i, b in enumerate(spec.logging.backends):
            conf = b.conf or LoggingBackendConf()
            if b.type == "file" and not conf.path:
                yield Finding(
                    ("logging", "backends", i, "conf", "path"), "E1003", "a file backend needs a path"
                )
            if b.type == "tcp" and not conf.address:
                yield Finding(
                    ("logging", "backends", i, "conf", "address"), "E1003", "a tcp backend needs an address"
                )


def logging_backends(spec: MeshSpec | None) -> tuple[b.LoggingBackend, ...]:
    """The mesh's logging backends as bundles carry them (TrafficLog's ``to_conf`` picks one)."""
    if spec is None or spec.logging is None:
        return ()
    return tuple(
        b.LoggingBackend(
            name=x.name,
            type=x.type,
            format=x.format,
            path=x.conf.path if x.conf else None,
            address=x.conf.address if x.conf else None,
        )
        for x in spec.logging.backends
    )


def tracing_backend(spec: MeshSpec | None) -> b.TracingBackend | None:
    """The Mesh's default tracing backend (``defaultBackend``, else the first) when it is a
    ``zipkin`` one: the only type the data planes report to (a datadog one is validated only)."""
    tracing = spec.tracing if spec is not None else None
    if tracing is None or not tracing.backends:
        return None
    chosen = next((x for x in tracing.backends if x.name == tracing.default_backend), tracing.backends[0])
    url = chosen.conf.url if chosen.conf is not None else None
    if chosen.type != "zipkin" or not url:
        return None
    sampling = 100.0 if chosen.sampling is None else chosen.sampling
    return b.TracingBackend(name=chosen.name, sampling=sampling, url=url)


def mesh_settings(spec: MeshSpec | None) -> tuple[b.Mtls, bool]:
    """The mesh bundle's mTLS settings and outbound passthrough (a mesh with no Mesh: Kuma's defaults)."""
    if spec is None:
        return b.Mtls(), True
    mtls = b.Mtls()
    if spec.mtls is not None and spec.mtls.enabled_backend:
        be = next((x for x in spec.mtls.backends if x.name == spec.mtls.enabled_backend), None)
        if be is not None:
            rot = be.dp_cert.rotation.expiration if be.dp_cert and be.dp_cert.rotation else None
            mtls = b.Mtls(
                enabled=True,
                mode=be.mode,
                backend=be.name,
                backend_type=be.type,
                cert_rotation_ms=rot or 86400000,
            )
    passthrough = True
    if spec.networking is not None and spec.networking.outbound is not None:
        passthrough = spec.networking.outbound.passthrough
    return mtls, passthrough


KIND = KindDef("Mesh", "kuma.io/v1alpha1", MeshSpec, check, "none", __doc__ or "")


def _check_tracing(tracing: Tracing) -> Iterator[Finding]:
    names = [x.name for x in tracing.backends]
    if tracing.default_backend and tracing.default_backend not in names:
        yield Finding(
            ("tracing", "defaultBackend"), "E1005", f"has to be set to one of the backends: {names}"
        )
    for i, x in enumerate(tracing.backends):
        if x.name in names[:i]:
            yield Finding(
                ("tracing", "backends", i, "name"), "E1005", f"backend name {x.name!r} is used twice"
            )
        if x.sampling is not None and not 0.0 <= x.sampling <= 100.0:
            yield Finding(("tracing", "backends", i, "sampling"), "E1005", "has to be in [0.0, 100.0] range")
        if x.type == "zipkin" and not (x.conf and x.conf.url):
            yield Finding(("tracing", "backends", i, "conf", "url"), "E1003", "a zipkin backend needs a url")
