"""MeshTrafficPermission: which clients may reach the selected proxies (inbound; needs mTLS).

`rules[].default` lists `allow`, `allowWithShadowDeny` and `deny` matches (SPIFFE ID or SNI);
the deprecated `from[]` gives each client targetRef an `action` (Allow, Deny,
AllowWithShadowDeny). `from` and `rules` do not combine.

meshc compiles `rules` as Kuma 2.x does: a `deny` match beats every `allow` of the proxy's
rules; a caller's identity is `spiffe://<mesh>/<service>`, so each match names the services it
covers (an `sni` match is not applied, W3006). Where a policy with `rules` selects a proxy, the
`from` permissions of that proxy have no effect (W3007), as in Kuma.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshTrafficPermission
    metadata: {name: benigno-callers, labels: {kuma.io/mesh: default}}
    spec:
      targetRef: {kind: MeshService, name: benigno}
      from:
        - targetRef: {kind: MeshService, name: magnanimo}
          default: {action: Allow}

Invalid (no action)::

    from: [{targetRef: {kind: Mesh}, default: {}}]
"""

from __future__ import annotations

from compiler.kinds.base import Spec
from compiler.kinds.targetref._common import (
    Found,
    KStr,
    Match,
    TargetRef,
    alias,
    at,
    kind_def,
    target_ref,
    validate_match,
)


class Conf(Spec):
    action: KStr | None = None
    """``Allow``, ``Deny`` or ``AllowWithShadowDeny``."""


class RuleConf(Spec):
    deny: list[Match] | None = None
    allow_with_shadow_deny: list[Match] | None = None
    allow: list[Match] | None = None


class Rule(Spec):
    default: RuleConf | None = None


class From(Spec):
    target_ref: TargetRef = TargetRef()
    """The clients: Mesh, MeshSubset, MeshService or MeshServiceSubset."""
    default: Conf | None = None


class MeshTrafficPermissionSpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    from_: list[From] | None = alias("from", "from_")
    rules: list[Rule] | None = None


_TOP = ("Mesh", "MeshSubset", "MeshService", "MeshServiceSubset", "Dataplane")
_FROM = ("Mesh", "MeshSubset", "MeshService", "MeshServiceSubset")


def check(spec: MeshTrafficPermissionSpec) -> Found:
    frm, rules = spec.from_ or [], spec.rules or []
    if spec.target_ref is not None:
        yield from at(("targetRef",), target_ref(spec.target_ref, _TOP, inbound=bool(rules or frm)))
    if frm and rules:
        yield (), "field 'from' must be empty when 'rules' is defined"
    if not frm and not rules:
        yield (), "at least one of 'from' or 'rules' has to be defined"
    for i, r in enumerate(rules):
        d = r.default or RuleConf()
        if not d.deny and not d.allow and not d.allow_with_shadow_deny:
            yield ("rules", i), "at least one of 'allow', 'allowWithShadowDeny', 'deny' has to be defined"
        for field, ms in (
            ("allow", d.allow),
            ("allowWithShadowDeny", d.allow_with_shadow_deny),
            ("deny", d.deny),
        ):
            for j, m in enumerate(ms or []):
                yield from at(("rules", i, "default", field, j), validate_match(m))
    for i, f in enumerate(frm):
        yield from at(("from", i, "targetRef"), target_ref(f.target_ref, _FROM))
        if not (f.default or Conf()).action:
            yield ("from", i, "default", "action"), "must be defined"


KIND = kind_def("MeshTrafficPermission", MeshTrafficPermissionSpec, check, __doc__ or "", compiled=True)
