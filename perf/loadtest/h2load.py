"""The h2load engine: nghttp2's h2load sends gRPC calls as plain HTTP/2 requests, from C, far faster than Python.

A gRPC call is an HTTP/2 POST of one length-prefixed message (a 0 byte for "not compressed",
the length as 4 bytes big-endian, then the serialized request) with `content-type:
application/grpc` and `te: trailers`. h2load sends one body for the whole run, so:

- a run covers one query kind (a "mix" is one run per kind) and, per h2load process, one key:
  with `--processes P` each process gets a different seeded id (with `--hot` all the same);
- it has no request-rate model (its --rate starts connections per period): runs are closed
  model only, `--concurrency C` split over the processes as connections x streams;
- h2load counts every HTTP 200 as a success, and gRPC answers errors with HTTP 200 and a
  grpc-status trailer. Success is verified another way: before the run, a Python client sends
  each exact body and must get OK and a reply of N bytes; after it, the DATA bytes h2load
  received must be ok x (5 + N), because an error answer carries no message at all. Replies
  that DATA cannot account for are counted as errors (GRPC_ERROR_UNVERIFIED).

Latencies come from h2load's per-request log (`--log-file`): they include every answer.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from perf.loadtest import server_counts
from perf.loadtest.probe import preflight
from perf.loadtest.requests import READ_METHODS, SeedData, query_body
from perf.loadtest.schedule import split_evenly
from perf.loadtest.stats import Histogram, Timeline, add_errors
from perf.report import build_report

H2LOAD = "/usr/bin/h2load"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
UNVERIFIED = "GRPC_ERROR_UNVERIFIED"


class H2loadError(RuntimeError):
    """The run cannot be done with h2load (or h2load failed); the message says why."""


def h2load_path() -> str | None:
    """Where h2load is, if installed."""
    return shutil.which("h2load") or (H2LOAD if Path(H2LOAD).exists() else None)


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC message frame: flag byte 0, big-endian length, the message."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def grpc_unframe(frame: bytes) -> bytes:
    """The message of a single uncompressed frame; ValueError when `frame` is not exactly one."""
    if len(frame) < 5 or frame[0] != 0:
        raise ValueError("not an uncompressed gRPC frame")
    (length,) = struct.unpack(">I", frame[1:5])
    if len(frame) != 5 + length:
        raise ValueError(f"the frame says {length} bytes but holds {len(frame) - 5}")
    return frame[5:]


@dataclass
class H2loadSummary:
    """What h2load printed at the end of a run."""

    finished_s: float = 0.0
    rps: float = 0.0
    total: int = 0
    started: int = 0
    done: int = 0
    succeeded: int = 0
    failed: int = 0
    errored: int = 0
    timeout: int = 0
    status: dict[str, int] = field(default_factory=dict)
    data_bytes: int = 0


_FINISHED = re.compile(r"^finished in ([\d.]+)(ms|s|us), ([\d.]+) req/s", re.MULTILINE)
_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
    r"(\d+) timeout",
    re.MULTILINE,
)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.MULTILINE)
_DATA = re.compile(r"^traffic: .*?, [^,]*\((\d+)\) data", re.MULTILINE)


def parse_output(text: str) -> H2loadSummary:
    """Read h2load's summary; H2loadError when the lines are missing (e.g. it could not connect at all)."""
    finished, requests = _FINISHED.search(text), _REQUESTS.search(text)
    if finished is None or requests is None:
        raise H2loadError(f"h2load printed no summary:\n{text[-2000:]}")
    scale = {"s": 1.0, "ms": 1e-3, "us": 1e-6}[finished.group(2)]
    summary = H2loadSummary(finished_s=float(finished.group(1)) * scale, rps=float(finished.group(3)))
    (
        summary.total,
        summary.started,
        summary.done,
        summary.succeeded,
        summary.failed,
        summary.errored,
        summary.timeout,
    ) = (int(value) for value in requests.groups())
    status = _STATUS.search(text)
    if status is not None:
        summary.status = dict(zip(("2xx", "3xx", "4xx", "5xx"), (int(v) for v in status.groups()), strict=True))
    data = _DATA.search(text)
    if data is not None:
        summary.data_bytes = int(data.group(1))
    return summary


def parse_log(lines: Iterable[str]) -> list[tuple[int, int, int]]:
    """h2load's --log-file rows: (start, µs since the epoch; HTTP status; duration, µs). Malformed lines are skipped."""
    rows = []
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and all(part.lstrip("-").isdigit() for part in parts):
            rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return rows


def timeline_of(rows: Sequence[tuple[int, int, int]], window_start_us: int, duration_s: float) -> Timeline:
    """Per-second latencies (by the second a request ended) of logged requests; non-200 answers as HTTP_<status>."""
    timeline = Timeline()
    last = max(0, math.ceil(duration_s) - 1)
    for start_us, status, duration_us in rows:
        index = min(last, max(0, (start_us + duration_us - window_start_us) // 1_000_000))
        second = timeline.second(int(index))
        if status == 200:
            second.latencies.record(duration_us / 1000.0)
        else:
            code = f"HTTP_{status}"
            second.errors[code] = second.errors.get(code, 0) + 1
    return timeline


def verified_ok(summary: H2loadSummary, reply_bytes: int) -> int:
    """Answers the DATA bytes prove to be OK replies (each OK reply is one frame of 5 + reply_bytes)."""
    if reply_bytes <= 0:
        return 0
    return min(summary.succeeded, summary.data_bytes // (5 + reply_bytes))


def command(
    url: str, body_file: Path, *, duration_s: float | None, connections: int, streams: int, log_file: Path | None,
    metadata: Sequence[tuple[str, str]] = (), requests: int | None = None,
) -> list[str]:  # fmt: skip
    """The h2load argv of one closed-model run: for `duration_s` seconds, or of `requests` requests."""
    argv = [h2load_path() or H2LOAD, "-c", str(connections), "-m", str(streams), "-t", "1", "-d", str(body_file)]
    argv += ["-D", f"{duration_s:g}"] if duration_s is not None else ["-n", str(requests or 1)]
    if log_file is not None:
        argv += ["--log-file", str(log_file)]
    for header in (*GRPC_HEADERS, *(f"{key}: {value}" for key, value in metadata)):
        argv += ["-H", header]
    return [*argv, url]


@dataclass
class H2loadRun:
    """One h2load process: its target, request, shape and, afterwards, its results."""

    target: str
    method: str
    message: bytes
    connections: int
    streams: int
    reply_bytes: int = 0
    summary: H2loadSummary = field(default_factory=H2loadSummary)
    rows: list[tuple[int, int, int]] = field(default_factory=list)


def plan_runs(
    targets: Sequence[str], kind: str, ids: Sequence[str], *, processes: int, concurrency: int, connections: int,
    hot: bool,
) -> list[H2loadRun]:  # fmt: skip
    """One run per process, targets round-robin, a different key each (the first with `hot`)."""
    processes = max(processes, len(targets))
    processes = min(processes, concurrency)
    runs = []
    for index, share in enumerate(split_evenly(concurrency, processes)):
        key = ids[0] if hot else ids[index % len(ids)]
        conns = max(1, min(share, connections))
        runs.append(
            H2loadRun(
                target=targets[index % len(targets)],
                method=READ_METHODS[kind],
                message=query_body(kind, key),
                connections=conns,
                streams=math.ceil(share / conns),
            )
        )
    return runs


def execute(
    runs: Sequence[H2loadRun], duration_s: float, metadata: Sequence[tuple[str, str]], out: Path, *,
    progress: bool = True, warm_up_requests: int = 0,
) -> None:  # fmt: skip
    """Pre-flight every body, run every h2load process side by side, read their summaries and logs.

    With `warm_up_requests`, each run first sends that many requests in a separate, unmeasured
    h2load run (h2load's own --warm-up-time would count the warm-up's bytes in the DATA total
    that verifies the successes).
    """
    if h2load_path() is None:
        raise H2loadError("h2load is not installed (apt-get install nghttp2-client), use --engine python")
    preflight_all(runs, metadata)
    bodies = []
    for index, run in enumerate(runs):
        body = out / f"body-{index}.bin"
        body.write_bytes(grpc_frame(run.message))
        bodies.append(body)
    if warm_up_requests > 0:
        warm_up(runs, bodies, metadata, warm_up_requests)
    processes = []
    for index, (run, body) in enumerate(zip(runs, bodies, strict=True)):
        argv = command(
            f"http://{run.target}{run.method}", body, duration_s=duration_s, connections=run.connections,
            streams=run.streams, log_file=out / f"log-{index}.tsv", metadata=metadata,
        )  # fmt: skip
        processes.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        _wait_all(processes, duration_s, progress=progress)
        for index, (run, process) in enumerate(zip(runs, processes, strict=True)):
            run.summary = parse_output(process.communicate()[0])
            log = out / f"log-{index}.tsv"
            run.rows = parse_log(log.read_text().splitlines()) if log.exists() else []
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def preflight_all(runs: Sequence[H2loadRun], metadata: Sequence[tuple[str, str]]) -> None:
    """Send each run's exact body once with a Python client; note the reply's size; H2loadError unless OK."""
    for run in runs:
        code, length, details = asyncio.run(preflight(run.target, run.method, run.message, metadata))
        if code != "OK":
            raise H2loadError(
                f"the pre-flight call of {run.method} on {run.target} answered {code} ({details}); h2load would "
                "count such answers as successes, so the run is not started"
            )
        run.reply_bytes = length


def warm_up(runs: Sequence[H2loadRun], bodies: Sequence[Path], metadata: Sequence[tuple[str, str]], count: int) -> None:
    """Send `count` requests per run, side by side, unmeasured."""
    processes = [
        subprocess.Popen(
            command(
                f"http://{run.target}{run.method}", body, duration_s=None, connections=run.connections,
                streams=run.streams, log_file=None, metadata=metadata, requests=count,
            ),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for run, body in zip(runs, bodies, strict=True)
    ]  # fmt: skip
    try:
        for process in processes:
            process.wait(timeout=120)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _wait_all(processes: Sequence[subprocess.Popen[str]], duration_s: float, *, progress: bool) -> None:
    started = time.monotonic()
    while any(process.poll() is None for process in processes):
        if time.monotonic() - started > duration_s + 60:
            raise H2loadError("h2load did not finish within a minute of the run's end")
        time.sleep(min(1.0, max(0.05, duration_s / 10)))
        if progress:
            sys.stderr.write(
                f"[{time.monotonic() - started:5.0f} s] h2load running ({len(processes)} process(es)); "
                "figures at the end\n"
            )
            sys.stderr.flush()


def figures(runs: Sequence[H2loadRun], duration_s: float) -> tuple[Timeline, Histogram, dict[str, int], int, float]:
    """(timeline, latencies, errors by code, verified OK answers, elapsed seconds) of finished runs."""
    starts = [row[0] for run in runs for row in run.rows]
    timeline = timeline_of([row for run in runs for row in run.rows], min(starts) if starts else 0, duration_s)
    latencies = timeline.total().latencies
    errors: dict[str, int] = add_errors({}, timeline.total().errors)
    ok = 0
    for run in runs:
        verified = verified_ok(run.summary, run.reply_bytes)
        ok += verified
        unverified = run.summary.succeeded - verified
        # Non-2xx answers are already in the log's HTTP_<status> counts.
        non_ok_http = sum(count for name, count in run.summary.status.items() if name != "2xx")
        unverified -= non_ok_http
        if unverified > 0:
            errors[UNVERIFIED] = errors.get(UNVERIFIED, 0) + unverified
        for name, count in (("H2LOAD_ERRORED", run.summary.errored), ("H2LOAD_TIMEOUT", run.summary.timeout)):
            if count:
                errors[name] = errors.get(name, 0) + count
    elapsed = max((run.summary.finished_s for run in runs), default=duration_s)
    return timeline, latencies, errors, ok, elapsed


def verified_by(runs: Sequence[H2loadRun]) -> str:
    """How the run's successes were verified, with its figures."""
    parts = [
        f"{run.target}: reply {run.reply_bytes} B, DATA {run.summary.data_bytes} B = "
        f"{verified_ok(run.summary, run.reply_bytes)} x {5 + run.reply_bytes} B of {run.summary.succeeded} HTTP 200"
        for run in runs
    ]
    return (
        "h2load counts gRPC errors as HTTP 200, so a python pre-flight call of each exact request returned OK, and "
        "the DATA bytes h2load received must equal ok x (5 + reply size), an error answer carrying none: "
        + "; ".join(parts)
    )


def run_read(args: argparse.Namespace, mix: Mapping[str, int], seed: SeedData) -> dict[str, object]:
    """`read --engine h2load`: the report."""
    if len(mix) != 1:
        raise H2loadError(
            "h2load sends one request body per run: pass one query kind (e.g. --mix get_user=1) and run once per kind"
        )
    if args.rate is not None:
        raise H2loadError(
            "h2load has no request-rate (open) model (its --rate starts connections per period): use --concurrency, "
            "or --engine python for --rate"
        )
    kind = next(iter(mix))
    concurrency = args.concurrency or 64
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    runs = plan_runs(
        args.target, kind, seed.ids_for(kind), processes=args.processes, concurrency=concurrency,
        connections=args.connections, hot=args.hot,
    )  # fmt: skip
    metrics_urls = [url for url in (args.metrics_url or "").split(",") if url]
    method = READ_METHODS[kind]
    before = server_counts.scrape(metrics_urls, method) if metrics_urls else {}
    with tempfile.TemporaryDirectory(prefix="tessera-h2load-") as scratch:
        execute(runs, args.duration, metadata, Path(scratch))
    report = report_of(runs, mode="read", targets=args.target, duration_s=args.duration, extra={"mix": dict(mix),
                       "hot": args.hot})  # fmt: skip
    if metrics_urls:
        seen = server_counts.difference(server_counts.scrape(metrics_urls, method), before)
        report["server_counts"] = seen
        report["verified_by"] = (
            f"{report['verified_by']}; the servers' own counters ({', '.join(metrics_urls)}) saw "
            + (", ".join(f"{code} {count}" for code, count in seen.items()) or "no calls")
            + " (including the pre-flight and any other client's calls)"
        )
    return report


def report_of(
    runs: Sequence[H2loadRun], *, mode: str, targets: Sequence[str], duration_s: float,
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:  # fmt: skip
    """The JSON report of finished runs."""
    timeline, latencies, errors, ok, elapsed = figures(runs, duration_s)
    return build_report(
        mode=mode,
        engine="h2load",
        targets=targets,
        processes=len(runs),
        rate=None,
        concurrency=sum(run.connections * run.streams for run in runs),
        duration_s=duration_s,
        timeline=timeline,
        elapsed_s=elapsed,
        verified_by=verified_by(runs),
        latencies=latencies,
        errors=errors,
        ok=ok,
        extra={
            **(extra or {}),
            "h2load": [
                {"target": run.target, "connections": run.connections, "streams_per_connection": run.streams,
                 "requests_done": run.summary.done, "h2load_rps": run.summary.rps}
                for run in runs
            ],
            "latency_note": "h2load's per-request times, from its log; they include every answer",
        },
    )  # fmt: skip
