"""`make bench`: every benchmark figure beside a ceiling measured in the same run, as a table.

    python -m perf bench [--quick | --full] [--only NAME ...] [--search-sizes N,N] [--markdown FILE | --no-markdown]
                             [--json FILE]

Runs the benches in order (read, write, relay, live, lag, saga, rebuild, redis-loss, memory,
search), prints an aligned table and rewrites the generated part of BENCHMARKS.md (between its
bench markers; the rest of the file is kept). A bench that fails leaves its rows "not measured"
with the reason, and the others still run. With --only the file is rewritten only when
--markdown names it.

Sizes: the default takes about 40 minutes on 2 shared cores, most of it in the search rows
(they seed and index 100,000 and 1,000,000 users and as many orders, each built twice, at
2,600 to 6,000 events/s; `--search-sizes 100000` leaves the million out and the run takes
about 15 minutes); the Redis-loss row at 100,000 events takes about 5 minutes on a busy machine;
the memory bench runs at 100,000 events and 20,000 commands per run. --quick is a smoke run of
a few minutes; --full runs the memory bench at 1,000,000 events and 100,000 commands per run,
which takes far longer (a replica applied one to two thousand bulk events per second on 2
shared cores).

Postgres and Redis come from DATABASE_URL / REDIS_URL when set, else embedded servers; each
bench uses a database and a Redis key prefix of its own, removed afterwards, and every process
it starts is stopped at the end, on failure and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from devstack.supervisor import REPO_ROOT
from perf.bench.lag_bench import LagSizes, lag_rows, measure_lag
from perf.bench.live_bench import (
    LiveSizes,
    RedisLossSizes,
    live_rows,
    measure_live,
    measure_redis_loss_row,
    redis_loss_rows,
)
from perf.bench.memory_bench import MemorySizes, measure_memory, memory_rows
from perf.bench.read_bench import measure_read, read_rows
from perf.bench.rebuild_bench import RebuildSizes, measure_rebuild_row, rebuild_rows
from perf.bench.relay_bench import RelaySizes, measure_relay, relay_rows
from perf.bench.saga_bench import SagaSizes, measure_saga, saga_rows
from perf.bench.search_bench import SearchSizes, measure_search, parse_sizes, search_rows
from perf.bench.table import (
    MarkersMissing,
    Row,
    not_measured,
    render_markdown,
    render_text,
    replace_between_markers,
)
from perf.bench.write_bench import WriteSizes, measure_write, write_rows
from perf.stack import Backing, backing, machine_facts

BENCHES = ("read", "write", "relay", "live", "lag", "saga", "rebuild", "redis-loss", "memory", "search")
DEFAULT_MARKDOWN = REPO_ROOT / "BENCHMARKS.md"


@dataclass(frozen=True, slots=True)
class Sizes:
    """How big every bench runs."""

    profile: str
    read_duration_s: float
    write: WriteSizes
    relay: RelaySizes
    lag: LagSizes
    rebuild: RebuildSizes
    memory: MemorySizes
    live: LiveSizes = field(default_factory=LiveSizes)
    redis_loss: RedisLossSizes = field(default_factory=RedisLossSizes)
    search: SearchSizes = field(default_factory=SearchSizes)
    saga: SagaSizes = field(default_factory=SagaSizes)

    def describe(self) -> list[str]:
        """One line per bench, for the report."""
        return [
            f"read: {self.read_duration_s:g} s per measurement",
            f"write: {self.write.processes} client processes, {self.write.concurrency} in flight, "
            f"{self.write.duration_s:g} s",
            f"relay: {self.relay.events:,}-event backlog, {self.relay.rounds} drain(s)",
            f"live: {self.live.events:,}-event mixed backlog on one replica",
            f"lag: {self.lag.duration_s:g} s open model, {self.lag.replicas} replicas",
            f"saga: {self.saga.orders:,} orders, {self.saga.concurrency} placed at a time",
            f"rebuild: {self.rebuild.events:,} events, batch {self.rebuild.batch_size}",
            f"redis-loss: {self.redis_loss.events:,} events",
            f"memory: {self.memory.events:,} events and {self.memory.commands:,} commands per run "
            f"(after {self.memory.warmup_events:,} events / {self.memory.warmup_s:g} s of commands of warm-up)",
            f"search: {', '.join(f'{n:,}' for n in self.search.sizes)} users and as many orders, "
            f"{self.search.queries} queries per figure",
        ]


def sizes_for(profile: str) -> Sizes:
    """The sizes of the 'quick', 'default' or 'full' profile."""
    if profile == "quick":
        return Sizes(
            profile=profile,
            read_duration_s=3.0,
            write=WriteSizes(duration_s=4.0),
            relay=RelaySizes(events=20_000, rounds=1),
            lag=LagSizes(duration_s=4.0),
            rebuild=RebuildSizes(events=20_000),
            memory=MemorySizes(events=20_000, commands=5_000, warmup_events=5_000, warmup_s=3.0),
            live=LiveSizes(events=3_000),
            redis_loss=RedisLossSizes(events=5_000),
            search=SearchSizes(sizes=(2_000, 20_000), queries=50),
            saga=SagaSizes(orders=200),
        )
    memory = MemorySizes(events=100_000, commands=20_000)
    if profile == "full":
        memory = MemorySizes(events=1_000_000, commands=100_000, timeout_s=3600.0)
    elif profile != "default":
        raise ValueError(f"unknown profile {profile!r}")
    return Sizes(
        profile=profile,
        read_duration_s=10.0,
        write=WriteSizes(),
        relay=RelaySizes(),
        lag=LagSizes(),
        rebuild=RebuildSizes(),
        memory=memory,
    )


@dataclass(slots=True)
class Run:
    """State shared between benches."""

    backing: Backing
    sizes: Sizes
    seconds: dict[str, float] = field(default_factory=dict)


def _read(run: Run) -> list[Row]:
    return measure_read(run.sizes.read_duration_s)


def _write(run: Run) -> list[Row]:
    rows, _max_write_rps = asyncio.run(measure_write(run.backing, run.sizes.write))
    return rows


def _relay(run: Run) -> list[Row]:
    return asyncio.run(measure_relay(run.backing, run.sizes.relay))


def _live(run: Run) -> list[Row]:
    return asyncio.run(measure_live(run.backing, run.sizes.live))


def _redis_loss(run: Run) -> list[Row]:
    return asyncio.run(measure_redis_loss_row(run.backing, run.sizes.redis_loss))


def _lag(run: Run) -> list[Row]:
    return asyncio.run(measure_lag(run.backing, run.sizes.lag))


def _saga(run: Run) -> list[Row]:
    return asyncio.run(measure_saga(run.backing, run.sizes.saga))


def _rebuild(run: Run) -> list[Row]:
    return asyncio.run(measure_rebuild_row(run.backing, run.sizes.rebuild))


def _memory(run: Run) -> list[Row]:
    return asyncio.run(measure_memory(run.backing, run.sizes.memory))


def _search(run: Run) -> list[Row]:
    return asyncio.run(measure_search(run.backing, run.sizes.search))


_MEASURE: dict[str, Callable[[Run], list[Row]]] = {
    "read": _read,
    "write": _write,
    "relay": _relay,
    "live": _live,
    "lag": _lag,
    "saga": _saga,
    "rebuild": _rebuild,
    "redis-loss": _redis_loss,
    "memory": _memory,
    "search": _search,
}


def blank_rows(name: str, sizes: Sizes) -> list[Row]:
    """The rows bench `name` fills, unmeasured."""
    makers: dict[str, Callable[[], list[Row]]] = {
        "read": read_rows,
        "write": write_rows,
        "relay": relay_rows,
        "live": live_rows,
        "lag": lambda: lag_rows(sizes.lag.replicas),
        "saga": saga_rows,
        "rebuild": rebuild_rows,
        "redis-loss": redis_loss_rows,
        "memory": memory_rows,
        "search": lambda: search_rows(sizes.search),
    }
    return makers[name]()


def run_benches(run: Run, names: Sequence[str], say: Callable[[str], None]) -> list[Row]:
    """Run the benches `names`; a bench that raises gets its rows marked not measured."""
    rows: list[Row] = []
    for name in names:
        say(f"bench {name}: running")
        began = time.monotonic()
        try:
            measured = _MEASURE[name](run)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            measured = not_measured(blank_rows(name, run.sizes), f"{type(exc).__name__}: {exc}"[:300])
        run.seconds[name] = time.monotonic() - began
        say(f"bench {name}: done in {run.seconds[name]:.0f} s")
        rows.extend(measured)
    return rows


def report_header(facts: dict[str, str], sizes: Sizes, command: str, when: datetime, seconds: float) -> list[str]:
    """The lines above the markdown table: when, where, how big, and the command."""
    machine = (
        f"{facts.get('cores', '?')} cores, {facts.get('cpu', '?')}, {facts.get('os', '?')}; "
        f"Python {facts.get('python', '?')}, PostgreSQL {facts.get('postgres', '?')}, Redis {facts.get('redis', '?')}"
    )
    lines = [
        f"Measured {when:%Y-%m-%d %H:%M} UTC with `{command}` ({sizes.profile} sizes, {seconds / 60:.1f} min).",
        "",
        f"- Machine: {machine}.",
        *(f"- Sizes, {line}." for line in sizes.describe()),
        "- The ceiling of each row ran in the same run on the same machine; the ratio is value ÷ ceiling.",
        "  Absolute figures move with whatever else the machine runs; the ratios move much less.",
    ]
    return lines


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    size.add_argument("--full", action="store_true", help="memory bench at 1M events / 100k commands per run")
    parser.add_argument("--only", action="append", choices=BENCHES, help="run only this bench (repeatable)")
    parser.add_argument(
        "--search-sizes",
        type=parse_sizes,
        metavar="N,N",
        help="entities per search bench size (default 100000,1000000; --quick 2000,20000)",
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--markdown", type=Path, help="rewrite the bench markers of this file (default BENCHMARKS.md)")
    out.add_argument("--no-markdown", action="store_true", help="do not rewrite any file")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when a row could not be measured (a goal that is missed never fails the run)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the benches, print the table, rewrite BENCHMARKS.md."""
    parser = _parser()
    args = parser.parse_args(argv)
    raw_args = list(sys.argv[1:] if argv is None else argv)

    names = [name for name in BENCHES if args.only is None or name in args.only]
    markdown: Path | None = None
    if args.markdown is not None:
        markdown = args.markdown
    elif not args.no_markdown and args.only is None:
        markdown = DEFAULT_MARKDOWN
    if markdown is not None:
        if not markdown.is_file():
            parser.error(f"{markdown} does not exist")
        try:  # refused now rather than after the whole run
            replace_between_markers(markdown.read_text(encoding="utf-8"), "")
        except MarkersMissing as exc:
            parser.error(f"{markdown}: {exc}")
    sizes = sizes_for("quick" if args.quick else "full" if args.full else "default")
    if args.search_sizes is not None:
        sizes = replace(sizes, search=replace(sizes.search, sizes=args.search_sizes))
    command = " ".join(["python -m perf bench", *raw_args]).strip()

    def say(message: str) -> None:
        print(f"bench | {message}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    began = time.monotonic()
    when = datetime.now(UTC)
    with backing() as servers:
        facts = asyncio.run(machine_facts(servers))
        run = Run(backing=servers, sizes=sizes)
        rows = run_benches(run, names, say)
    seconds = time.monotonic() - began

    print(render_text(rows))
    header = report_header(facts, sizes, command, when, seconds)
    if markdown is not None:
        document = markdown.read_text(encoding="utf-8")
        markdown.write_text(replace_between_markers(document, render_markdown(rows, header)), encoding="utf-8")
        say(f"wrote {markdown}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": command,
            "measured_at": when.isoformat(),
            "machine": facts,
            "sizes": sizes.describe(),
            "seconds": run.seconds,
            "rows": [{**asdict(row), "ratio": row.ratio, "met": row.met} for row in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    unmeasured = unmeasured_figures(rows)
    if args.strict and unmeasured:
        say(f"not measured: {', '.join(unmeasured)}")
        return 1
    return 0


def unmeasured_figures(rows: Sequence[Row]) -> list[str]:
    """The figures that could not be measured (what --strict fails on; a missed goal is not among them)."""
    return [row.figure for row in rows if row.error is not None]


if __name__ == "__main__":
    sys.exit(main())
