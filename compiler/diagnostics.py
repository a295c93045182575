"""Diagnostics: the one catalog of codes, and the finding every stage reports.

Checks never compute line numbers: they report a ``Loc`` (file, document index, key path) and
``locate`` turns it into a ``Span`` at the end, re-reading only the files that have findings
(cfn-lint's ``RuleMatch`` -> ``Match``). The code's letter is the severity, its first digit the
stage: 0 YAML, 1 shape and values, 2 references, 3 conflicts. ``docs/diagnostics.md`` is generated
from ``CODES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["CODES", "Code", "Diagnostic", "Loc", "Path", "Related", "Severity", "Span"]

Severity = Literal["error", "warning", "info"]
Path = tuple[str | int, ...]


_SEVERITY: dict[str, Severity] = {"E": "error", "W": "warning"}


@dataclass(frozen=True)
class Code:
    code: str
    title: str
    description: str

    @property
    def severity(self) -> Severity:
        return _SEVERITY.get(self.code[0], "info")


def _catalog(*codes: Code) -> dict[str, Code]:
    return {c.code: c for c in codes}


CODES: dict[str, Code] = _catalog(
    Code("E0001", "yaml-syntax", "The file is not valid YAML; the parser's message says where it stopped."),
    Code(
        "E0002",
        "duplicate-key",
        "A mapping has the same key twice; YAML 1.2 forbids it and the value would be lost.",
    ),
    Code("E0003", "not-utf8", "The file is not UTF-8 text."),
    Code("E0004", "resource-limit", "The file is too large, or expands too many aliases, to be read safely."),
    Code("E0005", "not-a-mapping", "A YAML document must be a mapping with `kind` (or `type`) and a spec."),
    Code(
        "E0006",
        "unknown-kind",
        "The document has no `kind`/`type`, or names a kind or apiVersion meshc does not know.",
    ),
    Code("E0007", "missing-name", "The document has no name (`metadata.name` or `name`) or no `mesh`."),
    Code(
        "W0001",
        "deprecated-ingress-api",
        "An Ingress in `extensions/v1beta1` or `networking.k8s.io/v1beta1`, which Kubernetes 1.22 removed; "
        "the message prints the same Ingress as `networking.k8s.io/v1`.",
    ),
    Code(
        "I0001",
        "kubernetes-kind-ignored",
        "A Kubernetes object of a kind meshc does not read (ConfigMap, Job...): ignored, never an error.",
    ),
    Code(
        "I1001",
        "kubernetes-protocol-tcp",
        "A Service port whose `appProtocol` (or annotation) meshc does not route at L7 (h2c, gRPC...) is "
        "proxied per connection as `tcp`; a UDP port is not proxied.",
    ),
    Code(
        "I2001",
        "service-selects-no-workload",
        "A Kubernetes Service selects no Deployment or StatefulSet of the policy directory: it is in the "
        "catalog with no subsets, so routes cannot target its versions.",
    ),
    Code(
        "E2006",
        "ingress-unknown-backend",
        "An Ingress backend names a Service (or a port of it) that no Kubernetes Service of the policy "
        "directory declares.",
    ),
    Code(
        "E2007",
        "ingress-gateway",
        "The gateway an Ingress attaches to is unknown: its `meshc.io/gateway` annotation names no "
        "MeshGateway service, or the mesh has several MeshGateways and the annotation is missing.",
    ),
    Code(
        "E1001",
        "unknown-key",
        "A key that the kind does not define; Kuma would ignore it silently, meshc rejects it.",
    ),
    Code(
        "E1002",
        "wrong-type",
        "A value of the wrong type (a list where a mapping is expected, text for a number...).",
    ),
    Code("E1003", "missing-field", "A field that must be present is missing."),
    Code("E1004", "null-value", "A key with no value where the kind needs one."),
    Code("E1005", "invalid-value", "A value outside what the field allows (Kuma's validator rules)."),
    Code(
        "E1006",
        "bad-duration",
        "A duration that does not parse; use Go syntax such as `300ms`, `5s`, `1m30s`, `1h`.",
    ),
    Code("E1007", "bad-selector", "A selector with a bad tag name or value, or without a mandatory tag."),
    Code(
        "E1008",
        "split-and-destination",
        "`split` and `destination` are both set; a route takes exactly one of them.",
    ),
    Code(
        "E1009",
        "bad-weights",
        "All split weights are zero, or a weight is negative: no traffic could be routed.",
    ),
    Code(
        "E1010",
        "rewrite-without-prefix",
        "`rewritePrefix`/`replacePrefixMatch` needs a path prefix match to replace.",
    ),
    Code("E1011", "healthcheck-tcp-and-http", "A HealthCheck sets both `tcp` and `http`; choose one."),
    Code("E1012", "choice-count", "`leastRequest.choiceCount` must be at least 2."),
    Code(
        "E1013",
        "targetref-kind",
        "A `targetRef` (or backend ref) names a kind that this place does not accept, or sets a field "
        "that its kind does not take (Kuma's `ValidateTargetRef`).",
    ),
    Code(
        "E1014",
        "targetref-sections",
        "A targetRef policy combines `to`, `from` and `rules` in a way Kuma forbids, or sets none of them.",
    ),
    Code(
        "E2001",
        "unknown-service",
        "A selector or target names a `kuma.io/service` that no Service or MeshGateway declares.",
    ),
    Code(
        "E2002",
        "unknown-subset",
        "Tags that none of the service's declared subsets carry: no instance could match.",
    ),
    Code("E2003", "unknown-mesh", "The document names a mesh that no Mesh document declares."),
    Code(
        "E2004",
        "gateway-unknown-backend",
        "A MeshGatewayRoute backend names a service that is not in the mesh.",
    ),
    Code(
        "E2005",
        "unknown-log-backend",
        "A TrafficLog names a backend that the Mesh's `logging.backends` does not define.",
    ),
    Code("E3001", "duplicate-name", "Two documents of the same kind and mesh have the same name."),
    Code(
        "E3002",
        "equal-specificity",
        "Two policies of one kind apply to the same source/destination pair with equal specificity. "
        "Kuma would pick the newest; Git has no such clock, so make one more specific or merge them.",
    ),
    Code("E3003", "duplicate-gateway-match", "Two gateway routes on the same listener have the same match."),
    Code(
        "E4001",
        "canary-unknown-route",
        "A Canary's `targetRef` names no TrafficRoute or MeshHTTPRoute of its mesh.",
    ),
    Code(
        "E4002",
        "canary-target-mismatch",
        "A Canary's tags do not pick exactly one target of a weighted split of its route (it needs a "
        "split that has the canary and at least one other target).",
    ),
    Code("E4003", "canary-route-taken", "Two Canaries drive the same route; only one may at a time."),
    Code(
        "W3004",
        "targetref-name-tie",
        "Two targetRef policies set the same field for the same traffic and only their names decide "
        "which wins (Kuma's last tie-break: the name that sorts first wins). Renaming one changes the "
        "result.",
    ),
    Code(
        "W3005",
        "dialects-overlap",
        "A targetRef policy and a legacy policy of the same type configure the same traffic (or a "
        "MeshTrace and the Mesh's legacy `tracing` the same data planes); as in Kuma, the targetRef "
        "policy wins and the legacy one has no effect there.",
    ),
    Code(
        "W3006",
        "targetref-not-resolved",
        "A part of a targetRef policy that meshc does not resolve into bundles yet (a targetRef kind, "
        "a timeout or detector the sidecar does not carry out (MeshTimeout's maxConnectionDuration, "
        "an outbound requestHeadersTimeout, MeshCircuitBreaker's inbound successRate and "
        "failurePercentage detectors), "
        "an `sni` match, a route "
        "filter or match the bundle cannot express, zone-aware load balancing or hash policies, an "
        "OpenTelemetry log backend, a MeshTrace's Datadog or OpenTelemetry backend, its `tags`, "
        "`sampling.client` or `apiVersion: httpProto`): it has no effect, or, where the message says "
        "so, a broader rule still applies where Kuma's would not.",
    ),
    Code(
        "W3007",
        "from-replaced-by-rules",
        "A MeshTrafficPermission or MeshFaultInjection `from` item on proxies that a policy of its "
        "kind selects with `rules`: as in Kuma 2.x, those proxies use the inbound rules alone, so the "
        "`from` item has no effect there.",
    ),
    Code(
        "W1001",
        "selector-matches-nothing",
        "A selector that matches no declared service: the policy does nothing.",
    ),
    Code(
        "W1002",
        "shadowed-match",
        "An `http` match that an earlier entry always catches first: it is never used.",
    ),
    Code(
        "W1003",
        "targetref-not-compiled",
        "A targetRef policy is valid but meshc does not compile this dialect into bundles yet: "
        "it has no effect on the traffic until it does.",
    ),
    Code(
        "W1004",
        "no-effect-in-meshc",
        "A kind meshc validates but can never enforce (MeshProxyPatch patches Envoy configuration; "
        "meshc's proxies are not Envoy).",
    ),
    Code(
        "W1005",
        "gateway-certificate-not-read",
        "A MeshGateway certificate that is valid for Kuma but that meshc does not read (inline "
        "bytes or strings, or a secret whose name is no Kubernetes Secret name): meshc reads "
        "{secret: NAME}, a kubernetes.io/tls Secret mounted on the gateway, and {file: PATH}, a "
        "PEM file with the chain and its key. An HTTPS listener left with no certificate is not "
        "bound.",
    ),
    Code(
        "W2001", "permissions-without-mtls", "TrafficPermissions take effect only when the Mesh enables mTLS."
    ),
    Code(
        "W2002",
        "unreachable-service",
        "mTLS is on and no TrafficPermission lets any caller reach this service: all its traffic is denied.",
    ),
    Code(
        "W2003",
        "traffic-denied-by-permissions",
        "mTLS is on and the TrafficPermissions deny traffic this policy makes or shapes: a HealthCheck "
        "whose sources may not call the destination (its checks are refused with 403 and count as "
        "failures, as in Kuma, where health checks pass the inbound RBAC like any call), or a policy "
        "whose every named source is denied (it can never take effect). The finding names the "
        "permissions that cover the destination.",
    ),
)


@dataclass(frozen=True)
class Loc:
    """Where a finding is, before positions are known: a file, a document and a key path."""

    file: str
    doc: int = 0
    path: Path = ()
    on_key: bool = False


@dataclass(frozen=True, order=True)
class Span:
    """1-based line and column, end inclusive of the last character's column + 1."""

    line: int = 1
    column: int = 1
    end_line: int = 1
    end_column: int = 1


@dataclass(frozen=True)
class Related:
    file: str
    line: int
    column: int
    message: str


@dataclass(frozen=True)
class Diagnostic:
    code: str
    message: str
    loc: Loc
    span: Span | None = None
    related: tuple[Related, ...] = ()
    related_locs: tuple[tuple[Loc, str], ...] = field(default=(), compare=False)

    @property
    def severity(self) -> Severity:
        return CODES[self.code].severity

    @property
    def file(self) -> str:
        return self.loc.file

    def sort_key(self) -> tuple[str, int, int, str]:
        s = self.span or Span()
        return (self.loc.file, s.line, s.column, self.code)
