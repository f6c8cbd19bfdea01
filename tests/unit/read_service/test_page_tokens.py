"""Page tokens: issued, opened, and refused when forged, tampered with or replayed elsewhere."""

from __future__ import annotations

import base64

import pytest

from read_service.page_tokens import MAX_TOKEN_CHARS, InvalidPageToken, PageTokenCodec

SECRET = b"unit-test-secret-0123456789"
BINDING = b"users.list|email|asc|all|"
CURSOR = b"ada@example.com\x00123e4567-e89b-12d3-a456-426614174000"


@pytest.fixture
def codec() -> PageTokenCodec:
    return PageTokenCodec(SECRET)


def test_round_trip(codec):
    token = codec.issue(BINDING, CURSOR)
    assert codec.open(token, BINDING) == CURSOR


def test_token_is_url_safe_and_unpadded(codec):
    token = codec.issue(BINDING, CURSOR)
    assert "=" not in token
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_cursor_is_not_readable_in_plain_text(codec):
    assert b"ada@example.com" not in codec.issue(BINDING, CURSOR).encode()


def test_every_flipped_byte_is_refused(codec):
    raw = bytearray(base64.urlsafe_b64decode(codec.issue(BINDING, CURSOR) + "=="))
    for index in range(len(raw)):
        tampered = bytearray(raw)
        tampered[index] ^= 0x01
        token = base64.urlsafe_b64encode(bytes(tampered)).rstrip(b"=").decode()
        with pytest.raises(InvalidPageToken):
            codec.open(token, BINDING)


def test_a_token_signed_with_another_key_is_refused(codec):
    forged = PageTokenCodec(b"another-secret-of-enough-length").issue(BINDING, CURSOR)
    with pytest.raises(InvalidPageToken, match="not a page token"):
        codec.open(forged, BINDING)


def test_a_token_for_another_query_is_refused(codec):
    token = codec.issue(BINDING, CURSOR)
    with pytest.raises(InvalidPageToken, match="different filter"):
        codec.open(token, b"users.list|email|desc|all|")


def test_every_altered_character_is_refused(codec):
    token = codec.issue(BINDING, CURSOR)
    for index, char in enumerate(token):
        for replacement in "AQgw_-9":
            if replacement != char:
                with pytest.raises(InvalidPageToken):
                    codec.open(token[:index] + replacement + token[index + 1 :], BINDING)


def test_truncated_token_is_refused(codec):
    token = codec.issue(BINDING, CURSOR)
    with pytest.raises(InvalidPageToken):
        codec.open(token[:-4], BINDING)


@pytest.mark.parametrize("token", ["", "a", "abc", "not a token", "AAAA====", "é", "a" * 30, "+/+/"])
def test_garbage_is_refused(codec, token):
    with pytest.raises(InvalidPageToken):
        codec.open(token, BINDING)


def test_overlong_token_is_refused_before_decoding(codec):
    with pytest.raises(InvalidPageToken, match="too long"):
        codec.open("A" * (MAX_TOKEN_CHARS + 1), BINDING)


def test_short_secrets_are_rejected():
    with pytest.raises(ValueError):
        PageTokenCodec(b"short")
