"""Keep a started stack up: restart services that crash, report those that keep crashing.

`make up` runs `Supervision.run` in its main thread once the stack is up. A service that exits
without being asked to is logged and started again (same port, same environment) after a
capped exponential backoff; one that crashes `max_crashes` times in a row is reported FAILED
and left down while the others keep running. A process stopped on purpose (`ServiceProcess.kill`,
as the chaos tests do) is not a crash and is left alone. The embedded Postgres and Redis the
stack started, if any, are restarted the same way (on the same port and data directory); their
start waits until they answer, so the loop pauses meanwhile. Every change prints a status line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from devstack.restart_policy import RestartPolicy, RestartTracker, ServiceState
from devstack.servers import EmbeddedServer, ServerError
from devstack.supervisor import ServiceError, ServiceProcess, Stack, describe_exit

LOG_LINES_ON_FAILURE = 15
Supervised = ServiceProcess | EmbeddedServer


class Supervision:
    """Watches a started Stack's services and restarts the ones that exit unexpectedly."""

    def __init__(
        self, stack: Stack, policy: RestartPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Supervise `stack` (already started) under `policy`."""
        self.stack = stack
        self.policy = policy or RestartPolicy()
        self._clock = clock
        self._trackers: dict[str, RestartTracker] = {}
        self._server_started_at: dict[str, float] = {}

    def run(self, cancel: threading.Event, interval: float = 0.1) -> None:
        """Supervise until `cancel` is set (a signal handler sets it); never raises for a crash."""
        while not cancel.wait(interval):
            self.tick()

    def tick(self) -> bool:
        """One round: notice crashes, start services whose backoff is over; return whether anything changed."""
        now = self._clock()
        changed = False
        for server in self._servers():
            tracker = self.tracker(server)
            if tracker.state is ServiceState.RUNNING and not server.running:
                uptime = now - self._server_started_at.setdefault(server.name, now)
                what = f"embedded {server.name} exited with {describe_exit(server.returncode)} after {uptime:.1f}s"
                self._decide(server, tracker, now, uptime, what)
                changed = True
            elif tracker.due(now):
                self._restart_server(server, tracker)
                changed = True
            elif server.name not in self._server_started_at:
                self._server_started_at[server.name] = now  # first seen running
        for process in self.stack.processes:
            tracker = self.tracker(process)
            if tracker.state is ServiceState.RUNNING and process.failed:
                self._crashed(process, tracker, now)
                changed = True
            elif tracker.due(now):
                self._restart(process, tracker, now)
                changed = True
        if changed:
            self.stack.say(f"status: {self.status()}")
        return changed

    def tracker(self, process: Supervised) -> RestartTracker:
        """The restart state of `process` (names are unique within a stack)."""
        return self._trackers.setdefault(process.name, RestartTracker(self.policy))

    def failed(self) -> list[str]:
        """Names of the services given up on."""
        return [p.name for p in self._everything() if self.tracker(p).state is ServiceState.FAILED]

    def status(self) -> str:
        """One line: every service with its state, and how often it was restarted."""
        parts: list[str] = []
        for process in self._everything():
            tracker = self.tracker(process)
            state = tracker.state.value
            if tracker.state is ServiceState.RUNNING and not process.running:
                state = "stopped"  # stopped on purpose, from outside the supervision
            if tracker.restarts:
                state += f" ({tracker.restarts} restart{'s' if tracker.restarts > 1 else ''})"
            parts.append(f"{process.name} {state}")
        return ", ".join(parts)

    # -- internals

    def _everything(self) -> list[Supervised]:
        return [*self._servers(), *self.stack.processes]

    def _servers(self) -> list[EmbeddedServer]:
        """The embedded servers this stack started (none when it was given URLs)."""
        return [server for server in (self.stack.postgres, self.stack.redis) if server is not None]

    def _restart_server(self, server: EmbeddedServer, tracker: RestartTracker) -> None:
        self.stack.say(f"starting embedded {server.name} again")
        try:
            server.start()
        except ServerError as exc:
            now = self._clock()
            self._decide(server, tracker, now, 0.0, f"embedded {server.name} could not be started ({exc})")
            return
        tracker.restarted()
        self._server_started_at[server.name] = self._clock()
        self.stack.say(f"{server.name} restarted (pid {server.pid}) on {server.host}:{server.port}")

    def _crashed(self, process: ServiceProcess, tracker: RestartTracker, now: float) -> None:
        uptime = now - process.started_at if process.started_at is not None else 0.0
        what = f"{process.name} (pid {process.pid}) exited with {describe_exit(process.returncode)} after {uptime:.1f}s"
        process.reap()
        self._decide(process, tracker, now, uptime, what)

    def _restart(self, process: ServiceProcess, tracker: RestartTracker, now: float) -> None:
        try:
            process.start()
        except (OSError, ServiceError) as exc:
            self._decide(process, tracker, now, 0.0, f"{process.name} could not be started ({exc})")
            return
        tracker.restarted()
        self.stack.say(f"{process.name} restarted (pid {process.pid})")

    def _decide(self, process: Supervised, tracker: RestartTracker, now: float, uptime: float, what: str) -> None:
        """Count the crash, then schedule the restart or give up, and say which."""
        delay = tracker.crashed(now, uptime)
        if delay is None:
            self.stack.say(
                f"{what}: FAILED, {tracker.crashes} crashes in a row (each within {self.policy.stable_after_s:g}s "
                f"of its start); left down, the rest keeps running. Its log {process.log_path} ends:\n"
                f"{process.log_tail(LOG_LINES_ON_FAILURE)}"
            )
        else:
            self.stack.say(
                f"{what}; restarting in {delay:.2f}s (crash {tracker.crashes} in a row; "
                f"FAILED at {self.policy.max_crashes})"
            )
