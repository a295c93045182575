"""Access log formats (Kuma's Plain and Json, Envoy's operators) and the log shipper's bounded
queue against a real, stuck OTLP/HTTP collector."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from runtime_harness import wait_until
from test_zipkin import StuckCollector

from runtime import accesslog
from runtime.accesslog import AccessLog, LogShipper, parse_format, render
from runtime.bundle import LOG_OPERATORS, LoggingBackend, TrafficLogConf

ENTRY: dict[str, Any] = {
    "time": 1_700_000_000.25,
    "direction": "outbound",
    "source_service": "magnanimo",
    "destination_service": "benigno",
    "destination_subset": "v1",
    "upstream": "",
    "method": "POST",
    "path": "/hw2",
    "response_code": 503,
    "duration_ms": 250.0,
    "trace_id": "",
}
HEADERS = {"user-agent": "curl/8", "x-request-id": "abcdef", "host": "benigno:5000"}


def _ctx() -> Any:
    return accesslog._Ctx(ENTRY, HEADERS.get, "default")


def test_every_operator_the_bundle_names_is_filled() -> None:
    assert set(accesslog._VALUES) | {"REQ"} == LOG_OPERATORS


def test_plain_formats_fill_operators_and_mark_what_is_unknown() -> None:
    fmt = (
        "[%START_TIME%] %KUMA_MESH% %KUMA_TRAFFIC_DIRECTION% %REQ(:METHOD)%"
        " %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %RESPONSE_CODE% %DURATION% %UPSTREAM_HOST% %BYTES_SENT%"
        " %REQ(USER-AGENT)% %REQ(X-REQUEST-ID):3%"
        " %REQ(:AUTHORITY)% %KUMA_SOURCE_SERVICE%->%KUMA_DESTINATION_SERVICE% 100%"
    )
    got = render(parse_format(fmt), _ctx())
    assert got == (
        "[2023-11-14T22:13:20.000Z] default OUTBOUND POST /hw2 503 250 - - curl/8 abc benigno:5000"
        " magnanimo->benigno 100%"
    )
    assert render(parse_format("%UPSTREAM_HOST%|%TRACE_ID%"), _ctx(), "") == "|"


def test_json_lines_keep_an_operators_type_and_omit_empty_values(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    pairs = (
        ("code", "%RESPONSE_CODE%"),
        ("who", "%KUMA_SOURCE_SERVICE% at %START_TIME%"),
        ("up", "%UPSTREAM_HOST%"),
    )
    log = AccessLog()
    full = LoggingBackend(name="f", type="file", path=str(path), json_format=pairs)
    omit = full.model_copy(update={"omit_empty_values": True})
    log.write(TrafficLogConf(backend=full, also=(omit,)), ENTRY, HEADERS.get)
    log.close()
    first, second = (json.loads(x) for x in path.read_text().splitlines())
    assert first == {"code": 503, "who": "magnanimo at 2023-11-14T22:13:20.000Z", "up": None}
    assert second == {"code": 503, "who": "magnanimo at 2023-11-14T22:13:20.000Z"}


def test_unused_fields_stay_out_of_the_bundle_json() -> None:
    plain = LoggingBackend(name="f", type="file", path="/x")
    assert set(plain.model_dump(mode="json")) == {"name", "type", "format", "path", "address"}
    assert set(TrafficLogConf(backend=plain).model_dump(mode="json")) == {"backend"}


def test_a_stuck_otlp_collector_fills_the_queue_and_records_are_dropped_not_waited_for() -> None:
    stuck = StuckCollector()
    try:
        _fill_and_release(stuck)
    finally:
        stuck.release.set()
        stuck.server.shutdown()
        stuck.server.server_close()


def _fill_and_release(stuck: StuckCollector) -> None:
    registry = CollectorRegistry()
    shipper = LogShipper(registry, cap=2)
    address = stuck.url.split("/")[2]
    backend = LoggingBackend(name="o", type="otel", address=address, attributes=(("p", "%REQ(:PATH)%"),))
    log = AccessLog(shipper)
    conf = TrafficLogConf(backend=backend)

    def write(path: str) -> None:
        log.write(conf, {**ENTRY, "path": path})

    write("/first")
    wait_until(stuck.entered.is_set, "the first batch to reach the collector")
    for i in range(5):  # the sender is stuck: two wait in the queue, three are dropped at once
        write(f"/{i}")
    dropped = registry.get_sample_value(
        "meshc_accesslog_records_dropped_total", {"backend": "otel", "reason": "queue_full"}
    )
    assert dropped == 3
    stuck.release.set()
    wait_until(
        lambda: registry.get_sample_value("meshc_accesslog_records_sent_total", {"backend": "otel"}) == 3,
        "the rest sent",
    )
