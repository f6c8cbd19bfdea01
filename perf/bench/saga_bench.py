"""Saga throughput: orders confirmed per second through the whole stack, payment provider at 0 latency.

`perf saga`'s measurement on a stack of the bench's own (write service, one relay, one
replica, the payment provider stand-in answering at once, one saga worker with the default
concurrency): a thousand orders are placed, 16 PlaceOrder calls in flight, and the figure is
confirmed orders over the time from the first PlaceOrder to the last confirmation, so placing
the orders is inside it. The goal is twice the rate measured before this round's rework of
the saga (82 orders/s with `make bench-saga` on this machine); there is no bare ceiling for a
saga, so the notes give the CPU each process spent per order, the figure a busy machine moves
least. The customers the orders are placed for are registered with cheap password hashing,
since hashing is not what the row measures.
"""

from __future__ import annotations

from dataclasses import dataclass

from perf.bench.table import Goal, Row
from perf.saga import cpu_ms_per_order, measure, process_cpu
from perf.stack import FAST_HASHING, Backing, bench_stack, scratch

BEFORE_PER_S = 82.0  # `make bench-saga` before the saga went through the domain


@dataclass(frozen=True, slots=True)
class SagaSizes:
    """How many orders are placed, and how many at a time."""

    orders: int = 1000
    concurrency: int = 16
    timeout_s: float = 300.0


def saga_rows() -> list[Row]:
    """The one row this bench fills."""
    return [
        Row(
            key="saga",
            figure="saga: orders confirmed per second (provider at 0 latency)",
            unit="/s",
            goal=Goal("value", ">=", 2 * BEFORE_PER_S, "/s"),
            how="perf saga: PlaceOrder, 16 in flight → one saga worker → confirmed",
        )
    ]


async def measure_saga(backing: Backing, sizes: SagaSizes) -> list[Row]:
    """Place `sizes.orders` orders and time them until every one is confirmed."""
    (row,) = rows = saga_rows()
    async with scratch(backing, "saga") as place:
        with bench_stack(place, saga=True, env=FAST_HASHING, provider_env={"PAYMENT_LATENCY_MS": "0"}) as stack:
            before = process_cpu(stack)
            report = await measure(
                stack.write_address,
                place.database_url,
                count=sizes.orders,
                concurrency=sizes.concurrency,
                timeout_s=sizes.timeout_s,
            )
            after = process_cpu(stack)
    if report["confirmed"] != report["orders"]:
        return [row.fail(f"{report['confirmed']} of {report['orders']} orders confirmed")]
    row.value = float(report["confirmed_per_s"])
    cpu = ", ".join(f"{name} {ms}" for name, ms in cpu_ms_per_order(before, after, sizes.orders).items())
    row.notes += [
        f"{report['orders']:,} orders in {report['elapsed_s']} s; PlaceOrder → confirmed median "
        f"{report['place_to_confirmed_median_ms']} ms, p99 {report['place_to_confirmed_p99_ms']} ms",
        f"CPU ms per order: {cpu}",
        f"before the saga went through the domain: {BEFORE_PER_S:g} orders/s (the goal is twice that)",
    ]
    return rows
