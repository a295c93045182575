"""Kuma's targetRef precedence and merge (``compiler.precedence``): order, JSON merge patch, ties."""

from __future__ import annotations

from typing import Any

import pytest

from compiler.precedence import (
    Ranked,
    contributions,
    in_order,
    merge_patch,
    merged,
    name_ties,
    policy_key,
    target_rank,
    why,
)

# RFC 7386, appendix A: (target, patch, result).
RFC_7386 = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "result"), RFC_7386)
def test_merge_patch_is_rfc_7386(target: Any, patch: Any, result: Any) -> None:
    before = repr(target)
    assert merge_patch(target, patch) == result
    assert repr(target) == before, "the target was changed in place"


def test_append_lists_are_concatenated_other_lists_replaced() -> None:
    a = {"appendRules": [1], "rules": [1], "http": {"appendHeaders": ["x"]}}
    b = {"appendRules": [2], "rules": [2], "http": {"appendHeaders": ["y"]}}
    assert merge_patch(a, b) == {"appendRules": [1, 2], "rules": [2], "http": {"appendHeaders": ["x", "y"]}}


def test_merged_applies_the_lowest_precedence_first() -> None:
    low = {"connectionTimeout": "1s", "http": {"requestTimeout": "3s", "streamIdleTimeout": "1m"}}
    high = {"http": {"requestTimeout": "5s"}}
    assert merged([low, high]) == {
        "connectionTimeout": "1s",
        "http": {"requestTimeout": "5s", "streamIdleTimeout": "1m"},
    }
    assert merged([high, low])["http"]["requestTimeout"] == "3s"


def test_policy_order_is_target_kind_then_origin_then_role_then_name() -> None:
    keys = [
        policy_key("MeshHTTPRoute", {}, "a"),
        policy_key("MeshServiceSubset", {}, "a"),
        policy_key("MeshService", {}, "z"),
        policy_key("MeshService", {}, "a"),
        policy_key("MeshService", {"kuma.io/policy-role": "consumer"}, "a"),
        policy_key("MeshService", {"kuma.io/origin": "global"}, "z"),
        policy_key("MeshSubset", {}, "a"),
        policy_key("Mesh", {"kuma.io/policy-role": "workload-owner"}, "z"),
        policy_key("Mesh", {}, "b"),
    ]
    ordered = sorted(keys)
    assert [k[0] for k in ordered] == [0, 0, 1, 3, 3, 3, 3, 4, 6]
    svc = [k for k in ordered if k[0] == 3]
    # global before zone, then system before consumer, then by name.
    assert svc == [(3, 0, 0, "z"), (3, 1, 0, "a"), (3, 1, 0, "z"), (3, 1, 2, "a")]
    assert ordered[:2] == [(0, 1, 0, "b"), (0, 1, 3, "z")]


def _item(kind: str, name: str, default: Any, item_kind: int = 0, policy: object | None = None) -> Ranked:
    return Ranked(policy_key(kind, {}, name), item_kind, default, policy if policy is not None else name)


def test_in_order_puts_policy_order_before_the_items_own_kind() -> None:
    a = _item("Mesh", "a", {"x": 1}, item_kind=3)
    b = _item("MeshService", "b", {"x": 2}, item_kind=0)
    c = _item("Mesh", "a", {"x": 3}, item_kind=0, policy="a")
    assert [r.default["x"] for r in in_order([b, a, c])] == [3, 1, 2]


def test_name_ties_name_both_policies_only_when_they_set_the_same_thing() -> None:
    a = _item("Mesh", "alpha", {"http": {"requestTimeout": "1s"}})
    b = _item("Mesh", "beta", {"http": {"requestTimeout": "2s"}})
    c = _item("Mesh", "gamma", {"http": {"idleTimeout": "2s"}})
    d = _item("MeshService", "delta", {"http": {"requestTimeout": "9s"}})
    ties = name_ties(in_order([d, c, b, a]))
    assert [(x.policy, y.policy) for x, y in ties] == [("beta", "alpha")]  # the smaller name wins


def _ranked(
    name: str,
    top: str,
    default: Any,
    item: str = "Mesh",
    labels: dict[str, str] | None = None,
    section: str = "to",
) -> Ranked:
    return Ranked(
        policy_key(top, labels or {}, name), target_rank(item), default, name, (section, 0), (top, item)
    )


@pytest.mark.parametrize(
    ("low", "high", "reason"),
    [
        (_ranked("a", "MeshService", {}), _ranked("b", "MeshServiceSubset", {}),
         "more specific targetRef MeshServiceSubset > MeshService"),
        (_ranked("z", "Mesh", {}, labels={"kuma.io/origin": "global"}), _ranked("a", "Mesh", {}),
         "origin zone > global (kuma.io/origin)"),
        (_ranked("z", "Mesh", {}, labels={"kuma.io/policy-role": "producer"}),
         _ranked("a", "Mesh", {}, labels={"kuma.io/policy-role": "consumer"}),
         "role consumer > producer (kuma.io/policy-role)"),
        (_ranked("a", "Mesh", {}), _ranked("b", "Mesh", {}, item="MeshService"),
         "more specific item targetRef MeshService > Mesh"),  # a `to` item's kind before names
        (_ranked("b", "Mesh", {}, item="MeshService", section="from"),
         _ranked("a", "Mesh", {}, section="from"),
         "name order: 'a' sorts before 'b' (names come before a `from` item's own kind)"),
        (_ranked("b", "Mesh", {}), _ranked("a", "Mesh", {}),
         "name-order tie: 'a' sorts before 'b', and the smaller name wins (W3004)"),
    ],
)  # fmt: skip
def test_why_names_the_first_attribute_that_orders_two_items(low: Ranked, high: Ranked, reason: str) -> None:
    assert in_order([high, low]) == [low, high]  # the order ``why`` explains is Kuma's
    assert why(low, high) == reason


def test_why_names_the_item_kind_between_items_of_one_policy() -> None:
    low = _ranked("p", "Mesh", {})
    high = Ranked(low.key, target_rank("MeshService"), {}, "q", ("to", 1), ("Mesh", "MeshService"))
    assert why(low, high) == "more specific item targetRef MeshService > Mesh"


def test_contributions_say_which_leaves_a_higher_item_replaced() -> None:
    mesh = _ranked("mesh", "Mesh", {"connection_timeout": 1, "http": {"request_timeout": 2}, "append_x": [1]})
    svc = _ranked("svc", "MeshService", {"http": {"request_timeout": 3}, "append_x": [2]})
    top = _ranked("top", "MeshServiceSubset", {"connection_timeout": 4})
    lo, mid, hi = contributions(in_order([top, mesh, svc]))
    assert lo.item is mesh and lo.sets == (
        ("connection_timeout",),
        ("http", "request_timeout"),
        ("append_x",),
    )
    assert [(leaf, r.policy) for leaf, r in lo.overridden] == [
        (("connection_timeout",), "top"),
        (("http", "request_timeout"), "svc"),
    ]  # the append list adds up: not overridden
    assert not lo.shadowed and not mid.shadowed and mid.overridden == () and not hi.overridden
    # A map replaced by a scalar replaces every leaf under it.
    a, _ = contributions(
        [_ranked("a", "Mesh", {"http": {"x": 1, "y": 2}}), _ranked("b", "MeshService", {"http": None})]
    )
    assert a.shadowed and [r.policy for _, r in a.overridden] == ["b", "b"]
