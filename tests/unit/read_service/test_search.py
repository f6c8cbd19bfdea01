"""The trigram helpers of the search index: which grams a text has, how an update moves them, paging."""

from __future__ import annotations

import uuid

from read_service.search import entity_of, gram_ops, grams, member
from read_service.views.paging import after


def test_grams_are_case_folded_and_never_span_two_texts() -> None:
    assert grams(["AbcD"]) == {"abc", "bcd"}
    assert grams(["ab", "cd"]) == set()  # "abc" would span the two
    assert grams(["Straße"]) == grams(["STRASSE"])  # full case folding, as the query folds the term
    assert grams(["*?[", "a\x00b"]) == {"*?[", "a\x00b"}  # any character is literal


def test_every_substring_of_three_or_more_has_only_grams_of_its_text() -> None:
    text = "Ada.Lovelace@Example.org"
    for start in range(len(text)):
        for end in range(start + 3, len(text) + 1):
            assert grams([text[start:end]]) <= grams([text])


ID = "0b6a4f44-7d1e-4c39-9a55-1f0d2c3b4a59"


def test_gram_ops_remove_what_is_gone_and_add_what_is_new() -> None:
    packed = uuid.UUID(ID).bytes
    ops = gram_ops(lambda g: f"k:{g}", ID, {"abc", "bcd"}, {"bcd", "cde"}, 7)
    assert ops == [("ZREM", "k:abc", packed), ("ZADD", "k:cde", 7, packed)]
    assert gram_ops(lambda g: g, ID, {"x"}, {"x"}, 7) == []
    # A new rank rescores every trigram the entity keeps.
    assert gram_ops(lambda g: g, ID, {"x", "y"}, {"x"}, 9, rank_changed=True) == [
        ("ZREM", "y", packed),
        ("ZADD", "x", 9, packed),
    ]


def test_members_are_an_ids_16_bytes_in_the_order_of_its_text() -> None:
    ids = sorted(str(uuid.UUID(int=n * 0x1F3D5B79A1B2C3D4E5F60718293A4B5C % (1 << 128))) for n in range(200))
    packed = [member(i) for i in ids]
    assert all(len(m) == 16 for m in packed)
    # Redis orders ties of rank by member bytes: the same order as the sort index's id text.
    assert sorted(packed) == packed
    assert [entity_of(m) for m in packed] == ids


def test_after_orders_members_as_bylex_does_and_starts_after_the_cursor() -> None:
    members = [b"b", b"a", b"d", b"c", b"a\x00z"]
    assert after(list(members), None, False) == [b"a", b"a\x00z", b"b", b"c", b"d"]
    assert after(list(members), b"b", False) == [b"c", b"d"]
    assert after(list(members), b"c", True) == [b"b", b"a\x00z", b"a"]
