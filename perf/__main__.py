"""Performance tools of the project: benchmarks, load tests and measurements, one command line.

    python -m perf SUBCOMMAND [OPTIONS]      (python -m perf SUBCOMMAND --help for its options)

Each subcommand either drives a stack that is already running (`make up`, or any deployment)
or starts a measured stack of its own over DATABASE_URL / REDIS_URL when set, embedded
Postgres and Redis otherwise, and stops it at the end.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Subcommand:
    """A subcommand: the module whose `main()` runs it, arguments put before the user's, a summary."""

    module: str
    summary: str
    preset: tuple[str, ...] = ()


SUBCOMMANDS: dict[str, Subcommand] = {
    "bench": Subcommand("perf.bench.run", "every benchmark figure beside its ceiling; rewrites BENCHMARKS.md"),
    "bench-smoke": Subcommand(
        "perf.bench.run",
        "the benchmarks at small sizes; fails only when a figure cannot be measured",
        ("--quick", "--strict", "--no-markdown"),
    ),
    "loadtest": Subcommand("perf.loadtest.cli", "seed a running stack, or drive its replicas / write service / lag"),
    "lag": Subcommand("perf.lag", "reply → visible on each replica (sequential, one rate, or rates with CPU shares)"),
    "read": Subcommand("perf.read", "replica calls/s (hot, cold key; --workers 1,2) beside a bare grpc.aio ceiling"),
    "saga": Subcommand("perf.saga", "orders/s confirmed through the whole stack"),
    "lease": Subcommand("perf.lease", "applying-lease takeover time after kill -9 of the holder"),
    "rebuild": Subcommand("perf.rebuild", "blue/green rebuild throughput, events/s"),
    "redis-loss": Subcommand("perf.redis_loss", "time from a Redis restart (views lost) to SERVING"),
    "live-apply": Subcommand("perf.live_apply", "a replica's live apply rate of published events"),
    "client-overhead": Subcommand("perf.client_overhead", "the client library's cost over bare stubs"),
    "search": Subcommand("perf.bench.run", "the search rows of the benchmark table only", ("--only", "search")),
    "relay": Subcommand("perf.bench.run", "the relay rows of the benchmark table only", ("--only", "relay")),
    "plot": Subcommand("perf.report", "draw the PNG of a JSON report written by loadtest or lag"),
}


def usage() -> str:
    """The list of subcommands."""
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [(__doc__ or "").strip(), "", "subcommands:"]
    lines += [f"  {name:<{width}}  {sub.summary}" for name, sub in SUBCOMMANDS.items()]
    return "\n".join(lines)


def run(name: str, args: Sequence[str]) -> int:
    """Run subcommand `name` with `args` as its command line."""
    sub = SUBCOMMANDS[name]
    entry: Callable[[], int | None] = importlib.import_module(sub.module).main
    saved = sys.argv
    # Each tool parses sys.argv; its usage lines name the subcommand.
    sys.argv = [f"python -m perf {name}", *sub.preset, *args]
    try:
        return entry() or 0
    finally:
        sys.argv = saved


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the subcommand named first."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    if args[0] not in SUBCOMMANDS:
        print(f"unknown subcommand {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run(args[0], args[1:])


if __name__ == "__main__":
    sys.exit(main())
