"""W3C Trace Context for one hop, decided without I/O (https://www.w3.org/TR/trace-context/).

Every HTTP request a sidecar or gateway forwards carries a ``traceparent``: a valid incoming one
keeps its trace id and sampled flag and gets a new span id for this hop (its parent is the
incoming span), as Envoy does for each span it creates; an absent or invalid one is replaced by
a new trace (random 128-bit trace id, 64-bit span id), sampled with the Mesh's tracing
``sampling`` percentage when a backend is set, else propagated unsampled. ``tracestate`` is
passed on untouched. ``decide`` calls ``hop`` once per request; the byte layers only apply the
header op it yields.
"""

from __future__ import annotations

import random

__all__ = ["TRACEPARENT", "Hop", "hop", "parse"]

TRACEPARENT = "traceparent"
_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


class Hop:
    """This hop's span: its trace, its own id, its parent (empty: it starts the trace)."""

    __slots__ = ("parent_id", "sampled", "span_id", "trace_id")

    def __init__(self, trace_id: str, span_id: str, parent_id: str, sampled: bool) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled

    def header(self) -> str:
        """The ``traceparent`` the next hop gets (version 00)."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def __repr__(self) -> str:
        return f"Hop({self.header()}, parent={self.parent_id or '-'})"


def _hex(s: str, n: int) -> bool:
    return len(s) == n and _HEX.issuperset(s)


def parse(value: str | None) -> tuple[str, str, bool] | None:
    """A ``traceparent`` -> (trace id, parent span id, sampled), or None when absent or invalid
    (the spec's rules: lower-case hex, non-zero ids, version ``ff`` invalid, a future version
    may carry more fields after the four it knows)."""
    if not value:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4:
        return None
    version, trace_id, span_id, flags = parts[0], parts[1], parts[2], parts[3]
    if not _hex(version, 2) or version == "ff" or not _hex(flags, 2):
        return None
    if version == "00" and len(parts) != 4:
        return None
    if not _hex(trace_id, 32) or trace_id == _ZERO_TRACE or not _hex(span_id, 16) or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def _span_id(rng: random.Random) -> str:
    return f"{rng.getrandbits(64) or 1:016x}"


def hop(incoming: str | None, sampling_pct: float | None, rng: random.Random) -> Hop:
    """This hop's span for a request whose ``traceparent`` is ``incoming``. ``sampling_pct``:
    the Mesh's tracing sampling (0-100) when a backend is set, None when none is."""
    parsed = parse(incoming)
    if parsed is not None:
        trace_id, parent, sampled = parsed
        return Hop(trace_id, _span_id(rng), parent, sampled)
    sampled = sampling_pct is not None and (sampling_pct >= 100.0 or rng.random() * 100.0 < sampling_pct)
    return Hop(f"{rng.getrandbits(128) or 1:032x}", _span_id(rng), "", sampled)
