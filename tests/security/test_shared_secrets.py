"""``meshc secrets``: what every control plane replica must share (issue 13/14). Two control planes
given the same ``--secrets-dir`` (made by the command, as the Secret ``meshc-secrets`` is on
Kubernetes) sign with one key and admit one token secret, so a data plane that fails over from
one to the other keeps trusting its pushes; and they write nothing into that directory, which
``meshc manifests`` mounts read-only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from secure_mesh import REPO, ControlPlaneProc, FakeDataPlane

from compiler.ca import PushSigner, TokenIssuer


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _secrets(out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "compiler.cli", "secrets", "--out", str(out), "--mesh", "default"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_two_replicas_given_one_secrets_dir_share_the_signing_key_and_tokens(tmp_path: Path) -> None:
    shared = tmp_path / "secrets"
    made = _secrets(shared)
    assert made.returncode == 0, made.stderr
    assert (
        made.stdout.strip()
        == f"kubectl -n meshc-system create secret generic meshc-secrets --from-file={shared}"
    )
    files = _snapshot(shared)
    assert {"push-signing.key", "token.secret", "ca-default.key", "ca-default.crt"} <= set(files)
    again = _secrets(shared)
    assert again.returncode == 0 and _snapshot(shared) == files, "a second run keeps what exists"

    key = PushSigner(shared).public_key_hex
    token = TokenIssuer(shared).mint("default", "benigno")
    for i in range(2):
        (tmp_path / f"replica-{i}").mkdir()
    replicas = [
        ControlPlaneProc(REPO / "policies", tmp_path / f"replica-{i}", extra=["--secrets-dir", str(shared)])
        for i in range(2)
    ]
    try:
        for cp in replicas:
            cp.start()
            fake = FakeDataPlane(cp, "default", "benigno", token)
            try:
                status, reply = fake.register()
                assert status == 200, reply
                assert reply["signing_key"] == key, "each replica signs with the shared key"
            finally:
                fake.close()
    finally:
        for cp in replicas:
            cp.stop()
    assert _snapshot(shared) == files, "the replicas wrote nothing into the shared secrets"
