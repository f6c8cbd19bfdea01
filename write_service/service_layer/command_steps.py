"""What every command handler shares: its dependencies and metadata, and the steps of its unit of work.

A handler loads what it needs, lets the aggregate decide, and commits the state, the
events, the command-log row and (for a keyed command) the stored reply in one unit of
work. Handlers never publish anything: the relay moves committed outbox rows on.

A keyed command first takes its key's lock and looks for a stored reply, in the same
unit of work, before it loads anything: a retry of a command that succeeded must get the
first reply even though the aggregate has moved on (its expected version would no longer
match, its user would already be deactivated, its order would already be cancelled).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar, cast

from shared_kernel.auth import ANONYMOUS
from shared_kernel.errors import Conflict, FailedPrecondition, NotFound
from shared_kernel.event_log import NewEvent
from write_service.commands.base import ChangeCommand, Command
from write_service.domain.aggregate import Aggregate
from write_service.service_layer.aggregate_turns import AggregateTurns
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.event_bus import Policies, handle_domain_events, integration_events
from write_service.service_layer.idempotency import key_reused
from write_service.service_layer.ports import (
    CommandLogEntry,
    IdempotencyScope,
    PasswordHasher,
    StoredReply,
    UnitOfWork,
)

A = TypeVar("A", bound=Aggregate)


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Dependencies:
    """What handlers need besides the unit of work."""

    hasher: PasswordHasher
    clock: Callable[[], datetime] = utc_now
    new_id: Callable[[], uuid.UUID] = uuid.uuid4
    # Shared by every command of the process: one command at a time per aggregate.
    turns: AggregateTurns = field(default_factory=AggregateTurns)
    # The policies domain events go to; None: every context's (service_layer.handler_table.POLICIES).
    policies: Policies | None = None


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The reply to a successful command: the aggregate and its new version."""

    aggregate_id: uuid.UUID
    version: int
    # For a keyed command: the serialized reply that was stored (or, on a replay, returned).
    reply: bytes = b""
    # Set when this is a stored reply returned to a retry: the command that produced it.
    replay_of: uuid.UUID | None = None
    # The events the command recorded (empty on a replay): what a reply may need beyond the version.
    events: tuple[NewEvent, ...] = ()


ReplyEncoder = Callable[[CommandResult], bytes]


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """A keyed command's scope and fingerprint, and how its reply is stored."""

    scope: IdempotencyScope
    fingerprint: bytes
    retention: timedelta
    encode_reply: ReplyEncoder


@dataclass(frozen=True, slots=True)
class CommandMeta:
    """Facts about one request: its command id (also the events' causation id), correlation and deadline."""

    command_id: uuid.UUID
    correlation_id: str
    received_at: datetime
    deadline: Deadline
    # Who sent it (shared_kernel.auth.current_principal() of the call).
    principal: str = ANONYMOUS
    # The caller's idempotency key, already validated; the bus turns it into `idempotency`.
    idempotency_key: str | None = None
    idempotency: IdempotencyClaim | None = None


Handler = Callable[[Any, UnitOfWork, Dependencies, CommandMeta], Awaitable[CommandResult]]


class AggregateStore(Protocol[A]):
    """What `change_aggregate` needs of a repository: a load and a save guarded by the version loaded."""

    async def get(self, aggregate_id: uuid.UUID, /) -> A | None:
        """The aggregate as stored, or None."""

    def adopt(self, aggregate: A, /) -> None:
        """Take an aggregate this process holds at its stored version as if this unit of work had read it."""

    async def save(self, aggregate: A, /) -> None:
        """Store the changed aggregate."""


async def change_aggregate(
    command: ChangeCommand,
    uow: UnitOfWork,
    deps: Dependencies,
    meta: CommandMeta,
    *,
    store: Callable[[UnitOfWork], AggregateStore[A]],
    change: Callable[[A], Awaitable[None]],
) -> CommandResult:
    """Load the command's aggregate from `store(uow)`, check its version, apply `change`, save, commit.

    A stored reply for the command's idempotency key is returned instead, before anything
    loads. The load and the commit happen in the aggregate's turn (`AggregateTurns`), which
    may hold the state the previous command here committed: then nothing is read. A rule
    that refuses the command on that state raises Conflict instead, so the bus retries it
    on a fresh read (another process may have moved the aggregate on).
    """
    async with uow:
        if (stored := await stored_reply(uow, command, deps, meta)) is not None:
            return stored
        async with deps.turns.turn(command, meta.deadline) as turn:
            repository = store(uow)
            held, turn.state = turn.state, None
            aggregate: A | None
            if held is None:
                aggregate = await repository.get(command.aggregate_uuid)
            else:
                aggregate = cast(A, held)  # the turn of an aggregate holds only that aggregate
                repository.adopt(aggregate)
            if aggregate is None:
                raise NotFound(f"{command.aggregate_type} {command.aggregate_id} not found")
            try:
                aggregate.require_version(command.expected_version)
                await change(aggregate)
            except (FailedPrecondition, NotFound) as exc:
                if held is None:
                    raise
                raise Conflict(f"{command.aggregate_type} {command.aggregate_id} is read again") from exc
            # The policies read before any write is queued: a read after a write would cost
            # an explicit transaction and two more round trips.
            published = await publishable_events(uow, aggregate, deps)
            await repository.save(aggregate)
            result = await commit(uow, command, aggregate, deps, meta, published=published)
            turn.state = copy.deepcopy(aggregate)
            return result


async def stored_reply(
    uow: UnitOfWork, command: Command, deps: Dependencies, meta: CommandMeta
) -> CommandResult | None:
    """For a keyed command: lock the key, then return (and log) its stored reply if it has one."""
    claim = meta.idempotency
    if claim is None:
        return None
    # Lock and look-up share a round trip, so the look-up may miss a reply committed just
    # before the lock was taken; the stored reply's primary key then fails this command's
    # write (put() is a guard), and its retry finds the reply (decision 0027).
    locked, stored = await uow.idempotency.lock_and_get(claim.scope)
    if not locked:
        raise Conflict("a request with this idempotency key is still in progress; retry it later")
    completed_at = deps.clock()
    if stored is None or stored.expires_at <= completed_at:
        return None
    if stored.fingerprint != claim.fingerprint:
        raise key_reused()
    await uow.log_command(
        CommandLogEntry(
            command_id=meta.command_id,
            command_type=command.command_type,
            aggregate_type=command.aggregate_type,
            aggregate_id=stored.aggregate_id,
            correlation_id=meta.correlation_id,
            received_at=meta.received_at,
            completed_at=completed_at,
            outcome="replayed",
            summary=command.summary(),
            principal=meta.principal,
            idempotency_key=claim.scope.key,
            replay_of=stored.command_id,
        )
    )
    await uow.commit()
    return CommandResult(
        aggregate_id=uuid.UUID(stored.aggregate_id),
        version=stored.aggregate_version,
        reply=stored.reply,
        replay_of=stored.command_id,
    )


async def publishable_events(uow: UnitOfWork, aggregate: Aggregate, deps: Dependencies) -> list[NewEvent]:
    """Hand the aggregate's events to their policies (in this unit of work); the integration events of all."""
    handled = await handle_domain_events(uow, tuple(aggregate.pending_events), deps.clock(), deps.policies)
    return integration_events(handled)


async def commit(
    uow: UnitOfWork,
    command: Command,
    aggregate: Aggregate,
    deps: Dependencies,
    meta: CommandMeta,
    *,
    published: list[NewEvent] | None = None,
) -> CommandResult:
    """Append the integration events, the command-log row and any stored reply, then commit.

    `published` is what `publishable_events` returned, when the caller ran the policies
    before queueing its own write; otherwise they run here.
    """
    events = tuple(aggregate.pending_events)
    claim = meta.idempotency
    if published is None:
        published = await publishable_events(uow, aggregate, deps)
    completed_at = deps.clock()
    await uow.append_events(published, correlation_id=meta.correlation_id, causation_id=str(meta.command_id))
    await uow.log_command(
        CommandLogEntry(
            command_id=meta.command_id,
            command_type=command.command_type,
            aggregate_type=aggregate.aggregate_type,
            aggregate_id=str(aggregate.id),
            correlation_id=meta.correlation_id,
            received_at=meta.received_at,
            completed_at=completed_at,
            outcome="succeeded",
            event_ids=tuple(e.event_id for e in published),
            summary=command.summary(),
            principal=meta.principal,
            idempotency_key=claim.scope.key if claim is not None else "",
        )
    )
    result = CommandResult(aggregate_id=aggregate.id, version=aggregate.version, events=events)
    if claim is not None:
        result = replace(result, reply=claim.encode_reply(result))
        await uow.idempotency.put(
            StoredReply(
                scope=claim.scope,
                fingerprint=claim.fingerprint,
                command_id=meta.command_id,
                aggregate_id=str(aggregate.id),
                aggregate_version=aggregate.version,
                reply=result.reply,
                created_at=completed_at,
                expires_at=completed_at + claim.retention,
            )
        )
    await uow.commit()
    aggregate.pending_events.clear()
    return result
