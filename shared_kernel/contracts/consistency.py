"""Consistency tokens: what a command reply hands out and a query may ask the read side to reflect.

A token names one aggregate at one version. It is opaque to callers: base64url (no padding)
of a small versioned payload `v1|<aggregate type>|<aggregate id>|<version>`. It is not
signed, because it grants nothing: the worst a forged token does is make a query wait for a
version (bounded by the wait budget) or be refused as one that does not exist.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from shared_kernel.contracts import errors

FIELD = "consistency_token"
_FORMAT = "v1"
_MAX_TOKEN_CHARS = 512


@dataclass(frozen=True, slots=True)
class ConsistencyToken:
    """One aggregate at one version: the state a query should reflect."""

    aggregate_type: str
    aggregate_id: str
    version: int


def encode_token(aggregate_type: str, aggregate_id: str, version: int) -> str:
    """The opaque token for `aggregate_type`/`aggregate_id` at `version` (at least 1)."""
    if version < 1 or not aggregate_type or not aggregate_id or "|" in aggregate_type + aggregate_id:
        raise ValueError("a consistency token needs a type, an id without '|', and a version of at least 1")
    payload = f"{_FORMAT}|{aggregate_type}|{aggregate_id}|{version}".encode()
    return base64.urlsafe_b64encode(payload).rstrip(b"=").decode("ascii")


def _invalid(reason: str) -> errors.InvalidArgument:
    return errors.InvalidArgument.single(FIELD, reason)


def decode_token(token: str) -> ConsistencyToken:
    """The token's content; raises InvalidArgument (field `consistency_token`) for anything malformed."""
    if len(token) > _MAX_TOKEN_CHARS or not token.isascii():
        raise _invalid("is not a consistency token issued by this service")
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        text = raw.decode("ascii")
    except (binascii.Error, ValueError) as exc:
        raise _invalid("is not a consistency token issued by this service") from exc
    parts = text.split("|")
    if len(parts) != 4 or parts[0] != _FORMAT:
        raise _invalid("is not a consistency token issued by this service")
    _, aggregate_type, aggregate_id, version_text = parts
    if not aggregate_type or not aggregate_id or not version_text.isdigit() or len(version_text) > 19:
        raise _invalid("is not a consistency token issued by this service")
    version = int(version_text)
    # Only the exact text this module issues is accepted (no padding, no '+' or '/', no
    # leading zeros), so one state has one token.
    if version < 1 or "|" in aggregate_id or encode_token(aggregate_type, aggregate_id, version) != token:
        raise _invalid("is not a consistency token issued by this service")
    return ConsistencyToken(aggregate_type, aggregate_id, version)
