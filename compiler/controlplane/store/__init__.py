"""Where the control plane keeps its state: behind ``Store``, in a state dir or in PostgreSQL.

* ``base``: the ``Store`` and ``Elector`` protocols and the records they move.
* ``local``: the state directory (the default; one replica, always the leader).
* ``postgres``: PostgreSQL for replicas (``--store postgres://...``): registrations, heartbeats,
  sync state, generations, releases and the release pointer, CA and token metadata (never a key),
  a lock row with a lease and a fencing token, LISTEN/NOTIFY between replicas.
* ``migrations/``: the versioned schema, applied in order, each in one transaction.
"""

from __future__ import annotations

from pathlib import Path

from compiler.controlplane.store.base import Elector, Store, StoreError

__all__ = ["Elector", "Store", "StoreError", "open_store"]


def open_store(url: str | None, state_dir: Path | None, replica: str, replica_url: str) -> Store:
    """``None`` or ``file:``/a path: the state directory; ``postgres://`` or ``postgresql://``: PostgreSQL."""
    if url and url.startswith(("postgres://", "postgresql://")):
        from compiler.controlplane.store.postgres import PostgresStore

        return PostgresStore(url, replica=replica, replica_url=replica_url)
    from compiler.controlplane.store.local import LocalStore

    if url:
        state_dir = Path(url.removeprefix("file:"))
    return LocalStore(state_dir, replica=replica, replica_url=replica_url)
