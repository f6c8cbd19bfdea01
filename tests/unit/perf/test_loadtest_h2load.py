"""The h2load engine's pieces: gRPC framing, reading h2load's output and log, and verifying successes."""

from __future__ import annotations

from pathlib import Path

import pytest

from perf.loadtest.h2load import (
    UNVERIFIED,
    H2loadError,
    H2loadRun,
    H2loadSummary,
    command,
    figures,
    grpc_frame,
    grpc_unframe,
    parse_log,
    parse_output,
    plan_runs,
    timeline_of,
    verified_ok,
)
from perf.loadtest.requests import GET_USER
from perf.loadtest.server_counts import difference, parse_counts
from tessera.users.v1 import user_query_service_pb2 as queries

OUTPUT = """starting benchmark...
spawning thread #0: 2 total client(s). Timing-based test with 0s of warm-up time and 2s of main duration.
Application protocol: h2c

finished in 2.01s, 679.50 req/s, 163.62KB/s
requests: 1359 total, 1391 started, 1359 done, 1359 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 1359 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 327.24KB (335090) total, 41.29KB (42279) headers (space savings 70.65%), 222.96KB (228312) data
                     min         max         mean         sd        +/- sd
time for request:     7.61ms    212.97ms     45.44ms     34.80ms    86.90%
"""


def test_a_frame_is_flag_length_and_message() -> None:
    message = queries.GetUserRequest(user_id="0b5c7a52-3a4f-4c0e-9a57-1f1f2b0c6d11").SerializeToString()
    frame = grpc_frame(message)
    assert frame[0] == 0
    assert int.from_bytes(frame[1:5], "big") == len(message)
    assert grpc_unframe(frame) == message
    assert queries.GetUserRequest.FromString(grpc_unframe(frame)).user_id.startswith("0b5c7a52")
    assert grpc_frame(b"") == b"\x00\x00\x00\x00\x00"


def test_a_broken_frame_is_refused() -> None:
    with pytest.raises(ValueError, match="says 3 bytes"):
        grpc_unframe(b"\x00\x00\x00\x00\x03ab")
    with pytest.raises(ValueError, match="uncompressed"):
        grpc_unframe(b"\x01\x00\x00\x00\x00")


def test_the_summary_is_read() -> None:
    summary = parse_output(OUTPUT)
    assert summary.finished_s == pytest.approx(2.01)
    assert summary.rps == pytest.approx(679.5)
    assert (summary.total, summary.started, summary.done, summary.succeeded) == (1359, 1391, 1359, 1359)
    assert (summary.failed, summary.errored, summary.timeout) == (0, 0, 0)
    assert summary.status == {"2xx": 1359, "3xx": 0, "4xx": 0, "5xx": 0}
    assert summary.data_bytes == 228312


def test_milliseconds_in_the_finished_line_are_converted() -> None:
    text = OUTPUT.replace("finished in 2.01s", "finished in 950.5ms")
    assert parse_output(text).finished_s == pytest.approx(0.9505)


def test_output_without_a_summary_is_an_error() -> None:
    with pytest.raises(H2loadError, match="no summary"):
        parse_output("starting benchmark...\nconnect: Connection refused\n")


def test_the_log_gives_latencies_and_http_errors_by_second() -> None:
    rows = parse_log(["1000000\t200\t5000", "1500000\t200\t700000", "garbage", "1200000\t503\t1000", ""])
    assert rows == [(1_000_000, 200, 5000), (1_500_000, 200, 700_000), (1_200_000, 503, 1000)]
    timeline = timeline_of(rows, 1_000_000, duration_s=2.0)
    assert timeline.seconds[0].latencies.count == 1
    assert timeline.seconds[0].errors == {"HTTP_503": 1}
    assert timeline.seconds[1].latencies.max_ms == pytest.approx(700.0)


def test_successes_are_what_the_data_bytes_account_for() -> None:
    everything_ok = H2loadSummary(succeeded=10, data_bytes=10 * (5 + 100), status={"2xx": 10})
    assert verified_ok(everything_ok, 100) == 10
    # Three answers were gRPC errors (HTTP 200, trailers only, no DATA).
    some_errors = H2loadSummary(succeeded=10, data_bytes=7 * (5 + 100), status={"2xx": 10})
    assert verified_ok(some_errors, 100) == 7
    run = H2loadRun(
        target="127.0.0.1:1", method=GET_USER, message=b"", connections=1, streams=1, reply_bytes=100,
        summary=some_errors, rows=[(1_000_000 + i, 200, 1000) for i in range(10)],
    )  # fmt: skip
    _timeline, latencies, errors, ok, _elapsed = figures([run], 1.0)
    assert ok == 7
    assert errors == {UNVERIFIED: 3}
    assert latencies.count == 10


def test_runs_spread_targets_keys_and_concurrency() -> None:
    runs = plan_runs(
        ["a:1", "b:2"], "get_user", ["u1", "u2", "u3"], processes=3, concurrency=10, connections=2, hot=False
    )
    assert [run.target for run in runs] == ["a:1", "b:2", "a:1"]
    keys = [queries.GetUserRequest.FromString(run.message).user_id for run in runs]
    assert keys == ["u1", "u2", "u3"]
    assert sum(run.connections * run.streams for run in runs) >= 10
    hot = plan_runs(["a:1"], "get_user", ["u1", "u2"], processes=2, concurrency=4, connections=2, hot=True)
    assert {queries.GetUserRequest.FromString(run.message).user_id for run in hot} == {"u1"}


def test_the_command_line_carries_the_grpc_headers_and_the_body() -> None:
    argv = command(
        "http://127.0.0.1:5/x.Y/Z", Path("body.bin"), duration_s=3, connections=2, streams=8,
        log_file=Path("log.tsv"), metadata=[("authorization", "Bearer t")],
    )  # fmt: skip
    assert argv[-1] == "http://127.0.0.1:5/x.Y/Z"
    assert argv[argv.index("-D") + 1] == "3"
    assert argv[argv.index("-d") + 1] == "body.bin"
    headers = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-H"]
    assert headers == ["content-type: application/grpc", "te: trailers", "authorization: Bearer t"]


USERS = 'rpc_service="tessera.users.v1.UserQueryService",rpc_system="grpc"'
CATALOG = 'rpc_service="tessera.catalog.v1.ProductQueryService",rpc_system="grpc"'
EXPOSITION = f"""# HELP rpc_server_duration_seconds Duration of unary gRPC calls handled by this server
# TYPE rpc_server_duration_seconds histogram
rpc_server_duration_seconds_bucket{{le="0.005",rpc_grpc_status_code="OK",rpc_method="GetUser",{USERS}}} 90.0
rpc_server_duration_seconds_count{{rpc_grpc_status_code="OK",rpc_method="GetUser",{USERS}}} 120.0
rpc_server_duration_seconds_count{{rpc_grpc_status_code="NOT_FOUND",rpc_method="GetUser",{USERS}}} 3.0
rpc_server_duration_seconds_count{{rpc_grpc_status_code="OK",rpc_method="GetProduct",{CATALOG}}} 7.0
"""


def test_server_counts_are_read_by_method_and_code() -> None:
    assert parse_counts(EXPOSITION, GET_USER) == {"OK": 120, "NOT_FOUND": 3}
    assert parse_counts(EXPOSITION, "/tessera.catalog.v1.ProductQueryService/GetProduct") == {"OK": 7}
    assert parse_counts("", GET_USER) == {}
    assert difference({"OK": 150, "NOT_FOUND": 3}, {"OK": 120, "NOT_FOUND": 3}) == {"OK": 30}
