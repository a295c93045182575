"""The traffic split per route: configured (from the current release's bundles) and observed
(from the data planes' ``/metrics``, scraped on demand and cached for a couple of seconds).

The configured split is what a source's bundle says for a destination: the unconditional route
rule of a service bundle's outbound entry (a specific TrafficRoute), else the mesh bundle's
default for any source. The observed split counts ``meshc_requests_total`` by destination subset
between two scrapes of the current release, over at most the last ``window_s`` seconds: nothing is
shown until two scrapes exist since the release began, so an edit's new split is never blended with
the old one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from compiler.controlplane.canary_analysis import Sampler
from compiler.controlplane.registry import Registry
from compiler.controlplane.release import Release

__all__ = ["TrafficView", "configured_routes"]

Key = tuple[str, str, str, str]
"""(direction, source service, destination service, destination subset)"""


def _subset(tags: dict[str, Any]) -> str:
    tags = {k: v for k, v in tags.items() if k != "kuma.io/service"}
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items())) or "*"


def _splits(split: list[dict[str, Any]]) -> list[dict[str, Any]]:
    total = sum(int(s.get("weight", 0)) for s in split) or 1
    return [
        {
            "service": s.get("service"),
            "subset": _subset(s.get("tags") or {}),
            "weight": int(s.get("weight", 0)),
            "share": int(s.get("weight", 0)) / total,
        }
        for s in split
    ]


def _unconditional_route(rules: list[dict[str, Any]]) -> dict[str, Any] | None:
    for r in rules:
        if not r.get("when") and not r.get("peer"):
            conf: dict[str, Any] = r.get("conf") or {}
            return conf
    return rules[-1].get("conf") if rules else None


def configured_routes(rel: Release | None) -> list[dict[str, Any]]:
    """Routes as the release configures them: source, destination, kind, weighted splits."""
    if rel is None:
        return []
    out: list[dict[str, Any]] = []
    for key, data in sorted(rel.bundles.items()):
        try:
            doc = json.loads(data)
        except ValueError:
            continue
        mesh = doc.get("mesh", "")
        if doc.get("type") == "mesh":
            for dest, d in sorted((doc.get("destinations") or {}).items()):
                conf = _unconditional_route(d.get("route") or [])
                if conf is not None:
                    out.append(
                        {
                            "mesh": mesh,
                            "source": "*",
                            "destination": dest,
                            "kind": "default",
                            "split": _splits(conf.get("split") or []),
                            "http_rules": len(conf.get("http") or []),
                            "bundle": key,
                        }
                    )
            continue
        svc = doc.get("service", "")
        for dest, d in sorted((doc.get("outbound") or {}).items()):
            conf = _unconditional_route(d.get("route") or [])
            if conf is not None:
                out.append(
                    {
                        "mesh": mesh,
                        "source": svc,
                        "destination": dest,
                        "kind": "route",
                        "split": _splits(conf.get("split") or []),
                        "http_rules": len(conf.get("http") or []),
                        "bundle": key,
                    }
                )
        gw = doc.get("gateway")
        if gw:
            for lst in gw.get("listeners") or []:
                for rule in lst.get("rules") or []:
                    path = next(
                        (m["path"]["value"] for m in rule.get("matches") or [] if m.get("path")),
                        "/",
                    )
                    backends = rule.get("backends") or []
                    out.append(
                        {
                            "mesh": mesh,
                            "source": svc,
                            "destination": ", ".join(sorted({str(b.get("service")) for b in backends})),
                            "kind": "gateway",
                            "listener": f"{lst.get('protocol', 'HTTP')}:{lst.get('port')}",
                            "path": path,
                            "split": _splits(backends),
                            "http_rules": 0,
                            "bundle": key,
                        }
                    )
    return out


class TrafficView:
    """The observed split, from the data planes' ``/metrics`` as ``sampler`` scrapes them: the
    canary analysis's ``Sampler``, so the control plane holds one scraper (one HTTP session)."""

    def __init__(
        self, registry: Registry, sampler: Sampler | None = None, window_s: float = 30.0, cache_s: float = 2.0
    ) -> None:
        self.registry = registry
        self.window_s = window_s
        self.cache_s = cache_s
        self._samples: deque[tuple[float, dict[Key, float]]] = deque()
        self._per_instance: dict[str, dict[Key, float]] = {}
        self._scraped_at = 0.0
        self._lock = asyncio.Lock()
        self._own = sampler is None
        self._sampler = sampler if sampler is not None else Sampler(timeout_s=1.5)

    async def close(self) -> None:
        if self._own:
            await self._sampler.close()

    @staticmethod
    def _counts(text: str) -> dict[Key, float] | None:
        """Successful outbound and gateway requests per key in one data plane's metrics text;
        None when it does not parse (that data plane keeps its last counts)."""
        counts: dict[Key, float] = {}
        try:
            for fam in text_string_to_metric_families(text):
                if fam.name != "meshc_requests":
                    continue
                for s in fam.samples:
                    if not s.name.endswith("_total"):
                        continue
                    lab = s.labels
                    if lab.get("direction") not in ("outbound", "gateway"):
                        continue
                    code = lab.get("response_code", "")
                    if not code.startswith("2"):
                        continue
                    k = (
                        lab.get("direction", ""),
                        lab.get("source_service", ""),
                        lab.get("destination_service", ""),
                        lab.get("destination_subset", ""),
                    )
                    counts[k] = counts.get(k, 0.0) + s.value
        except ValueError:
            return None
        return counts

    async def scrape(self) -> None:
        async with self._lock:
            now = time.time()
            if now - self._scraped_at < self.cache_s:
                return
            online = [dp for dp in self.registry.dataplanes.values() if dp.online]
            texts = await self._sampler.texts({dp.instance: dp.admin_address for dp in online})
            for instance, text in texts.items():
                counts = self._counts(text)
                if counts is not None:
                    self._per_instance[instance] = counts
            known = {dp.instance for dp in online}
            for gone in set(self._per_instance) - known:
                del self._per_instance[gone]
            total: dict[Key, float] = {}
            for counts in self._per_instance.values():
                for k, v in counts.items():
                    total[k] = total.get(k, 0.0) + v
            self._samples.append((now, total))
            while len(self._samples) > 2 and now - self._samples[1][0] > self.window_s:
                self._samples.popleft()
            self._scraped_at = time.time()

    def observed(self, since: float = 0.0) -> tuple[dict[Key, float], float, float | None]:
        """Request counts per key between the first sample taken at or after ``since`` (the
        current release's start: traffic of an older release is never mixed in) and the last one,
        within the window; with the length counted and when it starts (None: not enough samples
        since ``since`` yet, so nothing is shown rather than cumulative counts)."""
        usable = [(t, c) for t, c in self._samples if t >= since]
        if len(usable) < 2:
            return {}, 0.0, None
        (t0, first), (t1, last) = usable[0], usable[-1]
        delta = {k: v - first.get(k, 0.0) for k, v in last.items()}
        return {k: v for k, v in delta.items() if v > 0}, t1 - t0, t0

    def annotate(self, routes: list[dict[str, Any]], since: float = 0.0) -> dict[str, Any]:
        """Add ``observed`` shares to each configured route, counted since ``since``.

        A default route (any source, no TrafficRoute) that sends everything to all instances of
        one service says nothing a reader needs and never counts gateway traffic, so it is
        left out unless traffic was seen on it."""
        counts, window, start = self.observed(since)
        specific = {(r["source"], r["destination"]) for r in routes if r["kind"] == "route"}
        for r in routes:
            by_subset: dict[str, float] = {}
            for (direction, src, dst, subset), n in counts.items():
                if r["kind"] == "gateway":
                    ok = direction == "gateway" and src == r["source"] and dst in r["destination"].split(", ")
                    label = dst
                elif r["kind"] == "route":
                    ok = direction == "outbound" and src == r["source"] and dst == r["destination"]
                    label = subset
                else:
                    ok = direction == "outbound" and dst == r["destination"] and (src, dst) not in specific
                    label = subset
                if ok:
                    by_subset[label or "*"] = by_subset.get(label or "*", 0.0) + n
            total = sum(by_subset.values())
            r["observed"] = {
                "requests": int(total),
                "subsets": {k: {"requests": int(v), "share": v / total} for k, v in sorted(by_subset.items())}
                if total
                else {},
            }
        shown = [r for r in routes if not _trivial_default(r)]
        return {
            "window_s": round(window, 1),
            "since": start,
            "routes": shown,
        }


def _trivial_default(r: dict[str, Any]) -> bool:
    split = r["split"]
    return (
        r["kind"] == "default"
        and not r["http_rules"]
        and len(split) <= 1
        and all(s["subset"] == "*" for s in split)
        and not r["observed"]["requests"]
    )
