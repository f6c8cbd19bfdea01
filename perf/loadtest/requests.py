"""What the load generator sends: query kinds over seeded ids, and write commands with unique contents.

Queries are serialized once and sent as raw bytes, so a read process spends its time on calls
rather than on protobuf (docs/load-testing.md says why reads stay raw). Commands are built per
call (each must be unique) as typed requests and sent through the client library, which gives
each its idempotency key and retries it under that key.
"""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import Message

from tessera.catalog.v1 import catalog_command_service_pb2 as catalog_commands
from tessera.catalog.v1 import product_query_service_pb2 as product_queries
from tessera.common.v1 import money_pb2
from tessera.orders.v1 import order_query_service_pb2 as order_queries
from tessera.users.v1 import user_command_service_pb2 as user_commands
from tessera.users.v1 import user_query_service_pb2 as user_queries
from tessera_client import TesseraClient

GET_USER = "/tessera.users.v1.UserQueryService/GetUser"
GET_PRODUCT = "/tessera.catalog.v1.ProductQueryService/GetProduct"
GET_ORDER = "/tessera.orders.v1.OrderQueryService/GetOrder"
LIST_ORDERS_BY_CUSTOMER = "/tessera.orders.v1.OrderQueryService/ListOrdersByCustomer"
REGISTER_USER = "/tessera.users.v1.UserCommandService/RegisterUser"
ADD_PRODUCT = "/tessera.catalog.v1.CatalogCommandService/AddProduct"
RESTOCK_PRODUCT = "/tessera.catalog.v1.CatalogCommandService/RestockProduct"

# The query kinds of `read` with the gRPC method each calls.
READ_METHODS: dict[str, str] = {
    "get_user": GET_USER,
    "get_product": GET_PRODUCT,
    "get_order": GET_ORDER,
    "list_orders_by_customer": LIST_ORDERS_BY_CUSTOMER,
}
DEFAULT_MIX = "get_user=50,get_product=25,get_order=15,list_orders_by_customer=10"
WRITE_METHODS: dict[str, str] = {
    "register_user": REGISTER_USER,
    "add_product": ADD_PRODUCT,
    "restock_product": RESTOCK_PRODUCT,
}
# Distinct keys serialized per query kind: enough to miss every cache, few enough to build quickly.
MAX_KEYS_PER_KIND = 20_000
PASSWORD = "correct horse battery staple"  # noqa: S105 - throwaway load-test accounts
LIST_PAGE_SIZE = 10


def parse_mix(text: str) -> dict[str, int]:
    """`kind=weight,...` into weights by query kind; ValueError with a readable reason for anything else."""
    weights: dict[str, int] = {}
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            continue
        kind, sep, weight = part.partition("=")
        kind = kind.strip()
        if kind not in READ_METHODS:
            raise ValueError(f"unknown query kind {kind!r} in --mix (known: {', '.join(READ_METHODS)})")
        if not sep:
            weights[kind] = weights.get(kind, 0) + 1
            continue
        try:
            value = int(weight)
        except ValueError:
            raise ValueError(f"the weight of {kind} in --mix must be a whole number, not {weight!r}") from None
        if value < 0:
            raise ValueError(f"the weight of {kind} in --mix must not be negative")
        weights[kind] = weights.get(kind, 0) + value
    weights = {kind: weight for kind, weight in weights.items() if weight > 0}
    if not weights:
        raise ValueError("--mix names no query kind with a positive weight")
    return weights


@dataclass
class SeedData:
    """The ids `seed` wrote: users, products (with skus) and orders (with their customers)."""

    users: list[str] = field(default_factory=list)
    products: list[str] = field(default_factory=list)
    skus: list[str] = field(default_factory=list)
    orders: list[str] = field(default_factory=list)
    customers: list[str] = field(default_factory=list)
    # (query kind, id, consistency token) of a few items, to wait for before measuring.
    probes: list[tuple[str, str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> SeedData:
        """Read a seed file; ValueError when it is not one."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the seed file {path}: {exc}") from exc
        if not isinstance(data, dict) or not {"users", "products", "orders"} <= set(data):
            raise ValueError(f"{path} is not a seed file (python -m perf loadtest seed writes one)")
        return cls(
            users=[str(user["user_id"]) for user in data["users"]],
            products=[str(product["product_id"]) for product in data["products"]],
            skus=[str(product["sku"]) for product in data["products"]],
            orders=[str(order["order_id"]) for order in data["orders"]],
            customers=sorted({str(order["customer_id"]) for order in data["orders"]}),
            probes=[(str(kind), str(key), str(token)) for kind, key, token in data.get("probes", [])],
        )

    def ids_for(self, kind: str) -> list[str]:
        """The ids a query kind picks from."""
        return {
            "get_user": self.users,
            "get_product": self.products,
            "get_order": self.orders,
            "list_orders_by_customer": self.customers,
        }[kind]


def query_body(kind: str, key: str, consistency_token: str = "", max_wait_ms: int = 0) -> bytes:
    """The serialized request of query `kind` for `key`."""
    if kind == "get_user":
        return user_queries.GetUserRequest(
            user_id=key, consistency_token=consistency_token, max_wait_ms=max_wait_ms
        ).SerializeToString()
    if kind == "get_product":
        return product_queries.GetProductRequest(
            product_id=key, consistency_token=consistency_token, max_wait_ms=max_wait_ms
        ).SerializeToString()
    if kind == "get_order":
        return order_queries.GetOrderRequest(
            order_id=key, consistency_token=consistency_token, max_wait_ms=max_wait_ms
        ).SerializeToString()
    if kind == "list_orders_by_customer":
        return order_queries.ListOrdersByCustomerRequest(
            customer_id=key, page_size=LIST_PAGE_SIZE, consistency_token=consistency_token, max_wait_ms=max_wait_ms
        ).SerializeToString()
    raise ValueError(f"unknown query kind {kind!r}")


@dataclass
class Call:
    """One call to make: the method path, the serialized request and extra metadata."""

    method: str
    body: bytes
    metadata: tuple[tuple[str, str], ...] = ()


class QuerySource:
    """Queries drawn by weight from the mix, each on a random seeded id (or always the first with `hot`)."""

    def __init__(self, seed: SeedData, mix: Mapping[str, int], *, hot: bool, rng: random.Random) -> None:
        """Serialize the requests of every kind in `mix`; ValueError when the seed has no ids for one."""
        self.rng = rng
        self.kinds: list[str] = []
        self.weights: list[int] = []
        self.bodies: dict[str, list[bytes]] = {}
        for kind, weight in mix.items():
            ids = seed.ids_for(kind)
            if not ids:
                raise ValueError(f"the seed file has no ids for {kind} (seed more users, products or orders)")
            chosen = ids[:1] if hot else ids[:MAX_KEYS_PER_KIND]
            self.bodies[kind] = [query_body(kind, key) for key in chosen]
            self.kinds.append(kind)
            self.weights.append(weight)

    def next_call(self) -> Call:
        """The next query to send."""
        kind = self.kinds[0] if len(self.kinds) == 1 else self.rng.choices(self.kinds, self.weights)[0]
        return Call(READ_METHODS[kind], self.rng.choice(self.bodies[kind]))


@dataclass(frozen=True, slots=True)
class Command:
    """One command to send: its kind (a key of WRITE_METHODS) and its typed request."""

    kind: str
    request: Message


def send_command(client: TesseraClient, command: Command, timeout_s: float) -> Awaitable[Message]:
    """Send `command` through `client`: one idempotency key per command, reused on every retry."""
    if command.kind == "register_user":
        return client.users.register_user(command.request, timeout=timeout_s)  # type: ignore[arg-type]
    if command.kind == "add_product":
        return client.catalog.add_product(command.request, timeout=timeout_s)  # type: ignore[arg-type]
    return client.catalog.restock_product(command.request, timeout=timeout_s)  # type: ignore[arg-type]


def bearer_token(metadata: Sequence[tuple[str, str]]) -> str | None:
    """The token of an `authorization: Bearer …` entry, for the client's token provider."""
    return next((value.removeprefix("Bearer ") for key, value in metadata if key == "authorization"), None)


class CommandSource:
    """Write commands with unique contents; the client gives each its own idempotency key."""

    def __init__(self, command: str, process_index: int, product_ids: Sequence[str] = ()) -> None:
        """`product_ids` are the products restock_product spreads its commands over."""
        if command not in WRITE_METHODS:
            raise ValueError(f"unknown command {command!r} (known: {', '.join(WRITE_METHODS)})")
        if command == "restock_product" and not product_ids:
            raise ValueError("restock_product needs products to restock")
        self.command = command
        self.run = secrets.token_hex(4)
        self.process_index = process_index
        self.product_ids = list(product_ids)
        self.number = 0

    def next_command(self) -> Command:
        """The next command to send."""
        self.number += 1
        tag = f"{self.run}{self.process_index}x{self.number}"
        request: Message
        if self.command == "register_user":
            request = user_commands.RegisterUserRequest(
                email=f"lt-{tag}@example.com", username=f"lt{tag}", password=PASSWORD, full_name=f"Load Test {tag}"
            )
        elif self.command == "add_product":
            request = add_product_request(f"LT-{tag}", f"Load test product {tag}", stock=100)
        else:
            product_id = self.product_ids[self.number % len(self.product_ids)]
            request = catalog_commands.RestockProductRequest(product_id=product_id, quantity=1)
        return Command(self.command, request)


def add_product_request(
    sku: str, name: str, *, stock: int, price_minor: int = 1999
) -> catalog_commands.AddProductRequest:
    """An AddProductRequest."""
    return catalog_commands.AddProductRequest(
        sku=sku, name=name, price=money_pb2.Money(currency_code="EUR", amount_minor=price_minor), initial_stock=stock
    )
