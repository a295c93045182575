"""What one listener lets a client take, the same for every listener of a sidecar.

The admin API (``runtime._http``) and the fast data listeners (``runtime.fastconn``) enforce it;
the defaults bound a slow-loris connection to 10 s. nginx's ``client_header_timeout`` and
``client_body_timeout`` are 60 s and its ``worker_connections`` 512; Envoy's
``request_headers_timeout`` is off by default. A proxy beside one service instance needs far less
patience than an edge server, and a control channel needs none.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ListenerLimits"]


@dataclass(frozen=True)
class ListenerLimits:
    """Time to send a request head (from the connection, or from the previous answer on the admin
    API), time between two reads of a request body (the admin API: the whole body), and
    connections at once per listener (more are answered 503 and closed)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 15.0
    max_connections: int = 1024
