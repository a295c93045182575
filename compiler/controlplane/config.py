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
    """The API listener's read timeouts and connection limit, as every data-plane listener has."""
