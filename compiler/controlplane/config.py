"""The control plane's configuration (its own module: the parts read it, none imports the server)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from runtime.limits import ListenerLimits

__all__ = ["Config"]


@dataclass
class Config:
    policy_dir: Path
    out: Path
    host: str = "127.0.0.1"
    port: int = 5681
    ref: str | None = None
    repo: Path | None = None
    fetch_interval_s: float | None = None
    poll_interval_s: float = 0.2
    state_dir: Path | None = None
    heartbeat_interval_s: float = 1.0
    rejoin_window_s: float | None = None
    """After a start without a registry, how long data planes have to come back (default: 3.5
    heartbeat intervals + 2 s): the learned endpoints of the others are kept that long."""
    missed_heartbeats: int = 3
    concurrency: int = 32
    token: str | None = None
    watch: bool = True
    registration_auth: bool = True
    """Registration needs a bootstrap token or the current certificate (DESIGN §6)."""
    secrets_dir: Path | None = None
    """Where the CAs, the token secret and the push-signing key live (default: ``state_dir``)."""
    quiet: bool = False
    kubernetes: str | None = None
    """``in-cluster`` or an API server URL: endpoints from EndpointSlices, TokenReview, a Lease."""
    kubernetes_token: str | None = None
    limits: ListenerLimits = field(default_factory=ListenerLimits)
    promote_commit: str | None = None
    """Branch prefix: a promoted Canary's weights become a commit on ``PREFIX/<mesh>-<name>``."""
    """The API listener's read timeouts and connection limit, as every data-plane listener has."""
    store: str | None = None
    """``postgres://...`` for replicas sharing one PostgreSQL; None: the state dir (one replica)."""
    replica_id: str | None = None
    """This replica's name in the store (default: host name and port)."""
    lease_s: float = 10.0
    """The leader's lease: a replica that stops renewing is replaced within it."""
