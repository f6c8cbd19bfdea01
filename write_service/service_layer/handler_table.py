"""The tables the message bus dispatches with: every command's handler, and every domain event's policies.

Each bounded context contributes its own entries; a policy may belong to another context
than the event it reacts to (the orders' policy on the users' UserDeactivated).
"""

from __future__ import annotations

from write_service.commands.base import Command
from write_service.service_layer.catalog import CATALOG_HANDLERS
from write_service.service_layer.command_steps import Handler
from write_service.service_layer.event_bus import Policies
from write_service.service_layer.orders import ORDER_HANDLERS, ORDER_POLICIES
from write_service.service_layer.users import USER_HANDLERS

HANDLERS: dict[type[Command], Handler] = {**USER_HANDLERS, **CATALOG_HANDLERS, **ORDER_HANDLERS}

POLICIES: Policies = {**ORDER_POLICIES}
