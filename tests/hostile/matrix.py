"""The bad-input matrix: every RPC, each hostile input, and the status it must answer.

One definition serves the test that runs it against the real stack
(test_bad_input_matrix.py) and the renderer that writes docs/bad-input-matrix.md from
that run's results (render_matrix.py). Bodies are built as raw bytes, so inputs that no
generated stub would send (invalid UTF-8, corrupt wire format, overflowing varints) are
sent as they are.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from shared_kernel.contracts.consistency import encode_token
from tessera.catalog.v1 import catalog_command_service_pb2 as ccmd
from tessera.catalog.v1 import product_query_service_pb2 as cqry
from tessera.common.v1 import money_pb2
from tessera.orders.v1 import order_command_service_pb2 as ocmd
from tessera.orders.v1 import order_pb2
from tessera.orders.v1 import order_query_service_pb2 as oqry
from tessera.users.v1 import user_command_service_pb2 as cmd
from tessera.users.v1 import user_query_service_pb2 as qry

COMMANDS = "/tessera.users.v1.UserCommandService/"
QUERIES = "/tessera.users.v1.UserQueryService/"
HEALTH = "/grpc.health.v1.Health/Check"

KIB = 1024
MIB = 1024 * KIB
# The longest search term allowed, every trigram of it different (CJK ideographs): one index lookup per trigram.
DISTINCT_100 = "".join(chr(0x4E00 + n) for n in range(100))
UNKNOWN_ID = "7d444840-9dc0-11d1-b245-5ffdce74fad2"
VALID_PASSWORD = "correct horse battery"


# --- wire-format helpers -----------------------------------------------------------------


def varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative numbers as their 64-bit two's complement."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint_field(number: int, value: int) -> bytes:
    """A varint field (wire type 0)."""
    return varint(number << 3) + varint(value)


def bytes_field(number: int, raw: bytes) -> bytes:
    """A length-delimited field (wire type 2) holding `raw` as it is, valid UTF-8 or not."""
    return varint(number << 3 | 2) + varint(len(raw)) + raw


def encode(message: Message) -> bytes:
    """A message as its stub would send it."""
    return message.SerializeToString()


# Bytes no protobuf parser accepts: field number 0 / wire type 7 tags and a length that overflows.
CORRUPT_TAGS = b"\xff" * 16
OVERFLOWING_LENGTH = b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 8
TRUNCATED = b"\x0a\x64abc"  # field 1 announces 100 bytes, 3 follow
# Start-group tags nested deeper than the runtime's recursion limit (100).
DEEP_GROUPS = b"\x0b" * 200 + b"\x0c" * 200
INVALID_UTF8 = b"\xff\xfe\xc3\x28"
SEEDED_NOISE = random.Random(20_240_601).randbytes(1 * KIB)
MADE_UP_TOKEN = "AQAAAAAAAAAAdGhpcy1pcy1ub3QtYS1jdXJzb3ItYW5kLW5vdC1hLXRhZy0xMjM0NTY3ODkw"


# --- what a case needs from the running stack ----------------------------------------------


@dataclass
class Given:
    """Values the stack produced before the cases run: a real user and real page tokens."""

    user_id: str
    email: str
    # A token from ListUsers(page_size=1) with the default filter, sort and search.
    page_token: str
    # A token with the right shape, signed with the public development key instead of the stack's.
    foreign_token: str
    canary: str = ""


Build = Callable[[Given], bytes]
Target = Literal["write", "read"]
Watch = Literal["postgres", "redis", "none"]


@dataclass(frozen=True)
class Case:
    """One row: what is sent where, and the status it must get."""

    key: str
    rpc: str
    description: str
    build: Build
    expected: str
    target: Target
    # Which store must not see the call (or, for a control row, must see it).
    watch: Watch = "none"
    timeout: float = 10.0
    metadata: tuple[tuple[str, str], ...] = field(default=())
    # Other statuses that timing alone may produce (a 1 ms deadline races the work it bounds).
    may_also: tuple[str, ...] = ()

    @property
    def method(self) -> str:
        """Full method path of the call."""
        return self.rpc if self.rpc.startswith("/") else (COMMANDS if self.target == "write" else QUERIES) + self.rpc

    @property
    def rpc_label(self) -> str:
        """Short name for the table."""
        return self.method.rsplit("/", 2)[-2].rsplit(".", 1)[-1] + "/" + self.method.rsplit("/", 1)[-1]

    @property
    def must_reach(self) -> bool | None:
        """True for control rows (the store must see them), False for refused ones, None when unwatched."""
        if self.watch == "none":
            return None
        return self.expected in ("OK", "NOT_FOUND")


def _const(body: bytes) -> Build:
    return lambda _given: body


def _msg(message: Message) -> Build:
    return _const(encode(message))


# --- the rows -----------------------------------------------------------------------------


def _register(**overrides: str) -> Build:
    def build(given: Given) -> bytes:
        fields = {
            "email": f"{given.canary}@example.com",
            "username": given.canary[:32],
            "password": VALID_PASSWORD,
            "full_name": f"Canary {given.canary}",
        }
        fields.update({k: v.replace("{canary}", given.canary) for k, v in overrides.items()})
        return encode(cmd.RegisterUserRequest(**fields))

    return build


def _register_raw(field_number: int, raw: bytes) -> Build:
    """A RegisterUser body whose field `field_number` holds raw bytes; the other fields are valid."""

    def build(given: Given) -> bytes:
        valid = {
            1: f"{given.canary}@example.com".encode(),
            2: given.canary[:32].encode(),
            3: VALID_PASSWORD.encode(),
            4: f"Canary {given.canary}".encode(),
        }
        valid[field_number] = raw
        return b"".join(bytes_field(n, v) for n, v in sorted(valid.items()))

    return build


def _update(user_id: str | None = None, **overrides: str) -> Build:
    def build(given: Given) -> bytes:
        fields = {
            "user_id": given.user_id if user_id is None else user_id,
            "full_name": f"Canary {given.canary}",
            "bio": f"bio {given.canary}",
            "avatar_url": "",
        }
        fields.update(overrides)
        return encode(cmd.UpdateUserProfileRequest(**fields))  # type: ignore[arg-type]

    return build


def _deactivate(user_id: str, reason: str = "") -> Build:
    def build(given: Given) -> bytes:
        return encode(cmd.DeactivateUserRequest(user_id=user_id, reason=reason or f"left {given.canary}"))

    return build


def _with_token(mutate: Callable[[str], str], **fields: int | str) -> Build:
    def build(given: Given) -> bytes:
        return encode(qry.ListUsersRequest(page_token=mutate(given.page_token), **fields))  # type: ignore[arg-type]

    return build


def _flip(position: Literal["first", "middle", "last"]) -> Callable[[str], str]:
    def mutate(token: str) -> str:
        index = {"first": 0, "middle": len(token) // 2, "last": len(token) - 1}[position]
        replacement = "B" if token[index] != "B" else "C"
        return token[:index] + replacement + token[index + 1 :]

    return mutate


ID_SHAPES: list[tuple[str, str, str]] = [
    ("empty", "", "empty id"),
    ("not_uuid", "not-a-uuid", "`not-a-uuid`"),
    ("crlf", UNKNOWN_ID + "\r\n", "UUID + CR LF"),
    ("crlf_inside", UNKNOWN_ID[:30] + "\r\n" + UNKNOWN_ID[32:], "36 chars with CR LF inside"),
    ("star", "*", "`*`"),
    ("question", "?", "`?`"),
    ("brackets", "[a-f]*", "`[a-f]*`"),
    ("braces", "{" + UNKNOWN_ID + "}", "UUID in `{}` (hash-tag syntax)"),
    ("pattern36", "********-****-****-****-************", "36-char glob `********-****-…`"),
    ("key_pattern", "users:view:*", "`users:view:*`"),
    ("nul", UNKNOWN_ID + "\x00", "UUID + NUL"),
    ("hex32", UNKNOWN_ID.replace("-", ""), "32 hex digits, no hyphens"),
    ("urn", "urn:uuid:" + UNKNOWN_ID, "`urn:uuid:` form"),
    ("10k", "a" * (10 * KIB), "10 KiB id"),
]


INVALID = "INVALID_ARGUMENT"
TOO_BIG = "RESOURCE_EXHAUSTED"
Row = tuple[str, str, Build, str]


def _section(rpc: str, target: Target, watch: Watch, rows: list[Row], timeout: float = 10.0) -> list[Case]:
    prefix = {"RegisterUser": "register", "UpdateUserProfile": "update", "DeactivateUser": "deactivate"}.get(rpc, "")
    prefix = prefix or {"GetUser": "get", "GetUserByEmail": "by_email", "ListUsers": "list"}.get(rpc, target)
    return [
        Case(f"{prefix}.{key}", rpc, text, build, expected, target, watch, timeout)
        for key, text, build, expected in rows
    ]


def _id_rows(build: Callable[[str], Build]) -> list[Row]:
    return [(f"id_{key}", f"user_id: {label}", build(value), INVALID) for key, value, label in ID_SHAPES]


def _get(user_id: str) -> Build:
    return _msg(qry.GetUserRequest(user_id=user_id))


def _by_email(email: str) -> Build:
    return _msg(qry.GetUserByEmailRequest(email=email))


def _list(**fields: object) -> Build:
    return _msg(qry.ListUsersRequest(**fields))  # type: ignore[arg-type]


def _real_user(make: Callable[[str], Message]) -> Build:
    return lambda given: encode(make(given.user_id))


def _health(service: str) -> Build:
    return _msg(health_pb2.HealthCheckRequest(service=service))


REGISTER_ROWS: list[Row] = [
    ("empty", "every field empty", _msg(cmd.RegisterUserRequest()), INVALID),
    ("email_crlf", "e-mail with CR LF", _register(email="{canary}@example.com\r\nBcc: x@evil.test"), INVALID),
    ("email_star", "e-mail `*`", _register(email="*"), INVALID),
    ("email_nul", "e-mail with NUL", _register(email="{canary}\x00@example.com"), INVALID),
    ("email_10k", "10 KiB e-mail", _register(email="a" * (10 * KIB) + "@example.com"), INVALID),
    ("username_pattern", "username `ada*?[]{}`", _register(username="ada*?[]{}"), INVALID),
    ("username_crlf", "username with CR LF", _register(username="ada\r\nx"), INVALID),
    ("username_sql", "username `x'; DROP TABLE users;--`", _register(username="x'; DROP TABLE users;--"), INVALID),
    ("full_name_nul", "full name with NUL", _register(full_name="Ada\x00 {canary}"), INVALID),
    ("full_name_10k", "10 KiB full name", _register(full_name="{canary}" + "a" * (10 * KIB)), INVALID),
    ("password_10k", "10 KiB password", _register(password="p" * (10 * KIB)), INVALID),
    ("password_nul", "password with NUL", _register(password="correct\x00horse battery"), INVALID),
    ("full_name_utf8", "full name not valid UTF-8 (raw bytes)", _register_raw(4, INVALID_UTF8), INVALID),
    ("email_utf8", "e-mail not valid UTF-8 (raw bytes)", _register_raw(1, b"ada\xff@example.com"), INVALID),
    ("noise", "1 KiB of seeded random bytes", _const(SEEDED_NOISE), INVALID),
    ("corrupt", "corrupt tags (`ff` x 16)", _const(CORRUPT_TAGS), INVALID),
    ("5mib", "5 MiB full name", _register(full_name="a" * (5 * MIB)), TOO_BIG),
    (
        "full_name_sql",
        "full name `Robert'); DROP TABLE users;--` (valid: stored as data)",
        _register(full_name="Robert'); DROP TABLE users;-- {canary}"),
        "OK",
    ),
]

UPDATE_ROWS: list[Row] = [
    *_id_rows(lambda value: _update(user_id=value)),
    ("full_name_crlf", "full name with CR LF", _update(full_name="Ada\r\nKing"), INVALID),
    ("bio_nul", "bio with NUL", _update(bio="a\x00b"), INVALID),
    ("bio_10k", "10 KiB bio", _update(bio="b" * (10 * KIB)), INVALID),
    ("avatar_js", "avatar `javascript:alert(1)`", _update(avatar_url="javascript:alert(1)"), INVALID),
    (
        "bio_utf8",
        "bio not valid UTF-8 (raw bytes)",
        lambda g: bytes_field(1, g.user_id.encode()) + bytes_field(2, b"Ada") + bytes_field(3, INVALID_UTF8),
        INVALID,
    ),
    ("noise", "1 KiB of seeded random bytes", _const(SEEDED_NOISE), INVALID),
    ("unknown_user", "well-formed unknown id", _update(user_id=UNKNOWN_ID), "NOT_FOUND"),
    ("valid", "valid update of a real user", _update(), "OK"),
]

DEACTIVATE_ROWS: list[Row] = [
    *_id_rows(_deactivate),
    ("reason_empty", "empty reason", _real_user(lambda i: cmd.DeactivateUserRequest(user_id=i)), INVALID),
    (
        "reason_crlf",
        "reason with CR LF",
        _real_user(lambda i: cmd.DeactivateUserRequest(user_id=i, reason="a\r\nb")),
        INVALID,
    ),
    (
        "reason_10k",
        "10 KiB reason",
        _real_user(lambda i: cmd.DeactivateUserRequest(user_id=i, reason="r" * (10 * KIB))),
        INVALID,
    ),
    (
        "reason_utf8",
        "reason not valid UTF-8 (raw bytes)",
        lambda g: bytes_field(1, g.user_id.encode()) + bytes_field(2, INVALID_UTF8),
        INVALID,
    ),
    ("deep_groups", "unknown groups nested 200 deep", _const(DEEP_GROUPS), INVALID),
    ("unknown_user", "well-formed unknown id", _deactivate(UNKNOWN_ID), "NOT_FOUND"),
]

# A 1 ms deadline ends the call on the client whatever the server does; test_command_deadlines
# checks that such commands are applied entirely or not at all.
COMMAND_DEADLINE_ROWS: list[tuple[str, Row]] = [
    ("RegisterUser", ("deadline_1ms", "valid, 1 ms deadline", _register(), "DEADLINE_EXCEEDED")),
    ("UpdateUserProfile", ("deadline_1ms", "valid, 1 ms deadline", _update(), "DEADLINE_EXCEEDED")),
    (
        "DeactivateUser",
        (
            "deadline_1ms",
            "valid, 1 ms deadline",
            _real_user(lambda i: cmd.DeactivateUserRequest(user_id=i, reason="deadline")),
            "DEADLINE_EXCEEDED",
        ),
    ),
]

GET_ROWS: list[Row] = [
    *_id_rows(_get),
    ("id_utf8", "user_id not valid UTF-8 (raw bytes)", _const(bytes_field(1, INVALID_UTF8)), INVALID),
    ("wrong_wire_type", "user_id sent as a varint (wrong wire type)", _const(varint_field(1, 5)), INVALID),
    ("noise", "1 KiB of seeded random bytes", _const(SEEDED_NOISE), INVALID),
    ("corrupt", "corrupt tags (`ff` x 16)", _const(CORRUPT_TAGS), INVALID),
    ("overflowing_length", "length prefix beyond the body", _const(OVERFLOWING_LENGTH), INVALID),
    ("truncated", "truncated body", _const(TRUNCATED), INVALID),
    ("deep_groups", "unknown groups nested 200 deep", _const(DEEP_GROUPS), INVALID),
    ("5mib", "5 MiB user_id", _get("a" * (5 * MIB)), TOO_BIG),
    ("unknown", "well-formed unknown id", _get(UNKNOWN_ID), "NOT_FOUND"),
    ("upper", "unknown id in upper case", _get(UNKNOWN_ID.upper()), "NOT_FOUND"),
    ("valid", "a real user", _real_user(lambda i: qry.GetUserRequest(user_id=i)), "OK"),
    (
        "unknown_field",
        "a real user plus unknown field 99",
        lambda g: encode(qry.GetUserRequest(user_id=g.user_id)) + bytes_field(99, b"extra"),
        "OK",
    ),
]

BY_EMAIL_ROWS: list[Row] = [
    ("empty", "email: empty", _by_email(""), INVALID),
    ("star", "email: `*`", _by_email("*"), INVALID),
    ("question", "email: `?`", _by_email("?"), INVALID),
    ("brackets", "email: `[a-z]*@example.com`", _by_email("[a-z]*@example.com"), INVALID),
    ("crlf", "email: address + CR LF", _by_email("ada@example.com\r\n"), INVALID),
    ("nul", "email: address with NUL", _by_email("ada\x00@example.com"), INVALID),
    ("line_separator", "email: address with U+2028", _by_email("ada\u2028@example.com"), INVALID),
    ("sql", "email: `' OR 1=1 --`", _by_email("' OR 1=1 --"), INVALID),
    ("no_at", "email: no `@`", _by_email("ada.example.com"), INVALID),
    ("10k", "email: 10 KiB address", _by_email("a" * (10 * KIB) + "@example.com"), INVALID),
    ("utf8", "email not valid UTF-8 (raw bytes)", _const(bytes_field(1, b"ada\xff@example.com")), INVALID),
    ("noise", "1 KiB of seeded random bytes", _const(SEEDED_NOISE), INVALID),
    (
        "star_local",
        "`a*b@example.com` (a valid address, looked up literally)",
        _by_email("a*b@example.com"),
        "NOT_FOUND",
    ),
    ("braces_local", "`{ada}@example.com` (a valid address)", _by_email("{ada}@example.com"), "NOT_FOUND"),
    (
        "valid",
        "a real user's address in upper case",
        lambda g: encode(qry.GetUserByEmailRequest(email=g.email.upper())),
        "OK",
    ),
]

LIST_ROWS: list[Row] = [
    ("page_size_minus_one", "page_size -1", _list(page_size=-1), INVALID),
    ("page_size_int32_max", "page_size 2^31-1", _list(page_size=2**31 - 1), INVALID),
    ("page_size_int32_min", "page_size -2^31", _list(page_size=-(2**31)), INVALID),
    ("page_size_101", "page_size 101", _list(page_size=101), INVALID),
    ("page_size_0", "page_size 0 (the default size)", _list(page_size=0), "OK"),
    ("page_size_100", "page_size 100", _list(page_size=100), "OK"),
    (
        "page_size_wide_varint",
        "page_size varint 2^32+5 (int32 keeps the low bits: 5)",
        _const(varint_field(1, 2**32 + 5)),
        "OK",
    ),
    ("page_size_int64", "page_size varint 2^40 (low 32 bits: 0, the default)", _const(varint_field(1, 2**40)), "OK"),
    ("sort_by_99", "sort_by 99 (not in the enum)", _list(sort_by=99), INVALID),
    ("sort_direction_99", "sort_direction 99 (not in the enum)", _list(sort_direction=99), INVALID),
    ("active_99", "active 99 (not in the enum)", _list(active=99), INVALID),
    ("sort_by_negative", "sort_by -1", _list(sort_by=-1), INVALID),
    (
        "search_sql",
        "search `' OR 1=1; DROP TABLE users; --` (a literal substring)",
        _list(search="' OR 1=1; DROP TABLE users; --"),
        "OK",
    ),
    ("search_glob", "search `*?[a-z]{1}` (a literal substring)", _list(search="*?[a-z]{1}"), "OK"),
    (
        "search_key_syntax",
        "search `}{users@v9g9}:tri:*` (key and hash-tag syntax, a literal substring)",
        _list(search="}{users@v9g9}:tri:*"),
        "OK",
    ),
    ("search_100", "search of 100 distinct chars (98 index lookups)", _list(search=DISTINCT_100), "OK"),
    ("search_crlf", "search with CR LF", _list(search="a\r\nb"), INVALID),
    ("search_nul", "search with NUL", _list(search="a\x00"), INVALID),
    ("search_101", "search of 101 chars", _list(search="s" * 101), INVALID),
    ("search_10k", "10 KiB search", _list(search="s" * (10 * KIB)), INVALID),
    ("search_utf8", "search not valid UTF-8 (raw bytes)", _const(bytes_field(4, INVALID_UTF8)), INVALID),
    ("noise", "1 KiB of seeded random bytes", _const(SEEDED_NOISE), INVALID),
    ("token_sql", "page_token `' OR 1=1 --`", _list(page_token="' OR 1=1 --"), INVALID),
    ("token_star", "page_token `*`", _list(page_token="*"), INVALID),
    ("token_made_up", "page_token: base64url of made-up bytes", _list(page_token=MADE_UP_TOKEN), INVALID),
    (
        "token_foreign_key",
        "page_token signed with another key (the public development key)",
        lambda g: encode(qry.ListUsersRequest(page_token=g.foreign_token)),
        INVALID,
    ),
    ("token_valid", "a genuine page_token, same query", _with_token(lambda t: t), "OK"),
    ("token_flip_first", "page_token with its first character changed", _with_token(_flip("first")), INVALID),
    ("token_flip_middle", "page_token with its middle character changed", _with_token(_flip("middle")), INVALID),
    ("token_flip_last", "page_token with its last character changed", _with_token(_flip("last")), INVALID),
    ("token_truncated", "page_token without its last 4 characters", _with_token(lambda t: t[:-4]), INVALID),
    ("token_extended", "page_token with 4 characters appended", _with_token(lambda t: t + "AAAA"), INVALID),
    ("token_padded", "page_token with `=` padding added", _with_token(lambda t: t + "=" * (-len(t) % 4 or 4)), INVALID),
    (
        "token_other_filter",
        "genuine page_token reused with another filter",
        _with_token(lambda t: t, active=qry.ACTIVE_FILTER_ACTIVE),
        INVALID,
    ),
    (
        "token_other_sort",
        "genuine page_token reused with another sort",
        _with_token(lambda t: t, sort_by=qry.USER_SORT_FIELD_EMAIL),
        INVALID,
    ),
    (
        "token_other_direction",
        "genuine page_token reused with another direction",
        _with_token(lambda t: t, sort_direction=qry.SORT_DIRECTION_DESC),
        INVALID,
    ),
    (
        "token_other_search",
        "genuine page_token reused with another search",
        _with_token(lambda t: t, search="x"),
        INVALID,
    ),
    ("token_10k", "10 KiB page_token", _list(page_token="A" * (10 * KIB)), INVALID),
    ("consistency_sql", "consistency_token `' OR 1=1 --`", _list(consistency_token="' OR 1=1 --"), INVALID),
    ("consistency_10k", "10 KiB consistency_token", _list(consistency_token="A" * (10 * KIB)), INVALID),
    (
        "consistency_other_type",
        "consistency_token naming another aggregate type",
        _list(consistency_token=encode_token("order", UNKNOWN_ID, 1)),
        INVALID,
    ),
    ("5mib", "5 MiB search", _list(search="s" * (5 * MIB)), TOO_BIG),
]


# Refused only after the replica has looked at its view of the token's user (Redis) and at the
# event log, so these rows are not watched.
CONSISTENCY_LOOKUP_ROWS: list[Row] = [
    (
        "consistency_no_such_version",
        "consistency_token for a version the user never reached",
        _real_user(lambda user_id: qry.ListUsersRequest(consistency_token=encode_token("user", user_id, 999))),
        "FAILED_PRECONDITION",
    ),
]


# --- catalog and orders query services (read replicas) --------------------------------------

PRODUCT_QUERIES = "/tessera.catalog.v1.ProductQueryService/"
ORDER_QUERIES = "/tessera.orders.v1.OrderQueryService/"


def _ids(field: str, make: Callable[[str], Message]) -> list[Row]:
    return [(f"id_{key}", f"{field}: {label}", _msg(make(value)), INVALID) for key, value, label in ID_SHAPES]


def _search(**fields: object) -> Build:
    return _msg(oqry.SearchOrdersRequest(**fields))  # type: ignore[arg-type]


def _stats(**fields: object) -> Build:
    values: dict[str, object] = {"from_date": "2024-01-01", "to_date": "2024-01-31", "currency_code": "EUR"}
    values.update(fields)
    return _msg(oqry.GetOrderStatisticsRequest(**values))  # type: ignore[arg-type]


def _placed(start: tuple[int, int] | None = None, end: tuple[int, int] | None = None) -> Build:
    request = oqry.SearchOrdersRequest()
    if start is not None:
        request.placed_from.seconds, request.placed_from.nanos = start
    if end is not None:
        request.placed_to.seconds, request.placed_to.nanos = end
    return _msg(request)


GET_PRODUCT_ROWS: list[Row] = [
    *_ids("product_id", lambda v: cqry.GetProductRequest(product_id=v)),
    ("noise", "1 KiB of seeded random bytes", _const(SEEDED_NOISE), INVALID),
    (
        "consistency_other_type",
        "consistency_token naming an order",
        _msg(cqry.GetProductRequest(product_id=UNKNOWN_ID, consistency_token=encode_token("order", UNKNOWN_ID, 1))),
        INVALID,
    ),
    ("unknown", "well-formed unknown id", _msg(cqry.GetProductRequest(product_id=UNKNOWN_ID)), "NOT_FOUND"),
]

LIST_PRODUCTS_ROWS: list[Row] = [
    ("page_size_minus_one", "page_size -1", _msg(cqry.ListProductsRequest(page_size=-1)), INVALID),
    ("page_size_101", "page_size 101", _msg(cqry.ListProductsRequest(page_size=101)), INVALID),
    (
        "token_made_up",
        "page_token: base64url of made-up bytes",
        _msg(cqry.ListProductsRequest(page_token=MADE_UP_TOKEN)),
        INVALID,
    ),
    ("token_sql", "page_token `' OR 1=1 --`", _msg(cqry.ListProductsRequest(page_token="' OR 1=1 --")), INVALID),
    (
        "consistency_sql",
        "consistency_token `' OR 1=1 --`",
        _msg(cqry.ListProductsRequest(consistency_token="' OR 1=1 --")),
        INVALID,
    ),
    ("valid", "page_size 0, discontinued included", _msg(cqry.ListProductsRequest(include_discontinued=True)), "OK"),
]

GET_ORDER_ROWS: list[Row] = [
    *_ids("order_id", lambda v: oqry.GetOrderRequest(order_id=v)),
    ("noise", "1 KiB of seeded random bytes", _const(SEEDED_NOISE), INVALID),
    (
        "consistency_other_type",
        "consistency_token naming a user",
        _msg(oqry.GetOrderRequest(order_id=UNKNOWN_ID, consistency_token=encode_token("user", UNKNOWN_ID, 1))),
        INVALID,
    ),
    ("unknown", "well-formed unknown id", _msg(oqry.GetOrderRequest(order_id=UNKNOWN_ID)), "NOT_FOUND"),
]

CUSTOMER_ORDERS_ROWS: list[Row] = [
    *_ids("customer_id", lambda v: oqry.ListOrdersByCustomerRequest(customer_id=v)),
    (
        "status_0",
        "statuses [UNSPECIFIED]",
        _real_user(lambda i: oqry.ListOrdersByCustomerRequest(customer_id=i, statuses=[0])),  # type: ignore[list-item]
        INVALID,
    ),
    (
        "status_99",
        "statuses [99] (not in the enum)",
        _real_user(lambda i: oqry.ListOrdersByCustomerRequest(customer_id=i, statuses=[1, 99])),  # type: ignore[list-item]
        INVALID,
    ),
    (
        "page_size_101",
        "page_size 101",
        _real_user(lambda i: oqry.ListOrdersByCustomerRequest(customer_id=i, page_size=101)),
        INVALID,
    ),
    (
        "token_made_up",
        "page_token: base64url of made-up bytes",
        _real_user(lambda i: oqry.ListOrdersByCustomerRequest(customer_id=i, page_token=MADE_UP_TOKEN)),
        INVALID,
    ),
    ("valid", "a real user (no orders)", _real_user(lambda i: oqry.ListOrdersByCustomerRequest(customer_id=i)), "OK"),
]

SEARCH_ORDERS_ROWS: list[Row] = [
    ("text_101", "text of 101 chars", _search(text="t" * 101), INVALID),
    ("text_crlf", "text with CR LF", _search(text="a\r\nb"), INVALID),
    ("text_nul", "text with NUL", _search(text="a\x00"), INVALID),
    ("text_utf8", "text not valid UTF-8 (raw bytes)", _const(bytes_field(1, INVALID_UTF8)), INVALID),
    ("status_99", "statuses [99] (not in the enum)", _search(statuses=[99]), INVALID),
    ("sort_by_99", "sort_by 99 (not in the enum)", _search(sort_by=99), INVALID),
    ("sort_direction_99", "sort_direction 99 (not in the enum)", _search(sort_direction=99), INVALID),
    ("page_size_minus_one", "page_size -1", _search(page_size=-1), INVALID),
    ("from_after_to", "placed_from after placed_to", _placed((1_700_000_000, 0), (1_600_000_000, 0)), INVALID),
    ("nanos_negative", "placed_from with nanos -1", _placed((1_700_000_000, -1)), INVALID),
    ("seconds_huge", "placed_to in the year 10000", _placed(None, (253_402_300_800, 0)), INVALID),
    ("token_made_up", "page_token: base64url of made-up bytes", _search(page_token=MADE_UP_TOKEN), INVALID),
    (
        "consistency_other_type",
        "consistency_token naming a product",
        _search(consistency_token=encode_token("product", UNKNOWN_ID, 1)),
        INVALID,
    ),
    (
        "text_sql",
        "text `' OR 1=1; DROP TABLE orders; --` (a literal substring)",
        _search(text="' OR 1=1; DROP TABLE orders; --"),
        "OK",
    ),
    ("text_glob", "text `*?[a-z]{1}` (a literal substring)", _search(text="*?[a-z]{1}"), "OK"),
    (
        "text_key_syntax",
        "text `}{orders@v9g9}:tri:*` (key and hash-tag syntax, a literal substring)",
        _search(text="}{orders@v9g9}:tri:*"),
        "OK",
    ),
    ("text_100", "text of 100 distinct chars (98 index lookups)", _search(text=DISTINCT_100), "OK"),
    ("valid_window", "a one-day placing window", _placed((1_700_000_000, 0), (1_700_086_400, 0)), "OK"),
    ("5mib", "5 MiB text", _search(text="s" * (5 * MIB)), TOO_BIG),
]

ORDER_STATISTICS_ROWS: list[Row] = [
    ("empty", "every field empty", _msg(oqry.GetOrderStatisticsRequest()), INVALID),
    ("date_slashes", "from_date `2024/01/01`", _stats(from_date="2024/01/01"), INVALID),
    ("date_feb_30", "to_date `2024-02-30`", _stats(to_date="2024-02-30"), INVALID),
    ("date_crlf", "from_date with CR LF", _stats(from_date="2024-01-01\r\n"), INVALID),
    ("from_after_to", "from_date after to_date", _stats(from_date="2024-02-01"), INVALID),
    ("range_367", "to_date 367 days after from_date", _stats(to_date="2025-01-02"), INVALID),
    ("currency_lower", "currency_code `eur`", _stats(currency_code="eur"), INVALID),
    ("currency_long", "currency_code `EURO`", _stats(currency_code="EURO"), INVALID),
    ("currency_nul", "currency_code with NUL", _stats(currency_code="E\x00R"), INVALID),
    ("top_minus_one", "top_products -1", _stats(top_products=-1), INVALID),
    ("top_101", "top_products 101", _stats(top_products=101), INVALID),
    ("range_366", "to_date 366 days after from_date (the most allowed)", _stats(to_date="2025-01-01"), "OK"),
    ("valid", "one month in EUR", _stats(), "OK"),
]


def _read_model_cases() -> list[Case]:
    sections = [
        ("get_product", PRODUCT_QUERIES + "GetProduct", GET_PRODUCT_ROWS),
        ("list_products", PRODUCT_QUERIES + "ListProducts", LIST_PRODUCTS_ROWS),
        ("get_order", ORDER_QUERIES + "GetOrder", GET_ORDER_ROWS),
        ("customer_orders", ORDER_QUERIES + "ListOrdersByCustomer", CUSTOMER_ORDERS_ROWS),
        ("search_orders", ORDER_QUERIES + "SearchOrders", SEARCH_ORDERS_ROWS),
        ("order_statistics", ORDER_QUERIES + "GetOrderStatistics", ORDER_STATISTICS_ROWS),
    ]
    # Watched like the users queries: a refused request never reaches Redis, a control row does.
    return [
        Case(f"{prefix}.{key}", method, text, build, expected, "read", "redis")
        for prefix, method, rows in sections
        for key, text, build, expected in rows
    ]


# --- catalog and orders command services (write service) -----------------------------------

CATALOG_COMMANDS = "/tessera.catalog.v1.CatalogCommandService/"
ORDER_COMMANDS = "/tessera.orders.v1.OrderCommandService/"
EUR_1 = money_pb2.Money(currency_code="EUR", amount_minor=100)
ADDRESS = order_pb2.Address(
    recipient="Ada Lovelace", line1="12 St James's Square", city="London", postal_code="SW1Y 4JH", country_code="GB"
)


def _product(**overrides: object) -> Build:
    def build(given: Given) -> bytes:
        fields: dict[str, object] = {"sku": given.canary, "name": f"Canary {given.canary}", "price": EUR_1}
        fields.update(overrides)
        return encode(ccmd.AddProductRequest(**fields))  # type: ignore[arg-type]

    return build


def _place(**overrides: object) -> Build:
    def build(given: Given) -> bytes:
        fields: dict[str, object] = {
            "customer_id": given.user_id,
            "items": [ocmd.OrderItem(sku=given.canary, quantity=1)],
            "shipping_address": ADDRESS,
        }
        fields.update(overrides)
        return encode(ocmd.PlaceOrderRequest(**fields))  # type: ignore[arg-type]

    return build


def _address(**overrides: str) -> Build:
    address = order_pb2.Address()
    address.CopyFrom(ADDRESS)
    for name, value in overrides.items():
        setattr(address, name, value)
    return _place(shipping_address=address)


def _items(*items: tuple[str, int]) -> Build:
    return _place(items=[ocmd.OrderItem(sku=sku, quantity=quantity) for sku, quantity in items])


def _command_ids(field: str, make: Callable[[str], Message]) -> list[Row]:
    return [(f"id_{key}", f"{field}: {label}", _msg(make(value)), INVALID) for key, value, label in ID_SHAPES]


ADD_PRODUCT_ROWS: list[Row] = [
    ("empty", "every field empty", _msg(ccmd.AddProductRequest()), INVALID),
    ("sku_glob", "sku `*?[a-z]`", _product(sku="*?[a-z]"), INVALID),
    ("sku_sql", "sku `x'; DROP TABLE products;--`", _product(sku="x'; DROP TABLE products;--"), INVALID),
    ("sku_crlf", "sku with CR LF", _product(sku="SKU\r\n1"), INVALID),
    ("sku_65", "sku of 65 chars", _product(sku="s" * 65), INVALID),
    ("name_nul", "name with NUL", _product(name="Engine\x00"), INVALID),
    ("name_10k", "10 KiB name", _product(name="n" * (10 * KIB)), INVALID),
    (
        "name_utf8",
        "name not valid UTF-8 (raw bytes)",
        _const(bytes_field(1, b"SKU-1") + bytes_field(2, INVALID_UTF8)),
        INVALID,
    ),
    ("price_missing", "no price", _product(price=None), INVALID),
    ("currency_lower", "currency `eur`", _product(price=money_pb2.Money(currency_code="eur", amount_minor=1)), INVALID),
    (
        "currency_unknown",
        "currency `EUE` (not ISO 4217)",
        _product(price=money_pb2.Money(currency_code="EUE")),
        INVALID,
    ),
    ("amount_negative", "amount -1", _product(price=money_pb2.Money(currency_code="EUR", amount_minor=-1)), INVALID),
    ("stock_negative", "initial_stock -1", _product(initial_stock=-1), INVALID),
    ("stock_int64_max", "initial_stock 2^63-1", _product(initial_stock=2**63 - 1), INVALID),
    ("noise", "1 KiB of seeded random bytes", _const(SEEDED_NOISE), INVALID),
    ("corrupt", "corrupt tags (`ff` x 16)", _const(CORRUPT_TAGS), INVALID),
    ("5mib", "5 MiB name", _product(name="a" * (5 * MIB)), TOO_BIG),
    ("valid", "a new product", _product(), "OK"),
]

UPDATE_PRICE_ROWS: list[Row] = [
    *_command_ids("product_id", lambda v: ccmd.UpdateProductPriceRequest(product_id=v, price=EUR_1)),
    ("price_missing", "no price", _msg(ccmd.UpdateProductPriceRequest(product_id=UNKNOWN_ID)), INVALID),
    (
        "currency_glob",
        "currency `E*`",
        _msg(ccmd.UpdateProductPriceRequest(product_id=UNKNOWN_ID, price=money_pb2.Money(currency_code="E*"))),
        INVALID,
    ),
    (
        "expected_version_0",
        "expected_version 0",
        _msg(ccmd.UpdateProductPriceRequest(product_id=UNKNOWN_ID, price=EUR_1, expected_version=0)),
        INVALID,
    ),
    (
        "unknown",
        "well-formed unknown id",
        _msg(ccmd.UpdateProductPriceRequest(product_id=UNKNOWN_ID, price=EUR_1)),
        "NOT_FOUND",
    ),
]

RESTOCK_ROWS: list[Row] = [
    *_command_ids("product_id", lambda v: ccmd.RestockProductRequest(product_id=v, quantity=1)),
    ("quantity_0", "quantity 0", _msg(ccmd.RestockProductRequest(product_id=UNKNOWN_ID)), INVALID),
    ("quantity_negative", "quantity -5", _msg(ccmd.RestockProductRequest(product_id=UNKNOWN_ID, quantity=-5)), INVALID),
    (
        "quantity_2e62",
        "quantity 2^62",
        _msg(ccmd.RestockProductRequest(product_id=UNKNOWN_ID, quantity=2**62)),
        INVALID,
    ),
    (
        "unknown",
        "well-formed unknown id",
        _msg(ccmd.RestockProductRequest(product_id=UNKNOWN_ID, quantity=1)),
        "NOT_FOUND",
    ),
]

DISCONTINUE_ROWS: list[Row] = [
    *_command_ids("product_id", lambda v: ccmd.DiscontinueProductRequest(product_id=v)),
    (
        "reason_crlf",
        "reason with CR LF",
        _msg(ccmd.DiscontinueProductRequest(product_id=UNKNOWN_ID, reason="a\r\nb")),
        INVALID,
    ),
    (
        "reason_10k",
        "10 KiB reason",
        _msg(ccmd.DiscontinueProductRequest(product_id=UNKNOWN_ID, reason="r" * (10 * KIB))),
        INVALID,
    ),
    ("unknown", "well-formed unknown id", _msg(ccmd.DiscontinueProductRequest(product_id=UNKNOWN_ID)), "NOT_FOUND"),
]

PLACE_ORDER_ROWS: list[Row] = [
    ("empty", "every field empty", _msg(ocmd.PlaceOrderRequest()), INVALID),
    *[
        (f"customer_{key}", f"customer_id: {label}", _place(customer_id=value), INVALID)
        for key, value, label in ID_SHAPES
    ],
    ("items_empty", "no items", _place(items=[]), INVALID),
    ("items_101", "101 items", _items(*((f"S-{n}", 1) for n in range(101))), INVALID),
    ("quantity_0", "item quantity 0", _items(("S-1", 0)), INVALID),
    ("quantity_10001", "item quantity 10001", _items(("S-1", 10_001)), INVALID),
    ("quantity_negative", "item quantity -1", _items(("S-1", -1)), INVALID),
    ("sku_twice", "one sku twice (other case)", _items(("S-1", 1), ("s-1", 1)), INVALID),
    ("sku_glob", "item sku `*`", _items(("*", 1)), INVALID),
    ("address_missing", "no shipping address", _place(shipping_address=None), INVALID),
    ("country_lower", "country_code `gb`", _address(country_code="gb"), INVALID),
    ("city_crlf", "city with CR LF", _address(city="London\r\nX"), INVALID),
    ("recipient_blank", "recipient of spaces", _address(recipient="   "), INVALID),
    ("notes_1001", "notes of 1001 chars", _place(notes="n" * 1001), INVALID),
    ("notes_cr", "notes with CR", _place(notes="a\rb"), INVALID),
    ("noise", "1 KiB of seeded random bytes", _const(SEEDED_NOISE), INVALID),
    ("5mib", "5 MiB notes", _place(notes="n" * (5 * MIB)), TOO_BIG),
]

# Refused by a business rule, after the customer or the catalog was looked up: not watched.
PLACE_ORDER_RULE_ROWS: list[Row] = [
    ("unknown_sku", "a real customer, an unknown sku", _place(), "FAILED_PRECONDITION"),
    ("unknown_customer", "a well-formed unknown customer", _place(customer_id=UNKNOWN_ID), "FAILED_PRECONDITION"),
]

ADD_ITEM_ROWS: list[Row] = [
    *_command_ids(
        "order_id", lambda v: ocmd.AddOrderItemRequest(order_id=v, item=ocmd.OrderItem(sku="S-1", quantity=1))
    ),
    ("item_missing", "no item", _msg(ocmd.AddOrderItemRequest(order_id=UNKNOWN_ID)), INVALID),
    (
        "quantity_0",
        "item quantity 0",
        _msg(ocmd.AddOrderItemRequest(order_id=UNKNOWN_ID, item=ocmd.OrderItem(sku="S-1"))),
        INVALID,
    ),
    (
        "unknown",
        "well-formed unknown id",
        _msg(ocmd.AddOrderItemRequest(order_id=UNKNOWN_ID, item=ocmd.OrderItem(sku="S-1", quantity=1))),
        "NOT_FOUND",
    ),
]

CANCEL_ROWS: list[Row] = [
    *_command_ids("order_id", lambda v: ocmd.CancelOrderRequest(order_id=v, reason="r")),
    ("reason_empty", "empty reason", _msg(ocmd.CancelOrderRequest(order_id=UNKNOWN_ID)), INVALID),
    ("reason_crlf", "reason with CR LF", _msg(ocmd.CancelOrderRequest(order_id=UNKNOWN_ID, reason="a\r\nb")), INVALID),
    (
        "reason_501",
        "reason of 501 chars",
        _msg(ocmd.CancelOrderRequest(order_id=UNKNOWN_ID, reason="r" * 501)),
        INVALID,
    ),
    ("unknown", "well-formed unknown id", _msg(ocmd.CancelOrderRequest(order_id=UNKNOWN_ID, reason="r")), "NOT_FOUND"),
]

SHIP_ROWS: list[Row] = [
    *_command_ids("order_id", lambda v: ocmd.ShipOrderRequest(order_id=v, carrier="DHL", tracking_number="T-1")),
    (
        "carrier_empty",
        "empty carrier",
        _msg(ocmd.ShipOrderRequest(order_id=UNKNOWN_ID, tracking_number="T-1")),
        INVALID,
    ),
    (
        "tracking_glob",
        "tracking_number `*`",
        _msg(ocmd.ShipOrderRequest(order_id=UNKNOWN_ID, carrier="DHL", tracking_number="*")),
        INVALID,
    ),
    (
        "tracking_101",
        "tracking_number of 101 chars",
        _msg(ocmd.ShipOrderRequest(order_id=UNKNOWN_ID, carrier="DHL", tracking_number="T" * 101)),
        INVALID,
    ),
    (
        "unknown",
        "well-formed unknown id",
        _msg(ocmd.ShipOrderRequest(order_id=UNKNOWN_ID, carrier="DHL", tracking_number="T-1")),
        "NOT_FOUND",
    ),
]


def _write_model_cases() -> list[Case]:
    write: Target = "write"
    sections: list[tuple[str, str, Watch, list[Row]]] = [
        ("add_product", CATALOG_COMMANDS + "AddProduct", "postgres", ADD_PRODUCT_ROWS),
        ("update_price", CATALOG_COMMANDS + "UpdateProductPrice", "postgres", UPDATE_PRICE_ROWS),
        ("restock", CATALOG_COMMANDS + "RestockProduct", "postgres", RESTOCK_ROWS),
        ("discontinue", CATALOG_COMMANDS + "DiscontinueProduct", "postgres", DISCONTINUE_ROWS),
        ("place_order", ORDER_COMMANDS + "PlaceOrder", "postgres", PLACE_ORDER_ROWS),
        ("place_order", ORDER_COMMANDS + "PlaceOrder", "none", PLACE_ORDER_RULE_ROWS),
        ("add_item", ORDER_COMMANDS + "AddOrderItem", "postgres", ADD_ITEM_ROWS),
        ("cancel", ORDER_COMMANDS + "CancelOrder", "postgres", CANCEL_ROWS),
        ("ship", ORDER_COMMANDS + "ShipOrder", "postgres", SHIP_ROWS),
    ]
    cases = [
        Case(f"{prefix}.{key}", method, text, build, expected, write, watch)
        for prefix, method, watch, rows in sections
        for key, text, build, expected in rows
    ]
    cases.append(
        Case(
            "place_order.correlation_long",
            ORDER_COMMANDS + "PlaceOrder",
            "valid fields, `x-correlation-id` of 200 chars",
            _place(),
            INVALID,
            write,
            "postgres",
            metadata=(("x-correlation-id", "c" * 200),),
        )
    )
    return cases


def _server_rows(target: Target) -> list[Case]:
    rows: list[Row] = [
        ("health", "Check, whole server", _health(""), "OK"),
        ("health_unknown", "Check, service `no.such.Service`", _health("no.such.Service"), "NOT_FOUND"),
        ("health_star", "Check, service `*`", _health("*"), "NOT_FOUND"),
        ("health_10k", "Check, 10 KiB service name", _health("s" * (10 * KIB)), "NOT_FOUND"),
        ("health_utf8", "Check, service name not valid UTF-8", _const(bytes_field(1, INVALID_UTF8)), INVALID),
        ("health_noise", "Check, 1 KiB of seeded random bytes", _const(SEEDED_NOISE), INVALID),
        ("health_5mib", "Check, 5 MiB service name", _health("s" * (5 * MIB)), TOO_BIG),
    ]
    cases = [Case(f"{target}.{key}", HEALTH, text, build, expected, target) for key, text, build, expected in rows]
    cases.append(
        Case(
            f"{target}.unknown_service",
            "/tessera.users.v1.NoSuchService/Get",
            "unknown service",
            _const(b""),
            "UNIMPLEMENTED",
            target,
        )
    )
    return cases


def _cases() -> list[Case]:
    write: Target = "write"
    read: Target = "read"
    rows = [
        *_section("RegisterUser", write, "postgres", REGISTER_ROWS),
        Case(
            "register.correlation_long",
            "RegisterUser",
            "valid fields, `x-correlation-id` of 200 chars",
            _register(),
            INVALID,
            write,
            "postgres",
            metadata=(("x-correlation-id", "c" * 200),),
        ),
        Case(
            "register.correlation_16k",
            "RegisterUser",
            "valid fields, `x-correlation-id` of 16 KiB (beyond gRPC's header limit)",
            _register(),
            "RESOURCE_EXHAUSTED",
            write,
            "postgres",
            metadata=(("x-correlation-id", "c" * (16 * KIB)),),
        ),
        *_section("UpdateUserProfile", write, "postgres", UPDATE_ROWS),
        *_section("DeactivateUser", write, "postgres", DEACTIVATE_ROWS),
    ]
    for rpc, row in COMMAND_DEADLINE_ROWS:
        # grpc's timers are not exact to the millisecond: a quick command may still finish.
        rows += [replace(c, may_also=("OK",)) for c in _section(rpc, write, "none", [row], timeout=0.001)]
    rows += [
        *_section("GetUser", read, "redis", GET_ROWS),
        *_section("GetUserByEmail", read, "redis", BY_EMAIL_ROWS),
        *_section("ListUsers", read, "redis", LIST_ROWS),
        *_section("ListUsers", read, "none", CONSISTENCY_LOOKUP_ROWS),
        *_server_rows(write),
        *_server_rows(read),
        Case(
            "write.unknown_method", COMMANDS + "DeleteEverything", "unknown method", _const(b""), "UNIMPLEMENTED", write
        ),
        Case(
            "write.query_method",
            QUERIES + "GetUser",
            "a query sent to the write service",
            _get(UNKNOWN_ID),
            "UNIMPLEMENTED",
            write,
        ),
        Case("read.unknown_method", QUERIES + "DropUsers", "unknown method", _const(b""), "UNIMPLEMENTED", read),
        Case(
            "read.command_method",
            COMMANDS + "RegisterUser",
            "a command sent to a read replica",
            _register(),
            "UNIMPLEMENTED",
            read,
        ),
        Case(
            "read.lowercase_method",
            QUERIES.lower() + "getuser",
            "method path in lower case",
            _get(UNKNOWN_ID),
            "UNIMPLEMENTED",
            read,
        ),
    ]
    rows += _read_model_cases()
    rows += _write_model_cases()
    return rows


CASES: list[Case] = _cases()

# Rows whose observed status is known to differ from the expected one, with the reason:
# none today. (The write service answered UNAVAILABLE when a caller's 1 ms deadline cut a
# command off; it now answers DEADLINE_EXCEEDED.)
KNOWN_DEFECTS: dict[str, str] = {}
