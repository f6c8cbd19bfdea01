"""`python -m payment_provider` as a real process, called through real gRPC channels."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devstack.supervisor import ServiceProcess
from shared_kernel.platform.grpc_errors import bad_request_from_status
from tessera.common.v1.money_pb2 import Money
from tessera.payments.v1 import payment_provider_admin_pb2 as admin_pb
from tessera.payments.v1 import payment_provider_admin_pb2_grpc as admin_grpc
from tessera.payments.v1 import payment_provider_pb2 as pb
from tessera.payments.v1 import payment_provider_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

CALL_TIMEOUT_S = 5.0


def provider_process(tmp_path: Path, name: str, **env: str) -> ServiceProcess:
    return ServiceProcess.python_module(
        name,
        "payment_provider",
        grpc_port=0,
        env={"LOG_LEVEL": "INFO", "GRPC_SHUTDOWN_GRACE_S": "1", **env},
        log_path=tmp_path / f"{name}.log",
    )


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One provider for the module, payments in memory; each test resets its failures."""
    with provider_process(tmp_path_factory.mktemp("provider"), "payment-provider") as process:
        yield process


@pytest.fixture
async def channel(provider: ServiceProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(provider.address) as chan:
        await admin_grpc.PaymentProviderAdminServiceStub(chan).Configure(
            admin_pb.ConfigureRequest(configuration=admin_pb.FailureConfiguration()), timeout=CALL_TIMEOUT_S
        )
        yield chan


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.PaymentProviderServiceAsyncStub:
    return pb_grpc.PaymentProviderServiceStub(channel)


@pytest.fixture
def admin(channel: grpc.aio.Channel) -> admin_grpc.PaymentProviderAdminServiceAsyncStub:
    return admin_grpc.PaymentProviderAdminServiceStub(channel)


def ref() -> str:
    return f"order-{secrets.token_hex(6)}"


def authorize_request(
    reference: str, key: str, amount: int = 2500, customer: str = "customer-1"
) -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(
        reference=reference,
        amount=Money(currency_code="EUR", amount_minor=amount),
        customer_id=customer,
        idempotency_key=key,
    )


async def configure(admin: admin_grpc.PaymentProviderAdminServiceAsyncStub, **fields: object) -> None:
    await admin.Configure(
        admin_pb.ConfigureRequest(configuration=admin_pb.FailureConfiguration(**fields)),  # type: ignore[arg-type]
        timeout=CALL_TIMEOUT_S,
    )


async def payment(stub: pb_grpc.PaymentProviderServiceAsyncStub, reference: str) -> pb.Payment:
    return (await stub.GetPayment(pb.GetPaymentRequest(reference=reference), timeout=CALL_TIMEOUT_S)).payment


async def test_health_and_reflection_name_both_services(provider: ServiceProcess, channel: grpc.aio.Channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in (
        "",
        "tessera.payments.v1.PaymentProviderService",
        "tessera.payments.v1.PaymentProviderAdminService",
    ):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name async for r in responses for s in r.list_services_response.service}
    assert {"tessera.payments.v1.PaymentProviderService", "tessera.payments.v1.PaymentProviderAdminService"} <= names


async def test_retried_authorize_and_capture_never_charge_twice(stub: pb_grpc.PaymentProviderServiceAsyncStub):
    reference = ref()
    request = authorize_request(reference, f"auth-{reference}")
    first = await stub.Authorize(request, timeout=CALL_TIMEOUT_S)
    assert first.approved
    for _ in range(3):
        again = await stub.Authorize(request, timeout=CALL_TIMEOUT_S)
        assert again.SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)
    capture = pb.CaptureRequest(reference=reference, idempotency_key=f"capture-{reference}")
    replies = [await stub.Capture(capture, timeout=CALL_TIMEOUT_S) for _ in range(3)]
    assert len({r.SerializeToString(deterministic=True) for r in replies}) == 1
    assert (await payment(stub, reference)).captures == 1


async def test_concurrent_identical_authorizations_hold_once(stub: pb_grpc.PaymentProviderServiceAsyncStub):
    reference = ref()
    request = authorize_request(reference, f"auth-{reference}")
    replies = await asyncio.gather(*(stub.Authorize(request, timeout=CALL_TIMEOUT_S) for _ in range(20)))
    assert len({r.SerializeToString(deterministic=True) for r in replies}) == 1
    assert replies[0].approved
    # Different keys for one reference: exactly one wins, the others break the one-authorization rule.
    other = ref()
    results = await asyncio.gather(
        *(stub.Authorize(authorize_request(other, f"k{i}-{other}"), timeout=CALL_TIMEOUT_S) for i in range(10)),
        return_exceptions=True,
    )
    approved = [r for r in results if isinstance(r, pb.AuthorizeResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(approved) == 1
    assert len(refused) == 9
    assert {e.code() for e in refused} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert "one authorization per reference" in (refused[0].details() or "")


async def test_statuses_for_bad_calls(stub: pb_grpc.PaymentProviderServiceAsyncStub):
    reference = ref()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Capture(pb.CaptureRequest(reference=reference, idempotency_key="x"), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetPayment(pb.GetPaymentRequest(reference=reference), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Authorize(pb.AuthorizeRequest(reference=reference), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = bad_request_from_status(raised.value)
    assert details is not None
    assert {v.field for v in details.field_violations} == {"amount", "customer_id", "idempotency_key"}
    await stub.Authorize(authorize_request(reference, f"a-{reference}"), timeout=CALL_TIMEOUT_S)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Refund(pb.RefundRequest(reference=reference, idempotency_key=f"r-{reference}"), timeout=5)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "only a payment that is captured can be refunded" in (raised.value.details() or "")
    # The same key with another request.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Authorize(authorize_request(reference, f"a-{reference}", amount=1), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = bad_request_from_status(raised.value)
    assert details is not None
    assert [v.field for v in details.field_violations] == ["idempotency_key"]


async def test_void_before_authorize_blocks_it(stub: pb_grpc.PaymentProviderServiceAsyncStub):
    reference = ref()
    voided = await stub.Void(pb.VoidRequest(reference=reference, idempotency_key=f"v-{reference}"), timeout=5)
    assert voided.payment.state == pb.PAYMENT_STATE_VOIDED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Authorize(authorize_request(reference, f"a-{reference}"), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_unavailable_has_no_effect(
    stub: pb_grpc.PaymentProviderServiceAsyncStub, admin: admin_grpc.PaymentProviderAdminServiceAsyncStub
):
    reference = ref()
    await configure(
        admin,
        scripted_failures=[
            admin_pb.ScriptedFailure(reference=reference, kind=admin_pb.FAILURE_KIND_UNAVAILABLE, times=2)
        ],
    )
    request = authorize_request(reference, f"a-{reference}")
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Authorize(request, timeout=CALL_TIMEOUT_S)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError):
            await payment(stub, reference)
    assert (await stub.Authorize(request, timeout=CALL_TIMEOUT_S)).approved
    assert (await payment(stub, reference)).state == pb.PAYMENT_STATE_AUTHORIZED


async def test_timeout_with_effect_then_retry_gets_the_stored_reply(
    stub: pb_grpc.PaymentProviderServiceAsyncStub, admin: admin_grpc.PaymentProviderAdminServiceAsyncStub
):
    reference = ref()
    await configure(
        admin,
        scripted_failures=[
            admin_pb.ScriptedFailure(
                reference=reference,
                method=admin_pb.PROVIDER_METHOD_CAPTURE,
                kind=admin_pb.FAILURE_KIND_TIMEOUT_APPLIED,
                times=1,
            )
        ],
    )
    await stub.Authorize(authorize_request(reference, f"a-{reference}"), timeout=CALL_TIMEOUT_S)
    capture = pb.CaptureRequest(reference=reference, idempotency_key=f"c-{reference}")
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Capture(capture, timeout=0.5)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3.0
    # The effect was applied although the caller never heard of it; the retry is answered from the record.
    assert (await payment(stub, reference)).captures == 1
    retried = await stub.Capture(capture, timeout=CALL_TIMEOUT_S)
    assert retried.payment.captures == 1
    assert (await payment(stub, reference)).captures == 1


async def test_timeout_without_effect(
    stub: pb_grpc.PaymentProviderServiceAsyncStub, admin: admin_grpc.PaymentProviderAdminServiceAsyncStub
):
    reference = ref()
    await configure(
        admin,
        scripted_failures=[
            admin_pb.ScriptedFailure(reference=reference, kind=admin_pb.FAILURE_KIND_TIMEOUT_NOT_APPLIED, times=1)
        ],
    )
    request = authorize_request(reference, f"a-{reference}")
    before = await admin.GetCounters(admin_pb.GetCountersRequest(), timeout=CALL_TIMEOUT_S)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Authorize(request, timeout=0.5)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = await admin.GetCounters(admin_pb.GetCountersRequest(), timeout=CALL_TIMEOUT_S)

    def timeouts(reply: admin_pb.GetCountersResponse) -> int:
        return sum(c.count for c in reply.counters if (c.method, c.outcome) == ("Authorize", "timeout"))

    # Counted although the caller gave up first (the call was cancelled, not answered).
    assert timeouts(after) - timeouts(before) == 1
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await payment(stub, reference)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await stub.Authorize(request, timeout=CALL_TIMEOUT_S)).approved


async def test_latency_and_declines(
    stub: pb_grpc.PaymentProviderServiceAsyncStub, admin: admin_grpc.PaymentProviderAdminServiceAsyncStub
):
    await configure(admin, latency_ms=300, decline_above_minor=10_000, decline_customer_ids=["blocked"])
    reference = ref()
    started = time.monotonic()
    reply = await stub.Authorize(authorize_request(reference, f"a-{reference}", amount=10_001), timeout=5)
    assert time.monotonic() - started >= 0.3
    assert not reply.approved
    assert "above the limit of 10000" in reply.decline_reason
    assert reply.payment.state == pb.PAYMENT_STATE_DECLINED
    other = ref()
    reply = await stub.Authorize(authorize_request(other, f"a-{other}", customer="blocked"), timeout=5)
    assert not reply.approved
    # Reads are never slowed or failed on purpose.
    started = time.monotonic()
    await stub.ListPayments(pb.ListPaymentsRequest(), timeout=CALL_TIMEOUT_S)
    assert time.monotonic() - started < 0.3


async def test_random_failures_at_full_rate(
    stub: pb_grpc.PaymentProviderServiceAsyncStub, admin: admin_grpc.PaymentProviderAdminServiceAsyncStub
):
    await configure(admin, unavailable_rate=1.0, seed=5)
    reference = ref()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Authorize(authorize_request(reference, f"a-{reference}"), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    await configure(admin, decline_rate=1.0)
    reply = await stub.Authorize(authorize_request(reference, f"b-{reference}"), timeout=CALL_TIMEOUT_S)
    assert reply.decline_reason == "declined: insufficient funds"


async def test_admin_configure_get_and_reject(admin: admin_grpc.PaymentProviderAdminServiceAsyncStub):
    wanted = admin_pb.FailureConfiguration(
        latency_ms=1,
        decline_rate=0.5,
        timeout_effect=admin_pb.TIMEOUT_EFFECT_RANDOM,
        timeout_hang_ms=1000,
        decline_references=["r1"],
        seed=77,
    )
    reply = await admin.Configure(admin_pb.ConfigureRequest(configuration=wanted), timeout=CALL_TIMEOUT_S)
    assert reply.configuration == wanted
    current = await admin.GetConfiguration(admin_pb.GetConfigurationRequest(), timeout=CALL_TIMEOUT_S)
    assert current.configuration == wanted
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await configure(admin, decline_rate=2.0, timeout_rate=-1.0)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = bad_request_from_status(raised.value)
    assert details is not None
    assert {v.field for v in details.field_violations} == {
        "configuration.decline_rate",
        "configuration.timeout_rate",
    }
    # A refused configuration changes nothing.
    after = await admin.GetConfiguration(admin_pb.GetConfigurationRequest(), timeout=CALL_TIMEOUT_S)
    assert after.configuration == wanted


async def test_counters_count_calls_by_method_and_outcome(
    stub: pb_grpc.PaymentProviderServiceAsyncStub, admin: admin_grpc.PaymentProviderAdminServiceAsyncStub
):
    def counts(reply: admin_pb.GetCountersResponse) -> dict[tuple[str, str], int]:
        return {(c.method, c.outcome): c.count for c in reply.counters}

    before = counts(await admin.GetCounters(admin_pb.GetCountersRequest(), timeout=CALL_TIMEOUT_S))
    reference = ref()
    request = authorize_request(reference, f"a-{reference}")
    await stub.Authorize(request, timeout=CALL_TIMEOUT_S)
    await stub.Authorize(request, timeout=CALL_TIMEOUT_S)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Refund(pb.RefundRequest(reference=reference, idempotency_key="r"), timeout=CALL_TIMEOUT_S)
    after = counts(await admin.GetCounters(admin_pb.GetCountersRequest(), timeout=CALL_TIMEOUT_S))
    for key in (("Authorize", "approved"), ("Authorize", "replayed"), ("Refund", "failed_precondition")):
        assert after.get(key, 0) - before.get(key, 0) == 1, key


async def test_restart_with_a_state_file_keeps_payments_and_keys(tmp_path: Path):
    state = tmp_path / "state" / "payments.sqlite3"
    process = provider_process(tmp_path, "provider-file", PAYMENT_STATE_FILE=str(state))
    with process:
        reference = ref()
        request = authorize_request(reference, f"a-{reference}")
        capture = pb.CaptureRequest(reference=reference, idempotency_key=f"c-{reference}")
        async with grpc.aio.insecure_channel(process.address) as chan:
            stub = pb_grpc.PaymentProviderServiceStub(chan)
            first = await stub.Authorize(request, timeout=CALL_TIMEOUT_S)
            await stub.Capture(capture, timeout=CALL_TIMEOUT_S)
        process.kill()  # a crash, not a clean stop
        process.start()
        await process.wait_healthy_async(30)
        async with grpc.aio.insecure_channel(process.address) as chan:
            stub = pb_grpc.PaymentProviderServiceStub(chan)
            again = await stub.Authorize(request, timeout=CALL_TIMEOUT_S)
            assert again.SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)
            await stub.Capture(capture, timeout=CALL_TIMEOUT_S)
            kept = await payment(stub, reference)
            assert (kept.state, kept.captures) == (pb.PAYMENT_STATE_CAPTURED, 1)
    assert process.returncode == 0


async def test_failures_configured_by_environment_at_start(tmp_path: Path):
    process = provider_process(tmp_path, "provider-env", PAYMENT_DECLINE_ABOVE_MINOR="100", PAYMENT_LATENCY_MS="50")
    with process:
        async with grpc.aio.insecure_channel(process.address) as chan:
            admin = admin_grpc.PaymentProviderAdminServiceStub(chan)
            current = await admin.GetConfiguration(admin_pb.GetConfigurationRequest(), timeout=CALL_TIMEOUT_S)
            assert (current.configuration.decline_above_minor, current.configuration.latency_ms) == (100, 50)
            stub = pb_grpc.PaymentProviderServiceStub(chan)
            reference = ref()
            reply = await stub.Authorize(authorize_request(reference, f"a-{reference}", amount=101), timeout=5)
            assert not reply.approved


def test_bad_settings_stop_the_process_with_a_message(tmp_path: Path):
    process = provider_process(tmp_path, "provider-bad", PAYMENT_TIMEOUT_RATE="3").start()
    code = process.wait(30)
    assert code != 0
    assert "payment_timeout_rate" in process.log_tail()
