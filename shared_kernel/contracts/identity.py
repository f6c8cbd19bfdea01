"""How identities compare: one definition for the write side's uniqueness and the read side's lookups."""

from __future__ import annotations

import unicodedata


def email_key(email: str) -> str:
    """The form under which two e-mail addresses are the same address.

    Case-insensitive over all of Unicode (not only ASCII, as Postgres' `lower()` is under
    the C locale) and independent of composed/decomposed spellings (NFC), so `Àda@x`,
    `àda@x` and `A\u0300da@x` are one address on both sides.
    """
    return unicodedata.normalize("NFC", email).lower()
