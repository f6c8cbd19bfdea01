"""Implementations of the service layer's ports: Postgres, in-memory fakes, argon2."""
