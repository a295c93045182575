"""The control plane process: compile on start, follow changes, push, serve the API and the GUI.

``ControlPlane`` wires the parts together: a watcher feeds changes into one compile loop (changes
that arrive while a compile runs are coalesced into the next one, stamped with the earliest
change's time); a successful compile becomes the current release, is written to ``out/`` and
handed to the pusher; a failed one is logged and recorded, and nothing is pushed. A sweeper marks
data planes Offline when their heartbeats stop.

State lives in a ``Store`` (``compiler.controlplane.store``): the state dir (one replica, which
always leads), or PostgreSQL shared by replicas. Then every replica serves registration, pushes and
the API for the data planes connected to it, and only the one its ``Elector`` names leader polls
Git, compiles and publishes releases (fenced by its token); the others adopt each release and
every registration change when the store notifies them, and resync every few heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from compiler.controlplane.canary import CanaryController
from compiler.controlplane.config import Config
from compiler.controlplane.gcpause import GcPauses
from compiler.controlplane.generation import Generations
from compiler.controlplane.metrics import ControlPlaneMetrics
from compiler.controlplane.pusher import SLOTS, DataPlaneSync, Pusher, SlotState
from compiler.controlplane.registry import DataPlane, Registry
from compiler.controlplane.rejoin import Rejoin
from compiler.controlplane.release import Compiler, ReleaseState, trim_heap
from compiler.controlplane.security import Security
from compiler.controlplane.status import overall_status
from compiler.controlplane.store import Store, StoreError, open_store
from compiler.controlplane.store.base import StoredRelease
from compiler.controlplane.traffic import TrafficView
from compiler.controlplane.watcher import Change, GitRefWatcher, WorkTreeWatcher
from compiler.source import SourceError
from runtime.h1guard import GuardedListener
from runtime.protocol import SignedEndpoints

REJOIN_INTERVALS = 3.5
"""Heartbeat intervals within which every live data plane has registered with a started control
plane (see ``ControlPlane.__init__``), plus ``REJOIN_MARGIN_S`` for a busy host."""
REJOIN_MARGIN_S = 2.0
GAUGES_EVERY_S = 0.1
STOP_STEP_S = 1.0
"""What each step of ``ControlPlane.stop`` waits at most (tasks to end, requests in flight)."""

if TYPE_CHECKING:
    from compiler.controlplane.kube.runtime import KubeControlPlane

__all__ = ["Config", "ControlPlane", "StoreError"]


class ControlPlane:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.metrics = ControlPlaneMetrics()
        self.releases = ReleaseState()
        self.compiler = Compiler(config.out)
        # A live data plane is back within REJOIN_INTERVALS heartbeat intervals of this start: a
        # heartbeat to a control plane that does not know it gets 404 and it registers at once,
        # and one that could not reach the control plane retries at least every 2 intervals (x1.5
        # jitter; runtime.registration). So the live set is learned from the data planes within
        # that time, with or without a saved registry: restored entries that do not heartbeat by
        # then go Offline, and without a registry endpoint pushes to data planes that already run
        # a set wait that long (an early, partial set would drop the others), no longer.
        rejoin = config.rejoin_window_s or config.heartbeat_interval_s * REJOIN_INTERVALS + REJOIN_MARGIN_S
        self.replica_id = config.replica_id or f"{socket.gethostname()}:{config.port}"
        self.store: Store = open_store(
            config.store, config.state_dir, self.replica_id, f"http://{config.host}:{config.port}"
        )
        self.elector = self.store.elector(config.lease_s)
        self.registry = Registry(
            heartbeat_interval_s=config.heartbeat_interval_s,
            missed=config.missed_heartbeats,
            store=self.store,
            restore_grace_s=rejoin,
        )
        generations: Generations = self.store.generations()
        self.pusher = Pusher(
            self.registry,
            self.releases,
            self.metrics,
            generations,
            concurrency=config.concurrency,
            endpoints_hold_s=rejoin,  # none once a saved registry is restored (start)
        )
        self.peer_syncs: dict[str, dict[str, dict[str, object]]] = {}
        """Sync state of the other replicas' data planes, as the store last said."""
        self.ha: dict[str, object] = {}
        """Replicas and leader, as the store last said (``ha_data``)."""
        self._saved_syncs: dict[str, dict[str, dict[str, object]]] = {}
        self._store_tasks: set[asyncio.Task[None]] = set()
        self._store_started = False
        # DESIGN §6: mesh CAs, authenticated registration, certificates, signed pushes.
        self.security = Security(
            self, config.secrets_dir or config.state_dir, require_auth=config.registration_auth
        )
        self.pusher.signer = self.security.sign
        # Without a saved registry, learn the last live set from the data planes (rejoin.py);
        # dropped at start when the store holds one.
        self.rejoin: Rejoin | None = None
        if config.kubernetes is None:
            self.rejoin = Rejoin(self.registry, rejoin, self.security.signer.signed)
            self.pusher.endpoint_source = self.rejoin.services
        self.canaries = CanaryController(
            self.releases,
            self.registry,
            self.store,
            on_change=self._canary_moved,
            log=self.log,
            on_event=lambda kind, ev: self.metrics.canary_events.labels(ev["canary"], kind).inc(),
            on_promoted=self._promote_commit if config.promote_commit else None,
        )
        self.traffic = TrafficView(self.registry, self.canaries.sampler)
        """The dashboard's observed split, scraped by the canaries' sampler (one scraper)."""
        self.registry.subscribe(self._on_registry)
        self._gauges_timer: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()
        self._changes: asyncio.Queue[Change] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._compile_lock = asyncio.Lock()
        self.gc_pauses = GcPauses(
            observe=lambda gen, took: self.metrics.gc_pauses.labels(str(gen)).observe(took)
        )
        self._git: GitRefWatcher | None = None
        self._leading = not self.store.shared
        self.kube: KubeControlPlane | None = None
        """The Kubernetes side (``compiler.controlplane.kube.runtime``) with ``--kubernetes``."""
        if config.ref is not None:
            self._git = GitRefWatcher(
                config.repo or config.policy_dir,
                config.ref,
                poll_interval_s=config.poll_interval_s,
                fetch_interval_s=config.fetch_interval_s,
            )

    def log(self, msg: str) -> None:
        if not self.config.quiet:
            print(f"meshc controlplane: {msg}", file=sys.stderr, flush=True)

    def _on_registry(self, event: str, dp: object) -> None:
        assert isinstance(dp, DataPlane)
        if event in ("registered", "deregistered", "offline", "online"):
            where = f" inbound {dp.inbound_address}" if dp.inbound_address else ""
            self.log(f"{dp.kind} {dp.instance} ({dp.service}{where}) {event}")
        if event in ("offline", "deregistered"):
            self.pusher.forget_offline(dp)
        if event != "heartbeat" and self._gauges_timer is None:
            # O(data planes) each time: at most once per GAUGES_EVERY_S in a registration storm
            # (``/metrics`` recomputes them anyway)
            with contextlib.suppress(RuntimeError):
                self._gauges_timer = asyncio.get_running_loop().call_later(
                    GAUGES_EVERY_S, self._update_gauges
                )

    def rejoined(self, dp: DataPlane, signed: SignedEndpoints | None) -> None:
        """A registration reported the endpoint set it runs: learn from it (``rejoin``)."""
        if self.rejoin is not None and signed is not None and self.rejoin.learn(dp, signed):
            eps = self.rejoin.learned(dp.mesh)
            self.log(
                f"learned the live endpoint set of mesh {dp.mesh!r} from {dp.instance}: "
                + (", ".join(f"{n} {len(v)}" for n, v in sorted(eps.items())) or "no endpoints")
            )
            self.pusher.endpoints_changed()

    async def _rejoin_probes(self, rejoin: Rejoin) -> None:
        """Twice per heartbeat interval while the window is open, drop learned endpoints that no
        longer accept connections; at its end, the learned entries go."""
        half = self.config.heartbeat_interval_s / 2
        while rejoin.open:
            if await rejoin.probe(half):
                why = ", ".join(f"{a} ({r})" for a, r in sorted(rejoin.last_found.items()))
                self.log(f"rejoin: dropped learned endpoints that do not accept connections: {why}")
                self.pusher.endpoints_changed()
            await asyncio.sleep(max(0.0, min(half, rejoin.until - time.time())))
        self.pusher.endpoint_source = None
        self.rejoin = None
        self.pusher.endpoints_changed()

    def _canary_moved(self, changed: set[str]) -> None:
        """A Canary moved the pointer: push what its step changes, as a release would."""
        if changed:
            self.pusher.on_release(changed, time.time())
            self.log(f"canary step: {len(changed)} bundle(s) changed ({', '.join(sorted(changed))})")
        self.metrics.set_canaries(self.canaries.view())

    async def _promote_commit(self, key: str, rec: dict[str, Any], weight: int) -> dict[str, Any] | None:
        """``--promote-commit``: the promoted weights as a commit on a branch of the repo, never
        on the ref this control plane follows, never pushed."""
        from compiler.controlplane.promote import PromoteError, branch_name, promote_commit

        rel = self.releases.compiled
        branch = branch_name(str(self.config.promote_commit), key)
        if rel is None or rel.commit is None or self.config.ref is None or self.config.repo is None:
            return {"branch": branch, "error": "--promote-commit needs a control plane following a Git ref"}
        try:
            commit = await asyncio.to_thread(
                promote_commit, self.config.repo, rel.commit, rec, weight, branch, self.config.ref
            )
        except PromoteError as e:
            return {"branch": branch, "error": str(e)}
        return {"branch": branch, "commit": commit, "base": rel.commit}

    def _reconcile_canaries(self, changed: set[str]) -> set[str]:
        """After a new release: the leader starts, restarts or drops canaries (a follower only
        takes the states the leader wrote, ``_follow_canaries``)."""
        if self._leading:
            self.canaries.reconcile(self.releases.compiled)
        self.metrics.set_canaries(self.canaries.view())
        return changed | self.releases.refresh()

    async def _canary_loop(self) -> None:
        while True:
            if self._leading:
                await self.canaries.run_once()
            await self.canaries.wait()

    def refresh_gauges(self) -> None:
        self._update_gauges()

    def _update_gauges(self) -> None:
        if self._gauges_timer is not None:
            self._gauges_timer.cancel()
            self._gauges_timer = None
        dps = list(self.registry.dataplanes.values())
        self.metrics.dataplanes.labels("online").set(sum(1 for d in dps if d.online))
        self.metrics.dataplanes.labels("offline").set(sum(1 for d in dps if not d.online))
        counts = {"SYNCED": 0, "STALE": 0, "NOT SENT": 0}
        for d in dps:
            counts[overall_status(self.pusher.syncs.get(d.instance))] += 1
        for k, v in counts.items():
            self.metrics.sync.labels(k).set(v)

    # --- compiling ----------------------------------------------------------------------------

    async def compile_once(self, change: Change) -> bool:
        """Read and compile; on success adopt, write and push. Returns whether it compiled."""
        async with self._compile_lock:
            ref = change.commit or self.config.ref
            token = self.elector.fencing_token  # the lead this compile starts under
            t0 = time.perf_counter()
            try:
                src = await asyncio.to_thread(self.compiler.read, self.config.policy_dir, ref)
                result = await asyncio.to_thread(self.compiler.compile, src)
            except SourceError as e:
                self.releases.fail(str(e), trigger=change.reason)
                self.metrics.compiles.labels("failed").inc()
                self.log(f"cannot read policies ({change.reason}): {e}; keeping the current release")
                return False
            except Exception as e:  # a compiler bug must not stop the control plane
                self.releases.fail(f"internal error: {type(e).__name__}: {e}", trigger=change.reason)
                self.metrics.compiles.labels("failed").inc()
                self.log(f"internal error compiling ({change.reason}): {e!r}; keeping the current release")
                return False
            took = time.perf_counter() - t0
            self.metrics.compile_seconds.observe(took)
            if not result.errors:
                await self._split_meshes(result.bundles, result.digests)
            if self.store.shared and not result.errors and result.release:
                refused = await self._publish(result, change, token)
                if refused is not None:
                    self.releases.fail(refused, trigger=change.reason)
                    self.metrics.compiles.labels("failed").inc()
                    self.log(f"release {result.release_id[:12]} not published: {refused}")
                    return False
            changed = self.releases.apply(
                result, seen_at=change.seen_at, trigger=change.reason, duration_s=took
            )
            if changed is None:
                self.metrics.compiles.labels("failed").inc()
                rec = self.releases.last
                n = rec.summary.get("errors", 0) if rec else 0
                self.log(
                    f"compile failed ({change.reason}): {n} error(s); "
                    "keeping the current release, pushing nothing"
                )
                for d in (rec.diagnostics if rec else [])[:20]:
                    self.log(
                        f"  {d['file']}:{d['line']}:{d['column']}: {d['severity']} {d['code']} {d['message']}"
                    )
                return False
            changed = self._reconcile_canaries(changed)
            self.metrics.compiles.labels("ok").inc()
            rel = self.releases.current
            assert rel is not None
            self.metrics.set_release(rel.id)
            self.pusher.on_release(changed, change.seen_at)
            self._update_gauges()
            self.log(
                f"release {rel.id[:12]} ({change.reason}): {len(rel.bundles)} bundle(s), "
                f"{len(changed)} changed, compiled in {took * 1000:.0f} ms"
            )
            if not self.compiler.writes_output:
                await asyncio.to_thread(self._write, result)
            # after the push has started, beside it (zlib runs without the GIL): ~0.3 s after a
            # cold compile of 10,000 files, the few re-read files after an edit
            await asyncio.to_thread(self.compiler.compact)
            self.gc_pauses.settled()
            return True

    async def _split_meshes(self, bundles: dict[str, bytes], digests: dict[str, str]) -> None:
        """Split new mesh bundles into pieces in a thread, before the release is pushed: done
        lazily by the first push, it held the event loop (heartbeats included) ~1 s per change
        of a 10,000-service mesh. Only when some data plane takes pieces, or none has registered
        yet (data planes take pieces by default): split from the compiler's parts here, later
        releases re-split only what changed and share the rest, where a first split done by a
        push cuts (parses) the bundle and shares nothing with the next (~9 MB more at 10,000)."""
        dps = self.registry.dataplanes.values()
        if dps and not any(dp.pieces for dp in dps):
            return
        store = self.pusher.pieces
        split = await asyncio.to_thread(self.compiler.split_meshes, store, bundles, digests)
        for d, mp in split.items():
            store.add(d, mp)

    async def _publish(self, result: object, change: Change, token: int | None) -> str | None:
        """Publish with the fencing token the compile started under: None when the store took
        it, else why not. The database decides, not this process's idea of its lead: a process
        paused mid-compile past its lease wakes up with a token the lock row no longer holds."""
        from compiler.result import CompileResult

        assert isinstance(result, CompileResult)
        if token is None:
            return "this replica is not the leader"
        rel = StoredRelease(
            id=result.release_id,
            commit=result.commit,
            record=result.release,
            digests=result.digests,
            bundles=dict(result.bundles),
            seen_at=change.seen_at,
            fencing_token=token,
            step_bundles=dict(result.step_bundles),
        )
        try:
            ok = await self.store.publish_release(rel, self.elector.identity)
        except OSError as e:
            return f"the store is unavailable: {e}"
        return None if ok else f"the store refused fencing token {token} (another replica leads now)"

    def _adopt(self, stored: StoredRelease, why: str) -> None:
        cur = self.releases.current
        if cur is not None and cur.id == stored.id:
            return
        changed = self.releases.adopt(
            release_id=stored.id,
            commit=stored.commit,
            bundles=stored.bundles,
            digests=stored.digests,
            record=stored.record,
            seen_at=stored.seen_at,
            trigger=why,
            step_bundles=stored.step_bundles,
        )
        changed = self._reconcile_canaries(changed)
        self.metrics.set_release(stored.id)
        self.pusher.on_release(changed, stored.seen_at)
        self._update_gauges()
        self.log(
            f"release {stored.id[:12]} ({why}, fencing token {stored.fencing_token}): {len(changed)} changed"
        )
        self.gc_pauses.settled()

    # --- replicas -----------------------------------------------------------------------------

    def _on_store_change(self, topic: str, key: str) -> None:
        t = asyncio.ensure_future(self._store_change(topic, key))
        self._store_tasks.add(t)
        t.add_done_callback(self._store_tasks.discard)

    async def _store_change(self, topic: str, key: str) -> None:
        from compiler.controlplane.store.postgres import PostgresStore

        try:
            if topic == "dataplane" and isinstance(self.store, PostgresStore):
                self.registry.merge(key, await self.store.load_dataplane(key))
            elif topic == "release":
                await self._sync_release("published by the leader")
            elif topic == "resync":
                await self._resync()
            elif topic == "canary" and not self._leading:
                await self._follow_canaries()
        except OSError as e:
            self.log(f"store: {e}")

    async def _sync_release(self, why: str, *, leading: bool = False) -> None:
        """Adopt the release the store points at (a leader adopts only its own, at election)."""
        stored = await self.store.current_release()
        if stored is not None and (leading or not self._leading):
            self._adopt(stored, why)

    async def _follow_canaries(self) -> None:
        """A follower runs the leader's canary steps: the same states, so the same overlay."""
        self.canaries.states = await self.store.load_canaries()
        changed = self.releases.refresh()
        self._canary_moved(changed)

    async def _resync(self) -> None:
        """Converge with the store: peers' data planes and sync state, the release, the replicas."""
        if not self._leading:
            await self._follow_canaries()
        self.registry.merge_all([d for d in await self.store.load_dataplanes() if not self.registry.local(d)])
        await self._sync_release("resync")
        self._save_syncs()
        syncs = await self.store.load_syncs()
        self.peer_syncs = {k: v for k, v in syncs.items() if k not in self.pusher.syncs}
        await self.store.check_security(self.security.shared_meta(), self.security.loaded_cas())
        await self._refresh_ha()

    async def _refresh_ha(self) -> None:
        now = time.time()
        lead = await self.store.leader_info()
        live = self.config.lease_s + 2.0
        self.ha = {
            "store": self.store.name,
            "replica": self.replica_id,
            "leading": self._leading,
            "fencing_token": self.elector.fencing_token,
            "leader": lead.holder if lead and (lead.expires_at is None or lead.expires_at > now) else None,
            "leader_token": lead.token if lead else None,
            "replicas": [
                {
                    "id": r.id,
                    "url": r.url,
                    "started_at": r.started_at,
                    "last_seen_ago_s": round(max(0.0, now - r.last_seen), 3),
                    "alive": now - r.last_seen < live,
                    "leader": lead is not None and lead.holder == r.id,
                    "dataplanes": sum(1 for d in self.registry.dataplanes.values() if d.replica == r.id),
                }
                for r in await self.store.replicas()
            ],
        }

    def ha_data(self) -> dict[str, object]:
        """Replicas, the leader and this replica (the API's ``/api/v1/replicas``, ``status``)."""
        if not self.ha or not self.store.shared:
            return {
                "store": self.store.name,
                "replica": self.replica_id,
                "leading": self._leading,
                "fencing_token": self.elector.fencing_token,
                "leader": self.replica_id if self._leading else None,
                "leader_token": self.elector.fencing_token,
                "replicas": [
                    {
                        "id": self.replica_id,
                        "url": f"http://{self.config.host}:{self.config.port}",
                        "started_at": self.started_at,
                        "last_seen_ago_s": 0.0,
                        "alive": True,
                        "leader": self._leading,
                        "dataplanes": len(self.registry.dataplanes),
                    }
                ],
            }
        connected = bool(getattr(self.store, "connected", True))
        return {
            **self.ha,
            "leading": self._leading,
            "fencing_token": self.elector.fencing_token,
            "store_connected": connected,
        }

    def sync_of(self, dp: DataPlane) -> DataPlaneSync | None:
        """This replica's sync view of ``dp``, or the one its own replica stored."""
        mine = self.pusher.syncs.get(dp.instance)
        if mine is not None or self.registry.local(dp):
            return mine
        stored = self.peer_syncs.get(dp.instance)
        if not stored:
            return None
        sync = DataPlaneSync(dp.instance)
        for slot in SLOTS:
            doc = stored.get(slot) or {}
            st = SlotState()
            for k in (
                "desired",
                "acked",
                "running",
                "sent",
                "generation",
                "last_ack_at",
                "nack",
                "last_nack_at",
                "error",
            ):
                if k in doc:
                    setattr(st, k, doc[k])
            sync.slots[slot] = st
        return sync

    async def _resync_loop(self) -> None:
        every = max(1.0, 2 * self.config.heartbeat_interval_s)
        while True:
            await asyncio.sleep(every)
            try:
                await self._resync()
            except OSError as e:
                self.log(f"store: {e}")

    async def _lead(self) -> None:
        """Follow the elector: the leader polls Git (or the work tree), compiles, publishes."""
        work: asyncio.Task[None] | None = None
        elector = asyncio.ensure_future(self.elector.run())
        try:
            while True:
                if self.elector.leader and work is None:
                    self._leading = True
                    self.log(f"replica {self.replica_id} leads (fencing token {self.elector.fencing_token})")
                    work = asyncio.ensure_future(self._lead_work())
                elif not self.elector.leader and work is not None:
                    self.log(f"replica {self.replica_id} no longer leads")
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await work
                    work = None
                    self._leading = False
                    with contextlib.suppress(OSError):
                        await self._sync_release("follower again")
                await asyncio.sleep(0.05)
        finally:
            for t in (work, elector):
                if t is not None:
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t

    async def _lead_work(self) -> None:
        with contextlib.suppress(OSError):
            await self._sync_release("taking the lead", leading=True)  # the latest one first
        commit = await self._git.resolve() if self._git is not None else None
        cur = self.releases.current
        if cur is None or self._git is None or cur.commit != commit:
            self._changes.put_nowait(Change(time.time(), "elected leader", commit))
        await self._watch(since=commit)

    def _write(self, result: object) -> None:
        from compiler.output import OutputError, write_release
        from compiler.result import CompileResult

        assert isinstance(result, CompileResult)
        try:
            write_release(result, self.config.out)
        except OutputError as e:
            self.log(f"cannot write the release to {self.config.out}: {e}")

    async def _compile_loop(self) -> None:
        while True:
            change = await self._changes.get()
            while not self._changes.empty():
                nxt = self._changes.get_nowait()
                change = Change(min(change.seen_at, nxt.seen_at), nxt.reason, nxt.commit or change.commit)
            await self.compile_once(change)

    async def _watch(self, since: str | None = None) -> None:
        if self._git is not None:
            current = self.releases.current.commit if self.releases.current else None
            last = self.releases.last
            current = since or current or (last.commit if last else None)
            async for ch in self._git.changes(self._stop, current):
                self._changes.put_nowait(ch)
        else:
            watcher = WorkTreeWatcher(self.config.policy_dir)
            async for ch in watcher.changes(self._stop):
                self._changes.put_nowait(ch)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s / 2)
            self.registry.sweep()
            self._update_gauges()
            if self.store.shared:
                self._save_syncs()
            trim_heap()  # what pushes freed goes back to the system
            self.gc_pauses.tick(busy=self._compile_lock.locked() or self.pusher.rolling_out())

    def _save_syncs(self) -> None:
        """Queue the sync view of this replica's data planes that changed (what others show)."""
        for gone in set(self._saved_syncs) - set(self.pusher.syncs):
            del self._saved_syncs[gone]
        for inst, sync in list(self.pusher.syncs.items()):
            doc: dict[str, dict[str, object]] = {slot: sync.slots[slot].as_json() for slot in SLOTS}
            if self._saved_syncs.get(inst) != doc:
                self._saved_syncs[inst] = doc
                self.store.save_sync(inst, doc)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        from compiler.controlplane.api import make_app

        commit = None
        if self._git is not None:
            commit = await self._git.resolve()
            if commit is None:
                raise SourceError(f"{self.config.ref}: no such revision in {self._git.repo}")
        self.gc_pauses.start()
        await self.store.start()
        self._store_started = True
        self.store.on_change(self._on_store_change)
        await self.canaries.load()
        if self.registry.restore(await self.store.load_dataplanes()):
            if self.rejoin is not None:  # a saved registry: nothing to learn, no wait either
                self.rejoin = None
                self.pusher.endpoint_source = None
            self.pusher.endpoints_changed()
        if self.store.shared:
            refused = await self.store.check_security(self.security.shared_meta(), {})
            if refused is not None:
                raise StoreError(refused)
            stored = await self.store.current_release()
            if stored is not None:
                self._adopt(stored, "start")
            await self._refresh_ha()
        else:
            self.log(f"compiling {self.config.policy_dir} (the first release)")
            await self.compile_once(Change(time.time(), "start", commit))
        if self.config.kubernetes is not None:
            from compiler.controlplane.kube.runtime import KubeControlPlane

            self.kube = await KubeControlPlane.start(
                self, self.config.kubernetes, self.config.kubernetes_token
            )
        await self.pusher.start()
        app = make_app(self)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=STOP_STEP_S)
        await self._runner.setup()
        assert self._runner.server is not None
        refusals = self.metrics.listener_refusals
        guarded = GuardedListener(
            self._runner.server, self.config.limits, lambda reason: refusals.labels("api", reason).inc()
        )
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            guarded, self.config.host, self.config.port, reuse_address=True
        )
        if self.rejoin is not None:
            self.rejoin.begin()  # data planes can come back from now on
            self._tasks.append(asyncio.ensure_future(self._rejoin_probes(self.rejoin)))
        self._tasks.append(asyncio.ensure_future(self._compile_loop()))
        self._tasks.append(asyncio.ensure_future(self._canary_loop()))
        self._tasks.append(asyncio.ensure_future(self._sweep()))
        if self.store.shared:
            self._tasks.append(asyncio.ensure_future(self._resync_loop()))
            if self.config.watch:
                self._tasks.append(asyncio.ensure_future(self._lead()))
        elif self.config.watch:
            self._tasks.append(asyncio.ensure_future(self._watch()))
        mode = f"following {self.config.ref}" if self._git else f"watching {self.config.policy_dir}"
        self.log(f"listening on http://{self.config.host}:{self.config.port} ({mode}); GUI at /gui")

    async def stop(self) -> None:
        """Stop, in bounded time even while busy: tasks are cancelled and given ``STOP_STEP_S``
        to finish (``asyncio.wait``, which neither raises nor swallows this coroutine's own
        cancellation, as awaiting each under ``suppress(CancelledError)`` did), and in-flight
        requests as long."""
        self._stop.set()
        if self._gauges_timer is not None:
            self._gauges_timer.cancel()
            self._gauges_timer = None
        tasks = [*self._tasks, *self._store_tasks]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_STEP_S)
        if self.kube is not None:
            await self.kube.stop()
        await self.elector.release()
        await self.pusher.close()
        if self._store_started:
            await self.store.close()
        await self.traffic.close()
        await self.canaries.close()
        self.security.close()
        self.gc_pauses.close()
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def run_forever(self) -> None:
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.stop()

    def request_stop(self) -> None:
        self._stop.set()
