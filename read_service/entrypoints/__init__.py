"""Thin adapters between the outside world (gRPC) and the read service."""
