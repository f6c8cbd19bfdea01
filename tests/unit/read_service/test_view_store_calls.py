"""How ViewStore groups a batch into script segments, and answers per event from one call."""

from __future__ import annotations

from collections.abc import Sequence

from read_service.projections.base import Op
from read_service.view_store import ApplyResult, Outcome, Segment, encode, encode_calls, results, segments

SET: Sequence[Op] = [("SET", "k", "v")]


def test_no_op_events_ride_along_with_the_next_event_that_writes() -> None:
    events: list[tuple[int, Sequence[Op]]] = [(1, []), (2, []), (3, SET), (4, []), (5, SET), (6, []), (7, []), (8, [])]

    assert segments(events) == [Segment(1, 3, SET), Segment(4, 5, SET), Segment(6, 8)]


def test_a_hole_in_the_positions_closes_a_segment() -> None:
    assert segments([(1, []), (2, []), (4, []), (5, [])]) == [Segment(1, 2), Segment(4, 5)]
    assert segments([(1, []), (3, SET)]) == [Segment(1, 1), Segment(3, 3, SET)]


def test_earlier_no_op_events_start_the_first_segment() -> None:
    assert segments([(7, SET), (8, [])], first=4) == [Segment(4, 7, SET), Segment(8, 8)]


# Each command's code in an op (ops.lua's `commands`).
CODES = {b"SET": 1, b"DEL": 2, b"HINCRBY": 5}


def _packed(command: bytes, key: int, *args: bytes) -> bytes:
    """An op as ops.lua reads it: argument count, command code, key index, lengths, then the arguments."""
    head = bytes([len(args), CODES[command]]) + key.to_bytes(4, "big")
    return head + b"".join(len(a).to_bytes(4, "big") for a in args) + b"".join(args)


def _segment(first: int, last: int, *ops: bytes) -> bytes:
    digits = str(first).encode(), str(last).encode()
    counts = b"".join(n.to_bytes(4, "big") for n in (len(ops), len(digits[0]), len(digits[1])))
    return counts + b"".join(digits) + b"".join(ops)


def test_ops_name_their_key_by_its_index_in_keys_and_pack_into_one_argument() -> None:
    batch = [Segment(1, 2, [("SET", "a", b"x"), ("HINCRBY", "b", "f", -1)]), Segment(3, 3, [("DEL", "a")])]

    keys, argv = encode("cp", batch)

    # KEYS[2] is the fingerprint's key, written by the same call.
    assert keys == ["cp", "cp:fingerprint", "a", "b"]
    assert argv == [
        _segment(1, 2, _packed(b"SET", 3, b"x"), _packed(b"HINCRBY", 4, b"f", b"-1"))
        + _segment(3, 3, _packed(b"DEL", 3))
    ]


def test_per_event_results_match_one_call_per_event() -> None:
    assert results([4, 5, 6], 1, 1) == [ApplyResult(Outcome.GAP, 1)] * 3
    assert results([4, 5, 6], 4, 6) == [
        ApplyResult(Outcome.DUPLICATE, 4),
        ApplyResult(Outcome.APPLIED, 5),
        ApplyResult(Outcome.APPLIED, 6),
    ]
    assert results([4, 5, 6], 9, 9) == [ApplyResult(Outcome.DUPLICATE, 9)] * 3
    assert results([1, 2, 4, 5], 0, 2)[2:] == [ApplyResult(Outcome.GAP, 2)] * 2


def test_a_large_batch_splits_into_calls_at_segment_boundaries() -> None:
    big = [("SET", "k", b"x" * 600)]
    batch = [Segment(position, position, big) for position in range(1, 41)]

    calls = encode_calls("cp", batch, limit=2_000)

    assert len(calls) > 1
    # Every call declares its own keys, and together they carry every segment once, in order.
    assert all(keys == ["cp", "cp:fingerprint", "k"] for keys, _ in calls)
    one = [_segment(position, position, _packed(b"SET", 3, b"x" * 600)) for position in range(1, 41)]
    packed = [argv[0] for _, argv in calls]
    assert all(isinstance(arg, bytes) for arg in packed)
    assert b"".join(arg for arg in packed if isinstance(arg, bytes)) == b"".join(one)


def test_a_run_of_one_command_with_the_same_arguments_packs_as_one_fan_out_op() -> None:
    member, score = "user-1", 1_700_000
    ops: list[Op] = [("ZADD", f"tri:{gram}", score, member) for gram in ("abc", "bcd", "cde")]
    ops.append(("ZADD", "tri:def", score, "user-2"))

    keys, argv = encode("cp", [Segment(1, 1, ops)])

    assert keys == ["cp", "cp:fingerprint", "tri:abc", "tri:bcd", "tri:cde", "tri:def"]
    zadd, digits = 6, str(score).encode()
    fan_out = (
        bytes([255, zadd, 2])
        + (3).to_bytes(4, "big")
        + b"".join(slot.to_bytes(4, "big") for slot in (3, 4, 5))
        + len(digits).to_bytes(4, "big")
        + len(member).to_bytes(4, "big")
        + digits
        + member.encode()
    )
    single = bytes([2, zadd]) + (6).to_bytes(4, "big") + len(digits).to_bytes(4, "big") + (6).to_bytes(4, "big")
    single += digits + b"user-2"
    # The segment still counts four ops: the fan-out op stands for three of them.
    head = b"".join(n.to_bytes(4, "big") for n in (4, 1, 1)) + b"11"
    assert argv == [head + fan_out + single]
