"""Kuma's current dialect: the targetRef policies (``kuma.io/v1alpha1``), one module per kind.

Their models and validators are ports of Kuma v2.14.3's (see ``_common``); how policies of these
kinds resolve and merge into bundles lives elsewhere and does not shape them.
"""

from __future__ import annotations

from compiler.kinds.base import KindDef
from compiler.kinds.targetref import (
    mesh_access_log,
    mesh_circuit_breaker,
    mesh_fault_injection,
    mesh_health_check,
    mesh_http_route,
    mesh_load_balancing_strategy,
    mesh_metric,
    mesh_passthrough,
    mesh_proxy_patch,
    mesh_rate_limit,
    mesh_retry,
    mesh_service,
    mesh_tcp_route,
    mesh_timeout,
    mesh_tls,
    mesh_trace,
    mesh_traffic_permission,
)

__all__ = ["KINDS"]

KINDS: tuple[KindDef, ...] = (
    mesh_access_log.KIND,
    mesh_circuit_breaker.KIND,
    mesh_fault_injection.KIND,
    mesh_health_check.KIND,
    mesh_http_route.KIND,
    mesh_load_balancing_strategy.KIND,
    mesh_metric.KIND,
    mesh_passthrough.KIND,
    mesh_proxy_patch.KIND,
    mesh_rate_limit.KIND,
    mesh_retry.KIND,
    mesh_service.KIND,
    mesh_tcp_route.KIND,
    mesh_timeout.KIND,
    mesh_tls.KIND,
    mesh_trace.KIND,
    mesh_traffic_permission.KIND,
)
