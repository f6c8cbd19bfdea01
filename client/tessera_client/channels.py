"""Channels to the write service and to the read replicas, with the options the services expect.

- The read channel balances calls over every replica with `round_robin`, from DNS
  (`dns:///reads.example:50052`, one A record per replica, e.g. a headless Service) or a
  static list of `ip:port`. Its service config turns on client-side health checking, so a
  replica that reports NOT_SERVING (draining, not caught up) gets no new calls, and retries
  queries that failed with UNAVAILABLE or DEADLINE_EXCEEDED, with exponential backoff,
  inside the caller's deadline (gRPC counts every attempt against the one deadline).
- The write channel carries no retry policy: a command is retried by the client only with
  its idempotency key (tessera_client.client), never blindly by gRPC.
- Keepalive stays inside the servers' enforcement (GRPC_MIN_CLIENT_PING_INTERVAL_S, 10 s by
  default, with 2 strikes): the client pings an idle connection every 30 s, so a dead peer
  behind a silent network is found without the server ever closing the connection for
  pinging too often.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

QUERY_SERVICES = (
    "tessera.users.v1.UserQueryService",
    "tessera.catalog.v1.ProductQueryService",
    "tessera.orders.v1.OrderQueryService",
)

# Not below the servers' GRPC_MIN_CLIENT_PING_INTERVAL_S (10 s) with margin, not so long
# that a silently dead connection lives for minutes.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


@dataclass(frozen=True, slots=True)
class QueryRetry:
    """gRPC's retry policy for queries (the service config's retryPolicy)."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    backoff_multiplier: float = 2.0
    codes: tuple[str, ...] = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


@dataclass(frozen=True, slots=True)
class Tls:
    """TLS for both channels: a CA bundle to trust, and for mutual TLS the client's certificate and key.

    Paths to PEM files; `server_name` overrides the name checked against the certificate
    (for addresses that are IPs).
    """

    ca_file: Path | str | None = None
    cert_file: Path | str | None = None
    key_file: Path | str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials these files make."""
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("mutual TLS needs both cert_file and key_file")
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca_file).read_bytes() if self.ca_file else None,
            private_key=Path(self.key_file).read_bytes() if self.key_file else None,
            certificate_chain=Path(self.cert_file).read_bytes() if self.cert_file else None,
        )


@dataclass(frozen=True, slots=True)
class ChannelOptions:
    """What both channels share; the defaults suit the services' defaults."""

    tls: Tls | None = None
    max_message_bytes: int = 4 * 1024 * 1024
    query_retry: QueryRetry = field(default_factory=QueryRetry)
    health_check: bool = True
    extra: tuple[tuple[str, Any], ...] = ()


def read_target(read: str | Sequence[str]) -> str:
    """A gRPC target for the replicas: a URI as given, a list of ip:port made a static `ipv4:`/`ipv6:` list.

    A single `host:port` becomes `dns:///host:port` so that every address the name resolves
    to is balanced over.
    """
    if isinstance(read, str):
        return read if ":///" in read or read.startswith(("ipv4:", "ipv6:", "unix:")) else f"dns:///{read}"
    addresses = list(read)
    if not addresses:
        raise ValueError("no read replica address")
    if len(addresses) == 1:
        return read_target(addresses[0])
    families = {_family(a) for a in addresses}
    if len(families) != 1 or None in families:
        raise ValueError("a static list of replicas must be IP literals of one family (ip:port); use dns:/// for names")
    return f"{families.pop()}:{','.join(addresses)}"


def _family(address: str) -> str | None:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return "ipv4" if ipaddress.ip_address(host).version == 4 else "ipv6"
    except ValueError:
        return None


def read_service_config(options: ChannelOptions) -> dict[str, Any]:
    """round_robin, health checking and the query retry policy, as a gRPC service config."""
    retry = options.query_retry
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": name} for name in QUERY_SERVICES],
                "retryPolicy": {
                    "maxAttempts": retry.max_attempts,
                    "initialBackoff": f"{retry.initial_backoff_s}s",
                    "maxBackoff": f"{retry.max_backoff_s}s",
                    "backoffMultiplier": retry.backoff_multiplier,
                    "retryableStatusCodes": list(retry.codes),
                },
            }
        ],
    }
    if options.health_check:
        # "" is the server's overall status, which a replica sets NOT_SERVING while it drains or lags.
        config["healthCheckConfig"] = {"serviceName": ""}
    return config


def _channel_args(options: ChannelOptions, service_config: dict[str, Any] | None) -> list[tuple[str, Any]]:
    args: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", options.max_message_bytes),
        ("grpc.max_send_message_length", options.max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 1),
        # Reconnect quickly after a replica or the write service restarts.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.dns_min_time_between_resolutions_ms", 5_000),
    ]
    if service_config is not None:
        args.append(("grpc.service_config", json.dumps(service_config)))
        args.append(("grpc.service_config_disable_resolution", 1))
    if options.tls is not None and options.tls.server_name:
        args.append(("grpc.ssl_target_name_override", options.tls.server_name))
    args.extend(options.extra)
    return args


def _open(target: str, options: ChannelOptions, service_config: dict[str, Any] | None) -> grpc.aio.Channel:
    args = _channel_args(options, service_config)
    if options.tls is None:
        return grpc.aio.insecure_channel(target, options=args)
    return grpc.aio.secure_channel(target, options.tls.credentials(), options=args)


def write_channel(target: str, options: ChannelOptions | None = None) -> grpc.aio.Channel:
    """A channel to the write service (one address or a DNS name); no gRPC-level retries."""
    return _open(target, options or ChannelOptions(), {"loadBalancingConfig": [{"pick_first": {}}]})


def read_channel(replicas: str | Sequence[str], options: ChannelOptions | None = None) -> grpc.aio.Channel:
    """A channel balancing over the read replicas, skipping unhealthy ones, retrying queries."""
    options = options or ChannelOptions()
    return _open(read_target(replicas), options, read_service_config(options))
