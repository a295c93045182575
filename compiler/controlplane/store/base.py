"""The ``Store`` and ``Elector`` protocols (what the server, the registry and the pusher rely on).

Writes on the request path (a registration, a heartbeat, an ACK) never wait for the store: they
are queued and written behind (coalesced per data plane), so a database that restarts costs
nothing but lag, and the replica keeps serving from memory meanwhile. Reads happen at start and
when another replica says something changed (``on_change``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from compiler.controlplane.generation import Generations
    from compiler.controlplane.registry import DataPlane

__all__ = ["Elector", "LeaderInfo", "ReplicaInfo", "Store", "StoreError", "StoredRelease"]


class StoreError(Exception):
    """The store cannot be opened or migrated (a clear message, no traceback, exit 2)."""


@dataclass(frozen=True)
class StoredRelease:
    id: str
    commit: str | None
    record: dict[str, Any]
    digests: dict[str, str]
    bundles: dict[str, bytes]
    """Bundle key -> canonical bytes (content-addressed: digest = sha256 of the bytes)."""
    seen_at: float
    fencing_token: int
    step_bundles: dict[str, bytes] = field(default_factory=dict)
    """Digest -> bytes of its Canary steps' bundles (followers move the same pointer)."""


@dataclass(frozen=True)
class ReplicaInfo:
    id: str
    url: str
    started_at: float
    last_seen: float


@dataclass(frozen=True)
class LeaderInfo:
    holder: str | None
    token: int
    expires_at: float | None
    """Unix time the lease ends (the database's clock)."""


ChangeListener = Callable[[str, str], None]
"""Called with (topic, key): ``dataplane``/instance, ``release``/id, ``resync``/"" (reconnected)."""


class Store(Protocol):
    name: str
    """``local`` or ``postgres``."""
    shared: bool
    """Whether several replicas share it (then only the elected leader compiles and publishes)."""
    replica: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def on_change(self, fn: ChangeListener) -> None: ...

    # --- registry (write-behind) ------------------------------------------------------------

    async def load_dataplanes(self) -> list[DataPlane]: ...

    def save_dataplane(self, dp: DataPlane, *, membership: bool) -> None:
        """Queue ``dp``'s row; ``membership``: a registration or online change others must hear of."""

    def remove_dataplane(self, instance: str) -> None: ...

    def save_sync(self, instance: str, slots: dict[str, dict[str, Any]]) -> None: ...

    async def load_syncs(self) -> dict[str, dict[str, dict[str, Any]]]: ...

    # --- canaries (write-behind) --------------------------------------------------------------

    def save_canary(self, key: str, state: dict[str, Any] | None) -> None:
        """Queue a Canary's state (None: it is gone), so a restart resumes at the same step."""

    async def load_canaries(self) -> dict[str, dict[str, Any]]: ...

    # --- generations, releases ----------------------------------------------------------------

    def generations(self) -> Generations: ...

    async def publish_release(self, release: StoredRelease, holder: str) -> bool:
        """Make ``release`` current if ``holder`` still holds ``release.fencing_token``."""

    async def current_release(self) -> StoredRelease | None: ...

    # --- security metadata, replicas, leader --------------------------------------------------

    async def check_security(self, meta: dict[str, str], cas: dict[str, str]) -> str | None:
        """Record (or compare) what replicas must share; a message when this one differs."""

    async def replicas(self) -> list[ReplicaInfo]: ...

    async def leader_info(self) -> LeaderInfo | None: ...

    def elector(self, lease_s: float) -> Elector: ...


class Elector(Protocol):
    """Who does the singleton work (poll Git, compile, publish a release)."""

    identity: str

    @property
    def leader(self) -> bool: ...

    @property
    def fencing_token(self) -> int | None:
        """Grows with every change of holder; every write done as the leader carries it."""

    async def run(self) -> None:
        """Acquire and renew until cancelled."""

    async def release(self) -> None:
        """Give up the lease (a clean stop), so another takes over at once."""
