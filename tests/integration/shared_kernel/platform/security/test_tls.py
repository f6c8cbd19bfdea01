"""TLS and mutual TLS on the shared GrpcServer, with certificates made for the test."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared_kernel.platform.healthcheck import main as healthcheck_main
from shared_kernel.platform.security.tls import channel_credentials

from .certs import Authority, Issued
from .conftest import ServeFactory

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Issued
    client: Issued
    stranger_ca: Authority
    stranger: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority(directory, "tessera")
    stranger_ca = Authority(directory, "stranger")
    return Pki(
        ca=ca,
        server=ca.issue("server", server=True),
        client=ca.issue("client", server=False),
        stranger_ca=stranger_ca,
        stranger=stranger_ca.issue("client", server=False),
    )


async def health_check(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


def secure(port: int, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"localhost:{port}", credentials)


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_check(channel)
    return caught.value.code()


def tls_settings(pki: Pki, mutual: bool) -> dict[str, Path]:
    settings = {"grpc_tls_cert_file": pki.server.cert, "grpc_tls_key_file": pki.server.key}
    if mutual:
        settings["grpc_tls_client_ca_file"] = pki.ca.cert
    return settings


async def test_tls_serves_tls_clients_and_refuses_plaintext(serve: ServeFactory, pki: Pki):
    async with serve(**tls_settings(pki, mutual=False)) as server:
        async with secure(server.port, channel_credentials(pki.ca.cert)) as channel:
            assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
        assert await refused(grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")) == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA does not accept this server.
        stranger = secure(server.port, channel_credentials(pki.stranger_ca.cert))
        assert await refused(stranger) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(serve: ServeFactory, pki: Pki):
    async with serve(**tls_settings(pki, mutual=True)) as server:
        with_cert = channel_credentials(pki.ca.cert, pki.client.cert, pki.client.key)
        async with secure(server.port, with_cert) as channel:
            assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING

        without_cert = secure(server.port, channel_credentials(pki.ca.cert))
        assert await refused(without_cert) == grpc.StatusCode.UNAVAILABLE

        foreign_cert = channel_credentials(pki.ca.cert, pki.stranger.cert, pki.stranger.key)
        assert await refused(secure(server.port, foreign_cert)) == grpc.StatusCode.UNAVAILABLE

        assert await refused(grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")) == grpc.StatusCode.UNAVAILABLE


async def test_a_plaintext_server_refuses_tls_clients(serve: ServeFactory, pki: Pki):
    async with serve() as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert await health_check(channel) == health_pb2.HealthCheckResponse.SERVING
        assert await refused(secure(server.port, channel_credentials(pki.ca.cert))) == grpc.StatusCode.UNAVAILABLE


def test_client_credentials_need_cert_and_key_together(pki: Pki):
    with pytest.raises(ValueError, match="needs its key"):
        channel_credentials(pki.ca.cert, cert_file=pki.client.cert)


async def test_the_health_probe_speaks_tls_and_mutual_tls(serve: ServeFactory, pki: Pki):
    async with serve(**tls_settings(pki, mutual=True)) as server:
        address = f"127.0.0.1:{server.port}"
        mutual = ["--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
        # Run in a thread: the probe is synchronous and this loop must keep serving it.
        assert await asyncio.to_thread(healthcheck_main, [address, *mutual, "--tls-server-name", "localhost"]) == 0
        assert await asyncio.to_thread(healthcheck_main, [address, "--timeout", "1"]) == 1
        no_cert = [address, "--tls-ca", str(pki.ca.cert), "--timeout", "1"]
        assert await asyncio.to_thread(healthcheck_main, no_cert) == 1


async def test_a_bad_certificate_fails_start_up_clearly(serve: ServeFactory, tmp_path: Path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(RuntimeError, match="GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE"):
        async with serve(grpc_tls_cert_file=garbage, grpc_tls_key_file=garbage):
            pass
