"""Replies written as bytes parse exactly as the messages a serializer would have built."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from read_service.views.wire import reply_tail, varint, view_bytes, view_field
from tessera.common.v1.money_pb2 import Money
from tessera.users.v1 import user_query_service_pb2 as pb


def _view(**extra: object) -> pb.UserView:
    at = Timestamp(seconds=1_790_000_000, nanos=5)
    return pb.UserView(
        user_id="2f0c4b1e-7a5d-4c61-9a0e-3d8f6b2a9c17",
        email="ada@example.com",
        username="ada",
        full_name="Ada " + "L" * 200,  # a view longer than 127 bytes: a two-byte length
        active=True,
        version=7,
        created_at=at,
        updated_at=at,
        **extra,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("value", [1, 127, 128, 300, 16_383, 16_384, 2**35 + 3, 2**63])
def test_varints_match_protobuf(value: int) -> None:
    encoded = pb.GetUserResponse(view_position=value).SerializeToString()
    assert encoded == b"\x18" + varint(value)


@pytest.mark.parametrize(("stale", "position"), [(False, 0), (True, 0), (False, 1), (True, 48_213), (False, 2**40)])
def test_a_reply_of_bytes_is_the_message_a_serializer_builds(stale: bool, position: int) -> None:
    view = _view()
    written = view_field(view.SerializeToString()) + reply_tail(stale, position)
    expected = pb.GetUserResponse(user=view, stale=stale, view_position=position)
    assert written == expected.SerializeToString()
    assert pb.GetUserResponse.FromString(written) == expected
    # The other single-view replies share the layout.
    assert pb.GetUserByEmailResponse.FromString(written) == pb.GetUserByEmailResponse(
        user=view, stale=stale, view_position=position
    )


def test_appended_spending_is_what_merging_it_into_the_view_gives() -> None:
    stored = _view().SerializeToString()
    spending = [Money(currency_code="EUR", amount_minor=1250), Money(currency_code="USD", amount_minor=3)]
    field = view_field(stored + pb.UserView(total_spent=spending).SerializeToString())
    assert pb.UserView.FromString(view_bytes(field)) == _view(total_spent=spending)


def test_view_bytes_undoes_view_field() -> None:
    for raw in (b"", b"x", bytes(range(256)) * 70):
        assert view_bytes(view_field(raw)) == raw


def test_negative_varints_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        varint(-1)


def test_zero_is_one_byte() -> None:
    assert varint(0) == b"\x00"
