"""Moving an object's chunks to and from a remote, many at once (remote layer).

``fetch_chunks`` keeps ``FETCH_AHEAD`` requests (``FETCH_BYTES`` at most) in
flight ahead of the consumer; from a bucket's packs (``_packs.py``) chunks
that lie back to back come in one request, a whole pack at most.
``push_packed`` uploads chunks as packs, ``PACKS_AHEAD`` at once, and the
index that names them (one every ``INDEX_PACKS`` packs).  Both run in the
tiers' thread pool (``Tiers``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future

from cachefs import tracing
from cachefs.engine import Digest, Store
from cachefs.remote._blobs import Remote
from cachefs.remote._packs import INDEX_PACKS, SYNC_READ, PackRecord, PackStore, pack_groups

#: Requests to fetch chunks in flight at once (a run of chunks back to back
#: in a pack is one, of at most ``RUN_BYTES``), and the bytes they ask for
#: at most (the daemon's memory: 8 runs of a whole pack, or 16 requests of
#: smaller ones; a request holds its bytes until its last chunk is taken, and
#: one larger than this goes alone); chunks a run takes at most (a pack of
#: chunks of 16 KiB on average holds about 128), and chunks kept ahead at most.
FETCH_AHEAD, FETCH_BYTES, RUN_MAX, WINDOW_MAX = 16, 16 << 20, 256, 2048
#: Packs read and uploaded at once by one push (``PACK_BYTES`` each).
PACKS_AHEAD = 8

#: What a fetch tells of the chunks it brought: (the remote's name, chunks, bytes).
Fetched = Callable[[str, int, int], None]
Got = list[bytes | memoryview]


def push_packed(pool: Executor, store: Store, packs: PackStore, missing: list[Digest]) -> None:
    """Chunks no pack holds, read from ``store``, uploaded in packs (several
    at once), then the index that names them all."""
    put = tracing.in_context(
        lambda group: packs.put_pack([(d, store.read_chunk(d.hash)) for d in group])
    )
    records: list[PackRecord] = []
    flying: deque[Future[PackRecord]] = deque()

    def landed() -> None:
        records.append(flying.popleft().result())
        if len(records) == INDEX_PACKS:  # a failure later loses none of these
            packs.put_index(records)
            records.clear()

    try:
        for group in pack_groups(missing):
            if len(flying) == PACKS_AHEAD:
                landed()
            flying.append(pool.submit(put, group))
        while flying:
            landed()
    finally:
        for future in flying:
            future.cancel()
    if records:
        packs.put_index(records)


def fetch_chunks(
    pool: Executor,
    store: Store,
    remote: Remote,
    chunks: list[tuple[bytes, int]],
    fetched: Fetched,
) -> Iterator[tuple[bytes, bytes | memoryview]]:
    """An object's chunks, ``(digest, bytes)`` in order: chunks of ``store``
    read there, the others fetched from ``remote`` ahead in ``pool``, each
    verified; a hole's zeroes come with an empty digest."""
    local = store.chunks
    stored = [d for d, _ in chunks if d]
    # Only published chunks can be read here: one that another ingest
    # appended and has not published yet is fetched too.
    absent = local.find_missing(stored, pending=False) if stored else set()
    packs = remote.packs if absent else None
    if packs is not None:  # an index a moment old, if it cannot place one
        packs.placed(next(Digest(d, n) for d, n in chunks if d in absent), SYNC_READ)

    def fetch_run(run: list[Digest]) -> Got:
        assert packs is not None
        got: Got = list(packs.read_run(run))  # verified
        fetched(remote.name, len(run), sum(d.size for d in run))
        return got

    def fetch_chunk(digest: Digest) -> Got:
        data = remote.read(digest)  # verified
        fetched(remote.name, 1, len(data))
        return [data]

    #: (chunk, size, its request or None: local, its place in what that gives).
    window: deque[tuple[bytes, int, Future[Got] | None, int]] = deque()
    position, flying, flying_bytes = 0, 0, 0
    #: The bytes each request in flight asks for.
    asked: dict[Future[Got], int] = {}
    #: The next request (its chunks from ``position``, and its bytes), planned
    #: and waiting for room: planned once, not at every chunk taken meanwhile.
    planned: tuple[list[Digest], int] | None = None
    traced_run, traced_chunk = tracing.in_context(fetch_run), tracing.in_context(fetch_chunk)

    def plan(chunk: bytes, size: int) -> tuple[list[Digest], int]:
        wanted = [Digest(chunk, size)]
        for after, length in chunks[position + 1 : position + RUN_MAX]:
            if after not in absent:
                break
            wanted.append(Digest(after, length))
        run = wanted[: max(1, packs.run(wanted)) if packs is not None else 1]
        return run, sum(d.size for d in run)

    def fill() -> None:
        nonlocal position, flying, flying_bytes, planned
        while flying < FETCH_AHEAD and len(window) < WINDOW_MAX and position < len(chunks):
            chunk, size = chunks[position]
            if chunk not in absent:
                window.append((chunk, size, None, 0))
                position += 1
                continue
            run, nbytes = planned = planned or plan(chunk, size)
            if flying and flying_bytes + nbytes > FETCH_BYTES:
                return  # when the oldest request is taken
            planned = None
            fut = (
                pool.submit(traced_run, run) if len(run) > 1 else pool.submit(traced_chunk, run[0])
            )
            window.extend((d.hash, d.size, fut, k) for k, d in enumerate(run))
            position += len(run)
            flying += 1
            flying_bytes += nbytes
            asked[fut] = nbytes

    try:
        fill()
        while window:
            chunk, size, fut, k = window.popleft()
            if fut is not None:
                got = fut.result()
                if k == len(got) - 1:  # its last chunk: what it holds is let go
                    flying -= 1
                    flying_bytes -= asked.pop(fut)
                yield chunk, got[k]
            elif not chunk:  # a hole
                for start in range(0, size, 1 << 22):
                    yield chunk, bytes(min(1 << 22, size - start))
            else:
                yield chunk, local.read_chunk(chunk)
            fill()
    finally:
        for _, _, fut, _ in window:
            if fut is not None:
                fut.cancel()


__all__ = ["FETCH_AHEAD", "PACKS_AHEAD", "fetch_chunks", "push_packed"]
