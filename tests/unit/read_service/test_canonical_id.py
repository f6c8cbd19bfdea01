"""canonical_id: the canonical form passes as it is; every other UUID spelling is canonicalized."""

from __future__ import annotations

import uuid

import pytest

from read_service.projections.base import PoisonEvent
from read_service.projections.support import canonical_id

ID = uuid.UUID("6f1d2c3b-4a59-4e68-9b7a-0c1d2e3f4a5b")


@pytest.mark.parametrize("spelling", [str(ID), str(ID).upper(), ID.hex, f"{{{ID}}}", f"urn:uuid:{ID}"])
def test_every_spelling_of_a_uuid_gives_the_canonical_form(spelling: str) -> None:
    assert canonical_id(spelling, "id") == str(ID)


@pytest.mark.parametrize("value", ["", "nope", f"{ID}\n", str(ID)[:-1], f" {ID}"])
def test_anything_else_is_poison(value: str) -> None:
    with pytest.raises(PoisonEvent):
        canonical_id(value, "id")
