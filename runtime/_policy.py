"""Per-request policy state machines: retries, local rate limit, fault injection (sans-io)."""

from __future__ import annotations

import random

from runtime._hosts import Outcome
from runtime.bundle import FaultInjectionConf, HttpRetry, RateLimitConf

__all__ = [
    "IDEMPOTENT_METHODS",
    "MAX_RETRY_BODY",
    "Fault",
    "RetryPolicy",
    "TokenBucket",
]

MAX_RETRY_BODY = 64 * 1024
"""A request body larger than this is streamed and never retried (Linkerd's rule)."""

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

_DEFAULT_RETRY_ON = frozenset({"gateway_error", "connect_failure", "refused_stream"})
"""Kuma's legacy Retry default when ``retryOn`` is empty."""

_GRPC_RETRY_ON = {
    1: "cancelled",
    4: "deadline_exceeded",
    8: "resource_exhausted",
    13: "internal",
    14: "unavailable",
}

_ALIASES = {
    "5xx": "all_5xx",
    "gatewayerror": "gateway_error",
    "connectfailure": "connect_failure",
    "retriable4xx": "retriable_4xx",
    "refusedstream": "refused_stream",
    "envoyratelimited": "envoy_ratelimited",
}


class RetryPolicy:
    """A compiled ``HttpRetry``: which attempts may be retried and how long to back off."""

    __slots__ = (
        "_codes",
        "_methods",
        "_on",
        "base_s",
        "max_s",
        "num_retries",
        "per_try_timeout_s",
    )

    def __init__(self, conf: HttpRetry) -> None:
        self.num_retries = max(0, conf.num_retries)
        self.per_try_timeout_s = conf.per_try_timeout_ms / 1000.0 if conf.per_try_timeout_ms > 0 else None
        base = conf.back_off.base_interval_ms if conf.back_off else 25
        cap = conf.back_off.max_interval_ms if conf.back_off and conf.back_off.max_interval_ms else base * 10
        self.base_s = base / 1000.0
        self.max_s = max(base, cap) / 1000.0
        on: set[str] = set()
        codes = set(conf.retriable_status_codes)
        for raw in conf.retry_on:
            value = raw.strip().lower().replace("-", "_")
            value = _ALIASES.get(value.replace("_", ""), value)
            if value.isdigit():
                codes.add(int(value))
            else:
                on.add(value)
        if not on:
            on = set(_DEFAULT_RETRY_ON)
        if codes:
            on.add("retriable_status_codes")
        self._on = frozenset(on)
        self._codes = frozenset(codes)
        self._methods = frozenset(m.upper() for m in conf.retriable_methods) or None

    def method_allowed(self, method: str) -> bool:
        if self._methods is not None:
            return method in self._methods
        return method in IDEMPOTENT_METHODS

    def retriable_status(self, status: int) -> bool:
        on = self._on
        if status >= 500 and "all_5xx" in on:
            return True
        if status in (502, 503, 504) and "gateway_error" in on:
            return True
        if status == 409 and "retriable_4xx" in on:
            return True
        if status == 429 and "envoy_ratelimited" in on:
            return True
        return status in self._codes and "retriable_status_codes" in on

    def retriable_grpc(self, code: int) -> bool:
        """A gRPC status (from a response's trailers) that ``retryOn`` names (Envoy's
        ``retry_grpc_on``: cancelled, deadline-exceeded, internal, resource-exhausted, unavailable)."""
        name = _GRPC_RETRY_ON.get(code)
        return name is not None and name in self._on

    def retriable_failure(self, outcome: int) -> bool:
        """A failure before response headers: connect failure, reset, per-try timeout."""
        on = self._on
        if "all_5xx" in on or "gateway_error" in on:
            return True  # Envoy maps these to 503/504
        if outcome == Outcome.CONNECT_FAILURE:
            return "connect_failure" in on or "reset" in on or "refused_stream" in on
        return "reset" in on

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """Envoy's fully jittered exponential backoff for the ``retry``-th retry (1-based)."""
        ceiling = min(self.base_s * (2 ** min(retry - 1, 16)), self.max_s)
        return float(rng.random() * ceiling)


class TokenBucket:
    """``requests`` tokens per ``interval``; starts full."""

    __slots__ = ("capacity", "last", "rate", "tokens")

    def __init__(self, conf: RateLimitConf, now: float) -> None:
        self.capacity = float(max(1, conf.requests))
        self.rate = self.capacity / max(conf.interval_ms / 1000.0, 1e-3)
        self.tokens = self.capacity
        self.last = now

    def take(self, now: float) -> bool:
        elapsed = now - self.last
        if elapsed > 0:
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Fault:
    """A compiled FaultInjection: each effect is drawn independently by its percentage."""

    __slots__ = ("_abort", "_abort_pct", "_bps", "_bw_pct", "_delay_pct", "_delay_s")

    def __init__(self, conf: FaultInjectionConf) -> None:
        self._delay_pct = conf.delay.percentage if conf.delay else 0.0
        self._delay_s = conf.delay.value_ms / 1000.0 if conf.delay else 0.0
        self._abort_pct = conf.abort.percentage if conf.abort else 0.0
        self._abort = conf.abort.http_status if conf.abort else 0
        self._bw_pct = conf.response_bandwidth.percentage if conf.response_bandwidth else 0.0
        self._bps = conf.response_bandwidth.limit_bps if conf.response_bandwidth else 0

    def decide(self, rng: random.Random) -> tuple[float, int, int]:
        """(delay seconds, abort status, response bandwidth in bits/s); zero means none."""
        delay = self._delay_s if self._delay_pct > 0 and rng.random() * 100.0 < self._delay_pct else 0.0
        abort = self._abort if self._abort_pct > 0 and rng.random() * 100.0 < self._abort_pct else 0
        bps = self._bps if self._bw_pct > 0 and rng.random() * 100.0 < self._bw_pct else 0
        return delay, abort, bps
