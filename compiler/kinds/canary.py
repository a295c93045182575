"""Canary (meshc's own kind, with Flagger's and Argo Rollouts' nouns): a progressive rollout of one
subset of a route's split, with metric analysis and rollback, entirely inside Git.

It drives a TrafficRoute or a MeshHTTPRoute (``targetRef``): ``canary`` names the tags of the split
target whose weight the ``steps`` move (out of 100; the other targets share the rest in the
proportion Git gives them). The compiler pre-builds and validates the bundles of every weight the
steps reach, and ``meshc plan`` shows them; the control plane only moves a pointer between those
bundles. Git is never changed behind the user's back: a rollback returns to the weights in Git,
and a promotion can be finished as a commit on a branch (``controlplane --promote-commit``).

Steps run in order:

* ``setWeight: N`` sends N% to the canary, at once;
* ``pause: {duration: 30s}`` waits that long; ``pause: {}`` waits for ``meshc canary promote``;
* ``analysis: {runs: 2}`` waits for that many successful analysis runs at the current weight.

While the canary gets traffic, ``analysis`` runs every ``interval`` on the sidecars' own metrics
(requests to the canary subset since the last run): a run with fewer than ``minRequests``
requests is *inconclusive*, not failed (it holds the rollout; past ``inconclusiveLimit`` runs in
a row the canary waits for a human); a run whose success rate (non-5xx share, in percent) or
latency percentile (ms) falls outside its ``thresholdRange`` fails, and at ``failureLimit`` failed
runs the canary is rolled back to the weights in Git and says why. At the end, ``onSuccess:
promote`` keeps the last weight (``revert`` returns to Git's).

Valid::

    apiVersion: meshc/v1alpha1
    kind: Canary
    mesh: default
    metadata: {name: benigno-v2}
    spec:
      targetRef: {kind: TrafficRoute, name: route-1}
      canary: {version: v2}
      steps:
        - setWeight: 20
        - analysis: {runs: 2}
        - setWeight: 50
        - pause: {duration: 1m}
        - setWeight: 100
      analysis:
        interval: 10s
        failureLimit: 2
        minRequests: 20
        metrics:
          - {name: request-success-rate, thresholdRange: {min: 99}}
          - {name: request-duration, percentile: 99, thresholdRange: {max: 500}}

Invalid (a weight above 100)::

    steps: [{setWeight: 120}]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pydantic import Field

from compiler.kinds.base import Duration, Finding, KindDef, Spec, tag_findings

__all__ = ["Analysis", "CanarySpec", "Metric", "Step"]


class RouteRef(Spec):
    kind: Literal["TrafficRoute", "MeshHTTPRoute"]
    """The kind of the route whose split the canary moves."""
    name: str
    """Its name, in the canary's mesh."""


class Pause(Spec):
    duration: Duration | None = None
    """How long to wait; without it, wait for ``meshc canary promote NAME``."""


class AnalysisStep(Spec):
    runs: int = 1
    """Successful analysis runs needed at the current weight before the next step."""


class Step(Spec):
    set_weight: int | None = None
    """The canary's share of the route, in percent (0-100)."""
    pause: Pause | None = None
    analysis: AnalysisStep | None = None


class ThresholdRange(Spec):
    min: float | None = None
    max: float | None = None


class Metric(Spec):
    name: Literal["request-success-rate", "request-duration"]
    """``request-success-rate``: non-5xx share of the canary's requests, in percent;
    ``request-duration``: a latency percentile of them, in milliseconds."""
    threshold_range: ThresholdRange
    percentile: float = 99.0
    """For ``request-duration``: which percentile (0 < p < 100)."""


class Analysis(Spec):
    interval: Duration = 10_000
    """Time between two analysis runs (default 10s)."""
    failure_limit: int = 2
    """Failed runs that roll the canary back (Flagger's ``threshold``)."""
    inconclusive_limit: int = 3
    """Inconclusive runs in a row after which the canary waits for a human."""
    min_requests: int = 10
    """Fewer requests to the canary in a run than this: the run is inconclusive, not failed."""
    metrics: list[Metric] = Field(default_factory=list)


class CanarySpec(Spec):
    target_ref: RouteRef
    canary: dict[str, str]
    """Tags of the split target the steps move (``{version: v2}``)."""
    steps: list[Step]
    analysis: Analysis | None = None
    on_success: Literal["promote", "revert"] = "promote"
    """At the end: keep the last step's weight (``promote``) or return to Git's (``revert``)."""


def check(spec: CanarySpec) -> Iterator[Finding]:
    if not spec.canary:
        yield Finding(("canary",), "E1005", "the canary needs at least one tag (such as version: v2)")
    yield from tag_findings(("canary",), dict(spec.canary))
    if not spec.steps:
        yield Finding(("steps",), "E1003", "a canary needs at least one step")
    if not any(s.set_weight is not None for s in spec.steps):
        yield Finding(("steps",), "E1005", "a canary needs at least one setWeight step")
    for i, s in enumerate(spec.steps):
        parts = (("setWeight", s.set_weight), ("pause", s.pause), ("analysis", s.analysis))
        given = [k for k, v in parts if v is not None]
        if len(given) != 1:
            yield Finding(("steps", i), "E1005", "a step is exactly one of setWeight, pause or analysis")
        if s.set_weight is not None and not 0 <= s.set_weight <= 100:
            yield Finding(("steps", i, "setWeight"), "E1005", "a weight must be in the range [0, 100]")
        if s.pause is not None and s.pause.duration is not None and s.pause.duration <= 0:
            yield Finding(("steps", i, "pause", "duration"), "E1005", "a pause must be longer than 0")
        if s.analysis is not None:
            if spec.analysis is None:
                yield Finding(("steps", i, "analysis"), "E1003", "an analysis step needs spec.analysis")
            if s.analysis.runs < 1:
                yield Finding(("steps", i, "analysis", "runs"), "E1005", "runs must be at least 1")
    a = spec.analysis
    if a is not None:
        if a.interval <= 0:
            yield Finding(("analysis", "interval"), "E1005", "the interval must be longer than 0")
        for field, value in (
            ("failureLimit", a.failure_limit),
            ("inconclusiveLimit", a.inconclusive_limit),
            ("minRequests", a.min_requests),
        ):
            if value < 1:
                yield Finding(("analysis", field), "E1005", f"{field} must be at least 1")
        if not a.metrics:
            yield Finding(("analysis", "metrics"), "E1003", "an analysis needs at least one metric")
        for i, m in enumerate(a.metrics):
            r = m.threshold_range
            if r.min is None and r.max is None:
                yield Finding(("analysis", "metrics", i, "thresholdRange"), "E1003", "set min, max or both")
            if r.min is not None and r.max is not None and r.min > r.max:
                yield Finding(("analysis", "metrics", i, "thresholdRange"), "E1005", "min exceeds max")
            if not 0 < m.percentile < 100:
                yield Finding(
                    ("analysis", "metrics", i, "percentile"), "E1005", "a percentile must be in (0, 100)"
                )


KIND = KindDef("Canary", "meshc/v1alpha1", CanarySpec, check, "none", __doc__ or "")
