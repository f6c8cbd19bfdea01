"""The catalog's gRPC servicer: tessera.catalog.v1.CatalogCommandService over the command bus."""

from __future__ import annotations

from tessera.catalog.v1 import catalog_command_service_pb2 as pb
from tessera.catalog.v1 import catalog_command_service_pb2_grpc as pb_grpc
from tessera.catalog.v1 import events_pb2
from tessera.common.v1 import money_pb2
from write_service.commands.catalog import AddProduct, DiscontinueProduct, RestockProduct, UpdateProductPrice
from write_service.entrypoints.command_servicer import CommandServicer, Context, expected_version
from write_service.service_layer.command_steps import CommandResult

CATALOG_SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["CatalogCommandService"].full_name


def money_fields(request: pb.AddProductRequest | pb.UpdateProductPriceRequest) -> dict[str, object] | None:
    """The request's price as command input, or None when the caller left it out."""
    if not request.HasField("price"):
        return None
    price: money_pb2.Money = request.price
    return {"currency_code": price.currency_code, "amount_minor": price.amount_minor}


def _stock_after_restock(reply: pb.RestockProductResponse, result: CommandResult) -> None:
    for event in result.events:
        if isinstance(event.payload, events_pb2.ProductRestocked):
            reply.stock_available = event.payload.stock_available


class CatalogCommandServicer(CommandServicer, pb_grpc.CatalogCommandServiceServicer):
    """Serves tessera.catalog.v1.CatalogCommandService."""

    id_field = "product_id"

    async def AddProduct(self, request: pb.AddProductRequest, context: Context) -> pb.AddProductResponse:
        """Add a product to the catalog."""
        fields = {
            "sku": request.sku,
            "name": request.name,
            "price": money_fields(request),
            "initial_stock": request.initial_stock,
        }
        return await self._run(AddProduct, fields, pb.AddProductResponse, context)

    async def UpdateProductPrice(
        self, request: pb.UpdateProductPriceRequest, context: Context
    ) -> pb.UpdateProductPriceResponse:
        """Set a product's unit price."""
        fields = {
            "product_id": request.product_id,
            "price": money_fields(request),
            "expected_version": expected_version(request),
        }
        return await self._run(UpdateProductPrice, fields, pb.UpdateProductPriceResponse, context)

    async def RestockProduct(self, request: pb.RestockProductRequest, context: Context) -> pb.RestockProductResponse:
        """Add units to a product's stock; the reply carries the stock after the restock."""
        fields = {
            "product_id": request.product_id,
            "quantity": request.quantity,
            "expected_version": expected_version(request),
        }
        return await self._run(RestockProduct, fields, pb.RestockProductResponse, context, _stock_after_restock)

    async def DiscontinueProduct(
        self, request: pb.DiscontinueProductRequest, context: Context
    ) -> pb.DiscontinueProductResponse:
        """Stop selling a product."""
        fields = {
            "product_id": request.product_id,
            "reason": request.reason,
            "expected_version": expected_version(request),
        }
        return await self._run(DiscontinueProduct, fields, pb.DiscontinueProductResponse, context)
