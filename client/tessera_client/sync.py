"""A thin blocking API over the async client, for scripts and threaded callers.

`SyncTesseraClient` runs the async client on an event loop in a background thread. Its
`users`, `catalog` and `orders` have the same methods as the async ones; each call blocks
until the reply (or raises the same typed exceptions), and a watch becomes a plain iterator.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from tessera_client.client import TesseraClient


class _Blocking:
    """Calls the async API's methods from another thread, waiting for each result."""

    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._target = target
        self._loop = loop

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._target, name)
        if not callable(method) or name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if inspect.iscoroutinefunction(method):
                return asyncio.run_coroutine_threadsafe(method(*args, **kwargs), self._loop).result()
            result = asyncio.run_coroutine_threadsafe(_make(method, args, kwargs), self._loop).result()
            if isinstance(result, AsyncIterator):
                return _iterate(result, self._loop)
            return result

        call.__doc__ = method.__doc__
        return call


async def _make(method: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    return method(*args, **kwargs)


def _iterate(stream: AsyncIterator[Any], loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    try:
        while True:
            future: Future[Any] = asyncio.run_coroutine_threadsafe(_next(stream), loop)
            item = future.result()
            if item is _END:
                return
            yield item
    finally:
        closer = getattr(stream, "aclose", None)
        if closer is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(closer(), loop).result()


_END = object()


async def _next(stream: AsyncIterator[Any]) -> Any:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return _END


class SyncTesseraClient:
    """The blocking client; takes the same arguments as TesseraClient. Close it (or use `with`)."""

    def __init__(self, write: str, read: str | Sequence[str] | None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tessera-client", daemon=True)
        self._thread.start()

        async def build() -> TesseraClient:
            return TesseraClient(write, read, **kwargs)

        self.client = asyncio.run_coroutine_threadsafe(build(), self._loop).result()
        self.users = _Blocking(self.client.users, self._loop)
        self.catalog = _Blocking(self.client.catalog, self._loop)
        self.orders = _Blocking(self.client.orders, self._loop)

    @property
    def session(self) -> Any:
        """The async client's ConsistencySession."""
        return self.client.session

    def close(self) -> None:
        """Close the channels and stop the loop thread."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.client.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> SyncTesseraClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
