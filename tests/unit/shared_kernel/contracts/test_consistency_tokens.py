"""Consistency tokens: encode/decode round trip and rejection of anything not issued here."""

from __future__ import annotations

import base64

import pytest

from shared_kernel.contracts import errors
from shared_kernel.contracts.consistency import FIELD, ConsistencyToken, decode_token, encode_token

USER_ID = "6f1c1a52-2f0e-4f57-9a43-0d4b1a9b7c11"


def test_round_trip() -> None:
    token = encode_token("user", USER_ID, 7)
    assert decode_token(token) == ConsistencyToken("user", USER_ID, 7)
    assert "=" not in token and USER_ID not in token


def _raw(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",
        "%%%%",
        _raw("v2|user|x|1"),
        _raw("v1|user|x"),
        _raw("v1|user|x|0"),
        _raw("v1|user|x|-1"),
        _raw("v1|user|x|01"),
        _raw("v1||x|1"),
        _raw("v1|user||1"),
        _raw("v1|user|x|1|extra"),
        _raw("v1|user|x|99999999999999999999"),
        encode_token("user", USER_ID, 3) + "==",
        encode_token("user", USER_ID, 3)[:-2],
        "é" * 10,
        "A" * 600,
    ],
)
def test_garbage_is_invalid_argument_naming_the_field(token: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        decode_token(token)
    assert [v.field for v in caught.value.violations] == [FIELD]


def test_tampered_token_is_refused_or_decodes_to_something_else() -> None:
    token = encode_token("user", USER_ID, 3)
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    try:
        decoded = decode_token(flipped)
    except errors.InvalidArgument:
        return
    assert decoded != ConsistencyToken("user", USER_ID, 3)


@pytest.mark.parametrize("version", [0, -1])
def test_encoding_refuses_a_version_below_one(version: int) -> None:
    with pytest.raises(ValueError, match="version"):
        encode_token("user", USER_ID, version)
