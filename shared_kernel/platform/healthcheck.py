"""Health probe of every process.

`python -m shared_kernel.platform.healthcheck ADDRESS` exits 0 iff the server is SERVING.

`--reach-env NAME` instead checks that the host:port in the URL held by environment variable NAME
accepts TCP connections (for processes without a gRPC port, such as the relay); a URL naming
several hosts (`postgresql://u@pg-a,pg-b/db`) is reachable when one of them is.

It is what the container and Kubernetes health checks run, so it belongs to the product and
imports nothing but the gRPC health stubs and the TLS helper.

For a server with TLS, `--tls-ca` names the CA that signed its certificate (and, with mutual
TLS, `--tls-cert`/`--tls-key` the probe's own); `--tls-server-name` is the name the
certificate carries when the probe dials an address it does not list (such as 127.0.0.1).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared_kernel.platform.security.tls import channel_credentials

OVERALL = ""  # grpc.health.v1 name of the server as a whole


def check_serving(
    address: str,
    service: str = OVERALL,
    timeout: float = 1.0,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> bool:
    """Whether the gRPC server at `address` reports SERVING for `service` within `timeout` (TLS with `credentials`)."""
    if credentials is None:
        channel = grpc.insecure_channel(address)
    else:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(address, credentials, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def check_serving_async(address: str, service: str = OVERALL, rpc_timeout: float = 1.0) -> bool:
    """Asyncio form of `check_serving`."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=rpc_timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def wait_serving(
    address: str,
    timeout: float,
    *,
    service: str = OVERALL,
    give_up: Callable[[], str | None] | None = None,
) -> None:
    """Poll until `address` is SERVING; raise TimeoutError, or RuntimeError when `give_up` returns a reason."""
    end = time.monotonic() + timeout
    while True:
        reason = give_up() if give_up is not None else None
        if reason is not None:
            raise RuntimeError(reason)
        if check_serving(address, service, timeout=min(1.0, max(end - time.monotonic(), 0.1))):
            return
        if time.monotonic() >= end:
            raise TimeoutError(f"{address} did not report SERVING within {timeout:g}s")
        time.sleep(max(min(0.1, end - time.monotonic()), 0.0))


async def wait_serving_async(address: str, within: float, *, service: str = OVERALL) -> None:
    """Asyncio form of `wait_serving` (without `give_up`): poll for at most `within` seconds."""
    end = time.monotonic() + within
    while True:
        if await check_serving_async(address, service, rpc_timeout=min(1.0, max(end - time.monotonic(), 0.1))):
            return
        if time.monotonic() >= end:
            raise TimeoutError(f"{address} did not report SERVING within {within:g}s")
        await asyncio.sleep(max(min(0.1, end - time.monotonic()), 0.0))


_DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "redis": 6379, "rediss": 6379}


def url_hosts(url: str) -> list[tuple[str, int]]:
    """The (host, port) pairs a URL names: one, or several for a multi-host Postgres URL."""
    parts = urlsplit(url)
    default = _DEFAULT_PORTS.get(parts.scheme)
    hosts = []
    for item in parts.netloc.rpartition("@")[2].split(","):
        if not item:
            continue
        if item.startswith("["):  # [ipv6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = item.partition(":")
        port = int(port_text) if port_text.isdigit() else default
        if host and port is not None:
            hosts.append((host, port))
    return hosts


def check_reachable(url: str, timeout: float = 1.0) -> bool:
    """Whether one of the hosts `url` names accepts a TCP connection within `timeout`."""
    for host, port in url_hosts(url):
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            continue
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the probe; exit 0 when healthy, 1 when not, 2 on bad usage."""
    parser = argparse.ArgumentParser(prog="python -m shared_kernel.platform.healthcheck", description=__doc__)
    parser.add_argument("address", nargs="?", help="host:port of a gRPC server")
    parser.add_argument("--service", default=OVERALL, help="grpc.health.v1 service name (default: overall)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an answer")
    parser.add_argument(
        "--reach-env", action="append", default=[], metavar="NAME", help="env var holding a URL to reach"
    )
    parser.add_argument("--tls-ca", type=Path, help="dial with TLS, trusting this CA (PEM)")
    parser.add_argument("--tls-cert", type=Path, help="client certificate for mutual TLS (PEM)")
    parser.add_argument("--tls-key", type=Path, help="key of the client certificate (PEM)")
    parser.add_argument("--tls-server-name", help="name to expect in the server's certificate")
    args = parser.parse_args(argv)
    if not args.address and not args.reach_env:
        parser.error("give an ADDRESS or at least one --reach-env")
    credentials = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        try:
            credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        except (OSError, ValueError) as exc:
            parser.error(f"TLS options: {exc}")
    if args.address and not check_serving(
        args.address, args.service, args.timeout, credentials=credentials, server_name=args.tls_server_name
    ):
        print(f"{args.address}: not SERVING", file=sys.stderr)
        return 1
    for name in args.reach_env:
        url = os.environ.get(name, "")
        if not check_reachable(url, args.timeout):
            where = ",".join(f"{host}:{port}" for host, port in url_hosts(url)) if url else "(unset)"
            print(f"{name}: cannot reach {where}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
