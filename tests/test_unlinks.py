"""Unlinks answered at once and committed together (``cachefs/fs/_lookups.py``),
called directly (no FUSE): whatever would see an entry that is gone commits
them first, and a daemon killed before the commit has them replayed from the
journal (``NS_UNLINK``) at the next start."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from cachefs.engine import (
    ROOT_INODE,
    FsError,
    Inode,
    Namespace,
    Store,
    StoreFullError,
    check_store,
    unlinks_logged,
)
from cachefs.format import journal as fmt
from cachefs.fs import Filesystem, _lookups
from cachefs.fs._publish import FilePublisher
from tests.conftest import SMALL_CONFIG

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


@pytest.fixture
async def fs(store: Store, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Filesystem]:
    """A running filesystem whose unlinks wait until something needs them."""
    monkeypatch.setattr(_lookups, "RELEASE_DELAY", 3600.0)
    filesystem = Filesystem(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(filesystem.run)
        yield filesystem
        nursery.cancel_scope.cancel()
    filesystem.close()


def _committed(fs: Filesystem, parent: int, name: bytes) -> bool:
    """Whether the index still has the entry (a read that commits nothing)."""
    try:
        fs.namespace.lookup(parent, name)
    except FsError:
        return False
    return True


async def _file(fs: Filesystem, parent: int, name: bytes, data: bytes = b"x") -> Inode:
    inode = fs.create(parent, name, FILE, 0, 0)
    fh, _ = await fs.open(inode.ino, os.O_WRONLY)
    await fs.write(fh, 0, data)
    await fs.release(fh)
    return inode


async def test_an_unlink_is_answered_before_its_commit_and_nothing_sees_the_entry(
    fs: Filesystem,
) -> None:
    d = fs.create(ROOT_INODE, b"d", DIR, 0, 0)
    for name in (b"a", b"b", b"c"):
        await _file(fs, d.ino, name)
    before = fs.getattr(d.ino)
    fs.unlink(d.ino, b"a")
    assert _committed(fs, d.ino, b"a")  # not yet in the index...
    with pytest.raises(FsError) as raised:
        fs.lookup(d.ino, b"a")  # ...but a lookup commits it first
    assert raised.value.errno == errno.ENOENT
    assert not _committed(fs, d.ino, b"a")

    fs.unlink(d.ino, b"b")
    seen = fs.getattr(d.ino)  # the directory's times as the unlink made them...
    assert seen.mtime_ns == seen.ctime_ns > before.mtime_ns
    assert _committed(fs, d.ino, b"b")  # ...without a commit
    listing = fs.opendir(d.ino)
    assert [name for name, _ in fs.readdir(listing, 0)] == [b".", b"..", b"c"]
    fs.releasedir(listing)
    assert not _committed(fs, d.ino, b"b")
    assert fs.getattr(d.ino).mtime_ns == seen.mtime_ns  # committed with those times

    fs.unlink(d.ino, b"c")
    again = await _file(fs, d.ino, b"c", b"new")  # the same name at once: no EEXIST
    assert fs.lookup(d.ino, b"c").ino == again.ino
    fs.unlink(d.ino, b"c")
    fs.unlink(ROOT_INODE, b"d", directory=True)  # rmdir sees the directory empty
    await fs.flush_all()
    assert fs.namespace.entries(ROOT_INODE) == []


async def test_unlinks_of_one_inode_count_its_links(fs: Filesystem) -> None:
    """Two names of one file unlinked before a commit: it is an orphan from
    the second, kept while the kernel knows it, and its attributes are right."""
    inode = fs.create(ROOT_INODE, b"a", FILE, 0, 0)
    fs.link(inode.ino, ROOT_INODE, b"b")
    fs.unlink(ROOT_INODE, b"a")
    assert inode.ino not in fs.lookups.orphans
    fs.unlink(ROOT_INODE, b"b")
    assert inode.ino in fs.lookups.orphans
    seen = fs.getattr(inode.ino)
    assert seen.nlink == 0 and fs.namespace.orphan_inodes() == []  # not committed yet
    await fs.flush_all()  # (a sync)
    assert fs.namespace.orphan_inodes() == [inode.ino]  # the kernel still knows it
    assert fs.getattr(inode.ino).ctime_ns == seen.ctime_ns
    fs.forget([(inode.ino, 2)])  # its create and its link
    await fs.flush_all()
    assert fs.namespace.orphan_inodes() == [] and fs.namespace.counts()[0] == 1  # the root


async def test_a_change_of_a_directory_commits_the_unlinks_in_it_first(fs: Filesystem) -> None:
    """Its times set explicitly stay as set (an unlink committed later would
    touch them); a change elsewhere leaves the unlinks waiting."""
    d = fs.create(ROOT_INODE, b"d", DIR, 0, 0)
    await _file(fs, d.ino, b"a")
    other = fs.create(ROOT_INODE, b"other", DIR, 0, 0)
    fs.unlink(d.ino, b"a")
    await _file(fs, other.ino, b"elsewhere")
    assert _committed(fs, d.ino, b"a")
    await fs.setattr(d.ino, mtime_ns=1_000_000_000)
    assert not _committed(fs, d.ino, b"a")
    await fs.flush_all()
    assert fs.getattr(d.ino).mtime_ns == 1_000_000_000


async def test_a_directory_changed_after_an_unlink_keeps_its_later_times(fs: Filesystem) -> None:
    """A new entry next to an unlink not yet committed: the directory's times
    are the new entry's, before the commit and after it (never earlier)."""
    d = fs.create(ROOT_INODE, b"d", DIR, 0, 0)
    await _file(fs, d.ino, b"a")
    fs.unlink(d.ino, b"a")
    made = fs.create(d.ino, b"b", FILE, 0, 0)
    assert _committed(fs, d.ino, b"a")
    seen = fs.getattr(d.ino)
    assert seen.mtime_ns == seen.ctime_ns == made.ctime_ns
    fs.lookups.commit_unlinks()
    after = fs.getattr(d.ino)
    assert (after.mtime_ns, after.ctime_ns) == (seen.mtime_ns, seen.ctime_ns)


async def test_a_checkpoint_of_the_journal_commits_the_unlinks_it_holds(
    fs: Filesystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _file(fs, ROOT_INODE, b"a")
    fs.unlink(ROOT_INODE, b"a")
    journal = fs.store.journal
    assert journal is not None
    monkeypatch.setattr("cachefs.fs._journal.RESTART_SIZE", 0)
    fs.journal.restart([])
    assert not _committed(fs, ROOT_INODE, b"a")
    assert journal.size == fmt.HEADER.size


async def test_an_unlink_the_journal_cannot_take_is_committed_at_once(
    fs: Filesystem, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    await _file(fs, ROOT_INODE, b"a")

    def full(parent: int, name: bytes, ino: int, when: int) -> None:
        raise StoreFullError("no space left on device (the journal)")

    monkeypatch.setattr(fs.journal, "unlinked", full)
    fs.unlink(ROOT_INODE, b"a")
    assert not _committed(fs, ROOT_INODE, b"a")
    assert "committed at once" in caplog.text


async def test_a_name_whose_unlink_waits_is_gone_for_the_servers_too(fs: Filesystem) -> None:
    inode = await _file(fs, ROOT_INODE, b"blob", b"content")
    fs.unlink(ROOT_INODE, b"blob")
    assert _committed(fs, ROOT_INODE, b"blob")
    assert fs.stored.lookup(ROOT_INODE, b"blob") is None
    assert fs.stored.lookup_path([b"blob"]) is None
    with fs.stored.reading() as txn:
        assert fs.stored.find_files([(ROOT_INODE, b"blob")], txn) == [None]
    # A server storing that name again (from its worker thread): the unlink is
    # committed first, and the new file takes the name.
    made = await trio.to_thread.run_sync(fs.stored.store_file, ROOT_INODE, b"blob", b"new")
    assert made is not None and made.ino != inode.ino
    assert fs.lookup(ROOT_INODE, b"blob").ino == made.ino


async def test_a_servers_batch_of_lookups_sees_a_name_gone_when_its_unlink_commits_meanwhile(
    fs: Filesystem,
) -> None:
    """A server's lookups in one transaction (FindMissingBlobs) begun after
    an unlink was answered, whose commit lands while they run: the name is
    gone for them, though their transaction is older than the commit."""
    await _file(fs, ROOT_INODE, b"blob", b"content")
    fs.unlink(ROOT_INODE, b"blob")
    with fs.stored.reading() as txn:
        fs.lookups.commit_unlinks()  # the trio thread's 20 ms timer, meanwhile
        assert fs.stored.find_files([(ROOT_INODE, b"blob")], txn) == [None]
        assert fs.stored.lookup_path([b"blob"], txn) is None
    with fs.stored.reading() as txn:  # and after: gone from the index itself
        assert fs.stored.find_files([(ROOT_INODE, b"blob")], txn) == [None]
    assert fs.stored._gone == {}


async def test_directories_renamed_or_replaced_see_their_unlinks(fs: Filesystem) -> None:
    """Renaming a directory over one whose last file was just unlinked: not
    ENOTEMPTY.  Renaming a directory (into a cache, say, which counts what is
    below it) commits the unlinks first."""
    old = fs.create(ROOT_INODE, b"old", DIR, 0, 0)
    await _file(fs, old.ino, b"f")
    fs.create(ROOT_INODE, b"new", DIR, 0, 0)
    fs.unlink(old.ino, b"f")
    fs.rename(ROOT_INODE, b"new", ROOT_INODE, b"old", 0)
    d = fs.lookup(ROOT_INODE, b"old")
    sub = fs.create(d.ino, b"sub", DIR, 0, 0)
    await _file(fs, sub.ino, b"g")
    fs.unlink(sub.ino, b"g")
    fs.rename(ROOT_INODE, b"old", ROOT_INODE, b"moved", 0)
    assert not _committed(fs, sub.ino, b"g")


async def test_a_listing_gives_the_links_an_unlink_left(fs: Filesystem) -> None:
    d1 = fs.create(ROOT_INODE, b"d1", DIR, 0, 0)
    d2 = fs.create(ROOT_INODE, b"d2", DIR, 0, 0)
    x = await _file(fs, d1.ino, b"x")
    fs.link(x.ino, d2.ino, b"x")
    fs.unlink(d1.ino, b"x")
    listing = fs.opendir(d2.ino)
    assert [(n, i.nlink) for n, i in fs.readdir(listing, 0) if n == b"x"] == [(b"x", 1)]
    fs.releasedir(listing)
    assert _committed(fs, d1.ino, b"x")  # (the other directory's listing needs no commit)


async def test_a_file_replaced_while_its_other_name_waits_is_an_orphan_that_goes(
    fs: Filesystem,
) -> None:
    """``ln a b; rm a; mv c b``: the rename over ``b`` leaves the file one link
    in the index, the unlink of ``a`` none; it is an orphan the kernel still
    knows, deleted once it forgets it."""
    a = fs.create(ROOT_INODE, b"a", FILE, 0, 0)
    fs.link(a.ino, ROOT_INODE, b"b")
    fs.unlink(ROOT_INODE, b"a")
    fs.create(ROOT_INODE, b"c", FILE, 0, 0)
    fs.rename(ROOT_INODE, b"c", ROOT_INODE, b"b", 0)
    await fs.flush_all()
    assert fs.namespace.orphan_inodes() == [a.ino]
    fs.forget([(a.ino, 2)])  # its create and its link
    await fs.flush_all()
    assert fs.namespace.orphan_inodes() == [] and check_store(fs.store).clean


async def test_an_open_file_replaced_while_its_other_name_waits_goes_once_closed(
    fs: Filesystem,
) -> None:
    """``ln a b; exec 3<>b; echo new >&3; rm a; mv c b; exec 3>&-``, all before
    the unlink's commit: once closed and forgotten, the file (its content, its
    unpublished write) is deleted, not left an orphan until the next sync."""
    a = await _file(fs, ROOT_INODE, b"a", b"old" * 1000)
    fs.link(a.ino, ROOT_INODE, b"b")
    fh, _ = await fs.open(a.ino, os.O_WRONLY)
    await fs.write(fh, 0, b"new")
    fs.unlink(ROOT_INODE, b"a")
    fs.create(ROOT_INODE, b"c", FILE, 0, 0)
    fs.rename(ROOT_INODE, b"c", ROOT_INODE, b"b", 0)
    await fs.release(fh)
    with trio.fail_after(5):
        while fs.io._released:  # released files are published together, 20 ms later
            await trio.sleep(0.005)
    fs.forget([(a.ino, 2)])  # its create and its link
    fs.lookups.flush()
    assert fs.namespace.orphan_inodes() == [] and not fs.files.busy(a.ino)
    assert check_store(fs.store).clean


async def test_an_rm_of_files_with_two_names_each_commits_them_together(
    fs: Filesystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rm d/*`` where every file has a second name beside the first: the
    unlink of a file's other name commits nothing first (only a rename over
    a file whose other name waits does)."""
    d = fs.create(ROOT_INODE, b"d", DIR, 0, 0)
    names = []
    for i in range(50):
        inode = await _file(fs, d.ino, b"f%03d" % i)
        fs.link(inode.ino, d.ino, b"f%03d.link" % i)
        names += [b"f%03d" % i, b"f%03d.link" % i]
    commits = 0
    real = fs.lookups.commit_unlinks

    def counting() -> None:
        nonlocal commits
        commits += bool(fs.lookups._unlinked)
        real()

    monkeypatch.setattr(fs.lookups, "commit_unlinks", counting)
    for name in names:
        fs.unlink(d.ino, name)
    assert commits == 0
    fs.lookups.flush()
    assert commits == 1 and fs.namespace.entries(d.ino) == []


async def test_unlinks_that_cannot_be_committed_fail_what_needs_them(
    fs: Filesystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup of the name, or a sync: the error, not the name back nor a
    sync that says it is done; they are committed once the disk allows."""
    await _file(fs, ROOT_INODE, b"a")
    fs.unlink(ROOT_INODE, b"a")
    remove_entries = fs.namespace.remove_entries

    def full(*args: object, **kwargs: object) -> None:
        raise StoreFullError("no space left on device (the index)")

    monkeypatch.setattr(fs.namespace, "remove_entries", full)
    with pytest.raises(StoreFullError):
        fs.lookup(ROOT_INODE, b"a")
    w = fs.create(ROOT_INODE, b"w", FILE, 0, 0)
    fh, _ = await fs.open(w.ino, os.O_WRONLY)
    await fs.write(fh, 0, b"written")
    with pytest.raises(StoreFullError):
        await fs.flush_all()
    assert fs.namespace.get(w.ino).size == 7  # published all the same
    await fs.release(fh)
    fs.lookups.flush()  # the timer's: logged, tried again later
    assert _committed(fs, ROOT_INODE, b"a")
    monkeypatch.setattr(fs.namespace, "remove_entries", remove_entries)
    await fs.flush_all()
    assert not _committed(fs, ROOT_INODE, b"a")


def _numbered_from(store_path: Path) -> int:
    """The sequence number the next record gets, once a mount started."""
    with Store.open(store_path) as store:
        fs = Filesystem(store)
        fs.close()
        assert store.journal is not None
        return store.journal.next_seq


async def test_a_journal_started_anew_numbers_above_the_unlinks_committed(
    store_path: Path,
) -> None:
    """The damaged journal's remedy is to move it away: the new one must not
    number its records where the index says unlinks are committed already
    (replay would skip them)."""
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        fs = Filesystem(store)
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            for n in range(5):
                fs.create(ROOT_INODE, f"f{n}".encode(), FILE, 0, 0)
                fs.unlink(ROOT_INODE, f"f{n}".encode())
            await fs.flush_all()
            nursery.cancel_scope.cancel()
        fs.close()
        committed = unlinks_logged(fs.namespace)
    assert committed >= 5
    journal = store_path / "journal" / "journal.log"
    journal.rename(store_path / "journal.moved")
    assert _numbered_from(store_path) == committed + 1
    # A journal whose tail a crash of the machine lost (a record of a file since
    # deleted is left): numbered above them too, once replayed.
    payload = fmt.FILE_BASE_PAYLOAD.pack(10_000, 0, bytes(32))
    journal.write_bytes(
        fmt.encode_header(1) + fmt.encode_record(1, fmt.FILE_BASE, payload) + payload
    )
    assert _numbered_from(store_path) == committed + 1


def test_a_server_file_stored_where_a_name_is_already_leaves_the_counters_right(
    store: Store,
) -> None:
    """The name was taken meanwhile (an unlink not yet committed, or a race):
    the reference nobody takes is dropped, in a store whose counters are
    smaller than the file (its first one), without failing the publication."""
    fs = Filesystem(store)
    try:
        fs.create(ROOT_INODE, b"x", FILE, 0, 0)
        assert fs.stored.store_file(ROOT_INODE, b"x", b"content" * 100) is None
        assert store.stats().files == 0 and check_store(store).clean
    finally:
        fs.close()


#: Makes files, commits them, then unlinks some (one name made again after
#: its unlink, one file open) and dies before those unlinks are committed.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import trio
    from cachefs.engine import ROOT_INODE, Store
    from cachefs.fs import Filesystem, _lookups

    async def main(path):
        _lookups.RELEASE_DELAY = 3600.0
        store = Store.open(path)
        fs = Filesystem(store)
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            for name in (b"a", b"b", b"c", b"d", b"kept"):
                inode = fs.create(ROOT_INODE, name, 0o100644, 0, 0)
                fh, _ = await fs.open(inode.ino, os.O_WRONLY)
                await fs.write(fh, 0, name * 1000)
                await fs.release(fh)
            fs.link(fs.lookup(ROOT_INODE, b"d").ino, ROOT_INODE, b"d2")
            await fs.flush_all()
            fs.link(fs.lookup(ROOT_INODE, b"kept").ino, ROOT_INODE, b"k2")
            fs.unlink(ROOT_INODE, b"kept")
            await fs.flush_all()  # committed; then its name is made again:
            fs.rename(ROOT_INODE, b"k2", ROOT_INODE, b"kept", 0)  # replay must not undo it
            fs.unlink(ROOT_INODE, b"a")
            fs.unlink(ROOT_INODE, b"c")
            inode = fs.create(ROOT_INODE, b"c", 0o100644, 0, 0)  # commits the two
            fh, _ = await fs.open(inode.ino, os.O_WRONLY)
            await fs.write(fh, 0, b"c again")
            await fs.fsync(fh)
            open_b, _ = await fs.open(fs.lookup(ROOT_INODE, b"b").ino, os.O_RDONLY)
            fs.unlink(ROOT_INODE, b"b")  # these three only in the journal
            fs.unlink(ROOT_INODE, b"d")
            fs.unlink(ROOT_INODE, b"c")
            fs.create(ROOT_INODE, b"x", 0o100644, 0, 0)  # (elsewhere: nothing committed)
            os.kill(os.getpid(), signal.SIGKILL)

    trio.run(main, sys.argv[1])
    """
)


async def test_an_unlink_after_a_replay_that_left_records_survives_the_next_one(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The machine crashed: the index's last commit reached the disk, the
    journal's tail did not, so the journal numbers below the unlinks the index
    counts.  The next mount cannot publish a logged file (a full disk): its
    records stay, and the journal cannot number above the index.  An unlink
    answered then is still replayed after the daemon is killed."""
    monkeypatch.setattr(_lookups, "RELEASE_DELAY", 3600.0)
    with Store.open(store_path, create=True, config=SMALL_CONFIG) as store:
        fs = Filesystem(store)
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            w = (await _file(fs, ROOT_INODE, b"w", b"w" * 100)).ino
            await _file(fs, ROOT_INODE, b"victim", b"v" * 100)
            for n in range(5):
                fs.create(ROOT_INODE, b"f%d" % n, FILE, 0, 0)
                fs.unlink(ROOT_INODE, b"f%d" % n)
            await fs.flush_all()
            nursery.cancel_scope.cancel()
        fs.close()
        committed = unlinks_logged(fs.namespace)
        content = fs.namespace.get(w).content
    assert committed > 2
    # What the crash left of the journal: a write to w, numbered from 1.
    base = fmt.FILE_BASE_PAYLOAD.pack(w, 100, content)
    head = fmt.FILE_WRITE_HEAD.pack(w, 0, 1)
    (store_path / "journal" / "journal.log").write_bytes(
        fmt.encode_header(1)
        + fmt.encode_record(1, fmt.FILE_BASE, base)
        + base
        + fmt.encode_record(2, fmt.FILE_WRITE, head, b"W")
        + head
        + b"W"
    )

    def full(self: object, state: object) -> None:
        raise StoreFullError("no space left on device")

    with Store.open(store_path) as store:
        with monkeypatch.context() as patched:
            patched.setattr(FilePublisher, "publish_now", full)
            fs = Filesystem(store)  # replays: w cannot be published, its records stay
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            fs.unlink(ROOT_INODE, b"victim")  # answered, logged; then kill -9
            nursery.cancel_scope.cancel()
    with Store.open(store_path) as store:
        fs = Filesystem(store)
        try:
            assert b"victim" not in {name for name, _ in fs.namespace.entries(ROOT_INODE)}
            assert fs.namespace.get(w).size == 100
        finally:
            fs.close()


async def test_unlinks_a_killed_daemon_answered_are_replayed(store_path: Path) -> None:
    Store.open(store_path, create=True, config=SMALL_CONFIG).close()
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(store_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr
    with Store.open(store_path) as store:
        _, found, _ = fmt.parse((store_path / "journal" / "journal.log").read_bytes(), "journal")
        logged = [r.payload[fmt.NS_UNLINK_HEAD.size :] for r in found if r.kind == fmt.NS_UNLINK]
        assert logged == [b"kept", b"a", b"c", b"b", b"d", b"c"]
        names = {name for name, _ in Namespace(store).entries(ROOT_INODE)}
        assert {b"b", b"c", b"d"} <= names  # the last three are not in the index
        fs = Filesystem(store)
        try:
            names = {name for name, _ in fs.namespace.entries(ROOT_INODE)}
            assert names == {b"d2", b"kept", b"x"}
            d2 = fs.lookup(ROOT_INODE, b"d2")
            assert d2.nlink == 1 and store.read(fs.digest_of(d2.ino)) == b"d" * 1000
            assert fs.namespace.orphan_inodes() == []  # b, open when it died: gone
            assert store.stats().files == 2
        finally:
            fs.close()
        assert check_store(store).clean
