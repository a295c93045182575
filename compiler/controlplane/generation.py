"""Push generation numbers: strictly increasing, across control plane restarts too (DESIGN §5).

A generation is ``max(time_ns(), last + 1)``, so it grows with the clock and never repeats. With a
state directory the high-water mark is also reserved on disk a minute ahead, so a clock stepped
back after a restart still cannot produce a generation a data plane has already seen.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

__all__ = ["Generations"]

_RESERVE_NS = 60 * 1_000_000_000


class Generations:
    def __init__(self, state_dir: Path | None = None) -> None:
        self._path = state_dir / "generation" if state_dir is not None else None
        self._last = 0
        self._reserved = 0
        if self._path is not None:
            with contextlib.suppress(OSError, ValueError):
                self._last = self._reserved = int(self._path.read_text().strip())

    def next(self) -> int:
        g = max(time.time_ns(), self._last + 1)
        self._last = g
        if self._path is not None and g >= self._reserved:
            self._reserved = g + _RESERVE_NS
            tmp = self._path.with_name(f".generation.{os.getpid()}.tmp")
            with contextlib.suppress(OSError):
                self._path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(str(self._reserved))
                os.replace(tmp, self._path)
        return g
