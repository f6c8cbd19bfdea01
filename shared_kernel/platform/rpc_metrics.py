"""Server-side RPC metrics: one latency histogram by method and status code (its count is the call count).

The server's call interceptor (shared_kernel.platform.grpc_server.ServerCallInterceptor) records
through an RpcRecorder only when the process configured a metrics reader
(shared_kernel.platform.metrics), so a server without metrics pays nothing per call. It records
outside the error mapping, so it sees the status the caller gets. Unary calls only: a watch
stream's lifetime is not a latency. Health and reflection calls are left out like they are
from tracing.

Instrument (OpenTelemetry semantic-convention names):
  rpc.server.duration  histogram, seconds; attributes rpc.service, rpc.method,
                       rpc.grpc.status_code (the code's name, e.g. OK, NOT_FOUND).
  In Prometheus: rpc_server_duration_seconds_{bucket,count,sum}.
"""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry import metrics

from shared_kernel.platform.metrics import LATENCY_BUCKETS_S

METER_NAME = "tessera.rpc"
_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


class RpcRecorder:
    """Records one call's duration; attribute dicts are built once per (method, code) and reused."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = metrics.get_meter(METER_NAME, meter_provider=meter_provider)
        self._duration = meter.create_histogram(
            "rpc.server.duration",
            unit="s",
            description="Duration of unary gRPC calls handled by this server, by method and status code",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        self._attributes: dict[tuple[str, grpc.StatusCode], dict[str, str]] = {}

    def record(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Add one call of `method` that ended with `code` after `seconds`."""
        key = (method, code)
        attributes = self._attributes.get(key)
        if attributes is None:
            attributes = self._attributes[key] = _attributes_for(method, code)
        self._duration.record(seconds, attributes)


def _attributes_for(method: str, code: grpc.StatusCode) -> dict[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    # No constant rpc.system attribute: every attribute costs on each call, and all of ours are gRPC.
    return {
        "rpc.service": service,
        "rpc.method": name,
        "rpc.grpc.status_code": code.name,
    }


def status_of(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> grpc.StatusCode:
    """The status the call ended with: the one set on the context, else OK, CANCELLED or UNKNOWN."""
    code: Any = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return _CODES_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, BaseException) and type(error).__name__ == "CancelledError":
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
