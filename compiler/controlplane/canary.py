"""The control plane's side of a Canary: which pre-built step is sent, and when it moves.

The compiler has built every step's bundles (``compiler.canary``); this only moves a pointer: the
current step's weight selects an overlay that ``ReleaseState`` puts over the compiled release, and
the pusher sends what changed, like any release. Git is never touched (nothing drifts): a
rollback is the overlay removed, so data planes run exactly the bundles of the commit again.

Each canary's state (step, weight, phase, counters, history) is kept in the store and reloaded at
start, so a restarted control plane resumes at the same step with the same pause deadline. A
change to the Canary's spec (or its route's weights in Git) starts it again from its first step.

Phases: ``Progressing`` (stepping), ``Paused`` (a ``pause: {}`` waits for ``promote``),
``Inconclusive`` (too many low-traffic runs in a row: waits for ``promote`` or ``abort``),
``Waiting`` (another canary changes the same bundles), and the ends ``Succeeded``, ``RolledBack``
(failed analysis), ``Aborted`` (by a human). Analysis keeps running while the canary gets traffic
and is not finished: a failure during a pause rolls it back too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from compiler.controlplane.canary_analysis import Counts, Sampler, judge, parse, subtract
from compiler.controlplane.release import Release, ReleaseState

if TYPE_CHECKING:
    from compiler.controlplane.registry import Registry
    from compiler.controlplane.store.base import Store

__all__ = ["ACTIVE", "CanaryController", "spec_hash"]

ACTIVE = ("Progressing", "Paused", "Inconclusive", "Waiting")
ENDED = ("Succeeded", "RolledBack", "Aborted")
_SPEC_KEYS = ("route", "destination", "canary", "git_split", "steps", "analysis", "on_success")
_HISTORY = 200


def spec_hash(rec: dict[str, Any]) -> str:
    """What identifies a canary run: its spec and the Git weights it starts from (not digests)."""
    doc = {k: rec.get(k) for k in _SPEC_KEYS}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _subset(tags: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items()))


class CanaryController:
    def __init__(
        self,
        releases: ReleaseState,
        registry: Registry,
        store: Store,
        on_change: Callable[[set[str]], None],
        log: Callable[[str], None],
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        on_promoted: Callable[[str, dict[str, Any], int], Awaitable[dict[str, Any] | None]] | None = None,
    ) -> None:
        self.releases = releases
        self.registry = registry
        self.store = store
        self.on_change = on_change
        self.log = log
        self.on_event = on_event
        self.on_promoted = on_promoted
        """Finishes a promotion outside the control plane (a commit on a branch), if configured."""
        self.states: dict[str, dict[str, Any]] = {}
        self.sampler = Sampler()
        self._samples: dict[str, dict[str, Counts]] = {}
        """Canary key -> data plane -> the counts at the last run (the next run's baseline)."""
        self._wake = asyncio.Event()
        releases.overlay = self.overlay

    # --- what is sent -----------------------------------------------------------------------

    def overlay(self, rel: Release) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for key, rec in sorted(rel.canaries.items()):
            st = self.states.get(key)
            if st is None or st.get("spec") != spec_hash(rec) or st.get("weight") is None:
                continue
            ov = (rec.get("overlays") or {}).get(str(st["weight"]))
            if ov is None:
                continue
            for bkey, digest in ov.items():
                data = rel.step_bundles.get(digest)
                if data is not None and bkey not in out:
                    out[bkey] = data
        return out

    # --- lifecycle --------------------------------------------------------------------------

    async def load(self) -> None:
        self.states = await self.store.load_canaries()
        if self.states:
            self.log(f"canaries: resumed {', '.join(sorted(self.states))} from the store")

    async def close(self) -> None:
        await self.sampler.close()

    def reconcile(self, rel: Release | None) -> None:
        """A release was compiled: start new canaries, restart changed ones, forget removed ones."""
        records = rel.canaries if rel is not None else {}
        for key in [k for k in self.states if k not in records]:
            del self.states[key]
            self._samples.pop(key, None)
            self.store.save_canary(key, None)
            self.log(f"canary {key}: removed from Git")
        for key, rec in records.items():
            h = spec_hash(rec)
            st = self.states.get(key)
            if st is not None and st.get("spec") == h:
                continue
            if st is not None and st["phase"] == "Succeeded" and st.get("weight") == rec["git_weight"]:
                # the promotion merged: Git now says what the canary ran; nothing to start again
                st.update(
                    spec=h, weight=None, reason="the promotion is in Git: its weights are the route's now"
                )
                self._event(st, rec, "merged", st["reason"])
                self._save(key)
                continue
            self.states[key] = self._fresh(rec, h, restarted=st is not None)
            self._samples.pop(key, None)
            self._save(key)
        self._wake.set()

    def _fresh(self, rec: dict[str, Any], h: str, *, restarted: bool) -> dict[str, Any]:
        now = time.time()
        st: dict[str, Any] = {
            "spec": h,
            "phase": "Progressing",
            "step": 0,
            "weight": None,
            "step_started_at": now,
            "started_at": now,
            "failed": 0,
            "inconclusive": 0,
            "ok_at_step": 0,
            "next_run_at": None,
            "last_run": None,
            "reason": "started" if not restarted else "the Canary or its route changed in Git: started again",
            "history": [],
        }
        self._event(st, rec, "started", st["reason"])
        return st

    # --- actions (API) ----------------------------------------------------------------------

    def act(self, key: str, action: str) -> tuple[int, str]:
        """``promote`` (past a pause, or out of Inconclusive), ``abort`` (back to Git's weights),
        ``retry`` (start an ended canary again). Returns an HTTP status and a message."""
        rel = self.releases.compiled
        rec = rel.canaries.get(key) if rel is not None else None
        st = self.states.get(key)
        if rec is None or st is None:
            return 404, f"no canary {key!r} in the current release"
        phase = st["phase"]
        if action == "promote":
            if phase not in ("Paused", "Inconclusive", "Progressing"):
                return 409, f"canary {key} is {phase}; nothing to promote"
            st["phase"] = "Progressing"
            st["inconclusive"] = 0
            if st["step"] < len(rec["steps"]):  # skip the step it waits at (as Argo's promote)
                self._next(st, time.time())
            self._event(st, rec, "promoted", "promoted by a user")
            self._advance(st, rec)
        elif action == "abort":
            if phase in ENDED:
                return 409, f"canary {key} already ended ({phase})"
            self._end(key, st, rec, "Aborted", "aborted by a user: back to the weights in Git")
        elif action == "retry":
            if phase not in ENDED:
                return 409, f"canary {key} is {phase}; only an ended canary can be retried"
            self.states[key] = self._fresh(rec, st["spec"], restarted=True)
            self.states[key]["reason"] = "retried by a user"
            self._samples.pop(key, None)
        else:
            return 400, f"unknown action {action!r} (promote, abort, retry)"
        self._save(key)
        self.on_change(self.releases.refresh())
        self._wake.set()
        return 200, f"canary {key}: {action} done; now {self.states[key]['phase']}"

    # --- the loop ---------------------------------------------------------------------------

    async def run_once(self) -> None:
        try:
            await self.tick()
        except Exception as e:  # a bug here must not stop the control plane
            self.log(f"canary: internal error: {e!r}")

    async def wait(self) -> None:
        """Until an action or a release wakes it, or a quarter second (pauses, analysis runs)."""
        self._wake.clear()
        waits = [st["next_run_at"] for st in self.states.values() if st.get("next_run_at")]
        timeout = 0.25 if not waits else max(0.05, min(0.25, min(waits) - time.time()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def tick(self) -> None:
        rel = self.releases.compiled
        if rel is None:
            return
        before = {k: (st["weight"], st["phase"]) for k, st in self.states.items()}
        for key, rec in sorted(rel.canaries.items()):
            st = self.states.get(key)
            if st is None or st.get("spec") != spec_hash(rec):
                continue
            if st["phase"] in ENDED:  # ended here or by an action: the promotion commit, once
                await self._promoted(key, st, rec)
                continue
            if self._blocked(key, rec, rel):
                continue
            await self._analyse(key, st, rec)
            if st["phase"] == "Progressing":
                self._advance(st, rec)
            if st["phase"] in ENDED:
                self._end_effects(key, st, rec)
                await self._promoted(key, st, rec)
        moved = {k for k, st in self.states.items() if before.get(k) != (st["weight"], st["phase"])}
        for key in moved:
            self._save(key)
        if moved:
            self.on_change(self.releases.refresh())

    def _blocked(self, key: str, rec: dict[str, Any], rel: Release) -> bool:
        """Wait while an earlier active canary changes one of the same bundles."""
        mine = {k for ov in (rec.get("overlays") or {}).values() for k in ov}
        for other, orec in sorted(rel.canaries.items()):
            if other >= key:
                break
            ost = self.states.get(other)
            if ost is None or ost["phase"] not in ACTIVE:
                continue
            theirs = {k for ov in (orec.get("overlays") or {}).values() for k in ov}
            if mine & theirs:
                st = self.states[key]
                if st["phase"] != "Waiting":
                    st["phase"] = "Waiting"
                    self._event(st, rec, "waiting", f"canary {other} changes the same bundles")
                return True
        st = self.states[key]
        if st["phase"] == "Waiting":
            st["phase"] = "Progressing"
            self._event(st, rec, "resumed", "no other canary changes its bundles now")
        return False

    def _advance(self, st: dict[str, Any], rec: dict[str, Any]) -> None:
        """Run steps until one has to wait."""
        steps = rec["steps"]
        now = time.time()
        while st["phase"] == "Progressing":
            i = st["step"]
            if i >= len(steps):
                final = st["weight"] if rec["on_success"] == "promote" else None
                st["weight"] = final
                st["phase"] = "Succeeded"
                what = f"promoted at {final}%" if final is not None else "reverted to the weights in Git"
                self._event(st, rec, "succeeded", f"all steps passed: {what}")
                return
            step = steps[i]
            if "setWeight" in step:
                st["weight"] = int(step["setWeight"])
                self._event(st, rec, "weight", f"step {i + 1}: {st['weight']}% to the canary")
                self._new_weight(st, rec, now)
                self._next(st, now)
                continue
            if "pause" in step:
                dur = step["pause"].get("duration_ms")
                if dur is None:
                    st["phase"] = "Paused"
                    self._event(st, rec, "paused", f"step {i + 1}: waiting for `meshc canary promote`")
                    return
                if now - st["step_started_at"] < dur / 1000.0:
                    return
                self._next(st, now)
                continue
            runs = int(step["analysis"]["runs"])
            if st["ok_at_step"] < runs:
                return
            self._event(st, rec, "analysed", f"step {i + 1}: {runs} successful analysis run(s)")
            self._next(st, now)

    def _next(self, st: dict[str, Any], now: float) -> None:
        st["step"] += 1
        st["step_started_at"] = now
        st["ok_at_step"] = 0

    def _new_weight(self, st: dict[str, Any], rec: dict[str, Any], now: float) -> None:
        a = rec.get("analysis")
        st["next_run_at"] = now + a["interval_ms"] / 1000.0 if a else None
        self._samples.pop(f"{rec['mesh']}/{rec['name']}", None)  # runs count from this weight on

    async def _analyse(self, key: str, st: dict[str, Any], rec: dict[str, Any]) -> None:
        a = rec.get("analysis")
        if a is None or not st.get("weight") or st["phase"] not in ("Progressing", "Paused", "Inconclusive"):
            return
        now = time.time()
        base = self._samples.get(key)
        if base is None:  # the first sample at this weight is the baseline
            self._samples[key] = await self._sample(rec)
            return
        if st["next_run_at"] is None or now < st["next_run_at"]:
            return
        counts = await self._sample(rec)
        run = Counts()
        for inst, c in counts.items():
            run.add(subtract(c, base.get(inst)))
        self._samples[key] = counts
        st["next_run_at"] = now + a["interval_ms"] / 1000.0
        v = judge(a, run)
        st["last_run"] = {"at": now, "weight": st["weight"], **v.as_json()}
        if v.result == "failed":
            st["failed"] += 1
            st["inconclusive"] = 0
            self._event(st, rec, "analysis-failed", f"{v.reason} ({st['failed']}/{a['failure_limit']})")
            if st["failed"] >= a["failure_limit"]:
                self._end(key, st, rec, "RolledBack", f"analysis failed {st['failed']} time(s): {v.reason}")
        elif v.result == "inconclusive":
            st["inconclusive"] += 1
            self._event(st, rec, "analysis-inconclusive", f"{v.reason} ({st['inconclusive']} in a row)")
            if st["inconclusive"] >= a["inconclusive_limit"] and st["phase"] == "Progressing":
                st["phase"] = "Inconclusive"
                self._event(
                    st, rec, "inconclusive", "too little traffic to judge: waiting for promote or abort"
                )
        else:
            st["inconclusive"] = 0
            st["ok_at_step"] += 1
            self._event(st, rec, "analysis-succeeded", f"{v.requests} request(s): {v.measured}")

    async def _sample(self, rec: dict[str, Any]) -> dict[str, Counts]:
        admins = {
            dp.instance: dp.admin_address
            for dp in self.registry.dataplanes.values()
            if dp.online and dp.mesh == rec["mesh"]
        }
        texts = await self.sampler.texts(admins)
        subset = _subset(rec["canary"])
        return {inst: parse(t, rec["destination"], subset) for inst, t in texts.items()}

    def _end(self, key: str, st: dict[str, Any], rec: dict[str, Any], phase: str, why: str) -> None:
        st["phase"] = phase
        st["weight"] = None
        st["next_run_at"] = None
        st["reason"] = why
        self._event(st, rec, phase.lower(), why)
        self.log(f"canary {key}: {phase}: {why}")

    def _end_effects(self, key: str, st: dict[str, Any], rec: dict[str, Any]) -> None:
        st["next_run_at"] = None
        self._samples.pop(key, None)

    async def _promoted(self, key: str, st: dict[str, Any], rec: dict[str, Any]) -> None:
        """Once per run: a promoted canary's commit on a branch (``--promote-commit``)."""
        if (
            self.on_promoted is None
            or st["phase"] != "Succeeded"
            or st.get("weight") is None
            or "promote_commit" in st
        ):
            return
        st["promote_commit"] = None
        got = await self.on_promoted(key, rec, int(st["weight"]))
        st["promote_commit"] = got
        if got is not None:
            what = (
                f"error: {got['error']}" if got.get("error") else f"{got['commit'][:12]} on {got['branch']}"
            )
            self._event(st, rec, "promote-commit", f"promotion commit: {what} (not pushed)")
        self._save(key)

    # --- records ----------------------------------------------------------------------------

    def _event(self, st: dict[str, Any], rec: dict[str, Any], kind: str, msg: str) -> None:
        ev = {"at": time.time(), "event": kind, "step": st["step"], "weight": st["weight"], "message": msg}
        st["history"] = [*st["history"], ev][-_HISTORY:]
        if kind not in ("analysis-succeeded", "analysis-inconclusive"):
            self.log(f"canary {rec['mesh']}/{rec['name']}: {msg}")
        if self.on_event is not None:
            self.on_event(kind, {"canary": f"{rec['mesh']}/{rec['name']}", **ev})

    def _save(self, key: str) -> None:
        st = self.states.get(key)
        self.store.save_canary(key, st)

    def view(self) -> list[dict[str, Any]]:
        """The API's and GUI's view: spec (from the release) and state, per canary."""
        rel = self.releases.compiled
        out = []
        for key, rec in sorted((rel.canaries if rel else {}).items()):
            st = self.states.get(key) or {}
            weight = st.get("weight")
            split = rec["splits"].get(str(weight)) if weight is not None else rec["git_split"]
            out.append(
                {
                    "key": key,
                    "mesh": rec["mesh"],
                    "name": rec["name"],
                    "route": rec["route"],
                    "destination": rec["destination"],
                    "canary": rec["canary"],
                    "git_weight": rec["git_weight"],
                    "weight": weight if weight is not None else rec["git_weight"],
                    "overridden": weight is not None,
                    "split": split,
                    "steps": rec["steps"],
                    "analysis": rec["analysis"],
                    "phase": st.get("phase"),
                    "step": st.get("step"),
                    "failed": st.get("failed", 0),
                    "inconclusive": st.get("inconclusive", 0),
                    "reason": st.get("reason"),
                    "last_run": st.get("last_run"),
                    "history": list(st.get("history") or [])[-20:],
                    "promote_commit": st.get("promote_commit"),
                }
            )
        return out
