"""FaultInjection: delays, aborts and bandwidth limits injected at a destination's inbound.

Inbound: configures the ``destinations`` data planes, for requests from the ``sources``.
Destinations must name ``kuma.io/protocol`` (http, http2 or grpc), as Kuma requires.

Valid::

    apiVersion: kuma.io/v1alpha1
    kind: FaultInjection
    mesh: default
    metadata: {name: benigno-chaos}
    spec:
      sources: [{match: {kuma.io/service: magnanimo}}]
      destinations: [{match: {kuma.io/service: benigno, kuma.io/protocol: http}}]
      conf:
        delay: {percentage: 10, value: 100ms}
        abort: {percentage: 1, httpStatus: 503}

Invalid (no fault)::

    conf: {}
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from compiler.kinds.base import (
    ANY_TAGS,
    PROTOCOL_TAG,
    ConfContext,
    Duration,
    Finding,
    SelectorSpec,
    Spec,
    selector_kind,
)
from runtime import bundle as b

_BANDWIDTH = re.compile(r"^\s*(\d+)\s*(kbps|mbps|gbps)\s*$")
_UNIT_BPS = {"kbps": 1000, "mbps": 1000_000, "gbps": 1000_000_000}


def bandwidth_bps(text: str) -> int:
    m = _BANDWIDTH.match(text)
    if not m:
        raise ValueError(text)
    return int(m.group(1)) * _UNIT_BPS[m.group(2)]


class Delay(Spec):
    percentage: float | None = None
    value: Duration | None = None


class Abort(Spec):
    percentage: float | None = None
    http_status: int | None = None


class Bandwidth(Spec):
    percentage: float | None = None
    limit: str | None = None
    """Bandwidth such as ``100kbps``, ``10mbps`` or ``1gbps``."""


class Conf(Spec):
    delay: Delay | None = None
    abort: Abort | None = None
    response_bandwidth: Bandwidth | None = None


class FaultInjectionSpec(SelectorSpec):
    conf: Conf | None = None


def _percentage(path: tuple[str, ...], value: float | None) -> Iterator[Finding]:
    if value is None:
        yield Finding((*path, "percentage"), "E1003", "cannot be empty")
    elif not 0 <= value <= 100:
        yield Finding((*path, "percentage"), "E1005", "has to be in [0.0 - 100.0] range")


def check_conf(spec: FaultInjectionSpec) -> Iterator[Finding]:
    for i, sel in enumerate(spec.destinations or []):
        match = sel.match or {}
        if PROTOCOL_TAG not in match:
            yield Finding(("destinations", i, "match"), "E1007", "protocol must be specified")
        elif match[PROTOCOL_TAG] not in ("http", "http2", "grpc", "*"):
            yield Finding(
                ("destinations", i, "match", PROTOCOL_TAG), "E1007", "must be one of the [http, http2, grpc]"
            )
    c = spec.conf
    if c is None or (c.delay is None and c.abort is None and c.response_bandwidth is None):
        yield Finding(("conf",), "E1003", "must have at least one of the faults configured")
        return
    if c.delay is not None:
        yield from _percentage(("conf", "delay"), c.delay.percentage)
        if c.delay.value is None:
            yield Finding(("conf", "delay", "value"), "E1003", "cannot be empty")
    if c.abort is not None:
        yield from _percentage(("conf", "abort"), c.abort.percentage)
        if c.abort.http_status is None:
            yield Finding(("conf", "abort", "httpStatus"), "E1003", "cannot be empty")
        elif not 100 <= c.abort.http_status <= 599:
            yield Finding(("conf", "abort", "httpStatus"), "E1005", "http status code is incorrect")
    if c.response_bandwidth is not None:
        yield from _percentage(("conf", "responseBandwidth"), c.response_bandwidth.percentage)
        if c.response_bandwidth.limit is None:
            yield Finding(("conf", "responseBandwidth", "limit"), "E1003", "cannot be empty")
        elif not _BANDWIDTH.match(c.response_bandwidth.limit):
            yield Finding(
                ("conf", "responseBandwidth", "limit"), "E1005", "has to be in kbps/mbps/gbps units"
            )


def to_conf(spec: FaultInjectionSpec, ctx: ConfContext) -> b.FaultInjectionConf:
    c = spec.conf
    assert c is not None
    return b.FaultInjectionConf(
        delay=b.FaultDelay(percentage=c.delay.percentage or 0, value_ms=c.delay.value or 0)
        if c.delay
        else None,
        abort=b.FaultAbort(percentage=c.abort.percentage or 0, http_status=c.abort.http_status or 503)
        if c.abort
        else None,
        response_bandwidth=b.FaultBandwidth(
            percentage=c.response_bandwidth.percentage or 0,
            limit_bps=bandwidth_bps(c.response_bandwidth.limit or "0kbps"),
        )
        if c.response_bandwidth
        else None,
    )


KIND = selector_kind(
    "FaultInjection",
    FaultInjectionSpec,
    check_conf,
    "inbound",
    __doc__ or "",
    sources=ANY_TAGS,
    destinations=ANY_TAGS,
    bundle_field="fault_injection",
    to_conf=to_conf,
)
