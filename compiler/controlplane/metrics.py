"""The control plane's Prometheus metrics (served at ``/metrics``).

``meshc_controlplane_propagation_seconds`` is the time from a policy change being seen (the
watcher's event, or the new commit) to a data plane's ACK of the bundle or endpoint set it
produced, with Istio's ``pilot_proxy_convergence_time`` buckets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "ISTIO_BUCKETS", "ControlPlaneMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ISTIO_BUCKETS = (0.1, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0)


class ControlPlaneMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.propagation = Histogram(
            "meshc_controlplane_propagation_seconds",
            "Time from a policy change seen to a data plane's ACK of what it produced.",
            ["slot"],
            buckets=ISTIO_BUCKETS,
            registry=r,
        )
        self.pushes = Counter(
            "meshc_controlplane_pushes",
            "Pushes to data planes by slot (endpoints, mesh, service) and result (ack, nack, error).",
            ["slot", "result"],
            registry=r,
        )
        self.push_bytes = Counter(
            "meshc_controlplane_push_bytes",
            "Bytes of push bodies sent to data planes by slot (endpoints, mesh, service), and of "
            "pieces fetched on demand (fetched).",
            ["slot"],
            registry=r,
        )
        self.compiles = Counter(
            "meshc_controlplane_compiles", "Compiles by result (ok, failed).", ["result"], registry=r
        )
        self.gc_pauses = Histogram(
            "meshc_controlplane_gc_pause_seconds",
            "Time the cyclic garbage collector held the control plane, by generation (1, 2; "
            "generation 0 passes are not timed).",
            ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.compile_seconds = Histogram(
            "meshc_controlplane_compile_seconds",
            "Time to read and compile the policies.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.dataplanes = Gauge(
            "meshc_controlplane_dataplanes", "Registered data planes by state.", ["state"], registry=r
        )
        self.sync = Gauge(
            "meshc_controlplane_dataplane_sync",
            "Registered data planes by sync status.",
            ["status"],
            registry=r,
        )
        self.release_info = Gauge(
            "meshc_controlplane_release_info", "The current release (value 1).", ["release"], registry=r
        )
        self.listener_refusals = Counter(
            "meshc_listener_refusals",
            "Connections the API listener refused, by reason (header_timeout, body_timeout, "
            "max_connections), as the data planes count theirs.",
            ["listener", "reason"],
            registry=r,
        )
        self.canary_weight = Gauge(
            "meshc_canary_weight",
            "The share of its route a Canary's subset gets now, in percent (Git's when not stepping).",
            ["canary"],
            registry=r,
        )
        self.canary_step = Gauge(
            "meshc_canary_step", "The step a Canary is at (0-based).", ["canary"], registry=r
        )
        self.canary_phase = Gauge(
            "meshc_canary_phase",
            "A Canary's phase (value 1 for the current one).",
            ["canary", "phase"],
            registry=r,
        )
        self.canary_events = Counter(
            "meshc_canary_events",
            "Canary events (weight, paused, analysis-failed, rolledback, succeeded, ...).",
            ["canary", "event"],
            registry=r,
        )
        self._release: str | None = None

    def set_canaries(self, view: list[dict[str, object]]) -> None:
        """Gauges from the canaries' view (phases reset each time: one series set to 1 each)."""
        self.canary_phase.clear()
        self.canary_weight.clear()
        self.canary_step.clear()
        for c in view:
            key = str(c["key"])
            self.canary_weight.labels(key).set(float(str(c["weight"])))
            self.canary_step.labels(key).set(float(str(c.get("step") or 0)))
            if c.get("phase"):
                self.canary_phase.labels(key, str(c["phase"])).set(1)

    def set_release(self, release_id: str) -> None:
        if self._release == release_id:
            return
        if self._release is not None:
            self.release_info.remove(self._release)
        self.release_info.labels(release_id).set(1)
        self._release = release_id

    def render(self) -> bytes:
        return generate_latest(self.registry)
