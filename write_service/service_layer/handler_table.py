"""The table of every command handler the bus dispatches to: each bounded context adds its own."""

from __future__ import annotations

from write_service.commands.base import Command
from write_service.service_layer.catalog import CATALOG_HANDLERS
from write_service.service_layer.command_steps import Handler
from write_service.service_layer.orders import ORDER_HANDLERS
from write_service.service_layer.users import USER_HANDLERS

HANDLERS: dict[type[Command], Handler] = {**USER_HANDLERS, **CATALOG_HANDLERS, **ORDER_HANDLERS}
