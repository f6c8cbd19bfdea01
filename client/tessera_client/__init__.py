"""tessera's client library: typed calls, safe retries, read-your-writes and resuming watches."""

from tessera_client.auth import CallableToken, FileToken, StaticToken, TokenProvider
from tessera_client.channels import ChannelOptions, QueryRetry, Tls
from tessera_client.client import TesseraClient
from tessera_client.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StaleRead,
    TesseraError,
    Unauthenticated,
    Unavailable,
)
from tessera_client.session import ConsistencySession
from tessera_client.sync import SyncTesseraClient

__all__ = [
    "Aborted",
    "AlreadyExists",
    "CallableToken",
    "ChannelOptions",
    "ConsistencySession",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "FileToken",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "QueryRetry",
    "StaleRead",
    "StaticToken",
    "SyncTesseraClient",
    "TesseraClient",
    "TesseraError",
    "Tls",
    "TokenProvider",
    "Unauthenticated",
    "Unavailable",
]
