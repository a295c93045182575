"""Header changes as data: what a route or filter does to headers, applied by each byte layer.

A TrafficRoute's ``modify`` (remove names, then add or replace) and a MeshGatewayRoute's header
filters (set, add, remove) compile once, with the snapshot, into one tuple of ``HeaderOp``; the
fast path applies it to its header list, the aiohttp path to its multidict, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable

from runtime.bundle import GatewayFilter, HeaderOps

__all__ = ["ADD", "NO_OPS", "REMOVE", "SET", "HeaderOp", "filter_ops", "modify_ops"]

SET, ADD, REMOVE = 0, 1, 2
HeaderOp = tuple[int, str, str]
"""(``SET`` | ``ADD`` | ``REMOVE``, header name, value; empty for ``REMOVE``)."""
NO_OPS: tuple[HeaderOp, ...] = ()


def modify_ops(ops: HeaderOps | None) -> tuple[HeaderOp, ...]:
    """A TrafficRoute ``modify`` header block: every removal first, then each addition (an
    ``append: false`` one replaces what is there)."""
    if ops is None:
        return NO_OPS
    out: list[HeaderOp] = [(REMOVE, name, "") for name in ops.remove]
    out += [(ADD if c.append else SET, c.name, c.value) for c in ops.add]
    return tuple(out)


def filter_ops(filters: Iterable[GatewayFilter]) -> tuple[HeaderOp, ...]:
    """MeshGatewayRoute header filters, each in Gateway API order: set, add, remove."""
    out: list[HeaderOp] = []
    for f in filters:
        out += [(SET, c.name, c.value) for c in f.set]
        out += [(ADD, c.name, c.value) for c in f.add]
        out += [(REMOVE, name, "") for name in f.remove]
    return tuple(out)
