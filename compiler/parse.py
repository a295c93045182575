"""Parse: YAML documents -> typed policy documents, with findings for everything that is wrong.

Both of Kuma's forms are read: Kubernetes (``apiVersion``, ``kind``, ``mesh``, ``metadata``,
``spec``) and universal (``type``, ``name``, ``mesh``, fields at top level). The spec is
validated by the kind's pydantic model (types, unknown keys) and then by the kind's own
checks (Kuma's validator rules). Findings carry key paths, never positions.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from types import UnionType
from typing import Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from compiler.diagnostics import Diagnostic, Loc, Path
from compiler.kinds import REGISTRY, KindDef
from compiler.kinds.base import Finding, Selector
from compiler.kube import objects as kube

__all__ = ["Declared", "Doc", "parse_documents"]

_K8S_TOP = {"apiVersion", "kind", "mesh", "metadata", "spec"}
_META = {
    "name",
    "namespace",
    "labels",
    "annotations",
    "creationTimestamp",
    "generation",
    "uid",
    "resourceVersion",
}
_API_VERSIONS = {"kuma.io/v1alpha1", "meshc/v1alpha1"}


@dataclass(frozen=True)
class Doc:
    """One valid policy document."""

    file: str
    index: int
    kind: str
    mesh: str
    name: str
    spec: Any
    prefix: Path
    labels: tuple[tuple[str, str], ...] = ()
    """Its string labels (targetRef kinds: ``kuma.io/origin`` and ``kuma.io/policy-role`` order them)."""

    def loc(self, path: Path = (), on_key: bool = False) -> Loc:
        return Loc(self.file, self.index, (*self.prefix, *path), on_key)

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.mesh}/{self.name}"


def _diag(code: str, msg: str, file: str, index: int, path: Path = (), on_key: bool = False) -> Diagnostic:
    return Diagnostic(code, msg, Loc(file, index, path, on_key))


Declared = tuple[str, str, str]
"""(kind, mesh, name) of a catalog document that exists but did not validate."""
_CATALOG_KINDS = ("Mesh", "Service", "MeshGateway")


def parse_documents(file: str, docs: Iterable[Any]) -> tuple[list[Doc], list[Diagnostic], list[Declared]]:
    """Valid documents, findings, and the names that invalid catalog documents declare.

    The declared names let the catalog stay quiet about references to a Mesh or Service that is
    only broken, not missing: its own diagnostics say what is wrong, once.
    """
    out: list[Doc] = []
    findings: list[Diagnostic] = []
    declared: list[Declared] = []
    for index, raw in enumerate(docs):
        if raw is None:
            continue  # an empty document (a trailing `---`) is allowed
        doc, errs = _parse_one(file, index, raw)
        findings.extend(errs)
        if doc is not None:
            out.append(doc)
        elif (ident := _declared(raw)) is not None:
            declared.append(ident)
    return out, findings, declared


def _declared(raw: Any) -> Declared | None:
    if not isinstance(raw, dict):
        return None
    kind = raw.get("kind", raw.get("type"))
    if kind not in _CATALOG_KINDS:
        return None
    meta = raw.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else raw.get("name")
    if kind == "MeshGateway":
        # A gateway declares the service its selector names.
        name = None
        spec = raw.get("spec") if "spec" in raw else raw
        sels = spec.get("selectors") if isinstance(spec, dict) else None
        if isinstance(sels, list) and sels and isinstance(sels[0], dict):
            match = sels[0].get("match")
            name = match.get("kuma.io/service") if isinstance(match, dict) else None
        kind = "Service"
    mesh = name if raw.get("kind", raw.get("type")) == "Mesh" else raw.get("mesh")
    if isinstance(name, str) and name and isinstance(mesh, str) and mesh:
        return (kind, mesh, name)
    return None


def _parse_one(file: str, index: int, raw: Any) -> tuple[Doc | None, list[Diagnostic]]:
    if not isinstance(raw, dict):
        return None, [
            _diag("E0005", f"a policy document must be a mapping, not {_typename(raw)}", file, index)
        ]
    if kube.is_kubernetes(raw, REGISTRY):
        obj, found = kube.parse_object(file, index, raw)
        if obj is None:
            return None, found
        kind_key = kube.KIND_PREFIX + obj.kind
        return Doc(file, index, kind_key, "", obj.metadata.name, obj, ()), found
    errs: list[Diagnostic] = []
    if "kind" in raw or "apiVersion" in raw:
        prefix: Path = ("spec",)
        kind = raw.get("kind")
        api = raw.get("apiVersion")
        kdef = REGISTRY.get(kind) if isinstance(kind, str) else None
        if kind is None:
            # Point at the apiVersion line: `kind` belongs beside it.
            where: Path = ("apiVersion",) if "apiVersion" in raw else ("kind",)
            what = "no value" if "kind" in raw else "no `kind`"
            return None, [
                _diag(
                    "E0006",
                    f"the document has {what}; add e.g. `kind: TrafficRoute`",
                    file,
                    index,
                    where,
                    True,
                )
            ]
        if kdef is None:
            return None, [_unknown_kind(kind, file, index, ("kind",))]
        if api != kdef.api_version:
            errs.append(
                _diag(
                    "E0006",
                    f"apiVersion {api!r} does not serve kind {kind}; use `apiVersion: {kdef.api_version}`",
                    file,
                    index,
                    ("apiVersion",) if "apiVersion" in raw else (),
                )
            )
        for key in raw:
            if key not in _K8S_TOP:
                errs.append(
                    _diag(
                        "E1001",
                        f"unknown key {key!r} at the top level; the spec goes under `spec`",
                        file,
                        index,
                        (key,),
                        True,
                    )
                )
        meta = raw.get("metadata")
        name = None
        if not isinstance(meta, dict):
            where = ("metadata",) if "metadata" in raw else ("kind",)
            errs.append(
                _diag("E0007", "`metadata.name` is missing; add `metadata: {name: ...}`", file, index, where)
            )
        else:
            name = meta.get("name")
            for key in meta:
                if key not in _META:
                    errs.append(
                        _diag("E1001", f"unknown metadata key {key!r}", file, index, ("metadata", key), True)
                    )
            if not isinstance(name, str) or not name:
                errs.append(
                    _diag(
                        "E0007",
                        "`metadata.name` must be a non-empty string",
                        file,
                        index,
                        ("metadata", "name"),
                    )
                )
        spec_raw = raw.get("spec", {})
        if spec_raw is None:
            spec_raw = {}
    elif "type" in raw:
        kind, prefix = raw.get("type"), ()
        kdef = REGISTRY.get(kind) if isinstance(kind, str) else None
        if kdef is None:
            return None, [_unknown_kind(kind, file, index, ("type",))]
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            where = ("name",) if "name" in raw else ("type",)
            errs.append(_diag("E0007", "`name` must be a non-empty string", file, index, where))
        spec_raw = {k: v for k, v in raw.items() if k not in ("type", "name", "mesh")}
    else:
        first = next(iter(raw), None)
        return None, [
            _diag(
                "E0006",
                "the document has no `kind` (or universal `type`); add e.g. `kind: TrafficRoute`",
                file,
                index,
                (first,) if isinstance(first, str | int) else (),
                True,
            )
        ]
    mesh: Any
    if kdef.kind == "Mesh":
        mesh = name if isinstance(name, str) else ""
        if "mesh" in raw:
            errs.append(
                _diag(
                    "E1001", "a Mesh has no `mesh` field; its name is the mesh", file, index, ("mesh",), True
                )
            )
    elif kdef.dialect == "targetref" and prefix:
        mesh, mesh_errs = _label_mesh(raw, file, index)
        errs.extend(mesh_errs)
    else:
        mesh = raw.get("mesh")
        if not isinstance(mesh, str) or not mesh:
            errs.append(
                _diag(
                    "E0007",
                    "mesh: cannot be empty; add `mesh: default`",
                    file,
                    index,
                    ("mesh",) if "mesh" in raw else (("kind",) if prefix else ("type",)),
                )
            )
    if not isinstance(spec_raw, dict):
        errs.append(
            _diag("E1002", f"`spec` must be a mapping, not {_typename(spec_raw)}", file, index, prefix)
        )
        return None, errs
    if kdef.max_name_length is not None and isinstance(name, str) and len(name) > kdef.max_name_length:
        where = ("metadata", "name") if prefix else ("name",)
        msg = f"must not be longer than {kdef.max_name_length} characters"
        errs.append(_diag("E1005", msg, file, index, where))
    try:
        spec = kdef.spec.model_validate(spec_raw)
    except ValidationError as e:
        errs.extend(_pydantic(e, raw, file, index, prefix, spec_raw, kdef))
        # Report Kuma's rules too (one run shows every problem): validate again without what
        # was wrong, and keep the findings that the removal itself cannot have caused.
        salvaged, removed, unknown = _salvage(kdef, spec_raw, e)
        if salvaged is not None:
            for f in kdef.check(salvaged):
                if any(_related(f.path, r) for r in removed):
                    continue
                if f.code == "E1003" and any(
                    u[: len(f.path)] == f.path or u[:-1] == f.path[:-1] for u in unknown
                ):
                    continue  # "x is missing" beside an unknown key: most likely x misspelled
                errs.append(_finding(f, raw, spec_raw, file, index, prefix))
        return None, errs
    for f in kdef.check(spec):
        errs.append(_finding(f, raw, spec_raw, file, index, prefix))
    if any(d.severity == "error" for d in errs):
        return None, errs
    assert isinstance(name, str) and isinstance(mesh, str)
    labels = _labels(raw, prefix) if kdef.dialect == "targetref" else ()
    share_parts(spec)
    if kdef.kind == "Service":
        spec = _intern(spec)[0]  # port, protocol and subsets: many services have the same
    elif kdef.dialect == "legacy":
        conf = spec.__dict__.get("conf")
        if isinstance(conf, BaseModel):
            spec.__dict__["conf"] = _intern(conf)[0]
    return Doc(file, index, kdef.kind, mesh, name, spec, prefix, labels), errs


_FIELD_SETS: dict[frozenset[str], set[str]] = {}
_SELECTORS: dict[tuple[Any, ...], Selector] = {}


def share_parts(model: BaseModel) -> None:
    """Make a validated (frozen) model tree share what equal trees hold: one fields-set object per
    set of field names, one ``Selector`` per distinct selector (a service's name is selected by
    ~8 documents). A kept 10,000-service repo so holds ~90 MB less. Safe because every model is
    frozen: nothing mutates a fields set in place (``model_copy`` copies it first)."""
    if len(_SELECTORS) > 500_000:
        _SELECTORS.clear()
    stack = [model]
    while stack:
        m = stack.pop()
        fs = m.__pydantic_fields_set__
        key = frozenset(fs)
        shared = _FIELD_SETS.setdefault(key, fs)
        if shared is not fs:
            object.__setattr__(m, "__pydantic_fields_set__", shared)
        d = m.__dict__
        for k, v in d.items():
            if isinstance(v, BaseModel):
                stack.append(v)
            elif type(v) is list:
                selectors = bool(v)
                for i, x in enumerate(v):
                    if type(x) is Selector:
                        v[i] = _selector(x)
                    else:
                        selectors = False
                        if isinstance(x, BaseModel):
                            stack.append(x)
                if selectors:
                    d[k] = _selector_list(v)
            elif type(v) is dict:
                stack.extend(x for x in v.values() if isinstance(x, BaseModel))


_M = TypeVar("_M", bound=BaseModel)
_MODELS: dict[tuple[Any, ...], Any] = {}
"""Validated ``conf`` subtrees by value, while one batch of files is parsed (``end_batch``)."""
_SCALARS = (str, type(None))
_NUMBERS = (int, float, bool)


def _intern(m: _M) -> tuple[_M, bool]:
    """``m`` with its sub-models replaced by equal ones seen before in this batch, and the one
    equal to ``m`` itself if there was one; and whether ``m``'s value could be keyed at all.

    A legacy policy's ``conf`` is the same in many documents (one Retry or Timeout for every
    service): a 10,000-service repo keeps ~50,000 fewer model objects (~14 MB). Safe for the same
    reason as ``share_parts``: the models are frozen, and nothing keys on their identity."""
    if m.__pydantic_extra__ or m.__pydantic_private__:
        return m, False
    d = m.__dict__
    vals: list[Any] = []
    ok = True
    for k, v in d.items():
        t = type(v)
        if t in _SCALARS:
            vals.append(v)
        elif t in _NUMBERS:
            vals.append((t, v))
        elif isinstance(v, Enum):
            vals.append(v)
        elif isinstance(v, BaseModel):
            c, sub = _intern(v)
            if c is not v:
                d[k] = c
            ok = ok and sub
            vals.append(id(c))
        elif t is list:
            items: list[Any] = []
            for i, x in enumerate(v):
                tx = type(x)
                if tx in _SCALARS:
                    items.append(x)
                elif tx in _NUMBERS:
                    items.append((tx, x))
                elif tx is dict and all(type(y) is str for y in x.values()):
                    items.append((dict, *x.items()))  # in order: equal dicts in another order stay apart
                elif isinstance(x, BaseModel):
                    c, sub = _intern(x)
                    if c is not x:
                        v[i] = c
                    ok = ok and sub
                    items.append(id(c))
                else:
                    ok = False
            vals.append(tuple(items))
        else:
            ok = False
    if not ok:
        return m, False
    key = (type(m), id(m.__pydantic_fields_set__), *vals)
    found: _M | None = _MODELS.get(key)
    if found is None:
        if len(_MODELS) >= 200_000:
            _MODELS.clear()
        found = _MODELS[key] = m
    return found, True


def end_batch() -> None:
    """Forget the ``conf`` values of the files parsed so far (the shared objects stay shared);
    kept, the table would hold a key per distinct model."""
    _MODELS.clear()


_SELECTOR_LISTS: dict[tuple[int, ...], list[Selector]] = {}


def _selector_list(sels: list[Selector]) -> list[Selector]:
    """One list per distinct list of shared selectors (``sources: [{kuma.io/service: '*'}]`` in
    most policies, a service's ``destinations`` in each of its ~4): ~90,000 fewer lists at
    10,000 services. Keyed by the selectors' ids, which stay valid: the kept list holds them."""
    if len(_SELECTOR_LISTS) > 200_000:
        _SELECTOR_LISTS.clear()
    return _SELECTOR_LISTS.setdefault(tuple(map(id, sels)), sels)


def _selector(sel: Selector) -> Selector:
    match = sel.match
    key = (
        frozenset(sel.__pydantic_fields_set__),
        tuple(match.items()) if match is not None else None,
    )
    found = _SELECTORS.get(key)
    if found is None:
        found = _SELECTORS[key] = sel
        fs = sel.__pydantic_fields_set__
        object.__setattr__(sel, "__pydantic_fields_set__", _FIELD_SETS.setdefault(frozenset(fs), fs))
    return found


def _labels(raw: dict[Any, Any], prefix: Path) -> tuple[tuple[str, str], ...]:
    """``metadata.labels`` (Kubernetes form) or ``labels`` (universal form), the string ones."""
    meta = raw.get("metadata") if prefix else raw
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, dict):
        return ()
    return tuple(sorted((k, v) for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)))


MESH_LABEL = "kuma.io/mesh"


def _label_mesh(raw: dict[Any, Any], file: str, index: int) -> tuple[Any, list[Diagnostic]]:
    """A targetRef kind's mesh: its ``kuma.io/mesh`` label, ``default`` without one (as Kuma has it)."""
    errs = []
    if "mesh" in raw:
        msg = (
            f"a {raw.get('kind')} has no top-level `mesh`; set the `{MESH_LABEL}` label in `metadata.labels`"
        )
        errs.append(_diag("E1001", msg, file, index, ("mesh",), True))
    meta = raw.get("metadata")
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, dict) or MESH_LABEL not in labels:
        return "default", errs
    mesh = labels[MESH_LABEL]
    if not isinstance(mesh, str) or not mesh:
        where: Path = ("metadata", "labels", MESH_LABEL)
        errs.append(_diag("E0007", f"the `{MESH_LABEL}` label must name a mesh", file, index, where))
    return mesh, errs


def _finding(
    f: Finding, raw: dict[Any, Any], spec_raw: Any, file: str, index: int, prefix: Path
) -> Diagnostic:
    """A kind check's finding, located; "must be defined" on a key with no value is E1004."""
    if not _present(spec_raw, f.path):
        # A missing key is shown at the object that should hold it: name the key in the message.
        msg = f"`{_dotted(f.path)}`: {f.message}" if f.path else f.message
        return _diag(f.code, msg, file, index, _anchor(raw, (*prefix, *f.path), prefix))
    if f.code == "E1003" and f.path and _lookup(spec_raw, f.path) is None:
        key = f.path[-1]
        return _diag(
            "E1004", f"`{key}` has no value ({f.message}); give it one", file, index, (*prefix, *f.path)
        )
    return _diag(f.code, f.message, file, index, (*prefix, *f.path), f.on_key)


def _anchor(raw: dict[Any, Any], path: Path, prefix: Path) -> Path:
    """``path``, unless even its top-level key is missing: then the kind (or type), not line 1."""
    if path and path[0] in raw:
        return path
    return ("kind",) if prefix else ("type",)


def _dotted(path: Path) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


def _unknown_kind(kind: Any, file: str, index: int, path: Path) -> Diagnostic:
    known = ", ".join(sorted(REGISTRY))
    return _diag("E0006", f"unknown kind {kind!r}; meshc knows {known}", file, index, path)


def _typename(v: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
    }.get(type(v), "null" if v is None else type(v).__name__)


def _lookup(data: Any, path: Path) -> Any:
    for step in path:
        if isinstance(data, list) and isinstance(step, int) and 0 <= step < len(data):
            data = data[step]
        elif not isinstance(data, dict) or step not in data:
            return None
        else:
            data = data[step]
    return data


_TYPE_STEPS = ("str", "int", "float", "bool", "list", "dict", "none")


def _error_path(loc: tuple[str | int, ...]) -> tuple[Path, bool]:
    """A pydantic error location as a key path (union and validator steps dropped)."""
    on_key = False
    path: list[str | int] = []
    for step in loc:
        if step == "[key]":
            on_key = True
            continue
        if isinstance(step, str) and (step.startswith("function-") or step in _TYPE_STEPS):
            continue
        path.append(step)
    return tuple(path), on_key


def _related(a: Path, b: Path) -> bool:
    """Whether one path is the other or inside it."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


_SALVAGE_ROUNDS = 8


def _salvage(
    kdef: KindDef, spec_raw: dict[str, Any], e: ValidationError
) -> tuple[Any, list[Path], list[Path]]:
    """The spec validated again without its unknown keys and wrongly typed values, if possible.

    Unknown keys are dropped as Kuma drops them, so Kuma's rules still apply as Kuma applies them.
    A wrong value is removed (the field becomes unset, or its list empty); the paths removed that
    way are returned, so that findings the removal causes (``has to be defined``) are not shown,
    and so are the unknown keys.
    """
    data = copy.deepcopy(spec_raw)
    removed: list[Path] = []
    unknown: list[Path] = []
    for _ in range(_SALVAGE_ROUNDS):
        for err in e.errors(include_url=False):
            path, _ = _error_path(err["loc"])
            if not path or err["type"] == "missing":
                return None, removed, unknown
            parent = _lookup(data, path[:-1])
            if isinstance(parent, list):  # a bad item: drop the whole list
                path = path[:-1]
                parent = _lookup(data, path[:-1])
                if not path:
                    return None, removed, unknown
            if isinstance(parent, dict) and path[-1] in parent:
                del parent[path[-1]]
            (unknown if err["type"] == "extra_forbidden" else removed).append(path)
        try:
            return kdef.spec.model_validate(data), removed, unknown
        except ValidationError as again:
            e = again
    return None, removed, unknown


def _pydantic(
    e: ValidationError, raw: dict[Any, Any], file: str, index: int, prefix: Path, spec_raw: Any, kdef: KindDef
) -> list[Diagnostic]:
    out = []
    seen: set[tuple[Path, str]] = set()
    for err in e.errors(include_url=False):
        tpath, on_key = _error_path(err["loc"])
        path = list(tpath)
        typ = err["type"]
        value = err.get("input")
        actual = _lookup(spec_raw, tuple(path))
        if typ == "extra_forbidden":
            code, msg, on_key = "E1001", f"unknown key {path[-1]!r}{_did_you_mean(kdef, tpath)}", True
        elif typ == "missing":
            code, msg = "E1003", f"`{path[-1]}` is required"
        elif typ == "duration":
            code, msg = "E1006", err["msg"]
        elif typ == "literal_error":
            code, msg = "E1005", f"{value!r} is not allowed: {err['msg'].lower()}"
        elif value is None or (actual is None and _present(spec_raw, tuple(path))):
            code, msg = (
                "E1004",
                f"`{path[-1] if path else 'spec'}` has no value; give it one or remove the key",
            )
        elif (
            typ.endswith("_type")
            or typ.endswith("_parsing")
            or typ in ("model_type", "dict_type", "list_type")
        ):
            code, msg = "E1002", f"wrong type: {err['msg'].lower()}, got {_typename(value)}"
        else:
            code, msg = "E1005", err["msg"]
        key = (tuple(path), code)
        if key in seen:
            continue
        seen.add(key)
        out.append(_diag(code, msg, file, index, _anchor(raw, (*prefix, *path), prefix), on_key))
    return out


def _present(data: Any, path: Path) -> bool:
    if not path:
        return True
    parent = _lookup(data, path[:-1])
    step = path[-1]
    if isinstance(parent, list):
        return isinstance(step, int) and 0 <= step < len(parent)
    return isinstance(parent, dict) and step in parent


def _did_you_mean(kdef: KindDef, path: Path) -> str:
    """A hint for an unknown key: the closest field of the object it is in, or the list of them."""
    name = str(path[-1])
    fields = _fields_at(kdef.spec, path[:-1])
    if not fields:
        return ""
    by_lower = {f.lower().replace("_", ""): f for f in fields}
    close = by_lower.get(name.lower().replace("_", "").replace("-", ""))
    if close is None:
        found = difflib.get_close_matches(name, fields, n=1, cutoff=0.7)
        close = found[0] if found else None
    if close is not None and close != name:
        return f"; did you mean {close!r}?"
    return f"; expected one of: {', '.join(fields)}"


def _fields_at(model: type[BaseModel], path: Path) -> list[str]:
    """The keys (camelCase spelling) of the object at ``path`` inside ``model``'s data."""
    types: list[Any] = [model]
    for step in path:
        nxt: list[Any] = []
        for t in types:
            for m in _model_args(t):
                field = _field_by_key(m, step) if isinstance(step, str) else None
                if field is not None:
                    nxt.append(field)
            nxt.extend(_container_items(t, step))
        types = nxt
    names: list[str] = []
    for t in types:
        for m in _model_args(t):
            names.extend(to_camel(f) for f in m.model_fields if to_camel(f) not in names)
    return names


def _field_by_key(m: type[BaseModel], key: str) -> Any:
    for fname, f in m.model_fields.items():
        if key in (fname, to_camel(fname)):
            return f.annotation
    return None


def _container_items(t: Any, step: str | int) -> list[Any]:
    """Element types one step down a list (int step) or a dict (str step), through unions."""
    origin = get_origin(t)
    args = get_args(t)
    if origin is list and isinstance(step, int):
        return list(args[:1])
    if origin is dict and isinstance(step, str):
        return list(args[1:2])
    if origin in (Union, UnionType):
        return [x for a in args for x in _container_items(a, step)]
    return []


def _model_args(t: Any) -> list[type[BaseModel]]:
    """The models in a type, through ``Optional``/unions (not through containers)."""
    if isinstance(t, type) and issubclass(t, BaseModel):
        return [t]
    if get_origin(t) in (Union, UnionType):
        return [m for a in get_args(t) for m in _model_args(a)]
    return []
