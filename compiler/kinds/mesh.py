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

from compiler.kinds._base import Duration, Finding, KindDef, Spec


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


class Networking(Spec):
    outbound: Outbound | None = None


class MeshSpec(Spec):
    mtls: Mtls | None = None
    metrics: Metrics | None = None
    logging: Logging | None = None
    tracing: dict[str, Any] | None = None
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


KIND = KindDef("Mesh", "kuma.io/v1alpha1", MeshSpec, check, "none", __doc__ or "")
