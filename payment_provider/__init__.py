"""A stand-in for an external card payment provider, with injectable failures (docs/decisions/0014)."""
