"""A Canary's analysis: the canary subset's requests, read from the sidecars' own ``/metrics``.

Counts are cumulative per data plane (``meshc_requests_total`` and the
``meshc_request_duration_seconds`` histogram, outbound and gateway sides, for the canary's
destination and subset); a run looks at the difference between two samples, per data plane, so a
sidecar that restarted (its counters back at zero) adds what it counted since, never a negative.
A run with fewer than ``min_requests`` requests is inconclusive: low traffic is not a failure
(Flagger's "no values found", fluxcd/flagger#883).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Counts", "Sampler", "Verdict", "judge", "percentile", "subtract"]


@dataclass
class Counts:
    total: float = 0.0
    errors: float = 0.0
    """Answers with a 5xx status (what a broken canary gives; 4xx is the caller's doing)."""
    buckets: dict[float, float] = field(default_factory=dict)
    """Upper bound in seconds -> cumulative count, as the histogram has it."""

    def add(self, other: Counts) -> None:
        self.total += other.total
        self.errors += other.errors
        for le, n in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + n


def parse(text: str, destination: str, subset: str) -> Counts:
    """The canary's counts in one data plane's metrics text."""
    out = Counts()
    for fam in text_string_to_metric_families(text):
        if fam.name not in ("meshc_requests", "meshc_request_duration_seconds"):
            continue
        for s in fam.samples:
            lab = s.labels
            if lab.get("direction") not in ("outbound", "gateway"):
                continue
            if lab.get("destination_service") != destination or lab.get("destination_subset") != subset:
                continue
            if fam.name == "meshc_requests" and s.name.endswith("_total"):
                out.total += s.value
                if lab.get("response_code", "").startswith("5"):
                    out.errors += s.value
            elif s.name.endswith("_bucket"):
                le = float(lab.get("le", "inf"))
                out.buckets[le] = out.buckets.get(le, 0.0) + s.value
    return out


def subtract(now: Counts, before: Counts | None) -> Counts:
    """What happened between two samples of one data plane (all of ``now`` if it restarted)."""
    if before is None or now.total < before.total:
        return Counts(now.total, now.errors, dict(now.buckets))
    return Counts(
        now.total - before.total,
        max(0.0, now.errors - before.errors),
        {le: max(0.0, n - before.buckets.get(le, 0.0)) for le, n in now.buckets.items()},
    )


def percentile(buckets: dict[float, float], p: float) -> float | None:
    """The p-th percentile in milliseconds, interpolated within its bucket (as PromQL's
    ``histogram_quantile``); None without observations."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = total * p / 100.0
    lower, below = 0.0, 0.0
    for le in bounds:
        n = buckets[le]
        if n >= rank:
            if math.isinf(le):
                return lower * 1000.0
            share = (rank - below) / (n - below) if n > below else 1.0
            return (lower + (le - lower) * share) * 1000.0
        lower, below = le, n
    return lower * 1000.0


@dataclass(frozen=True)
class Verdict:
    result: str
    """``succeeded``, ``failed`` or ``inconclusive``."""
    requests: int
    measured: dict[str, float | None]
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "requests": self.requests,
            "measured": self.measured,
            "reason": self.reason,
        }


def judge(analysis: dict[str, Any], run: Counts) -> Verdict:
    n = int(run.total)
    if n < int(analysis["min_requests"]):
        return Verdict(
            "inconclusive", n, {}, f"{n} request(s) to the canary, fewer than {analysis['min_requests']}"
        )
    measured: dict[str, float | None] = {}
    bad: list[str] = []
    for m in analysis["metrics"]:
        if m["name"] == "request-success-rate":
            value: float | None = 100.0 * (run.total - run.errors) / run.total
            label = "request-success-rate"
            unit = "%"
        else:
            value = percentile(run.buckets, float(m["percentile"]))
            label = f"request-duration p{m['percentile']:g}"
            unit = " ms"
        measured[label] = None if value is None else round(value, 3)
        if value is None:
            bad.append(f"{label}: no observations")
        elif m.get("min") is not None and value < float(m["min"]):
            bad.append(f"{label} {value:.2f}{unit} < {m['min']:g}{unit}")
        elif m.get("max") is not None and value > float(m["max"]):
            bad.append(f"{label} {value:.2f}{unit} > {m['max']:g}{unit}")
    if bad:
        return Verdict("failed", n, measured, "; ".join(bad))
    return Verdict("succeeded", n, measured, "within range")


class Sampler:
    """Scrapes the online data planes' ``/metrics`` (bounded time each; an unreachable one adds
    nothing to this sample and keeps its last counts)."""

    def __init__(self, timeout_s: float = 2.0) -> None:
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def texts(self, admins: dict[str, str]) -> dict[str, str]:
        """Instance -> metrics text, for the data planes that answered."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s), trust_env=False
            )
        session = self._session

        async def one(instance: str, admin: str) -> tuple[str, str | None]:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                async with session.get(f"http://{admin}/metrics") as resp:
                    if resp.status == 200:
                        return instance, await resp.text()
            return instance, None

        got = await asyncio.gather(*(one(i, a) for i, a in admins.items()))
        return {i: t for i, t in got if t is not None}
