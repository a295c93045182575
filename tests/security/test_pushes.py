"""Only the control plane may change a data plane (DESIGN §6): signed pushes, replay protection
across control plane restarts, and keys that stay out of logs. Runs after test_mtls on the same
mesh (it restarts the control plane and changes a policy)."""

from __future__ import annotations

import base64
import json
import re
import stat
from dataclasses import replace
from typing import Any

from secure_mesh import (
    PERMISSION,
    ProxyClient,
    SecureMesh,
    meshc,
    metric_value,
    push_target,
    signed_headers,
    wait_until,
)

from compiler.ca import PushSigner, TokenIssuer
from runtime.bundle import canonical_json
from runtime.protocol import HDR_BUNDLE_ROLE, HDR_SIGNATURE


def _put(plane: Any, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    status, raw = plane.admin_request("PUT", path, body, headers)
    return status, json.loads(raw)


def test_forged_unsigned_cross_target_and_replayed_pushes_are_refused(secure_mesh: SecureMesh) -> None:
    benigno = secure_mesh.planes["benigno"]
    v1 = secure_mesh.planes["magnanimo-v1"]
    before = benigno.config()
    running = before["bundles"]["mesh"]
    generation = int(running["generation"])
    # A valid mesh bundle that would change behaviour: passthrough flipped.
    doc = running["bundle"]
    doc["passthrough"] = not doc["passthrough"]
    data = canonical_json(doc)
    cp_key = PushSigner(secure_mesh.cp.secrets)  # the control plane's own key, as a thief would have it
    forger = PushSigner(secure_mesh.work / "forger")
    me = push_target(benigno)
    newer = generation + 1_000_000
    older = generation - 1

    cases = {
        "unsigned": (signed_headers(None, me, "mesh", data, newer), 403),
        "forged": (signed_headers(forger, me, "mesh", data, newer), 403),
        "cross-service": (signed_headers(cp_key, replace(me, service="magnanimo"), "mesh", data, newer), 403),
        "cross-mesh": (signed_headers(cp_key, replace(me, mesh="other"), "mesh", data, newer), 403),
        "cross-instance": (
            signed_headers(cp_key, replace(me, instance="benigno-0"), "mesh", data, newer),
            403,
        ),
        "earlier boot": (signed_headers(cp_key, replace(me, boot="0" * 32), "mesh", data, newer), 403),
        "other slot": (
            {**signed_headers(cp_key, me, "service", data, newer), HDR_BUNDLE_ROLE: "mesh"},
            403,
        ),
        "replayed": (signed_headers(cp_key, me, "mesh", data, older), 409),
        "garbage signature": (
            {**signed_headers(None, me, "mesh", data, newer), HDR_SIGNATURE: "zz" * 64},
            403,
        ),
    }
    for what, (headers, want) in cases.items():
        status, reply = _put(benigno, "/bundle", data, headers)
        assert status == want, (what, status, reply)
        assert "nack" in reply, what

    eps = before["endpoints"]
    body = json.dumps({"generation": eps["generation"] + 1, "services": {}}).encode()
    status, reply = _put(
        benigno, "/endpoints", body, signed_headers(None, me, "endpoints", body, eps["generation"] + 1)
    )
    assert status == 403, reply  # unsigned: would have emptied every route
    old = json.dumps({"generation": eps["generation"] - 1, "services": {}}).encode()
    status, reply = _put(
        benigno, "/endpoints", old, signed_headers(cp_key, me, "endpoints", old, eps["generation"] - 1)
    )
    assert status == 409, reply  # replayed: an older generation
    other = replace(me, service="magnanimo")
    status, reply = _put(
        benigno, "/endpoints", body, signed_headers(cp_key, other, "endpoints", body, eps["generation"] + 1)
    )
    assert status == 403, reply

    after = benigno.config()
    assert after["bundles"]["mesh"]["digest"] == running["digest"]
    assert after["bundles"]["mesh"]["generation"] == generation
    assert after["endpoints"] == eps
    metrics = benigno.metrics()
    assert metric_value(metrics, "meshc_push_rejections_total", reason="unsigned") >= 2
    assert metric_value(metrics, "meshc_push_rejections_total", reason="bad_signature") >= 8
    # The old configuration still serves.
    assert v1.outbound is not None
    status, _, _ = ProxyClient(v1.outbound).get("http://benigno:5000/still")
    assert status == 200


def test_control_plane_restart_does_not_look_like_a_replay(secure_mesh: SecureMesh) -> None:
    benigno = secure_mesh.planes["benigno"]
    v2 = secure_mesh.planes["magnanimo-v2"]
    assert v2.outbound is not None
    before = benigno.config()["bundles"]["service"]
    serials = {n: p.config()["certificate"]["serial"] for n, p in secure_mesh.planes.items()}
    rejected = metric_value(benigno.metrics(), "meshc_reloads_total", result="nack")
    secure_mesh.cp.stop()
    secure_mesh.cp.start()
    # A policy change after the restart: magnanimo v2 may now call benigno too.
    (secure_mesh.cp.policies / "permission-v2.yaml").write_text(
        PERMISSION.format(name="magnanimo-v2-to-benigno", version="v2")
    )

    def pushed() -> bool:
        slot = benigno.config()["bundles"]["service"]
        return bool(slot["digest"] != before["digest"])

    wait_until(pushed, "the new benigno bundle from the restarted control plane")
    after = benigno.config()["bundles"]["service"]
    assert after["generation"] > before["generation"]
    assert metric_value(benigno.metrics(), "meshc_reloads_total", result="nack") == rejected

    # With 6 s certificates a control plane down for seconds lets some expire; they are renewed
    # from the restarted one (authenticated by the certificate, the registry having been kept).
    def renewed() -> bool:
        return all(p.config()["certificate"]["serial"] != serials[n] for n, p in secure_mesh.planes.items())

    wait_until(renewed, "certificates renewed by the restarted control plane")
    status, _, body = ProxyClient(v2.outbound).get("http://benigno:5000/now-allowed")
    assert status == 200, body


def test_meshc_token_matches_the_control_plane_secret(secure_mesh: SecureMesh) -> None:
    r = meshc(
        "token", "--mesh", "default", "--service", "benigno", "--state-dir", str(secure_mesh.cp.secrets)
    )
    assert r.returncode == 0, r.stderr
    assert TokenIssuer(secure_mesh.cp.secrets).check(r.stdout.strip(), "default", "benigno")
    assert not TokenIssuer(secure_mesh.cp.secrets).check(r.stdout.strip(), "other", "benigno")
    r = meshc(
        "token", "--service", "benigno", "--valid-for", "soon", "--state-dir", str(secure_mesh.cp.secrets)
    )
    assert r.returncode == 2 and "--valid-for" in r.stderr


def test_keys_are_private_and_never_logged(secure_mesh: SecureMesh) -> None:
    secrets = secure_mesh.cp.secrets
    for name in ("ca-default.key", "token.secret", "push-signing.key"):
        assert stat.S_IMODE((secrets / name).stat().st_mode) == 0o600, name
    key_pem = (secrets / "ca-default.key").read_text()
    b64 = "".join(line for line in key_pem.splitlines() if not line.startswith("-----"))
    der = base64.b64decode(b64)
    needles = [b64[i : i + 24] for i in range(0, len(b64) - 24, 12)] + [der.hex()[:32]]
    token_secret = (secrets / "token.secret").read_bytes()
    texts = {str(p): p.read_text(errors="replace") for p in secure_mesh.logs()}
    for name, plane in secure_mesh.planes.items():
        texts[f"{name} stdout"] = json.dumps(plane.events)
        state = secure_mesh.work / f"state-{name}"
        for f in state.rglob("*"):  # no data plane key ever reaches its state dir
            if f.is_file():
                assert b"PRIVATE KEY" not in f.read_bytes(), f
        assert re.fullmatch(r"[0-9a-f]{64}\n", (state / "controlplane.pub").read_text())
    assert texts
    for where, text in texts.items():
        assert "PRIVATE KEY" not in text, where
        for n in needles:
            assert n not in text, where
        assert token_secret.hex() not in text, where
        for line in text.splitlines():
            assert "Bearer " not in line, where
