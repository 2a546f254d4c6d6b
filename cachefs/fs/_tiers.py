"""The filesystem's remote tiers: pushing what it publishes, figures (filesystem layer).

A mount or a served store with tiers (``cachefs.remote``) runs a
:class:`~cachefs.remote.Pusher` thread beside its trio loop: the store queues
every new object in the publishing transaction, and the pusher sends it to the
write tiers, oldest first, backing off while they fail.  Local reads and
writes never wait for it: ``fsync`` means local durability, unless
``remote_durability`` (``--remote-durability remote``) makes it wait until
the write tiers hold the file's content.  With ``local_max_size``
(``--local-max-size``) chunks the durable read-write tiers hold are dropped here,
coldest first, whenever the store's live records exceed it, and fetched back
when read, ahead of the reader (``_fetch_ahead.py``).  Its queue depth,
the age of its oldest entry, the tiers' figures and each shard endpoint's
breaker are in ``stats`` under ``remote``.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from cachefs.engine import CachefsError, Digest, FsError, Store, drop_held
from cachefs.errors import HealElsewhere
from cachefs.format.schema import NO_CONTENT
from cachefs.fs._caches import _in_trio
from cachefs.fs._shared import SharedDirs
from cachefs.remote import Pusher, Tier, Tiers
from cachefs.signing import TrustOptions

if TYPE_CHECKING:
    from cachefs.fs._filesystem import Filesystem

log = logging.getLogger(__name__)

#: The longest an fsync waits for the write tiers (``--remote-durability remote``).
REMOTE_FSYNC_TIMEOUT = 60.0
#: How often the local store's size is looked at under ``--local-max-size``
#: (seconds), and the fraction of it that dropping brings it down to.
DROP_EVERY, DROP_TO = 2.0, 0.9
#: The wait after a look that found nothing to drop (seconds).
DROP_IDLE = 15.0


class RemoteTiers:
    """A store's tiers and, when some take writes, the thread that pushes to them."""

    def __init__(self, store: Store, tiers: Sequence[Tier]) -> None:
        self.store = store
        self.tiers = Tiers(store, tiers)
        if store.chunks.healer is not None:  # the tiers heal: never on the event loop
            store.chunks.healer = self._heal
            store.chunks.restorer = self._restore
        #: Keep the local store's live records under this many bytes by
        #: dropping what the read-write tiers hold (--local-max-size).
        self.local_max_size: int | None = None
        #: Chunks dropped here so far (held only by the tiers since).
        self.dropped_chunks = 0
        self.shared: SharedDirs | None = None
        #: fsync waits until the write tiers hold the data (--remote-durability remote).
        self.remote_durability = False
        self.pusher = Pusher(self.tiers) if self.tiers.writers and store.pushes else None
        self._started = False

    def trust(self, options: TrustOptions) -> None:
        """Sign what is published and take only what trusted keys signed, as
        ``options`` say (``cachefs.signing``); the keys go to the audit log."""
        signer, verifier = options.load()
        self.tiers.signer, self.tiers.verifier = signer, verifier
        if signer is None and verifier is None:
            return
        self.store.audit.record(
            "trust.keys",
            sign_key=None if signer is None else signer.key_id.hex(),
            trusted=[] if verifier is None else sorted(k.hex() for k in verifier.trusted),
            revoked=[] if verifier is None else sorted(k.hex() for k in verifier.revoked),
            max_age=options.max_age,
        )

    def share(self, fs: Filesystem) -> SharedDirs:
        """Shared cache directories of ``fs`` through these tiers (a listener)."""
        self.shared = SharedDirs(
            self.store, fs.namespace, fs.caches, fs.files, fs.stored, fs.listeners, self.tiers
        )
        fs.listeners.add(self.shared)
        return self.shared

    async def run(self) -> None:
        """Push and queue shared entries in the background, until cancelled."""
        if self.pusher is not None and not self._started:
            self._started = True
            self.pusher.start()
            depth, age = self.pusher.queue.depth()
            if depth:
                log.info("push queue: %d objects waiting (oldest %.0f s)", depth, age)
        async with trio.open_nursery() as nursery:
            if self.local_max_size is not None and self.tiers.readers:
                nursery.start_soon(self._keep_small, self.local_max_size)
            if self.shared is not None:
                nursery.start_soon(self.shared.run)

    def close(self) -> None:
        """Stop pushing (what is left stays queued for the next start)."""
        if self.store.chunks.healer == self._heal:
            self.store.chunks.healer = None
            self.store.chunks.restorer = None
        if self.shared is not None:
            self.shared.flush()  # queued for the next start if not pushed now
        if self.pusher is not None and self._started:
            self.pusher.stop()
        if self.tiers.tiers:
            self.tiers.close()

    def _heal(self, digest: bytes, length: int) -> bytes | None:
        if _in_trio():
            raise HealElsewhere(f"chunk {digest.hex()} is damaged", digest=digest, length=length)
        return self.tiers.heal(digest, length)

    def _restore(
        self, chunks: list[tuple[bytes, int]], landed: Callable[[int], None] | None = None
    ) -> int:
        if _in_trio():
            digest, length = chunks[0]
            raise HealElsewhere(
                f"chunk {digest.hex()} is held only by the remote tiers",
                digest=digest,
                length=length,
                remote=True,
            )
        return self.tiers.restore(chunks, landed)

    async def _keep_small(self, limit: int) -> None:
        """Every ``DROP_EVERY`` seconds (``DROP_IDLE`` after a look that found
        nothing to drop), if the store's live records take more than
        ``limit`` bytes, drop chunks the durable read-write tiers hold
        (coldest first) down to ``DROP_TO`` of it (``engine.drop_held``)."""
        while True:
            wait = DROP_EVERY
            if self.store.stored_bytes() > limit:
                try:
                    report = await trio.to_thread.run_sync(
                        drop_held, self.store, int(limit * DROP_TO), self.tiers.held
                    )
                    self.dropped_chunks += report.chunks
                except CachefsError as exc:
                    log.warning("--local-max-size: dropping chunks the tiers hold failed: %s", exc)
                    report = None
                if report is None or not report.chunks:
                    wait = DROP_IDLE  # nothing held yet (pushes lag): ask again later
            await trio.sleep(wait)

    async def durable(self, ino: int) -> None:
        """After an fsync of file ``ino``: with ``remote_durability``, wait until
        the write tiers hold its content (EIO if they do not within
        ``REMOTE_FSYNC_TIMEOUT`` seconds: the data is safe locally, not there)."""
        if not self.remote_durability or self.pusher is None or self.shared is None:
            return
        inode = self.shared.namespace.get(ino)
        if inode.content == NO_CONTENT:
            return
        digest = Digest(inode.content, inode.size)
        queue = self.pusher.queue
        pushed = await trio.to_thread.run_sync(
            queue.wait_pushed, digest, REMOTE_FSYNC_TIMEOUT, abandon_on_cancel=True
        )
        if not pushed:
            raise FsError(
                errno.EIO,
                f"fsync: the write tiers do not hold {digest} after "
                f"{REMOTE_FSYNC_TIMEOUT:.0f} s (it is safe locally and stays queued)",
            )

    def figures(self) -> dict[str, object]:
        """``{"remote": ...}`` for ``stats``, or nothing when there are no tiers;
        and ``{"signatures": ...}`` when only signed entries are taken: what was
        accepted and what refused, by reason (``cachefs.signing``)."""
        verifier = self.tiers.verifier
        signed: dict[str, object] = {} if verifier is None else {"signatures": verifier.figures()}
        if not self.tiers.tiers:
            return signed
        doc = self.tiers.figures()
        if self.pusher is not None:
            doc |= self.pusher.figures()
        if self.shared is not None:
            doc |= self.shared.figures()
        if self.local_max_size is not None:
            doc["local_max_size"] = self.local_max_size
            doc["dropped_chunks"] = self.dropped_chunks
        return {"remote": doc, **signed}


__all__ = ["RemoteTiers"]
