"""Projections: pure functions from an event (and the prior state it touches) to Redis view changes."""
