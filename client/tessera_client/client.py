"""The async client: one object per process, holding a write channel and a read channel.

    async with TesseraClient(write="orders-write:50051", read="dns:///orders-read:50052",
                             token=FileToken("/var/run/secrets/tessera/token")) as tessera:
        placed = await tessera.orders.place_order(customer_id=..., items=[...])
        order = (await tessera.orders.get_order(order_id=placed.order_id)).order

Every method takes its generated request message, or that message's fields as keyword
arguments, and returns the generated reply. Failures raise `errors.TesseraError` subclasses.

Commands get an idempotency key per logical call (generated unless given) and are retried
with that same key on UNAVAILABLE, DEADLINE_EXCEEDED and ABORTED while the call's deadline
allows: the write service answers a retry of a finished command with the stored reply, so a
retry never has a second effect. Without a key (`idempotency_key=False`) a command is never
retried. Queries are retried by gRPC (the read channel's service config).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal, TypeVar

import grpc
from google.protobuf.message import Message
from opentelemetry import propagate

from tessera.catalog.v1 import catalog_command_service_pb2 as catalog_cmd
from tessera.catalog.v1 import catalog_command_service_pb2_grpc as catalog_cmd_grpc
from tessera.catalog.v1 import product_query_service_pb2 as catalog_q
from tessera.catalog.v1 import product_query_service_pb2_grpc as catalog_q_grpc
from tessera.orders.v1 import order_command_service_pb2 as orders_cmd
from tessera.orders.v1 import order_command_service_pb2_grpc as orders_cmd_grpc
from tessera.orders.v1 import order_query_service_pb2 as orders_q
from tessera.orders.v1 import order_query_service_pb2_grpc as orders_q_grpc
from tessera.orders.v1 import saga_admin_service_pb2 as sagas
from tessera.orders.v1 import saga_admin_service_pb2_grpc as sagas_grpc
from tessera.users.v1 import user_command_service_pb2 as users_cmd
from tessera.users.v1 import user_command_service_pb2_grpc as users_cmd_grpc
from tessera.users.v1 import user_query_service_pb2 as users_q
from tessera.users.v1 import user_query_service_pb2_grpc as users_q_grpc
from tessera_client import errors
from tessera_client.auth import TokenProvider, as_provider
from tessera_client.channels import ChannelOptions, read_channel, write_channel
from tessera_client.session import ConsistencySession, StalePolicy
from tessera_client.watch import resuming_watch

M = TypeVar("M", bound=Message)

COMMAND_RETRY_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 1.0

USER, PRODUCT, ORDER = "user", "product", "order"


def _request(cls: type[M], request: M | None, fields: dict[str, Any]) -> M:
    if request is not None:
        if fields:
            raise TypeError("pass either a request message or its fields, not both")
        return request
    return cls(**fields)


class _Calls:
    """What every API group shares: metadata, deadlines, retries, the session."""

    _QUERY_STUB: Any = None

    def __init__(self, client: TesseraClient) -> None:
        self._client = client
        self._q_stub: Any = None

    @property
    def _q(self) -> Any:
        """The query stub, made on first use (a commands-only client has no read channel)."""
        if self._q_stub is None:
            self._q_stub = self._QUERY_STUB(self._client.read_channel)
        return self._q_stub

    async def _metadata(self, idempotency_key: str | None = None) -> list[tuple[str, str]]:
        metadata: list[tuple[str, str]] = []
        provider = self._client._token
        if provider is not None:
            metadata.append(("authorization", f"Bearer {await provider.token()}"))
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # the caller's trace (W3C traceparent) on every call
        metadata.extend(carrier.items())
        if idempotency_key:
            metadata.append(("idempotency-key", idempotency_key))
        if self._client._correlation_id:
            metadata.append(("x-correlation-id", self._client._correlation_id))
        return metadata

    async def _command(
        self,
        method: Any,
        request: Message,
        kind: str,
        aggregate_id: Callable[[Any], str],
        *,
        timeout: float | None,
        idempotency_key: str | Literal[False] | None,
    ) -> Any:
        """Send a command; retry it with one idempotency key while the deadline allows."""
        name = method._method.decode() if hasattr(method, "_method") else type(request).__name__
        deadline = time.monotonic() + (timeout if timeout is not None else self._client.timeout)
        key = None if idempotency_key is False else (idempotency_key or str(uuid.uuid4()))
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                expired = errors.DeadlineExceeded("no time left for the command", method=name)
                expired.idempotency_key = key
                raise expired
            try:
                response = await method(
                    request,
                    timeout=remaining,
                    metadata=await self._metadata(key),
                    # After a failure, wait for the service to come back rather than fail fast.
                    wait_for_ready=attempt > 0,
                )
            except grpc.aio.AioRpcError as exc:
                retry_in = _BACKOFF_FIRST_S * (2**attempt) * (0.5 + random.random())  # noqa: S311 - jitter
                retry_in = min(retry_in, _BACKOFF_MAX_S)
                if key is None or exc.code() not in COMMAND_RETRY_CODES or deadline - time.monotonic() <= retry_in:
                    error = errors.error_from_rpc(exc, name)
                    error.idempotency_key = key
                    raise error from None
                attempt += 1
                self._client.command_retries += 1
                await asyncio.sleep(retry_in)
                continue
            session = self._client.session
            if session is not None:
                session.remember(kind, aggregate_id(response), int(response.version), response.consistency_token)
            return response

    async def _query(
        self,
        method: Any,
        request: M,
        kind: str,
        aggregate_id: str | None,
        *,
        timeout: float | None,
        consistent: bool,
    ) -> Any:
        """Send a query, with the session's token for the aggregate unless told otherwise."""
        name = method._method.decode() if hasattr(method, "_method") else type(request).__name__
        session = self._client.session if consistent else None
        sent_token = False
        if session is not None and not getattr(request, "consistency_token", ""):
            token = session.token_for(kind, aggregate_id)
            if token:
                copy = type(request)()
                copy.CopyFrom(request)
                copy.consistency_token = token  # type: ignore[attr-defined]
                request, sent_token = copy, True
        try:
            response = await method(
                request,
                timeout=timeout if timeout is not None else self._client.timeout,
                metadata=await self._metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise errors.error_from_rpc(exc, name) from None
        if sent_token and response.stale and session is not None and session.on_stale == "raise":
            raise errors.StaleRead(name, response)
        return response


class UsersAPI(_Calls):
    """tessera.users.v1: UserCommandService (write) and UserQueryService (read)."""

    _QUERY_STUB = users_q_grpc.UserQueryServiceStub

    def __init__(self, client: TesseraClient) -> None:
        super().__init__(client)
        self._cmd = users_cmd_grpc.UserCommandServiceStub(client.write_channel)

    async def register_user(
        self,
        request: users_cmd.RegisterUserRequest | None = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | Literal[False] | None = None,
        **fields: Any,
    ) -> users_cmd.RegisterUserResponse:
        """Create a user."""
        req = _request(users_cmd.RegisterUserRequest, request, fields)
        return await self._command(  # type: ignore[no-any-return]
            self._cmd.RegisterUser, req, USER, lambda r: r.user_id, timeout=timeout, idempotency_key=idempotency_key
        )

    async def update_user_profile(
        self,
        request: users_cmd.UpdateUserProfileRequest | None = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | Literal[False] | None = None,
        **fields: Any,
    ) -> users_cmd.UpdateUserProfileResponse:
        """Replace a user's profile fields."""
        req = _request(users_cmd.UpdateUserProfileRequest, request, fields)
        return await self._command(  # type: ignore[no-any-return]
            self._cmd.UpdateUserProfile,
            req,
            USER,
            lambda r: r.user_id,
            timeout=timeout,
            idempotency_key=idempotency_key,
        )

    async def deactivate_user(
        self,
        request: users_cmd.DeactivateUserRequest | None = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | Literal[False] | None = None,
        **fields: Any,
    ) -> users_cmd.DeactivateUserResponse:
        """Deactivate a user."""
        req = _request(users_cmd.DeactivateUserRequest, request, fields)
        return await self._command(  # type: ignore[no-any-return]
            self._cmd.DeactivateUser, req, USER, lambda r: r.user_id, timeout=timeout, idempotency_key=idempotency_key
        )

    async def get_user(
        self,
        request: users_q.GetUserRequest | None = None,
        *,
        timeout: float | None = None,
        consistent: bool = True,
        **fields: Any,
    ) -> users_q.GetUserResponse:
        """One user by id."""
        req = _request(users_q.GetUserRequest, request, fields)
        return await self._query(  # type: ignore[no-any-return]
            self._q.GetUser, req, USER, req.user_id, timeout=timeout, consistent=consistent
        )

    async def get_user_by_email(
        self,
        request: users_q.GetUserByEmailRequest | None = None,
        *,
        timeout: float | None = None,
        consistent: bool = True,
        **fields: Any,
    ) -> users_q.GetUserByEmailResponse:
        """One user by e-mail (carries the token of the session's latest user write)."""
        req = _request(users_q.GetUserByEmailRequest, request, fields)
        return await self._query(  # type: ignore[no-any-return]
            self._q.GetUserByEmail, req, USER, None, timeout=timeout, consistent=consistent
        )

    async def list_users(
        self,
        request: users_q.ListUsersRequest | None = None,
        *,
        timeout: float | None = None,
        consistent: bool = True,
        **fields: Any,
    ) -> users_q.ListUsersResponse:
        """One page of users."""
        req = _request(users_q.ListUsersRequest, request, fields)
        return await self._query(  # type: ignore[no-any-return]
            self._q.ListUsers, req, USER, None, timeout=timeout, consistent=consistent
        )

    def watch_user(
        self, request: users_q.WatchUserRequest | None = None, *, reconnect_within_s: float = 30.0, **fields: Any
    ) -> AsyncIterator[users_q.WatchUserResponse]:
        """The user's view now, then every newer version; resumes on another replica (see watch.py)."""
        req = _request(users_q.WatchUserRequest, request, fields)
        return resuming_watch(
            lambda metadata: self._q.WatchUser(req, metadata=metadata),
            self._metadata,
            version_of=lambda m: int(m.version),
            reconnect_within_s=reconnect_within_s,
            on_resume=self._client._count_resume,
        )


class CatalogAPI(_Calls):
    """tessera.catalog.v1: CatalogCommandService (write) and ProductQueryService (read)."""

    _QUERY_STUB = catalog_q_grpc.ProductQueryServiceStub

    def __init__(self, client: TesseraClient) -> None:
        super().__init__(client)
        self._cmd = catalog_cmd_grpc.CatalogCommandServiceStub(client.write_channel)

    async def add_product(
        self,
        request: catalog_cmd.AddProductRequest | None = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | Literal[False] | None = None,
        **fields: Any,
    ) -> catalog_cmd.AddProductResponse:
        """Add a product to the catalog."""
        req = _request(catalog_cmd.AddProductRequest, request, fields)
        return await self._command(  # type: ignore[no-any-return]
            self._cmd.AddProduct, req, PRODUCT, lambda r: r.product_id, timeout=timeout, idempotency_key=idempotency_key
        )

    async def update_product_price(
        self,
        request: catalog_cmd.UpdateProductPriceRequest | None = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | Literal[False] | None = None,
        **fields: Any,
    ) -> catalog_cmd.UpdateProductPriceResponse:
        """Change a product's price."""
        req = _request(catalog_cmd.UpdateProductPriceRequest, request, fields)
        return await self._command(  # type: ignore[no-any-return]
            self._cmd.UpdateProductPrice,
            req,
            PRODUCT,
            lambda r: r.product_id,
            timeout=timeout,
            idempotency_key=idempotency_key,
        )

    async def restock_product(
        self,
        request: catalog_cmd.RestockProductRequest | None = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | Literal[False] | None = None,
        **fields: Any,
    ) -> catalog_cmd.RestockProductResponse:
        """Add units to a product's stock."""
        req = _request(catalog_cmd.RestockProductRequest, request, fields)
        return await self._command(  # type: ignore[no-any-return]
            self._cmd.RestockProduct,
            req,
            PRODUCT,
            lambda r: r.product_id,
            timeout=timeout,
            idempotency_key=idempotency_key,
        )

    async def discontinue_product(
        self,
        request: catalog_cmd.DiscontinueProductRequest | None = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | Literal[False] | None = None,
        **fields: Any,
    ) -> catalog_cmd.DiscontinueProductResponse:
        """Discontinue a product."""
        req = _request(catalog_cmd.DiscontinueProductRequest, request, fields)
        return await self._command(  # type: ignore[no-any-return]
            self._cmd.DiscontinueProduct,
            req,
            PRODUCT,
            lambda r: r.product_id,
            timeout=timeout,
            idempotency_key=idempotency_key,
        )

    async def get_product(
        self,
        request: catalog_q.GetProductRequest | None = None,
        *,
        timeout: float | None = None,
        consistent: bool = True,
        **fields: Any,
    ) -> catalog_q.GetProductResponse:
        """One product by id."""
        req = _request(catalog_q.GetProductRequest, request, fields)
        return await self._query(  # type: ignore[no-any-return]
            self._q.GetProduct, req, PRODUCT, req.product_id, timeout=timeout, consistent=consistent
        )

    async def list_products(
        self,
        request: catalog_q.ListProductsRequest | None = None,
        *,
        timeout: float | None = None,
        consistent: bool = True,
        **fields: Any,
    ) -> catalog_q.ListProductsResponse:
        """One page of products."""
        req = _request(catalog_q.ListProductsRequest, request, fields)
        return await self._query(  # type: ignore[no-any-return]
            self._q.ListProducts, req, PRODUCT, None, timeout=timeout, consistent=consistent
        )


class OrdersAPI(_Calls):
    """tessera.orders.v1: OrderCommandService and OrderSagaAdminService (write), OrderQueryService (read)."""

    _QUERY_STUB = orders_q_grpc.OrderQueryServiceStub

    def __init__(self, client: TesseraClient) -> None:
        super().__init__(client)
        self._cmd = orders_cmd_grpc.OrderCommandServiceStub(client.write_channel)
        self._sagas = sagas_grpc.OrderSagaAdminServiceStub(client.write_channel)

    async def place_order(
        self,
        request: orders_cmd.PlaceOrderRequest | None = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | Literal[False] | None = None,
        **fields: Any,
    ) -> orders_cmd.PlaceOrderResponse:
        """Place an order (its saga runs after the reply)."""
        req = _request(orders_cmd.PlaceOrderRequest, request, fields)
        return await self._command(  # type: ignore[no-any-return]
            self._cmd.PlaceOrder, req, ORDER, lambda r: r.order_id, timeout=timeout, idempotency_key=idempotency_key
        )

    async def add_order_item(
        self,
        request: orders_cmd.AddOrderItemRequest | None = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | Literal[False] | None = None,
        **fields: Any,
    ) -> orders_cmd.AddOrderItemResponse:
        """Add units of a product to a pending order."""
        req = _request(orders_cmd.AddOrderItemRequest, request, fields)
        return await self._command(  # type: ignore[no-any-return]
            self._cmd.AddOrderItem, req, ORDER, lambda r: r.order_id, timeout=timeout, idempotency_key=idempotency_key
        )

    async def cancel_order(
        self,
        request: orders_cmd.CancelOrderRequest | None = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | Literal[False] | None = None,
        **fields: Any,
    ) -> orders_cmd.CancelOrderResponse:
        """Cancel an order that has not shipped."""
        req = _request(orders_cmd.CancelOrderRequest, request, fields)
        return await self._command(  # type: ignore[no-any-return]
            self._cmd.CancelOrder, req, ORDER, lambda r: r.order_id, timeout=timeout, idempotency_key=idempotency_key
        )

    async def ship_order(
        self,
        request: orders_cmd.ShipOrderRequest | None = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | Literal[False] | None = None,
        **fields: Any,
    ) -> orders_cmd.ShipOrderResponse:
        """Mark a confirmed order as shipped."""
        req = _request(orders_cmd.ShipOrderRequest, request, fields)
        return await self._command(  # type: ignore[no-any-return]
            self._cmd.ShipOrder, req, ORDER, lambda r: r.order_id, timeout=timeout, idempotency_key=idempotency_key
        )

    async def get_order(
        self,
        request: orders_q.GetOrderRequest | None = None,
        *,
        timeout: float | None = None,
        consistent: bool = True,
        **fields: Any,
    ) -> orders_q.GetOrderResponse:
        """One order by id."""
        req = _request(orders_q.GetOrderRequest, request, fields)
        return await self._query(  # type: ignore[no-any-return]
            self._q.GetOrder, req, ORDER, req.order_id, timeout=timeout, consistent=consistent
        )

    async def list_orders_by_customer(
        self,
        request: orders_q.ListOrdersByCustomerRequest | None = None,
        *,
        timeout: float | None = None,
        consistent: bool = True,
        **fields: Any,
    ) -> orders_q.ListOrdersByCustomerResponse:
        """One page of a customer's orders."""
        req = _request(orders_q.ListOrdersByCustomerRequest, request, fields)
        return await self._query(  # type: ignore[no-any-return]
            self._q.ListOrdersByCustomer, req, ORDER, None, timeout=timeout, consistent=consistent
        )

    async def search_orders(
        self,
        request: orders_q.SearchOrdersRequest | None = None,
        *,
        timeout: float | None = None,
        consistent: bool = True,
        **fields: Any,
    ) -> orders_q.SearchOrdersResponse:
        """One page of orders matching a search."""
        req = _request(orders_q.SearchOrdersRequest, request, fields)
        return await self._query(  # type: ignore[no-any-return]
            self._q.SearchOrders, req, ORDER, None, timeout=timeout, consistent=consistent
        )

    async def get_order_statistics(
        self,
        request: orders_q.GetOrderStatisticsRequest | None = None,
        *,
        timeout: float | None = None,
        consistent: bool = True,
        **fields: Any,
    ) -> orders_q.GetOrderStatisticsResponse:
        """Figures over a range of days, for one currency."""
        req = _request(orders_q.GetOrderStatisticsRequest, request, fields)
        return await self._query(  # type: ignore[no-any-return]
            self._q.GetOrderStatistics, req, ORDER, None, timeout=timeout, consistent=consistent
        )

    def watch_order(
        self, request: orders_q.WatchOrderRequest | None = None, *, reconnect_within_s: float = 30.0, **fields: Any
    ) -> AsyncIterator[orders_q.WatchOrderResponse]:
        """The order's view now, then every newer version; resumes on another replica (see watch.py)."""
        req = _request(orders_q.WatchOrderRequest, request, fields)
        return resuming_watch(
            lambda metadata: self._q.WatchOrder(req, metadata=metadata),
            self._metadata,
            version_of=lambda m: int(m.version),
            reconnect_within_s=reconnect_within_s,
            on_resume=self._client._count_resume,
        )

    def watch_orders_by_customer(
        self,
        request: orders_q.WatchOrdersByCustomerRequest | None = None,
        *,
        reconnect_within_s: float = 30.0,
        **fields: Any,
    ) -> AsyncIterator[orders_q.WatchOrdersByCustomerResponse]:
        """The customer's orders now, then each order that changes; resumes per order version (see watch.py)."""
        req = _request(orders_q.WatchOrdersByCustomerRequest, request, fields)
        return resuming_watch(
            lambda metadata: self._q.WatchOrdersByCustomer(req, metadata=metadata),
            self._metadata,
            version_of=None,
            reconnect_within_s=reconnect_within_s,
            on_resume=self._client._count_resume,
        )

    async def list_sagas(
        self, request: sagas.ListSagasRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> sagas.ListSagasResponse:
        """Sagas by state (scope admin)."""
        return await self._admin(self._sagas.ListSagas, _request(sagas.ListSagasRequest, request, fields), timeout)  # type: ignore[no-any-return]

    async def get_saga(
        self, request: sagas.GetSagaRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> sagas.GetSagaResponse:
        """One saga with its steps (scope admin)."""
        return await self._admin(self._sagas.GetSaga, _request(sagas.GetSagaRequest, request, fields), timeout)  # type: ignore[no-any-return]

    async def retry_saga(
        self, request: sagas.RetrySagaRequest | None = None, *, timeout: float | None = None, **fields: Any
    ) -> sagas.RetrySagaResponse:
        """Run a stuck saga again (scope admin); not retried by the client."""
        return await self._admin(self._sagas.RetrySaga, _request(sagas.RetrySagaRequest, request, fields), timeout)  # type: ignore[no-any-return]

    async def _admin(self, method: Any, request: Message, timeout: float | None) -> Any:
        try:
            return await method(
                request,
                timeout=timeout if timeout is not None else self._client.timeout,
                metadata=await self._metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise errors.error_from_rpc(exc, type(request).__name__) from None


class TesseraClient:
    """The async client. Open it in the running loop (`async with`), share it, close it once.

    `write` is the write service's address; `read` the replicas' (`dns:///name:port`, or a
    list of ip:port). `token` is a string, a TokenProvider or a function. `timeout` is the
    default deadline of a call in seconds, retries included. The client keeps one
    ConsistencySession (`session=False` for none); `new_session()` makes a client sharing
    the channels with a fresh session, e.g. one per incoming request.
    """

    def __init__(
        self,
        write: str,
        read: str | Sequence[str] | None,
        *,
        token: str | TokenProvider | Callable[[], str] | None = None,
        options: ChannelOptions | None = None,
        timeout: float = 10.0,
        session: ConsistencySession | bool = True,
        on_stale: StalePolicy = "raise",
        correlation_id: str | None = None,
        _channels: tuple[grpc.aio.Channel, grpc.aio.Channel | None] | None = None,
    ) -> None:
        self._options = options or ChannelOptions()
        self._owns_channels = _channels is None
        if _channels is None:
            reads = read_channel(read, self._options) if read is not None else None
            _channels = (write_channel(write, self._options), reads)
        self.write_channel, self._read_channel = _channels
        self._write_target, self._read_target = write, read
        self._token = as_provider(token)
        self.timeout = timeout
        self._correlation_id = correlation_id
        if session is True:
            session = ConsistencySession(on_stale=on_stale)
        self.session: ConsistencySession | None = session or None
        self.command_retries = 0
        self.watch_resumes = 0
        self.users = UsersAPI(self)
        self.catalog = CatalogAPI(self)
        self.orders = OrdersAPI(self)

    def new_session(self, *, on_stale: StalePolicy = "raise", correlation_id: str | None = None) -> TesseraClient:
        """A client over the same channels and token with its own, empty consistency session."""
        return TesseraClient(
            self._write_target,
            self._read_target,
            token=self._token,
            options=self._options,
            timeout=self.timeout,
            session=ConsistencySession(on_stale=on_stale),
            correlation_id=correlation_id,
            _channels=(self.write_channel, self._read_channel),
        )

    @property
    def read_channel(self) -> grpc.aio.Channel:
        """The channel to the read replicas; a client made with `read=None` has none (commands only)."""
        if self._read_channel is None:
            raise ValueError("this client was made without read replicas (read=None): it sends commands only")
        return self._read_channel

    def _count_resume(self) -> None:
        self.watch_resumes += 1

    async def close(self) -> None:
        """Close the channels (a session made by new_session leaves them to its parent)."""
        if self._owns_channels:
            await self.write_channel.close()
            if self._read_channel is not None:
                await self._read_channel.close()

    async def __aenter__(self) -> TesseraClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
