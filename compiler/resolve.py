"""Resolve: Kuma's precedence per policy kind and (source, destination) pair (DESIGN §3).

Every (source selector, destination selector) pair of a policy becomes an ``Entry`` with a rank
(exact tag matches, then wildcard matches, Kuma's ``TagSelectorRank``). For a pair of services the
matching entries are sorted most specific first and kept as tag-conditioned ``Rule``s up to the
first unconditional one. Two policies of one kind with equal rank whose conditions can hold for
the same instance are a conflict (E3002): Kuma would pick the newest, Git has no such clock.
TrafficPermissions are never ranked: they add up.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from compiler.diagnostics import Diagnostic, Path
from compiler.kinds import REGISTRY
from compiler.kinds.base import PROTOCOL_TAG, ConfContext, Selector, extra_tags, selector_service
from compiler.parse import Doc, share_parts
from runtime import bundle as b

__all__ = [
    "INBOUND",
    "OUTBOUND",
    "TARGETREF_INBOUND",
    "Entry",
    "PolicyIndex",
    "Tracing",
    "index_policies",
    "split_ranked",
]

OUTBOUND = frozenset(k for k, d in REGISTRY.items() if d.indexed and d.direction == "outbound")
"""Kinds that configure the ``sources``' outbound side: rules keyed by (source, destination)."""
INBOUND = frozenset(k for k, d in REGISTRY.items() if d.indexed and d.direction == "inbound")
"""Kinds that configure the ``destinations``' inbound side: the caller is the rule's ``peer``."""
TARGETREF_INBOUND = {
    "circuit_breaker": "MeshCircuitBreaker",
    "timeout": "MeshTimeout",
    "traffic_log": "MeshAccessLog",
}
"""The ``runtime.bundle.Inbound`` fields only targetRef policies fill (no legacy kind has them):
field -> the kind their entries are filed under in ``PolicyIndex.by_dst``. ``build`` writes them
only when they hold rules (``runtime.bundle.INBOUND_OPTIONAL``); ``traffic_log`` rules add up."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One (source, destination) rule of a document. Slotted: a 10,000-service mesh keeps ~80,000
    of them between compiles, and a ``__dict__`` each cost ~25 MB."""

    doc: Doc
    src: str
    dst: str
    when: tuple[tuple[str, str], ...]
    peer: tuple[tuple[str, str], ...]
    rank: tuple[int, int]
    conf: Any
    path: Path
    also: tuple[Doc, ...] = ()
    """Other documents merged into ``conf`` (targetRef policies), for provenance."""
    merged: tuple[Any, ...] = ()
    """The targetRef items (``precedence.Ranked``) merged into ``conf``, lowest precedence first."""
    _rule: str | None = field(default=None, compare=False, repr=False)

    @property
    def rule_json(self) -> str:
        """This entry as a bundle ``Rule``, in canonical JSON (serialized once, shared by bundles).

        Serializing releases ``conf`` (it becomes None; nothing but this reads it): the bundle
        models of a 10,000-service mesh's ~40,000 entries, kept by the incremental compiler, cost
        ~25 MB next to their JSON."""
        out = self._rule
        if out is None:
            conf = self.conf.model_dump(mode="json") if self.conf is not None else None
            # interned: equal rules (the same Retry for many services) share one string
            out = sys.intern(_canon({"when": dict(self.when), "peer": dict(self.peer), "conf": conf}))
            object.__setattr__(self, "_rule", out)
            object.__setattr__(self, "conf", None)
        return out


_canon = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


@dataclass(frozen=True)
class Tracing:
    """A mesh's tracing as its MeshTrace policies and its Mesh's legacy ``tracing`` resolve it
    (``resolve_targetref.index_tracing``), with the documents that shaped each part."""

    mesh: b.TracingBackend | None
    """The mesh bundle's ``tracing``."""
    mesh_docs: tuple[Doc, ...] = ()
    services: dict[str, tuple[b.ServiceTracing, tuple[Doc, ...]]] = field(default_factory=dict)
    """Service -> its bundle's ``tracing`` (a MeshTrace selects it), and the MeshTraces merged."""


@dataclass
class PolicyIndex:
    """Entries per kind, keyed by (source service, destination service); ``*`` is a key too."""

    by_kind: dict[str, dict[tuple[str, str], list[Entry]]] = field(default_factory=dict)
    sources: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    """Outbound kinds: source service -> destinations it names (``*`` included), with the number
    of entries that name each (so that removing a document's entries keeps it exact)."""
    by_dst: dict[str, dict[str, list[Entry]]] = field(default_factory=dict)
    """Inbound kinds: destination service (or ``*``) -> entries."""
    conflicts: dict[frozenset[int], tuple[Entry, Entry]] = field(default_factory=dict)
    by_doc: dict[int, tuple[Doc, list[Entry]]] = field(default_factory=dict)
    """``id(doc)`` -> the document and its entries (what ``remove`` takes out again)."""
    targetref: bool = False
    """Whether targetRef policies added entries (``compiler.resolve_targetref``)."""
    tracing: Tracing | None = None
    """None until ``index_targetref`` resolves it (then ``build`` reads it, not the Mesh)."""

    def add(self, d: Doc, log_backends: dict[str, tuple[b.LoggingBackend, ...]]) -> list[Entry]:
        """Index one document's (source, destination) pairs; returns its entries."""
        kdef = REGISTRY.get(d.kind)
        if kdef is None or not kdef.indexed:
            return []
        conf = None
        if not kdef.additive:
            assert kdef.to_conf is not None, f"{d.kind} has a bundle field and no to_conf"
            conf = kdef.to_conf(d.spec, ConfContext(logging=log_backends.get(d.mesh, ())))
            if conf is None:
                return []
            if isinstance(conf, BaseModel):
                share_parts(conf)  # kept by the incremental compiler: share its fields sets
        table = self.by_kind.setdefault(d.kind, {})
        inbound = self.by_dst.setdefault(d.kind, {})
        out: list[Entry] = []
        for si, s in enumerate(d.spec.sources or []):
            st = _tags(s)
            for di, t in enumerate(d.spec.destinations or []):
                dt = _tags(t)
                src, dst = selector_service(st), selector_service(dt)
                if d.kind in OUTBOUND:
                    when, peer = extra_tags(st), extra_tags(dt)
                    named = self.sources[src]
                    named[dst] = named.get(dst, 0) + 1
                    path: Path = ("sources", si, "match")
                else:
                    when = extra_tags(dt)
                    peer = {k: v for k, v in st.items() if k != PROTOCOL_TAG and v is not None and v != "*"}
                    path = ("destinations", di, "match")
                e = Entry(
                    d,
                    src,
                    dst,
                    _shared(tuple(sorted(when.items()))),
                    _shared(tuple(sorted(peer.items()))),
                    _shared(_rank(st, dt)),
                    conf,
                    _shared(path),
                )
                _append(table, (src, dst), e)
                _append(inbound, dst, e)
                out.append(e)
        self.by_doc[id(d)] = (d, out[:])  # a copy is sized to fit (most documents have one entry)
        return out

    def remove(self, d: Doc) -> list[Entry]:
        """Take out what ``add`` put in for this document; returns its entries."""
        _, entries = self.by_doc.pop(id(d), (d, []))
        for e in entries:
            kind = e.doc.kind
            for lst, key, table in (
                (self.by_kind[kind][(e.src, e.dst)], (e.src, e.dst), self.by_kind[kind]),
                (self.by_dst[kind][e.dst], e.dst, self.by_dst[kind]),
            ):
                lst[:] = [x for x in lst if x is not e]
                if not lst:
                    del table[key]  # type: ignore[arg-type]
            if kind in OUTBOUND:
                named = self.sources[e.src]
                named[e.dst] -= 1
                if not named[e.dst]:
                    del named[e.dst]
                if not named:
                    del self.sources[e.src]
        return entries

    def entries(self, kind: str, keys: Iterable[tuple[str, str]]) -> list[Entry]:
        table = self.by_kind.get(kind, {})
        out: list[Entry] = []
        for k in keys:
            out.extend(table.get(k, ()))
        return out

    def ranked(self, kind: str, entries: list[Entry]) -> list[Entry]:
        """Most specific first, up to the first unconditional entry; records conflicts."""
        entries.sort(key=_order)
        out: list[Entry] = []
        for i, e in enumerate(entries):
            for prev in out:
                if (
                    prev.rank == e.rank
                    and prev.doc is not e.doc
                    and not (prev.merged and e.merged)  # targetRef: the union of their tags comes first
                    and _compatible(prev.when, e.when)
                    and _compatible(prev.peer, e.peer)
                ):
                    key = frozenset((id(prev.doc), id(e.doc)))
                    self.conflicts.setdefault(key, (prev, e))
            out.append(e)
            if not e.when and not e.peer:
                # Equal-rank unconditional entries further on still conflict with this one.
                for later in entries[i + 1 :]:
                    if later.rank != e.rank:
                        break
                    if later.doc is not e.doc and not later.when and not later.peer:
                        self.conflicts.setdefault(frozenset((id(e.doc), id(later.doc))), (e, later))
                break
        return out


def _order(e: Entry) -> tuple[int, int, str, str, int]:
    # Equal ranks that do not conflict are disjoint: order them by content, not by file name.
    return (-e.rank[0], -e.rank[1], e.rule_json, e.doc.file, e.doc.index)


def split_ranked(entries: Iterable[Entry]) -> tuple[list[Entry], list[Entry]]:
    """``ranked``'s order without its bookkeeping: the entries a bundle lists, most specific first,
    and the ones after the first unconditional entry (shadowed by it), for ``meshc explain``."""
    ordered = sorted(entries, key=_order)
    for i, e in enumerate(ordered):
        if not e.when and not e.peer:
            return ordered[: i + 1], ordered[i + 1 :]
    return ordered, []


def _compatible(a: tuple[tuple[str, str], ...], b_: tuple[tuple[str, str], ...]) -> bool:
    da = dict(a)
    return all(k not in da or da[k] == v or "*" in (da[k], v) for k, v in b_)


_K = TypeVar("_K")


def _append(table: dict[_K, list[Entry]], key: _K, e: Entry) -> None:
    """``table.setdefault(key, []).append(e)``, a new list sized for the one entry (most keys
    hold one: ~2 MB less over the 80,000 lists of a 10,000-service mesh)."""
    lst = table.get(key)
    if lst is None:
        table[key] = [e]
    else:
        lst.append(e)


_T = TypeVar("_T", bound=tuple[Any, ...])
_SHARED: dict[tuple[Any, ...], tuple[Any, ...]] = {}


def _shared(t: _T) -> _T:
    """One tuple object per distinct value (ranks, tag sets, paths): ~40,000 entries kept by the
    incremental compiler hold a handful of distinct ones."""
    if len(_SHARED) > 200_000:
        _SHARED.clear()
    return _SHARED.setdefault(t, t)  # type: ignore[return-value]


def _rank(*selectors: dict[str, str | None]) -> tuple[int, int]:
    exact = wild = 0
    for s in selectors:
        for v in s.values():
            if v == "*":
                wild += 1
            else:
                exact += 1
    return exact, wild


def _tags(sel: Selector) -> dict[str, str | None]:
    return dict(sel.match or {})


def index_policies(docs: list[Doc], log_backends: dict[str, tuple[b.LoggingBackend, ...]]) -> PolicyIndex:
    idx = PolicyIndex()
    for d in docs:
        idx.add(d, log_backends)
    return idx


def conflict_diagnostics(idx: PolicyIndex) -> list[Diagnostic]:
    out = []
    for first, second in idx.conflicts.values():
        a, z = sorted((first, second), key=lambda e: (e.doc.file, e.doc.index))
        pair = f"{z.src} -> {z.dst}"
        out.append(
            Diagnostic(
                "E3002",
                f"{z.doc.kind} {z.doc.name!r} and {a.doc.name!r} both apply to {pair} "
                "with equal specificity; "
                "Kuma would pick the newer one. Make one selector more specific, or merge them",
                z.doc.loc(z.path),
                related_locs=((a.doc.loc(a.path), f"{a.doc.kind} {a.doc.name!r} is here"),),
            )
        )
    return out
