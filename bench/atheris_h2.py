"""Coverage-guided fuzzing of the HTTP/2 layer as meshc runs it, with atheris.

The input is what a peer sends after the connection preface. The first byte picks the side:
a client connection to one of our listeners (``GoawayFilter`` then h2's server connection, as
``runtime.h2proxy`` feeds them) or an upstream connection (the client side). Only
``h2.exceptions.ProtocolError`` may escape (``_Side.data_received`` closes the connection on it);
each request head goes through ``parse_request`` and the decision layer on the compiled seed
(magnanimo's outbound sidecar), each response head through the status and trailer helpers.
Anything else is a crash. See ``bench/_atheris.py``.

    .venv/bin/python bench/atheris_h2.py -max_total_time=60
"""

from __future__ import annotations

import random
from typing import cast

import _atheris
import atheris

with atheris.instrument_imports(include=["runtime", "h2", "hpack", "hyperframe"]):
    import h2.events
    import h2.exceptions

    from runtime.bundle import load_bundle
    from runtime.decide import Forward, Reply, decide_outbound, split_host
    from runtime.engine import Engine
    from runtime.h2conn import (
        PREFACE,
        GoawayFilter,
        Header,
        client_connection,
        grpc_status,
        grpc_timeout_s,
        parse_request,
        response_headers,
        server_connection,
    )
    from runtime.h2proxy import _status
    from runtime.protocol import Endpoint, EndpointSet

from compiler.pipeline import compile_dir

SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _engine() -> tuple[Engine, object]:
    bundles = compile_dir(_atheris.REPO / "policies").bundles
    engine = Engine("magnanimo", {"version": "v1"}, rng=random.Random(1))
    eps = EndpointSet(
        generation=1, services={"benigno": [Endpoint(address="127.0.0.1:7001", tags={"version": "v1"})]}
    )
    snap = engine.build(load_bundle(bundles["default"]), load_bundle(bundles["default/magnanimo"]), eps)  # type: ignore[arg-type]
    engine.install(snap)
    return engine, snap


ENGINE, SNAP = _engine()
OWN = {("127.0.0.1", 15001)}


def _seeds() -> list[bytes]:
    """A request and a response as h2 writes them (after the preface and SETTINGS)."""
    client, server = client_connection(), server_connection()
    client.data_to_send()
    server.data_to_send()
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "benigno:5000"), (":path", "/x?a=1"),
               ("content-type", "application/grpc"), ("grpc-timeout", "1S")]  # fmt: skip
    client.send_headers(1, headers)
    client.send_data(1, b"\0\0\0\0\x02hi", end_stream=True)
    request = client.data_to_send()
    server.receive_data(PREFACE + SETTINGS + request)
    server.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    server.send_data(1, b"\0\0\0\0\x02ok")
    server.send_headers(1, [("grpc-status", "0")], end_stream=True)
    response = server.data_to_send()
    return [b"\x00" + request, b"\x01" + SETTINGS + response]


def _verdict(head: object) -> None:
    h = cast("object", head)
    name, port = split_host(h.authority())  # type: ignore[attr-defined]
    verdict = decide_outbound(ENGINE, SNAP, h, name, port, OWN)  # type: ignore[arg-type]
    assert isinstance(verdict, Forward | Reply), verdict


def one_input(data: bytes) -> None:
    if not data:
        return
    server_side = not data[0] & 1
    conn = server_connection() if server_side else client_connection()
    if not server_side:
        conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/")])
    conn.data_to_send()
    frames = GoawayFilter(server_side)
    wire = (PREFACE + SETTINGS if server_side else b"") + data[1:]
    try:
        chunk, _ = frames.feed(wire)
        events = conn.receive_data(chunk) if chunk else []
    except h2.exceptions.ProtocolError:
        return
    for e in events:
        if isinstance(e, h2.events.RequestReceived):
            headers = cast(list[Header], list(e.headers or ()))
            parsed = parse_request(headers, e.stream_ended is not None)
            if not isinstance(parsed, str):
                parsed.path(), parsed.query_string()
                grpc_timeout_s(parsed.header_map().get("grpc-timeout"))
                _verdict(parsed)
        elif isinstance(e, h2.events.ResponseReceived | h2.events.TrailersReceived):
            headers = cast(list[Header], list(e.headers or ()))
            assert 100 <= _status(headers) <= 999
            grpc_status(headers)
            response_headers(headers, ())


if __name__ == "__main__":
    _atheris.run(one_input, _seeds())
