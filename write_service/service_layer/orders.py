"""Handlers of the orders' commands (aggregate "order"), and the orders' policies.

Prices always come from the products table inside the command's transaction; the caller
only names skus. Placing an order starts its saga and cancelling one hands the
compensation to it, both in the command's own transaction: the saga worker reserves and
releases stock and authorizes, voids or refunds payments, never these handlers.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from google.protobuf.message import Message

from shared_kernel.contracts.errors import FailedPrecondition
from shared_kernel.contracts.event_log import NewEvent
from tessera.users.v1 import events_pb2 as user_events
from write_service.commands.base import Command
from write_service.commands.orders import AddOrderItem, CancelOrder, PlaceOrder, ShipOrder
from write_service.domain import orders
from write_service.domain.catalog import Product
from write_service.service_layer.command_steps import (
    AggregateStore,
    CommandMeta,
    CommandResult,
    Dependencies,
    Handler,
    change_aggregate,
    create_aggregate,
)
from write_service.service_layer.event_bus import Policy
from write_service.service_layer.ports import UnitOfWork


async def _catalog_products(uow: UnitOfWork, skus: Sequence[str]) -> list[Product]:
    """The products for `skus` in the same order; an unknown sku is a broken rule naming it."""
    found = await uow.products.by_skus(skus)
    missing = [sku for sku in skus if sku.lower() not in found]
    if missing:
        names = ", ".join(repr(sku) for sku in missing)
        raise FailedPrecondition(f"an order can only hold products of the catalog; unknown sku: {names}")
    return [found[sku.lower()] for sku in skus]


async def place_order(command: PlaceOrder, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta) -> CommandResult:
    """Place a pending order for an active customer, priced from the catalog, and start its saga."""

    async def create() -> orders.Order:
        customer = await uow.users.get_customer(command.customer_id)
        if customer is None:
            raise FailedPrecondition(
                f"customer {command.customer_id} must be an active user to place an order; no user has this id"
            )
        customer.require_active()
        products = await _catalog_products(uow, [item.sku for item in command.items])
        now = deps.clock()
        order = orders.Order.place(
            order_id=deps.new_id(),
            customer=customer,
            items=[(product, item.quantity) for product, item in zip(products, command.items, strict=True)],
            shipping_address=command.shipping_address.to_address(),
            notes=command.notes,
            now=now,
        )
        await uow.orders.add(order)
        await uow.sagas.start(deps.new_id(), order.id, now)
        return order

    return await create_aggregate(command, uow, deps, meta, create=create)


async def add_order_item(
    command: AddOrderItem, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta
) -> CommandResult:
    """Add units of a catalog product to a pending order."""

    async def change(order: orders.Order) -> None:
        # The order is locked first (as the saga's reserve step does), then the product.
        [product] = await _catalog_products(uow, [command.item.sku])
        order.add_item(product=product, quantity=command.item.quantity, now=deps.clock())

    return await change_aggregate(command, uow, deps, meta, store=_orders, change=change)


async def cancel_order(command: CancelOrder, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta) -> CommandResult:
    """Cancel an order that has not shipped and hand its compensation to the saga."""

    async def change(order: orders.Order) -> None:
        now = deps.clock()
        order.cancel(reason=command.reason, cancelled_by=meta.principal, now=now)
        await uow.sagas.request_compensation(order.id, command.reason, now)

    return await change_aggregate(command, uow, deps, meta, store=_orders, change=change)


async def ship_order(command: ShipOrder, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta) -> CommandResult:
    """Mark a confirmed order as shipped."""

    async def change(order: orders.Order) -> None:
        order.ship(carrier=command.carrier, tracking_number=command.tracking_number, now=deps.clock())

    return await change_aggregate(command, uow, deps, meta, store=_orders, change=change)


def _orders(uow: UnitOfWork) -> AggregateStore[orders.Order]:
    return uow.orders


async def cancel_orders_of_deactivated_customer(event: NewEvent, uow: UnitOfWork, now: datetime) -> list[orders.Order]:
    """Policy on UserDeactivated: cancel the customer's orders not yet paid for, through their sagas.

    Each order is cancelled as the system, with the deactivation's reason, and its saga is
    turned to compensation in the same unit of work: the saga worker releases the reserved
    stock and voids any authorization, exactly as after CancelOrder.
    """
    deactivated = event.payload
    assert isinstance(deactivated, user_events.UserDeactivated)
    reason = f"customer deactivated: {deactivated.reason}"
    cancelled = []
    for order in await uow.orders.awaiting_payment_of(uuid.UUID(deactivated.user_id)):
        if order.cancel_by_system(reason=reason, now=now):
            # The saga's hand-off first, as CancelOrder does: in the one write statement it
            # locks the order row before the order's own update (an update earlier in the
            # same statement would hide the row from that lock).
            await uow.sagas.request_compensation(order.id, reason, now)
            await uow.orders.save(order)
            cancelled.append(order)
    return cancelled


ORDER_POLICIES: dict[type[Message], list[Policy]] = {
    user_events.UserDeactivated: [cancel_orders_of_deactivated_customer],
}

ORDER_HANDLERS: dict[type[Command], Handler] = {
    PlaceOrder: place_order,
    AddOrderItem: add_order_item,
    CancelOrder: cancel_order,
    ShipOrder: ship_order,
}
