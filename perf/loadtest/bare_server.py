"""A bare gRPC server: the ceiling a read replica is compared with in `read_bench`.

It runs on the same runtime as the services (uvloop via shared_kernel.platform.runtime.run, grpc.aio,
the same server options and concurrency limit from GrpcServerSettings) but with no
interceptors, no Redis and no work: UserQueryService/GetUser answers a constant reply the size
of a real one (a seeded user's view). It serves gRPC health, so a ServiceProcess can wait for it.

    GRPC_PORT=50099 python -m perf.loadtest.bare_server
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from shared_kernel.platform.grpc_server import SERVING, server_options
from shared_kernel.platform.runtime import run
from shared_kernel.platform.settings import GrpcServerSettings
from tessera.users.v1 import user_query_service_pb2 as queries


def constant_reply() -> queries.GetUserResponse:
    """A reply shaped like a real one for a freshly seeded user."""
    at = Timestamp(seconds=1_790_000_000, nanos=123_456_000)
    return queries.GetUserResponse(
        user=queries.UserView(
            user_id="2f0c4b1e-7a5d-4c61-9a0e-3d8f6b2a9c17",
            email="seed-4f2a9c1e-123@example.com",
            username="seed4f2a9c1en123",
            full_name="Seed User 123",
            active=True,
            version=1,
            created_at=at,
            updated_at=at,
        ),
        view_position=48_213,
    )


def get_user_handler() -> grpc.GenericRpcHandler:
    """UserQueryService with GetUser only (deserializing the request and serializing the constant reply, as the
    real servicer does); every other method is UNIMPLEMENTED."""
    reply = constant_reply()

    async def get_user(request: queries.GetUserRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return reply

    handler = grpc.unary_unary_rpc_method_handler(
        get_user,
        request_deserializer=queries.GetUserRequest.FromString,
        response_serializer=queries.GetUserResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler("tessera.users.v1.UserQueryService", {"GetUser": handler})


async def serve(settings: GrpcServerSettings) -> int:
    """Serve until SIGTERM or SIGINT."""
    server = grpc.aio.server(
        options=server_options(settings), maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs or None
    )
    server.add_generic_rpc_handlers((get_user_handler(),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    await server.start()
    await health.set("", SERVING)
    print(f"bare GetUser server listening on {settings.grpc_host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)
    return 0


def main() -> int:
    """Read GRPC_HOST/GRPC_PORT and the other server settings from the environment, then serve."""
    return run(serve(GrpcServerSettings()))


if __name__ == "__main__":
    sys.exit(main())
