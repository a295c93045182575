"""``compiler.controlplane.rejoin``: what a control plane started without its registry takes from
the data planes' reports, and what it refuses (issue 20 #5). Real keys, real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from pathlib import Path

import pytest

from compiler.ca import PushSigner
from compiler.controlplane.registry import DataPlane, Registry
from compiler.controlplane.rejoin import Rejoin
from runtime.protocol import Endpoint, EndpointSet, PushTarget, Registration, SignedEndpoints


def _signed(
    signer: PushSigner, dp: DataPlane, services: dict[str, list[Endpoint]], gen: int
) -> SignedEndpoints:
    body = EndpointSet(generation=gen, services=services).model_dump_json()
    assert dp.boot_id is not None
    target = PushTarget(dp.mesh, dp.service, dp.instance, dp.boot_id)
    digest = hashlib.sha256(body.encode()).hexdigest()
    return SignedEndpoints(body=body, signature=signer.sign(target, "endpoints", digest, gen))


@pytest.fixture
def world(tmp_path: Path) -> tuple[Registry, Rejoin, PushSigner]:
    registry = Registry()
    signer = PushSigner(tmp_path)
    return registry, Rejoin(registry, 60.0, signer.signed), signer


def _register(registry: Registry, service: str, admin_port: int, inbound: str | None = None) -> DataPlane:
    reg = Registration(
        service=service, admin_address=f"127.0.0.1:{admin_port}", inbound_address=inbound, boot_id="b" * 32
    )
    return registry.register(reg)


def _eps(*addresses: str) -> list[Endpoint]:
    return [Endpoint(address=a, tags={"version": "v1"}) for a in addresses]


def test_only_a_set_this_control_plane_signed_for_that_data_plane_is_learned(
    world: tuple[Registry, Rejoin, PushSigner], tmp_path: Path
) -> None:
    registry, rejoin, signer = world
    v1 = _register(registry, "magnanimo", 7001)
    other = _register(registry, "magnanimo", 7002)
    services = {"benigno": _eps("127.0.0.1:9001")}
    good = _signed(signer, v1, services, 10)

    forged = SignedEndpoints(body=good.body.replace("9001", "6666"), signature=good.signature)
    assert not rejoin.learn(v1, forged), "a body that is not the one signed"
    assert not rejoin.learn(other, good), "a set signed for another instance"
    stranger = PushSigner(tmp_path / "other-key")
    assert not rejoin.learn(v1, _signed(stranger, v1, services, 10)), "another control plane's key"
    assert not rejoin.learn(v1, SignedEndpoints(body="{", signature=good.signature)), "not JSON"
    assert rejoin.services("default") == {}

    assert rejoin.learn(v1, good)
    assert rejoin.services("default") == services
    assert not rejoin.learn(other, _signed(signer, other, {}, 9)), "an older generation"
    assert rejoin.learn(other, _signed(signer, other, {"benigno": _eps("127.0.0.1:9002")}, 11))
    assert [e.address for e in rejoin.services("default")["benigno"]] == ["127.0.0.1:9002"]


def test_the_registry_speaks_for_an_address_that_is_back_and_dead_ones_are_dropped(
    world: tuple[Registry, Rejoin, PushSigner],
) -> None:
    registry, rejoin, signer = world
    v1 = _register(registry, "magnanimo", 7001)
    learned = {"benigno": _eps("127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003")}
    assert rejoin.learn(v1, _signed(signer, v1, learned, 10))
    back = _register(registry, "benigno", 7003, inbound="127.0.0.1:9001")
    registry.deregister(back.instance)  # back, then gone: the registry's word holds
    rejoin.dead.add("127.0.0.1:9002")
    assert [e.address for e in rejoin.services("default")["benigno"]] == ["127.0.0.1:9003"]
    assert rejoin.pending() == {"127.0.0.1:9003"}


def test_probes_drop_an_address_that_refuses_and_keep_one_that_accepts(
    world: tuple[Registry, Rejoin, PushSigner],
) -> None:
    registry, rejoin, signer = world
    v1 = _register(registry, "magnanimo", 7001)
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: a connect is refused
        alive = f"127.0.0.1:{listening.getsockname()[1]}"
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
        assert rejoin.learn(v1, _signed(signer, v1, {"benigno": _eps(alive, dead)}, 10))
        assert asyncio.run(rejoin.probe(5.0)) is True
        assert not asyncio.run(rejoin.probe(5.0)), "nothing new found dead"
    assert [e.address for e in rejoin.services("default")["benigno"]] == [alive]


def test_nothing_is_learned_or_added_once_the_window_has_ended(tmp_path: Path) -> None:
    registry = Registry()
    signer = PushSigner(tmp_path)
    rejoin = Rejoin(registry, 0.0, signer.signed)
    v1 = _register(registry, "magnanimo", 7001)
    assert not rejoin.learn(v1, _signed(signer, v1, {"benigno": _eps("127.0.0.1:9001")}, 10))
    assert rejoin.services("default") == {}
    assert rejoin.pending() == set()


def test_scoped_sets_speak_for_their_services_and_a_delta_needs_its_whole_set(
    world: tuple[Registry, Rejoin, PushSigner],
) -> None:
    """Per-service endpoint sets (``runtime.endpoints``): a sidecar's scoped set names only what
    it reaches, so it adds those services and drops no other; a delta is learned through the
    whole set it made, which must make the digest the signed delta names."""
    from runtime.endpoints import apply
    from runtime.protocol import endpoint_set_digest, service_endpoints_digest

    registry, rejoin, signer = world
    a = _register(registry, "magnanimo", 7101)
    b = _register(registry, "other", 7102)

    def scoped(services: dict[str, list[Endpoint]]) -> str:
        return endpoint_set_digest({n: service_endpoints_digest(n, e) for n, e in services.items()}, True)

    def sign(dp: DataPlane, doc: EndpointSet, assembled: str | None = None) -> SignedEndpoints:
        body = doc.model_dump_json()
        assert dp.boot_id is not None
        target = PushTarget(dp.mesh, dp.service, dp.instance, dp.boot_id)
        sig = signer.sign(target, "endpoints", hashlib.sha256(body.encode()).hexdigest(), doc.generation)
        return SignedEndpoints(body=body, signature=sig, assembled=assembled)

    one = {"benigno": _eps("127.0.0.1:9001")}
    first = EndpointSet(generation=10, services=one, scoped=True, digest=scoped(one))
    assert rejoin.learn(a, sign(a, first))
    two = {"db": _eps("127.0.0.1:9500")}
    assert rejoin.learn(b, sign(b, EndpointSet(generation=11, services=two, scoped=True, digest=scoped(two))))
    assert set(rejoin.services("default")) == {"benigno", "db"}  # neither dropped the other's
    # A delta over ``first``: benigno gains an instance.
    more = {"benigno": _eps("127.0.0.1:9001", "127.0.0.1:9002")}
    delta = EndpointSet(generation=12, services=more, scoped=True, digest=scoped(more), base=first.digest)
    whole, _ = apply(first, None, delta)
    assert not rejoin.learn(a, sign(a, delta)), "a delta without the whole set it made"
    lie = whole.model_copy(update={"services": {"benigno": _eps("127.0.0.1:6666")}}).model_dump_json()
    assert not rejoin.learn(a, sign(a, delta, lie)), "a whole set that does not make the signed digest"
    assert rejoin.learn(a, sign(a, delta, whole.model_dump_json()))
    got = rejoin.services("default")
    assert [e.address for e in got["benigno"]] == ["127.0.0.1:9001", "127.0.0.1:9002"] and "db" in got
