"""Ports, handlers and the command bus: the use cases, independent of Postgres and gRPC."""
