"""Which scope a gRPC method needs, derived from its service's full name.

For a service `<name>.<context>.v<N>.<Service>`:

    *CommandService                  <context>:write   (tessera.users.v1.UserCommandService → users:write)
    *QueryService                    <context>:read
    *AdminService, *OperatorService  admin
    anything else                    admin             (unknown kinds fail closed)

Health and reflection are open to everyone. The `admin` scope grants every method, so an
operator's token works everywhere; services get tokens with the narrow scopes they need.
"""

from __future__ import annotations

import re
from collections.abc import Collection

ADMIN = "admin"
READ = "read"
WRITE = "write"

OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
_VERSION = re.compile(r"^v\d+(?:(?:alpha|beta)\d*)?$")


def service_of(method: str) -> str:
    """`/pkg.Service/Method` → `pkg.Service`."""
    return method.lstrip("/").partition("/")[0]


def context_of(service: str) -> str | None:
    """The bounded context named by a versioned package: `tessera.users.v1.X` → `users`."""
    package = service.rpartition(".")[0].split(".")
    if len(package) < 2 or not _VERSION.fullmatch(package[-1]):
        return None
    return package[-2] or None


def required_scope(method: str) -> str | None:
    """The scope a call to `method` needs, or None when the method is open to every caller."""
    service = service_of(method)
    if service in OPEN_SERVICES:
        return None
    name = service.rpartition(".")[2]
    context = context_of(service)
    if name.endswith(("AdminService", "OperatorService")) or context is None:
        return ADMIN
    if name.endswith("CommandService"):
        return f"{context}:{WRITE}"
    if name.endswith("QueryService"):
        return f"{context}:{READ}"
    return ADMIN


def grants(scopes: Collection[str], required: str) -> bool:
    """Whether a caller holding `scopes` may call a method that needs `required`."""
    return required in scopes or ADMIN in scopes
