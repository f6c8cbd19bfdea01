"""Read-your-writes across replicas: the consistency token of each aggregate a caller changed.

Every command reply carries the aggregate's new version and an opaque consistency token. The
session keeps the token of the highest version it has seen per aggregate (kind and id) and
the client sends it on the next query for that aggregate; the replica then waits (bounded)
until its view reflects that version. A list or search query of a context carries the token
of the context's most recent write. A replica that could not catch up in time answers
`stale=true`; the client raises StaleRead then (or returns the answer, if the session says
so), so a stale answer is never taken for a fresh one by accident.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

StalePolicy = Literal["raise", "return"]


@dataclass(frozen=True, slots=True)
class Written:
    """The state one command produced: an aggregate at a version, and its token."""

    kind: str
    aggregate_id: str
    version: int
    token: str


class ConsistencySession:
    """What one logical caller (a request handler, a job) has written, to read it back."""

    def __init__(self, *, on_stale: StalePolicy = "raise") -> None:
        self.on_stale: StalePolicy = on_stale
        self._lock = threading.Lock()
        self._by_aggregate: dict[tuple[str, str], Written] = {}
        self._latest_by_kind: dict[str, Written] = {}

    def remember(self, kind: str, aggregate_id: str, version: int, token: str) -> None:
        """Record a command's reply; an older version than one already known changes nothing."""
        if not token or not aggregate_id:
            return
        written = Written(kind, aggregate_id, version, token)
        with self._lock:
            known = self._by_aggregate.get((kind, aggregate_id))
            if known is None or version >= known.version:
                self._by_aggregate[(kind, aggregate_id)] = written
            self._latest_by_kind[kind] = written

    def token_for(self, kind: str, aggregate_id: str | None) -> str:
        """The token to send on a query of one aggregate, or (id None) of a whole context; "" if none."""
        with self._lock:
            written = (
                self._latest_by_kind.get(kind) if aggregate_id is None else self._by_aggregate.get((kind, aggregate_id))
            )
        return written.token if written is not None else ""

    def written(self, kind: str, aggregate_id: str) -> Written | None:
        """What the session last wrote to that aggregate."""
        with self._lock:
            return self._by_aggregate.get((kind, aggregate_id))

    def forget(self) -> None:
        """Drop every token (the next queries read whatever the replicas hold)."""
        with self._lock:
            self._by_aggregate.clear()
            self._latest_by_kind.clear()
