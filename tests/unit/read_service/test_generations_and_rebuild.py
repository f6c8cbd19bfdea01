"""Generation names, the rebuild's op coalescing (exact against a model of Redis) and its progress line."""

from __future__ import annotations

import io
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from read_service.generations import (
    ParkedEvent,
    checkpoint_key,
    generation_name,
    generation_version,
    keyspace_prefix,
    rebase_keys,
)
from read_service.keys import UserKeys
from read_service.rebuild import Progress, coalesce


def test_generation_names_carry_the_version() -> None:
    assert generation_name(3, 17) == "v3g17"
    assert generation_version("v3g17") == 3
    assert keyspace_prefix("tessera:", "users", "v3g17") == "tessera:{users@v3g17}:"
    assert checkpoint_key("tessera:", "users", "v3g17") == "tessera:{users@v3g17}:users:checkpoint"
    for bad in ("", "3g17", "v3", "vxg1", "v3g17 "):
        with pytest.raises(ValueError, match="not a generation name"):
            generation_version(bad)


def test_the_checkpoint_key_of_a_generation_is_the_one_its_keys_class_uses() -> None:
    keys = UserKeys(keyspace_prefix("p:", "users", "v1g2"))
    assert keys.checkpoint == checkpoint_key("p:", "users", "v1g2")


def test_rebasing_keys_moves_every_key() -> None:
    keys = UserKeys("a:")
    rebase_keys(keys, "b:")
    assert (keys.prefix, keys.checkpoint, keys.view("x")) == ("b:", "b:users:checkpoint", "b:users:view:x")


def test_a_parked_record_round_trips_as_json() -> None:
    record = ParkedEvent("users", "v1g1", 7, "e", "t", "user", "a", "PoisonEvent: bad", "2025-01-01T00:00:00+00:00")
    assert ParkedEvent.from_json(record.to_json()) == record


class RedisModel:
    """The commands projections emit, on dicts, as Redis runs them."""

    def __init__(self) -> None:
        self.data: dict[Any, Any] = {}

    def run(self, op: tuple[Any, ...]) -> None:
        command, key, *args = op
        command = str(command).upper()
        if command == "SET":
            self.data[key] = args[0]
        elif command == "DEL":
            self.data.pop(key, None)
        elif command in ("HSET", "ZADD"):
            target = self.data.setdefault(key, {})
            pairs = zip(args[0::2], args[1::2], strict=True)
            for a, b in pairs:
                if command == "HSET":
                    target[a] = b
                else:
                    target[b] = a
        elif command in ("HDEL", "ZREM"):
            target = self.data.setdefault(key, {})
            for member in args:
                target.pop(member, None)
        elif command == "SADD":
            self.data.setdefault(key, set()).update(args)
        elif command == "SREM":
            self.data.setdefault(key, set()).difference_update(args)
        elif command == "HINCRBY":
            target = self.data.setdefault(key, {})
            target[args[0]] = int(target.get(args[0], 0)) + int(args[1])
        else:
            raise AssertionError(command)


keys = st.sampled_from(["k1", "k2", "k3"])
members = st.sampled_from(["a", "b", "c"])
ops = st.one_of(
    st.tuples(st.just("SET"), keys, st.integers(0, 9)),
    st.tuples(st.just("DEL"), keys),
    st.tuples(st.just("HSET"), keys, members, st.integers(0, 9)),
    st.tuples(st.just("HDEL"), keys, members),
    st.tuples(st.just("HINCRBY"), keys, members, st.integers(-3, 3)),
    st.tuples(st.just("ZADD"), keys, st.just(0), members),
    st.tuples(st.just("ZREM"), keys, members),
    st.tuples(st.just("SADD"), keys, members),
    st.tuples(st.just("SREM"), keys, members),
)


def _apply(sequence: list[tuple[Any, ...]]) -> dict[Any, Any]:
    model = RedisModel()
    for op in sequence:
        model.run(op)
    return model.data


@given(st.lists(ops, max_size=60))
def test_coalescing_has_the_effect_of_the_ops_it_replaces(sequence: list[tuple[Any, ...]]) -> None:
    # Commands on one key keep their types apart here, as a projection's keys do.
    typed = [op for op in sequence if _type_of(op) == _first_type(sequence, op[1])]
    merged = coalesce(typed)
    assert len(merged) <= len(typed)
    assert _apply(merged) == _apply(typed)


def _type_of(op: tuple[Any, ...]) -> str:
    return {"SET": "s", "DEL": "any", "HSET": "h", "HDEL": "h", "HINCRBY": "h"}.get(op[0], "z" if "Z" in op[0] else "t")


def _first_type(sequence: list[tuple[Any, ...]], key: str) -> str:
    for op in sequence:
        if op[1] == key and _type_of(op) != "any":
            return _type_of(op)
    return "any"


def test_coalescing_merges_what_a_registration_batch_emits() -> None:
    batch = []
    for user in ("u1", "u2", "u3"):
        batch += [
            ("SET", f"view:{user}", b"v1"),
            ("HSET", "by_email", f"{user}@x", user),
            ("ZADD", "idx", 0, user.encode()),
            ("HINCRBY", "stats", "users", 1),
            ("HINCRBY", "stats", "active_users", 1),
        ]
    batch.append(("SET", "view:u1", b"v2"))
    merged = coalesce(batch)
    assert ("ZADD", "idx", 0, b"u1", 0, b"u2", 0, b"u3") in merged
    assert ("HINCRBY", "stats", "users", 3) in merged
    assert ("SET", "view:u1", b"v2") in merged
    assert len(merged) == 3 + 1 + 1 + 2


def test_the_progress_line_shows_rate_and_eta() -> None:
    stream = io.StringIO()
    progress = Progress("users v1g2", 1000, stream, interval_s=0)
    progress.advance(250)
    progress.finish()
    line = stream.getvalue().splitlines()[-1]
    assert line.startswith("users v1g2 [")
    assert "250/1,000 events" in line and "25.0%" in line and "events/s" in line and "ETA" in line
