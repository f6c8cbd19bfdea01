"""The harness finds a relay by its lock session's client port; shared ports must not fool it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from devstack.chaos import _inodes_of_connection


def _inode(sock: socket.socket) -> str:
    return os.readlink(f"/proc/self/fd/{sock.fileno()}")[len("socket:[") : -1]


@contextmanager
def _listener(stack: ExitStack) -> Iterator[socket.socket]:
    server = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server


def test_two_connections_sharing_a_local_port_are_told_apart_by_the_remote_port() -> None:
    """Linux lets connections to different destinations share an ephemeral port."""
    with ExitStack() as stack:
        first_server = stack.enter_context(_listener(stack))
        second_server = stack.enter_context(_listener(stack))
        first = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        first.bind(("127.0.0.1", 0))
        local_port = first.getsockname()[1]
        first.connect(first_server.getsockname())
        second = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        second.bind(("127.0.0.1", local_port))
        second.connect(second_server.getsockname())

        assert _inodes_of_connection(local_port, second_server.getsockname()[1]) == {_inode(second)}
        assert _inodes_of_connection(local_port, first_server.getsockname()[1]) == {_inode(first)}
