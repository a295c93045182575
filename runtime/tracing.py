"""Trace context for one hop, decided without I/O: W3C ``traceparent`` and, with a Zipkin backend, B3.

Every HTTP request a sidecar or gateway forwards carries a ``traceparent``
(https://www.w3.org/TR/trace-context/): a valid incoming one keeps its trace id and sampled flag
and gets a new span id for this hop (its parent is the incoming span), as Envoy does for each span
it creates; an absent or invalid one is replaced by a new trace (random 128-bit trace id, 64-bit
span id), sampled with the tracing backend's ``sampling`` percentage when one is set, else
propagated unsampled. ``tracestate`` is passed on untouched.

When the backend is Zipkin (``b3``: Kuma's Zipkin tracer in Envoy speaks B3,
https://github.com/openzipkin/b3-propagation) the hop also reads B3, the single ``b3`` header
first, then the ``X-B3-*`` headers, before ``traceparent`` (a B3-instrumented app passes on B3,
not a stale copy of ``traceparent``), and the next hop gets both B3 forms as well, naming the same
trace, span, parent and decision. A B3 trace id of 64 bits is kept as it is (16 hex digits, in
B3 and in the span reported) and zero-padded to 128 bits in ``traceparent``. A B3 context that
defers the decision (no sampled field) is sampled as a new trace would be; ``d`` / ``X-B3-Flags: 1``
(debug) is sampled and passed on as debug.

``decide`` calls ``hop`` once per request, whether the request is forwarded or answered by the
data plane itself; the byte layers only apply the header ops it yields (``headers``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.bundle import TraceTag

__all__ = [
    "B3",
    "B3_FLAGS",
    "B3_PARENT",
    "B3_SAMPLED",
    "B3_SPAN",
    "B3_TRACE",
    "TRACEPARENT",
    "Getter",
    "Hop",
    "hop",
    "parse",
    "parse_b3",
    "tag_values",
]

TRACEPARENT = "traceparent"
B3 = "b3"
B3_TRACE, B3_SPAN, B3_PARENT = "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid"
B3_SAMPLED, B3_FLAGS = "x-b3-sampled", "x-b3-flags"
_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

Getter = Callable[[str], "str | None"]
"""A request's header by lower-case name (the first value), or None."""


class Hop:
    """This hop's span: its trace, its own id, its parent (empty: it starts the trace)."""

    __slots__ = ("debug", "parent_id", "reason", "sampled", "span_id", "tags", "trace_id")

    def __init__(
        self, trace_id: str, span_id: str, parent_id: str, sampled: bool, debug: bool = False
    ) -> None:
        self.trace_id = trace_id
        """32 hex digits, or 16 when a B3 caller started a 64-bit trace."""
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.debug = debug
        """B3's debug flag, passed on (it implies sampled)."""
        self.reason = ""
        """Why the data plane answered this request itself (``decide.Reply.reason``); empty:
        the upstream answered. A span with a reason is tagged as an error."""
        self.tags: tuple[tuple[str, str], ...] = ()
        """The MeshTrace ``tags`` resolved for this request (``tag_values``), sampled spans only."""

    def header(self) -> str:
        """The ``traceparent`` the next hop gets (version 00)."""
        return f"00-{self.trace_id:0>32}-{self.span_id}-{'01' if self.sampled else '00'}"

    def b3(self) -> str:
        """The single ``b3`` header the next hop gets: trace-span-decision[-parent]."""
        state = "d" if self.debug else "1" if self.sampled else "0"
        tail = f"-{self.parent_id}" if self.parent_id else ""
        return f"{self.trace_id}-{self.span_id}-{state}{tail}"

    def headers(self, b3: bool) -> tuple[tuple[str, str | None], ...]:
        """Every propagation header the next hop gets, replacing the request's (None: remove
        it): ``traceparent``, and with ``b3`` both B3 forms, consistent with each other."""
        tp = (TRACEPARENT, self.header())
        if not b3:
            return (tp,)
        return (
            tp,
            (B3, self.b3()),
            (B3_TRACE, self.trace_id),
            (B3_SPAN, self.span_id),
            (B3_PARENT, self.parent_id or None),
            # Debug implies an accept decision: B3 sends the flag, not also X-B3-Sampled.
            (B3_SAMPLED, None if self.debug else "1" if self.sampled else "0"),
            (B3_FLAGS, "1" if self.debug else None),
        )

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


B3Context = tuple[str, str, bool | None, bool]
"""(trace id, the caller's span id, sampled or None when deferred, debug); ids empty when the
caller sent a sampling decision only."""


def _trace_id(s: str) -> bool:
    return (_hex(s, 32) and s != _ZERO_TRACE) or (_hex(s, 16) and s != _ZERO_SPAN)


def _span(s: str) -> bool:
    return _hex(s, 16) and s != _ZERO_SPAN


_STATE: dict[str, tuple[bool | None, bool]] = {"1": (True, False), "0": (False, False), "d": (True, True)}


def parse_b3(value: str | None) -> B3Context | None:
    """A single ``b3`` header -> its context, or None when absent or invalid:
    ``{trace}-{span}[-{1|0|d}[-{parent}]]``, or a decision alone (``0``, ``1``, ``d``)."""
    if not value:
        return None
    v = value.strip().lower()
    if v in _STATE:
        sampled, debug = _STATE[v]
        return "", "", sampled, debug
    parts = v.split("-")
    if len(parts) < 2 or len(parts) > 4 or not _trace_id(parts[0]) or not _span(parts[1]):
        return None
    sampled, debug = None, False
    if len(parts) >= 3:
        if parts[2] not in _STATE:
            return None
        sampled, debug = _STATE[parts[2]]
    if len(parts) == 4 and not _span(parts[3]):
        return None
    return parts[0], parts[1], sampled, debug


def _b3_multi(get: Getter) -> B3Context | None:
    """The ``X-B3-*`` headers -> their context, or None when absent or invalid."""
    trace_id, span_id = (get(B3_TRACE) or "").strip().lower(), (get(B3_SPAN) or "").strip().lower()
    flag = (get(B3_SAMPLED) or "").strip().lower()
    debug = (get(B3_FLAGS) or "").strip() == "1"
    sampled = True if debug or flag in ("1", "true") else False if flag in ("0", "false") else None
    if not trace_id and not span_id:
        return ("", "", sampled, debug) if sampled is not None else None
    if not _trace_id(trace_id) or not _span(span_id):
        return None
    return trace_id, span_id, sampled, debug


def _span_id(rng: random.Random) -> str:
    return f"{rng.getrandbits(64) or 1:016x}"


def _new(sampling_pct: float | None, rng: random.Random) -> bool:
    return sampling_pct is not None and (sampling_pct >= 100.0 or rng.random() * 100.0 < sampling_pct)


def tag_values(tags: tuple[TraceTag, ...], get: Getter | None) -> tuple[tuple[str, str], ...]:
    """MeshTrace ``tags`` for one request: each literal, and each header's first value (its
    ``default`` when the request has none; no tag when neither)."""
    out: list[tuple[str, str]] = []
    for t in tags:
        if t.literal is not None:
            out.append((t.name, t.literal))
            continue
        value = get(t.header.lower()) if get is not None and t.header else None
        if value is None:
            value = t.default
        if value is not None:
            out.append((t.name, value))
    return tuple(out)


def hop(
    incoming: Getter | str | None,
    sampling_pct: float | None,
    rng: random.Random,
    b3: bool = False,
    tags: tuple[TraceTag, ...] = (),
) -> Hop:
    """This hop's span for a request whose headers are ``incoming`` (a getter; a string is the
    ``traceparent`` alone). ``sampling_pct``: the backend's sampling (0-100), None when there is
    no backend; ``b3``: read B3 too (a Zipkin backend); ``tags``: the MeshTrace tags a sampled
    span carries."""
    span = _hop(incoming, sampling_pct, rng, b3)
    if tags and span.sampled:
        span.tags = tag_values(tags, None if incoming is None or isinstance(incoming, str) else incoming)
    return span


def _hop(incoming: Getter | str | None, sampling_pct: float | None, rng: random.Random, b3: bool) -> Hop:
    if incoming is None or isinstance(incoming, str):
        tp, get = incoming, None
    else:
        tp, get = incoming(TRACEPARENT), incoming
    if not b3 or get is None:
        parsed = parse(tp)
        if parsed is not None:
            return Hop(parsed[0], _span_id(rng), parsed[1], parsed[2])
        return Hop(f"{rng.getrandbits(128) or 1:032x}", _span_id(rng), "", _new(sampling_pct, rng))
    decision: B3Context | None = None
    if get is not None:
        ctx = parse_b3(get(B3)) or _b3_multi(get)
        if ctx is not None and ctx[0]:
            trace_id, parent, sampled, debug = ctx
            keep = _new(sampling_pct, rng) if sampled is None else sampled
            return Hop(trace_id, _span_id(rng), parent, keep, debug)
        decision = ctx  # a sampling decision alone (or nothing): it applies to what follows
    parsed = parse(tp)
    if parsed is not None:
        trace_id, parent, sampled = parsed
        if decision is not None and decision[2] is not None:
            sampled = decision[2]
        return Hop(trace_id, _span_id(rng), parent, sampled, decision is not None and decision[3])
    if decision is not None and decision[2] is not None:
        sampled, debug = decision[2], decision[3]
    else:
        sampled, debug = _new(sampling_pct, rng), False
    return Hop(f"{rng.getrandbits(128) or 1:032x}", _span_id(rng), "", sampled, debug)
