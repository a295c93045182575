"""Per-endpoint runtime state: outlier ejection, active health checks, in-flight counts (sans-io).

A ``Host`` outlives bundle and endpoint reloads: the registry hands out the same object for the
same address, so an ejection or a failing health check survives a swap. Every state change bumps
``HostRegistry.version`` so that cached "available host" lists know when to recompute.
"""

from __future__ import annotations

from collections.abc import Mapping

from runtime.bundle import CircuitBreakerConf, HealthCheckConf

__all__ = ["MAX_EJECTION_MS", "Host", "HostRegistry", "Outcome"]

MAX_EJECTION_MS = 300_000
"""Envoy's ``max_ejection_time`` default: base * n is capped here (or at the base when larger)."""


class Outcome:
    """How an upstream attempt ended, as the outlier detector classifies it."""

    OK = 0
    HTTP_5XX = 1  # a 5xx other than a gateway error
    GATEWAY = 2  # 502, 503, 504 from the upstream
    CONNECT_FAILURE = 3  # local origin: refused, reset before headers
    TIMEOUT = 4  # local origin: no headers in time


class Host:
    """One endpoint address and everything the data plane learned about it."""

    __slots__ = (
        "active",
        "address",
        "consecutive_5xx",
        "consecutive_gateway",
        "consecutive_local",
        "cp_healthy",
        "ejected_until",
        "ejections",
        "hc_fail_streak",
        "hc_healthy",
        "hc_ok_streak",
        "host",
        "port",
        "registry",
        "tags",
    )

    def __init__(self, registry: HostRegistry, address: str) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"endpoint address {address!r} is not host:port")
        self.registry = registry
        self.address = address
        self.host = host.strip("[]")
        self.port = int(port)
        self.tags: Mapping[str, str] = {}
        self.cp_healthy = True
        self.hc_healthy = True
        self.hc_ok_streak = 0
        self.hc_fail_streak = 0
        self.active = 0
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0
        self.ejected_until = 0.0
        self.ejections = 0

    def __repr__(self) -> str:
        return f"Host({self.address})"

    def is_ejected(self, now: float) -> bool:
        return self.ejected_until > now

    def usable(self, now: float) -> bool:
        return self.cp_healthy and self.hc_healthy and self.ejected_until <= now

    # -- outlier detection ------------------------------------------------------------------

    def record(self, outcome: int, cb: CircuitBreakerConf | None) -> bool:
        """Count one attempt's outcome; True when a detector's consecutive threshold is reached."""
        if outcome == Outcome.OK:
            self.consecutive_5xx = self.consecutive_gateway = self.consecutive_local = 0
            return False
        if cb is None:
            return False
        det = cb.detectors
        local = outcome in (Outcome.CONNECT_FAILURE, Outcome.TIMEOUT)
        if local and cb.split_external_and_local_errors:
            self.consecutive_local += 1
            return det.local_errors is not None and self.consecutive_local >= det.local_errors.consecutive
        # Envoy counts local-origin failures as 503 (gateway errors) unless they are split out.
        self.consecutive_5xx += 1
        tripped = det.total_errors is not None and self.consecutive_5xx >= det.total_errors.consecutive
        if outcome != Outcome.HTTP_5XX:
            self.consecutive_gateway += 1
            if det.gateway_errors is not None and self.consecutive_gateway >= det.gateway_errors.consecutive:
                tripped = True
        return tripped

    def eject(self, now: float, cb: CircuitBreakerConf) -> None:
        self.ejections += 1
        base = cb.base_ejection_time_ms
        ms = min(base * self.ejections, max(base, MAX_EJECTION_MS))
        self.ejected_until = now + ms / 1000.0
        self.consecutive_5xx = self.consecutive_gateway = self.consecutive_local = 0
        self.registry.bump()

    # -- active health checks ---------------------------------------------------------------

    def health_result(self, ok: bool, conf: HealthCheckConf) -> bool:
        """Feed one active check result; True when the host's health flag changed."""
        if ok:
            self.hc_fail_streak = 0
            self.hc_ok_streak += 1
            if self.ejected_until:
                # A passing active check un-ejects the host, as in Envoy.
                self.ejected_until = 0.0
                self.registry.bump()
            if not self.hc_healthy and self.hc_ok_streak >= conf.healthy_threshold:
                self.hc_healthy = True
                self.registry.bump()
                return True
            return False
        self.hc_ok_streak = 0
        self.hc_fail_streak += 1
        if self.hc_healthy and self.hc_fail_streak >= conf.unhealthy_threshold:
            self.hc_healthy = False
            self.registry.bump()
            return True
        return False


class HostRegistry:
    """Address -> Host, shared by every snapshot the engine builds."""

    __slots__ = ("hosts", "version")

    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}
        self.version = 0

    def bump(self) -> None:
        self.version += 1

    def get(self, address: str) -> Host:
        host = self.hosts.get(address)
        if host is None:
            host = self.hosts[address] = Host(self, address)
        return host

    def retain(self, addresses: set[str]) -> None:
        """Forget hosts that no endpoint set names any more."""
        for address in [a for a in self.hosts if a not in addresses]:
            del self.hosts[address]
        self.bump()
