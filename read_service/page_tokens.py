"""Opaque, signed page tokens: a keyset cursor that callers can hold but neither read nor forge.

A token is base64url (unpadded) of `version (1 byte) | binding (8 bytes) | cursor` followed
by an HMAC-SHA256 tag over those bytes. The binding is a digest of the query the token was
issued for (filter, search, sort), so a token replayed with another query is refused. The
cursor is the last sort key seen, opaque to everyone but the view that issued it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re

_VERSION = 1
_BINDING_BYTES = 8
_TAG_BYTES = 32
# Well above any real cursor (a sort key of at most a few hundred bytes plus an id).
MAX_TOKEN_CHARS = 2048
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]*$")


class InvalidPageToken(Exception):
    """The token is malformed, forged, tampered with, or was issued for another query."""


def _binding_digest(binding: bytes) -> bytes:
    return hashlib.sha256(binding).digest()[:_BINDING_BYTES]


class PageTokenCodec:
    """Issues and opens page tokens with one secret key."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the page token secret must be at least 16 bytes")
        self._secret = secret

    def _tag(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()

    def issue(self, binding: bytes, cursor: bytes) -> str:
        """A token carrying `cursor`, valid only for the query described by `binding`."""
        payload = bytes([_VERSION]) + _binding_digest(binding) + cursor
        return base64.urlsafe_b64encode(payload + self._tag(payload)).rstrip(b"=").decode("ascii")

    def open(self, token: str, binding: bytes) -> bytes:
        """The cursor inside `token`; raises InvalidPageToken unless it is genuine and bound to `binding`."""
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidPageToken("is too long")
        if not _BASE64URL.match(token):
            raise InvalidPageToken("is not a page token issued by this service")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError) as exc:
            raise InvalidPageToken("is not a page token issued by this service") from exc
        # The last character of unpadded base64 may carry unused bits; accept only the one
        # spelling we issue, so that every altered character is refused.
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != token:
            raise InvalidPageToken("is not a page token issued by this service")
        if len(raw) < 1 + _BINDING_BYTES + _TAG_BYTES:
            raise InvalidPageToken("is not a page token issued by this service")
        payload, tag = raw[:-_TAG_BYTES], raw[-_TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(payload)):
            raise InvalidPageToken("is not a page token issued by this service")
        if payload[0] != _VERSION:
            raise InvalidPageToken("has an unsupported version")
        if not hmac.compare_digest(payload[1 : 1 + _BINDING_BYTES], _binding_digest(binding)):
            raise InvalidPageToken("was issued for a different filter, search or sort")
        return payload[1 + _BINDING_BYTES :]
