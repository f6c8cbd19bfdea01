"""Handlers of the catalog's commands (aggregate "product")."""

from __future__ import annotations

from write_service.commands.base import Command
from write_service.commands.catalog import AddProduct, DiscontinueProduct, RestockProduct, UpdateProductPrice
from write_service.domain import catalog
from write_service.service_layer.command_steps import (
    AggregateStore,
    CommandMeta,
    CommandResult,
    Dependencies,
    Handler,
    change_aggregate,
    create_aggregate,
)
from write_service.service_layer.ports import UnitOfWork


async def add_product(command: AddProduct, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta) -> CommandResult:
    """Add a product whose sku is free."""

    async def create() -> catalog.Product:
        if await uow.products.sku_taken(command.sku):
            raise catalog.sku_taken()
        product = catalog.Product.add(
            product_id=deps.new_id(),
            sku=command.sku,
            name=command.name,
            currency_code=command.price.currency_code,
            price_minor=command.price.amount_minor,
            initial_stock=command.initial_stock,
            now=deps.clock(),
        )
        await uow.products.add(product)
        return product

    return await create_aggregate(command, uow, deps, meta, create=create)


async def update_product_price(
    command: UpdateProductPrice, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta
) -> CommandResult:
    """Reprice a product that is still sold, in its own currency."""

    async def change(product: catalog.Product) -> None:
        product.update_price(
            currency_code=command.price.currency_code, price_minor=command.price.amount_minor, now=deps.clock()
        )

    return await change_aggregate(command, uow, deps, meta, store=_products, change=change)


async def restock_product(
    command: RestockProduct, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta
) -> CommandResult:
    """Add units to the stock of a product that is still sold."""

    async def change(product: catalog.Product) -> None:
        product.restock(quantity=command.quantity, now=deps.clock())

    return await change_aggregate(command, uow, deps, meta, store=_products, change=change)


async def discontinue_product(
    command: DiscontinueProduct, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta
) -> CommandResult:
    """Stop selling a product."""

    async def change(product: catalog.Product) -> None:
        product.discontinue(reason=command.reason, now=deps.clock())

    return await change_aggregate(command, uow, deps, meta, store=_products, change=change)


def _products(uow: UnitOfWork) -> AggregateStore[catalog.Product]:
    return uow.products


CATALOG_HANDLERS: dict[type[Command], Handler] = {
    AddProduct: add_product,
    UpdateProductPrice: update_product_price,
    RestockProduct: restock_product,
    DiscontinueProduct: discontinue_product,
}
