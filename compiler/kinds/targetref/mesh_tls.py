"""MeshTLS: the inbound TLS mode (Strict or Permissive), TLS versions and ciphers.

`from[]` (deprecated) or `rules[]`, not both. `tlsVersion` and `tlsCiphers` only with the
top-level targetRef kind Mesh. Versions: TLSAuto, TLS10, TLS11, TLS12, TLS13.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshTLS
    metadata: {name: strict, labels: {kuma.io/mesh: default}}
    spec:
      rules:
        - default: {mode: Strict, tlsVersion: {min: TLS12, max: TLS13}}

Invalid (an unknown mode)::

    rules: [{default: {mode: Sometimes}}]
"""

from __future__ import annotations

from compiler.diagnostics import Path
from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    Found,
    KStr,
    TargetRef,
    alias,
    at,
    kind_def,
    must_be_one_of,
    target_ref,
    top,
)


class Version(Spec):
    min: KStr | None = None
    max: KStr | None = None


class Conf(Spec):
    tls_version: Version | None = None
    tls_ciphers: list[KStr] | None = None
    mode: KStr | None = None
    """``Strict`` (mTLS only) or ``Permissive`` (plaintext accepted too)."""


class Rule(Spec):
    default: Conf | None = None


class From(Spec):
    target_ref: TargetRef = TargetRef()
    default: Conf | None = None


class MeshTLSSpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    from_: list[From] | None = alias("from", "from_")
    rules: list[Rule] | None = None


_VERSIONS = ("TLSAuto", "TLS10", "TLS11", "TLS12", "TLS13")
_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
)


def _version(path: Path, v: Version) -> Found:
    specific: dict[str, bool] = {}
    for f, value in (("min", v.min), ("max", v.max)):
        if value is None:
            continue
        if value not in _VERSIONS:
            yield (*path, f), must_be_one_of(f, _VERSIONS)
        elif value != "TLSAuto":
            specific[f] = True
    if (
        v.min
        and v.max
        and specific.get("min")
        and specific.get("max")
        and _VERSIONS.index(v.min) > _VERSIONS.index(v.max)
    ):
        yield (*path, "min"), "min version must be lower than max"


def _default(path: Path, conf: Conf | None, top_kind: str) -> Found:
    c = conf or Conf()
    if c.mode is not None and c.mode not in ("Strict", "Permissive"):
        yield (*path, "mode"), must_be_one_of("mode", ("Strict", "Permissive"))
    if c.tls_ciphers and top_kind != "Mesh":
        yield (*path, "tlsCiphers"), "tlsCiphers can only be defined with top level targetRef kind: Mesh"
    elif any(x not in _CIPHERS for x in c.tls_ciphers or []):
        yield (*path, "tlsCiphers"), must_be_one_of("tlsCiphers", _CIPHERS)
    if c.tls_version is not None:
        if top_kind != "Mesh":
            yield (*path, "tlsVersion"), "tlsVersion can only be defined with top level targetRef kind: Mesh"
        else:
            yield from _version((*path, "tlsVersion"), c.tls_version)


def check(spec: MeshTLSSpec) -> Found:
    frm, rules = spec.from_ or [], spec.rules or []
    if spec.target_ref is not None:
        kinds = ("Mesh", "MeshSubset", "Dataplane")
        yield from at(("targetRef",), target_ref(spec.target_ref, kinds, inbound=bool(rules or frm)))
    if rules and frm:
        yield (), "field 'from' must be empty when 'rules' is defined"
    kind = top(spec.target_ref).kind
    for i, r in enumerate(rules):
        yield from _default(("rules", i, "default"), r.default, kind)
    for i, f in enumerate(frm):
        yield from at(("from", i, "targetRef"), target_ref(f.target_ref, ("Mesh",)))
        yield from _default(("from", i, "default"), f.default, kind)


KIND = kind_def("MeshTLS", MeshTLSSpec, check, __doc__ or "")
