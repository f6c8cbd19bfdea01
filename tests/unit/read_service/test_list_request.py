"""ListUsers and GetUserByEmail request validation, without a server."""

from __future__ import annotations

from typing import Any

import pytest

from read_service.entrypoints.grpc_server import (
    PageLimits,
    email_from_request,
    list_query_from_request,
)
from read_service.keys import SortField, Subset
from read_service.page_tokens import PageTokenCodec
from read_service.views.users import ListUsersQuery
from shared_kernel.contracts.errors import InvalidArgument
from tessera.users.v1 import user_query_service_pb2 as pb

LIMITS = PageLimits(default=20, maximum=100)
TOKENS = PageTokenCodec(b"unit-test-secret-0123456789")


def parse(**fields: Any) -> ListUsersQuery:
    return list_query_from_request(pb.ListUsersRequest(**fields), LIMITS, TOKENS)


def fields_of(error: InvalidArgument) -> set[str]:
    return {v.field for v in error.violations}


def test_defaults():
    query = parse()
    assert query.page_size == 20
    assert query.sort is SortField.CREATED_AT
    assert query.descending is False
    assert query.subset is Subset.ALL
    assert query.search == ""
    assert query.cursor is None


def test_explicit_choices():
    query = parse(
        page_size=100,
        sort_by=pb.USER_SORT_FIELD_USERNAME,
        sort_direction=pb.SORT_DIRECTION_DESC,
        active=pb.ACTIVE_FILTER_INACTIVE,
        search="ÅDA",
    )
    assert (query.page_size, query.sort, query.descending, query.subset) == (
        100,
        SortField.USERNAME,
        True,
        Subset.INACTIVE,
    )
    assert query.search == "åda"


@pytest.mark.parametrize("size", [-1, 101, 2**31 - 1, -(2**31)])
def test_page_size_out_of_range(size):
    with pytest.raises(InvalidArgument) as caught:
        parse(page_size=size)
    assert fields_of(caught.value) == {"page_size"}


@pytest.mark.parametrize("field", ["sort_by", "sort_direction", "active"])
def test_unknown_enum_values(field):
    with pytest.raises(InvalidArgument) as caught:
        parse(**{field: 42})
    assert fields_of(caught.value) == {field}


@pytest.mark.parametrize("search", ["x" * 101, "a\nb", "tab\there", "\x00"])
def test_bad_search(search):
    with pytest.raises(InvalidArgument) as caught:
        parse(search=search)
    assert fields_of(caught.value) == {"search"}


def test_every_bad_field_is_reported_at_once():
    with pytest.raises(InvalidArgument) as caught:
        parse(page_size=-5, sort_by=9, search="x" * 200)
    assert fields_of(caught.value) == {"page_size", "sort_by", "search"}


def test_token_is_bound_to_the_normalized_query():
    first = parse(search="Ada")
    token = TOKENS.issue(first.binding(), b"cursor")
    # Unspecified enums mean their defaults, and search is case-insensitive: same query.
    again = parse(search="ADA", sort_by=pb.USER_SORT_FIELD_CREATED_AT, page_token=token, page_size=5)
    assert again.cursor == b"cursor"
    assert again.page_size == 5


@pytest.mark.parametrize(
    "change",
    [
        {"search": "bob"},
        {"sort_by": pb.USER_SORT_FIELD_EMAIL},
        {"sort_direction": pb.SORT_DIRECTION_DESC},
        {"active": pb.ACTIVE_FILTER_ACTIVE},
    ],
)
def test_token_for_another_query_is_refused(change):
    token = TOKENS.issue(parse(search="ada").binding(), b"cursor")
    with pytest.raises(InvalidArgument) as caught:
        parse(**{"search": "ada", **change, "page_token": token})
    assert fields_of(caught.value) == {"page_token"}


def test_forged_token_is_refused():
    with pytest.raises(InvalidArgument) as caught:
        parse(page_token="Zm9yZ2VkLXRva2Vu")
    assert fields_of(caught.value) == {"page_token"}


@pytest.mark.parametrize("email", ["", "a" * 321, "a\r\n@b.c", "\u2028@x"])
def test_bad_emails(email):
    with pytest.raises(InvalidArgument) as caught:
        email_from_request(email)
    assert fields_of(caught.value) == {"email"}


def test_good_email_passes_through():
    assert email_from_request("Ada@Example.com") == "Ada@Example.com"
