"""The compile stage of ``Canary`` policies: every step's bundles, built and validated before merge.

For each Canary, the route it drives is rebuilt once per weight its steps reach (the canary's
split target at that weight, the others sharing the rest in Git's proportion), through the same
resolve and build as the release itself: a step's bundles are what a commit with those weights
would compile to, so the control plane only moves a pointer between bundles that already exist.
What a step changes is kept as an overlay (bundle key -> digest) on the release's bundles; the
release lists it under ``canaries`` and the step bundles are written beside the others.

Pure: documents in, records, bundles and findings out; building is the caller's function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from compiler.diagnostics import Diagnostic
from compiler.kinds.base import SERVICE_TAG
from compiler.kinds.canary import CanarySpec
from compiler.parse import Doc
from runtime.bundle import bundle_digest

__all__ = [
    "BuildMesh",
    "CanaryStage",
    "canary_findings",
    "canary_stage",
    "plan_lines",
    "reweigh",
    "split_text",
    "step_text",
]

BuildMesh = Callable[[str, Doc, Doc, list[Doc]], dict[str, bytes]]
"""(mesh, the route as in Git, the route at a step's weights, the mesh's documents with the latter)
-> the bundles the step builds, as the release would: all of them, or at least every one the
route reaches (the incremental compiler rebuilds only those)."""


@dataclasses.dataclass
class CanaryStage:
    records: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """``<mesh>/<name>`` -> the canary as the control plane runs it (see ``_record``)."""
    bundles: dict[str, bytes] = dataclasses.field(default_factory=dict)
    """Digest -> bytes of every step bundle that is not a release bundle."""


def reweigh(weights: Sequence[int], canary: int, percent: int) -> list[int]:
    """Weights out of 100: ``percent`` to entry ``canary``, the rest shared by the others in their
    Git proportion (evenly when Git gives them nothing), largest remainders rounding up."""
    rest = 100 - percent
    others = [i for i in range(len(weights)) if i != canary]
    total = sum(weights[i] for i in others)
    shares = {i: (rest * weights[i] / total if total else rest / len(others)) for i in others}
    out = [0] * len(weights)
    out[canary] = percent
    for i in others:
        out[i] = int(shares[i])
    left = rest - sum(out[i] for i in others)
    for i in sorted(others, key=lambda i: (-(shares[i] - int(shares[i])), i))[:left]:
        out[i] += 1
    return out


# --- the splits of a route ----------------------------------------------------------------------

Split = list[tuple[int, dict[str, str]]]
"""One weighted list of a route: (weight, tags without the service tag) per target."""


def _tr_splits(spec: Any) -> Iterator[tuple[tuple[str | int, ...], Split]]:
    conf = spec.conf
    if conf is None:
        return
    if conf.split:
        yield ("conf", "split"), [(e.weight or 0, _tags(e.destination)) for e in conf.split]
    for i, h in enumerate(conf.http or []):
        if h.split:
            yield ("conf", "http", i, "split"), [(e.weight or 0, _tags(e.destination)) for e in h.split]


def _mhr_splits(spec: Any) -> Iterator[tuple[tuple[str | int, ...], Split]]:
    for i, to in enumerate(spec.to or []):
        for j, rule in enumerate(to.rules or []):
            refs = rule.default.backend_refs if rule.default is not None else None
            if refs:
                path = ("to", i, "rules", j, "default", "backendRefs")
                yield path, [(1 if r.weight is None else r.weight, dict(r.tags or {})) for r in refs]


def _tags(m: dict[str, str | None] | None) -> dict[str, str]:
    return {k: v for k, v in (m or {}).items() if k != SERVICE_TAG and v is not None}


def _splits(route: Doc) -> list[tuple[tuple[str | int, ...], Split]]:
    return list(_tr_splits(route.spec) if route.kind == "TrafficRoute" else _mhr_splits(route.spec))


def _canary_index(split: Split, tags: dict[str, str]) -> list[int]:
    return [i for i, (_, t) in enumerate(split) if all(t.get(k) == v for k, v in tags.items())]


def _with_weights(route: Doc, weights: dict[tuple[str | int, ...], list[int]]) -> Doc:
    """The route document with the given lists' weights (model copies: the parsed spec is frozen)."""
    spec = route.spec
    if route.kind == "TrafficRoute":
        conf = spec.conf
        split = conf.split
        if ("conf", "split") in weights:
            ws = weights["conf", "split"]
            split = [e.model_copy(update={"weight": w}) for e, w in zip(conf.split, ws, strict=True)]
        http = [
            h.model_copy(
                update={
                    "split": [
                        e.model_copy(update={"weight": w})
                        for e, w in zip(h.split, weights["conf", "http", i, "split"], strict=True)
                    ]
                }
            )
            if ("conf", "http", i, "split") in weights
            else h
            for i, h in enumerate(conf.http or [])
        ]
        new_conf = conf.model_copy(update={"split": split, "http": http if conf.http is not None else None})
        return dataclasses.replace(route, spec=spec.model_copy(update={"conf": new_conf}))
    tos = []
    for i, to in enumerate(spec.to or []):
        rules = []
        for j, rule in enumerate(to.rules or []):
            got = weights.get(("to", i, "rules", j, "default", "backendRefs"))
            if got is not None:
                conf = rule.default
                pairs = zip(conf.backend_refs, got, strict=True)
                refs = [r.model_copy(update={"weight": w}) for r, w in pairs]
                rule = rule.model_copy(update={"default": conf.model_copy(update={"backend_refs": refs})})
            rules.append(rule)
        tos.append(to.model_copy(update={"rules": rules}))
    return dataclasses.replace(route, spec=spec.model_copy(update={"to": tos}))


# --- checks ---------------------------------------------------------------------------------------


def _route_of(c: Doc, docs: Sequence[Doc]) -> Doc | None:
    ref = c.spec.target_ref
    return next((d for d in docs if d.mesh == c.mesh and d.kind == ref.kind and d.name == ref.name), None)


def canary_findings(docs: Sequence[Doc]) -> list[Diagnostic]:
    """E4001 (no such route), E4002 (the canary tags do not pick one target of a split), E4003 (two
    canaries drive one route): what must hold before any step can be built."""
    out: list[Diagnostic] = []
    driven: dict[tuple[str, str, str], Doc] = {}
    for c in docs:
        if c.kind != "Canary":
            continue
        spec: CanarySpec = c.spec
        ref = spec.target_ref
        route = _route_of(c, docs)
        if route is None:
            out.append(
                Diagnostic(
                    "E4001",
                    f"no {ref.kind} named {ref.name!r} in mesh {c.mesh!r} for this canary to drive",
                    c.loc(("targetRef", "name")),
                )
            )
            continue
        key = (c.mesh, ref.kind, ref.name)
        if key in driven:
            first = driven[key]
            out.append(
                Diagnostic(
                    "E4003",
                    f"{ref.kind} {ref.name!r} is already driven by Canary {first.name!r}; "
                    "one canary per route at a time",
                    c.loc(("targetRef",)),
                    related_locs=((first.loc(("targetRef",)), "the other canary"),),
                )
            )
        driven.setdefault(key, c)
        splits = _splits(route)
        hits = [(p, _canary_index(s, spec.canary)) for p, s in splits]
        if not any(len(i) == 1 and len(s) > 1 for (_, i), (_, s) in zip(hits, splits, strict=True)):
            tags = ", ".join(f"{k}: {v}" for k, v in sorted(spec.canary.items()))
            out.append(
                Diagnostic(
                    "E4002",
                    f"the tags {{{tags}}} pick no single target of a weighted split of "
                    f"{ref.kind} {ref.name!r} (the canary needs a split with it and another target)",
                    c.loc(("canary",)),
                    related_locs=((route.loc(), "the route"),),
                )
            )
        for path, idx in hits:
            if len(idx) > 1:
                out.append(
                    Diagnostic(
                        "E4002",
                        f"the canary tags pick {len(idx)} targets of one split of {ref.kind} {ref.name!r}",
                        c.loc(("canary",)),
                        related_locs=((route.loc(path), "this split"),),
                    )
                )
    return out


# --- the stage ------------------------------------------------------------------------------------


def canary_stage(docs: Sequence[Doc], base: dict[str, bytes], build: BuildMesh) -> CanaryStage:
    """Build every step weight of every canary (call only when the compile has no error)."""
    stage = CanaryStage()
    for c in sorted((d for d in docs if d.kind == "Canary"), key=lambda d: (d.mesh, d.name)):
        route = _route_of(c, docs)
        assert route is not None  # canary_findings said so otherwise
        spec: CanarySpec = c.spec
        splits: list[tuple[tuple[str | int, ...], Split, int]] = []
        for p, s in _splits(route):
            idx = _canary_index(s, spec.canary)
            if len(idx) == 1 and len(s) > 1:
                splits.append((p, s, idx[0]))
        first_path, first, at = splits[0]
        total = sum(w for w, _ in first) or 1
        git_weight = round(100 * first[at][0] / total)
        mesh_docs = [d for d in docs if d.mesh == c.mesh]
        weights_needed = sorted({s.set_weight for s in spec.steps if s.set_weight is not None})
        overlays: dict[str, dict[str, str]] = {}
        shown: dict[str, list[dict[str, Any]]] = {}
        edits: dict[str, list[list[Any]]] = {}
        for w in weights_needed:
            new = {p: reweigh([x for x, _ in s], i, w) for p, s, i in splits}
            changed = _with_weights(route, new)
            built = build(c.mesh, route, changed, [changed if d is route else d for d in mesh_docs])
            overlay: dict[str, str] = {}
            for key, data in built.items():
                if base.get(key) != data:
                    digest = bundle_digest(data)
                    overlay[key] = digest
                    stage.bundles[digest] = data
            overlays[str(w)] = dict(sorted(overlay.items()))
            edits[str(w)] = [[[*route.prefix, *p], ws] for p, ws in new.items()]
            shown[str(w)] = [
                {"tags": tags, "weight": nw, "canary": j == at}
                for j, ((_, tags), nw) in enumerate(zip(first, new[first_path], strict=True))
            ]
        rec = _record(c, route, git_weight, first, at, overlays, shown)
        rec["source"] = {"file": route.file, "index": route.index, "edits": edits}
        stage.records[f"{c.mesh}/{c.name}"] = rec
    return stage


def _record(
    c: Doc,
    route: Doc,
    git_weight: int,
    first: Split,
    at: int,
    overlays: dict[str, dict[str, str]],
    shown: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    spec: CanarySpec = c.spec
    destination = _destination(route)
    steps: list[dict[str, Any]] = []
    for s in spec.steps:
        if s.set_weight is not None:
            steps.append({"setWeight": s.set_weight})
        elif s.pause is not None:
            steps.append({"pause": {"duration_ms": s.pause.duration} if s.pause.duration else {}})
        elif s.analysis is not None:
            steps.append({"analysis": {"runs": s.analysis.runs}})
    a = spec.analysis
    analysis = (
        {
            "interval_ms": a.interval,
            "failure_limit": a.failure_limit,
            "inconclusive_limit": a.inconclusive_limit,
            "min_requests": a.min_requests,
            "metrics": [
                {
                    "name": m.name,
                    "percentile": m.percentile,
                    "min": m.threshold_range.min,
                    "max": m.threshold_range.max,
                }
                for m in a.metrics
            ],
        }
        if a is not None
        else None
    )
    return {
        "mesh": c.mesh,
        "name": c.name,
        "route": {"kind": route.kind, "name": route.name},
        "destination": destination,
        "canary": dict(sorted(spec.canary.items())),
        "git_weight": git_weight,
        "git_split": [{"tags": tags, "weight": w, "canary": j == at} for j, (w, tags) in enumerate(first)],
        "steps": steps,
        "analysis": analysis,
        "on_success": spec.on_success,
        "overlays": overlays,
        "splits": shown,
    }


def _destination(route: Doc) -> str:
    spec = route.spec
    if route.kind == "TrafficRoute":
        for d in spec.destinations or []:
            svc = (d.match or {}).get(SERVICE_TAG)
            if svc:
                return str(svc)
        for e in spec.conf.split or []:
            svc = (e.destination or {}).get(SERVICE_TAG)
            if svc:
                return str(svc)
        return ""
    for to in spec.to or []:
        if to.target_ref.name:
            return str(to.target_ref.name)
    return ""


# --- text (plan, ``meshc canary status``) ---------------------------------------------------------


def split_text(split: list[dict[str, Any]]) -> str:
    """``version=v1 50% / version=v2 50% (canary)``."""
    return " / ".join(
        f"{','.join(f'{k}={v}' for k, v in s['tags'].items()) or '*'} {s['weight']}%"
        + (" (canary)" if s.get("canary") else "")
        for s in split
    )


def step_text(s: dict[str, Any]) -> str:
    if "setWeight" in s:
        return f"setWeight {s['setWeight']}"
    if "pause" in s:
        ms = s["pause"].get("duration_ms")
        return f"pause {ms / 1000:g}s" if ms else "pause (until promoted)"
    return f"analysis x{s['analysis']['runs']}"


def plan_lines(key: str, rec: dict[str, Any]) -> list[str]:
    """What ``meshc plan`` shows of a Canary: each step's effective weights and what it changes."""
    route = f"{rec['route']['kind']} {rec['route']['name']} -> {rec['destination']}"
    out = [f"Canary {key} ({route}); in Git: {split_text(rec['git_split'])}"]
    for i, s in enumerate(rec["steps"]):
        line = f"  {i + 1}. {step_text(s)}"
        if "setWeight" in s:
            w = str(s["setWeight"])
            changes = ", ".join(f"{k} ({d[:4]}…)" for k, d in rec["overlays"][w].items()) or "no bundle"
            line += f": {split_text(rec['splits'][w])}; changes {changes}"
        out.append(line)
    end = "keeps the last weight" if rec["on_success"] == "promote" else "returns to the weights in Git"
    out.append(f"  then: {end}; on failed analysis: back to the weights in Git")
    return out
