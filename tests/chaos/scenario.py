"""One chaos scenario from start to verdict: stack, subscriber, workload and fault, then the checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack.chaos import (
    ChaosStack,
    PositionRecorder,
    chaos_stack,
    converge_views,
    new_log_dir,
    served_absent,
    wait_caught_up,
    wait_drained,
)
from tests.chaos.checks import invariant_failures, write_side_figures
from tests.chaos.report import ChaosReport, ScenarioRecord
from tests.chaos.workload import Workload

# A fault runs beside the workload and returns its own figures; `done` is set when the
# workload has finished, and the fault must then heal whatever it broke and return. A
# figure named "skip" says why the scenario could not run (the record is then skipped).
Fault = Callable[[ChaosStack, Workload, asyncio.Event], Coroutine[Any, Any, dict[str, Any]]]

DRAIN_TIMEOUT_S = 90.0
CONVERGE_TIMEOUT_S = 90.0


@dataclass
class Scenario:
    """What to run: the stack's shape, the workload's size and the fault."""

    name: str
    title: str
    fault: Fault
    commands: int
    clients: int = 8
    idempotency: bool = False
    relays: int = 2
    readers: int = 2
    redis_args: tuple[str, ...] = ()
    proxied: bool = False
    # "sync" / "async": a primary and a streaming standby (see ChaosStack.replication).
    replication: str | None = None
    # True when the fault may take back acknowledged commands (a failover onto an asynchronous
    # standby): they are reported, and every replica must then not serve what was lost.
    may_lose_acks: bool = False
    env: dict[str, str] = field(default_factory=dict)
    # Run on the stack after every check, for figures that need commands of their own (which
    # the checks would otherwise count as phantom effects).
    after_checks: Callable[[ChaosStack], Coroutine[Any, Any, dict[str, Any]]] | None = None
    # False when the fault itself can make the recording subscriber miss messages (Redis restarts).
    subscriber_complete: bool = True
    notes: list[str] = field(default_factory=list)


async def run_scenario(scenario: Scenario, report: ChaosReport, logs: Path) -> ScenarioRecord:
    """Run the scenario, record its figures in `report`, and return the record (failures included)."""
    record = ScenarioRecord(scenario.name, scenario.title, notes=list(scenario.notes))
    started = time.monotonic()
    log_dir = new_log_dir(logs, scenario.name)
    figures: dict[str, Any] = {}
    try:
        async with chaos_stack(
            log_dir,
            relays=scenario.relays,
            readers=scenario.readers,
            redis_args=scenario.redis_args,
            proxied=scenario.proxied,
            replication=scenario.replication,
            env=scenario.env,
        ) as stack:
            recorder = PositionRecorder(stack.redis_url).start()
            try:
                workload = Workload(
                    stack.services.write_address,
                    total=scenario.commands,
                    clients=scenario.clients,
                    idempotency=scenario.idempotency,
                )
                done = asyncio.Event()
                fault_task = asyncio.create_task(scenario.fault(stack, workload, done))
                work_task = asyncio.create_task(workload.run())
                try:
                    await asyncio.wait({work_task, fault_task}, return_when=asyncio.FIRST_COMPLETED)
                    if fault_task.done() and fault_task.exception() is not None:
                        workload.stop()  # the fault broke down: end the run quickly and report it
                    await work_task
                except BaseException:
                    for task in (work_task, fault_task):
                        task.cancel()
                    await asyncio.gather(work_task, fault_task, return_exceptions=True)
                    raise
                finally:
                    done.set()
                fault_figures = await fault_task
                figures.update(workload.figures())
                figures.update(fault_figures)

                rows, drain_s = await wait_drained(stack.database_url, DRAIN_TIMEOUT_S)
                figures["drain_s"] = round(drain_s, 2)
                await _wait_for_subscriber(recorder, rows, scenario.subscriber_complete)
            finally:
                recorder.stop()
            figures.update(recorder.figures(rows, complete=scenario.subscriber_complete))

            # From the last reply to views at the head with every replica SERVING (the fault's
            # own convergence figure, when it measured one, is timed from its end instead).
            caught_up = await wait_caught_up(stack, rows, CONVERGE_TIMEOUT_S)
            after_load = None if caught_up is None else round(drain_s + caught_up, 2)
            figures["views_caught_up_after_load_s"] = after_load
            figures.setdefault("converge_s", after_load)
            diverged, converged_after, users = await converge_views(stack, CONVERGE_TIMEOUT_S)
            figures["views_checked"] = users * len(diverged)
            figures["diverged_per_replica"] = diverged
            figures["diverged_views"] = sum(diverged.values())
            figures["getuser_sweep_s"] = round(converged_after, 2) if converged_after is not None else None
            converged_at = time.monotonic() if converged_after is not None else None
            figures.update(await write_side_figures(stack.database_url, workload, may_lose_acks=scenario.may_lose_acks))
            lost_users = figures.pop("lost_user_ids", [])
            if scenario.may_lose_acks:
                absent = await served_absent(stack, lost_users)
                figures["served_absent_per_replica"] = absent
                figures["served_absent_users"] = sum(absent.values())
            _failover_figures(figures, workload, recorder, converged_at)
            if scenario.after_checks is not None:
                figures.update(await scenario.after_checks(stack))
            exits = stack.unexpected_exits()
            figures["unexpected_exits"] = len(exits)
            if exits:
                record.notes.extend(exits)
            record.notes.append(f"service logs: {log_dir}")
    finally:
        record.duration_s = time.monotonic() - started
        _summarise(figures)
        record.figures = figures
        record.skipped = str(figures.pop("skip", ""))
        if record.skipped:
            record.failures = []
        elif figures.get("events") is None:
            record.failures = ["scenario did not finish"]
        else:
            record.failures = invariant_failures(figures)
        report.add(record)
        _print(record, report.echo)
    return record


async def _wait_for_subscriber(recorder: PositionRecorder, head: int, complete: bool) -> None:
    """Give the last publishes a bounded moment to reach the subscriber."""
    deadline = time.monotonic() + (10.0 if complete else 2.0)
    while recorder.highest() < head and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def _failover_figures(
    figures: dict[str, Any], workload: Workload, recorder: PositionRecorder, converged_at: float | None
) -> None:
    """Times from a promotion (the fault's `promoted_at_*` figures) to the first acknowledged
    command, the first publish and views that match Postgres on every replica."""
    promoted = figures.pop("promoted_at_monotonic", None)
    promoted_wall = figures.pop("promoted_at_wall", None)
    if promoted is None or promoted_wall is None:
        return
    first_ok = min(
        (c.answered_at for c in workload.commands if c.outcome == "ok" and c.answered_at > promoted), default=None
    )
    first_publish = min((d.received_at for d in recorder.deliveries if d.received_at > promoted_wall), default=None)
    figures["first_ack_after_promotion_s"] = None if first_ok is None else round(first_ok - promoted, 3)
    figures["first_publish_after_promotion_s"] = (
        None if first_publish is None else round(first_publish - promoted_wall, 3)
    )
    figures["views_match_after_promotion_s"] = None if converged_at is None else round(converged_at - promoted, 2)


def _summarise(figures: dict[str, Any]) -> None:
    """Derive the table's summary figures from the detailed ones."""
    if "events" not in figures:
        return
    lost = figures.get("unpositioned", 0) + figures.get("unpublished", 0) + figures.get("position_gaps", 0)
    if figures.get("subscriber_complete"):
        lost += figures.get("missing_at_subscriber", 0)
    figures["lost_events"] = lost
    figures["out_of_order"] = figures.get("per_aggregate_order_violations", 0) + figures.get(
        "first_delivery_inversions", 0
    )


def _print(record: ScenarioRecord, echo: Callable[[str], None]) -> None:
    """Show the scenario's figures as it finishes."""
    echo(f"== {record.name}: {record.title} ({record.duration_s:.0f}s, {record.result})")
    for key in sorted(record.figures):
        echo(f"   {key}: {record.figures[key]}")
    for note in record.notes:
        echo(f"   note: {note}")
    for failure in record.failures:
        echo(f"   FAILED: {failure}")
