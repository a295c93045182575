"""Per-service endpoint sets on the data plane (DESIGN §5): applying a push, fetching on demand.

A data plane that registers with ``endpoint_deltas`` gets its endpoints per service
(``protocol.EndpointSet``): a sidecar only the services it reaches (``scoped``), and after the
first push only what changed over the set it runs (``base``, ``removed``). ``apply`` makes the
new whole set from the running one and the push, checks it against the push's ``digest`` (signed
with the body) and refuses, changing nothing, whatever does not add up. A push without these
fields is a whole set as older control planes send it, taken as it is.

A destination whose split targets a scoped set does not hold is *lacking* (``Engine.build``
marks its table): the request asks the control plane for them (``EndpointFetch``, on the same
on-demand path as mesh pieces, bounded by ``decide.FETCH_TIMEOUT_S``) and is decided again.
What it asked for (``EndpointFetch.on_demand``, kept in the state dir) is declared in every
registration and heartbeat, so a control plane that never saw the request (another replica, a
restart) keeps those services in its scope instead of pushing a set without them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping

from runtime.decide import FETCH_TIMEOUT_S
from runtime.engine import Engine
from runtime.protocol import (
    MAX_ON_DEMAND,
    EndpointSet,
    endpoint_set_digest,
    endpoints_digest,
    service_endpoints_digest,
)

__all__ = [
    "EndpointFetch",
    "EndpointFetcher",
    "EndpointsRefused",
    "apply",
    "running_digest",
    "service_digests",
]

EndpointFetcher = Callable[[list[str]], Awaitable[None]]
"""Asks the control plane for these services' endpoints; returns once it says they were pushed
(``POST /api/v1/pieces`` with ``endpoints``), raises ``OSError`` otherwise."""


class EndpointsRefused(Exception):
    """A push that cannot be applied: its NACK status and reason."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        super().__init__(reason)


def service_digests(eps: EndpointSet) -> dict[str, str]:
    return {name: service_endpoints_digest(name, lst) for name, lst in eps.services.items()}


def running_digest(eps: EndpointSet) -> str:
    """What a heartbeat reports for the endpoints slot: the per-service digest when the set came
    in that form, else the whole set's (what an older control plane expects)."""
    return eps.digest if eps.digest is not None else endpoints_digest(eps.services)


def apply(
    current: EndpointSet | None, held: Mapping[str, str] | None, push: EndpointSet
) -> tuple[EndpointSet, dict[str, str] | None]:
    """The whole set ``push`` makes over ``current`` (whose per-service digests are ``held``),
    and its per-service digests (None for a set of the older form); ``EndpointsRefused``."""
    if push.digest is None:
        if push.base is not None or push.removed or push.scoped:
            raise EndpointsRefused(400, "a delta or scoped endpoint set must name its digest")
        return push, None
    if push.base is not None:
        if current is None or current.digest != push.base:
            running = current.digest or "a set of the older form" if current is not None else "none"
            raise EndpointsRefused(422, f"delta over {push.base[:12]}, running {running[:12]}: send it whole")
        gone = set(push.removed)
        services = {n: lst for n, lst in current.services.items() if n not in gone}
        base_digests = held if held is not None else service_digests(current)
        digests = {n: d for n, d in base_digests.items() if n not in gone}
    else:
        if push.removed:
            raise EndpointsRefused(400, "removed services without a base set")
        services, digests = {}, {}
    for name, lst in push.services.items():
        services[name] = lst
        digests[name] = service_endpoints_digest(name, lst)
    got = endpoint_set_digest(digests, push.scoped)
    if got != push.digest:
        raise EndpointsRefused(
            400, f"endpoint set digest mismatch: it makes {got[:12]}, not {push.digest[:12]}"
        )
    whole = EndpointSet(
        generation=push.generation,
        services=dict(sorted(services.items())),
        scoped=push.scoped,
        digest=push.digest,
    )
    return whole, digests


class EndpointFetch:
    """A lacking destination's endpoints, fetched once however many requests wait for them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.fetcher: EndpointFetcher | None = None
        """Set once a control plane is known (``runtime.server``)."""
        self._inflight: dict[tuple[str, ...], asyncio.Future[str | None]] = {}
        self.on_demand: set[str] = set()
        """Services asked for on demand (their endpoints, or their destination piece, which
        brings them): recorded before the request goes, so the push answering it stores them."""

    def declared(self) -> list[str]:
        """What registrations and heartbeats name as fetched on demand (bounded)."""
        return sorted(self.on_demand)[:MAX_ON_DEMAND]

    async def ensure(self, service: str) -> str | None:
        """None once ``service``'s split targets are all held (or it lacks none), else why not."""
        for _ in range(2):  # a push may replace the set while a fetch is on its way
            table = self.engine.snapshot.destinations.get(service)
            if table is None or not table.lacking:
                return None
            if self.fetcher is None:
                return "no control plane to fetch its endpoints from"
            names = tuple(sorted({service, *table.lacking}))
            fut = self._inflight.get(names)
            if fut is None:
                self.on_demand.update(names)
                fut = self._inflight[names] = asyncio.ensure_future(self._fetch(list(names)))
                fut.add_done_callback(functools.partial(self._done, names))
            try:
                async with asyncio.timeout(FETCH_TIMEOUT_S):
                    why = await asyncio.shield(fut)
            except TimeoutError:
                return f"no endpoints from the control plane in {FETCH_TIMEOUT_S:.0f}s"
            if why is not None:
                return why
        return None

    def _done(self, names: tuple[str, ...], _fut: asyncio.Future[str | None]) -> None:
        self._inflight.pop(names, None)

    async def _fetch(self, names: list[str]) -> str | None:
        assert self.fetcher is not None
        try:
            await self.fetcher(names)
        except (OSError, TimeoutError, ValueError) as e:
            return f"control plane: {e}"
        return None
