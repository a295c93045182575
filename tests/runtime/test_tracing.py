"""W3C Trace Context decided for one hop (runtime.tracing), without sockets."""

from __future__ import annotations

import random

import pytest

from runtime.tracing import hop, parse

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
