"""Server-side call counts from a service's Prometheus endpoint (METRICS_PORT), by gRPC status code.

The services count every unary call in `rpc.server.duration` (Prometheus:
`rpc_server_duration_seconds_count`, labelled with the method and the status code the caller
got). Scraped before and after a run, the difference is what the servers saw, a check that
needs no trust in the client's own accounting (h2load sees only HTTP statuses).
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterable, Mapping

COUNT_METRIC = "rpc_server_duration_seconds_count"
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')


def parse_counts(text: str, method: str) -> dict[str, int]:
    """Calls of `method` ("/package.Service/Method") by status code in a Prometheus text exposition."""
    service, _, name = method.lstrip("/").rpartition("/")
    counts: dict[str, int] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group("name") != COUNT_METRIC:
            continue
        labels = {label.group("key"): label.group("value") for label in _LABEL.finditer(match.group("labels") or "")}
        if labels.get("rpc_service") != service or labels.get("rpc_method") != name:
            continue
        code = labels.get("rpc_grpc_status_code", "UNKNOWN")
        counts[code] = counts.get(code, 0) + round(float(match.group("value")))
    return counts


def scrape(urls: Iterable[str], method: str, timeout_s: float = 5.0) -> dict[str, int]:
    """The summed counts of `method` by status code over every endpoint in `urls`."""
    total: dict[str, int] = {}
    for url in urls:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - an operator-given URL
            text = response.read().decode("utf-8", "replace")
        for code, count in parse_counts(text, method).items():
            total[code] = total.get(code, 0) + count
    return total


def difference(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    """Counts added between two scrapes (codes with no new calls left out)."""
    return {code: after[code] - before.get(code, 0) for code in sorted(after) if after[code] - before.get(code, 0) > 0}
