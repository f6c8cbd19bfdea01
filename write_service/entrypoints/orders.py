"""The orders' gRPC servicer: tessera.orders.v1.OrderCommandService over the command bus."""

from __future__ import annotations

from tessera.orders.v1 import events_pb2
from tessera.orders.v1 import order_command_service_pb2 as pb
from tessera.orders.v1 import order_command_service_pb2_grpc as pb_grpc
from write_service.commands.orders import AddOrderItem, CancelOrder, PlaceOrder, ShipOrder
from write_service.entrypoints.command_servicer import CommandServicer, Context, expected_version
from write_service.service_layer.command_steps import CommandResult

ORDER_SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["OrderCommandService"].full_name


def _item(item: pb.OrderItem) -> dict[str, object]:
    return {"sku": item.sku, "quantity": item.quantity}


def _address(request: pb.PlaceOrderRequest) -> dict[str, object] | None:
    if not request.HasField("shipping_address"):
        return None
    address = request.shipping_address
    return {
        "recipient": address.recipient,
        "line1": address.line1,
        "line2": address.line2,
        "city": address.city,
        "postal_code": address.postal_code,
        "country_code": address.country_code,
    }


def _placed_lines(reply: pb.PlaceOrderResponse, result: CommandResult) -> None:
    for event in result.events:
        if isinstance(event.payload, events_pb2.OrderPlaced):
            reply.lines.extend(event.payload.lines)


class OrderCommandServicer(CommandServicer, pb_grpc.OrderCommandServiceServicer):
    """Serves tessera.orders.v1.OrderCommandService."""

    id_field = "order_id"

    async def PlaceOrder(self, request: pb.PlaceOrderRequest, context: Context) -> pb.PlaceOrderResponse:
        """Place an order; the reply carries the lines as priced from the catalog."""
        fields = {
            "customer_id": request.customer_id,
            "items": [_item(item) for item in request.items],
            "shipping_address": _address(request),
            "notes": request.notes,
        }
        return await self._run(PlaceOrder, fields, pb.PlaceOrderResponse, context, _placed_lines)

    async def AddOrderItem(self, request: pb.AddOrderItemRequest, context: Context) -> pb.AddOrderItemResponse:
        """Add units of a product to a pending order."""
        fields = {
            "order_id": request.order_id,
            "item": _item(request.item) if request.HasField("item") else None,
            "expected_version": expected_version(request),
        }
        return await self._run(AddOrderItem, fields, pb.AddOrderItemResponse, context)

    async def CancelOrder(self, request: pb.CancelOrderRequest, context: Context) -> pb.CancelOrderResponse:
        """Cancel an order that has not shipped."""
        fields = {
            "order_id": request.order_id,
            "reason": request.reason,
            "expected_version": expected_version(request),
        }
        return await self._run(CancelOrder, fields, pb.CancelOrderResponse, context)

    async def ShipOrder(self, request: pb.ShipOrderRequest, context: Context) -> pb.ShipOrderResponse:
        """Mark a confirmed order as shipped."""
        fields = {
            "order_id": request.order_id,
            "carrier": request.carrier,
            "tracking_number": request.tracking_number,
            "expected_version": expected_version(request),
        }
        return await self._run(ShipOrder, fields, pb.ShipOrderResponse, context)
