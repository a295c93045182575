"""The per data plane sync view, as ``istioctl proxy-status`` shows it.

A slot is SYNCED when the data plane acknowledged the digest the current release wants, STALE
when that digest was sent but not acknowledged (in flight, refused, or the data plane did not
answer), and NOT SENT when it was not sent yet. A data plane is as bad as its worst slot; one
whose mesh has no bundle in the current release is NOT SENT. The text table is
``status_table`` (light, for the CLI).
"""

from __future__ import annotations

import time
from typing import Any

from compiler.controlplane.pusher import SLOTS, DataPlaneSync
from compiler.controlplane.registry import DataPlane
from runtime.pieces import choose_format

__all__ = ["dataplane_row", "overall_status"]

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
    lags = [v["lag_s"] for v in slots.values() if v["lag_s"] is not None and v["status"] != "-"]
    last_lags = [v["last_lag_s"] for v in slots.values() if v["last_lag_s"] is not None]
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
            "lag_s": max(lags) if lags and dp.online else None,
            "last_lag_s": max(last_lags) if last_lags else None,
            # the mesh manifest format it is served (None: whole mesh bundles, or none in common)
            "pieces_format": choose_format(dp.pieces_formats) if dp.pieces else None,
        }
    )
    return row
