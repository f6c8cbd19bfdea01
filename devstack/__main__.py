"""`python -m devstack up|migrate|infra`: run the stack (or parts of it) in the foreground.

DATABASE_URL and REDIS_URL, when set, point at servers to use; otherwise embedded Postgres and
Redis keep their data under .stack/ in the repository.

`up` requires bearer tokens, like production: the services verify them with AUTH_SIGNING_KEY
when it is set, else with a random key made on first run and kept in .stack/auth-signing-key.
It prints a development token with every scope. `--insecure` runs without authentication.

`up` keeps the stack up: a service that exits unexpectedly is restarted after a capped
exponential backoff; one that crashes --max-crashes times in a row (each time within
--stable-after seconds of its start) is reported FAILED and left down while the rest runs.
Only Ctrl-C, SIGTERM or SIGHUP stop the whole stack.

`up` also runs the payment provider (payments kept in .stack/payment-provider.sqlite3; PAYMENT_*
variables in the environment set its initial failures) and the saga workers that call it.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from devstack.processes import find_grpcurl
from devstack.restart_policy import RestartPolicy
from devstack.servers import EmbeddedPostgres, EmbeddedRedis, ServerError
from devstack.supervision import Supervision
from devstack.supervisor import (
    ALL_SCOPES,
    DEV_WRITE_WORKERS,
    REPO_ROOT,
    Cancelled,
    ProcessExited,
    ServiceError,
    Stack,
    StackConfig,
)

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DEV_TOKEN_TTL_S = 30 * 24 * 3600
_STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}
_RESTARTS = RestartPolicy()  # the defaults


def _env_int(name: str, default: int) -> int:
    """Integer from the environment, or `default`."""
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def _env_float(name: str, default: float) -> float:
    """Number from the environment, or `default`."""
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def _ports(raw: str) -> list[int]:
    """Parse '50052,50053' into ports."""
    try:
        return [int(part) for part in raw.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated ports, got {raw!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every option also has a DEVSTACK_* environment variable."""
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("DEVSTACK_DATA_DIR", REPO_ROOT / ".stack")),
        help="where embedded Postgres and Redis keep data, and logs go (env DEVSTACK_DATA_DIR; default .stack)",
    )
    data.add_argument("--postgres-port", type=int, default=_env_int("DEVSTACK_POSTGRES_PORT", 0))
    data.add_argument("--redis-port", type=int, default=_env_int("DEVSTACK_REDIS_PORT", 0))
    data.add_argument("--migrate-module", default="write_service.migrate", help="module run as the migrate command")

    up = commands.add_parser("up", parents=[data], help="run the whole stack until Ctrl-C")
    up.add_argument("--host", default=os.environ.get("DEVSTACK_HOST", "127.0.0.1"), help="bind address")
    up.add_argument("--write-port", type=int, default=_env_int("DEVSTACK_WRITE_PORT", 50051))
    up.add_argument(
        "--read-ports",
        type=_ports,
        default=_ports(os.environ.get("DEVSTACK_READ_PORTS", "50052,50053")),
        help="one port per read replica (env DEVSTACK_READ_PORTS; default 50052,50053)",
    )
    up.add_argument("--relays", type=int, default=_env_int("DEVSTACK_RELAYS", 2), help="number of relays")
    up.add_argument(
        "--provider-port",
        type=int,
        default=_env_int("DEVSTACK_PROVIDER_PORT", 50070),
        help="port of the payment provider (env DEVSTACK_PROVIDER_PORT; default 50070)",
    )
    up.add_argument(
        "--no-provider",
        action="store_true",
        default=os.environ.get("DEVSTACK_PROVIDER", "1") in ("0", "false"),
        help="do not run the payment provider; the saga workers then call PAYMENT_PROVIDER_ADDRESS "
        "(env DEVSTACK_PROVIDER=0)",
    )
    up.add_argument(
        "--saga-workers",
        type=int,
        default=_env_int("DEVSTACK_SAGA_WORKERS", 1),
        help="number of saga workers (env DEVSTACK_SAGA_WORKERS; default 1)",
    )
    up.add_argument(
        "--saga-ports",
        type=_ports,
        default=_ports(os.environ.get("DEVSTACK_SAGA_PORTS", "50061")),
        help="health ports of the saga workers, one each; workers beyond the list get free ports "
        "(env DEVSTACK_SAGA_PORTS; default 50061)",
    )
    up.add_argument("--startup-timeout", type=float, default=float(os.environ.get("DEVSTACK_STARTUP_TIMEOUT", "60")))
    up.add_argument("--stop-grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    up.add_argument(
        "--redis-key-prefix",
        default=os.environ.get("REDIS_KEY_PREFIX", "tessera:"),
        help="prefix of every Redis key and channel the services use (env REDIS_KEY_PREFIX; default tessera:)",
    )
    restarts = up.add_argument_group("restarts of crashed services")
    restarts.add_argument(
        "--restart-backoff",
        type=float,
        default=_env_float("DEVSTACK_RESTART_BACKOFF_S", _RESTARTS.backoff_s),
        help="seconds before the first restart, doubled for each further crash in a row "
        f"(env DEVSTACK_RESTART_BACKOFF_S; default {_RESTARTS.backoff_s:g})",
    )
    restarts.add_argument(
        "--restart-backoff-max",
        type=float,
        default=_env_float("DEVSTACK_RESTART_BACKOFF_MAX_S", _RESTARTS.max_backoff_s),
        help=f"cap of that delay (env DEVSTACK_RESTART_BACKOFF_MAX_S; default {_RESTARTS.max_backoff_s:g})",
    )
    restarts.add_argument(
        "--max-crashes",
        type=int,
        default=_env_int("DEVSTACK_MAX_CRASHES", _RESTARTS.max_crashes),
        help="crashes in a row after which a service is reported FAILED and left down "
        f"(env DEVSTACK_MAX_CRASHES; default {_RESTARTS.max_crashes})",
    )
    restarts.add_argument(
        "--stable-after",
        type=float,
        default=_env_float("DEVSTACK_STABLE_AFTER_S", _RESTARTS.stable_after_s),
        help="seconds of running after which a crash no longer counts as one in a row "
        f"(env DEVSTACK_STABLE_AFTER_S; default {_RESTARTS.stable_after_s:g})",
    )
    up.add_argument(
        "--insecure",
        action="store_true",
        default=os.environ.get("DEVSTACK_INSECURE", "") not in ("", "0", "false"),
        help="run the services with AUTH_MODE=insecure: no tokens needed (env DEVSTACK_INSECURE=1)",
    )
    # Stand-ins for the services, used to test the supervisor itself.
    up.add_argument("--write-module", default="write_service", help=argparse.SUPPRESS)
    up.add_argument("--relay-module", default="relay", help=argparse.SUPPRESS)
    up.add_argument("--read-module", default="read_service", help=argparse.SUPPRESS)
    up.add_argument("--provider-module", default="payment_provider", help=argparse.SUPPRESS)
    up.add_argument("--saga-module", default="write_service.saga", help=argparse.SUPPRESS)

    commands.add_parser("migrate", parents=[data], help="apply migrations and exit")
    commands.add_parser("infra", parents=[data], help="run only Postgres and Redis until Ctrl-C")
    return parser


@contextmanager
def _stop_on_signals(stop: threading.Event, received: list[str]) -> Iterator[None]:
    """Turn Ctrl-C, SIGTERM and SIGHUP into setting `stop`; restore the old handlers afterwards."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        received.append(_STOP_SIGNALS.get(signal.Signals(signum), str(signum)))
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _display(path: Path) -> str:
    """`path` relative to the working directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _grpcurl() -> str:
    """How to invoke grpcurl, as short as it can be written from here."""
    found = find_grpcurl()
    return _display(found) if found else "grpcurl"


def _token_lines(stack: Stack) -> tuple[list[str], str]:
    """Lines that explain authentication, and the grpcurl header option to use."""
    if not stack.config.auth:
        return ["  auth     OFF (AUTH_MODE=insecure): every caller is trusted", ""], ""
    token = stack.mint_token(ALL_SCOPES, sub="developer", ttl_s=DEV_TOKEN_TTL_S)
    path = stack.signing_key_path
    where = f"the key in {_display(path)}" if path is not None else "AUTH_SIGNING_KEY"
    key = f"$(cat {_display(path)})" if path is not None else "$AUTH_SIGNING_KEY"
    lines = [
        f"  auth     bearer tokens required, signed with {where}",
        "",
        f"A token with every scope ({', '.join(ALL_SCOPES)}), valid {DEV_TOKEN_TTL_S // 86400} days:",
        f"  export TOKEN={token}",
        "Mint others (e.g. read-only):",
        f"  AUTH_SIGNING_KEY={key} {_display(Path(sys.executable))} -m shared_kernel.platform.security.tokens \\",
        "      mint --sub alice --scopes users:read --ttl 3600",
        "",
    ]
    return lines, '-H "authorization: Bearer $TOKEN" '


def usage_text(stack: Stack) -> str:
    """What to print once the stack is up: addresses, the token and grpcurl commands to try."""
    grpcurl = _grpcurl()
    auth_lines, header = _token_lines(stack)
    write = stack.write_address
    suffix = secrets.token_hex(3)
    register = (
        f'{{"email": "ada-{suffix}@example.com", "username": "ada-{suffix}", '
        f'"password": "correct-horse-battery", "full_name": "Ada Lovelace"}}'
    )
    lines = [
        "",
        "tessera is up:",
        f"  write    {write}  (tessera.users.v1.UserCommandService)",
        f"  read     {', '.join(stack.read_addresses)}  (tessera.users.v1.UserQueryService)",
        f"  relays   {', '.join(relay.name for relay in stack.relays)}  (one active, the others standby)",
        *(
            [f"  payments {stack.provider_address}  (tessera.payments.v1.PaymentProviderService)"]
            if stack.provider
            else []
        ),
        *([f"  sagas    {', '.join(stack.saga_addresses)}  (saga workers, health only)"] if stack.saga_workers else []),
        f"  DATABASE_URL={stack.database_url}",
        f"  REDIS_URL={stack.redis_url}",
        f"  logs     {_display(stack.log_dir)}/",
        *auth_lines,
        "Try it:",
        f"  {grpcurl} -plaintext {write} list",
        f"  {grpcurl} -plaintext {write} describe tessera.users.v1.UserCommandService",
        f"  {grpcurl} -plaintext {header}-d '{register}' \\",
        f"      {write} tessera.users.v1.UserCommandService/RegisterUser",
        "  # then, with the user_id it returned, ask each replica:",
    ]
    for address in stack.read_addresses:
        lines += [
            f"""  {grpcurl} -plaintext {header}-d '{{"user_id": "USER_ID"}}' \\""",
            f"      {address} tessera.users.v1.UserQueryService/GetUser",
        ]
    lines += _provider_lines(stack, grpcurl)
    lines += ["", "devstack: stack is up; a service that crashes is restarted; press Ctrl-C to stop", ""]
    return "\n".join(lines)


def _provider_lines(stack: Stack, grpcurl: str) -> list[str]:
    """Addresses of the payment provider and the saga workers, and grpcurl commands for them."""
    lines: list[str] = []
    if stack.saga_workers:
        lines += [
            "",
            f"Saga workers ({', '.join(stack.saga_addresses)}: grpc.health.v1 only); their health:",
            f"  {grpcurl} -plaintext {stack.saga_addresses[0]} grpc.health.v1.Health/Check",
        ]
    if stack.provider is None:
        return lines
    provider = stack.provider_address
    service = "tessera.payments.v1.PaymentProviderService"
    admin = "tessera.payments.v1.PaymentProviderAdminService"
    decline = '{"configuration": {"decline_above_minor": "100000", "latency_ms": 50}}'
    authorize = (
        '{"reference": "try-1", "amount": {"currency_code": "EUR", "amount_minor": "1999"}, '
        '"customer_id": "me", "idempotency_key": "try-1-auth"}'
    )
    lines += [
        "",
        f"Payment provider at {provider} (no token; payments in {stack.provider_state_file()}):",
        f"  {grpcurl} -plaintext {provider} {service}/ListPayments",
        f"  {grpcurl} -plaintext -d '{authorize}' \\",
        f"      {provider} {service}/Authorize",
        "  # inject failures while it runs (the whole configuration is replaced; {} switches them off):",
        f"  {grpcurl} -plaintext -d '{decline}' {provider} {admin}/Configure",
        f"  {grpcurl} -plaintext {provider} {admin}/GetConfiguration",
        f"  {grpcurl} -plaintext {provider} {admin}/GetCounters",
    ]
    return lines


def cmd_up(args: argparse.Namespace) -> int:
    """Run the whole stack in the foreground until a signal, restarting crashed services; exit 1 if it cannot start."""
    try:
        policy = RestartPolicy(
            backoff_s=args.restart_backoff,
            max_backoff_s=args.restart_backoff_max,
            max_crashes=args.max_crashes,
            stable_after_s=args.stable_after,
        )
    except ValueError as exc:
        print(f"devstack: invalid restart options: {exc}", file=sys.stderr, flush=True)
        return 2
    stop = threading.Event()
    received: list[str] = []
    config = StackConfig(
        database_url=os.environ.get("DATABASE_URL") or None,
        redis_url=os.environ.get("REDIS_URL") or None,
        redis_key_prefix=args.redis_key_prefix,
        host=args.host,
        write_port=args.write_port,
        read_ports=args.read_ports,
        relays=args.relays,
        payment_provider=not args.no_provider,
        provider_port=args.provider_port,
        saga_workers=args.saga_workers,
        saga_ports=args.saga_ports,
        postgres_port=args.postgres_port,
        redis_port=args.redis_port,
        data_dir=args.data_dir,
        log_dir=args.data_dir / "logs",
        echo=sys.stdout,
        env={
            "LOG_FORMAT": os.environ.get("LOG_FORMAT", "text"),
            "LOG_LEVEL": os.environ.get("LOG_LEVEL", "INFO"),
            # The write service as a group of worker processes on one port (docs/scaling.md).
            "WRITE_WORKERS": os.environ.get("WRITE_WORKERS", str(DEV_WRITE_WORKERS)),
        },
        startup_timeout=args.startup_timeout,
        stop_grace=args.stop_grace,
        auth=not args.insecure,
        signing_key=os.environ.get("AUTH_SIGNING_KEY") or None,
        migrate_module=args.migrate_module,
        write_module=args.write_module,
        relay_module=args.relay_module,
        read_module=args.read_module,
        provider_module=args.provider_module,
        saga_module=args.saga_module,
    )
    stack = Stack(config, cancel=stop)
    supervision = Supervision(stack, policy)
    code = 0
    with _stop_on_signals(stop, received):
        try:
            stack.start()
            print(usage_text(stack), flush=True)
            supervision.run(stop)
        except Cancelled:
            pass
        except ProcessExited as exc:
            print(f"devstack: {exc}\ndevstack: stopping everything", file=sys.stderr, flush=True)
            code = 1
        except (ServiceError, ServerError) as exc:
            print(f"devstack: {exc}", file=sys.stderr, flush=True)
            code = 1
        finally:
            if received:
                print(f"devstack: {received[0]} received, stopping", flush=True)
            if stack.processes:
                stack.say(f"status: {supervision.status()}")
            stack.stop()
    print("devstack: stopped", flush=True)
    return code


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply migrations to DATABASE_URL, or to the embedded Postgres under the data directory."""
    stop = threading.Event()
    config = StackConfig(
        database_url=os.environ.get("DATABASE_URL") or None,
        redis_url=os.environ.get("REDIS_URL") or None,
        postgres_port=args.postgres_port,
        data_dir=args.data_dir,
        log_dir=args.data_dir / "logs",
        echo=sys.stdout,
        migrate_module=args.migrate_module,
    )
    stack = Stack(config, cancel=stop)
    with _stop_on_signals(stop, []):
        try:
            stack.start_backing_services(redis=False)
            stack.run_migrations(config.startup_timeout)
        except (ServiceError, ServerError) as exc:
            print(f"devstack: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            stack.stop()
    return 0


def cmd_infra(args: argparse.Namespace) -> int:
    """Run only the embedded Postgres and Redis, printing their URLs, until a signal."""
    stop = threading.Event()
    with _stop_on_signals(stop, []):
        try:
            postgres = EmbeddedPostgres(port=args.postgres_port or None, data_dir=args.data_dir / "postgres")
            redis = EmbeddedRedis(port=args.redis_port or None, data_dir=args.data_dir / "redis")
            with postgres, redis:
                print(f"DATABASE_URL={postgres.url}\nREDIS_URL={redis.url}", flush=True)
                print("devstack: Postgres and Redis are up; press Ctrl-C to stop", flush=True)
                while not stop.wait(0.5):
                    for server in (postgres, redis):
                        if not server.running:
                            print(f"devstack: {server.name} exited:\n{server.log_tail()}", file=sys.stderr)
                            return 1
        except ServerError as exc:
            print(f"devstack: {exc}", file=sys.stderr, flush=True)
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m devstack`."""
    args = build_parser().parse_args(argv)
    commands = {"up": cmd_up, "migrate": cmd_migrate, "infra": cmd_infra}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
