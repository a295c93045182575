"""PostgreSQL as a ``Store`` for replicas (``meshc controlplane --store postgres://...``, psycopg 3).

* Schema: ``migrations/NNNN_*.sql`` applied in order at start, each in one transaction that
  records it in ``schema_version`` (replicas starting together serialise on a transaction-scoped
  lock; only the migration uses one).
* Writes from the request path are queued and written behind by one task, coalesced per data
  plane, and retried across a database restart; a registration or an online change is followed by
  ``NOTIFY meshc`` in the same transaction, so the other replicas hear of it once it is committed.
  A listener per replica (its own connection, reconnecting) turns notifications into
  ``on_change`` calls, and a reconnect into a ``resync``.
* Generations: each replica reserves a block of ``GENERATION_BLOCK`` numbers with one ``UPDATE ...
  RETURNING`` on a single row, above every block reserved before and above the clock in
  nanoseconds (where the local store's generations live), so they grow across replicas.
* Leadership: ``PostgresElector``, a lock row with a lease on the database's clock and a fencing
  token that grows with every change of holder; publishing a release names the token, and the
  ``UPDATE`` of the release pointer is refused unless the lock row still holds it, unexpired.
* The CA private key, the token secret and the push-signing key are never stored: only the CA
  certificates and fingerprints of what replicas must share.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from compiler.controlplane.generation import Generations
from compiler.controlplane.store.base import (
    ChangeListener,
    Elector,
    LeaderInfo,
    ReplicaInfo,
    StoredRelease,
    StoreError,
)

if TYPE_CHECKING:
    from compiler.controlplane.registry import DataPlane

__all__ = ["GENERATION_BLOCK", "PostgresElector", "PostgresStore", "migrations"]

log = logging.getLogger("meshc.store")

CHANNEL = "meshc"
LOCK = "controlplane"
GENERATION_BLOCK = 1_000_000
_CONNECT_TIMEOUT_S = 3
_MIGRATION_LOCK = 0x6D657368  # "mesh": serialises replicas migrating at once


class Unavailable(OSError):
    """The database did not answer; the caller retries."""


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration in the package, in order."""
    out = []
    for f in resources.files("compiler.controlplane.store").joinpath("migrations").iterdir():
        if f.name.endswith(".sql") and f.name[:4].isdigit():
            out.append((int(f.name[:4]), f.name, f.read_text()))
    return sorted(out)


_SESSION = "-c idle_in_transaction_session_timeout=3000 -c lock_timeout=3000 -c statement_timeout=10000"
"""A replica paused inside a transaction (SIGSTOP, a GC pause) would hold its row locks and stall
every other replica's writes on those rows: the server ends such a transaction after 3 s, and a
write that waits for a lock longer than that fails and is retried."""


async def _connect(url: str) -> psycopg.AsyncConnection[dict[str, Any]]:
    try:
        return await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S, row_factory=dict_row, options=_SESSION
        )
    except psycopg.Error as e:
        raise Unavailable(f"cannot connect to PostgreSQL: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _ts(value: Any) -> float:
    return float(value) if value is not None else 0.0


def _row_to_dataplane(row: dict[str, Any]) -> DataPlane:
    from compiler.controlplane.registry import DataPlane

    return DataPlane(
        instance=row["instance"],
        service=row["service"],
        mesh=row["mesh"],
        kind=row["kind"],
        tags={str(k): str(v) for k, v in row["tags"].items()},
        inbound_address=row["inbound_address"],
        admin_address=row["admin_address"],
        registered_at=row["registered_at"],
        last_seen=row["last_seen"],
        online=row["online"],
        boot_id=row["boot_id"],
        pieces=bool(row.get("pieces", False)),
        endpoint_deltas=bool(row.get("endpoint_deltas", False)),
        reachable=tuple(map(str, row["reachable"])) if row.get("reachable") is not None else None,
        pieces_formats=tuple(map(int, row["pieces_formats"]))
        if row.get("pieces_formats") is not None
        else None,
        replica=row["replica"],
        running={str(k): str(v) for k, v in row["running"].items()},
        generations={str(k): int(v) for k, v in row["generations"].items()},
    )


class BlockGenerations(Generations):
    """``next()`` from a block reserved in the database; the next block is fetched in the
    background when half of this one is used. Should the database stay down for a whole block
    (a million pushes), numbers continue above it on this replica and a warning is logged."""

    def __init__(self, reserve: Callable[[], asyncio.Future[tuple[int, int]]]) -> None:
        super().__init__(None)
        self._reserve = reserve
        self._lo = self._hi = 0
        self._refill: asyncio.Future[tuple[int, int]] | None = None
        self._warned = False

    def set_block(self, lo: int, hi: int) -> None:
        if lo > self._lo:
            self._lo, self._hi = lo, hi

    def next(self) -> int:
        if self._refill is not None and self._refill.done():
            with contextlib.suppress(Exception):
                self.set_block(*self._refill.result())
            self._refill = None
        if self._hi - self._lo < GENERATION_BLOCK // 2 and self._refill is None:
            self._refill = self._reserve()
        if self._lo >= self._hi and not self._warned:
            self._warned = True
            print(
                "meshc: generation block used up with PostgreSQL down; continuing above it", file=sys.stderr
            )
        g = self._lo
        self._lo += 1
        return g


class PostgresStore:
    name = "postgres"
    shared = True

    def __init__(self, url: str, *, replica: str, replica_url: str) -> None:
        self.url = url
        self.replica = replica
        self.replica_url = replica_url
        self._conn: psycopg.AsyncConnection[dict[str, Any]] | None = None
        self._lock = asyncio.Lock()
        self._listeners: list[ChangeListener] = []
        self._pending: dict[str, tuple[DataPlane | None, bool]] = {}
        self._pending_sync: dict[str, dict[str, dict[str, Any]]] = {}
        self._pending_canary: dict[str, dict[str, Any] | None] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._generations = BlockGenerations(self._reserve_soon)
        self.connected = False
        """Whether the last statement reached the database (the API shows it)."""
        self.writes_failed = 0

    # --- connection ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _db(self) -> AsyncIterator[psycopg.AsyncConnection[dict[str, Any]]]:
        async with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = await _connect(self.url)
            try:
                yield self._conn
                self.connected = True
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                self.connected = False
                with contextlib.suppress(Exception):
                    await self._conn.close()
                self._conn = None
                raise Unavailable(_first_line(e)) from e

    async def start(self) -> None:
        try:
            await self.migrate()
            async with self._db() as conn:
                await conn.execute(
                    "INSERT INTO replicas (id, url) VALUES (%s, %s) ON CONFLICT (id) DO UPDATE "
                    "SET url = EXCLUDED.url, started_at = now(), last_seen = now()",
                    (self.replica, self.replica_url),
                )
            self._generations.set_block(*await self._reserve())
        except (Unavailable, psycopg.Error) as e:
            raise StoreError(f"PostgreSQL store: {_first_line(e)}") from e
        self._tasks = [
            asyncio.create_task(self._writer()),
            asyncio.create_task(self._listen()),
            asyncio.create_task(self._alive()),
        ]

    async def migrate(self) -> list[str]:
        """Apply the migrations this database lacks; returns their names."""
        applied = []
        async with self._db() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, "
                    "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
                )
            for version, name, sql in migrations():
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                    cur = await conn.execute("SELECT 1 FROM schema_version WHERE version = %s", (version,))
                    if await cur.fetchone() is not None:
                        continue
                    await conn.execute(sql.encode())
                    await conn.execute(
                        "INSERT INTO schema_version (version, name) VALUES (%s, %s)", (version, name)
                    )
                    applied.append(name)
        return applied

    async def close(self) -> None:
        await self.flush(timeout=2.0)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued write is committed (tests, a clean stop)."""
        deadline = time.monotonic() + timeout
        while self._pending or self._pending_sync or self._pending_canary or self._flushing:
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            await asyncio.sleep(0.02)
        return True

    _flushing = False

    # --- notifications ------------------------------------------------------------------------

    def on_change(self, fn: ChangeListener) -> None:
        self._listeners.append(fn)

    def _emit(self, topic: str, key: str) -> None:
        for fn in self._listeners:
            fn(topic, key)

    async def _listen(self) -> None:
        backoff = 0.2
        while True:
            conn = None
            try:
                conn = await _connect(self.url)
                await conn.execute(f"LISTEN {CHANNEL}")
                backoff = 0.2
                self._emit("resync", "")  # whatever happened while we were not listening
                async for n in conn.notifies():
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        doc = json.loads(n.payload)
                        if doc["r"] != self.replica:
                            self._emit(str(doc["t"]), str(doc["k"]))
            except asyncio.CancelledError:
                raise
            except (Unavailable, psycopg.Error) as e:
                log.warning("LISTEN: %s", _first_line(e))
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _notify(self, conn: psycopg.AsyncConnection[Any], topic: str, key: str) -> None:
        payload = json.dumps({"r": self.replica, "t": topic, "k": key})
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

    async def _alive(self) -> None:
        """This replica's row: ``last_seen`` every second (the API's list of replicas)."""
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Unavailable, psycopg.Error):
                async with self._db() as conn:
                    await conn.execute(
                        "INSERT INTO replicas (id, url) VALUES (%s, %s) ON CONFLICT (id) DO UPDATE "
                        "SET url = EXCLUDED.url, last_seen = now()",
                        (self.replica, self.replica_url),
                    )

    # --- registry (write-behind) --------------------------------------------------------------

    def save_dataplane(self, dp: DataPlane, *, membership: bool) -> None:
        old = self._pending.get(dp.instance)
        self._pending[dp.instance] = (dp, membership or (old is not None and old[1]))
        self._wake.set()

    def remove_dataplane(self, instance: str) -> None:
        self._pending[instance] = (None, True)
        self._wake.set()

    def save_sync(self, instance: str, slots: dict[str, dict[str, Any]]) -> None:
        self._pending_sync[instance] = slots
        self._wake.set()

    def save_canary(self, key: str, state: dict[str, Any] | None) -> None:
        self._pending_canary[key] = state
        self._wake.set()

    async def load_canaries(self) -> dict[str, dict[str, Any]]:
        async with self._db() as conn:
            cur = await conn.execute("SELECT key, state FROM canaries")
            return {r["key"]: r["state"] for r in await cur.fetchall()}

    async def _write_canaries(self, canaries: dict[str, dict[str, Any] | None]) -> None:
        async with self._db() as conn, conn.transaction():
            for key, state in canaries.items():
                if state is None:
                    await conn.execute("DELETE FROM canaries WHERE key = %s", (key,))
                else:
                    await conn.execute(
                        "INSERT INTO canaries (key, state) VALUES (%s, %s) ON CONFLICT (key) "
                        "DO UPDATE SET state = EXCLUDED.state, updated_at = now()",
                        (key, Jsonb(state)),
                    )
                await self._notify(conn, "canary", key)

    async def _writer(self) -> None:
        backoff = 0.2
        while True:
            await self._wake.wait()
            self._wake.clear()
            dps, self._pending = self._pending, {}
            syncs, self._pending_sync = self._pending_sync, {}
            canaries, self._pending_canary = self._pending_canary, {}
            if not dps and not syncs and not canaries:
                continue
            self._flushing = True
            try:
                await self._write(dps, syncs)
                if canaries:
                    await self._write_canaries(canaries)
                backoff = 0.2
            except (Unavailable, psycopg.Error) as e:
                self.writes_failed += 1
                log.warning("write: %s; retrying", _first_line(e))
                for k, (dp, m) in dps.items():  # newer entries win, a membership flag is kept
                    if k in self._pending:
                        newer = self._pending[k]
                        self._pending[k] = (newer[0], newer[1] or m)
                    else:
                        self._pending[k] = (dp, m)
                for k, s in syncs.items():
                    self._pending_sync.setdefault(k, s)
                for k, c in canaries.items():
                    self._pending_canary.setdefault(k, c)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                self._wake.set()
            finally:
                self._flushing = False

    async def _write(
        self, dps: dict[str, tuple[DataPlane | None, bool]], syncs: dict[str, dict[str, dict[str, Any]]]
    ) -> None:
        async with self._db() as conn, conn.transaction():
            for instance, (dp, membership) in dps.items():
                if dp is None:
                    await conn.execute(
                        "DELETE FROM dataplanes WHERE instance = %s AND replica = %s",
                        (instance, self.replica),
                    )
                    await conn.execute("DELETE FROM sync_state WHERE instance = %s", (instance,))
                else:
                    await conn.execute(_UPSERT_DP, _dp_params(dp, self.replica))
                if membership:
                    await self._notify(conn, "dataplane", instance)
            for instance, slots in syncs.items():
                for slot, state in slots.items():
                    # only the replica the data plane talks to (a woken-up one must not overwrite)
                    await conn.execute(
                        "INSERT INTO sync_state (instance, slot, state, replica) SELECT %s, %s, %s, %s "
                        "WHERE EXISTS (SELECT 1 FROM dataplanes WHERE instance = %s AND replica = %s) "
                        "ON CONFLICT (instance, slot) DO UPDATE SET state = EXCLUDED.state, "
                        "replica = EXCLUDED.replica, updated_at = now()",
                        (instance, slot, Jsonb(state), self.replica, instance, self.replica),
                    )

    async def load_dataplanes(self) -> list[DataPlane]:
        async with self._db() as conn:
            cur = await conn.execute("SELECT * FROM dataplanes ORDER BY instance")
            return [_row_to_dataplane(r) for r in await cur.fetchall()]

    async def load_dataplane(self, instance: str) -> DataPlane | None:
        async with self._db() as conn:
            cur = await conn.execute("SELECT * FROM dataplanes WHERE instance = %s", (instance,))
            row = await cur.fetchone()
        return _row_to_dataplane(row) if row is not None else None

    async def load_syncs(self) -> dict[str, dict[str, dict[str, Any]]]:
        async with self._db() as conn:
            cur = await conn.execute("SELECT instance, slot, state FROM sync_state")
            out: dict[str, dict[str, dict[str, Any]]] = {}
            for r in await cur.fetchall():
                out.setdefault(r["instance"], {})[r["slot"]] = r["state"]
        return out

    # --- generations --------------------------------------------------------------------------

    def generations(self) -> Generations:
        return self._generations

    async def _reserve(self) -> tuple[int, int]:
        """A block [lo, hi) above every block reserved before (and above the clock)."""
        async with self._db() as conn:
            cur = await conn.execute(
                "UPDATE generation SET high = GREATEST(high, %s) + %s WHERE id = 1 RETURNING high",
                (time.time_ns(), GENERATION_BLOCK),
            )
            row = await cur.fetchone()
        assert row is not None
        high = int(row["high"])
        return high - GENERATION_BLOCK + 1, high + 1

    def _reserve_soon(self) -> asyncio.Future[tuple[int, int]]:
        return asyncio.ensure_future(self._reserve())

    # --- releases -----------------------------------------------------------------------------

    async def publish_release(self, release: StoredRelease, holder: str) -> bool:
        try:
            async with self._db() as conn, conn.transaction():
                async with conn.cursor() as cur:
                    await cur.executemany(
                        "INSERT INTO bundles (digest, data) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                        [(release.digests[k], data) for k, data in sorted(release.bundles.items())]
                        + sorted(release.step_bundles.items()),
                    )
                await conn.execute(
                    "INSERT INTO releases (id, commit, record, digests) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (id) DO NOTHING",
                    (release.id, release.commit, Jsonb(release.record), Jsonb(release.digests)),
                )
                cur2 = await conn.execute(
                    _FENCED_POINTER,
                    {
                        "id": release.id,
                        "token": release.fencing_token,
                        "holder": holder,
                        "seen": release.seen_at,
                        "lock": LOCK,
                    },
                )
                if cur2.rowcount != 1:
                    raise _Refused
                await self._notify(conn, "release", release.id)
        except _Refused:
            return False  # the transaction rolled back: nothing of it is visible
        except psycopg.Error as e:
            raise Unavailable(_first_line(e)) from e
        return True

    async def current_release(self) -> StoredRelease | None:
        async with self._db() as conn:
            cur = await conn.execute(
                "SELECT r.id, r.commit, r.record, r.digests, p.seen_at, p.fencing_token "
                "FROM release_pointer p JOIN releases r ON r.id = p.release_id WHERE p.id = 1"
            )
            row = await cur.fetchone()
            if row is None:
                return None
            digests: dict[str, str] = dict(row["digests"])
            steps = {
                d
                for c in (row["record"].get("canaries") or {}).values()
                for ov in (c.get("overlays") or {}).values()
                for d in ov.values()
            }
            cur = await conn.execute(
                "SELECT digest, data FROM bundles WHERE digest = ANY(%s)",
                (sorted(set(digests.values()) | steps),),
            )
            data = {r["digest"]: bytes(r["data"]) for r in await cur.fetchall()}
        missing = [k for k, d in digests.items() if d not in data]
        if missing:
            raise Unavailable(f"release {row['id']}: bundles missing for {missing[:3]}")
        return StoredRelease(
            id=row["id"],
            commit=row["commit"],
            record=dict(row["record"]),
            digests=digests,
            bundles={k: data[d] for k, d in digests.items()},
            seen_at=_ts(row["seen_at"]),
            fencing_token=int(row["fencing_token"]),
            step_bundles={d: data[d] for d in steps if d in data},
        )

    # --- security metadata, replicas, leader --------------------------------------------------

    async def check_security(self, meta: dict[str, str], cas: dict[str, str]) -> str | None:
        async with self._db() as conn, conn.transaction():
            for key, value in sorted(meta.items()):
                await conn.execute(
                    "INSERT INTO security_meta (key, value) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    (key, value),
                )
            cur = await conn.execute("SELECT key, value FROM security_meta")
            stored = {r["key"]: r["value"] for r in await cur.fetchall()}
            for mesh, pem in sorted(cas.items()):
                await conn.execute(
                    "INSERT INTO ca_certs (mesh, cert_pem, fingerprint) VALUES (%s, %s, %s) "
                    "ON CONFLICT (mesh) DO UPDATE SET cert_pem = EXCLUDED.cert_pem, "
                    "fingerprint = EXCLUDED.fingerprint, updated_at = now()",
                    (mesh, pem, hashlib.sha256(pem.encode()).hexdigest()),
                )
        differ = sorted(k for k, v in meta.items() if stored.get(k) != v)
        if differ:
            return (
                f"this replica's {', '.join(differ)} differ from the other replicas' "
                "(every replica needs the same secrets dir content: CAs, token secret, signing key)"
            )
        return None

    async def replicas(self) -> list[ReplicaInfo]:
        async with self._db() as conn:
            cur = await conn.execute(
                "SELECT id, url, extract(epoch FROM started_at) AS s, extract(epoch FROM last_seen) AS l "
                "FROM replicas ORDER BY id"
            )
            return [ReplicaInfo(r["id"], r["url"], _ts(r["s"]), _ts(r["l"])) for r in await cur.fetchall()]

    async def leader_info(self) -> LeaderInfo | None:
        async with self._db() as conn:
            cur = await conn.execute(
                "SELECT holder, token, extract(epoch FROM expires_at) AS e FROM leader_lock WHERE name = %s",
                (LOCK,),
            )
            row = await cur.fetchone()
        if row is None:
            return None
        exp = float(row["e"])
        return LeaderInfo(row["holder"], int(row["token"]), exp if exp != float("-inf") else None)

    def elector(self, lease_s: float) -> Elector:
        return PostgresElector(self.url, self.replica, lease_s)


class _Refused(Exception):
    pass


_UPSERT_DP = """
INSERT INTO dataplanes (instance, mesh, service, kind, tags, inbound_address, admin_address, boot_id,
                        registered_at, last_seen, online, replica, running, generations, pieces, reachable,
                        endpoint_deltas, pieces_formats)
VALUES (%(instance)s, %(mesh)s, %(service)s, %(kind)s, %(tags)s, %(inbound_address)s, %(admin_address)s,
        %(boot_id)s, %(registered_at)s, %(last_seen)s, %(online)s, %(replica)s, %(running)s, %(generations)s,
        %(pieces)s, %(reachable)s, %(endpoint_deltas)s, %(pieces_formats)s)
ON CONFLICT (instance) DO UPDATE SET
    mesh = EXCLUDED.mesh, service = EXCLUDED.service, kind = EXCLUDED.kind, tags = EXCLUDED.tags,
    inbound_address = EXCLUDED.inbound_address, admin_address = EXCLUDED.admin_address,
    boot_id = EXCLUDED.boot_id, registered_at = EXCLUDED.registered_at, last_seen = EXCLUDED.last_seen,
    online = EXCLUDED.online, replica = EXCLUDED.replica, running = EXCLUDED.running,
    generations = EXCLUDED.generations, pieces = EXCLUDED.pieces, reachable = EXCLUDED.reachable,
    endpoint_deltas = EXCLUDED.endpoint_deltas, pieces_formats = EXCLUDED.pieces_formats
-- a replica that lost the data plane to another (a newer registration) does not take it back
WHERE dataplanes.replica = EXCLUDED.replica OR dataplanes.registered_at <= EXCLUDED.registered_at
"""

_FENCED_POINTER = """
UPDATE release_pointer
   SET release_id = %(id)s, fencing_token = %(token)s, holder = %(holder)s, seen_at = %(seen)s,
       updated_at = now()
 WHERE id = 1
   AND fencing_token <= %(token)s
   AND EXISTS (SELECT 1 FROM leader_lock
                WHERE name = %(lock)s AND holder = %(holder)s AND token = %(token)s AND expires_at > now())
"""


def _dp_params(dp: DataPlane, replica: str) -> dict[str, Any]:
    return {
        "instance": dp.instance,
        "mesh": dp.mesh,
        "service": dp.service,
        "kind": dp.kind,
        "tags": Jsonb(dp.tags),
        "inbound_address": dp.inbound_address,
        "admin_address": dp.admin_address,
        "boot_id": dp.boot_id,
        "registered_at": dp.registered_at,
        "last_seen": dp.last_seen,
        "online": dp.online,
        "replica": replica,
        "running": Jsonb(dp.running),
        "generations": Jsonb(dp.generations),
        "pieces": dp.pieces,
        "reachable": Jsonb(list(dp.reachable)) if dp.reachable is not None else None,
        "endpoint_deltas": dp.endpoint_deltas,
        "pieces_formats": Jsonb(list(dp.pieces_formats)) if dp.pieces_formats is not None else None,
    }


class PostgresElector:
    """The lock row ``leader_lock``: taken when free or expired (the database's clock), renewed
    every third of the lease; each take adds one to the fencing token. This process counts itself
    the leader only until its own monotonic clock says the lease it last renewed may have ended,
    so a paused process (SIGSTOP) wakes up as a follower, and the database refuses its writes
    anyway: they carry a token that is no longer the row's."""

    def __init__(self, url: str, identity: str, lease_s: float = 10.0) -> None:
        self.url = url
        self.identity = identity
        self.lease_s = lease_s
        self.retry_s = lease_s / 3
        self._conn: psycopg.AsyncConnection[dict[str, Any]] | None = None
        self._token: int | None = None
        self._deadline = 0.0
        self.transitions = 0

    @property
    def leader(self) -> bool:
        return self._token is not None and time.monotonic() < self._deadline

    @property
    def fencing_token(self) -> int | None:
        return self._token if self.leader else None

    async def _exec(self, sql: str, params: tuple[Any, ...]) -> dict[str, Any] | None:
        if self._conn is None or self._conn.closed:
            self._conn = await _connect(self.url)
        try:
            cur = await self._conn.execute(sql, params)
            return await cur.fetchone()
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
            raise Unavailable(_first_line(e)) from e

    async def round(self) -> bool:
        """Renew or try to take the lease once; whether this replica leads after it."""
        t0 = time.monotonic()
        if self._token is not None:
            row = await self._exec(
                "UPDATE leader_lock SET expires_at = now() + make_interval(secs => %s) "
                "WHERE name = %s AND holder = %s AND token = %s RETURNING token",
                (self.lease_s, LOCK, self.identity, self._token),
            )
            if row is not None:
                self._deadline = t0 + self.lease_s
                return True
            print(f"meshc controlplane: {self.identity} lost the lead (token {self._token})", file=sys.stderr)
            self._token = None
        row = await self._exec(
            "UPDATE leader_lock SET holder = %s, token = token + 1, acquired_at = now(), "
            "expires_at = now() + make_interval(secs => %s) "
            "WHERE name = %s AND (holder IS NULL OR holder = %s OR expires_at <= now()) RETURNING token",
            (self.identity, self.lease_s, LOCK, self.identity),
        )
        if row is None:
            return False
        self._token = int(row["token"])
        self._deadline = t0 + self.lease_s
        self.transitions += 1
        return True

    async def run(self) -> None:
        while True:
            try:
                await self.round()
            except (Unavailable, psycopg.Error) as e:
                log.warning("leader lock: %s", _first_line(e))
            await asyncio.sleep(self.retry_s)

    async def release(self) -> None:
        if self._token is None:
            return
        with contextlib.suppress(Unavailable, psycopg.Error):
            await self._exec(
                "UPDATE leader_lock SET holder = NULL, expires_at = '-infinity' "
                "WHERE name = %s AND holder = %s AND token = %s RETURNING token",
                (LOCK, self.identity, self._token),
            )
        self._token = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
