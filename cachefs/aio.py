"""The trio facade of the storage engine (the engine's async edge).

The engine is synchronous; this wraps it for trio code (the mount, protocol
servers).  Every call that hashes, compresses, decompresses or touches the disk
runs in a worker thread (``trio.to_thread.run_sync``) so the event loop keeps
serving; the libraries doing the heavy work release the GIL, so concurrent
calls use every core.  ``limiter`` bounds how many engine calls run at once.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from typing import ParamSpec, TypeVar

import trio

from cachefs.engine import (
    Digest,
    FsckReport,
    GcReport,
    Source,
    Store,
    StoreStats,
    check_store,
    collect_garbage,
)

P = ParamSpec("P")
T = TypeVar("T")


class AsyncStore:
    """A :class:`Store` for trio code.  Open with ``await AsyncStore.open(...)``."""

    def __init__(self, store: Store, limiter: trio.CapacityLimiter | None = None) -> None:
        self.store = store
        self.limiter = limiter or trio.CapacityLimiter(2 * (os.cpu_count() or 2))

    @classmethod
    async def open(cls, path: str | os.PathLike[str], **kwargs: object) -> AsyncStore:
        """Open a store (same arguments as :meth:`Store.open`)."""
        store = await trio.to_thread.run_sync(functools.partial(Store.open, path, **kwargs))  # type: ignore[arg-type]
        return cls(store)

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self.limiter
        )

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self.store.close)

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def put(self, source: Source, *, durable: bool = True) -> Digest:
        """Store bytes or a (blocking) file object; see :meth:`Store.put`."""
        return await self._run(self.store.put, source, durable=durable)

    async def put_stream(self, chunks: AsyncIterable[bytes], *, durable: bool = True) -> Digest:
        """Store an object arriving as an async stream of byte strings.

        The stream is pulled from the worker thread as ingest needs it, so an
        object larger than memory streams straight through.  The store is held
        (shared, see ``Store.maintenance``) until the stream ends: gc waits for
        it, and puts that come meanwhile wait for gc, so the stream must not
        wait for another put of the same store.
        """
        iterator = chunks.__aiter__()
        token = trio.lowlevel.current_trio_token()

        def pull() -> Iterator[bytes]:
            while True:
                try:
                    yield trio.from_thread.run(iterator.__anext__, trio_token=token)
                except StopAsyncIteration:
                    return

        return await self._run(self.store.put, pull(), durable=durable)

    async def read(self, digest: Digest, offset: int = 0, length: int | None = None) -> bytes:
        return await self._run(self.store.read, digest, offset, length)

    async def get(
        self, digest: Digest, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes | memoryview]:
        """Stream an object (or a range) chunk by chunk; memory stays bounded.

        A caller that may stop early should wrap the iteration in
        ``contextlib.aclosing`` (trio warns about async generators left open).
        """
        pieces = await self._run(self.store.iter_object, digest, offset, length)
        sentinel = object()

        def step() -> bytes | memoryview | object:
            return next(pieces, sentinel)

        while True:
            piece = await self._run(step)
            if piece is sentinel:
                return
            assert isinstance(piece, bytes | memoryview)
            yield piece

    async def contains(self, digest: Digest) -> bool:
        return await self._run(self.store.contains, digest)

    async def ref(self, digest: Digest) -> None:
        await self._run(self.store.ref, digest)

    async def unref(self, digest: Digest) -> bool:
        return await self._run(self.store.unref, digest)

    async def stats(self) -> StoreStats:
        return await self._run(self.store.stats)

    async def gc(self) -> GcReport:
        return await self._run(collect_garbage, self.store)

    async def fsck(self, *, repair: bool = False) -> FsckReport:
        return await self._run(check_store, self.store, repair=repair)
