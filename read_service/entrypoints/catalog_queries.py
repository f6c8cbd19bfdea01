"""tessera.catalog.v1.ProductQueryService: products from the catalog views, with the shared freshness contract."""

from __future__ import annotations

from typing import Any

import grpc

from read_service.consistency import PRODUCT_AGGREGATE
from read_service.entrypoints.answers import SingleViewQuery, answer_page
from read_service.entrypoints.freshness import Freshness
from read_service.entrypoints.requests import PageLimits, open_page_token, page_size
from read_service.page_tokens import PageTokenCodec
from read_service.views.catalog import ListProductsQuery, ProductViews
from shared_kernel.contracts import errors
from shared_kernel.platform.grpc_server import add_preserialized
from tessera.catalog.v1 import product_query_service_pb2 as pb
from tessera.catalog.v1 import product_query_service_pb2_grpc as pb_grpc

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["ProductQueryService"].full_name
# Methods that answer serialized replies (registered with shared_kernel.platform.grpc_server.add_preserialized).
BYTES_METHODS = ("GetProduct",)


def list_products_query(
    request: pb.ListProductsRequest, limits: PageLimits, tokens: PageTokenCodec
) -> ListProductsQuery:
    """Validate a ListProductsRequest into a query; raises InvalidArgument listing every bad field."""
    violations: list[errors.FieldViolation] = []
    size = page_size(request.page_size, limits, violations)
    if violations:
        raise errors.InvalidArgument(violations)
    query = ListProductsQuery(page_size=size, include_discontinued=request.include_discontinued)
    cursor = open_page_token(tokens, request.page_token, query.binding())
    return ListProductsQuery(size, query.include_discontinued, cursor)


class ProductQueryServicer(pb_grpc.ProductQueryServiceServicer):
    """Serves ProductQueryService from the catalog views."""

    def __init__(
        self, views: ProductViews, tokens: PageTokenCodec, freshness: Freshness, limits: PageLimits | None = None
    ) -> None:
        self._views = views
        self._tokens = tokens
        self._freshness = freshness
        self._limits = limits or PageLimits()
        self._product = SingleViewQuery(
            views, freshness, aggregate_type=PRODUCT_AGGREGATE, id_field="product_id", parse=pb.ProductView.FromString
        )

    async def GetProduct(self, request: pb.GetProductRequest, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:  # type: ignore[override]  # bytes: see BYTES_METHODS
        """One product by id: a serialized GetProductResponse (see read_service.views.wire)."""
        return await self._product.answer(request.product_id, request.consistency_token, request.max_wait_ms, context)

    async def ListProducts(
        self, request: pb.ListProductsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListProductsResponse:
        """One page of products in sku order."""
        query = list_products_query(request, self._limits, self._tokens)
        page, token, stale, position = await answer_page(
            self._freshness, self._tokens, context, aggregate_type=PRODUCT_AGGREGATE,
            consistency_token=request.consistency_token, max_wait_ms=request.max_wait_ms, query=query,
            read=lambda at: self._views.list_page(query, at),
        )  # fmt: skip
        return pb.ListProductsResponse(
            products=page.products, next_page_token=token, stale=stale, view_position=position
        )


# How the servicer is added to a server: the generated registration, with BYTES_METHODS answering bytes.
register_product_queries = add_preserialized(pb_grpc.add_ProductQueryServiceServicer_to_server, BYTES_METHODS)
