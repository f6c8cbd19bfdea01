"""Failure injection decisions, their protobuf form, request validation and the settings."""

from __future__ import annotations

import math

import pytest

from payment_provider.__main__ import failure_config
from payment_provider.commands import AuthorizeCommand, PaymentCommand
from payment_provider.faults import (
    FailureConfig,
    Fault,
    FaultInjector,
    ScriptedFailure,
    config_from_proto,
    config_to_proto,
)
from payment_provider.settings import PaymentProviderSettings
from shared_kernel.contracts.errors import InvalidArgument
from tessera.common.v1.money_pb2 import Money
from tessera.payments.v1 import payment_provider_admin_pb2 as admin_pb
from tessera.payments.v1 import payment_provider_pb2 as pb


def test_no_failures_by_default():
    injector = FaultInjector(FailureConfig())
    assert {injector.fault_for("Authorize", f"r{i}", "c") for i in range(200)} == {Fault.NONE}
    assert injector.decline_reason("r", "c", 10**12) is None


def test_the_same_seed_injects_the_same_failures():
    config = FailureConfig(unavailable_rate=0.3, timeout_rate=0.3, timeout_effect="random", decline_rate=0.5, seed=7)

    def run() -> list[tuple[Fault, str | None]]:
        injector = FaultInjector(config)
        return [
            (injector.fault_for("Capture", f"r{i}", "c"), injector.decline_reason(f"r{i}", "c", 1)) for i in range(300)
        ]

    first = run()
    assert first == run()
    faults = {fault for fault, _ in first}
    assert faults == {Fault.NONE, Fault.UNAVAILABLE, Fault.TIMEOUT_APPLIED, Fault.TIMEOUT_NOT_APPLIED}
    declined = sum(1 for _, reason in first if reason)
    assert 100 < declined < 200


def test_deterministic_declines():
    injector = FaultInjector(
        FailureConfig(decline_above_minor=5000, decline_references=("r-bad",), decline_customer_ids=("c-bad",))
    )
    assert injector.decline_reason("r", "c", 5000) is None
    assert "above the limit of 5000" in (injector.decline_reason("r", "c", 5001) or "")
    assert "reference" in (injector.decline_reason("r-bad", "c", 1) or "")
    assert "customer" in (injector.decline_reason("r", "c-bad", 1) or "")


def test_scripted_failures_fire_the_given_number_of_times_for_matching_calls_only():
    rule = ScriptedFailure(Fault.UNAVAILABLE, 2, reference="r1", method="Capture")
    injector = FaultInjector(FailureConfig(scripted=[rule]))
    assert injector.fault_for("Authorize", "r1", "c") is Fault.NONE
    assert injector.fault_for("Capture", "r2", "c") is Fault.NONE
    assert injector.fault_for("Capture", "r1", "c") is Fault.UNAVAILABLE
    assert injector.fault_for("Capture", "r1", "c") is Fault.UNAVAILABLE
    assert injector.fault_for("Capture", "r1", "c") is Fault.NONE
    assert config_to_proto(injector.config).scripted_failures == []


def test_customer_rules_ask_for_a_look_up():
    injector = FaultInjector(FailureConfig(scripted=[ScriptedFailure(Fault.TIMEOUT_APPLIED, 1, customer_id="c1")]))
    assert injector.needs_customer
    assert injector.fault_for("Refund", "any", "c1") is Fault.TIMEOUT_APPLIED
    assert not injector.needs_customer


def test_configure_with_seed_zero_keeps_the_seed():
    injector = FaultInjector(FailureConfig(seed=42))
    injector.configure(FailureConfig(decline_rate=0.1))
    assert injector.config.seed == 42
    injector.configure(FailureConfig(seed=9))
    assert injector.config.seed == 9


def test_configuration_round_trips_through_protobuf():
    message = admin_pb.FailureConfiguration(
        latency_ms=5,
        decline_rate=0.25,
        timeout_rate=0.5,
        unavailable_rate=0.125,
        decline_above_minor=100,
        timeout_effect=admin_pb.TIMEOUT_EFFECT_NOT_APPLIED,
        timeout_hang_ms=2000,
        decline_references=["r"],
        decline_customer_ids=["c"],
        scripted_failures=[
            admin_pb.ScriptedFailure(
                reference="r", method=admin_pb.PROVIDER_METHOD_VOID, kind=admin_pb.FAILURE_KIND_UNAVAILABLE, times=3
            )
        ],
        seed=11,
    )
    assert config_to_proto(config_from_proto(message)) == message
    # Zero hang means the default.
    assert config_from_proto(admin_pb.FailureConfiguration()).timeout_hang_ms == 30_000


def test_bad_configuration_reports_every_violation():
    message = admin_pb.FailureConfiguration(
        latency_ms=60_001,
        decline_rate=1.5,
        timeout_rate=math.nan,
        unavailable_rate=-0.1,
        decline_above_minor=-1,
        timeout_hang_ms=600_001,
        decline_references=[""],
        decline_customer_ids=["bad\x00id"],
        scripted_failures=[admin_pb.ScriptedFailure(reference="x" * 101, times=0)],
    )
    with pytest.raises(InvalidArgument) as raised:
        config_from_proto(message)
    fields = {v.field for v in raised.value.violations}
    assert fields == {
        "configuration.latency_ms",
        "configuration.decline_rate",
        "configuration.timeout_rate",
        "configuration.unavailable_rate",
        "configuration.decline_above_minor",
        "configuration.timeout_hang_ms",
        "configuration.decline_references[0]",
        "configuration.decline_customer_ids[0]",
        "configuration.scripted_failures[0].reference",
        "configuration.scripted_failures[0].kind",
        "configuration.scripted_failures[0].times",
    }


def test_authorize_request_violations_are_reported_together():
    request = pb.AuthorizeRequest(reference="", customer_id="c\n", idempotency_key="k" * 201)
    with pytest.raises(InvalidArgument) as raised:
        AuthorizeCommand.from_proto(request)
    assert {v.field for v in raised.value.violations} == {"reference", "amount", "customer_id", "idempotency_key"}
    request = pb.AuthorizeRequest(
        reference="r", customer_id="c", idempotency_key="k", amount=Money(currency_code="eur", amount_minor=0)
    )
    with pytest.raises(InvalidArgument) as raised:
        AuthorizeCommand.from_proto(request)
    assert {v.field for v in raised.value.violations} == {"amount.currency_code", "amount.amount_minor"}


def test_payment_command_requires_reference_and_key():
    with pytest.raises(InvalidArgument) as raised:
        PaymentCommand.from_proto(pb.CaptureRequest(reference="  "))
    assert {v.field for v in raised.value.violations} == {"reference", "idempotency_key"}


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    for name, value in {
        "PAYMENT_LATENCY_MS": "15",
        "PAYMENT_DECLINE_RATE": "0.2",
        "PAYMENT_TIMEOUT_RATE": "0.1",
        "PAYMENT_UNAVAILABLE_RATE": "0.05",
        "PAYMENT_SEED": "123",
        "PAYMENT_DECLINE_ABOVE_MINOR": "99999",
        "PAYMENT_TIMEOUT_EFFECT": "random",
        "PAYMENT_DECLINE_CUSTOMER_IDS": "a, b",
    }.items():
        monkeypatch.setenv(name, value)
    config = failure_config(PaymentProviderSettings())
    assert config == FailureConfig(
        latency_ms=15,
        decline_rate=0.2,
        timeout_rate=0.1,
        unavailable_rate=0.05,
        decline_above_minor=99999,
        timeout_effect="random",
        decline_customer_ids=("a", "b"),
        seed=123,
    )
    monkeypatch.setenv("PAYMENT_DECLINE_RATE", "2")
    with pytest.raises(ValueError, match="payment_decline_rate"):
        PaymentProviderSettings()
