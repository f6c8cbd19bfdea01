"""Run the services as child processes: one at a time (`ServiceProcess`) or the whole stack (`Stack`).

The stack is Postgres, Redis, migrations, the write service, relays, read replicas, the payment
provider (a stand-in for an external one) and saga workers that call it. Restarting services
that crash is `devstack.supervision`'s job.

Every child runs in a session of its own, so a Ctrl-C in the terminal reaches only the supervisor,
which then stops the children in order: SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TextIO

from devstack.processes import Deadline, StartStop, signal_group
from devstack.servers import (
    LOCALHOST,
    EmbeddedPostgres,
    EmbeddedRedis,
    find_free_port,
    log_tail,
    port_is_free,
)
from shared_kernel.platform.healthcheck import check_serving
from shared_kernel.platform.security.tokens import TokenSigner
from shared_kernel.platform.settings import MIN_SIGNING_KEY_BYTES

REPO_ROOT = Path(__file__).resolve().parent.parent

# Every scope the services know today: the development token may do anything.
ALL_SCOPES = ("users:read", "users:write", "catalog:read", "catalog:write", "orders:read", "orders:write", "admin")
SIGNING_KEY_FILE = "auth-signing-key"

_ECHO_LOCK = threading.Lock()


class ServiceError(RuntimeError):
    """A service process failed to start, to become healthy or to finish its work."""


class ProcessExited(ServiceError):
    """A service process exited while it was expected to run."""

    def __init__(self, process: ServiceProcess) -> None:
        """Describe the exit of `process`, with the end of its log."""
        self.process = process
        self.returncode = process.returncode
        super().__init__(
            f"{process.name} (pid {process.pid}) exited with {describe_exit(process.returncode)}; "
            f"log {process.log_path}:\n{process.log_tail()}"
        )


class Cancelled(ServiceError):
    """A wait was abandoned because a stop was requested."""


def describe_exit(code: int | None) -> str:
    """Human form of a Popen return code ('code 1', 'signal SIGKILL')."""
    if code is None:
        return "no exit yet"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def _connect_host(host: str) -> str:
    """Address to dial for a server bound to `host` (a wildcard bind is dialled on loopback)."""
    wildcards = ("0.0.0.0", "::", "[::]", "")  # noqa: S104 (compared, not bound)
    return LOCALHOST if host in wildcards else host


_LIVE: weakref.WeakSet[ServiceProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort at interpreter exit: kill children a caller forgot to stop."""
    for process in list(_LIVE):
        with contextlib.suppress(Exception):
            process.kill()


class ServiceProcess:
    """One child process with its output in a log file (and optionally echoed with a prefix)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        grpc_port: int | None = None,
        host: str = LOCALHOST,
        log_path: Path | None = None,
        echo: TextIO | None = None,
        prefix_width: int = 0,
        cwd: Path | None = None,
        inherit_env: bool = True,
    ) -> None:
        """Describe the process; `grpc_port` 0 picks a free port, passed as GRPC_PORT/GRPC_HOST."""
        self.name = name
        self.argv = list(argv)
        self.host = host
        self.port = (grpc_port or find_free_port(_connect_host(host))) if grpc_port is not None else None
        self.cwd = cwd or REPO_ROOT
        self.echo = echo
        self.prefix = f"{name:<{prefix_width}} | "
        if log_path is None:
            handle, raw_path = tempfile.mkstemp(prefix=f"tessera-{name}-", suffix=".log")
            os.close(handle)
            log_path = Path(raw_path)
        self.log_path = log_path
        self.env = dict(os.environ) if inherit_env else {}
        self.env.update(env or {})
        self.env["PYTHONUNBUFFERED"] = "1"
        if self.port is not None:
            self.env["GRPC_PORT"] = str(self.port)
            self.env["GRPC_HOST"] = host
        self._process: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None
        self._expected_exit = False
        self._finished = True  # the last child, if any, is reaped and its process group cleared
        self.started_at: float | None = None  # monotonic time of the last start

    @classmethod
    def python_module(
        cls,
        name: str,
        module: str,
        *,
        args: Sequence[str] = (),
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        grpc_port: int | None = None,
        host: str = LOCALHOST,
        log_path: Path | None = None,
        echo: TextIO | None = None,
        prefix_width: int = 0,
        cwd: Path | None = None,
    ) -> ServiceProcess:
        """A process running `python -m module [args]`."""
        return cls(
            name,
            [python or sys.executable, "-m", module, *args],
            env=env,
            grpc_port=grpc_port,
            host=host,
            log_path=log_path,
            echo=echo,
            prefix_width=prefix_width,
            cwd=cwd,
        )

    # -- state

    @property
    def address(self) -> str:
        """host:port that gRPC clients dial."""
        if self.port is None:
            raise ServiceError(f"{self.name} has no gRPC port")
        return f"{_connect_host(self.host)}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Pid of the current (or last) child."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last child (negative: killed by that signal), None while it runs."""
        return self._process.poll() if self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the child is alive (paused counts as alive)."""
        return self._process is not None and self._process.poll() is None

    @property
    def failed(self) -> bool:
        """Whether the child exited without being asked to."""
        return not self._expected_exit and self._process is not None and self._process.poll() is not None

    def log_tail(self, lines: int = 40) -> str:
        """The end of the log file."""
        return log_tail(self.log_path, lines)

    # -- lifecycle

    def start(self) -> Self:
        """Spawn the child (without waiting for it to be healthy)."""
        if self.running:
            raise ServiceError(f"{self.name} is already running (pid {self.pid})")
        self._join_pump()
        self._expected_exit = False
        self._finished = False
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"--- {stamp} {self.name}: {' '.join(self.argv)}\n".encode())
        log.flush()
        try:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log if self.echo is None else subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        self.started_at = time.monotonic()
        if self.echo is None:
            log.close()
        else:
            assert self._process.stdout is not None
            self._pump = threading.Thread(
                target=self._copy_output, args=(self._process.stdout, log), name=f"pump-{self.name}", daemon=True
            )
            self._pump.start()
        _LIVE.add(self)
        return self

    def wait_healthy(self, timeout: float = 30.0, cancel: threading.Event | None = None) -> None:
        """Wait until the gRPC health check says SERVING (or, without a port, that the child still runs)."""
        deadline = Deadline(timeout)
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"stopped waiting for {self.name}")
            if not self.running:
                raise ProcessExited(self)
            if self.port is None or check_serving(self.address, timeout=min(1.0, max(deadline.remaining(), 0.1))):
                return
            if deadline.expired():
                raise ServiceError(
                    f"{self.name} did not report SERVING on {self.address} within {timeout:g}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(min(0.1, deadline.remaining()))

    async def wait_healthy_async(self, within: float = 30.0) -> None:
        """Asyncio form of `wait_healthy` (runs it in a worker thread)."""
        await asyncio.to_thread(self.wait_healthy, within)

    def wait(self, timeout: float, cancel: threading.Event | None = None) -> int:
        """Wait for the child to exit by itself and return its exit status; kill it after `timeout`."""
        process = self._require_started()
        deadline = Deadline(timeout)
        while process.poll() is None:
            if cancel is not None and cancel.is_set():
                self.kill()
                raise Cancelled(f"stopped waiting for {self.name}")
            if deadline.expired():
                self.kill()
                raise ServiceError(
                    f"{self.name} did not finish within {timeout:g}s; log {self.log_path}:\n{self.log_tail()}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=min(0.1, deadline.remaining()))
        self._expected_exit = True
        self._finish(process)
        return process.returncode

    def terminate(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL; return the exit status (None if never started)."""
        self.begin_terminate()
        return self.finish_terminate(grace)

    def begin_terminate(self) -> None:
        """Send SIGTERM without waiting (see `finish_terminate`)."""
        process = self._process
        if process is None or self._finished:
            return
        self._expected_exit = True
        if process.poll() is None:
            signal_group(process.pid, signal.SIGCONT)  # a paused child could not act on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)

    def finish_terminate(self, grace: float) -> int | None:
        """Wait up to `grace` seconds for a terminated child, then SIGKILL it and whatever it left."""
        process = self._process
        if process is None or self._finished:
            return self.returncode
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            signal_group(process.pid, signal.SIGKILL)
            process.wait(timeout=10.0)
        self._finish(process)
        return process.returncode

    def kill(self) -> int | None:
        """SIGKILL the child and its process group at once, like a crash; return the exit status."""
        process = self._process
        if process is None or self._finished:
            return self.returncode
        self._expected_exit = True
        signal_group(process.pid, signal.SIGKILL)
        process.wait(timeout=10.0)
        self._finish(process)
        return process.returncode

    def reap(self) -> None:
        """After an exit nobody asked for: clear what the child left in its process group (it stays `failed`)."""
        process = self._process
        if process is not None and process.poll() is not None:
            self._finish(process)

    def pause(self) -> None:
        """Freeze the child (SIGSTOP to its process group)."""
        signal_group(self._require_running().pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused child (SIGCONT)."""
        signal_group(self._require_running().pid, signal.SIGCONT)

    def restart(self, timeout: float = 30.0, grace: float = 10.0) -> None:
        """Terminate the child, start a new one with the same port and environment, wait until healthy."""
        self.terminate(grace)
        self.start()
        self.wait_healthy(timeout)

    def __enter__(self) -> Self:
        """Start the child and wait until it is healthy."""
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Terminate the child."""
        self.terminate()

    def __repr__(self) -> str:
        """Name, pid and state."""
        where = f" {self.address}" if self.port is not None else ""
        state = "running" if self.running else f"exited ({describe_exit(self.returncode)})"
        return f"<ServiceProcess {self.name}{where} pid={self.pid} {state}>"

    # -- internals

    def _require_started(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise ServiceError(f"{self.name} was never started")
        return self._process

    def _require_running(self) -> subprocess.Popen[bytes]:
        process = self._require_started()
        if process.poll() is not None or self._finished:
            raise ServiceError(f"{self.name} is not running")
        return process

    def _finish(self, process: subprocess.Popen[bytes]) -> None:
        """After the child exited: kill what it left in its session, once, and release the output pump."""
        if not self._finished:
            # Right after the exit and only once: later the id could name an unrelated process group.
            signal_group(process.pid, signal.SIGKILL)
            self._finished = True
        self._join_pump()
        _LIVE.discard(self)

    def _copy_output(self, pipe: IO[bytes], log: IO[bytes]) -> None:
        """Copy the child's output to the log file and, prefixed line by line, to the echo stream."""
        with pipe, log:
            for line in iter(pipe.readline, b""):
                log.write(line)
                log.flush()
                if self.echo is not None:
                    text = line.decode("utf-8", errors="replace").rstrip("\n")
                    with _ECHO_LOCK:
                        self.echo.write(f"{self.prefix}{text}\n")
                        self.echo.flush()

    def _join_pump(self) -> None:
        if self._pump is not None:
            self._pump.join(timeout=5.0)
            self._pump = None


def load_or_create_signing_key(path: Path) -> str:
    """The signing key stored at `path`, made (random, readable only by its owner) on first use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        # O_EXCL: two stacks starting at once cannot each write a different key.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_urlsafe(48) + "\n")
    key = path.read_text().strip()
    if len(key.encode()) < MIN_SIGNING_KEY_BYTES:
        raise ServiceError(f"the signing key in {path} is shorter than {MIN_SIGNING_KEY_BYTES} bytes; delete the file")
    return key


def terminate_all(processes: Iterable[ServiceProcess], grace: float) -> None:
    """Terminate several processes at once: SIGTERM to all, then wait, sharing one grace period."""
    processes = list(processes)
    for process in processes:
        process.begin_terminate()
    deadline = Deadline(grace)
    for process in processes:
        process.finish_terminate(deadline.remaining())


# --- the whole stack --------------------------------------------------------------------

# Write service worker processes that `make up`, compose and `make bench` run (WRITE_WORKERS
# overrides it); the service's own default is 1.
DEV_WRITE_WORKERS = 2


@dataclass
class StackConfig:
    """What to run and where; port 0 means a free port."""

    database_url: str | None = None  # None: start an embedded Postgres
    redis_url: str | None = None  # None: start an embedded Redis
    redis_key_prefix: str = "tessera:"
    host: str = LOCALHOST
    write_port: int = 0
    read_ports: Sequence[int] = (0, 0)
    relays: int = 2
    # The payment provider: started unless False (then the saga workers get PAYMENT_PROVIDER_ADDRESS
    # from `saga_env` or the environment). `provider_env` is added to its environment, e.g.
    # {"PAYMENT_LATENCY_MS": "50"}; without PAYMENT_STATE_FILE there, it keeps payments in
    # data_dir/payment-provider.sqlite3, or in memory when there is no data_dir.
    payment_provider: bool = True
    provider_port: int = 0
    provider_env: Mapping[str, str] = field(default_factory=dict)
    # Saga workers (`python -m write_service.saga`), each with a health port: saga_ports[i], else free.
    saga_workers: int = 1
    saga_ports: Sequence[int] = ()
    saga_env: Mapping[str, str] = field(default_factory=dict)
    postgres_port: int = 0
    redis_port: int = 0
    data_dir: Path | None = None  # embedded servers keep data in data_dir/{postgres,redis}; None: temporary
    log_dir: Path | None = None  # None: a new temporary directory (kept for diagnostics)
    echo: TextIO | None = None  # where prefixed child output (and progress) goes, if anywhere
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment for every service
    migrate: bool = True  # False: the database is already migrated (tests that made it themselves)
    # True: services require bearer tokens signed with `signing_key` (None: kept in data_dir, or
    # random for this stack alone). False: they run with AUTH_MODE=insecure and trust every caller.
    auth: bool = False
    signing_key: str | None = None
    startup_timeout: float = 60.0
    stop_grace: float = 10.0
    python: str = sys.executable
    cwd: Path = REPO_ROOT
    migrate_module: str = "write_service.migrate"
    write_module: str = "write_service"
    relay_module: str = "relay"
    read_module: str = "read_service"
    provider_module: str = "payment_provider"
    saga_module: str = "write_service.saga"


def one_replica_config(
    database_url: str, redis_url: str, name: str, log_dir: Path | None, **overrides: Any
) -> StackConfig:
    """A write service, one relay and one replica over an already migrated database, under a key
    prefix of their own starting with `name`; `overrides` set other StackConfig fields."""
    return StackConfig(
        database_url=database_url,
        redis_url=redis_url,
        redis_key_prefix=f"{name}:{secrets.token_hex(4)}:",
        relays=1,
        read_ports=(0,),
        log_dir=log_dir,
        migrate=False,
        **overrides,
    )


class Stack(StartStop):
    """Postgres, Redis, migrations, the write service, relays, read replicas, the payment provider and
    saga workers, started and stopped together."""

    def __init__(self, config: StackConfig | None = None, cancel: threading.Event | None = None) -> None:
        """Prepare the stack; `cancel`, when set, abandons start-up waits."""
        self.config = config or StackConfig()
        self.cancel = cancel or threading.Event()
        self.postgres: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None
        self.database_url = self.config.database_url or ""
        self.redis_url = self.config.redis_url or ""
        self.log_dir = self.config.log_dir or Path(tempfile.mkdtemp(prefix="tessera-stack-"))
        self.write: ServiceProcess | None = None
        self.relays: list[ServiceProcess] = []
        self.readers: list[ServiceProcess] = []
        self.provider: ServiceProcess | None = None
        self.saga_workers: list[ServiceProcess] = []
        self._width = len("devstack")  # output prefixes line up for names up to this long
        self._signing_key: str | None = None

    # -- state

    @property
    def processes(self) -> list[ServiceProcess]:
        """Every service process started so far, in start order (stopped in the reverse order)."""
        first = [self.write] if self.write is not None else []
        provider = [self.provider] if self.provider is not None else []
        return [*first, *provider, *self.saga_workers, *self.relays, *self.readers]

    @property
    def write_address(self) -> str:
        """host:port of the write service."""
        if self.write is None:
            raise ServiceError("the stack is not started")
        return self.write.address

    @property
    def read_addresses(self) -> list[str]:
        """host:port of every read replica."""
        return [reader.address for reader in self.readers]

    @property
    def provider_address(self) -> str:
        """host:port of the payment provider (PaymentProviderService and PaymentProviderAdminService)."""
        if self.provider is None:
            raise ServiceError(
                "the stack runs no payment provider (not started, or StackConfig.payment_provider False)"
            )
        return self.provider.address

    @property
    def saga_addresses(self) -> list[str]:
        """host:port of every saga worker's health service."""
        return [worker.address for worker in self.saga_workers]

    @property
    def signing_key_path(self) -> Path | None:
        """Where the stack keeps its token signing key (None: it lives in memory only)."""
        if self.config.signing_key is not None or self.config.data_dir is None:
            return None
        return self.config.data_dir / SIGNING_KEY_FILE

    @property
    def signing_key(self) -> str:
        """The key the services verify tokens with (with auth on)."""
        if not self.config.auth:
            raise ServiceError("this stack runs without authentication (StackConfig.auth is False)")
        if self._signing_key is None:
            path = self.signing_key_path
            if self.config.signing_key is not None:
                if len(self.config.signing_key.encode()) < MIN_SIGNING_KEY_BYTES:
                    raise ServiceError(f"the signing key must be at least {MIN_SIGNING_KEY_BYTES} bytes")
                self._signing_key = self.config.signing_key
            elif path is not None:
                self._signing_key = load_or_create_signing_key(path)
            else:
                self._signing_key = secrets.token_urlsafe(48)
        return self._signing_key

    def mint_token(self, scopes: Iterable[str] = ALL_SCOPES, sub: str = "devstack", ttl_s: int = 3600) -> str:
        """A bearer token the services accept (auth on only)."""
        return TokenSigner(self.signing_key.encode()).mint(sub, scopes, ttl_s)

    def auth_metadata(
        self, scopes: Iterable[str] = ALL_SCOPES, sub: str = "devstack", ttl_s: int = 3600
    ) -> list[tuple[str, str]]:
        """gRPC metadata carrying a fresh token with `scopes`; an empty list when auth is off."""
        if not self.config.auth:
            return []
        return [("authorization", f"Bearer {self.mint_token(scopes, sub, ttl_s)}")]

    def service_env(self) -> dict[str, str]:
        """Environment every service gets: the URLs (those known), the Redis key prefix, auth and `config.env`."""
        urls = {"DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url}
        if self.config.auth:
            auth = {"AUTH_MODE": "required", "AUTH_SIGNING_KEY": self.signing_key}
        else:
            # Explicit, so a developer's own AUTH_* variables cannot turn it on half-way.
            auth = {"AUTH_MODE": "insecure"}
        return {
            **{name: url for name, url in urls.items() if url},
            "REDIS_KEY_PREFIX": self.config.redis_key_prefix,
            **auth,
            **self.config.env,
        }

    # -- lifecycle

    def start(self) -> Self:
        """Start everything and wait until each gRPC server is SERVING; on failure stop what started."""
        deadline = Deadline(self.config.startup_timeout)
        self._check_ports()
        try:
            self.start_backing_services()
            if self.config.migrate:
                self.run_migrations(deadline.remaining())
            self.write = self._spawn(
                "write", self.config.write_module, self.config.write_port, self.log_dir / "write.log"
            )
            for _ in range(self.config.relays):
                self.add_relay()
            for port in self.config.read_ports:
                self.readers.append(self._spawn_reader(port))
            if self.config.payment_provider:
                self.provider = self._spawn_provider()
            for index in range(self.config.saga_workers):
                ports = self.config.saga_ports
                self.saga_workers.append(self._spawn_saga_worker(ports[index] if index < len(ports) else 0))
            for process in self.processes:
                process.wait_healthy(max(deadline.remaining(), 0.1), cancel=self.cancel)
        except BaseException:
            self.stop()
            raise
        return self

    async def start_async(self) -> Self:
        """`start()` in a worker thread, so the event loop keeps running meanwhile."""
        return await asyncio.to_thread(self.start)

    async def stop_async(self) -> None:
        """`stop()` in a worker thread."""
        await asyncio.to_thread(self.stop)

    def start_backing_services(self, *, redis: bool = True) -> None:
        """Start an embedded Postgres (and Redis unless `redis` is False) for the URLs the config leaves unset."""
        data_dir = self.config.data_dir
        if not self.database_url:
            self.say("starting embedded Postgres")
            self.postgres = EmbeddedPostgres(
                port=self.config.postgres_port or None,
                data_dir=data_dir / "postgres" if data_dir is not None else None,
            ).start()
            self.database_url = self.postgres.url
        if redis and not self.redis_url:
            self.say("starting embedded Redis")
            self.redis = EmbeddedRedis(
                port=self.config.redis_port or None,
                data_dir=data_dir / "redis" if data_dir is not None else None,
            ).start()
            self.redis_url = self.redis.url

    def run_migrations(self, timeout: float = 60.0) -> None:
        """Run the migrate command to completion; raise ServiceError with its output if it fails."""
        self.say("applying migrations")
        migrate = ServiceProcess.python_module(
            "migrate",
            self.config.migrate_module,
            python=self.config.python,
            env=self.service_env(),
            log_path=self.log_dir / "migrate.log",
            echo=self.config.echo,
            prefix_width=self._width,
            cwd=self.config.cwd,
        ).start()
        code = migrate.wait(timeout, cancel=self.cancel)
        if code != 0:
            raise ServiceError(
                f"migrations failed with {describe_exit(code)}; log {migrate.log_path}:\n{migrate.log_tail()}"
            )

    def add_relay(self) -> ServiceProcess:
        """Start one more relay (it stays standby while another holds the lock)."""
        name = f"relay-{len(self.relays) + 1}"
        relay = self._spawn(name, self.config.relay_module, None, self.log_dir / f"{name}.log")
        self.relays.append(relay)
        return relay

    def add_reader(self, port: int = 0) -> ServiceProcess:
        """Start one more read replica and wait until it is SERVING."""
        reader = self._spawn_reader(port)
        self.readers.append(reader)
        reader.wait_healthy(self.config.startup_timeout, cancel=self.cancel)
        return reader

    def add_saga_worker(self, port: int = 0) -> ServiceProcess:
        """Start one more saga worker and wait until it is SERVING."""
        worker = self._spawn_saga_worker(port)
        self.saga_workers.append(worker)
        worker.wait_healthy(self.config.startup_timeout, cancel=self.cancel)
        return worker

    def provider_state_file(self) -> str:
        """Where the payment provider keeps payments (`:memory:`: for the life of its process only)."""
        configured = self.config.provider_env.get("PAYMENT_STATE_FILE")
        if configured:
            return configured
        if self.config.data_dir is not None:
            return str(self.config.data_dir / "payment-provider.sqlite3")
        return ":memory:"

    def check(self) -> None:
        """Raise ProcessExited if any service exited without being asked to."""
        for process in self.processes:
            if process.failed:
                raise ProcessExited(process)

    def stop(self) -> None:
        """Stop the services (readers, relays, saga workers, provider, then write), then the embedded servers.

        Idempotent.
        """
        services = list(reversed(self.processes))
        if any(process.running for process in services):
            self.say("stopping services")
        terminate_all(services, self.config.stop_grace)
        for server in (self.redis, self.postgres):
            if server is not None and server.running:
                self.say(f"stopping embedded {server.name}")
            if server is not None:
                server.stop()

    def say(self, message: str) -> None:
        """Print a line of the supervisor's own to the echo stream, if any."""
        if self.config.echo is not None:
            with _ECHO_LOCK:
                self.config.echo.write(f"{'devstack':<{self._width}} | {message}\n")
                self.config.echo.flush()

    # -- internals

    def _spawn(
        self, name: str, module: str, port: int | None, log_path: Path, env: Mapping[str, str] | None = None
    ) -> ServiceProcess:
        return ServiceProcess.python_module(
            name,
            module,
            python=self.config.python,
            env=self.service_env() if env is None else env,
            grpc_port=port,
            host=self.config.host,
            log_path=log_path,
            echo=self.config.echo,
            prefix_width=self._width,
            cwd=self.config.cwd,
        ).start()

    def _spawn_provider(self) -> ServiceProcess:
        env = {**self.service_env(), "PAYMENT_STATE_FILE": self.provider_state_file(), **self.config.provider_env}
        return self._spawn(
            "provider", self.config.provider_module, self.config.provider_port, self.log_dir / "provider.log", env=env
        )

    def _spawn_saga_worker(self, port: int) -> ServiceProcess:
        name = f"saga-{len(self.saga_workers) + 1}"
        env = self.service_env()
        if self.provider is not None:
            env["PAYMENT_PROVIDER_ADDRESS"] = self.provider.address
        env.update(self.config.saga_env)
        worker = ServiceProcess.python_module(
            name,
            self.config.saga_module,
            python=self.config.python,
            env=env,
            grpc_port=port,
            host=self.config.host,
            log_path=self.log_dir / f"{name}.log",
            echo=self.config.echo,
            prefix_width=self._width,
            cwd=self.config.cwd,
        )
        # The worker reads SAGA_WORKER_PORT before GRPC_PORT: a developer's own value must not win.
        worker.env["SAGA_WORKER_PORT"] = worker.env["GRPC_PORT"]
        return worker.start()

    def _check_ports(self) -> None:
        """Refuse to start when a fixed port is taken: gRPC's SO_REUSEPORT would share it silently."""
        config = self.config
        ports = [config.write_port, *config.read_ports, *config.saga_ports[: config.saga_workers]]
        if config.payment_provider:
            ports.append(config.provider_port)
        if not config.database_url:
            ports.append(config.postgres_port)
        if not config.redis_url:
            ports.append(config.redis_port)
        for port in ports:
            if port and not port_is_free(port, _connect_host(config.host)):
                raise ServiceError(
                    f"port {port} is already in use (is an earlier stack still running? "
                    f"`ss -ltnp 'sport = :{port}'` shows who holds it)"
                )

    def _spawn_reader(self, port: int) -> ServiceProcess:
        name = f"read-{len(self.readers) + 1}"
        return self._spawn(name, self.config.read_module, port, self.log_dir / f"{name}.log")
