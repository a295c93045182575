"""The control plane's long-lived objects leave the cyclic collector's passes after a release
(``compiler.controlplane.gcpause``), and a cycle among them is still freed by the periodic full
collection, which waits while pushes are going out unless it is twice overdue."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from compiler.controlplane.gcpause import GcPauses


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """The test process's own objects go back to the collector afterwards."""
    gc.collect()
    yield
    gc.unfreeze()
    gc.collect()


def _cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_a_settled_release_is_frozen_and_its_cycles_wait_for_the_full_collection() -> None:
    clock = Clock()
    pauses = GcPauses(full_every_s=600, clock=clock)
    alive = _cycle()  # unreachable already, but not collected yet: refcounting cannot free a cycle
    pauses.settled()
    assert gc.get_freeze_count() > 0
    gc.collect()  # an ordinary collection skips what was frozen
    assert alive() is not None
    clock.now += 599
    assert pauses.tick(busy=False) is False
    assert alive() is not None
    clock.now += 1
    assert pauses.tick(busy=False) is True
    assert alive() is None
    assert pauses.full_collections == 1
    assert gc.get_freeze_count() > 0  # frozen again after the full pass


def test_the_full_collection_waits_while_pushes_go_out_unless_twice_overdue() -> None:
    clock = Clock()
    pauses = GcPauses(full_every_s=600, clock=clock)
    alive = _cycle()
    pauses.settled()
    clock.now += 700
    assert pauses.tick(busy=True) is False
    assert alive() is not None
    clock.now += 500  # 1,200 s since the last full pass
    assert pauses.tick(busy=True) is True
    assert alive() is None


def test_objects_made_after_the_freeze_are_collected_as_usual() -> None:
    pauses = GcPauses(full_every_s=600, clock=Clock())
    pauses.settled()
    later = _cycle()
    gc.collect()
    assert later() is None
    assert pauses.full_collections == 0


def test_generation_1_and_2_passes_are_timed_until_closed() -> None:
    seen: list[tuple[int, float]] = []
    pauses = GcPauses(observe=lambda gen, took: seen.append((gen, took)))
    gc.collect(2)
    assert seen == []  # built, not started: nothing hooked
    pauses.start()
    gc.disable()  # only the passes asked for here
    try:
        gc.collect(2)
        gc.collect(1)
        gc.collect(0)
    finally:
        pauses.close()
        gc.enable()
    assert [g for g, _ in seen] == [2, 1]
    assert all(took >= 0 for _, took in seen)
    gc.collect(2)
    assert len(seen) == 2


def test_closing_returns_the_frozen_objects_to_the_collector() -> None:
    pauses = GcPauses(full_every_s=600, clock=Clock())
    alive = _cycle()
    pauses.settled()
    assert gc.get_freeze_count() > 0
    pauses.close()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert alive() is None
