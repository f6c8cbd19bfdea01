"""Builders shared by the write service's tests: random, unique values per test."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime

from shared_kernel.platform.security.authn import ANONYMOUS
from write_service.adapters.password_hasher import Argon2PasswordHasher
from write_service.commands.catalog import AddProduct
from write_service.commands.orders import PlaceOrder
from write_service.commands.users import DeactivateUser, RegisterUser, UpdateUserProfile
from write_service.service_layer.command_steps import CommandMeta
from write_service.service_layer.deadline import Deadline

PASSWORD = "correct horse battery staple"


def cheap_hasher() -> Argon2PasswordHasher:
    """A real argon2id hasher with the smallest parameters, so tests stay fast."""
    return Argon2PasswordHasher(time_cost=1, memory_cost_kib=8, parallelism=1, max_concurrent=4)


def suffix() -> str:
    """A short random token."""
    return secrets.token_hex(4)


def register(
    email: str | None = None, username: str | None = None, password: str = PASSWORD, full_name: str = "Ada Lovelace"
) -> RegisterUser:
    """A valid RegisterUser with a fresh email and username unless given."""
    token = suffix()
    return RegisterUser.parse(
        {
            "email": email or f"user-{token}@example.com",
            "username": username or f"user_{token}",
            "password": password,
            "full_name": full_name,
        }
    )


def update(
    user_id: uuid.UUID,
    full_name: str = "Ada King",
    bio: str = "",
    avatar_url: str = "",
    expected_version: int | None = None,
) -> UpdateUserProfile:
    """A valid UpdateUserProfile."""
    return UpdateUserProfile.parse(
        {
            "user_id": str(user_id),
            "full_name": full_name,
            "bio": bio,
            "avatar_url": avatar_url,
            "expected_version": expected_version,
        }
    )


def deactivate(
    user_id: uuid.UUID, reason: str = "asked to leave", expected_version: int | None = None
) -> DeactivateUser:
    """A valid DeactivateUser."""
    return DeactivateUser.parse({"user_id": str(user_id), "reason": reason, "expected_version": expected_version})


def meta(
    seconds: float = 5.0, correlation_id: str = "", principal: str = ANONYMOUS, idempotency_key: str | None = None
) -> CommandMeta:
    """Metadata for one command with a fresh id and a deadline `seconds` away."""
    command_id = uuid.uuid4()
    return CommandMeta(
        command_id=command_id,
        correlation_id=correlation_id or str(command_id),
        received_at=datetime.now(UTC),
        deadline=Deadline.after(seconds),
        principal=principal,
        idempotency_key=idempotency_key,
    )


def key() -> str:
    """A fresh idempotency key."""
    return f"key-{uuid.uuid4()}"


def add_product(
    sku: str | None = None,
    name: str = "Analytical Engine",
    currency_code: str = "EUR",
    amount_minor: int = 1999,
    initial_stock: int = 10,
) -> AddProduct:
    """A valid AddProduct with a fresh sku unless given."""
    return AddProduct.parse(
        {
            "sku": sku or f"SKU-{suffix()}",
            "name": name,
            "price": {"currency_code": currency_code, "amount_minor": amount_minor},
            "initial_stock": initial_stock,
        }
    )


ADDRESS = {
    "recipient": "Ada Lovelace",
    "line1": "12 St James's Square",
    "line2": "",
    "city": "London",
    "postal_code": "SW1Y 4JH",
    "country_code": "GB",
}


def place_order(customer_id: uuid.UUID, *items: tuple[str, int], notes: str = "") -> PlaceOrder:
    """A valid PlaceOrder of (sku, quantity) items."""
    return PlaceOrder.parse(
        {
            "customer_id": str(customer_id),
            "items": [{"sku": sku, "quantity": quantity} for sku, quantity in items],
            "shipping_address": dict(ADDRESS),
            "notes": notes,
        }
    )
