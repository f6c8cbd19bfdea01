"""Injected failures: what they are, how they are chosen, and their protobuf form.

Random failures draw from one `random.Random` seeded from the configuration, so the same
calls in the same order see the same failures. Scripted failures fire for chosen
references, customers and methods a given number of times, then are used up.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field, replace
from typing import Literal

from shared_kernel.contracts.errors import FieldViolation, InvalidArgument
from shared_kernel.contracts.validation import has_control_chars
from tessera.payments.v1 import payment_provider_admin_pb2 as admin_pb

TimeoutEffectName = Literal["applied", "not_applied", "random"]
MAX_LATENCY_MS = 60_000
MAX_HANG_MS = 600_000
DEFAULT_HANG_MS = 30_000
MAX_SCRIPTED_TIMES = 1000
MAX_LISTED = 1000
MAX_ID_CHARS = 100

# The state-changing methods; reads (GetPayment, ListPayments) never fail on purpose.
METHODS = ("Authorize", "Capture", "Void", "Refund")


class Fault(enum.Enum):
    """What happens to one call."""

    NONE = "none"
    UNAVAILABLE = "unavailable"
    TIMEOUT_APPLIED = "timeout_applied"
    TIMEOUT_NOT_APPLIED = "timeout_not_applied"


@dataclass
class ScriptedFailure:
    """The next `remaining` calls matching reference, customer and method fail with `fault`."""

    fault: Fault
    remaining: int
    reference: str = ""
    customer_id: str = ""
    method: str = ""  # empty: any state-changing method

    def matches(self, method: str, reference: str, customer_id: str) -> bool:
        """Whether a call of `method` for `reference` and `customer_id` is one this rule fails."""
        return (
            self.remaining > 0
            and (not self.method or self.method == method)
            and (not self.reference or self.reference == reference)
            and (not self.customer_id or self.customer_id == customer_id)
        )


@dataclass
class FailureConfig:
    """Every failure the provider injects (see FailureConfiguration in payment_provider_admin.proto)."""

    latency_ms: int = 0
    decline_rate: float = 0.0
    timeout_rate: float = 0.0
    unavailable_rate: float = 0.0
    decline_above_minor: int = 0
    timeout_effect: TimeoutEffectName = "applied"
    timeout_hang_ms: int = DEFAULT_HANG_MS
    decline_references: tuple[str, ...] = ()
    decline_customer_ids: tuple[str, ...] = ()
    scripted: list[ScriptedFailure] = field(default_factory=list)
    seed: int = 0


class FaultInjector:
    """Decides, call by call, which failure (if any) to inject. Used from the event loop only."""

    def __init__(self, config: FailureConfig) -> None:
        """Start with `config`; a seed of 0 seeds the generator from the system."""
        self._config = config
        self._rng = random.Random(config.seed or None)  # noqa: S311 - failure injection, not cryptography

    @property
    def config(self) -> FailureConfig:
        """The configuration in force (scripted failures show what is left of them)."""
        return self._config

    def configure(self, config: FailureConfig) -> None:
        """Replace the configuration; a non-zero seed reseeds the generator, 0 keeps it (and the old seed)."""
        if config.seed:
            self._rng = random.Random(config.seed)  # noqa: S311
        else:
            config = replace(config, seed=self._config.seed)
        self._config = config

    @property
    def needs_customer(self) -> bool:
        """Whether a scripted failure matches by customer, so calls without one must look it up."""
        return any(rule.customer_id and rule.remaining > 0 for rule in self._config.scripted)

    def fault_for(self, method: str, reference: str, customer_id: str) -> Fault:
        """The failure for one state-changing call: scripted first, then unavailable, then timeout."""
        for rule in self._config.scripted:
            if rule.matches(method, reference, customer_id):
                rule.remaining -= 1
                return rule.fault
        config = self._config
        if config.unavailable_rate and self._rng.random() < config.unavailable_rate:
            return Fault.UNAVAILABLE
        if config.timeout_rate and self._rng.random() < config.timeout_rate:
            effect = config.timeout_effect
            if effect == "random":
                effect = "applied" if self._rng.random() < 0.5 else "not_applied"
            return Fault.TIMEOUT_APPLIED if effect == "applied" else Fault.TIMEOUT_NOT_APPLIED
        return Fault.NONE

    def decline_reason(self, reference: str, customer_id: str, amount_minor: int) -> str | None:
        """Why an authorization would be declined now, or None to approve it."""
        config = self._config
        if reference in config.decline_references:
            return "declined: the reference is on the decline list"
        if customer_id in config.decline_customer_ids:
            return "declined: the customer is on the decline list"
        if config.decline_above_minor and amount_minor > config.decline_above_minor:
            return f"declined: amount above the limit of {config.decline_above_minor} minor units"
        if config.decline_rate and self._rng.random() < config.decline_rate:
            return "declined: insufficient funds"
        return None


# --- protobuf form -----------------------------------------------------------------------

_EFFECT_TO_PROTO: dict[TimeoutEffectName, admin_pb.TimeoutEffect.ValueType] = {
    "applied": admin_pb.TIMEOUT_EFFECT_APPLIED,
    "not_applied": admin_pb.TIMEOUT_EFFECT_NOT_APPLIED,
    "random": admin_pb.TIMEOUT_EFFECT_RANDOM,
}
_EFFECT_FROM_PROTO: dict[int, TimeoutEffectName] = {
    admin_pb.TIMEOUT_EFFECT_UNSPECIFIED: "applied",
    **{int(value): name for name, value in _EFFECT_TO_PROTO.items()},
}
_METHOD_TO_PROTO: dict[str, admin_pb.ProviderMethod.ValueType] = {
    "": admin_pb.PROVIDER_METHOD_UNSPECIFIED,
    "Authorize": admin_pb.PROVIDER_METHOD_AUTHORIZE,
    "Capture": admin_pb.PROVIDER_METHOD_CAPTURE,
    "Void": admin_pb.PROVIDER_METHOD_VOID,
    "Refund": admin_pb.PROVIDER_METHOD_REFUND,
}
_METHOD_FROM_PROTO = {int(value): name for name, value in _METHOD_TO_PROTO.items()}
_FAULT_TO_PROTO: dict[Fault, admin_pb.FailureKind.ValueType] = {
    Fault.UNAVAILABLE: admin_pb.FAILURE_KIND_UNAVAILABLE,
    Fault.TIMEOUT_APPLIED: admin_pb.FAILURE_KIND_TIMEOUT_APPLIED,
    Fault.TIMEOUT_NOT_APPLIED: admin_pb.FAILURE_KIND_TIMEOUT_NOT_APPLIED,
}
_FAULT_FROM_PROTO = {int(value): fault for fault, value in _FAULT_TO_PROTO.items()}


def config_to_proto(config: FailureConfig) -> admin_pb.FailureConfiguration:
    """The protobuf form of `config`."""
    return admin_pb.FailureConfiguration(
        latency_ms=config.latency_ms,
        decline_rate=config.decline_rate,
        timeout_rate=config.timeout_rate,
        unavailable_rate=config.unavailable_rate,
        decline_above_minor=config.decline_above_minor,
        timeout_effect=_EFFECT_TO_PROTO[config.timeout_effect],
        timeout_hang_ms=config.timeout_hang_ms,
        decline_references=config.decline_references,
        decline_customer_ids=config.decline_customer_ids,
        scripted_failures=[
            admin_pb.ScriptedFailure(
                reference=rule.reference,
                customer_id=rule.customer_id,
                method=_METHOD_TO_PROTO[rule.method],
                kind=_FAULT_TO_PROTO[rule.fault],
                times=rule.remaining,
            )
            for rule in config.scripted
            if rule.remaining > 0
        ],
        seed=config.seed,
    )


def _rate(field_name: str, value: float, violations: list[FieldViolation]) -> None:
    # `not 0 <= value <= 1` is also true for NaN.
    if not 0.0 <= value <= 1.0:
        violations.append(FieldViolation(field_name, "must be between 0 and 1"))


def _ids(field_name: str, values: list[str], violations: list[FieldViolation]) -> None:
    if len(values) > MAX_LISTED:
        violations.append(FieldViolation(field_name, f"must hold at most {MAX_LISTED} entries"))
    for index, value in enumerate(values):
        _id(f"{field_name}[{index}]", value, violations, required=True)


def _id(field_name: str, value: str, violations: list[FieldViolation], *, required: bool) -> None:
    if not value:
        if required:
            violations.append(FieldViolation(field_name, "is required"))
    elif len(value) > MAX_ID_CHARS:
        violations.append(FieldViolation(field_name, f"must be at most {MAX_ID_CHARS} characters"))
    elif has_control_chars(value):
        violations.append(FieldViolation(field_name, "must not contain control characters"))


def config_from_proto(message: admin_pb.FailureConfiguration, prefix: str = "configuration") -> FailureConfig:
    """Validate a FailureConfiguration; every bad field is reported at once as InvalidArgument."""
    violations: list[FieldViolation] = []
    if message.latency_ms > MAX_LATENCY_MS:
        violations.append(FieldViolation(f"{prefix}.latency_ms", f"must be at most {MAX_LATENCY_MS}"))
    _rate(f"{prefix}.decline_rate", message.decline_rate, violations)
    _rate(f"{prefix}.timeout_rate", message.timeout_rate, violations)
    _rate(f"{prefix}.unavailable_rate", message.unavailable_rate, violations)
    if message.decline_above_minor < 0:
        violations.append(FieldViolation(f"{prefix}.decline_above_minor", "must not be negative"))
    if message.timeout_effect not in _EFFECT_FROM_PROTO:
        violations.append(FieldViolation(f"{prefix}.timeout_effect", "is not a known TimeoutEffect"))
    if message.timeout_hang_ms > MAX_HANG_MS:
        violations.append(FieldViolation(f"{prefix}.timeout_hang_ms", f"must be at most {MAX_HANG_MS}"))
    _ids(f"{prefix}.decline_references", list(message.decline_references), violations)
    _ids(f"{prefix}.decline_customer_ids", list(message.decline_customer_ids), violations)
    if len(message.scripted_failures) > MAX_LISTED:
        violations.append(FieldViolation(f"{prefix}.scripted_failures", f"must hold at most {MAX_LISTED} entries"))
    scripted: list[ScriptedFailure] = []
    for index, rule in enumerate(message.scripted_failures):
        path = f"{prefix}.scripted_failures[{index}]"
        _id(f"{path}.reference", rule.reference, violations, required=False)
        _id(f"{path}.customer_id", rule.customer_id, violations, required=False)
        method = _METHOD_FROM_PROTO.get(rule.method)
        if method is None:
            violations.append(FieldViolation(f"{path}.method", "is not a known ProviderMethod"))
        fault = _FAULT_FROM_PROTO.get(rule.kind)
        if fault is None:
            violations.append(
                FieldViolation(
                    f"{path}.kind", "must be FAILURE_KIND_UNAVAILABLE, _TIMEOUT_APPLIED or _TIMEOUT_NOT_APPLIED"
                )
            )
        if not 1 <= rule.times <= MAX_SCRIPTED_TIMES:
            violations.append(FieldViolation(f"{path}.times", f"must be between 1 and {MAX_SCRIPTED_TIMES}"))
        if method is not None and fault is not None:
            scripted.append(ScriptedFailure(fault, rule.times, rule.reference, rule.customer_id, method))
    if violations:
        raise InvalidArgument(violations)
    return FailureConfig(
        latency_ms=message.latency_ms,
        decline_rate=message.decline_rate,
        timeout_rate=message.timeout_rate,
        unavailable_rate=message.unavailable_rate,
        decline_above_minor=message.decline_above_minor,
        timeout_effect=_EFFECT_FROM_PROTO[message.timeout_effect],
        timeout_hang_ms=message.timeout_hang_ms or DEFAULT_HANG_MS,
        decline_references=tuple(message.decline_references),
        decline_customer_ids=tuple(message.decline_customer_ids),
        scripted=scripted,
        seed=message.seed,
    )
