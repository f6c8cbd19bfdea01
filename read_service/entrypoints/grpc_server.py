"""The gRPC face of the read service: request validation, then a call into the views.

Errors are raised as shared_kernel.errors types (or left as driver errors) and turned
into statuses by the server's ErrorMappingInterceptor; nothing here picks a status code.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from read_service.keys import SortField, Subset
from read_service.page_tokens import InvalidPageToken, PageTokenCodec
from read_service.views.users import ListUsersQuery, UserViews
from shared_kernel import errors
from shared_kernel.validation import has_control_chars, parse_uuid
from tessera.users.v1 import user_query_service_pb2 as pb
from tessera.users.v1 import user_query_service_pb2_grpc as pb_grpc

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["UserQueryService"].full_name

MAX_EMAIL_CHARS = 320
MAX_SEARCH_CHARS = 100

_SORTS = {
    pb.USER_SORT_FIELD_UNSPECIFIED: SortField.CREATED_AT,
    pb.USER_SORT_FIELD_CREATED_AT: SortField.CREATED_AT,
    pb.USER_SORT_FIELD_EMAIL: SortField.EMAIL,
    pb.USER_SORT_FIELD_USERNAME: SortField.USERNAME,
}
_DIRECTIONS = {
    pb.SORT_DIRECTION_UNSPECIFIED: False,
    pb.SORT_DIRECTION_ASC: False,
    pb.SORT_DIRECTION_DESC: True,
}
_SUBSETS = {
    pb.ACTIVE_FILTER_UNSPECIFIED: Subset.ALL,
    pb.ACTIVE_FILTER_ACTIVE: Subset.ACTIVE,
    pb.ACTIVE_FILTER_INACTIVE: Subset.INACTIVE,
}

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PageLimits:
    """How large a ListUsers page may be."""

    default: int = 20
    maximum: int = 100


def _enum_violation(field: str, names: list[str]) -> errors.FieldViolation:
    return errors.FieldViolation(field, "must be one of " + ", ".join(names))


def list_query_from_request(request: pb.ListUsersRequest, limits: PageLimits, tokens: PageTokenCodec) -> ListUsersQuery:
    """Validate a ListUsersRequest into a query; raises InvalidArgument listing every bad field."""
    violations: list[errors.FieldViolation] = []
    page_size = request.page_size
    if page_size < 0:
        violations.append(errors.FieldViolation("page_size", "must not be negative"))
    elif page_size > limits.maximum:
        violations.append(errors.FieldViolation("page_size", f"must be at most {limits.maximum}"))
    sort = _SORTS.get(request.sort_by)
    if sort is None:
        violations.append(_enum_violation("sort_by", list(pb.UserSortField.keys())[1:]))
    descending = _DIRECTIONS.get(request.sort_direction)
    if descending is None:
        violations.append(_enum_violation("sort_direction", list(pb.SortDirection.keys())[1:]))
    subset = _SUBSETS.get(request.active)
    if subset is None:
        violations.append(_enum_violation("active", list(pb.ActiveFilter.keys())[1:]))
    if len(request.search) > MAX_SEARCH_CHARS:
        violations.append(errors.FieldViolation("search", f"must be at most {MAX_SEARCH_CHARS} characters"))
    elif has_control_chars(request.search):
        violations.append(errors.FieldViolation("search", "must not contain control characters"))
    if violations:
        raise errors.InvalidArgument(violations)
    assert sort is not None and descending is not None and subset is not None
    query = ListUsersQuery(
        page_size=page_size or limits.default,
        sort=sort,
        descending=descending,
        subset=subset,
        search=request.search.casefold(),
    )
    if not request.page_token:
        return query
    try:
        cursor = tokens.open(request.page_token, query.binding())
    except InvalidPageToken as exc:
        raise errors.InvalidArgument.single("page_token", str(exc)) from exc
    return ListUsersQuery(
        page_size=query.page_size,
        sort=query.sort,
        descending=query.descending,
        subset=query.subset,
        search=query.search,
        cursor=cursor,
    )


def email_from_request(email: str) -> str:
    """Validate the e-mail address of a lookup; raises InvalidArgument."""
    if not email:
        raise errors.InvalidArgument.single("email", "is required")
    if len(email) > MAX_EMAIL_CHARS:
        raise errors.InvalidArgument.single("email", f"must be at most {MAX_EMAIL_CHARS} characters")
    if has_control_chars(email):
        raise errors.InvalidArgument.single("email", "must not contain control characters")
    return email


async def _within_deadline(context: grpc.aio.ServicerContext[Any, Any], work: Awaitable[T]) -> T:
    """Run `work`, giving up when the caller's deadline passes (a timeout maps to UNAVAILABLE)."""
    remaining = context.time_remaining()
    # Without a deadline grpc reports an effectively infinite time; the Redis socket timeout
    # still bounds each call then.
    if remaining is None or not math.isfinite(remaining) or remaining > 86_400:
        return await work
    async with asyncio.timeout(remaining):
        return await work


class UserQueryServicer(pb_grpc.UserQueryServiceServicer):
    """Serves UserQueryService from the users views."""

    def __init__(
        self,
        views: UserViews,
        tokens: PageTokenCodec,
        is_ready: Callable[[], bool],
        limits: PageLimits | None = None,
    ) -> None:
        self._views = views
        self._tokens = tokens
        self._is_ready = is_ready
        self._limits = limits or PageLimits()

    def _require_ready(self) -> None:
        # Before the first catch-up the views may be empty or partial: an empty answer would
        # be presented as fact, so refuse instead and let the caller retry another replica.
        if not self._is_ready():
            raise errors.Unavailable("the read model is catching up with the event log; retry shortly")

    async def GetUser(
        self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetUserResponse:
        """One user by id."""
        user_id = str(parse_uuid("user_id", request.user_id))
        self._require_ready()
        view = await _within_deadline(context, self._views.get(user_id))
        if view is None:
            raise errors.NotFound(f"user {user_id} not found")
        return pb.GetUserResponse(user=view)

    async def GetUserByEmail(
        self, request: pb.GetUserByEmailRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetUserByEmailResponse:
        """One user by e-mail address, case-insensitively."""
        email = email_from_request(request.email)
        self._require_ready()
        view = await _within_deadline(context, self._views.get_by_email(email))
        if view is None:
            raise errors.NotFound("no user has this e-mail address")
        return pb.GetUserByEmailResponse(user=view)

    async def ListUsers(
        self, request: pb.ListUsersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListUsersResponse:
        """One page of users."""
        query = list_query_from_request(request, self._limits, self._tokens)
        self._require_ready()
        page = await _within_deadline(context, self._views.list_page(query))
        token = "" if page.next_cursor is None else self._tokens.issue(query.binding(), page.next_cursor)
        return pb.ListUsersResponse(users=page.users, next_page_token=token)
