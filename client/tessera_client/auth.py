"""Bearer tokens for every call: a static string, a file re-read when it changes, or a callable.

A provider is asked for the token before each call (and each retry), so a rotated token is
used from the next call on. The token travels as `authorization: Bearer <token>` metadata.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol


class TokenProvider(Protocol):
    """Something that returns the bearer token to send (without the `Bearer ` prefix)."""

    async def token(self) -> str:
        """The token for the next call."""
        ...


class StaticToken:
    """The same token on every call."""

    def __init__(self, token: str) -> None:
        if not token.strip():
            raise ValueError("empty token")
        self._token = token.strip()

    async def token(self) -> str:
        """The token given at construction."""
        return self._token


class FileToken:
    """A token kept in a file (e.g. a mounted secret that a sidecar rotates), re-read when the file changes.

    The file's modification time, size and inode are compared on each call (one `stat`); the
    content is read again only when one of them differs.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._token = ""
        self._load()

    def _load(self) -> str:
        stat = self._path.stat()
        marker = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with self._lock:
            if marker != self._seen:
                token = self._path.read_text(encoding="utf-8").strip()
                if not token:
                    raise ValueError(f"token file {self._path} is empty")
                self._token, self._seen = token, marker
            return self._token

    async def token(self) -> str:
        """The file's current token."""
        return self._load()


class CallableToken:
    """A token from a function (sync or async), called before every call: it may cache as it likes."""

    def __init__(self, supplier: Callable[[], str] | Callable[[], Awaitable[str]]) -> None:
        self._supplier = supplier

    async def token(self) -> str:
        """Whatever the function returns now."""
        value = self._supplier()
        if inspect.isawaitable(value):
            value = await value
        if not isinstance(value, str) or not value.strip():
            raise ValueError("the token function returned no token")
        return value.strip()


def as_provider(token: str | TokenProvider | Callable[[], str] | None) -> TokenProvider | None:
    """Accept a token string, a provider or a function; None means no token."""
    if token is None:
        return None
    if isinstance(token, str):
        return StaticToken(token)
    if hasattr(token, "token"):
        return token
    if callable(token):
        return CallableToken(token)
    raise TypeError(f"not a token or token provider: {token!r}")
