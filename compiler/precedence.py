"""Kuma's targetRef precedence: which policy's ``default`` wins, and how they merge (pure functions).

Kuma sorts the policies that select a proxy by their top-level ``targetRef`` kind (Mesh <
MeshSubset < MeshGateway < MeshService < MeshServiceSubset < Dataplane < MeshHTTPRoute), then by
origin (``kuma.io/origin``: global < zone) and role (``kuma.io/policy-role``: system < producer
< consumer < workload-owner); a ``to`` item then by its own ``targetRef`` kind (Mesh <
MeshService < ...); then by the policy's name in *inverted* lexicographic order (the smaller
name wins), and a ``from`` item last by its own kind (Kuma 2.14's ``rules/sort`` and
``outbound.Sort``). The matching items are taken in that order, and their ``default`` confs are merged lowest
precedence first, as JSON merge patches (RFC 7386): maps key by key, lists replaced, ``null``
removes, except that ``append*`` lists are concatenated. Where two policies differ only by name,
the order is the name's alone: ``name_ties`` finds them so that a warning can name both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ORIGIN_LABEL",
    "ROLE_LABEL",
    "Contribution",
    "Ranked",
    "contributions",
    "in_order",
    "merge_patch",
    "merged",
    "name_ties",
    "policy_key",
    "target_rank",
    "why",
]

ORIGIN_LABEL = "kuma.io/origin"
ROLE_LABEL = "kuma.io/policy-role"

_TARGET_ORDER = {
    "Mesh": 0,
    "MeshSubset": 1,
    "MeshGateway": 2,
    "MeshService": 3,
    "MeshExternalService": 3,
    "MeshMultiZoneService": 3,
    "MeshServiceSubset": 4,
    "Dataplane": 5,
    "MeshHTTPRoute": 6,
}
_ORIGIN_ORDER = {"global": 0, "zone": 1}
_ROLE_ORDER = {"system": 0, "producer": 1, "consumer": 2, "workload-owner": 3}


def target_rank(kind: str) -> int:
    """A ``targetRef`` kind's place in Kuma's order (an unknown kind sorts last)."""
    return _TARGET_ORDER.get(kind, len(_TARGET_ORDER))


def policy_key(target_kind: str, labels: Mapping[str, str], name: str) -> tuple[int, int, int, str]:
    """The sort key of a policy, lowest precedence first.

    A policy without an origin label is the repository's own, a zone policy; without a role
    label it is a system policy (universal: no namespace to make it a producer or consumer).
    """
    return (
        target_rank(target_kind),
        _ORIGIN_ORDER.get(labels.get(ORIGIN_LABEL, "zone"), 1),
        _ROLE_ORDER.get(labels.get(ROLE_LABEL, "system"), 0),
        name,
    )


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, with Kuma's ``append*`` lists concatenated; inputs are not changed."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(key, str) and key.startswith("append") and isinstance(value, list):
            before = out.get(key)
            out[key] = [*(before if isinstance(before, list) else []), *value]
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def merged(defaults: Iterable[Any]) -> dict[str, Any]:
    """The ``default`` confs, lowest precedence first, merged into one."""
    out: dict[str, Any] = {}
    for d in defaults:
        out = merge_patch(out, d if isinstance(d, dict) else {})
    return out


@dataclass(frozen=True)
class Ranked:
    """One matching ``to``/``from`` item of one policy, with what orders it."""

    key: tuple[int, int, int, str]
    """``policy_key`` of its policy."""
    item_rank: int
    """``target_rank`` of the item's own ``targetRef``."""
    default: Any
    """Its ``default`` conf as written (camelCase keys)."""
    policy: Any = None
    """The policy (document) it belongs to: ties are between two of them."""
    where: Any = None
    """Where in the policy it is (a path), for the caller."""
    kinds: tuple[str, str] = ("Mesh", "Mesh")
    """The kinds of its policy's top-level ``targetRef`` and of its own (what ``why`` names)."""

    @property
    def to_item(self) -> bool:
        return isinstance(self.where, tuple) and bool(self.where) and self.where[0] == "to"

    @property
    def order(self) -> tuple[int, int, int, int, _Inverted] | tuple[int, int, int, _Inverted, int]:
        """Kuma 2.14's sort (``rules/sort``): the policy's attributes; for a ``to`` item its own
        targetRef kind next (``outbound.Sort``'s ``CompareByToEntry``); then the policy's name,
        inverted (``CompareByDisplayName``: ``zzz`` lowest, ``aaa`` highest); a ``from`` item's
        own kind last."""
        top, origin, role, name = self.key
        if self.to_item:
            return (top, origin, role, self.item_rank, _Inverted(name))
        return (top, origin, role, _Inverted(name), self.item_rank)


class _Inverted(str):
    """A name that sorts in inverted lexicographic order."""

    __slots__ = ()

    def __lt__(self, other: object) -> bool:
        return str.__gt__(self, other) if isinstance(other, str) else NotImplemented

    def __gt__(self, other: object) -> bool:
        return str.__lt__(self, other) if isinstance(other, str) else NotImplemented

    def __le__(self, other: object) -> bool:
        return str.__ge__(self, other) if isinstance(other, str) else NotImplemented

    def __ge__(self, other: object) -> bool:
        return str.__le__(self, other) if isinstance(other, str) else NotImplemented


def in_order(items: Iterable[Ranked]) -> list[Ranked]:
    """Lowest precedence first: Kuma's policy order, then the items' own targetRef kind.

    Stable: items of one policy keep their order in its list.
    """
    return sorted(items, key=lambda r: r.order)


def name_ties(items: Sequence[Ranked]) -> list[tuple[Ranked, Ranked]]:
    """Pairs of items of two policies whose order only their names decide, when both set something
    the other sets too (a tie a reviewer should see: renaming one changes which wins)."""
    out = []
    for i, a in enumerate(items):
        for b in items[i + 1 :]:
            if (
                a.key[:3] == b.key[:3]
                and a.item_rank == b.item_rank
                and a.policy is not b.policy
                and a.key[3] != b.key[3]
                and _overlap(a.default, b.default)
            ):
                out.append((a, b))
    return out


def _overlap(a: Any, b: Any) -> bool:
    """Whether two patches set a common leaf (a map key both set to something that is not a map)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return True
    for k in a.keys() & b.keys():
        if not (isinstance(a[k], dict) and isinstance(b[k], dict)) or _overlap(a[k], b[k]):
            return True
    return False


@dataclass(frozen=True)
class Contribution:
    """What one merged item set, and which of its settings higher-precedence items replaced."""

    item: Ranked
    sets: tuple[tuple[str, ...], ...]
    """The leaves its ``default`` sets, as key paths."""
    overridden: tuple[tuple[tuple[str, ...], Ranked], ...]
    """(leaf, the item whose value the merge keeps) for each leaf a later item sets again."""

    @property
    def shadowed(self) -> bool:
        """Whether nothing of it is left in the merged result."""
        return len(self.overridden) == len(self.sets)


def _leaves(patch: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if not isinstance(patch, dict):
        return [prefix] if prefix else []
    out = []
    for k, v in patch.items():
        out.extend(_leaves(v, (*prefix, str(k))))
    return out


def _covers(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether setting ``a`` replaces ``b`` or ``b`` replaces ``a``: one is a prefix of the other."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def contributions(members: Sequence[Ranked]) -> list[Contribution]:
    """Each item (lowest precedence first) with its leaves and who overrides them: the provenance
    of ``merged``. A leaf is overridden by the last later item that sets it or a map above it
    (``append*`` lists add up: never overridden)."""
    leaves = [_leaves(r.default) for r in members]
    out = []
    for i, r in enumerate(members):
        over = []
        for leaf in leaves[i]:
            if leaf[-1].startswith("append"):
                continue
            winner = None
            for j in range(len(members) - 1, i, -1):
                if any(_covers(x, leaf) for x in leaves[j]):
                    winner = members[j]
                    break
            if winner is not None:
                over.append((leaf, winner))
        out.append(Contribution(r, tuple(leaves[i]), tuple(over)))
    return out


_ORIGINS = {v: k for k, v in _ORIGIN_ORDER.items()}
_ROLES = {v: k for k, v in _ROLE_ORDER.items()}


def why(low: Ranked, high: Ranked) -> str:
    """Why ``high`` takes precedence over ``low`` in Kuma's order, in words."""
    if low.policy is high.policy and low.item_rank == high.item_rank:
        return "a later item of the same policy"
    a, z = low.key, high.key
    if a[0] != z[0]:
        return f"more specific targetRef {high.kinds[0]} > {low.kinds[0]}"
    if a[1] != z[1]:
        return f"origin {_ORIGINS.get(z[1], z[1])} > {_ORIGINS.get(a[1], a[1])} ({ORIGIN_LABEL})"
    if a[2] != z[2]:
        return f"role {_ROLES.get(z[2], z[2])} > {_ROLES.get(a[2], a[2])} ({ROLE_LABEL})"
    kinds = f"more specific item targetRef {high.kinds[1]} > {low.kinds[1]}"
    if low.item_rank != high.item_rank and high.to_item:
        return kinds  # a `to` item's own kind comes before the names
    if a[3] != z[3]:
        if low.item_rank == high.item_rank:
            return f"name-order tie: {z[3]!r} sorts before {a[3]!r}, and the smaller name wins (W3004)"
        return f"name order: {z[3]!r} sorts before {a[3]!r} (names come before a `from` item's own kind)"
    return kinds
