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

A file that streams (a new file written in order, ``_streams.py``) logs its
writes by reference to its spool, which gets a name in ``journal/spools``
(``FILE_WRITE_SPOOLED``): every byte is written once, to the spool, instead of
to both the journal and the spool.  Replay reads those bytes from the named
spools, which go at the checkpoint that follows.

The journal restarts whenever it passed ``RESTART_SIZE`` bytes and nothing is
unpublished; once it passes ``log_limit``, the files with the most
unpublished bytes are published and it restarts carrying over the rest
(re-logged from the spools: :meth:`FileJournal.carry_over`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable

from cachefs.engine import (
    CachefsError,
    FsError,
    Journal,
    Namespace,
    unlinks_logged,
    unlinks_logged_below,
)
from cachefs.errors import from_oserror
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
        #: Where spools get the names that FILE_WRITE_SPOOLED records refer to,
        #: and whether they can (not when the first try failed).
        self.spools = journal.directory / fmt.SPOOLS
        self.naming = True
        #: Commits the logged unlinks (``Lookups.commit_unlinks``) before a
        #: checkpoint drops their records; whether none is left.
        self.settle: Callable[[], bool] = lambda: True

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

    def emptied(self, state: OpenFile) -> None:
        """A file is being truncated to nothing, which dropped its content at
        once (in the index): logged before its spool is cut, so that what was
        logged of it before is not replayed over that.  (Killed before this, a
        replay gives the file as it was before the truncation, or empty.)"""
        self.journal.append(fmt.FILE_BASE, fmt.FILE_BASE_PAYLOAD.pack(state.ino, 0, NO_CONTENT))

    def write(self, state: OpenFile, offset: int, data: bytes | memoryview) -> None:
        head = fmt.FILE_WRITE_HEAD.pack(state.ino, offset, state.mtime_ns)
        self.journal.append(fmt.FILE_WRITE, head, data)

    def unlinked(self, parent: int, name: bytes, ino: int, when: int) -> int:
        """Log the removal of an entry at ``when`` (ns), to be committed a moment
        later; returns the record's sequence number."""
        return self.journal.append(fmt.NS_UNLINK, fmt.NS_UNLINK_HEAD.pack(parent, ino, when), name)

    def spooled(self, state: OpenFile) -> bool:
        """Whether the file's writes may be logged by reference to its spool
        (:meth:`wrote`): its spool has a name, given now if need be."""
        if state.spool_id is not None:
            return True
        if not self.naming or state.spool_was_named:  # named and published since
            return False
        spool = self.journal.next_seq  # sequence numbers never repeat: a new name
        try:
            self.spools.mkdir(exist_ok=True)
        except OSError as exc:
            log.warning("no directory for named spools (%s): writes logged whole", exc)
            self.naming = False
            return False
        if not state.name_spool(self.spools / fmt.spool_name(state.ino, spool), spool):
            self.naming = False  # the store's file system or kernel: same for every file
        return self.naming

    def wrote(self, state: OpenFile, offset: int, length: int) -> None:
        """Log a write that is in the file's named spool already (:meth:`spooled`)."""
        assert state.spool_id is not None
        payload = fmt.FILE_WRITE_SPOOLED_PAYLOAD.pack(
            state.ino, offset, length, state.mtime_ns, state.spool_id
        )
        self.journal.append(fmt.FILE_WRITE_SPOOLED, payload)

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
        committed = unlinks_logged(namespace)
        # A journal started anew (the old one moved away) numbers from 1: above
        # the unlinks the index has, so that replay never takes one for those.
        self.journal.number_from(committed + 1)
        records = self.journal.replay()
        if not records:
            self._drop_spools()
            return
        logs: dict[int, list[fmt.JournalRecord]] = {}
        unlinks = []
        for record in records:
            if record.kind == fmt.NS_UNLINK and record.seq <= committed:
                continue  # in the index already (and its name may have been made again)
            if record.kind == fmt.NS_UNLINK:
                parent, ino, when = fmt.NS_UNLINK_HEAD.unpack_from(record.payload)
                unlinks.append((parent, record.payload[fmt.NS_UNLINK_HEAD.size :], ino, when))
                continue
            if record.kind not in fmt.FILE_KINDS:
                log.warning("journal: skipping record of unknown kind %d", record.kind)
                continue
            ino = fmt.file_inode(record)
            if record.kind == fmt.FILE_BASE:
                logs[ino] = []
            if ino in logs:
                logs[ino].append(record)
        if unlinks:  # nothing uses their inodes now: deleted at their last link
            last = max(r.seq for r in records if r.kind == fmt.NS_UNLINK)
            remove = namespace.remove_entries
            removed = namespace.store.freeing(lambda: remove(unlinks, set(), logged=last))
            log.info("journal: committed %d logged unlinks", len(removed))
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
            try:
                for record in entries[1:]:
                    mtime = self._apply(record, state, truncate)
                    state.mtime_ns = state.ctime_ns = mtime
                    state.changed = True
            except _SpoolLost as exc:
                log.error(
                    "journal: the spool of inode %d is gone (%s): its writes since it was "
                    "last published are lost, it keeps its published content",
                    ino,
                    exc,
                )
                state.close()
                continue
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
            self._drop_spools()
            # (a journal whose tail a crash of the machine lost may number below)
            self.journal.number_from(unlinks_logged(namespace) + 1)
        elif self.journal.next_seq <= unlinks_logged(namespace):
            # Its records stay, so it cannot number above what the index
            # counts (a crash of the machine lost its tail): the index counts
            # down to it instead, or the unlinks logged next would be taken
            # for committed ones by the next replay.
            try:
                unlinks_logged_below(namespace, self.journal.next_seq - 1)
            except CachefsError as exc:
                log.error("journal: could not renumber the logged unlinks: %s", exc)
        if replayed:
            log.info("journal: published the logged writes of %d files", replayed)

    def _apply(
        self, record: fmt.JournalRecord, state: OpenFile, truncate: Callable[[OpenFile, int], None]
    ) -> int:
        """Apply one logged change to a state in replay; returns its mtime."""
        if record.kind == fmt.FILE_WRITE:
            _, offset, mtime = fmt.FILE_WRITE_HEAD.unpack_from(record.payload)
            state.apply_write(offset, memoryview(record.payload)[fmt.FILE_WRITE_HEAD.size :])
        elif record.kind == fmt.FILE_WRITE_SPOOLED:
            ino, offset, length, mtime, spool = fmt.FILE_WRITE_SPOOLED_PAYLOAD.unpack(
                record.payload
            )
            path = self.spools / fmt.spool_name(ino, spool)
            try:
                with open(path, "rb", buffering=0) as f:
                    data = _read_upto(f.fileno(), offset, length)
            except FileNotFoundError:
                raise _SpoolLost(path) from None
            except OSError as exc:
                raise from_oserror(exc, f"reading the spool {path}") from None
            # A spool cut shorter since gives what it has: a later record
            # truncates the file, or (a machine that crashed before the spool
            # reached its disk) the file ends where its bytes do, as a torn
            # journal would leave it: nothing it lacks is written, not even
            # the zeros up to the record's offset.
            if data:
                state.apply_write(offset, data)
        else:
            _, new_size, mtime = fmt.FILE_TRUNCATE_PAYLOAD.unpack_from(record.payload)
            truncate(state, new_size)
        return int(mtime)

    def _drop_spools(self, files: Iterable[OpenFile] = ()) -> None:
        """The journal refers to no named spool any more: remove them all.  An
        open file's spool (one emptied since it was named) loses its name too;
        it cannot have another (``spool_was_named``): its writes are logged whole."""
        for state in files:
            state.unname_spool()
        if self.spools.exists():
            shutil.rmtree(self.spools, ignore_errors=True)

    def restart(self, files: Iterable[OpenFile]) -> None:
        """Empty the journal if it passed ``RESTART_SIZE`` and everything it
        holds has been published."""
        states = list(files)
        if self.journal.size < RESTART_SIZE or any(state.changed for state in states):
            return
        if not self.settle():
            return
        try:
            self.journal.checkpoint()
        except CachefsError as exc:
            log.warning("could not restart the journal: %s", exc)
        else:
            self._drop_spools(states)

    def carry_over(self, files: Iterable[OpenFile]) -> None:
        """Restart the journal, logging again what is still unpublished (no
        await in here: nothing may change meanwhile).  What is unpublished is
        logged again at the end of the journal first, and the new journal is
        made of those records alone, beside the old one: until it is whole,
        the old one holds everything (a full disk half way takes back the
        records logged again, whose new bases would hide the older ones)."""
        if not self.settle():
            raise CachefsError("unlinks that could not be committed are still in it")
        mark = self.journal.mark()
        try:
            for state in files:
                if state.changed:
                    self._log_unpublished(state)
            self.journal.checkpoint_from(mark)
        except BaseException:
            with contextlib.suppress(CachefsError):
                self.journal.drop_from(mark)
            raise

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
                if state.spool_id is not None:  # the bytes stay where they are
                    self.wrote(state, piece, min(stop, piece + PIECE) - piece)
                    continue
                data = state.read_spool(piece, min(stop, piece + PIECE))
                self.write(state, piece, data)

    def closing(self, files: Iterable[OpenFile]) -> None:
        """At unmount: start an empty journal if nothing is left unpublished."""
        states = list(files)
        if any(state.changed for state in states) or not self.settle():
            return
        try:
            self.journal.checkpoint(last=True)
        except CachefsError as exc:
            log.warning("could not checkpoint the journal: %s", exc)
        else:
            self._drop_spools(states)


def _read_upto(fd: int, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes at ``offset``: fewer only at the end of the file."""
    pieces = []
    while length > 0:
        piece = os.pread(fd, min(length, PIECE), offset)
        if not piece:
            break
        pieces.append(piece)
        offset += len(piece)
        length -= len(piece)
    return b"".join(pieces)


class _SpoolLost(Exception):
    """A named spool that a FILE_WRITE_SPOOLED record refers to is missing."""
