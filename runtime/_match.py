"""Tag and string matching, compiled once when a bundle is loaded (sans-io)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from runtime.bundle import Rule, StringMatch

__all__ = [
    "SERVICE_TAG",
    "StrMatcher",
    "compile_string_match",
    "first_rule",
    "prefix_matcher",
    "tags_match",
]

SERVICE_TAG = "kuma.io/service"

T = TypeVar("T")

StrMatcher = Callable[[str], bool]


def tags_match(required: Mapping[str, str], carried: Mapping[str, str]) -> bool:
    """True when every required tag is carried; a required value ``*`` matches any value."""
    for key, want in required.items():
        have = carried.get(key)
        if have is None or (want != "*" and have != want):
            return False
    return True


def first_rule(rules: Sequence[Rule[T]], local: Mapping[str, str], peer: Mapping[str, str]) -> Rule[T] | None:
    """The first rule whose ``when`` the local instance carries and whose ``peer`` the other side does."""
    for rule in rules:
        if tags_match(rule.when, local) and tags_match(rule.peer, peer):
            return rule
    return None


def prefix_matcher(prefix: str) -> StrMatcher:
    return lambda s: s.startswith(prefix)


def compile_string_match(m: StringMatch) -> StrMatcher:
    """exact / prefix / regex (a regex must match the whole value, as Envoy's safe_regex does)."""
    if m.kind == "exact":
        value = m.value
        return lambda s: s == value
    if m.kind == "prefix":
        return prefix_matcher(m.value)
    pattern = re.compile(m.value)
    return lambda s: pattern.fullmatch(s) is not None
