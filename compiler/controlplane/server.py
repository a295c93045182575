"""The control plane process: compile on start, follow changes, push, serve the API and the GUI.

``ControlPlane`` wires the parts together: a watcher feeds changes into one compile loop (changes
that arrive while a compile runs are coalesced into the next one, stamped with the earliest
change's time); a successful compile becomes the current release, is written to ``out/`` and
handed to the pusher; a failed one is logged and recorded, and nothing is pushed. A sweeper marks
data planes Offline when their heartbeats stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TYPE_CHECKING

from aiohttp import web

from compiler.controlplane.config import Config
from compiler.controlplane.generation import Generations
from compiler.controlplane.metrics import ControlPlaneMetrics
from compiler.controlplane.pusher import Pusher
from compiler.controlplane.registry import DataPlane, Registry
from compiler.controlplane.rejoin import Rejoin
from compiler.controlplane.release import Compiler, ReleaseState
from compiler.controlplane.security import Security
from compiler.controlplane.status import overall_status
from compiler.controlplane.traffic import TrafficView
from compiler.controlplane.watcher import Change, GitRefWatcher, WorkTreeWatcher
from compiler.source import SourceError, read_policy_dir
from runtime.h1guard import GuardedListener
from runtime.protocol import SignedEndpoints

REJOIN_INTERVALS = 3.5
"""Heartbeat intervals within which every live data plane has registered with a started control
plane (see ``ControlPlane.__init__``), plus ``REJOIN_MARGIN_S`` for a busy host."""
REJOIN_MARGIN_S = 2.0

if TYPE_CHECKING:
    from compiler.controlplane.kube.runtime import KubeControlPlane

__all__ = ["Config", "ControlPlane"]


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
        rejoin = config.heartbeat_interval_s * REJOIN_INTERVALS + REJOIN_MARGIN_S
        self.registry = Registry(
            heartbeat_interval_s=config.heartbeat_interval_s,
            missed=config.missed_heartbeats,
            state_dir=config.state_dir,
            restore_grace_s=rejoin,
        )
        hold = 0.0 if self.registry.restored else rejoin
        self.pusher = Pusher(
            self.registry,
            self.releases,
            self.metrics,
            Generations(config.state_dir),
            concurrency=config.concurrency,
            endpoints_hold_s=hold,
        )
        # DESIGN §6: mesh CAs, authenticated registration, certificates, signed pushes.
        self.security = Security(
            self, config.secrets_dir or config.state_dir, require_auth=config.registration_auth
        )
        self.pusher.signer = self.security.sign
        # Without a saved registry, learn the last live set from the data planes (rejoin.py).
        self.rejoin: Rejoin | None = None
        if not self.registry.restored and config.kubernetes is None:
            self.rejoin = Rejoin(self.registry, rejoin, self.security.signer.signed)
            self.pusher.endpoint_source = self.rejoin.services
        self.traffic = TrafficView(self.registry)
        self.registry.subscribe(self._on_registry)
        self._stop = asyncio.Event()
        self._changes: asyncio.Queue[Change] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._compile_lock = asyncio.Lock()
        self._git: GitRefWatcher | None = None
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
        if event != "heartbeat":
            self._update_gauges()

    def rejoined(self, dp: DataPlane, signed: SignedEndpoints | None) -> None:
        """A registration reported the endpoint set it runs: learn from it (``rejoin``)."""
        if self.rejoin is not None and signed is not None and self.rejoin.learn(dp, signed):
            self.log(f"learned the live endpoint set of mesh {dp.mesh!r} from {dp.instance}")
            self.pusher.endpoints_changed()

    async def _rejoin_probes(self, rejoin: Rejoin) -> None:
        """Twice per heartbeat interval while the window is open, drop learned endpoints that no
        longer accept connections; at its end, the learned entries go."""
        half = self.config.heartbeat_interval_s / 2
        while rejoin.open:
            if await rejoin.probe(half):
                self.pusher.endpoints_changed()
            await asyncio.sleep(max(0.0, min(half, rejoin.until - time.time())))
        self.pusher.endpoint_source = None
        self.rejoin = None
        self.pusher.endpoints_changed()

    def _update_gauges(self) -> None:
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
            t0 = time.perf_counter()
            try:
                src = await asyncio.to_thread(read_policy_dir, self.config.policy_dir, ref)
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
            return True

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

    async def _watch(self) -> None:
        if self._git is not None:
            current = self.releases.current.commit if self.releases.current else None
            last = self.releases.last
            current = current or (last.commit if last else None)
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

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        from compiler.controlplane.api import make_app

        commit = None
        if self._git is not None:
            commit = await self._git.resolve()
            if commit is None:
                raise SourceError(f"{self.config.ref}: no such revision in {self._git.repo}")
        await self.compile_once(Change(time.time(), "start", commit))
        if self.config.kubernetes is not None:
            from compiler.controlplane.kube.runtime import KubeControlPlane

            self.kube = await KubeControlPlane.start(
                self, self.config.kubernetes, self.config.kubernetes_token
            )
        await self.pusher.start()
        app = make_app(self)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
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
        self._tasks.append(asyncio.ensure_future(self._sweep()))
        if self.config.watch:
            self._tasks.append(asyncio.ensure_future(self._watch()))
        mode = f"following {self.config.ref}" if self._git else f"watching {self.config.policy_dir}"
        self.log(f"listening on http://{self.config.host}:{self.config.port} ({mode}); GUI at /gui")

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.kube is not None:
            await self.kube.stop()
        await self.pusher.close()
        await self.traffic.close()
        self.security.close()
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
