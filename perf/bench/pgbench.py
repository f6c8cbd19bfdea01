"""pgbench as a ceiling: Postgres's own client running a command's SQL, transactions/s.

pgbench ships with Postgres. `make bench` finds it as, in order: the PGBENCH environment
variable, `pgbench` on PATH, `pg_config --bindir`/pgbench, then the newest
/usr/lib/postgresql/<version>/bin/pgbench (Debian and Ubuntu keep it there, off PATH).
Without it the pgbench rows say "not measured" and why, and a service row whose ceiling
needs it falls back to the bare gRPC ceiling alone, saying so in its notes.

The scripts are built from the write service's own statements (`pg_calls.compose` of the
same steps its repositories write), with every value an SQL expression pgbench evaluates
per transaction, so the ceiling follows the service's SQL as it changes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from shared_kernel.contracts.event_log import _INSERT_ROWS as OUTBOX_INSERT_ROWS
from write_service.adapters.catalog import _INSERT as PRODUCT_INSERT
from write_service.adapters.catalog import _SELECT as PRODUCT_SELECT
from write_service.adapters.catalog import _SKU_TAKEN as SKU_TAKEN
from write_service.adapters.pg_calls import Step, compose
from write_service.adapters.unit_of_work import _INSERT_COMMAND_LOG as COMMAND_LOG_INSERT
from write_service.adapters.unit_of_work import _LOCK_AND_SELECT_STORED_REPLY as KEY_LOCK_AND_LOOK_UP
from write_service.adapters.unit_of_work import _UPSERT_STORED_REPLY as STORED_REPLY_UPSERT

_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\$(\d+)")

# A ProductAdded / ProductRestocked payload is about this many bytes.
_PAYLOAD = "decode(repeat('0a', 96), 'hex')"


class PgbenchError(RuntimeError):
    """pgbench is missing, failed, or printed no rate."""


def find_pgbench() -> str | None:
    """The pgbench executable (see the module docstring for the order), or None."""
    configured = os.environ.get("PGBENCH")
    if configured:
        return configured if Path(configured).is_file() else None
    on_path = shutil.which("pgbench")
    if on_path:
        return on_path
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            bindir = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            bindir = ""
        if bindir and (Path(bindir) / "pgbench").is_file():
            return str(Path(bindir) / "pgbench")
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pgbench"),
        key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0,
    )
    return str(versions[-1]) if versions else None


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _fill(sql: str, values: list[str]) -> str:
    """`sql` with each `$n` replaced by the n-th SQL expression."""
    return _PLACEHOLDER.sub(lambda m: f"({values[int(m.group(1)) - 1]})", sql)


# Every command of the service's bench load carries an idempotency key, so the scripts do
# what a keyed command does: the key's lock and look-up, then the stored reply and the
# lock's release in the write statement.
_KEY_VARIABLES = "\\set lock random(1, 4000000000000000000)\n"
_KEY = "'k-' || (:client_id)::text || '-' || (:lock)::text"
_LOCK = "(:lock)::bigint"


def _write(steps: list[tuple[str, list[str]]]) -> str:
    """One statement of the steps, as the service composes it, releasing the key's lock; values are expressions."""
    # The stored reply is a guard in the service (exactly one row); so it is here.
    guarded = {STORED_REPLY_UPSERT}
    markers = {f"write-guard:{index}" for index in range(len(steps))}
    sql, args = compose(
        [Step(text, tuple(values), expect_rows=1 if text in guarded else None) for text, values in steps],
        unlock=[0],
    )
    # compose() adds a text parameter per guard (its marker) and the lock ids it releases.
    values = [_lit(value) if isinstance(value, str) and value in markers else str(value) for value in args]
    values[-1] = f"ARRAY[{_LOCK}]"
    return " ".join(_fill(sql, values).split())


def _key_look_up(command_type: str) -> str:
    return _fill(KEY_LOCK_AND_LOOK_UP, ["'bench'", _lit(command_type), _KEY, _LOCK])


def _stored_reply(command_type: str, aggregate_id: str) -> tuple[str, list[str]]:
    return STORED_REPLY_UPSERT, [
        "'bench'",
        _lit(command_type),
        _KEY,
        _LOCK,
        "sha256(gen_random_uuid()::text::bytea)",
        "gen_random_uuid()",
        aggregate_id,
        "1",
        "decode(repeat('0a', 48), 'hex')",
        "now()",
        "now() + interval '1 day'",
    ]


def _outbox(event_type: str, aggregate_id: str, version: str = "1::bigint") -> tuple[str, list[str]]:
    return OUTBOX_INSERT_ROWS, [
        "ARRAY[gen_random_uuid()]",
        f"ARRAY[{_lit(event_type)}]",
        "ARRAY[1]",
        "ARRAY['product']",
        f"ARRAY[{aggregate_id}]",
        f"ARRAY[{version}]",
        f"ARRAY[{_PAYLOAD}]",
        "ARRAY[now()]",
        "ARRAY[gen_random_uuid()::text]",
        "ARRAY[gen_random_uuid()::text]",
        "ARRAY[''::text]",
        "ARRAY[''::text]",
    ]


def _command_log(command_type: str, aggregate_id: str) -> tuple[str, list[str]]:
    return COMMAND_LOG_INSERT, [
        "gen_random_uuid()",
        _lit(command_type),
        "'product'",
        aggregate_id,
        "gen_random_uuid()::text",
        "now()",
        "now()",
        "'succeeded'",
        "'OK'",
        "''",
        "ARRAY[gen_random_uuid()]",
        _lit('{"sku": "bench"}'),
        "'bench'",
        "''",
        "NULL",
    ]


def add_product_script() -> str:
    """A keyed AddProduct as the service sends it: the key, the sku pre-check, then one write statement."""
    sku = "'pgb-' || (:client_id)::text || '-' || (:n)::text"
    product = [
        "gen_random_uuid()",
        sku,
        "'Analytical Engine'",
        "'EUR'",
        "1999",
        "10",
        "false",
        "''",
        "1",
        "now()",
        "now()",
    ]
    aggregate_id = "gen_random_uuid()::text"
    write = _write(
        [
            (PRODUCT_INSERT, product),
            _outbox("tessera.catalog.v1.ProductAdded", aggregate_id),
            _command_log("AddProduct", aggregate_id),
            _stored_reply("AddProduct", aggregate_id),
        ]
    )
    return (
        f"\\set n random(1, 9000000000000000000)\n{_KEY_VARIABLES}"
        f"{' '.join(_key_look_up('AddProduct').split())};\n"
        f"{_fill(SKU_TAKEN, [sku])};\n"
        f"{write};\n"
    )


def hot_restock_script(product_id: str) -> str:
    """A keyed RestockProduct on one product: the key, the read, then one write statement.

    The service computes the new stock and version from its read and guards the write by
    that version; pgbench cannot, so its UPDATE adds in SQL. The statements and rows
    written are the same; the ceiling is how fast Postgres commits changes to one row.
    """
    pid = _lit(product_id)
    # A bench script: the one value formatted in is a quoted literal of the bench's own product id.
    changes = "stock_available = stock_available + 1, version = version + 1, updated_at = now()"
    update = f"UPDATE products SET {changes} WHERE id = {pid} RETURNING version"  # noqa: S608
    write = _write(
        [
            (update, []),
            # The event's version is the one the update wrote (the first step's CTE).
            _outbox("tessera.catalog.v1.ProductRestocked", f"{pid}::text", "(SELECT version FROM step_0)"),
            _command_log("RestockProduct", f"{pid}::text"),
            _stored_reply("RestockProduct", f"{pid}::text"),
        ]
    )
    return (
        f"{_KEY_VARIABLES}{' '.join(_key_look_up('RestockProduct').split())};\n"
        f"{_fill(PRODUCT_SELECT, [pid + '::uuid'])};\n{write};\n"
    )


def run_pgbench(database_url: str, script: str, *, clients: int, duration_s: float, threads: int = 2) -> float:
    """Transactions/s of `script` run by `clients` for `duration_s` (prepared statements, no vacuum)."""
    executable = find_pgbench()
    if executable is None:
        raise PgbenchError("pgbench not found (PGBENCH, PATH, pg_config --bindir, /usr/lib/postgresql/*/bin)")
    with tempfile.NamedTemporaryFile("w", suffix=".sql", prefix="tessera-pgbench-") as file:
        file.write(script)
        file.flush()
        argv = [
            executable,
            "--no-vacuum",
            "--protocol=prepared",
            f"--client={clients}",
            f"--jobs={min(threads, clients)}",
            f"--time={max(1, round(duration_s))}",
            f"--file={file.name}",
            database_url,
        ]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PgbenchError(f"pgbench did not run: {exc}") from exc
    found = _TPS.search(done.stdout)
    if done.returncode != 0 or found is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise PgbenchError(f"pgbench failed ({done.returncode}): {' | '.join(tail)}")
    return float(found.group(1))
