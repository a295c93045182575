"""Push generation numbers: strictly increasing, across control plane restarts too (DESIGN §5).

A generation is ``max(time_ns(), last + 1)``, so it grows with the clock and never repeats. With a
state directory the issued high-water mark is also kept on disk (rewritten at most once a second),
so a clock stepped back after a restart still continues above it. The mark is what was issued,
never a reservation ahead of the clock: a control plane restarted *without* its state falls back
on the clock alone, and must not find data planes holding generations from the future.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

__all__ = ["Generations"]

_WRITE_EVERY_NS = 1_000_000_000


class Generations:
    def __init__(self, state_dir: Path | None = None) -> None:
        self._path = state_dir / "generation" if state_dir is not None else None
        self._last = 0
        self._written = 0
        if self._path is not None:
            with contextlib.suppress(OSError, ValueError):
                self._last = self._written = int(self._path.read_text().strip())

    def next(self) -> int:
        g = max(time.time_ns(), self._last + 1)
        self._last = g
        if self._path is not None and g >= self._written + _WRITE_EVERY_NS:
            self._written = g
            tmp = self._path.with_name(f".generation.{os.getpid()}.tmp")
            with contextlib.suppress(OSError):
                self._path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(str(g))
                os.replace(tmp, self._path)
        return g
