"""The gRPC face of the read service: request validation, then a call into the views.

Errors are raised as shared_kernel.errors types (or left as driver errors) and turned
into statuses by the server's ErrorMappingInterceptor; nothing here picks a status code.

Every query reads Redis within a budget: the caller's remaining deadline, capped by
QUERY_TIMEOUT_S (see `within_budget`). The query path makes no Postgres call; only the
projector's catch-up reads Postgres.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from read_service.consistency import DEFAULT_MAX_WAIT_MS, STALE_HEADER, ConsistencyGate, user_token
from read_service.keys import SortField, Subset
from read_service.page_tokens import InvalidPageToken, PageTokenCodec
from read_service.views.users import ListUsersQuery, UserViews
from shared_kernel import errors
from shared_kernel.consistency import ConsistencyToken
from shared_kernel.validation import email_violation, has_control_chars, parse_uuid
from tessera.users.v1 import user_query_service_pb2 as pb
from tessera.users.v1 import user_query_service_pb2_grpc as pb_grpc

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["UserQueryService"].full_name

MAX_SEARCH_CHARS = 100
# The most a query waits for Redis when the caller's deadline allows more (QUERY_TIMEOUT_S).
DEFAULT_QUERY_TIMEOUT_S = 5.0
# Upper bound of the head start taken on the caller's deadline (see _deadline_margin).
DEADLINE_MARGIN_S = 0.05

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
    """Validate the e-mail address of a lookup (as the write side validates one); raises InvalidArgument.

    Something that could never have been registered is the caller's mistake, so it is
    refused here instead of being looked up.
    """
    violation = email_violation("email", email)
    if violation is not None:
        raise errors.InvalidArgument([violation])
    return email


def _deadline_margin(remaining: float) -> float:
    # Give up a little before the caller's deadline, so that the caller receives this
    # service's DEADLINE_EXCEEDED and its reason instead of its own timer's bare one.
    return min(DEADLINE_MARGIN_S, remaining / 10)


async def within_budget(
    context: grpc.aio.ServicerContext[Any, Any], work: Callable[[], Awaitable[T]], server_max_s: float
) -> T:
    """Run `work` within the caller's remaining deadline and at most `server_max_s` seconds.

    When the caller's deadline is the tighter bound and runs out: DeadlineExceeded (its own
    choice, retrying the same call will not help). When the server's maximum runs out first:
    Unavailable, because the read model did not answer in time and another replica may.
    """
    remaining = context.time_remaining()
    caller_bound = remaining is not None and math.isfinite(remaining) and remaining < server_max_s
    budget = server_max_s
    if caller_bound:
        assert remaining is not None
        budget = remaining - _deadline_margin(remaining)
        if budget <= 0:
            # Not worth starting: the answer could not reach the caller in time.
            raise errors.DeadlineExceeded("the caller's deadline passed before the query started")
    timer = asyncio.timeout(budget)
    try:
        async with timer:
            return await work()
    except TimeoutError as exc:
        if not timer.expired():
            raise  # a driver's own timeout, not ours: mapped like any other driver error
        if caller_bound:
            raise errors.DeadlineExceeded(
                "the caller's deadline passed while the read model (Redis) was being queried"
            ) from exc
        raise errors.Unavailable(
            f"the read model (Redis) did not answer within {server_max_s:g} s; retry, possibly on another replica"
        ) from exc


class UserQueryServicer(pb_grpc.UserQueryServiceServicer):
    """Serves UserQueryService from the users views."""

    def __init__(
        self,
        views: UserViews,
        tokens: PageTokenCodec,
        is_ready: Callable[[], bool],
        limits: PageLimits | None = None,
        query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S,
        *,
        gate: ConsistencyGate | None = None,
        checkpoint: Callable[[], Awaitable[int]] | None = None,
        max_wait_ms: int = DEFAULT_MAX_WAIT_MS,
    ) -> None:
        if query_timeout_s <= 0:
            raise ValueError("query_timeout_s must be positive")
        self._views = views
        self._tokens = tokens
        self._is_ready = is_ready
        self._limits = limits or PageLimits()
        self._query_timeout_s = query_timeout_s
        self._gate = gate
        self._checkpoint = checkpoint
        self._max_wait_s = max_wait_ms / 1000

    def _require_ready(self) -> None:
        # Before the first catch-up the views may be empty or partial: an empty answer would
        # be presented as fact, so refuse instead and let the caller retry another replica.
        if not self._is_ready():
            raise errors.Unavailable("the read model is catching up with the event log; retry shortly")

    async def _reflect(
        self, token: ConsistencyToken | None, max_wait_ms: int, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[bool, int]:
        """Wait for the request's consistency token; return (stale, view position) for the reply."""
        stale = False
        if token is not None:
            stale = not await self._wait_for(token, max_wait_ms, context)
            if stale:
                await context.send_initial_metadata(((STALE_HEADER, "true"),))
        return stale, await self._view_position(context)

    async def _view_position(self, context: grpc.aio.ServicerContext[Any, Any]) -> int:
        # Read from Redis before the query's own read: the checkpoint only moves forward, so the
        # answer reflects at least this position, whichever replica's projector wrote it.
        read = self._checkpoint
        if read is None:
            return 0
        return await within_budget(context, read, self._query_timeout_s)

    async def _wait_for(
        self, token: ConsistencyToken, max_wait_ms: int, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bool:
        if self._gate is None:
            # Without a projector to wait on, the view cannot be shown to reflect anything.
            return False
        budget = self._max_wait_s if max_wait_ms == 0 else min(max_wait_ms / 1000, self._max_wait_s)
        remaining = context.time_remaining()
        if remaining is not None and math.isfinite(remaining):
            # Leave time for the read that follows the wait and for the answer to travel.
            budget = min(budget, remaining - 2 * _deadline_margin(remaining))
        return await self._gate.wait(token, max(budget, 0.0))

    async def GetUser(
        self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetUserResponse:
        """One user by id."""
        user_id = str(parse_uuid("user_id", request.user_id))
        token = user_token(request.consistency_token)
        self._require_ready()
        stale, position = await self._reflect(token, request.max_wait_ms, context)
        view = await within_budget(context, lambda: self._views.get(user_id), self._query_timeout_s)
        if view is None:
            raise errors.NotFound(f"user {user_id} not found")
        return pb.GetUserResponse(user=view, stale=stale, view_position=position)

    async def GetUserByEmail(
        self, request: pb.GetUserByEmailRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetUserByEmailResponse:
        """One user by e-mail address, case-insensitively."""
        email = email_from_request(request.email)
        token = user_token(request.consistency_token)
        self._require_ready()
        stale, position = await self._reflect(token, request.max_wait_ms, context)
        view = await within_budget(context, lambda: self._views.get_by_email(email), self._query_timeout_s)
        if view is None:
            raise errors.NotFound("no user has this e-mail address")
        return pb.GetUserByEmailResponse(user=view, stale=stale, view_position=position)

    async def ListUsers(
        self, request: pb.ListUsersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListUsersResponse:
        """One page of users."""
        query = list_query_from_request(request, self._limits, self._tokens)
        consistency = user_token(request.consistency_token)
        self._require_ready()
        stale, position = await self._reflect(consistency, request.max_wait_ms, context)
        page = await within_budget(context, lambda: self._views.list_page(query), self._query_timeout_s)
        token = "" if page.next_cursor is None else self._tokens.issue(query.binding(), page.next_cursor)
        return pb.ListUsersResponse(users=page.users, next_page_token=token, stale=stale, view_position=position)
