"""A caller that cancels or resets a call is not a server bug: the call ends CANCELLED, quietly."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from shared_kernel.platform.grpc_errors import ErrorMappingInterceptor

METHOD = "/tessera.test.Reset/Echo"


class Outcome(grpc.aio.ServerInterceptor):
    """Outermost: records what each call's handler chain ended with."""

    def __init__(self) -> None:
        self.ended: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner: Callable[..., Any] = handler.unary_unary
        ended = self.ended

        async def recorded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                reply = await inner(request, context)
            except BaseException as exc:
                ended.set_result(exc)
                raise
            ended.set_result(None)
            return reply

        return grpc.unary_unary_rpc_method_handler(recorded)


async def test_metadata_sent_after_the_caller_left_ends_the_call_cancelled_without_an_error_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outcome = Outcome()
    entered = asyncio.Event()

    async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        entered.set()
        try:
            await asyncio.sleep(10)  # ended by the caller's cancellation (grpcio cancels this task)
        except asyncio.CancelledError:
            # A reply on its way when the stream went: sending it fails in grpcio's batch.
            await context.send_initial_metadata((("x-late", "1"),))
        return request

    server = grpc.aio.server(interceptors=[outcome, ErrorMappingInterceptor()])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "tessera.test.Reset", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with caplog.at_level(logging.INFO, logger="shared_kernel.platform.grpc_errors"):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                echo_method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
                call = echo_method(b"ping", timeout=10)
                async with asyncio.timeout(10):
                    await entered.wait()
                call.cancel()
                ended = await asyncio.wait_for(outcome.ended, 10)
        assert isinstance(ended, asyncio.CancelledError), repr(ended)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    finally:
        await server.stop(None)
