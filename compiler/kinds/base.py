"""What every kind module shares: the spec base model, durations, selectors and ``KindDef``.

A kind module owns one policy kind: its pydantic ``Spec`` (the YAML shape, camelCase or proto
snake_case spellings, unknown keys rejected), a ``check`` that yields Kuma's single-document
validator findings as ``Finding(path, code, message)`` relative to the spec, and a docstring
that is the kind's user documentation. Checks never see line numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import AliasChoices, AliasGenerator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from compiler.diagnostics import Path
from runtime import bundle as b

__all__ = [
    "ANY_TAGS",
    "PROTOCOL_TAG",
    "SERVICE_TAG",
    "ConfContext",
    "Direction",
    "Duration",
    "Finding",
    "KindDef",
    "Selector",
    "SelectorRules",
    "SelectorSpec",
    "Spec",
    "TagMap",
    "ToConf",
    "check_selectors",
    "extra_tags",
    "or_default",
    "parse_duration",
    "selector_kind",
    "selector_service",
    "tag_findings",
]

SERVICE_TAG = "kuma.io/service"
PROTOCOL_TAG = "kuma.io/protocol"
_TAG_NAME = re.compile(r"^[a-zA-Z0-9.\-_:/]*$")
_TAG_VALUE = re.compile(r"^(?:[a-zA-Z0-9.\-_:/]*|\*)$")


def _aliases(name: str) -> AliasChoices:
    camel = to_camel(name)
    return AliasChoices(camel, name) if camel != name else AliasChoices(name)


class Spec(BaseModel):
    """Base of every policy shape: frozen, strict about unknown keys, both spellings accepted."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=AliasGenerator(validation_alias=_aliases, serialization_alias=to_camel),
        populate_by_name=True,
        use_attribute_docstrings=True,
    )


_DURATION = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h|d)")
_UNIT_MS = {
    "ns": 1e-6,
    "us": 1e-3,
    "µs": 1e-3,
    "μs": 1e-3,
    "ms": 1.0,
    "s": 1e3,
    "m": 60e3,
    "h": 3600e3,
    "d": 86400e3,
}


def parse_duration(text: str) -> int:
    """Go ``time.ParseDuration`` syntax (plus Kuma's ``d`` for days) to whole milliseconds.

    A positive value below a millisecond becomes 1 ms, so it never turns into "zero".
    """
    s = text.strip()
    if s in ("0", "+0", "-0"):
        return 0
    sign = -1 if s.startswith("-") else 1
    s = s.lstrip("+-")
    if not s:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION.match(s, pos)
        if not m or m.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNIT_MS[m.group(2)]
        pos = m.end()
    ms = int(total)
    if total > 0 and ms == 0:
        ms = 1
    return sign * ms


def _duration(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        raise PydanticCustomError(
            "duration",
            "duration {value} has no unit; write it as e.g. '{value}s' or '{value}ms'",
            {"value": value},
        )
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError:
            raise PydanticCustomError(
                "duration",
                "'{value}' is not a duration; use Go syntax such as 300ms, 5s, 1m30s or 1h",
                {"value": value},
            ) from None
    return value


Duration = Annotated[
    int, BeforeValidator(_duration), Field(json_schema_extra={"type": "string", "format": "duration"})
]
"""A Go duration string in YAML; integer milliseconds after validation."""

TagMap = dict[str, str | None]


class Selector(Spec):
    match: TagMap | None = None
    """Tags an instance must carry; the value `*` matches any value."""


class Finding(NamedTuple):
    path: Path
    code: str
    message: str
    on_key: bool = False


Direction = Literal["outbound", "inbound", "none", "targetref"]
"""Which data planes a kind configures: the ``sources``' outbound, the ``destinations``' inbound,
or neither (the mesh, the catalog, gateways: built by their own stage). ``targetref``: the
top-level ``targetRef`` selects proxies; ``to`` is outbound, ``from``/``rules`` inbound."""
Dialect = Literal["legacy", "targetref"]


@dataclass(frozen=True)
class ConfContext:
    """What a kind's ``to_conf`` may read besides its own spec: the policy's mesh."""

    logging: tuple[b.LoggingBackend, ...] = ()
    """The mesh's logging backends (``Mesh.spec.logging``), in order; the first is the default."""


ToConf = Callable[[Any, ConfContext], BaseModel | None]
"""Spec (checked, error-free) -> the bundle conf of one rule; ``None``: the policy adds no rule."""


@dataclass(frozen=True)
class KindDef:
    """One kind, as the registry knows it: everything a stage needs to know about it.

    Only the first six fields are required; a kind with no ``bundle_field`` is parsed, checked
    and documented but adds nothing to a bundle.
    """

    kind: str
    api_version: str
    spec: type[Spec]
    check: Callable[[Any], Iterable[Finding]]
    """Kuma's single-document validator: findings relative to the spec (see ``Finding``)."""
    direction: Direction
    doc: str
    """The module docstring: the kind's user documentation (``docs/policies.md``)."""
    dialect: Dialect = "legacy"
    """``targetref`` kinds take their mesh from the ``kuma.io/mesh`` label (default ``default``)."""
    max_name_length: int | None = None
    """Kuma's limit on the resource name (MeshService: 63), checked at ``metadata.name``."""
    compiled: bool = True
    """False: validated only; ``compile`` says the kind does not shape bundles yet."""
    no_effect: str | None = None
    """Why the kind can never shape a meshc bundle (MeshProxyPatch patches Envoy)."""
    bundle_field: str | None = None
    """The key this kind's rule list fills: in ``runtime.bundle.Destination`` (outbound kinds) or
    ``runtime.bundle.Inbound`` (inbound kinds)."""
    to_conf: ToConf | None = None
    """The bundle conf of a rule; unused by an ``additive`` kind (its rules carry no conf)."""
    default: BaseModel | Callable[[str], BaseModel] | None = None
    """The conf of the unconditional rule that closes a destination's list when no policy does,
    or a function of the destination service giving it (outbound kinds only)."""
    additive: bool = False
    """Rules add up instead of the most specific winning (TrafficPermission): never ranked,
    never in conflict, one conf-less rule per distinct (when, peer)."""

    @property
    def indexed(self) -> bool:
        """Whether ``resolve`` indexes this kind's policies as rules of a bundle's ``bundle_field``."""
        return self.direction in ("outbound", "inbound") and self.bundle_field is not None


# --- the sources/destinations kinds (Kuma's legacy dialect) ---------------------------------------


class SelectorSpec(Spec):
    """The spec of a legacy connection policy: a (source, destination) selector pair per rule.

    A kind adds its ``conf: Conf | None = None`` (TrafficPermission has none).
    """

    sources: list[Selector] | None = None
    destinations: list[Selector] | None = None


@dataclass(frozen=True)
class SelectorRules:
    """How strict a kind is about its selectors (the flags of ``check_selectors``)."""

    require_service: bool = True
    only_service: bool = False


ANY_TAGS = SelectorRules(require_service=False)
"""Selectors that may match by any tags, the service tag included or not (inbound kinds)."""


def selector_kind(
    kind: str,
    spec: type[SelectorSpec],
    check_conf: Callable[[Any], Iterable[Finding]] | None,
    direction: Literal["outbound", "inbound"],
    doc: str,
    *,
    sources: SelectorRules = SelectorRules(),
    destinations: SelectorRules = SelectorRules(only_service=True),
    **compiled: Any,
) -> KindDef:
    """A legacy connection policy: Kuma's selector checks, then the kind's own ``check_conf``, if any.

    ``compiled`` is ``bundle_field``, ``to_conf``, ``default`` and ``additive`` of ``KindDef``.
    """

    def check(s: SelectorSpec) -> Iterator[Finding]:
        yield from check_selectors(
            "sources", s.sources, require_service=sources.require_service, only_service=sources.only_service
        )
        yield from check_selectors(
            "destinations",
            s.destinations,
            require_service=destinations.require_service,
            only_service=destinations.only_service,
        )
        if check_conf is not None:
            yield from check_conf(s)

    return KindDef(kind, "kuma.io/v1alpha1", spec, check, direction, doc, **compiled)


def tag_findings(path: Path, match: Mapping[str, str | None]) -> Iterator[Finding]:
    for name, value in match.items():
        p = (*path, name)
        if not _TAG_NAME.match(name):
            yield Finding(
                p,
                "E1007",
                "tag name must consist of alphanumeric characters, dots, dashes, slashes and underscores",
                True,
            )
        if value is None or value == "":
            yield Finding(p, "E1007", "tag value must be non-empty")
        elif not _TAG_VALUE.match(value):
            yield Finding(
                p,
                "E1007",
                "tag value must consist of alphanumeric characters, dots, dashes, slashes and underscores"
                ' or be "*"',
            )


def check_selectors(
    field: str,
    selectors: list[Selector] | None,
    *,
    require_service: bool = True,
    only_service: bool = False,
) -> Iterator[Finding]:
    """Kuma's selector rules (``validators.go``): non-empty, valid tags, mandatory service tag."""
    if not selectors:
        yield Finding((field,), "E1003", "must have at least one element")
        return
    for i, sel in enumerate(selectors):
        path: Path = (field, i, "match")
        match = sel.match or {}
        if not match:
            yield Finding(path, "E1007", "must have at least one tag")
        if only_service and (set(match) != {SERVICE_TAG}):
            yield Finding(path, "E1007", f'must consist of exactly one tag "{SERVICE_TAG}"')
        if require_service and SERVICE_TAG not in match:
            yield Finding(path, "E1007", f'mandatory tag "{SERVICE_TAG}" is missing')
        if only_service:
            for name in match:
                if name != SERVICE_TAG:
                    yield Finding((*path, name), "E1007", f'tag "{name}" is not allowed', True)
        yield from tag_findings(path, match)


def selector_service(tags: Mapping[str, str | None]) -> str:
    """The service a selector names; ``*`` when it names none (legacy selectors without the tag)."""
    v = tags.get(SERVICE_TAG)
    return v if isinstance(v, str) and v else "*"


def extra_tags(tags: Mapping[str, str | None]) -> dict[str, str]:
    """The tags of a selector besides the service and protocol: a rule's conditions."""
    return {k: v for k, v in tags.items() if k not in (SERVICE_TAG, PROTOCOL_TAG) and isinstance(v, str)}


def or_default(v: Any, default: Any) -> Any:
    """``v``, or ``default`` where the spec leaves it unset."""
    return default if v is None else v
