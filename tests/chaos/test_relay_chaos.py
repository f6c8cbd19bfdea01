"""Relay faults under load: no load at all (the baseline), kill -9 of the active relay, SIGSTOP of it."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from devstack.chaos import ChaosStack, active_relay, lock_holder_port
from tests.chaos.faults import backlog_published, sleep_unless, wait_for_holder
from tests.chaos.report import ChaosReport
from tests.chaos.scenario import Scenario, run_scenario
from tests.chaos.workload import Workload

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

PAUSES_S = (5.0, 12.0)
# The schedule, not the count, bounds the pause scenario: the workload stops after it.
PAUSE_COMMAND_CAP = 50_000
# The kill scenario runs at least 10,000 commands and at least KILLS_WANTED kills, whichever
# takes longer: a faster write path must not shorten the run below enough kills to mean anything.
KILL_COMMANDS = 10_000
KILLS_WANTED = 6
KILL_COMMAND_CAP = 50_000


async def no_fault(stack: ChaosStack, workload: Workload, done: asyncio.Event) -> dict[str, Any]:
    """The baseline: nothing is broken."""
    await done.wait()
    return {"faults": 0}


async def kill_active_relay(stack: ChaosStack, workload: Workload, done: asyncio.Event) -> dict[str, Any]:
    """Every 2 s (±0.5 s) SIGKILL whichever relay holds the lock, restart it as a standby, time the takeover."""
    rng = random.Random()
    takeovers: list[float] = []
    restarts: list[asyncio.Task[Any]] = []
    kills = 0
    missed_ticks = 0
    while not await sleep_unless(done, rng.uniform(1.5, 2.5)):
        old_port = await lock_holder_port(stack.database_url)
        relay = await active_relay(stack)
        if relay is None or old_port is None:
            missed_ticks += 1  # a takeover is under way right now; try again at the next tick
            continue
        await asyncio.to_thread(relay.kill)
        kills += 1
        # A supervisor would restart it at once; it comes back as a standby (or wins the race).
        # Restarted beside the takeover, so that a slow start on a busy machine does not
        # stretch the interval between kills.
        restarts.append(asyncio.create_task(asyncio.to_thread(relay.start)))
        new_port, seconds = await wait_for_holder(stack, old_port, 15.0)
        if new_port is None:
            raise AssertionError(f"no relay took the lock within 15 s of kill #{kills}")
        takeovers.append(seconds)
        if kills >= KILLS_WANTED and workload.progress >= KILL_COMMANDS:
            workload.stop()
    await asyncio.gather(*restarts)
    return {
        "faults": kills,
        "relay_kills": kills,
        "ticks_without_active_relay": missed_ticks,
        "max_takeover_s": round(max(takeovers), 3) if takeovers else None,
        "median_takeover_s": round(statistics.median(takeovers), 3) if takeovers else None,
    }


async def pause_active_relay(stack: ChaosStack, workload: Workload, done: asyncio.Event) -> dict[str, Any]:
    """SIGSTOP the active relay for 5 s, then (4 s later) for 12 s, watching who holds the lock meanwhile.

    5 s is shorter than the lock session's idle timeout (RELAY_LOCK_IDLE_TIMEOUT_S, 10 s):
    the frozen relay keeps the lock and the stream waits. 12 s is longer: Postgres ends
    the frozen session and a standby takes over while the first relay is still stopped.
    """
    pauses: list[dict[str, Any]] = []
    await workload.wait_progress(1_000 / PAUSE_COMMAND_CAP, timeout_s=300)
    for seconds in PAUSES_S:
        port = await lock_holder_port(stack.database_url)
        relay = await active_relay(stack)
        if relay is None or port is None:
            raise AssertionError("no active relay to pause")
        takeover_after: float | None = None
        relay.pause()
        stopped_at = time.monotonic()
        try:
            while (elapsed := time.monotonic() - stopped_at) < seconds:
                holder = await lock_holder_port(stack.database_url)
                if takeover_after is None and holder not in (port, None):
                    takeover_after = elapsed
                await asyncio.sleep(0.1)
        finally:
            relay.resume()
        backlog_s = await backlog_published(stack.database_url, 30.0)
        after = await lock_holder_port(stack.database_url)
        pauses.append(
            {
                "relay": relay.name,
                "stopped_s": seconds,
                "standby_took_over_after_s": round(takeover_after, 2) if takeover_after is not None else None,
                "stopped_relay_holds_lock_after": after == port,
                "backlog_published_after_resume_s": round(backlog_s, 3) if backlog_s is not None else None,
            }
        )
        await sleep_unless(done, 4.0)
    workload.stop()
    return {
        "faults": len(pauses),
        "pauses": pauses,
        "max_backlog_published_s": max((p["backlog_published_after_resume_s"] or 0) for p in pauses),
    }


async def test_baseline_without_faults(chaos_report: ChaosReport, chaos_logs: Path) -> None:
    """The same workload with nothing broken: the figures the other scenarios compare with."""
    record = await run_scenario(
        Scenario("0-baseline", "no faults (reference figures)", no_fault, commands=2000), chaos_report, chaos_logs
    )
    assert record.passed, record.failures


async def test_kill_active_relay_every_two_seconds(chaos_report: ChaosReport, chaos_logs: Path) -> None:
    """kill -9 of the active relay every 2 s: nothing lost, duplicates only, order kept."""
    scenario = Scenario(
        "1-relay-kill",
        "kill -9 the active relay every 2 s (±0.5 s), 3 relays, killed ones restarted",
        kill_active_relay,
        commands=KILL_COMMAND_CAP,
        relays=3,
        notes=[f"at least {KILL_COMMANDS:,} commands and {KILLS_WANTED} kills, whichever takes longer"],
    )
    record = await run_scenario(scenario, chaos_report, chaos_logs)
    assert record.figures.get("commands", 0) >= KILL_COMMANDS
    assert record.figures.get("relay_kills", 0) >= 5, "too few kills to mean anything"
    assert record.passed, record.failures


async def test_pause_active_relay(chaos_report: ChaosReport, chaos_logs: Path) -> None:
    """SIGSTOP the active relay: within the idle timeout it keeps the lock; beyond it a standby takes over."""
    scenario = Scenario(
        "2-relay-sigstop",
        "SIGSTOP the active relay for 5 s, then for 12 s (lock session idle timeout 10 s)",
        pause_active_relay,
        commands=PAUSE_COMMAND_CAP,
        relays=2,
    )
    record = await run_scenario(scenario, chaos_report, chaos_logs)
    short, long = record.figures["pauses"]
    assert short["standby_took_over_after_s"] is None, "a standby took the lock from a relay stopped for 5 s"
    assert short["stopped_relay_holds_lock_after"]
    assert long["standby_took_over_after_s"] is not None, "nobody took over from a relay stopped for 12 s"
    assert not long["stopped_relay_holds_lock_after"]
    assert record.passed, record.failures
