"""What the targetRef kinds share: ``targetRef``, matches, backend refs, Kuma's value rules.

The models follow Kuma's Go types (``api/common/v1alpha1``, v2.14.3): a Go ``string`` field
takes a YAML number or boolean as its text (``sigs.k8s.io/yaml`` does so before decoding), a Go
integer or boolean takes only that type, a Go enum is a plain string that the validator (not the
parser) judges, and an absent or null key is Go's zero value. Unknown keys are rejected (Kuma
drops them silently). The validators are ports of Kuma's: same rules, same messages, paths
relative to ``spec``. A validator yields ``(path, message)`` pairs; ``findings`` gives them codes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AliasChoices, BeforeValidator, Field, Strict, StrictInt, StrictStr

from compiler.diagnostics import Path
from compiler.kinds.base import Finding, KindDef, Spec, parse_duration

__all__ = [
    "I32",
    "U32",
    "BackendRef",
    "BackendResourceRef",
    "Bool",
    "Found",
    "GoDuration",
    "HeaderMatch",
    "IntOrString",
    "KStr",
    "Match",
    "TargetRef",
    "at",
    "findings",
    "kind_def",
    "target_ref",
    "validate_match",
]

Found = Iterator[tuple[Path, str]]
"""A validator's violations: (path relative to its root, Kuma's message)."""


def _go_string(value: Any) -> Any:
    """YAML numbers and booleans become text where Go wants a string (``sigs.k8s.io/yaml``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


KStr = Annotated[str, BeforeValidator(_go_string)]
"""A Go ``string``: text, or a YAML scalar that Kuma's decoder turns into text."""
Bool = Annotated[bool, Strict()]
U32 = Annotated[int, Strict(), Field(ge=0, le=2**32 - 1)]
I32 = Annotated[int, Strict(), Field(ge=-(2**31), le=2**31 - 1)]
IntOrString = Annotated[StrictInt | StrictStr, Field(union_mode="left_to_right")]
"""Kubernetes ``IntOrString``: an integer, or a decimal number written as a string."""

_GO_DURATION = re.compile(r"^[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+$")


def _go_duration(value: Any) -> Any:
    if isinstance(value, str) and value.strip() not in ("0", "+0", "-0") and not _GO_DURATION.match(value):
        from pydantic_core import PydanticCustomError

        raise PydanticCustomError(
            "duration",
            "'{value}' is not a duration; use Go syntax such as 300ms, 5s, 1m30s or 1h",
            {"value": value},
        )
    if isinstance(value, int | float) and not isinstance(value, bool):
        from pydantic_core import PydanticCustomError

        raise PydanticCustomError(
            "duration",
            "duration {value} has no unit; write it as e.g. '{value}s' or '{value}ms'",
            {"value": value},
        )
    return parse_duration(value) if isinstance(value, str) else value


GoDuration = Annotated[
    int,
    BeforeValidator(_go_duration),
    Field(json_schema_extra={"type": "string", "format": "duration"}),
]
"""A Kubernetes ``metav1.Duration`` (Go ``time.ParseDuration``: no ``d`` unit); milliseconds."""


def alias(name: str, snake: str) -> Any:
    """A field whose Kuma spelling is not plain camelCase (``spiffeID``, ``sourceIP``)."""
    return Field(default=None, validation_alias=AliasChoices(name, snake), serialization_alias=name)


# --- models ---------------------------------------------------------------------------------------


class TargetRef(Spec):
    kind: KStr = ""
    """Mesh, Dataplane, MeshSubset, MeshGateway, MeshService, MeshExternalService, MeshMultiZoneService,
    MeshServiceSubset or MeshHTTPRoute; which ones a place accepts depends on the kind and section."""
    name: KStr | None = None
    """The name of the resource (MeshService, MeshServiceSubset, MeshGateway, MeshHTTPRoute, Dataplane...)."""
    tags: dict[str, KStr] | None = None
    """Dataplane tags (MeshSubset, MeshServiceSubset; MeshGateway listener tags where allowed)."""
    mesh: KStr | None = None
    """Never allowed by Kuma's validators in 2.14 (kept for the error message)."""
    proxy_types: list[KStr] | None = None
    """``Sidecar`` and/or ``Gateway`` (Mesh, MeshSubset): which proxies the policy applies to."""
    namespace: KStr | None = None
    """The resource's namespace (Kubernetes), with ``name``."""
    labels: dict[str, KStr] | None = None
    """Select resources by labels instead of by name."""
    section_name: KStr | None = None
    """A port name of the MeshService (or an inbound of the Dataplane, inbound policies only)."""


class BackendRef(TargetRef):
    weight: U32 | None = None
    """Share of the traffic; default 1."""
    port: U32 | None = None
    """The port of a MeshService/MeshMultiZoneService backend."""


class BackendResourceRef(Spec):
    kind: KStr = ""
    """``MeshOpenTelemetryBackend``."""
    labels: dict[str, KStr] | None = None
    """Labels of the backend resource to use."""


class SpiffeIdMatch(Spec):
    type: KStr = ""
    """``Exact`` or ``Prefix``."""
    value: KStr = ""


class SniMatch(Spec):
    type: KStr = ""
    """``Exact``."""
    value: KStr = ""


class Match(Spec):
    spiffe_id: SpiffeIdMatch | None = alias("spiffeID", "spiffe_id")
    """The client's SPIFFE identity (needs MeshIdentity)."""
    sni: SniMatch | None = None
    """The SNI the client asked for."""


class HeaderMatch(Spec):
    type: KStr | None = None
    """Exact (default), Present, RegularExpression, Absent or Prefix."""
    name: KStr = ""
    value: KStr = ""


# --- Kuma's validators ----------------------------------------------------------------------------

MUST_BE_DEFINED = "must be defined"
MUST_NOT_BE_DEFINED = "must not be defined"
MUST_NOT_BE_EMPTY = "must not be empty"
_NAME = re.compile(r"^[0-9a-z.\-_]*$")
_TAG_NAME = re.compile(r"^[a-zA-Z0-9.\-_:/]*$")
_TAG_VALUE = re.compile(r"^[a-zA-Z0-9.\-_:]*$")
_SELECTOR_VALUE = re.compile(r"^([a-zA-Z0-9.\-_:/]*|\*)$")
_DNS1123 = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_DECIMAL = re.compile(r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")


def at(prefix: Path, found: Iterable[tuple[Path, str]]) -> Found:
    """Kuma's ``AddErrorAt``: the violations of a sub-validator, under ``prefix``."""
    for path, msg in found:
        yield (*prefix, *path), msg


def must_be_one_of(field: str, allowed: Sequence[str]) -> str:
    quoted = ", ".join(f'"{a}"' for a in allowed)
    return f'"{field}" must be one of [{quoted}]'


def one_of_when(field: str, other: str, msg: str, allowed: Sequence[str]) -> str:
    quoted = ", ".join(f'"{a}"' for a in allowed)
    return f'"{field}" {msg} when "{other}" is one of [{quoted}]'


def decimal_of(value: int | str) -> Decimal | None:
    """``NewDecimalFromIntOrString``: None when the string is not a number."""
    if isinstance(value, int):
        return Decimal(value)
    return Decimal(value) if _DECIMAL.match(value) else None


def percentage(path: Path, value: int | str | None, *, required: bool, allow0: bool = True) -> Found:
    """``ValidatePercentage`` / ``ValidatePercentageOrNil``."""
    if value is None:
        if required:
            yield path, MUST_BE_DEFINED
        return
    dec = decimal_of(value)
    if dec is None:
        yield path, "string must be a valid number"
    elif dec < 0 or dec > 100:
        yield path, "must be in inclusive range [0.0, 100.0]"
    elif required and not allow0 and dec == 0:
        yield path, "must be greater than 0"


def duration_positive(path: Path, value: int | None) -> Found:
    if value is not None and value <= 0:
        yield path, "must be greater than zero when defined"


def duration_not_negative(path: Path, value: int | None) -> Found:
    if value is not None and value < 0:
        yield path, "must not be negative when defined"


def int_positive(path: Path, value: int | None) -> Found:
    """``ValidateIntegerGreaterThanZeroOrNil``."""
    if value is not None and value <= 0:
        yield path, "must be greater than 0"


def status_code(path: Path, status: int) -> Found:
    if status < 100 or status >= 600:
        yield path, "must be in inclusive range [100, 599]"


def is_file_path(value: str) -> bool:
    """govalidator's ``IsFilePath``: an absolute Unix path or a Windows ``C:\\`` path."""
    if re.match(r'^[a-zA-Z]:\\(?:[^\\/:*?"<>|\r\n]+\\)*[^\\/:*?"<>|\r\n]*$', value):
        return True
    return bool(re.match(r"^(/[^/\x00]*)+/?$", value))


def is_url(value: str) -> bool:
    """An approximation of govalidator's ``IsURL``: an optional scheme, a host, optional port/path."""
    if value == "" or len(value) >= 2083 or value.startswith(".") or " " in value.strip():
        return False
    rest = value
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://", rest)
    if m:
        rest = rest[m.end() :]
    elif "://" in rest or rest.startswith("//"):
        return False
    host = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in host:
        host = host.rsplit("@", 1)[1]
    hm = re.match(r"^(\[[0-9a-fA-F:.]+\]|[^:]+)(?::([0-9]{1,5}))?$", host)
    if not hm:
        return False
    name, port = hm.group(1), hm.group(2)
    if port is not None and not 0 < int(port) < 65536:
        return False
    if name.startswith("["):
        return True
    labels = name.split(".")
    return all(re.match(r"^[a-zA-Z0-9_]([a-zA-Z0-9_\-]*[a-zA-Z0-9_])?$", x) for x in labels) and (
        len(labels) > 1 or name == "localhost" or bool(m)
    )


def dns1123_subdomain(value: str) -> list[str]:
    """Kubernetes ``IsDNS1123Subdomain``'s messages."""
    out = []
    if len(value) > 253:
        out.append("must be no more than 253 characters")
    if not re.fullmatch(_DNS1123, value):
        out.append(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
            "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
            f"validation is '{_DNS1123}')"
        )
    return out


def _spiffe_error(value: str) -> str | None:
    """go-spiffe's ``spiffeid.FromString`` error, or None for a valid SPIFFE ID."""
    if value == "":
        return "cannot be empty"
    if not value.startswith("spiffe://"):
        return "scheme is missing or invalid"
    rest = value[len("spiffe://") :]
    td, _, path = rest.partition("/")
    if td == "":
        return "trust domain is missing"
    if not re.fullmatch(r"[a-z0-9._\-]+", td):
        return (
            "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores"
        )
    if "/" not in rest:
        return None
    for seg in path.split("/"):
        if seg == "":
            return "path cannot contain empty segments"
        if seg in (".", ".."):
            return "path cannot contain dot segments"
        if not re.fullmatch(r"[a-zA-Z0-9._\-]+", seg):
            return "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
    return None


def validate_match(match: Match) -> Found:
    """``mesh.ValidateMatch``: a SPIFFE ID that parses, an SNI that is a DNS name."""
    if match.spiffe_id is not None and (err := _spiffe_error(match.spiffe_id.value)) is not None:
        yield ("spiffeID",), f"must be a valid Spiffe ID: {err}"
    if match.sni is not None:
        t = match.sni.type
        if t == "":
            yield ("sni", "type"), "must be set"
        elif t != "Exact":
            yield ("sni", "type"), f'unrecognized type "{t}", supported values are: Exact'
        if match.sni.value == "":
            yield ("sni", "value"), "must be set"
        else:
            for v in dns1123_subdomain(match.sni.value):
                yield ("sni", "value"), v


def matches_with_spiffe(path: Path, matches: list[Match] | None, source_conditioned: Found) -> Found:
    """Inbound ``rules[].matches`` (MeshTimeout, MeshRateLimit): each names a client; a SPIFFE match
    limits the conf to what Envoy can condition on the client's identity (``source_conditioned``,
    a lazy generator, runs only then)."""
    has_spiffe = False
    for i, m in enumerate(matches or []):
        mp: Path = (*path, i)
        yield from at(mp, validate_match(m))
        if m.spiffe_id is None and m.sni is None:
            yield mp, "must specify at least one of 'spiffeID' or 'sni'"
            continue
        if m.spiffe_id is not None:
            has_spiffe = True
            t = m.spiffe_id.type
            if t == "":
                yield (*mp, "spiffeID", "type"), "must be set"
            elif t not in ("Exact", "Prefix"):
                yield (
                    (*mp, "spiffeID", "type"),
                    f'unrecognized type "{t}", supported values are: Exact, Prefix',
                )
    if has_spiffe:
        yield from source_conditioned


def tags(path: Path, values: dict[str, str], *, selector: bool) -> Found:
    """``ValidateSelector`` (``selector``: the value may be ``*``) and ``ValidateTags``."""
    for key in sorted(values):
        value = values[key]
        if key == "":
            yield path, "tag name must be non-empty"
        if not _TAG_NAME.match(key):
            yield (
                (*path, key),
                "tag name must consist of alphanumeric characters, dots, dashes, slashes and underscores",
            )
        if value == "":
            yield (*path, key), "tag value must be non-empty"
        if selector and not _SELECTOR_VALUE.match(value):
            yield (
                (*path, key),
                "tag value must consist of alphanumeric characters, dots, dashes, slashes and underscores"
                ' or be "*"',
            )
        if not selector and not _TAG_VALUE.match(value):
            yield (
                (*path, key),
                "tag value must consist of alphanumeric characters, dots, dashes and underscores",
            )


ALL_KINDS = (
    "Mesh",
    "Dataplane",
    "MeshSubset",
    "MeshGateway",
    "MeshService",
    "MeshExternalService",
    "MeshMultiZoneService",
    "MeshServiceSubset",
    "MeshHTTPRoute",
)
"""Kuma's targetRef kinds, least specific first (``targetref.go`` order)."""


def target_ref(
    ref: TargetRef | None,
    kinds: Sequence[str],
    *,
    gateway_tags: bool = False,
    inbound: bool = False,
    kinds_error: str | None = None,
    allowed_invalid_names: Sequence[str] = (),
) -> Found:
    """``mesh.ValidateTargetRef``: the kind is one of ``kinds`` and carries only its own fields."""
    ref = ref or TargetRef()
    kind = ref.kind
    if kind == "":
        yield ("kind",), MUST_BE_DEFINED
        return
    if kind not in kinds:
        yield ("kind",), kinds_error or f"value '{kind}' is not supported"
        return
    name, mesh, ns, section = ref.name or "", ref.mesh or "", ref.namespace or "", ref.section_name or ""
    tag_map, labels, proxy = ref.tags or {}, ref.labels or {}, ref.proxy_types or []

    def no(*fields: tuple[str, object]) -> Found:
        for field, value in fields:
            if value:
                yield (field,), f"must not be set with kind {kind}"

    def named() -> Found:
        if name not in allowed_invalid_names and not _NAME.match(name):
            yield (
                ("name",),
                "invalid characters: must consist of lower case alphanumeric characters, '-', '.' and '_'.",
            )

    def proxy_types() -> Found:
        if ref.proxy_types is not None and not ref.proxy_types:
            yield ("proxyTypes",), "must be undefined or have at least one element"

    def name_or_labels(either: str) -> Found:
        if not labels and not name:
            yield (), f"name or labels must be set when kind is {kind}"
        if labels and (name or ns):
            yield ("labels",), either

    if kind == "Mesh":
        if name:
            yield ("name",), f"using name with kind {kind} is not yet supported"
        yield from no(
            ("mesh", mesh), ("tags", tag_map), ("labels", labels), ("namespace", ns), ("sectionName", section)
        )
        yield from proxy_types()
    elif kind == "Dataplane":
        yield from no(("tags", tag_map), ("mesh", mesh), ("proxyTypes", proxy))
        if labels and (name or ns):
            yield ("labels",), "either labels or name and namespace must be specified"
        if not inbound and section:
            yield ("sectionName",), "can only be used with inbound policies"
    elif kind == "MeshSubset":
        yield from no(("name", name))
        yield from no(("mesh", mesh))
        yield from tags(("tags",), tag_map, selector=False)
        yield from no(("labels", labels), ("namespace", ns), ("sectionName", section))
        yield from proxy_types()
    elif kind in ("MeshService", "MeshHTTPRoute"):
        yield from named()
        yield from no(("mesh", mesh), ("tags", tag_map), ("proxyTypes", proxy))
        if kind == "MeshHTTPRoute":
            yield from no(("sectionName", section))
        yield from name_or_labels("either labels or name and namespace must be specified")
    elif kind in ("MeshServiceSubset", "MeshGateway"):
        if not name:
            yield ("name",), f"must be set when kind is {kind}"
        yield from named()
        yield from no(("mesh", mesh))
        yield from no(("proxyTypes", proxy))
        yield from tags(("tags",), tag_map, selector=True)
        if kind == "MeshGateway" and tag_map and not gateway_tags:
            yield from no(("tags", tag_map))
        yield from no(("labels", labels), ("namespace", ns), ("sectionName", section))
    elif kind == "MeshExternalService":
        yield from named()
        yield from no(("mesh", mesh), ("tags", tag_map), ("proxyTypes", proxy))
        yield from name_or_labels("either labels or name must be specified")
        yield from no(("sectionName", section))
    # MeshMultiZoneService: Kuma checks nothing beyond the kind.


def backend_ref(ref: BackendRef) -> Found:
    """``ValidateBackendRef``: a MeshMultiZoneService backend needs its port."""
    if ref.kind == "MeshMultiZoneService" and ref.port is None:
        yield ("port",), "must be defined with kind MeshMultiZoneService"


def otel_endpoint_or_ref(
    endpoint: str, ref: BackendResourceRef | None, extra: Callable[[str], Found] | None = None
) -> Found:
    """``ValidateOtelBackendRefOrEndpoint``: exactly one of ``endpoint`` and ``backendRef``."""
    if endpoint and ref is not None:
        yield (), "openTelemetry must have only one type defined: endpoint, backendRef"
    elif not endpoint and ref is None:
        yield (), "openTelemetry must have exactly one defined: endpoint, backendRef"
    elif ref is not None:
        if ref.kind != "MeshOpenTelemetryBackend":
            yield ("backendRef", "kind"), must_be_one_of("kind", ["MeshOpenTelemetryBackend"])
        if not ref.labels:
            yield ("backendRef",), "backendRef must have exactly one defined: labels"
    elif any(c in endpoint for c in "/?#"):
        yield ("endpoint",), "must be in host:port format, not a URL"
    elif extra is not None:
        yield from extra(endpoint)


OTLP_GRPC_PORT = (
    "an endpoint on port 4317, OTLP/gRPC's (the data planes export OTLP/HTTP JSON: point it at "
    "the collector's OTLP/HTTP receiver, 4318 by convention)"
)


def otlp_grpc_port(endpoint: str) -> bool:
    """An OpenTelemetry ``endpoint`` on 4317: a collector answers OTLP/gRPC there, so the data
    planes' OTLP/HTTP exports to it would all fail (meshc says so instead of losing them)."""
    return endpoint.rpartition(":")[2] == "4317"


def includes_gateways(ref: TargetRef) -> bool:
    """``IncludesGateways``: whether a top-level targetRef can select gateway proxies."""
    proxy = ref.proxy_types or []
    return (
        ref.kind == "MeshGateway"
        or (ref.kind in ("Mesh", "MeshSubset") and (not proxy or "Gateway" in proxy))
        or ref.kind == "MeshHTTPRoute"
    )


def top(ref: TargetRef | None) -> TargetRef:
    """The top-level targetRef; absent means the whole mesh."""
    return ref if ref is not None else TargetRef(kind="Mesh")


# --- codes ----------------------------------------------------------------------------------------


def _code(path: Path, msg: str) -> str:
    if "with kind" in msg or "when kind is" in msg or (path[-1:] == ("kind",) and "not supported" in msg):
        return "E1013"
    if any(q in msg for q in ("'to'", "'from'", "'rules'")) or (
        path in (("to",), ("from",), ("rules",)) and msg.startswith(MUST_NOT_BE_DEFINED)
    ):
        return "E1014"
    if msg in (MUST_BE_DEFINED, "must be set", MUST_NOT_BE_EMPTY) or msg.startswith(
        ("must have at least one", "at least one ")
    ):
        return "E1003"
    return "E1005"


def findings(found: Iterable[tuple[Path, str]]) -> Iterator[Finding]:
    """Kuma's violations as findings with meshc's codes (E1003 missing, E1013 targetRef, E1014
    sections, E1005 any other value rule)."""
    seen: set[tuple[Path, str]] = set()
    for path, msg in found:
        if (path, msg) in seen:
            continue
        seen.add((path, msg))
        yield Finding(path, _code(path, msg), msg)


def kind_def(kind: str, spec: type[Spec], check: Callable[[Any], Found], doc: str, **kw: Any) -> KindDef:
    """A targetRef kind: ``kuma.io/v1alpha1``, mesh from the ``kuma.io/mesh`` label; validated
    only (``compiled=False``) until resolution builds bundles from it."""
    kw.setdefault("compiled", False)
    return KindDef(
        kind,
        "kuma.io/v1alpha1",
        spec,
        lambda s: findings(check(s)),
        "targetref",
        doc,
        dialect="targetref",
        **kw,
    )
