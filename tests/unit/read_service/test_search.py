"""The trigram helpers of the search index: which grams a text has, how an update moves them, paging."""

from __future__ import annotations

from read_service.search import gram_ops, grams
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


def test_gram_ops_remove_what_is_gone_and_add_what_is_new() -> None:
    ops = gram_ops(lambda g: f"k:{g}", "id-1", {"abc", "bcd"}, {"bcd", "cde"}, 7)
    assert ops == [("ZREM", "k:abc", "id-1"), ("ZADD", "k:cde", 7, "id-1")]
    assert gram_ops(lambda g: g, "id", {"x"}, {"x"}, 7) == []
    # A new rank rescores every trigram the entity keeps.
    assert gram_ops(lambda g: g, "id", {"x", "y"}, {"x"}, 9, rank_changed=True) == [
        ("ZREM", "y", "id"),
        ("ZADD", "x", 9, "id"),
    ]


def test_after_orders_members_as_bylex_does_and_starts_after_the_cursor() -> None:
    members = [b"b", b"a", b"d", b"c", b"a\x00z"]
    assert after(list(members), None, False) == [b"a", b"a\x00z", b"b", b"c", b"d"]
    assert after(list(members), b"b", False) == [b"c", b"d"]
    assert after(list(members), b"c", True) == [b"b", b"a\x00z", b"a"]
