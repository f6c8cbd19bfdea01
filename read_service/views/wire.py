"""Single-view replies written as bytes: the view's stored bytes become the reply without a message.

GetUser, GetUserByEmail, GetProduct and GetOrder answer `{1: view, 2: stale, 3: view_position}`.
Protobuf's wire format is a sequence of fields, and a parser merges whatever it reads in
order (a repeated field appends), so such a reply is the view field followed by the few
bytes of `stale` and `view_position`:

- `view_field(raw)` wraps the view's bytes (as Redis stores them) as field 1. The near cache
  keeps exactly that, so a hit writes bytes without building or serializing a message.
- `reply_tail(stale, position)` is the rest, a handful of bytes per call.

The servicers answer such bytes through handlers without a response serializer
(shared_kernel.platform.grpc_server.add_preserialized), so grpc.aio sends them as they are.
"""

from __future__ import annotations

# Field 1, wire type 2 (length-delimited): the reply's view.
_VIEW_TAG = b"\x0a"
# Field 2 (stale), varint, true.
_STALE_TRUE = b"\x10\x01"
# Field 3 (view_position), varint.
_POSITION_TAG = 0x18


def varint(value: int) -> bytes:
    """`value` (not negative) as a protobuf base-128 varint."""
    if value < 0:
        raise ValueError("a varint here is never negative")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def view_field(raw: bytes) -> bytes:
    """The view's serialized bytes as field 1 of a reply."""
    return _VIEW_TAG + varint(len(raw)) + raw


def view_bytes(field: bytes) -> bytes:
    """The view's own bytes inside a field made by `view_field`."""
    shift, length, index = 0, 0, 1
    while True:
        byte = field[index]
        index += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    return field[index : index + length]


def reply_tail(stale: bool, position: int) -> bytes:
    """Fields 2 and 3 (left out when false and 0, as a serializer does)."""
    tail = _STALE_TRUE if stale else b""
    if position:
        tail += bytes((_POSITION_TAG,)) + varint(position)
    return tail
