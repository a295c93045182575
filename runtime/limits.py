"""What one listener lets a client take, the same for every listener of a sidecar.

The admin API (``runtime._http``) and the fast data listeners (``runtime.fastconn``) enforce it;
the defaults bound a slow-loris connection to 10 s. nginx's ``client_header_timeout`` and
``client_body_timeout`` are 60 s and its ``worker_connections`` 512; Envoy's
``request_headers_timeout`` is off by default. A proxy beside one service instance needs far less
patience than an edge server, and a control channel needs none.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

__all__ = ["ListenerLimits", "add_limit_arguments", "limits_from_args"]


@dataclass(frozen=True)
class ListenerLimits:
    """Time to send a request head (from the connection, or from the previous answer on the admin
    API), time between two reads of a request body (the admin API: the whole body), and
    connections at once per listener (more are answered 503 and closed)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 15.0
    max_connections: int = 1024


def add_limit_arguments(group: argparse._ActionsContainer, admin: bool = True) -> None:
    """``--header-timeout``, ``--body-timeout`` and ``--max-connections`` (sidecar, gateway and
    control plane alike); ``admin`` adds what differs on the sidecar's admin API."""
    d = ListenerLimits()
    group.add_argument(
        "--header-timeout",
        type=float,
        default=d.header_timeout_s,
        metavar="S",
        help="every listener: a request head must arrive within S seconds of the connection"
        + (" (the admin API: or of the previous answer)" if admin else "")
        + ", else 408 and close (default %(default)s)",
    )
    group.add_argument(
        "--body-timeout",
        type=float,
        default=d.body_timeout_s,
        metavar="S",
        help="every listener: no more than S seconds between two reads of a request body"
        + (" (the admin API: the whole body)" if admin else "")
        + ", else 408 and close (default %(default)s)",
    )
    group.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        metavar="N",
        help="every listener: connections at once; more are answered 503 and closed (default %(default)s)",
    )


def limits_from_args(ns: argparse.Namespace) -> ListenerLimits:
    """The limits the flags ask for; ``ValueError`` saying which bounds were broken."""
    if not (0 < ns.header_timeout <= 3600 and 0 < ns.body_timeout <= 3600 and ns.max_connections > 0):
        raise ValueError("--header-timeout and --body-timeout must be in (0, 3600], --max-connections > 0")
    return ListenerLimits(ns.header_timeout, ns.body_timeout, ns.max_connections)
