"""What a sidecar reports when it registers again: the signed endpoint set it runs and that set's
digest must be the same set at every moment, including while a push is being saved to the state
dir. A control plane takes the signed set as the base of its next delta (``adopt_endpoints``): an
older signed set paired with the newer digest made it send a delta over a base the sidecar did not
run (a 422 and a whole set resent), and a failed save must put back both, not one."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path

import pytest
from runtime_harness import HANG_DEADLINE

from compiler.ca import PushSigner
from runtime.engine import Engine
from runtime.metrics import Metrics
from runtime.protocol import (
    Endpoint,
    EndpointSet,
    endpoint_set_digest,
    service_endpoints_digest,
)
from runtime.pushes import Pushes
from runtime.security import PushTrust
from runtime.state import StateDir, StoredState


class GatedState(StateDir):
    """A real state dir whose saves wait for the test (``gate``), or fail (``fail``)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def save(self, service: str, state: StoredState) -> None:
        self.entered.set()
        assert self.gate.wait(HANG_DEADLINE), "the test never let the save go on"
        if self.fail:
            raise OSError(28, "No space left on device")
        super().save(service, state)


def _set(generation: int, *addresses: str) -> bytes:
    services = {"benigno": [Endpoint(address=a, tags={"version": "v1"}) for a in addresses]}
    digests = {n: service_endpoints_digest(n, eps) for n, eps in services.items()}
    eps = EndpointSet(generation=generation, services=services, digest=endpoint_set_digest(digests, False))
    return eps.model_dump_json().encode()


def _pushes(tmp_path: Path, signer: PushSigner) -> tuple[Pushes, GatedState]:
    async def nothing() -> None:
        return None

    state = GatedState(tmp_path / "state")
    trust = PushTrust(None, trust_key=signer.public_key_hex)
    engine = Engine("magnanimo", {"version": "v1"})
    return Pushes(engine, Metrics(), state, trust, lambda snap: None, nothing), state


async def _push(pushes: Pushes, signer: PushSigner, body: bytes, generation: int) -> int:
    target = pushes.target()
    assert target is not None
    sig = signer.sign(target, "endpoints", hashlib.sha256(body).hexdigest(), generation)
    status, _ = await pushes.push_endpoints(body, generation, sig)
    return status


def _reported(pushes: Pushes) -> tuple[str | None, str | None]:
    """(the digest of the signed set a registration carries, the running digest it carries)."""
    signed = pushes.endpoints_signed
    whole = EndpointSet.model_validate_json(signed.assembled or signed.body) if signed else None
    return (whole.digest if whole else None), pushes.running()[0].get("endpoints")


@pytest.fixture
def signer(tmp_path: Path) -> PushSigner:
    return PushSigner(tmp_path / "signer")


async def _running_one(
    tmp_path: Path, signer: PushSigner
) -> tuple[Pushes, GatedState, tuple[str | None, ...]]:
    """A sidecar running a first signed set, and what it reports of it."""
    pushes, state = _pushes(tmp_path, signer)
    assert await _push(pushes, signer, _set(1, "127.0.0.1:7001"), 1) == 200
    first = _reported(pushes)
    assert first[0] is not None and first[0] == first[1]
    return pushes, state, first


def test_a_registration_made_while_a_push_is_saved_reports_one_set(
    tmp_path: Path, signer: PushSigner
) -> None:
    async def run() -> None:
        pushes, state, first = await _running_one(tmp_path, signer)
        state.gate.clear()
        state.entered.clear()
        task = asyncio.ensure_future(_push(pushes, signer, _set(2, "127.0.0.1:7002"), 2))
        assert await asyncio.to_thread(state.entered.wait, HANG_DEADLINE)
        during = _reported(pushes)  # what a registration made now would carry
        state.gate.set()
        assert await task == 200
        after = _reported(pushes)
        assert during[0] == during[1], "the signed set and the running digest differ mid-save"
        assert after[0] == after[1] and after[0] != first[0]

    asyncio.run(run())


def test_a_push_whose_save_fails_leaves_the_signed_set_and_the_digest_as_they_were(
    tmp_path: Path, signer: PushSigner
) -> None:
    async def run() -> None:
        pushes, state, first = await _running_one(tmp_path, signer)
        state.fail = True
        assert await _push(pushes, signer, _set(2, "127.0.0.1:7002"), 2) == 500
        assert _reported(pushes) == first
        assert pushes.endpoints is not None and pushes.endpoints.generation == 1

    asyncio.run(run())
