"""Load balancers and the weighted split wheel (sans-io; randomness is injected).

A balancer picks among a target's *available* hosts (see ``Target.available``); each keeps only
its own cursor, so it allocates nothing per request.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from runtime._hosts import Host
from runtime.bundle import LoadBalancer

__all__ = [
    "Balancer",
    "LeastRequest",
    "RandomPick",
    "RingHash",
    "RoundRobin",
    "Wheel",
    "make_balancer",
]

T = TypeVar("T")


class Balancer(Protocol):
    def pick(self, hosts: Sequence[Host], key: str | None, rng: random.Random) -> Host: ...


class RoundRobin:
    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, hosts: Sequence[Host], key: str | None, rng: random.Random) -> Host:
        i = self._next
        self._next = i + 1
        return hosts[i % len(hosts)]


class RandomPick:
    __slots__ = ()

    def pick(self, hosts: Sequence[Host], key: str | None, rng: random.Random) -> Host:
        return hosts[rng.randrange(len(hosts))]


class LeastRequest:
    """Envoy's power-of-N-choices: sample ``choice_count`` hosts, keep the least busy."""

    __slots__ = ("_choices",)

    def __init__(self, choice_count: int) -> None:
        self._choices = max(2, choice_count)

    def pick(self, hosts: Sequence[Host], key: str | None, rng: random.Random) -> Host:
        n = len(hosts)
        best = hosts[rng.randrange(n)]
        if n == 1:
            return best
        for _ in range(self._choices - 1):
            other = hosts[rng.randrange(n)]
            if other.active < best.active:
                best = other
        return best


def _hash64(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


class RingHash:
    """Consistent hashing over all of the target's hosts; an unavailable host passes to the next.

    The key is the request's hash key (``x-meshc-hash-key`` header, else the path); without one
    a host is picked at random, as Envoy does when no hash policy yields a value.
    """

    __slots__ = ("_hosts", "_points", "_ring_hosts", "_size")

    def __init__(self, hosts: Sequence[Host], min_ring_size: int, max_ring_size: int) -> None:
        self._hosts = tuple(hosts)
        self._size = max(1, min(max(min_ring_size, len(hosts)), max_ring_size, 65536))
        self._points: list[int] = []
        self._ring_hosts: list[Host] = []
        self._build()

    def _build(self) -> None:
        if not self._hosts:
            return
        per_host = max(1, self._size // len(self._hosts))
        entries = sorted(
            (_hash64(f"{h.address}_{i}"), n) for n, h in enumerate(self._hosts) for i in range(per_host)
        )
        self._points = [p for p, _ in entries]
        self._ring_hosts = [self._hosts[n] for _, n in entries]

    def pick(self, hosts: Sequence[Host], key: str | None, rng: random.Random) -> Host:
        if key is None or not self._points:
            return hosts[rng.randrange(len(hosts))]
        start = bisect.bisect_left(self._points, _hash64(key))
        n = len(self._points)
        if len(hosts) == len(self._hosts):
            return self._ring_hosts[start % n]
        for i in range(n):
            host = self._ring_hosts[(start + i) % n]
            if host in hosts:
                return host
        return hosts[0]


def make_balancer(lb: LoadBalancer, hosts: Sequence[Host]) -> Balancer:
    if lb.type == "least_request":
        return LeastRequest(lb.choice_count)
    if lb.type == "random":
        return RandomPick()
    if lb.type in ("ring_hash", "maglev"):
        return RingHash(hosts, lb.min_ring_size, lb.max_ring_size)
    return RoundRobin()


class Wheel(Generic[T]):
    """Weighted choice among split targets; weight-0 targets never receive traffic."""

    __slots__ = ("_cumulative", "_items", "_total")

    def __init__(self, weighted: Sequence[tuple[int, T]]) -> None:
        kept = [(w, item) for w, item in weighted if w > 0]
        self._items = tuple(item for _, item in kept)
        self._cumulative = list(itertools.accumulate(w for w, _ in kept))
        self._total = self._cumulative[-1] if kept else 0

    @property
    def items(self) -> tuple[T, ...]:
        return self._items

    def choose(self, rng: random.Random) -> T | None:
        if self._total == 0:
            return None
        if len(self._items) == 1:
            return self._items[0]
        return self._items[bisect.bisect_right(self._cumulative, rng.random() * self._total)]
