"""Keep the cyclic garbage collector's full passes off the push path.

At 10,000 services the control plane holds a few million objects (the release, the policy
index, the registry), and a full (generation 2) collection walks every one of them. With 1,000
data planes heartbeating, that was 0.45-0.51 s about every 7 s (``bench/propagation.py``, timed
with ``gc.callbacks``), and a change that arrived during one waited that long. Almost none of it
is garbage. So after each release, and once at start, everything alive is moved to the permanent
generation (``gc.freeze``: constant time), and later collections walk only what came after it.
Refcounting still frees frozen objects that are dropped. A cycle among them is found only by a
full collection over everything (unfreeze, collect, freeze again), run at most every
``full_every_s``: measured collections found 18-270 cyclic objects each, so little waits for it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

__all__ = ["GcPauses"]

FULL_EVERY_S = 600.0


class GcPauses:
    """``observe(generation, seconds)``, when given, is called after each generation 1 and 2
    pass (the metric ``meshc_controlplane_gc_pause_seconds``) from ``start`` to ``close``."""

    def __init__(
        self,
        full_every_s: float = FULL_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        observe: Callable[[int, float], None] | None = None,
    ) -> None:
        self.full_every_s = full_every_s
        self._clock = clock
        self._last_full = clock()
        self.full_collections = 0
        self._observe = observe
        self._started = 0.0

    def start(self) -> None:
        """The control plane starts (one only built, say for its API routes, hooks nothing)."""
        if self._observe is not None and self._timed not in gc.callbacks:
            gc.callbacks.append(self._timed)

    def _timed(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] == 0 or self._observe is None:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._observe(info["generation"], time.perf_counter() - self._started)

    def close(self) -> None:
        """The control plane stops: a process that embeds one (tests, a library user) gets its
        collector back as it found it, frozen objects returned to the oldest generation."""
        if self._timed in gc.callbacks:
            gc.callbacks.remove(self._timed)
        gc.unfreeze()

    def settled(self) -> None:
        """A release is in place (or the start is done): what lives now is long-lived."""
        gc.freeze()

    def tick(self, busy: bool) -> bool:
        """Now and then (the sweep): the full collection when due and nothing is being pushed,
        or when twice overdue whatever is (a control plane that is never idle still gets it);
        True when it ran."""
        late = self._clock() - self._last_full
        if late < self.full_every_s or (busy and late < 2 * self.full_every_s):
            return False
        self.collect_all()
        return True

    def collect_all(self) -> int:
        """A full collection over everything, frozen objects included; what it freed."""
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self._last_full = self._clock()
        self.full_collections += 1
        return found
