"""The PostgreSQL store on a real cluster (``postgres`` fixture: initdb + pg_ctl in a temp dir):
migrations, write-behind with NOTIFY, generations across replicas, the fenced release pointer,
the lock row's lease and fencing token, what replicas must share."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

from compiler.controlplane.registry import DataPlane, Registry
from compiler.controlplane.store.base import StoredRelease
from compiler.controlplane.store.local import LocalStore
from compiler.controlplane.store.postgres import GENERATION_BLOCK, PostgresElector, PostgresStore, migrations
from runtime.protocol import Registration

HANG_S = 30.0


async def _until(cond: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + HANG_S
    while not (got := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return got


def _run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 120))


def _release(rid: str, token: int, bundles: dict[str, bytes]) -> StoredRelease:
    digests = {k: hashlib.sha256(v).hexdigest() for k, v in bundles.items()}
    return StoredRelease(
        id=rid,
        commit=None,
        record={"bundles": digests, "provenance": {}},
        digests=digests,
        bundles=bundles,
        seen_at=123.5,
        fencing_token=token,
    )


def test_migrations_apply_once_in_order_and_concurrent_starts_agree(pg_url: str) -> None:
    names = [n for _, n, _ in migrations()]
    assert names and names[0] == "0001_init.sql" and names == sorted(names)

    async def go() -> None:
        a = PostgresStore(pg_url, replica="a", replica_url="http://a")
        b = PostgresStore(pg_url, replica="b", replica_url="http://b")
        first, second = await asyncio.gather(a.migrate(), b.migrate())
        assert sorted(first + second) == names  # each applied exactly once, by one of them
        assert await a.migrate() == []
        await a.close()
        await b.close()

    _run(go)
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT version, name FROM schema_version ORDER BY version").fetchall()
    assert [r[1] for r in rows] == names


def test_registrations_are_written_behind_and_other_replicas_are_notified(pg_url: str) -> None:
    async def go() -> None:
        a = PostgresStore(pg_url, replica="a", replica_url="http://a")
        b = PostgresStore(pg_url, replica="b", replica_url="http://b")
        await a.start()
        await b.start()
        heard: list[tuple[str, str]] = []
        b.on_change(lambda t, k: heard.append((t, k)))
        await _until(lambda: ("resync", "") in heard, "b to listen")
        reg_a = Registry(heartbeat_interval_s=0.2, store=a)
        reg_b = Registry(heartbeat_interval_s=0.2, store=b)
        dp = reg_a.register(
            Registration(
                service="benigno",
                tags={"version": "v1"},
                inbound_address="127.0.0.1:1",
                admin_address="127.0.0.1:2",
                boot_id="boot1",
                pieces=True,
                pieces_formats=[1, 2],
            )
        )
        await _until(lambda: ("dataplane", dp.instance) in heard, "the NOTIFY of a registration")
        row = await b.load_dataplane(dp.instance)
        assert row is not None and row.replica == "a" and row.tags == {"version": "v1"}
        assert row.pieces and row.pieces_formats == (1, 2)  # the format it is served survives
        events: list[tuple[str, str]] = []
        reg_b.subscribe(lambda e, d: events.append((e, d.instance)))
        reg_b.merge(dp.instance, row)
        assert events == [("peer", dp.instance)]
        assert not reg_b.local(reg_b.dataplanes[dp.instance])
        # a heartbeat to b for a's data plane is unknown there: it registers with b instead
        from runtime.protocol import Heartbeat

        assert reg_b.known(Heartbeat(instance=dp.instance, boot_id="boot1")) is None
        assert reg_a.deregister(dp.instance)
        await _until(lambda: heard.count(("dataplane", dp.instance)) >= 2, "the NOTIFY of a deregistration")
        assert await b.load_dataplane(dp.instance) is None
        await a.close()
        await b.close()

    _run(go)


def test_generations_grow_across_replicas_and_above_the_clock(pg_url: str) -> None:
    async def go() -> None:
        a = PostgresStore(pg_url, replica="a", replica_url="http://a")
        b = PostgresStore(pg_url, replica="b", replica_url="http://b")
        before = time.time_ns()
        await a.start()
        await b.start()
        ga, gb = a.generations(), b.generations()
        xs = [ga.next() for _ in range(100)]
        ys = [gb.next() for _ in range(100)]
        assert xs == sorted(xs) and ys == sorted(ys)
        assert not set(xs) & set(ys)
        assert min(xs) > before  # continues above what a clock-based local store issued
        assert min(ys) > max(xs)  # b's block was reserved after a's
        # a replica restarted later continues above everything issued
        c = PostgresStore(pg_url, replica="a", replica_url="http://a")
        await c.start()
        assert c.generations().next() > max(ys) + GENERATION_BLOCK - 200
        for s in (a, b, c):
            await s.close()

    _run(go)


def test_a_stale_fencing_token_is_refused_by_the_database(pg_url: str) -> None:
    """The SIGSTOP case without the signal: A leads, stops renewing (paused), its lease ends, B
    takes over with a higher token; A's publish with its old token changes nothing."""

    async def go() -> None:
        store = PostgresStore(pg_url, replica="x", replica_url="http://x")
        await store.start()
        a = PostgresElector(pg_url, "a", lease_s=1.0)
        b = PostgresElector(pg_url, "b", lease_s=1.0)
        assert await a.round() and a.leader
        token_a = a.fencing_token
        assert token_a is not None
        assert not await b.round()  # held and unexpired
        assert await store.publish_release(_release("r1", token_a, {"default": b"{}"}), "a")
        await _until(lambda: not a.leader, "a's own deadline to pass (it counts itself follower)")
        assert await _until_async(b.round), "b takes the expired lease"
        token_b = b.fencing_token
        assert token_b is not None and token_b == token_a + 1
        refused = await store.publish_release(_release("r2", token_a, {"default": b"{ }"}), "a")
        assert refused is False
        cur = await store.current_release()
        assert cur is not None and cur.id == "r1" and cur.fencing_token == token_a
        with psycopg.connect(pg_url) as conn:  # the refused transaction left nothing behind
            assert conn.execute("SELECT count(*) FROM releases WHERE id = 'r2'").fetchone() == (0,)
        # a waking up cannot renew b's lease either
        assert not await a.round() and not a.leader
        assert await store.publish_release(_release("r2", token_b, {"default": b"{ }"}), "b")
        cur = await store.current_release()
        assert cur is not None and cur.id == "r2" and cur.bundles == {"default": b"{ }"}
        assert cur.seen_at == 123.5
        await b.release()  # a clean stop hands over at once
        assert await a.round() and a.fencing_token == token_b + 1
        await a.release()
        await store.close()

    _run(go)


async def _until_async(fn: Callable[[], Awaitable[bool]]) -> bool:
    deadline = time.monotonic() + HANG_S
    while not await fn():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def test_replicas_must_share_the_signing_key_and_token_secret(pg_url: str) -> None:
    async def go() -> None:
        a = PostgresStore(pg_url, replica="a", replica_url="http://a")
        await a.start()
        meta = {"push_signing_public_key": "aa", "token_secret_id": "bb"}
        assert await a.check_security(meta, {"default": "CERT"}) is None
        assert await a.check_security(meta, {}) is None
        msg = await a.check_security({**meta, "push_signing_public_key": "cc"}, {})
        assert msg is not None and "push_signing_public_key" in msg and "secrets dir" in msg
        await a.close()

    _run(go)
    with psycopg.connect(pg_url) as conn:
        cols = {
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name IN ('ca_certs', 'security_meta')"
            ).fetchall()
        }
        assert conn.execute("SELECT fingerprint FROM ca_certs").fetchone() == (
            hashlib.sha256(b"CERT").hexdigest(),
        )
    assert not any("key" in c and c != "key" for c in cols)  # no private key column anywhere


def test_writes_survive_a_database_restart(pg_url: str, postgres: Any) -> None:
    async def go() -> None:
        a = PostgresStore(pg_url, replica="a", replica_url="http://a")
        await a.start()
        reg = Registry(heartbeat_interval_s=0.2, store=a)
        await asyncio.to_thread(postgres.stop)
        dp = reg.register(Registration(service="benigno", admin_address="127.0.0.1:3", boot_id="b"))
        await _until(lambda: a.writes_failed > 0, "a failed write while PostgreSQL is down")
        await asyncio.to_thread(postgres.start)
        assert await a.flush(timeout=HANG_S)
        row = await a.load_dataplane(dp.instance)
        assert row is not None and row.service == "benigno"
        await a.close()

    _run(go)


def test_the_local_store_keeps_todays_registry_file(tmp_path: Any) -> None:
    async def go() -> None:
        s = LocalStore(tmp_path, replica="solo", replica_url="http://solo")
        reg = Registry(store=s)
        dp = reg.register(Registration(service="benigno", admin_address="10.0.0.1:9", boot_id="b"))
        new = reg.register(
            Registration(service="magnanimo", admin_address="10.0.0.1:8", pieces=True, pieces_formats=[1, 2])
        )
        s._flush_registry()  # written behind (REGISTRY_EVERY_S): now
        again = await LocalStore(tmp_path, replica="solo", replica_url="").load_dataplanes()
        assert sorted(d.instance for d in again) == sorted([dp.instance, new.instance]) and again[0].restored
        formats = {d.instance: d.pieces_formats for d in again}
        assert formats == {dp.instance: None, new.instance: (1, 2)}
        assert isinstance(again[0], DataPlane)
        assert (tmp_path / "registry.json").exists()

    _run(go)


@pytest.mark.parametrize("n", [3])
def test_elections_are_exclusive(pg_url: str, n: int) -> None:
    async def go() -> None:
        store = PostgresStore(pg_url, replica="x", replica_url="http://x")
        await store.migrate()
        es = [PostgresElector(pg_url, f"r{i}", lease_s=5.0) for i in range(n)]
        won = await asyncio.gather(*(e.round() for e in es))
        assert sum(won) == 1
        for e in es:
            await e.release()
        await store.close()

    _run(go)


def test_an_unreachable_database_is_a_clear_exit_2(tmp_path: Any) -> None:
    import subprocess
    import sys

    from compiler.demo import free_port

    (tmp_path / "p").mkdir()
    proc = subprocess.run(
        [
            sys.executable, "-m", "compiler.cli", "controlplane", str(tmp_path / "p"),
            "--out", str(tmp_path / "o"),
            "--listen", f"127.0.0.1:{free_port()}", "--store", f"postgresql://meshc@127.0.0.1:{free_port()}/x",
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "PostgreSQL store: cannot connect to PostgreSQL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_replica_paused_inside_a_transaction_does_not_stall_the_others(pg_url: str) -> None:
    """A holds a row lock and stops (as under SIGSTOP, mid-transaction): the server ends A's
    transaction, and B's write of the same row commits instead of waiting for A forever."""

    async def go() -> None:
        from compiler.controlplane.store.postgres import _connect

        a = PostgresStore(pg_url, replica="a", replica_url="http://a")
        b = PostgresStore(pg_url, replica="b", replica_url="http://b")
        await a.start()
        await b.start()
        reg_a = Registry(heartbeat_interval_s=0.2, store=a)
        dp = reg_a.register(Registration(service="benigno", admin_address="127.0.0.1:7", boot_id="x"))
        assert await a.flush(timeout=HANG_S)
        paused = await _connect(pg_url)  # a's session settings, then nothing more from it
        await paused.execute("BEGIN")
        await paused.execute("UPDATE dataplanes SET online = false WHERE instance = %s", (dp.instance,))
        reg_b = Registry(heartbeat_interval_s=0.2, store=b)
        reg_b.register(Registration(service="benigno", admin_address="127.0.0.1:7", boot_id="y"))
        assert await b.flush(timeout=HANG_S)
        row = await b.load_dataplane(dp.instance)
        assert row is not None and row.replica == "b" and row.boot_id == "y"
        with pytest.raises(psycopg.Error, match="idle-in-transaction"):  # the server ended it
            await paused.execute("COMMIT")
        for s in (a, b):
            await s.close()

    _run(go)


def test_peers_do_not_age_while_the_store_is_silent() -> None:
    """A peer's data plane goes Offline when its row stood still at the last resync, not by this
    replica's clock: with the store down, no peer's endpoints are dropped."""
    reg = Registry(heartbeat_interval_s=0.2, replica="me")
    t0 = time.time()
    peer = DataPlane("benigno-1", "benigno", "default", "sidecar", {}, "127.0.0.1:1", "127.0.0.1:2",
                     t0, t0, replica="other")  # fmt: skip
    reg.merge_all([peer])
    seen = reg.peers_seen_at
    assert seen is not None
    assert reg.sweep(now=seen + 3600) == [] and reg.dataplanes["benigno-1"].online  # no resync since
    reg.peers_seen_at = seen + 3600  # resyncs went on for an hour and the row never moved
    assert [d.instance for d in reg.sweep(now=seen + 3600)] == ["benigno-1"]
    assert not reg.dataplanes["benigno-1"].online


def test_after_a_store_outage_peers_get_a_fresh_look() -> None:
    """The first resync after a gap finds rows that did not move (their writes are still
    queued): they are not judged by that silence."""
    reg = Registry(heartbeat_interval_s=0.2, replica="me")
    t0 = time.time()
    peer = DataPlane("benigno-1", "benigno", "default", "sidecar", {}, "127.0.0.1:1", "127.0.0.1:2",
                     t0, t0, replica="other")  # fmt: skip
    reg.merge_all([peer])
    reg.peers_seen_at = t0 - 60  # the last resync before a minute without the store,
    reg.dataplanes["benigno-1"].observed_at = t0 - 60  # when its row last moved
    reg.merge_all([peer])
    assert reg.sweep() == [] and reg.dataplanes["benigno-1"].online


def test_canary_states_and_step_bundles_are_shared_through_the_store(pg_url: str) -> None:
    """A leader's canary state reaches a follower by NOTIFY and its step bundles come with the
    release, so both replicas' data planes run the same step (issue 16)."""

    async def go() -> None:
        a = PostgresStore(pg_url, replica="ca", replica_url="http://ca")
        b = PostgresStore(pg_url, replica="cb", replica_url="http://cb")
        await a.start()
        await b.start()
        heard: list[tuple[str, str]] = []
        b.on_change(lambda t, k: heard.append((t, k)))
        await _until(lambda: ("resync", "") in heard, "b to listen")
        state = {"phase": "Paused", "step": 2, "weight": 50, "history": [{"event": "paused"}]}
        a.save_canary("default/benigno-v2", state)
        await _until(lambda: ("canary", "default/benigno-v2") in heard, "the NOTIFY of a canary state")
        assert (await b.load_canaries())["default/benigno-v2"] == state
        step = b'{"format":1,"step":"50"}'
        digest = hashlib.sha256(step).hexdigest()
        rel = _release("rel-canary", 0, {"default": b'{"format":1}'})
        record = {
            **rel.record,
            "canaries": {"default/benigno-v2": {"overlays": {"50": {"default/x": digest}}}},
        }
        rel = StoredRelease(
            rel.id, None, record, rel.digests, rel.bundles, rel.seen_at, 0, step_bundles={digest: step}
        )
        el = a.elector(5.0)
        runner = asyncio.ensure_future(el.run())
        await _until(lambda: el.leader, "a to lead")
        rel = StoredRelease(
            rel.id,
            None,
            record,
            rel.digests,
            rel.bundles,
            rel.seen_at,
            el.fencing_token or 0,
            rel.step_bundles,
        )
        assert await a.publish_release(rel, el.identity)
        got = await b.current_release()
        assert got is not None and got.step_bundles == {digest: step}
        a.save_canary("default/benigno-v2", None)
        await _until(lambda: heard.count(("canary", "default/benigno-v2")) >= 2, "the NOTIFY of a removal")
        assert "default/benigno-v2" not in await b.load_canaries()
        runner.cancel()
        await el.release()
        await a.close()
        await b.close()

    _run(go)
