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

__all__ = [
    "SERVICE_TAG",
    "Duration",
    "Finding",
    "KindDef",
    "Selector",
    "Spec",
    "check_selectors",
    "parse_duration",
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
"""``targetref``: the top-level ``targetRef`` selects proxies; ``to`` is outbound, ``from``/``rules``
inbound."""
Dialect = Literal["legacy", "targetref"]


@dataclass(frozen=True)
class KindDef:
    """One kind, as the registry knows it."""

    kind: str
    api_version: str
    spec: type[Spec]
    check: Callable[[Any], Iterable[Finding]]
    direction: Direction
    doc: str
    dialect: Dialect = "legacy"
    """``targetref`` kinds take their mesh from the ``kuma.io/mesh`` label (default ``default``)."""
    max_name_length: int | None = None
    """Kuma's limit on the resource name (MeshService: 63), checked at ``metadata.name``."""
    compiled: bool = True
    """False: validated only; ``compile`` says the kind does not shape bundles yet."""
    no_effect: str | None = None
    """Why the kind can never shape a meshc bundle (MeshProxyPatch patches Envoy)."""


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


def check_required(spec: Any, *names: str) -> Iterator[Finding]:
    for name in names:
        if getattr(spec, name) is None:
            yield Finding((to_camel(name),), "E1003", f"{to_camel(name)}: has to be defined")


def selector_tags(sel: Selector) -> dict[str, str]:
    """The selector as clean tags (null values dropped: they were reported already)."""
    return {k: v for k, v in (sel.match or {}).items() if v is not None}


def nonempty(items: Iterable[Finding]) -> list[Finding]:
    return list(items)
