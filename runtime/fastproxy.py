"""The fast data path: outbound, inbound and gateway HTTP/1.1 listeners as asyncio Protocols.

The engine decides exactly as on the aiohttp path (``runtime.proxy``): the same snapshot lookups,
routes, split wheels, balancers, retry policies, outlier detection, rate limits and faults. These
modules only move bytes, with no coroutine, task or policy object per request:

* ``ClientConn`` (``runtime.fastconn``) is one client connection. ``h1.RequestReader`` (llhttp)
  parses its requests; pipelined requests queue behind the one in flight (reading pauses while
  they wait). The head is routed, rewritten into the next hop's head, and the body streams to the
  upstream as it arrives (re-chunked when the client sent it chunked); a request that may be
  retried keeps its (at most 64 KiB) body for the replay.
* ``Exchange`` (``runtime.fastexchange``, its base) carries out one exchange with the upstream:
  attempts, retries, the response relayed back, the answers made here.
* ``Upstream`` (``runtime.fastpool``) is one keep-alive connection to an endpoint, kept in ``Pool``
  per address; it parses responses with ``h1.ResponseReader`` and feeds the client connection it
  is lent to. Writes to the client are corked for the duration of one upstream read, so a small
  response leaves in one ``writev``.
* Back-pressure both ways: a transport whose write buffer fills pauses reading on the other side
  (``pause_writing`` / ``resume_writing``); nothing is queued beyond one read.
* The per-try / request timeout up to the response head (504) costs no loop timer per request:
  the connection notes its deadline and joins ``FastPlane.timed`` (``runtime.fastplane``), which
  one 25 ms tick scans while it is not empty. Retry backoff and fault delays use loop timers; a
  sweep every few seconds closes idle connections.
* A connection whose exchange failed half way is never reused: an upstream that closes mid-body
  makes the client connection close before the body is complete (the client sees a truncated
  message, never a hang); a client that goes away closes the upstream connection.

Counters go to ``fastmetrics.RequestStats`` (plain dicts, rendered on scrape); access logs are
written only when a TrafficLog applies. This module is the server wiring: ``FastHttp`` makes the
listeners' protocol factories.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from runtime.fastconn import ClientConn
from runtime.fastexchange import GATEWAY, INBOUND, OUTBOUND
from runtime.fastplane import FastPlane
from runtime.fastpool import Pool, Upstream

__all__ = ["ClientConn", "FastHttp", "Pool", "Upstream"]


class FastHttp(FastPlane):
    """The HTTP listeners of one data plane on the fast path (server wiring)."""

    def factory(self, kind: str, port: int = 0) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server``: ``outbound``, ``inbound`` or ``gateway``."""
        code = {"outbound": OUTBOUND, "inbound": INBOUND, "gateway": GATEWAY}[kind]
        _ = self.loop
        return lambda: ClientConn(self, code, port)
