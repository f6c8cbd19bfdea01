"""A primary Postgres and a streaming standby built from the binaries on the machine, for failover tests.

The standby is a `pg_basebackup` of the primary that streams its WAL over a physical
replication slot. Replication is asynchronous unless `synchronous=True`, in which case the
primary names the standby in `synchronous_standby_names` once it streams, so that a commit
returns only after the standby has flushed it. `fail_over()` does what a crash and a
promotion do: kill -9 of the primary, then `pg_promote()` on the standby.

Services reach whichever of the two accepts writes through a multi-host URL with
`target_session_attrs=read-write`, as they would with a managed, replicated Postgres.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from devstack.processes import Deadline
from devstack.servers import EmbeddedPostgres, ServerError

STANDBY_NAME = "standby1"
_SQL_TIMEOUT_S = 30.0
_OF_STANDBY = f"FROM pg_stat_replication WHERE application_name = '{STANDBY_NAME}'"


def run_sql(server: EmbeddedPostgres, statement: str, timeout_s: float = _SQL_TIMEOUT_S) -> str:
    """Run one statement through psql against `server` and return its unaligned output."""
    argv = [
        str(server.bin_dir / "psql"),
        "--no-psqlrc",
        "-X",
        "-A",
        "-t",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        server.url,
        "-c",
        statement,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise ServerError(f"psql on port {server.port} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


class StandbyPostgres(EmbeddedPostgres):
    """A hot standby of `primary`, created by pg_basebackup on first start, streaming over a slot."""

    name = "postgres-standby"

    def __init__(self, primary: EmbeddedPostgres, *, slot: str = STANDBY_NAME, startup_timeout: float = 60.0) -> None:
        """Configure the standby; nothing is copied until `start()`."""
        super().__init__(
            settings={"cluster_name": slot, "hot_standby": "on", "wal_receiver_status_interval": "1s"},
            startup_timeout=startup_timeout,
        )
        self.primary = primary
        self.slot = slot

    def _prepare(self) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            return
        # -R writes primary_conninfo (its application name is the cluster name) and standby.signal.
        argv = [
            str(self.bin_dir / "pg_basebackup"),
            "--pgdata",
            str(self.pgdata),
            "--dbname",
            f"host={self.primary.host} port={self.primary.port} user=postgres",
            "--wal-method",
            "stream",
            "--slot",
            self.slot,
            "--create-slot",
            "--write-recovery-conf",
            "--checkpoint",
            "fast",
            "--no-sync",
        ]
        self._run_tool("pg_basebackup", argv)


@dataclass(frozen=True, slots=True)
class Promotion:
    """What a failover took: the kill, the standby's start (when it was held back) and the promotion."""

    killed_at: float  # monotonic
    promoted_at: float  # monotonic: the standby accepts writes from here on
    standby_start_s: float
    promote_s: float


class ReplicatedPostgres:
    """A primary and one streaming standby; synchronous or asynchronous replication."""

    def __init__(self, *, synchronous: bool) -> None:
        """Configure both servers; nothing runs until `start()`."""
        self.synchronous = synchronous
        self.primary = EmbeddedPostgres(settings={"wal_level": "replica", "max_wal_senders": "5"})
        self.standby = StandbyPostgres(self.primary)
        self.promoted = False

    def start(self, timeout_s: float = 60.0) -> Self:
        """Start the primary, copy and start the standby, and wait until it streams."""
        try:
            self.primary.start()
            self.standby.start()
            self.wait_streaming(timeout_s)
            if self.synchronous:
                run_sql(self.primary, f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
                run_sql(self.primary, "SELECT pg_reload_conf()")
                self._wait_for(
                    lambda: (
                        run_sql(
                            self.primary,
                            "SELECT sync_state " + _OF_STANDBY,
                        )
                        == "sync"
                    ),
                    timeout_s,
                    "the standby never became synchronous",
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop both servers and remove their directories."""
        for server in (self.standby, self.primary):
            server.stop()

    def url_for(self, database: str) -> str:
        """A multi-host URL that connects to whichever server accepts writes."""
        hosts = ",".join(f"{server.host}:{server.port}" for server in (self.primary, self.standby))
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"

    @property
    def url(self) -> str:
        """The multi-host URL of the `postgres` database."""
        return self.url_for("postgres")

    @property
    def writable(self) -> EmbeddedPostgres:
        """The server that accepts writes now."""
        return self.standby if self.promoted else self.primary

    def wait_streaming(self, timeout_s: float = 60.0) -> None:
        """Wait until the primary reports the standby streaming."""
        self._wait_for(
            lambda: (
                run_sql(
                    self.primary,
                    "SELECT state " + _OF_STANDBY,
                )
                == "streaming"
            ),
            timeout_s,
            "the standby never started streaming",
        )

    def replay_lag_bytes(self) -> int:
        """How far the standby's replay is behind the primary's WAL, in bytes (0 when caught up)."""
        value = run_sql(
            self.primary,
            "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), -1)::bigint " + _OF_STANDBY,
        )
        return int(value) if value else -1

    def hold_back(self) -> None:
        """Stop the standby (its data stays), so that it falls behind the primary from now on."""
        if self.synchronous:
            raise ServerError("a synchronous standby cannot be held back: every commit would wait for it")
        self.standby.halt()

    def fail_over(self) -> Promotion:
        """kill -9 of the primary; start the standby if it was held back; promote it and wait until it writes."""
        self.primary.kill()
        killed_at = time.monotonic()
        standby_start_s = 0.0
        if not self.standby.running:
            started = time.monotonic()
            self.standby.start()
            standby_start_s = time.monotonic() - started
        begun = time.monotonic()
        run_sql(self.standby, "SELECT pg_promote(wait => true, wait_seconds => 60)", timeout_s=70.0)
        promoted_at = time.monotonic()
        self.promoted = True
        return Promotion(killed_at, promoted_at, round(standby_start_s, 3), round(promoted_at - begun, 3))

    @staticmethod
    def _wait_for(check: Callable[[], bool], timeout_s: float, failure: str) -> None:
        deadline = Deadline(timeout_s)
        while True:
            if check():
                return
            if deadline.expired():
                raise ServerError(failure)
            time.sleep(0.05)
