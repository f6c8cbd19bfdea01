"""What an operator can do with sagas: list them, look at one with its step log, retry a failed one.

Shared by the gRPC OrderSagaAdminService (in the write service) and the
`python -m write_service.saga.admin` command; both talk to Postgres directly.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from shared_kernel.contracts import errors
from write_service.saga import model

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
STATUSES = (model.RUNNING, model.COMPENSATING, model.COMPLETED, model.FAILED)

_COLUMNS = (
    "id, order_id, status, current_step, attempts, last_error, version, created_at, updated_at, next_attempt_at, "
    "locked_by, locked_until, context::text AS context"
)

_LIST = f"""
SELECT {_COLUMNS} FROM saga_executions
WHERE ($1::text IS NULL OR status = $1)
  AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3::uuid))
ORDER BY created_at DESC, id DESC
LIMIT $4
"""  # noqa: S608 - constant columns

_FIND = f"SELECT {_COLUMNS} FROM saga_executions WHERE id = $1 OR order_id = $1 LIMIT 1"  # noqa: S608
_FIND_FOR_UPDATE = f"SELECT {_COLUMNS} FROM saga_executions WHERE id = $1 OR order_id = $1 LIMIT 1 FOR UPDATE"  # noqa: S608
_STEPS = "SELECT step, kind, outcome, detail, attempt, at FROM saga_steps WHERE saga_id = $1 ORDER BY id"

_RETRY = f"""
UPDATE saga_executions
SET status = $2, attempts = 0, last_error = '', next_attempt_at = now(), locked_by = NULL, locked_until = NULL,
    version = version + 1, updated_at = now()
WHERE id = $1 AND status = 'failed'
RETURNING {_COLUMNS}
"""  # noqa: S608 - constant columns

_LOG_RETRY = """
INSERT INTO saga_steps (saga_id, step, kind, outcome, detail, attempt, at)
VALUES ($1, $2, $3, 'retrying', $4, $5, now())
"""


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One row of a saga's step log."""

    step: str
    kind: str
    outcome: str
    detail: str
    attempt: int
    at: datetime


@dataclass(frozen=True, slots=True)
class SagaRecord:
    """One saga execution as an operator sees it."""

    id: uuid.UUID
    order_id: uuid.UUID
    status: str
    current_step: str
    attempts: int
    last_error: str
    version: int
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime | None
    locked_by: str | None
    locked_until: datetime | None
    context: dict[str, Any]
    steps: tuple[StepRecord, ...] = ()

    def as_json(self) -> dict[str, Any]:
        """The record as JSON-ready values."""
        return {
            "saga_id": str(self.id),
            "order_id": str(self.order_id),
            "status": self.status,
            "current_step": self.current_step,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "version": self.version,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "next_attempt_at": self.next_attempt_at.isoformat() if self.next_attempt_at else None,
            "locked_by": self.locked_by,
            "locked_until": self.locked_until.isoformat() if self.locked_until else None,
            "context": self.context,
            "steps": [
                {
                    "step": s.step,
                    "kind": s.kind,
                    "outcome": s.outcome,
                    "detail": s.detail,
                    "attempt": s.attempt,
                    "at": s.at.isoformat(),
                }
                for s in self.steps
            ],
        }


@dataclass(frozen=True, slots=True)
class SagaPage:
    """One page of sagas, newest first, and the token of the next page ("" when last)."""

    sagas: tuple[SagaRecord, ...]
    next_page_token: str


def _record(row: asyncpg.Record, steps: tuple[StepRecord, ...] = ()) -> SagaRecord:
    return SagaRecord(
        id=row["id"],
        order_id=row["order_id"],
        status=row["status"],
        current_step=row["current_step"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        next_attempt_at=row["next_attempt_at"],
        locked_by=row["locked_by"],
        locked_until=row["locked_until"],
        context=json.loads(row["context"]),
        steps=steps,
    )


def parse_id(value: str, field: str = "id") -> uuid.UUID:
    """A saga or order id from a request; anything but a UUID is INVALID_ARGUMENT."""
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        raise errors.InvalidArgument.single(field, "must be a UUID (a saga id or an order id)") from None


def _encode_token(created_at: datetime, saga_id: uuid.UUID) -> str:
    raw = json.dumps({"c": created_at.isoformat(), "i": str(saga_id)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        return datetime.fromisoformat(data["c"]), uuid.UUID(data["i"])
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise errors.InvalidArgument.single("page_token", "is not a token this service issued") from None


def check_page_size(page_size: int) -> int:
    """0 means the default; 1..MAX_PAGE_SIZE as asked; anything else INVALID_ARGUMENT."""
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise errors.InvalidArgument.single("page_size", f"must be between 1 and {MAX_PAGE_SIZE} (0: the default)")
    return page_size


async def list_sagas(
    pool: asyncpg.Pool[Any], status: str | None = None, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
) -> SagaPage:
    """A page of sagas, newest first, optionally in one status."""
    if status is not None and status not in STATUSES:
        raise errors.InvalidArgument.single("status", f"must be one of {', '.join(STATUSES)}")
    size = check_page_size(page_size)
    after_created, after_id = _decode_token(page_token) if page_token else (None, None)
    rows = await pool.fetch(_LIST, status, after_created, after_id, size + 1)
    records = tuple(_record(row) for row in rows[:size])
    token = _encode_token(records[-1].created_at, records[-1].id) if len(rows) > size else ""
    return SagaPage(records, token)


async def get_saga(pool: asyncpg.Pool[Any], saga_or_order_id: uuid.UUID) -> SagaRecord:
    """One saga (by its id or its order's id) with its step log; NOT_FOUND when there is none."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(_FIND, saga_or_order_id)
        if row is None:
            raise errors.NotFound(f"no saga with id or order id {saga_or_order_id}")
        steps = tuple(StepRecord(**dict(step)) for step in await conn.fetch(_STEPS, row["id"]))
    return _record(row, steps)


async def retry_saga(pool: asyncpg.Pool[Any], saga_or_order_id: uuid.UUID, operator: str) -> SagaRecord:
    """Put a failed saga back to work at the step it failed at, attempts reset; others FAILED_PRECONDITION."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_FIND_FOR_UPDATE, saga_or_order_id)
        if row is None:
            raise errors.NotFound(f"no saga with id or order id {saga_or_order_id}")
        if row["status"] != model.FAILED:
            raise errors.FailedPrecondition(f"only a failed saga can be retried: saga {row['id']} is {row['status']}")
        status = model.status_for_retry(row["current_step"])
        updated = await conn.fetchrow(_RETRY, row["id"], status)
        assert updated is not None  # the row is locked and failed
        await conn.execute(
            _LOG_RETRY,
            row["id"],
            row["current_step"],
            model.step_kind(row["current_step"]),
            f"retried by {operator} after: {row['last_error']}",
            max(1, row["attempts"]),
        )
        steps = tuple(StepRecord(**dict(step)) for step in await conn.fetch(_STEPS, row["id"]))
    return _record(updated, steps)
