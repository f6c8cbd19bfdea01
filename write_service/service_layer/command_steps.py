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

from opentelemetry import context as otel_context

from shared_kernel.contracts.errors import Conflict, DomainError, FailedPrecondition, NotFound
from shared_kernel.contracts.event_log import NewEvent
from shared_kernel.platform.security.authn import ANONYMOUS
from write_service.commands.base import ChangeCommand, Command
from write_service.domain.aggregate import Aggregate
from write_service.service_layer.aggregate_turns import AggregateTurns, Queued, Turn
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

# Aggregates whose commands' changes decide on the aggregate alone (they read and write
# nothing else through the unit of work) and whose events no policy reacts to through it:
# such commands, queued on one aggregate, are decided in turn and written together. An
# order's changes read products and hand work to the saga through the unit of work they
# were given, and a user's deactivation has the orders' policy, so neither is batched.
BATCHED_AGGREGATES = frozenset({"product"})


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
    # Who sent it (shared_kernel.platform.security.authn.current_principal() of the call).
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


async def create_aggregate(
    command: Command,
    uow: UnitOfWork,
    deps: Dependencies,
    meta: CommandMeta,
    *,
    create: Callable[[], Awaitable[Aggregate]],
) -> CommandResult:
    """A command that creates an aggregate: the stored reply of a keyed retry, else `create` and commit.

    `create` checks what the new aggregate needs (a free SKU, an active customer...), builds
    it and adds it to its repository of `uow`; it runs in the unit of work, after the key's look-up.
    """
    async with uow:
        if (stored := await stored_reply(uow, command, deps, meta)) is not None:
            return stored
        aggregate = await create()
        return await commit(uow, command, aggregate, deps, meta)


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

    Products are decided and written in batches of the commands queued on the aggregate
    (`_write_queued`, decision 0033).
    """
    if command.aggregate_type in BATCHED_AGGREGATES:
        return await _run_queued(command, uow, deps, meta, store=store, change=change)
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


async def _run_queued(
    command: ChangeCommand,
    uow: UnitOfWork,
    deps: Dependencies,
    meta: CommandMeta,
    *,
    store: Callable[[UnitOfWork], AggregateStore[A]],
    change: Callable[[A], Awaitable[None]],
) -> CommandResult:
    """Queue the command on its aggregate without a connection; whoever writes the batch takes one.

    A keyed command's key is locked and looked up by the batch's writer, with the other
    keys of the batch, in one round trip (`_look_up_keys`). Within this process a second
    command with a key that is still running is refused at once, as the key's lock refuses
    one from another process.
    """

    async def write(turn: Turn, batch: list[Queued]) -> None:
        async with uow:
            await _write_queued(uow, deps, store, turn, batch)

    entry = deps.turns.enqueue(command, meta, change, write)
    if meta.idempotency is None:
        queued: CommandResult = await deps.turns.run_queued(entry, meta.deadline)
        return queued
    lock_id = meta.idempotency.scope.lock_id
    if not deps.turns.claim_key(lock_id):
        raise Conflict(_KEY_IN_PROGRESS)
    try:
        result: CommandResult = await deps.turns.run_queued(entry, meta.deadline)
    finally:
        deps.turns.release_key(lock_id)
    return result


_KEY_IN_PROGRESS = "a request with this idempotency key is still in progress; retry it later"


async def _look_up_keys(
    uow: UnitOfWork, deps: Dependencies, batch: list[Queued]
) -> tuple[list[Queued], list[tuple[Queued, CommandResult]]]:
    """Lock and look up the keys of the batch's keyed commands: the commands left to decide, and the replays.

    What `stored_reply` does for one command, for all of them in one call: a key another
    process holds refuses its command (Conflict, retried by the bus), a key with a live
    reply of a different request refuses it as reused, and a key with the same request's
    reply answers with that reply; its command-log row joins the batch's write.
    """
    keyed = [entry for entry in batch if entry.meta.idempotency is not None]
    if not keyed:
        return batch, []
    found = await uow.idempotency.lock_and_get_many([entry.meta.idempotency.scope for entry in keyed])
    replays: list[tuple[Queued, CommandResult]] = []
    done: set[int] = set()
    now = deps.clock()
    for entry, (locked, stored) in zip(keyed, found, strict=True):
        claim = entry.meta.idempotency
        assert claim is not None
        if not locked:
            entry.settle(error=Conflict(_KEY_IN_PROGRESS))
        elif stored is None or stored.expires_at <= now:
            continue
        elif stored.fingerprint != claim.fingerprint:
            entry.settle(error=key_reused())
        else:
            replays.append((entry, await _replay(uow, entry.command, stored, now, entry.meta)))
        done.add(id(entry))
    return [entry for entry in batch if id(entry) not in done], replays


async def _commit_replays(uow: UnitOfWork, replays: list[tuple[Queued, CommandResult]]) -> None:
    """Commit what is pending (the replays' log rows, the release of the keys) and answer the replays."""
    try:
        await uow.commit()
    except DomainError as failure:
        for entry, _result in replays:
            entry.settle(error=failure)
        return
    for entry, result in replays:
        entry.settle(result)


async def _write_queued(
    uow: UnitOfWork,
    deps: Dependencies,
    store: Callable[[UnitOfWork], AggregateStore[A]],
    turn: Turn,
    queued: list[Queued],
) -> None:
    """Decide each queued command in order on one aggregate and write all that the rules accept at once.

    A command the rules refuse is undone (the next one sees the state before it) and gets
    its error. The write is guarded by the version the batch started from; when it loses
    that guard, nothing was written and every command in it retries. A refusal decided on
    a state nobody has confirmed (the held state, or one after commands of this batch) is
    final only once the write confirms it; a refusal of a state just read is final at once,
    as it was without batching. When the write of several commands fails on something one
    of them did (a unique index), each retries in a write of its own.
    """
    batch, replays = await _look_up_keys(uow, deps, queued)
    if not batch:
        await _commit_replays(uow, replays)
        return
    first = batch[0].command
    repository = store(uow)
    held, turn.state = turn.state, None
    aggregate: A | None
    if held is None:
        aggregate = await repository.get(first.aggregate_uuid)
    else:
        aggregate = cast(A, held)  # the turn of an aggregate holds only that aggregate
        repository.adopt(aggregate)
    if aggregate is None:
        for entry in batch:
            entry.settle(error=NotFound(f"{first.aggregate_type} {first.aggregate_id} not found"))
        await _commit_replays(uow, replays)
        return
    aggregate, accepted, refused = await _decide(batch, aggregate, confirmed=held is None)
    if not accepted:
        for entry, refusal in refused:
            _settle_unconfirmed(entry, refusal)
        await _commit_replays(uow, replays)
        return
    await _write_accepted(uow, deps, repository, turn, aggregate, accepted=accepted, refused=refused, replays=replays)


async def _write_accepted(
    uow: UnitOfWork,
    deps: Dependencies,
    repository: AggregateStore[A],
    turn: Turn,
    aggregate: A,
    *,
    accepted: list[tuple[Queued, tuple[NewEvent, ...], int]],
    refused: list[tuple[Queued, Exception]],
    replays: list[tuple[Queued, CommandResult]],
) -> None:
    """Save the aggregate with every accepted command's rows in one write; settle every command of the batch."""
    # Policies read before any write is queued (as in change_aggregate), one command at a time.
    published = [
        integration_events(await handle_domain_events(uow, events, deps.clock(), deps.policies))
        for _entry, events, _version in accepted
    ]
    await repository.save(aggregate)
    results: list[CommandResult] = []
    for (entry, events, version), public in zip(accepted, published, strict=True):
        # Each command's rows carry its own trace context, correlation and causation.
        token = otel_context.attach(entry.trace_context)
        try:
            results.append(
                await _record(uow, entry.command, aggregate, (events, public), version, deps=deps, meta=entry.meta)
            )
        finally:
            otel_context.detach(token)
    try:
        await uow.commit()
    except DomainError as failure:
        _settle_failed_write(deps.turns, [entry for entry, _, _ in accepted], refused, failure)
        for entry, _result in replays:
            # Its log row was not written either: the retry finds the stored reply again.
            entry.settle(error=Conflict("the write this replay's log row was part of failed; retry it"))
        return
    aggregate.pending_events.clear()
    turn.state = _snapshot(aggregate)
    for (entry, _events, _version), result in zip(accepted, results, strict=True):
        entry.settle(result)
    for entry, replay in replays:
        entry.settle(replay)
    for entry, refusal in refused:
        entry.settle(error=refusal)  # the write confirmed the state it was refused on


async def _decide(
    batch: list[Queued], aggregate: A, *, confirmed: bool
) -> tuple[A, list[tuple[Queued, tuple[NewEvent, ...], int]], list[tuple[Queued, Exception]]]:
    """Apply each command in turn; undo and set aside each one refused. `confirmed`: `aggregate` was just read."""
    accepted: list[tuple[Queued, tuple[NewEvent, ...], int]] = []
    refused: list[tuple[Queued, Exception]] = []
    for entry in batch:
        before = _snapshot(aggregate)
        start = len(aggregate.pending_events)
        try:
            aggregate.require_version(entry.command.expected_version)
            await entry.change(aggregate)
        except Exception as exc:
            aggregate = before
            if confirmed and not accepted:
                entry.settle(error=exc)  # refused on the state just read: final
            else:
                refused.append((entry, exc))
            continue
        accepted.append((entry, tuple(aggregate.pending_events[start:]), aggregate.version))
    return aggregate, accepted, refused


def _snapshot(aggregate: A) -> A:
    """A copy to go back to: the batched aggregates' fields are values, replaced and never changed in place.

    A deep copy (of the recorded events' protobuf messages too) cost about 0.2 ms per command.
    """
    copied = copy.copy(aggregate)
    copied.pending_events = list(aggregate.pending_events)
    return copied


def _settle_failed_write(
    turns: AggregateTurns, accepted: list[Queued], refused: list[tuple[Queued, Exception]], failure: DomainError
) -> None:
    """Nothing was written: a lost guard retries everyone; a failure one of several caused retries each alone."""
    alone = not isinstance(failure, Conflict) and len(accepted) > 1
    for entry in accepted:
        if alone:
            turns.retry_alone(entry.meta.command_id)
            entry.settle(error=Conflict(f"{entry.command.aggregate_type} {entry.command.aggregate_id}: retried alone"))
        else:
            entry.settle(error=failure)
    for entry, refusal in refused:
        _settle_unconfirmed(entry, refusal)


def _settle_unconfirmed(entry: Queued, exc: Exception) -> None:
    """A refusal on a state no write confirmed: a rule's refusal is checked again on a fresh read."""
    if isinstance(exc, FailedPrecondition | NotFound):
        entry.settle(error=Conflict(f"{entry.command.aggregate_type} {entry.command.aggregate_id} is read again"))
    else:
        entry.settle(error=exc)


async def _record(
    uow: UnitOfWork,
    command: Command,
    aggregate: Aggregate,
    recorded: tuple[tuple[NewEvent, ...], list[NewEvent]],
    version: int,
    *,
    deps: Dependencies,
    meta: CommandMeta,
) -> CommandResult:
    """Add one command's integration events, command-log row and stored reply to the write; its reply.

    `recorded`: the events the command's aggregate recorded, and the integration events
    among them and those its policies recorded (what goes to the outbox).
    """
    events, published = recorded
    claim = meta.idempotency
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
    result = CommandResult(aggregate_id=aggregate.id, version=version, events=events)
    if claim is not None:
        result = replace(result, reply=claim.encode_reply(result))
        await uow.idempotency.put(
            StoredReply(
                scope=claim.scope,
                fingerprint=claim.fingerprint,
                command_id=meta.command_id,
                aggregate_id=str(aggregate.id),
                aggregate_version=version,
                reply=result.reply,
                created_at=completed_at,
                expires_at=completed_at + claim.retention,
            )
        )
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
        raise Conflict(_KEY_IN_PROGRESS)
    completed_at = deps.clock()
    if stored is None or stored.expires_at <= completed_at:
        return None
    if stored.fingerprint != claim.fingerprint:
        raise key_reused()
    result = await _replay(uow, command, stored, completed_at, meta)
    await uow.commit()
    return result


async def _replay(
    uow: UnitOfWork, command: Command, stored: StoredReply, completed_at: datetime, meta: CommandMeta
) -> CommandResult:
    """Add the command-log row of a command answered with its stored reply; that reply."""
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
            idempotency_key=stored.scope.key,
            replay_of=stored.command_id,
        )
    )
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
    if published is None:
        published = await publishable_events(uow, aggregate, deps)
    result = await _record(uow, command, aggregate, (events, published), aggregate.version, deps=deps, meta=meta)
    await uow.commit()
    aggregate.pending_events.clear()
    return result
