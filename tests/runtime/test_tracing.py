"""W3C Trace Context decided for one hop (runtime.tracing), without sockets."""

from __future__ import annotations

import random

import pytest

from runtime.tracing import hop, parse, parse_b3

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def test_a_valid_traceparent_is_parsed() -> None:
    assert parse(VALID) == (TRACE, SPAN, True)
    assert parse(VALID[:-2] + "00") == (TRACE, SPAN, False)
    assert parse(VALID[:-2] + "03") == (TRACE, SPAN, True)  # other flag bits are not ours to read
    # A future version may carry more fields; the four known ones are read.
    assert parse("cc-" + VALID[3:] + "-what-comes-next") == (TRACE, SPAN, True)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        VALID.upper(),  # hex must be lower case
        "ff-" + VALID[3:],  # version ff is invalid
        VALID + "-extra",  # version 00 has exactly four fields
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero span id
        f"00-{TRACE[:-1]}-{SPAN}-01",  # short trace id
        f"00-{TRACE}-{SPAN}x-01",
        f"00-{TRACE}-{SPAN}-1",
        f"0-{TRACE}-{SPAN}-01",
    ],
)
def test_invalid_traceparents_are_refused(value: str | None) -> None:
    assert parse(value) is None


def test_a_hop_continues_a_valid_trace_with_its_own_span() -> None:
    h = hop(VALID, 0.0, random.Random(1))
    assert (h.trace_id, h.parent_id, h.sampled) == (TRACE, SPAN, True)  # the caller's flag, not 0%
    assert len(h.span_id) == 16 and h.span_id != SPAN
    assert h.header() == f"00-{TRACE}-{h.span_id}-01"
    assert parse(h.header()) == (TRACE, h.span_id, True)


def test_an_absent_or_invalid_one_starts_a_new_trace() -> None:
    rng = random.Random(2)
    a, b = hop(None, None, rng), hop("00-bad", None, rng)
    for h in (a, b):
        assert h.parent_id == "" and not h.sampled  # no backend: propagated, not sampled
        assert parse(h.header()) == (h.trace_id, h.span_id, False)
    assert a.trace_id != b.trace_id
    assert hop(None, 100.0, rng).sampled
    assert not hop(None, 0.0, rng).sampled


def test_sampling_follows_the_percentage() -> None:
    """20% of 20000 new traces: mean 4000, sd ~57; +-400 (7 sd) fails by chance < 1e-11."""
    rng = random.Random()
    sampled = sum(hop(None, 20.0, rng).sampled for _ in range(20000))
    assert 3600 <= sampled <= 4400


B3_TRACE64 = "a3ce929d0e0e4736"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"{TRACE}-{SPAN}-1", (TRACE, SPAN, True, False)),
        (f"{TRACE}-{SPAN}-0-{'1' * 16}", (TRACE, SPAN, False, False)),
        (f"{B3_TRACE64}-{SPAN}-d", (B3_TRACE64, SPAN, True, True)),
        (f"{TRACE}-{SPAN}", (TRACE, SPAN, None, False)),  # the decision deferred
        ("0", ("", "", False, False)),  # a decision alone
        ("d", ("", "", True, True)),
        (f"{TRACE.upper()}-{SPAN}-1", (TRACE, SPAN, True, False)),
    ],
)
def test_a_single_b3_header_is_parsed(value: str, expected: tuple[str, str, bool | None, bool]) -> None:
    assert parse_b3(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        f"{TRACE}-{SPAN}-x",  # unknown decision
        f"{TRACE[:-1]}-{SPAN}-1",  # neither 64 nor 128 bits
        f"{'0' * 32}-{SPAN}-1",
        f"{TRACE}-{'0' * 16}-1",
        f"{TRACE}-{SPAN}-1-bad",
        f"{TRACE}-{SPAN}-1-{SPAN}-more",
    ],
)
def test_invalid_b3_headers_are_refused(value: str | None) -> None:
    assert parse_b3(value) is None


def test_with_b3_a_hop_continues_the_multi_header_form_and_sends_both_forms() -> None:
    incoming = {"x-b3-traceid": B3_TRACE64, "x-b3-spanid": SPAN, "x-b3-sampled": "1"}
    h = hop(incoming.get, 0.0, random.Random(5), b3=True)
    assert (h.trace_id, h.parent_id, h.sampled) == (B3_TRACE64, SPAN, True)
    assert h.span_id != SPAN
    out = dict(h.headers(True))
    assert out["traceparent"] == f"00-{'0' * 16}{B3_TRACE64}-{h.span_id}-01"  # padded to 128 bits
    assert out["b3"] == f"{B3_TRACE64}-{h.span_id}-1-{SPAN}"
    assert (out["x-b3-traceid"], out["x-b3-spanid"], out["x-b3-parentspanid"]) == (
        B3_TRACE64,
        h.span_id,
        SPAN,
    )
    assert out["x-b3-sampled"] == "1" and out["x-b3-flags"] is None  # None: removed
    # Without b3 (no Zipkin backend) B3 is neither read nor sent.
    plain = hop(incoming.get, 0.0, random.Random(5))
    assert (
        plain.trace_id != B3_TRACE64
        and not plain.sampled
        and dict(plain.headers(False)).keys() == {"traceparent"}
    )


def test_b3_is_read_before_traceparent_single_before_multi() -> None:
    other = "1" * 32
    headers = {
        "traceparent": f"00-{other}-{SPAN}-01",
        "b3": f"{TRACE}-{SPAN}-0",
        "x-b3-traceid": B3_TRACE64,
        "x-b3-spanid": SPAN,
    }
    h = hop(headers.get, 100.0, random.Random(6), b3=True)
    assert h.trace_id == TRACE and not h.sampled  # the caller's "do not sample" stands
    del headers["b3"]
    assert hop(headers.get, 100.0, random.Random(6), b3=True).trace_id == B3_TRACE64
    del headers["x-b3-traceid"]  # a span id alone is no context: traceparent is next
    assert hop(headers.get, 100.0, random.Random(6), b3=True).trace_id == other


def test_b3_decisions_deferred_debug_or_alone() -> None:
    rng = random.Random(7)
    deferred = {"b3": f"{TRACE}-{SPAN}"}
    assert hop(deferred.get, 100.0, rng, b3=True).sampled
    assert not hop(deferred.get, 0.0, rng, b3=True).sampled  # sampled as a new trace would be
    debug = hop({"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-flags": "1"}.get, 0.0, rng, b3=True)
    assert debug.sampled and debug.debug
    out = dict(debug.headers(True))
    assert out["x-b3-flags"] == "1" and out["x-b3-sampled"] is None and out["b3"].split("-")[2] == "d"
    deny = hop({"b3": "0", "traceparent": VALID}.get, 100.0, rng, b3=True)
    assert deny.trace_id == TRACE and not deny.sampled  # the trace goes on, not sampled
    fresh = hop({"b3": "0"}.get, 100.0, rng, b3=True)
    assert fresh.parent_id == "" and not fresh.sampled
