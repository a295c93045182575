"""``meshc status`` text from the status view's JSON rows, as ``kubectl get`` prints tables.

It imports nothing of the control plane, so the command starts in a few tens of milliseconds.
The default table fits 100 columns (names and tags are shortened with ``…`` when they must be);
``-o wide`` adds the per-slot state, the mesh manifest format it is served (``FMT``: ``2``,
``1``; ``bundle`` for whole mesh bundles; ``none`` when it runs no format made here), the lag
(how long its oldest unacknowledged change has waited, else ``=`` and the change-to-ACK time of
its last ACK), the addresses, the last ACK, the last NACK and the control plane replica the data
plane talks to.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["WIDTH", "ago", "format_text", "lag_text", "render_table"]

WIDTH = 100


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: max(1, n - 1)] + "…"


def _cells(r: dict[str, Any], now: float, wide: bool) -> list[str]:
    slots = r.get("slots") or {}

    def st(slot: str) -> str:
        """The slot's state; a STALE one with the digest it runs (heartbeats report it)."""
        s = slots.get(slot, {})
        state = str(s.get("status", "NOT SENT"))
        running = s.get("running")
        if state == "STALE" and running and running != s.get("desired"):
            return f"STALE({running[:8]})"
        return state

    digests = r.get("digest") or {}
    digest = digests.get("service") or digests.get("mesh") or "-"
    tags = ",".join(f"{k}={v}" for k, v in sorted((r.get("tags") or {}).items())) or "-"
    row = [r["instance"], r["service"], tags, r["state"], r["status"], digest[:12]]
    row.append(ago(r.get("last_seen_ago_s")))
    if wide:
        ack = r.get("last_ack_at")
        row += [
            r["kind"],
            st("endpoints"),
            st("mesh"),
            format_text(r),
            st("service"),
            lag_text(r),
            r.get("admin_address") or "-",
            r.get("inbound_address") or "-",
            ago(now - ack) + " ago" if ack else "-",
            r.get("last_nack") or r.get("last_error") or "-",
            r.get("replica") or "-",
        ]
    return row


def format_text(r: dict[str, Any]) -> str:
    """The mesh manifest format a data plane is served: ``2``, ``1``, ``bundle``, ``none``."""
    if "pieces_format" not in r:
        return "-"  # a control plane from before formats
    if not r.get("pieces"):
        return "bundle"
    fmt = r.get("pieces_format")
    return str(fmt) if fmt is not None else "none"


def lag_text(r: dict[str, Any]) -> str:
    """Waiting now (its oldest unacknowledged change), else ``=`` its last change-to-ACK time."""
    lag, last = r.get("lag_s"), r.get("last_lag_s")
    if lag is not None:
        return f"{lag:.1f}s"
    return f"={last:.2f}s" if last is not None else "-"


_HEAD = ["NAME", "SERVICE", "TAGS", "STATE", "STATUS", "DIGEST", "SEEN"]
_WIDE = [
    "KIND",
    "EDS",
    "MESH",
    "FMT",
    "SERVICE-BUNDLE",
    "LAG",
    "ADMIN",
    "INBOUND",
    "LAST ACK",
    "LAST NACK",
    "REPLICA",
]
_SHRINK = (0, 2, 1)
"""Columns shortened, in this order, when the default table is wider than ``WIDTH``."""


def render_table(rows: list[dict[str, Any]], now: float | None = None, wide: bool = False) -> str:
    """One line per data plane, like ``istioctl proxy-status``."""
    now = time.time() if now is None else now
    lines = [_HEAD + _WIDE if wide else list(_HEAD)]
    lines += [_cells(r, now, wide) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    if not wide:
        for col in _SHRINK:
            over = sum(widths) + 2 * (len(widths) - 1) - WIDTH
            if over <= 0:
                break
            widths[col] = max(len(lines[0][col]), 12, widths[col] - over)
        lines = [[_cut(c, widths[i]) for i, c in enumerate(line)] for line in lines]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
