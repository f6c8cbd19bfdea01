"""Finding the migration files."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared_kernel.platform import migrations


def test_migrations_are_numbered_without_gaps(tmp_path: Path) -> None:
    assert [m.version for m in migrations.discover()] == list(range(1, len(migrations.discover()) + 1))
    (tmp_path / "0001_a.sql").write_text("select 1")
    (tmp_path / "0003_c.sql").write_text("select 1")
    with pytest.raises(ValueError, match="without gaps"):
        migrations.discover(tmp_path)
    (tmp_path / "two.sql").write_text("select 1")
    with pytest.raises(ValueError, match=r"0001_name\.sql"):
        migrations.discover(tmp_path)
