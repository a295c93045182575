"""MeshProxyPatch: patches to the proxies' Envoy configuration. meshc validates it; it has no effect.

meshc's proxies are not Envoy, so there is nothing to patch: `compile` accepts the policy and
says so (W1004). The validation is Kuma's: one modification per `appendModifications` entry
(cluster, listener, networkFilter, httpFilter, virtualHost), operations per kind, `value` or
`jsonPatches`. meshc checks that a `value` is a YAML/JSON object, not Envoy's proto schema.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: MeshProxyPatch
    metadata: {name: patch, labels: {kuma.io/mesh: default}}
    spec:
      targetRef: {kind: Mesh}
      default:
        appendModifications:
          - cluster: {operation: Patch, jsonPatches: [{op: replace, path: /connectTimeout, value: 5s}]}

Invalid (an operation a cluster does not take)::

    appendModifications: [{cluster: {operation: AddFirst}}]
"""

from __future__ import annotations

from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

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
    one_of_when,
    target_ref,
)


class JsonPatch(Spec):
    op: KStr = ""
    """add, remove, replace, move or copy (RFC 6902)."""
    path: KStr | None = None
    value: Any = None
    from_: KStr | None = alias("from", "from_")


class Match(Spec):
    origin: KStr | None = None
    name: KStr | None = None
    tags: dict[str, KStr] | None = None
    listener_name: KStr | None = None
    listener_tags: dict[str, KStr] | None = None
    route_configuration_name: KStr | None = None


class Mod(Spec):
    match: Match | None = None
    operation: KStr = ""
    value: KStr | None = None
    """The Envoy resource (YAML), for Add and Patch."""
    json_patches: list[JsonPatch] | None = None


class Modification(Spec):
    cluster: Mod | None = None
    listener: Mod | None = None
    network_filter: Mod | None = None
    http_filter: Mod | None = None
    virtual_host: Mod | None = None


class Conf(Spec):
    append_modifications: list[Modification] | None = None


class MeshProxyPatchSpec(Spec):
    target_ref: TargetRef | None = None
    """The proxies the policy applies to (default: the whole mesh)."""
    default: Conf | None = None


_TOP = ("Mesh", "MeshSubset", "MeshService", "MeshServiceSubset", "MeshGateway", "Dataplane")
_BEFORE = "must be defined. You need to pick a filter before which this one will be added"
_AFTER = "must be defined. You need to pick a filter after which this one will be added"
_RESOURCE_OPS = ("Add", "Patch", "Remove")
_FILTER_OPS = ("AddFirst", "AddLast", "AddBefore", "AddAfter", "Patch", "Remove")


def _ops(ops: tuple[str, ...]) -> str:
    return "invalid operation. Available operations: " + ", ".join(f'"{o}"' for o in ops)


def _resource_error(value: str) -> str | None:
    """Why ``value`` is not an object (Kuma parses it as the Envoy proto; meshc as YAML)."""
    try:
        data = YAML(typ="safe", pure=True).load(value)
    except YAMLError as e:
        text = str(e)
        return "unexpected EOF" if "stream end" in text or "end of stream" in text else text.splitlines()[0]
    if data is not None and not isinstance(data, dict):
        return "the value must be a mapping"
    return None


def _value(path: Path, value: str | None) -> Found:
    if value is None:
        yield path, "must be defined"
    elif (err := _resource_error(value)) is not None:
        yield path, f"native Envoy resource is not valid: {err}"


def _json_patches(path: Path, patches: list[JsonPatch]) -> Found:
    if not patches:
        yield path, "must not be empty"
    for i, p in enumerate(patches):
        pp: Path = (*path, i)
        if p.op not in ("add", "remove", "replace", "move", "copy"):
            yield (*pp, "op"), must_be_one_of("op", ("add", "remove", "replace", "move", "copy"))
        if p.op in ("move", "copy"):
            if p.from_ is None:
                yield (*pp, "from"), one_of_when("from", "op", "must not be empty", ("move", "copy"))
        elif p.from_ is not None:
            yield (*pp, "from"), one_of_when("from", "op", "is allowed only", ("move", "copy"))
        if p.op in ("add", "replace"):
            if p.value is None:
                yield (*pp, "value"), one_of_when("value", "op", "must not be empty", ("add", "replace"))
        elif p.value is not None:
            yield (*pp, "value"), one_of_when("value", "op", "is allowed only", ("add", "replace"))
        if p.path is None:
            yield (*pp, "path"), "must be defined"
        elif p.path in ("", "/") and p.op == "remove":
            yield (*pp, "path"), "root path cannot be removed"


def _patch(path: Path, field: str, m: Mod) -> Found:
    if m.value is not None:
        if m.json_patches:
            yield path, f"{field} must have only one type defined: value, jsonPatches"
        elif (err := _resource_error(m.value)) is not None:
            yield (*path, "value"), f"native Envoy resource is not valid: {err}"
    elif m.json_patches:
        yield from _json_patches((*path, "jsonPatches"), m.json_patches)
    else:
        yield path, f"{field} must have exactly one defined: value, jsonPatches"


def _resource_mod(path: Path, field: str, m: Mod) -> Found:
    """Cluster, listener and virtual host modifications."""
    if m.operation == "Add":
        if field == "virtualHost":
            if m.match is not None and m.match.name is not None:
                yield (*path, "match", "name"), "must not be defined"
        elif m.match is not None:
            yield (*path, "match"), "must not be defined"
        yield from _value((*path, "value"), m.value)
    elif m.operation == "Patch":
        yield from _patch(path, field, m)
    elif m.operation == "Remove":
        if m.value is not None:
            yield (*path, "value"), "must not be defined"
    else:
        yield (*path, "operation"), _ops(_RESOURCE_OPS)


def _filter_mod(path: Path, field: str, m: Mod) -> Found:
    """Network and HTTP filter modifications."""
    named = m.match is not None and m.match.name is not None
    if m.operation in ("AddFirst", "AddLast"):
        yield from _value((*path, "value"), m.value)
    elif m.operation in ("AddBefore", "AddAfter"):
        if not named:
            yield (*path, "match", "name"), _BEFORE if m.operation == "AddBefore" else _AFTER
        yield from _value((*path, "value"), m.value)
    elif m.operation == "Patch":
        if not named:
            yield (*path, "match", "name"), "must be defined"
        yield from _patch(path, field, m)
    elif m.operation == "Remove":
        if m.value is not None:
            yield (*path, "value"), "must not be defined"
    else:
        yield (*path, "operation"), _ops(_FILTER_OPS)


def check(spec: MeshProxyPatchSpec) -> Found:
    if spec.target_ref is not None:
        yield from at(("targetRef",), target_ref(spec.target_ref, _TOP))
    mods = (spec.default.append_modifications if spec.default else None) or []
    path: Path = ("default", "appendModifications")
    if not mods:
        yield path, "must not be empty"
    for i, mod in enumerate(mods):
        set_ = [
            (f, m)
            for f, m in (
                ("cluster", mod.cluster),
                ("listener", mod.listener),
                ("virtualHost", mod.virtual_host),
                ("networkFilter", mod.network_filter),
                ("httpFilter", mod.http_filter),
            )
            if m is not None
        ]
        if len(set_) != 1:
            msg = (
                "exactly one modification can be defined at a time. "
                f"Currently, {len(set_)} modifications are defined"
            )
            yield (*path, i), msg
            continue
        field, m = set_[0]
        if field in ("networkFilter", "httpFilter"):
            yield from _filter_mod((*path, i, field), field, m)
        else:
            yield from _resource_mod((*path, i, field), field, m)


KIND = kind_def(
    "MeshProxyPatch",
    MeshProxyPatchSpec,
    check,
    __doc__ or "",
    no_effect="MeshProxyPatch patches Envoy configuration; meshc's proxies are not Envoy, "
    "so it has no effect",
)
