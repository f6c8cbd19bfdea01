"""The gRPC face of the read service: request validation, then a call into the views.

Errors are raised as shared_kernel.contracts.errors types (or left as driver errors) and turned
into statuses by the server's ErrorMappingInterceptor; nothing here picks a status code.

Readiness, consistency tokens, view positions and query budgets are the shared freshness
contract of read_service.entrypoints.freshness. The query path makes no Postgres call
(only a consistency-token wait may ask the event log); the projector's catch-up reads it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from read_service.consistency import DEFAULT_MAX_WAIT_MS, USER_AGGREGATE, ConsistencyGate, token_for
from read_service.entrypoints.answers import SingleViewQuery, answer_page, watch_one
from read_service.entrypoints.freshness import DEFAULT_QUERY_TIMEOUT_S, Freshness
from read_service.entrypoints.requests import PageLimits
from read_service.keys import SortField, Subset
from read_service.page_tokens import InvalidPageToken, PageTokenCodec
from read_service.views.users import ListUsersQuery, UserViews
from read_service.views.wire import reply_tail
from read_service.watch import Change
from shared_kernel.contracts import errors
from shared_kernel.contracts.validation import email_violation, has_control_chars
from shared_kernel.platform.grpc_server import add_preserialized
from tessera.users.v1 import user_query_service_pb2 as pb
from tessera.users.v1 import user_query_service_pb2_grpc as pb_grpc

__all__ = [
    "BYTES_METHODS",
    "MAX_SEARCH_CHARS",
    "SERVICE_NAME",
    "PageLimits",
    "UserQueryServicer",
    "email_from_request",
    "list_query_from_request",
    "register_user_queries",
]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["UserQueryService"].full_name

MAX_SEARCH_CHARS = 100
# Methods that answer serialized replies (registered with shared_kernel.platform.grpc_server.add_preserialized).
BYTES_METHODS = ("GetUser", "GetUserByEmail")

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
        watch: Callable[[str, int | None], AsyncIterator[Change]] | None = None,
    ) -> None:
        self._views = views
        self._watch = watch
        self._tokens = tokens
        self._limits = limits or PageLimits()
        self._freshness = Freshness(
            is_ready, query_timeout_s, gate=gate, checkpoint=checkpoint, max_wait_ms=max_wait_ms
        )
        self._user = SingleViewQuery(
            views, self._freshness, aggregate_type=USER_AGGREGATE, id_field="user_id", parse=pb.UserView.FromString
        )

    async def GetUser(self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:  # type: ignore[override]  # bytes: see BYTES_METHODS
        """One user by id: a serialized GetUserResponse (see read_service.views.wire)."""
        return await self._user.answer(request.user_id, request.consistency_token, request.max_wait_ms, context)

    async def GetUserByEmail(  # type: ignore[override]  # bytes: see BYTES_METHODS
        self, request: pb.GetUserByEmailRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """One user by e-mail address, case-insensitively: a serialized GetUserByEmailResponse."""
        email = email_from_request(request.email)
        token = token_for(USER_AGGREGATE, request.consistency_token)
        field, stale, position = await self._freshness.answer_at(
            context, token, request.max_wait_ms, lambda at: self._views.field_by_email(email, at)
        )
        if field is None:
            raise errors.NotFound("no user has this e-mail address")
        return field + reply_tail(stale, position)

    async def ListUsers(
        self, request: pb.ListUsersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListUsersResponse:
        """One page of users."""
        query = list_query_from_request(request, self._limits, self._tokens)
        page, token, stale, position = await answer_page(
            self._freshness, self._tokens, context, aggregate_type=USER_AGGREGATE,
            consistency_token=request.consistency_token, max_wait_ms=request.max_wait_ms, query=query,
            read=lambda at: self._views.list_page(query, at),
        )  # fmt: skip
        return pb.ListUsersResponse(users=page.users, next_page_token=token, stale=stale, view_position=position)

    async def WatchUser(
        self, request: pb.WatchUserRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchUserResponse]:
        """The user's view now (or that it does not exist yet), then each change (read_service.watch).

        With `after_position`, each change after it instead of the view now.
        """
        async for reply in watch_one(self._freshness, self._watch, request, "user_id", _watch_reply):
            yield reply


def _watch_reply(value: bytes | None, position: int) -> pb.WatchUserResponse:
    if value is None:
        return pb.WatchUserResponse(exists=False, view_position=position)
    view = pb.UserView.FromString(value)
    return pb.WatchUserResponse(user=view, exists=True, version=view.version, view_position=position)


# How the servicer is added to a server: the generated registration, with BYTES_METHODS answering bytes.
register_user_queries = add_preserialized(pb_grpc.add_UserQueryServiceServicer_to_server, BYTES_METHODS)
