"""The provider's books: payments and idempotency records in SQLite, and the payment state machine.

    (none) ──Authorize──▶ AUTHORIZED ──Capture──▶ CAPTURED ──Refund──▶ REFUNDED
       │   └─(declined)─▶ DECLINED ──Authorize (new key)──▶ AUTHORIZED | DECLINED
       │                  AUTHORIZED | DECLINED ──Void──▶ VOIDED
       └──Void──▶ VOIDED (a void before any authorization blocks every later one)

Every state-changing call runs in one SQLite transaction that checks its idempotency key,
applies the change and stores the serialized reply under the key: a repeated key gets those
exact bytes back without a second effect, and a key reused for another request is refused.
A call that fails (a broken rule, an unknown reference) stores nothing, so a retry is
judged afresh.

A `Ledger` is not thread-safe: the service runs every call on one worker thread, which also
serializes concurrent calls for the same reference.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from payment_provider.commands import AuthorizeCommand, PaymentCommand
from shared_kernel.contracts.errors import FailedPrecondition, InvalidArgument, NotFound
from tessera.common.v1 import money_pb2
from tessera.payments.v1 import payment_provider_pb2 as pb

AUTHORIZED = "AUTHORIZED"
CAPTURED = "CAPTURED"
VOIDED = "VOIDED"
REFUNDED = "REFUNDED"
DECLINED = "DECLINED"

_STATES: dict[str, pb.PaymentState.ValueType] = {
    AUTHORIZED: pb.PAYMENT_STATE_AUTHORIZED,
    CAPTURED: pb.PAYMENT_STATE_CAPTURED,
    VOIDED: pb.PAYMENT_STATE_VOIDED,
    REFUNDED: pb.PAYMENT_STATE_REFUNDED,
    DECLINED: pb.PAYMENT_STATE_DECLINED,
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    reference TEXT NOT NULL UNIQUE,
    authorization_id TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    currency_code TEXT NOT NULL DEFAULT '',
    amount_minor INTEGER NOT NULL DEFAULT 0,
    customer_id TEXT NOT NULL DEFAULT '',
    captures INTEGER NOT NULL DEFAULT 0,
    refunds INTEGER NOT NULL DEFAULT 0,
    decline_reason TEXT NOT NULL DEFAULT '',
    created_us INTEGER NOT NULL,
    updated_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    response BLOB NOT NULL,
    created_us INTEGER NOT NULL
);
"""

_COLUMNS = (
    "reference, authorization_id, state, currency_code, amount_minor, customer_id, "
    "captures, refunds, decline_reason, created_us, updated_us"
)


@dataclass(frozen=True, slots=True)
class LedgerResult:
    """A reply's bytes, and how the call ended ("ok", "approved", "declined" or "replayed")."""

    response: bytes
    outcome: str

    @property
    def replayed(self) -> bool:
        """Whether the reply is the stored answer to an earlier call with the same key."""
        return self.outcome == "replayed"


def _now_us() -> int:
    return time.time_ns() // 1000


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _check_same_request(stored: Any, method: str, fingerprint: bytes) -> None:
    """Refuse a key that an earlier call of another method, or with other fields, already used."""
    if stored["method"] != method or bytes(stored["fingerprint"]) != fingerprint:
        raise InvalidArgument.single(
            "idempotency_key",
            f"was already used for a different request (a {stored['method']} call); use a new key for a new request",
        )


def _timestamp(micros: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(micros)
    return stamp


class Ledger:
    """Payments keyed by reference, with idempotent state-changing operations."""

    def __init__(self, path: str = ":memory:", clock: Callable[[], int] = _now_us) -> None:
        """Open (creating if needed) the SQLite database at `path`; `clock` returns microseconds since the epoch."""
        # Autocommit mode: every transaction is an explicit BEGIN IMMEDIATE ... COMMIT.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        # A reply is sent only after its effect is on disk: a crash never forgets a charge it confirmed.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._clock = clock

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    # -- reads

    def get(self, reference: str) -> pb.Payment:
        """The payment of `reference`; NotFound when there is none."""
        row = self._row(reference)
        if row is None:
            raise NotFound(f"no payment with reference {reference!r}")
        return self._payment(row)

    def list(self) -> list[pb.Payment]:
        """Every payment, oldest first."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM payments ORDER BY seq").fetchall()  # noqa: S608
        return [self._payment(row) for row in rows]

    def customer_of(self, reference: str) -> str:
        """The customer the payment's authorization named ('' when unknown)."""
        row = self._db.execute("SELECT customer_id FROM payments WHERE reference = ?", (reference,)).fetchone()
        return str(row["customer_id"]) if row is not None else ""

    # -- state-changing operations

    def authorize(self, command: AuthorizeCommand, request: Message, decline_reason: str | None) -> LedgerResult:
        """Hold the amount, or record a decline when `decline_reason` is set (a decline is a reply, not an error)."""

        def apply() -> tuple[Message, str]:
            now = self._clock()
            row = self._row(command.reference)
            if row is not None and row["state"] == VOIDED:
                raise FailedPrecondition(
                    f"payment {command.reference!r} was voided: a voided reference cannot be authorized"
                )
            if row is not None and row["state"] != DECLINED:
                raise FailedPrecondition(
                    f"payment {command.reference!r} is already {row['state'].lower()}: one authorization per reference"
                )
            state = DECLINED if decline_reason else AUTHORIZED
            authorization_id = "" if decline_reason else _new_id("auth")
            values = (
                authorization_id,
                state,
                command.money.currency_code,
                command.money.amount_minor,
                command.customer_id,
                decline_reason or "",
                now,
            )
            if row is None:
                self._db.execute(
                    "INSERT INTO payments (authorization_id, state, currency_code, amount_minor, customer_id, "
                    "decline_reason, updated_us, created_us, reference) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*values, now, command.reference),
                )
            else:
                # A declined reference may be tried again (with a new key): the payment is re-judged.
                self._db.execute(
                    "UPDATE payments SET authorization_id = ?, state = ?, currency_code = ?, amount_minor = ?, "
                    "customer_id = ?, decline_reason = ?, updated_us = ? WHERE reference = ?",
                    (*values, command.reference),
                )
            payment = self.get(command.reference)
            reply = pb.AuthorizeResponse(
                approved=decline_reason is None,
                authorization_id=authorization_id,
                decline_reason=decline_reason or "",
                payment=payment,
            )
            return reply, "declined" if decline_reason else "approved"

        return self._idempotent("Authorize", command.idempotency_key, request, apply)

    def capture(self, command: PaymentCommand, request: Message) -> LedgerResult:
        """Charge an authorized payment."""

        def apply() -> tuple[Message, str]:
            self._transition(command.reference, {AUTHORIZED}, CAPTURED, "captured", captures=1)
            return pb.CaptureResponse(payment=self.get(command.reference)), "ok"

        return self._idempotent("Capture", command.idempotency_key, request, apply)

    def void(self, command: PaymentCommand, request: Message) -> LedgerResult:
        """Release an authorization; on a reference never authorized, record a void that blocks later ones."""

        def apply() -> tuple[Message, str]:
            row = self._row(command.reference)
            if row is None:
                now = self._clock()
                self._db.execute(
                    "INSERT INTO payments (reference, state, created_us, updated_us) VALUES (?, ?, ?, ?)",
                    (command.reference, VOIDED, now, now),
                )
            elif row["state"] != VOIDED:
                self._transition(command.reference, {AUTHORIZED, DECLINED}, VOIDED, "voided")
            return pb.VoidResponse(payment=self.get(command.reference)), "ok"

        return self._idempotent("Void", command.idempotency_key, request, apply)

    def refund(self, command: PaymentCommand, request: Message) -> LedgerResult:
        """Return a captured payment."""

        def apply() -> tuple[Message, str]:
            self._transition(command.reference, {CAPTURED}, REFUNDED, "refunded", refunds=1)
            reply = pb.RefundResponse(refund_id=_new_id("refund"), payment=self.get(command.reference))
            return reply, "ok"

        return self._idempotent("Refund", command.idempotency_key, request, apply)

    # -- internals

    def _idempotent(
        self, method: str, key: str, request: Message, apply: Callable[[], tuple[Message, str]]
    ) -> LedgerResult:
        fingerprint = request.SerializeToString(deterministic=True)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            stored = self._db.execute(
                "SELECT method, fingerprint, response FROM idempotency WHERE key = ?", (key,)
            ).fetchone()
            if stored is not None:
                _check_same_request(stored, method, fingerprint)
                self._db.execute("COMMIT")
                return LedgerResult(bytes(stored["response"]), "replayed")
            reply, outcome = apply()
            response = reply.SerializeToString(deterministic=True)
            self._db.execute(
                "INSERT INTO idempotency (key, method, fingerprint, response, created_us) VALUES (?, ?, ?, ?, ?)",
                (key, method, fingerprint, response, self._clock()),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return LedgerResult(response, outcome)

    def _transition(
        self,
        reference: str,
        allowed: set[str],
        target: str,
        verb: str,
        *,
        captures: int = 0,
        refunds: int = 0,
    ) -> None:
        row = self._row(reference)
        if row is None:
            raise NotFound(f"no payment with reference {reference!r}")
        state = str(row["state"])
        if state not in allowed:
            expected = " or ".join(sorted(s.lower() for s in allowed))
            raise FailedPrecondition(
                f"payment {reference!r} is {state.lower()}: only a payment that is {expected} can be {verb}"
            )
        self._db.execute(
            "UPDATE payments SET state = ?, captures = captures + ?, refunds = refunds + ?, updated_us = ? "
            "WHERE reference = ?",
            (target, captures, refunds, self._clock(), reference),
        )

    def _row(self, reference: str) -> Any:
        return self._db.execute(
            f"SELECT {_COLUMNS} FROM payments WHERE reference = ?",  # noqa: S608 - a constant column list
            (reference,),
        ).fetchone()

    @staticmethod
    def _payment(row: Any) -> pb.Payment:
        payment = pb.Payment(
            reference=row["reference"],
            authorization_id=row["authorization_id"],
            state=_STATES[row["state"]],
            captures=row["captures"],
            refunds=row["refunds"],
            decline_reason=row["decline_reason"],
            created_at=_timestamp(row["created_us"]),
            updated_at=_timestamp(row["updated_us"]),
        )
        if row["currency_code"]:
            payment.amount.CopyFrom(
                money_pb2.Money(currency_code=row["currency_code"], amount_minor=row["amount_minor"])
            )
        return payment
