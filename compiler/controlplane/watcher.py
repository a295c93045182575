"""Change events: from the work tree (watchfiles, debounced) or from a Git ref (polled).

``WorkTreeWatcher`` yields once a burst of changes to ``*.yaml``/``*.yml`` files under the policy
directory has settled (50 ms of quiet, 100 ms at most: an editor's save-and-rename is one
change). ``GitRefWatcher`` polls ``git rev-parse REF`` and yields when the commit moves; with
``fetch_interval_s`` it also runs ``git fetch`` that often (follow a remote-tracking ref such as
``origin/main`` then). Both stamp each change with the wall-clock time it was seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Change", "GitRefWatcher", "WorkTreeWatcher"]


@dataclass(frozen=True)
class Change:
    seen_at: float
    reason: str
    commit: str | None = None


class WorkTreeWatcher:
    def __init__(self, policy_dir: Path, debounce_ms: int = 100, step_ms: int = 50) -> None:
        self.root = policy_dir.resolve()
        self.debounce_ms = debounce_ms
        self.step_ms = step_ms

    def _wanted(self, _change: object, path: str) -> bool:
        p = Path(path)
        if not p.name.endswith((".yaml", ".yml")) or p.name.startswith("."):
            return False
        try:
            rel = p.relative_to(self.root)
        except ValueError:
            return False
        return not any(part.startswith(".") for part in rel.parts[:-1])

    async def changes(self, stop: asyncio.Event) -> AsyncIterator[Change]:
        from watchfiles import awatch

        async for batch in awatch(
            self.root,
            watch_filter=self._wanted,
            debounce=self.debounce_ms,
            step=self.step_ms,
            stop_event=stop,
            recursive=True,
        ):
            files = sorted({Path(p).name for _, p in batch})
            yield Change(time.time(), f"work tree: {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}")


class GitRefWatcher:
    def __init__(
        self,
        repo: Path,
        ref: str,
        poll_interval_s: float = 0.2,
        fetch_interval_s: float | None = None,
    ) -> None:
        self.repo = repo
        self.ref = ref
        self.poll_interval_s = poll_interval_s
        self.fetch_interval_s = fetch_interval_s
        self.last_error: str | None = None

    async def _git(self, *args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            "git",
            *args,
            cwd=self.repo,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        out, err = await proc.communicate()
        rc = proc.returncode if proc.returncode is not None else 1
        return rc, (out if rc == 0 else err).decode(errors="replace").strip()

    async def resolve(self) -> str | None:
        rc, out = await self._git("rev-parse", "--verify", "--quiet", f"{self.ref}^{{commit}}")
        return out if rc == 0 else None

    async def changes(self, stop: asyncio.Event, current: str | None) -> AsyncIterator[Change]:
        last_fetch = time.monotonic()
        while not stop.is_set():
            if self.fetch_interval_s is not None and time.monotonic() - last_fetch >= self.fetch_interval_s:
                last_fetch = time.monotonic()
                rc, msg = await self._git("fetch", "--quiet")
                if rc != 0:
                    print(f"meshc: git fetch failed: {msg}", file=sys.stderr, flush=True)
            commit = await self.resolve()
            if commit is not None and commit != current:
                current = commit
                yield Change(time.time(), f"{self.ref} moved to {commit[:12]}", commit)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_interval_s)
