"""TLS credentials for the gRPC servers (from settings) and for the clients that probe them."""

from __future__ import annotations

from pathlib import Path

import grpc

from shared_kernel.platform.settings import GrpcServerSettings


def describe(settings: GrpcServerSettings) -> str:
    """`mtls`, `tls` or `plaintext`: how the server configured by `settings` listens."""
    if settings.grpc_tls_client_ca_file is not None:
        return "mtls"
    return "tls" if settings.grpc_tls_enabled else "plaintext"


def server_credentials(settings: GrpcServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials for the server, requiring client certificates when a client CA is set; None for plaintext."""
    if settings.grpc_tls_cert_file is None or settings.grpc_tls_key_file is None:
        return None
    client_ca = settings.grpc_tls_client_ca_file
    return grpc.ssl_server_credentials(
        [(settings.grpc_tls_key_file.read_bytes(), settings.grpc_tls_cert_file.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """Client TLS credentials: trust `ca_file` (else the system roots), present cert/key when given."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes() if ca_file is not None else None,
        private_key=key_file.read_bytes() if key_file is not None else None,
        certificate_chain=cert_file.read_bytes() if cert_file is not None else None,
    )
