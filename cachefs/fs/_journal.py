"""The mount's records in the store's journal (filesystem layer).

Every ``write`` and truncation of a file is first appended to the store's
journal (``engine.Journal``; the kinds and payloads, ``FILE_BASE``,
``FILE_WRITE`` and ``FILE_TRUNCATE``, are in ``cachefs.format.journal``), then
applied to the file's spool.  When the daemon is killed, the next mount
replays the journal: for every inode, the records after its last
``FILE_BASE`` are applied to that base and published -- unless the inode's
content is no longer that base (it was published afterwards, or truncated to
nothing) or the inode is gone.  So writes that reached the journal survive the
death of the daemon, and with ``sync`` (which flushes the store's own files) a
crash of the machine.  The store stays consistent whatever the moment: spools
are scratch space that the next start discards.

The journal restarts whenever it passed ``RESTART_SIZE`` bytes and nothing is
unpublished; once it passes ``log_limit``, the files with the most
unpublished bytes are published and it restarts carrying over the rest
(re-logged from the spools: :meth:`FileJournal.carry_over`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from cachefs.engine import CachefsError, FsError, Journal, Namespace
from cachefs.format import journal as fmt
from cachefs.format.schema import NO_CONTENT
from cachefs.fs._files import PIECE, OpenFile, OpenFiles

log = logging.getLogger(__name__)

#: Size of the journal that makes every file publish and the journal restart.
DEFAULT_LOG_LIMIT = 1 << 30
#: Past this size the journal restarts whenever nothing is left unpublished.
RESTART_SIZE = 4 << 20


class FileJournal:
    """Logs the changes of open files to the store's journal, and replays them."""

    def __init__(self, journal: Journal, *, log_limit: int = DEFAULT_LOG_LIMIT) -> None:
        self.journal = journal
        self.log_limit = log_limit

    @property
    def size(self) -> int:
        return self.journal.size

    @property
    def full(self) -> bool:
        """Past its limit: time to publish and carry over (:meth:`carry_over`)."""
        return self.journal.size >= self.log_limit

    def changing(self, state: OpenFile) -> None:
        """A change is about to be applied: log the base it applies to, if new;
        the file's times and content generation move on."""
        if not state.changed:
            self._log_base(state)
            state.changed = True
        now = time.time_ns()
        state.mtime_ns = state.ctime_ns = now
        state.generation += 1

    def _log_base(self, state: OpenFile) -> None:
        base = state.base
        content, size = (NO_CONTENT, 0) if base is None else (base.hash, base.size)
        self.journal.append(fmt.FILE_BASE, fmt.FILE_BASE_PAYLOAD.pack(state.ino, size, content))

    def write(self, state: OpenFile, offset: int, data: bytes | memoryview) -> None:
        head = fmt.FILE_WRITE_HEAD.pack(state.ino, offset, state.mtime_ns)
        self.journal.append(fmt.FILE_WRITE, head, data)

    def truncate(self, state: OpenFile, size: int) -> None:
        payload = fmt.FILE_TRUNCATE_PAYLOAD.pack(state.ino, size, state.mtime_ns)
        self.journal.append(fmt.FILE_TRUNCATE, payload)

    def replay(
        self,
        namespace: Namespace,
        files: OpenFiles,
        truncate: Callable[[OpenFile, int], None],
        publish: Callable[[OpenFile], None],
    ) -> None:
        """Publish the writes a killed daemon logged but never published.

        ``truncate`` applies a truncation to a state, ``publish`` stores a
        state's content durably.  A file that cannot be published now (a full
        disk) stays an open file with unpublished writes (``OpenFiles.adopt``):
        published at the next sync or unmount, carried over by a restart of
        the journal, kept in it until then; the others go on."""
        records = self.journal.replay()
        if not records:
            return
        logs: dict[int, list[fmt.JournalRecord]] = {}
        for record in records:
            if record.kind not in fmt.FILE_KINDS:
                log.warning("journal: skipping record of unknown kind %d", record.kind)
                continue
            ino = fmt.file_inode(record)
            if record.kind == fmt.FILE_BASE:
                logs[ino] = []
            if ino in logs:
                logs[ino].append(record)
        replayed = failed = 0
        for ino, entries in logs.items():
            _, size, content = fmt.FILE_BASE_PAYLOAD.unpack_from(entries[0].payload)
            try:
                inode = namespace.get(ino)
            except FsError:
                continue  # deleted since
            if not inode.is_reg or inode.content != content or inode.size != size:
                continue  # published (or emptied) after these writes
            state = files.new(ino, inode)
            state.changed = True
            for record in entries[1:]:
                if record.kind == fmt.FILE_WRITE:
                    _, offset, mtime = fmt.FILE_WRITE_HEAD.unpack_from(record.payload)
                    data = memoryview(record.payload)[fmt.FILE_WRITE_HEAD.size :]
                    state.apply_write(offset, data)
                else:
                    _, new_size, mtime = fmt.FILE_TRUNCATE_PAYLOAD.unpack_from(record.payload)
                    truncate(state, new_size)
                state.mtime_ns = state.ctime_ns = mtime
                state.changed = True
            try:
                publish(state)
            except CachefsError as exc:
                failed += 1
                log.error(
                    "journal: could not publish inode %d (kept, published again at the "
                    "next sync or unmount): %s",
                    ino,
                    exc,
                )
                files.adopt(state)
            else:
                replayed += 1
                state.close()
        namespace.store.sync()  # what was replayed is durable before the records go
        if not failed:
            self.journal.checkpoint()
        if replayed:
            log.info("journal: published the logged writes of %d files", replayed)

    def restart(self, files: Iterable[OpenFile]) -> None:
        """Empty the journal if it passed ``RESTART_SIZE`` and everything it
        holds has been published."""
        if self.journal.size < RESTART_SIZE or any(state.changed for state in files):
            return
        try:
            self.journal.checkpoint()
        except CachefsError as exc:
            log.warning("could not restart the journal: %s", exc)

    def carry_over(self, files: Iterable[OpenFile]) -> None:
        """Restart the journal, logging again what is still unpublished (no
        await in here: nothing may change meanwhile)."""
        self.journal.checkpoint()
        for state in files:
            if state.changed:
                self._log_unpublished(state)

    def _log_unpublished(self, state: OpenFile) -> None:
        """Log a changed file's unpublished content again, as if written anew
        (records whose replay gives the file as it is now)."""
        self._log_base(state)
        self.truncate(state, state.base_limit)
        self.truncate(state, state.size)
        if state.spool is None:
            return
        for start, stop in list(state.data_regions()):
            for piece in range(start, stop, PIECE):
                data = state.read_spool(piece, min(stop, piece + PIECE))
                self.write(state, piece, data)

    def closing(self, files: Iterable[OpenFile]) -> None:
        """At unmount: start an empty journal if nothing is left unpublished."""
        if any(state.changed for state in files):
            return
        try:
            self.journal.checkpoint()
        except CachefsError as exc:
            log.warning("could not checkpoint the journal: %s", exc)
