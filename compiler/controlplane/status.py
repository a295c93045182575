"""The per data plane sync view, as ``istioctl proxy-status`` shows it.

A slot is SYNCED when the data plane acknowledged the digest the current release wants, STALE
when that digest was sent but not acknowledged (in flight, refused, or the data plane did not
answer), and NOT SENT when it was not sent yet. A data plane is as bad as its worst slot; one
whose mesh has no bundle in the current release is NOT SENT.
"""

from __future__ import annotations

import time
from typing import Any

from compiler.controlplane.pusher import SLOTS, DataPlaneSync
from compiler.controlplane.registry import DataPlane

__all__ = ["dataplane_row", "overall_status", "render_table"]

_RANK = {"SYNCED": 0, "-": 0, "NOT SENT": 1, "STALE": 2}


def overall_status(sync: DataPlaneSync | None) -> str:
    if sync is None or sync.slots["mesh"].desired is None:
        return "NOT SENT"
    worst = max((sync.slots[s].status for s in SLOTS), key=lambda x: _RANK[x])
    return "SYNCED" if worst == "-" else worst


def dataplane_row(dp: DataPlane, sync: DataPlaneSync | None, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    slots = {s: sync.slots[s].as_json() for s in SLOTS} if sync else {}
    acks = [v["last_ack_at"] for v in slots.values() if v["last_ack_at"]]
    nacks = [(v["last_nack_at"], v["nack"]) for v in slots.values() if v["nack"]]
    errors = [v["error"] for v in slots.values() if v["error"]]
    row = dp.as_json()
    row.update(
        {
            "state": "Online" if dp.online else "Offline",
            "status": overall_status(sync),
            "slots": slots,
            "digest": {s: (slots[s]["acked"] if slots else None) for s in ("mesh", "service")},
            "last_seen_ago_s": round(max(0.0, now - dp.last_seen), 3),
            "last_ack_at": max(acks) if acks else None,
            "last_nack": max(nacks)[1] if nacks else None,
            "last_error": errors[0] if errors else None,
        }
    )
    return row


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def render_table(rows: list[dict[str, Any]], now: float | None = None) -> str:
    """``meshc status`` text: one line per data plane, like ``istioctl proxy-status``."""
    now = time.time() if now is None else now
    head = [
        "NAME",
        "SERVICE",
        "TAGS",
        "KIND",
        "STATE",
        "EDS",
        "MESH",
        "SERVICE-BUNDLE",
        "STATUS",
        "DIGEST",
        "SEEN",
        "LAST ACK",
        "LAST NACK",
    ]
    lines = [head]
    for r in rows:
        slots = r.get("slots") or {}

        def st(slot: str, slots: dict[str, Any] = slots) -> str:
            return str(slots.get(slot, {}).get("status", "NOT SENT"))

        digest = (r.get("digest") or {}).get("service") or (r.get("digest") or {}).get("mesh") or "-"
        ack = r.get("last_ack_at")
        lines.append(
            [
                r["instance"],
                r["service"],
                ",".join(f"{k}={v}" for k, v in sorted(r.get("tags", {}).items())) or "-",
                r["kind"],
                r["state"],
                st("endpoints"),
                st("mesh"),
                st("service"),
                r["status"],
                digest[:12],
                _ago(r.get("last_seen_ago_s")),
                _ago(now - ack) + " ago" if ack else "-",
                (r.get("last_nack") or "-")[:60],
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
