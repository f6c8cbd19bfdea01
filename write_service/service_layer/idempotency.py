"""Idempotency keys: what makes a key valid, and the fingerprint a retry is compared by.

A key is unique within its scope (principal and command type). The fingerprint is the
SHA-256 of the command's canonical form, so a retry with the same key is recognised as
the same request or refused as a different one, without the request being stored. A
secret field (a password) enters that form only as an argon2id digest salted with the
scope: a plain SHA-256 over a password would let anyone holding the table guess it at
GPU speed, bypassing the cost that protects the stored password hash.
"""

from __future__ import annotations

import hashlib
import json

from shared_kernel.contracts.errors import FieldViolation, InvalidArgument
from write_service.commands.base import Command
from write_service.service_layer.ports import IdempotencyScope, PasswordHasher

# The request header that carries the key, so a violation names what the caller sent.
IDEMPOTENCY_KEY_FIELD = "idempotency-key"
IDEMPOTENCY_KEY_MAX = 255

_SALT_DOMAIN = b"tessera.idempotency.secret.v1"


def key_violation(value: str) -> FieldViolation | None:
    """A violation unless `value` is 1..255 printable ASCII characters."""
    if not 1 <= len(value) <= IDEMPOTENCY_KEY_MAX or not (value.isascii() and value.isprintable()):
        return FieldViolation(IDEMPOTENCY_KEY_FIELD, f"must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters")
    return None


def key_reused() -> InvalidArgument:
    """The error for a key that already belongs to a different request."""
    return InvalidArgument(
        [FieldViolation(IDEMPOTENCY_KEY_FIELD, "was already used for a different request")],
        message="the idempotency key was already used for a different request",
    )


def secret_salt(scope: IdempotencyScope) -> bytes:
    """The 16-byte salt of a scope's secret digests: unique per key, the same on every retry."""
    encoded = json.dumps([scope.principal, scope.command_type, scope.key]).encode()
    return hashlib.sha256(_SALT_DOMAIN + encoded).digest()[:16]


async def fingerprint(command: Command, scope: IdempotencyScope, hasher: PasswordHasher) -> bytes:
    """SHA-256 of the command's canonical JSON form, secrets replaced by their salted argon2id digests."""
    secrets: dict[str, str] = {}
    if secret_fields := command.secret_fields():  # the salt only when there is a secret to derive
        salt = secret_salt(scope)
        secrets = {name: (await hasher.derive(value, salt)).hex() for name, value in secret_fields.items()}
    canonical = json.dumps(
        {"command_type": command.command_type, "fields": command.fingerprint_fields(), "secrets": secrets},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode()).digest()
