"""The gRPC servicers: PaymentProviderService (payments) and PaymentProviderAdminService (failures, counters).

A state-changing call goes: validate → added latency → injected failure (UNAVAILABLE without
effect; a timeout with or without effect, which then hangs past the caller's deadline) → the
ledger, on its own thread so SQLite never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from payment_provider.commands import AuthorizeCommand, PaymentCommand, PaymentQuery
from payment_provider.faults import Fault, FaultInjector, config_from_proto, config_to_proto
from payment_provider.ledger import Ledger, LedgerResult
from shared_kernel.contracts import errors
from tessera.payments.v1 import payment_provider_admin_pb2 as admin_pb
from tessera.payments.v1 import payment_provider_admin_pb2_grpc as admin_grpc
from tessera.payments.v1 import payment_provider_pb2 as pb
from tessera.payments.v1 import payment_provider_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

PROVIDER_SERVICE = pb.DESCRIPTOR.services_by_name["PaymentProviderService"].full_name
ADMIN_SERVICE = admin_pb.DESCRIPTOR.services_by_name["PaymentProviderAdminService"].full_name

# A timed-out call hangs this long past its caller's deadline, so the caller surely gives up first.
_PAST_DEADLINE_S = 0.25

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
R = TypeVar("R", bound=Message)

_OUTCOMES: dict[type[errors.DomainError], str] = {
    errors.InvalidArgument: "invalid_argument",
    errors.FailedPrecondition: "failed_precondition",
    errors.NotFound: "not_found",
    errors.Unavailable: "unavailable",
    errors.DeadlineExceeded: "timeout",
}


class Provider:
    """The ledger on its worker thread, the fault injector and the call counters, shared by both servicers."""

    def __init__(self, ledger: Ledger, faults: FaultInjector, executor: ThreadPoolExecutor) -> None:
        """Use `ledger` only through `executor` (a single worker thread)."""
        self.ledger = ledger
        self.faults = faults
        self.executor = executor
        self.counters: Counter[tuple[str, str]] = Counter()

    async def on_ledger(self, operation: Callable[[], T]) -> T:
        """Run `operation` on the ledger's thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, operation)

    def count(self, method: str, outcome: str) -> None:
        """Count one call of `method` that ended with `outcome`."""
        self.counters[(method, outcome)] += 1

    def count_error(self, method: str, error: BaseException) -> None:
        """Count a call that ended with `error`."""
        for klass, outcome in _OUTCOMES.items():
            if isinstance(error, klass):
                self.count(method, outcome)
                return
        self.count(method, "error")


class PaymentProviderServicer(pb_grpc.PaymentProviderServiceServicer):
    """Authorize, capture, void and refund payments, with the configured failures."""

    def __init__(self, provider: Provider) -> None:
        """Serve `provider`."""
        self._provider = provider

    async def Authorize(self, request: pb.AuthorizeRequest, context: Context) -> pb.AuthorizeResponse:
        """Hold an amount, or decline."""
        provider = self._provider
        command = self._parse("Authorize", AuthorizeCommand.from_proto, request)
        await self._latency()
        # Drawn on the event loop, like every random failure, so a seeded run repeats itself.
        decline = provider.faults.decline_reason(command.reference, command.customer_id, command.money.amount_minor)
        return await self._change(
            "Authorize",
            reference=command.reference,
            customer_id=command.customer_id,
            operation=lambda: provider.ledger.authorize(command, request, decline),
            reply_type=pb.AuthorizeResponse,
            context=context,
        )

    async def Capture(self, request: pb.CaptureRequest, context: Context) -> pb.CaptureResponse:
        """Charge an authorized payment."""
        command = self._parse("Capture", PaymentCommand.from_proto, request)
        customer = await self._customer(command.reference)
        await self._latency()
        return await self._change(
            "Capture",
            reference=command.reference,
            customer_id=customer,
            operation=lambda: self._provider.ledger.capture(command, request),
            reply_type=pb.CaptureResponse,
            context=context,
        )

    async def Void(self, request: pb.VoidRequest, context: Context) -> pb.VoidResponse:
        """Release an authorization (or block a reference never authorized)."""
        command = self._parse("Void", PaymentCommand.from_proto, request)
        customer = await self._customer(command.reference)
        await self._latency()
        return await self._change(
            "Void",
            reference=command.reference,
            customer_id=customer,
            operation=lambda: self._provider.ledger.void(command, request),
            reply_type=pb.VoidResponse,
            context=context,
        )

    async def Refund(self, request: pb.RefundRequest, context: Context) -> pb.RefundResponse:
        """Return a captured payment."""
        command = self._parse("Refund", PaymentCommand.from_proto, request)
        customer = await self._customer(command.reference)
        await self._latency()
        return await self._change(
            "Refund",
            reference=command.reference,
            customer_id=customer,
            operation=lambda: self._provider.ledger.refund(command, request),
            reply_type=pb.RefundResponse,
            context=context,
        )

    async def GetPayment(self, request: pb.GetPaymentRequest, context: Context) -> pb.GetPaymentResponse:
        """One payment."""
        query = self._parse("GetPayment", PaymentQuery.from_proto, request)
        try:
            payment = await self._provider.on_ledger(lambda: self._provider.ledger.get(query.reference))
        except errors.DomainError as exc:
            self._provider.count_error("GetPayment", exc)
            raise
        self._provider.count("GetPayment", "ok")
        return pb.GetPaymentResponse(payment=payment)

    async def ListPayments(self, request: pb.ListPaymentsRequest, context: Context) -> pb.ListPaymentsResponse:
        """Every payment, oldest first."""
        payments = await self._provider.on_ledger(self._provider.ledger.list)
        self._provider.count("ListPayments", "ok")
        return pb.ListPaymentsResponse(payments=payments)

    # -- internals

    def _parse(self, method: str, parse: Callable[[Any], T], request: Message) -> T:
        try:
            return parse(request)
        except errors.InvalidArgument as exc:
            self._provider.count_error(method, exc)
            raise

    async def _customer(self, reference: str) -> str:
        """The payment's customer, looked up only when a scripted failure matches by customer."""
        if not self._provider.faults.needs_customer:
            return ""
        return await self._provider.on_ledger(lambda: self._provider.ledger.customer_of(reference))

    async def _latency(self) -> None:
        latency_ms = self._provider.faults.config.latency_ms
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000)

    async def _change(
        self,
        method: str,
        *,
        reference: str,
        customer_id: str,
        operation: Callable[[], LedgerResult],
        reply_type: type[R],
        context: Context,
    ) -> R:
        provider = self._provider
        fault = provider.faults.fault_for(method, reference, customer_id)
        try:
            if fault is Fault.UNAVAILABLE:
                raise errors.Unavailable(f"the payment provider is unavailable (injected failure of {method})")
            if fault in (Fault.TIMEOUT_APPLIED, Fault.TIMEOUT_NOT_APPLIED):
                await self._time_out(method, reference, fault, operation, context)
            result = await provider.on_ledger(operation)
        except errors.DeadlineExceeded:
            raise  # counted when the timeout was injected: the caller usually cancels the call before this
        except errors.DomainError as exc:
            provider.count_error(method, exc)
            raise
        provider.count(method, result.outcome)
        reply = reply_type()
        reply.ParseFromString(result.response)
        return reply

    async def _time_out(
        self,
        method: str,
        reference: str,
        fault: Fault,
        operation: Callable[[], LedgerResult],
        context: Context,
    ) -> None:
        """Apply the effect (or not), then hang until just past the caller's deadline and give up."""
        applied = fault is Fault.TIMEOUT_APPLIED
        if applied:
            try:
                await self._provider.on_ledger(operation)
            except errors.DomainError as exc:
                # The caller never sees this answer; the retry will be judged on its own.
                logger.info("timed-out %s for %s failed anyway: %s", method, reference, exc.message)
        self._provider.count(method, "timeout")
        logger.info(
            "injecting a timeout",
            extra={"rpc_method": method, "reference": reference, "effect_applied": applied},
        )
        remaining = context.time_remaining()
        cap_s = self._provider.faults.config.timeout_hang_ms / 1000
        hang_s = cap_s if remaining is None else min(remaining + _PAST_DEADLINE_S, cap_s)
        await asyncio.sleep(max(hang_s, 0.0))
        raise errors.DeadlineExceeded(f"the payment provider did not answer {method} in time (injected timeout)")


class PaymentProviderAdminServicer(admin_grpc.PaymentProviderAdminServiceServicer):
    """Change the injected failures at run time and read the call counters."""

    def __init__(self, provider: Provider) -> None:
        """Serve `provider`."""
        self._provider = provider

    async def Configure(self, request: admin_pb.ConfigureRequest, context: Context) -> admin_pb.ConfigureResponse:
        """Replace the failure configuration."""
        config = config_from_proto(request.configuration)
        self._provider.faults.configure(config)
        logger.info("failure configuration replaced", extra={"configuration": str(config)})
        return admin_pb.ConfigureResponse(configuration=config_to_proto(self._provider.faults.config))

    async def GetConfiguration(
        self, request: admin_pb.GetConfigurationRequest, context: Context
    ) -> admin_pb.GetConfigurationResponse:
        """The configuration in force."""
        return admin_pb.GetConfigurationResponse(configuration=config_to_proto(self._provider.faults.config))

    async def GetCounters(self, request: admin_pb.GetCountersRequest, context: Context) -> admin_pb.GetCountersResponse:
        """Calls by method and outcome since the start."""
        return admin_pb.GetCountersResponse(
            counters=[
                admin_pb.CallCounter(method=method, outcome=outcome, count=count)
                for (method, outcome), count in sorted(self._provider.counters.items())
            ]
        )
