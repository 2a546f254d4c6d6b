"""The namespace and the filesystem layer, called directly (no kernel)."""

from __future__ import annotations

import errno
import itertools
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from cachefs.engine import (
    CachefsError,
    ExtendedAttributes,
    FsError,
    Inode,
    Namespace,
    Store,
    check_store,
)
from cachefs.format.schema import INO_KEY, INO_VALUE, ROOT_INODE, dirent_key
from cachefs.fs import Filesystem, OpenFile, _files, _lookups

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


def _errno(exc: pytest.ExceptionInfo[FsError]) -> int:
    return exc.value.errno


def test_create_lookup_and_link_counts(store: Store) -> None:
    ns = Namespace(store)
    d = ns.create(ROOT_INODE, b"d", DIR, 1, 2)
    f = ns.create(d.ino, b"f", FILE, 1, 2)
    assert ns.lookup(d.ino, b"f") == f.ino
    assert ns.get(ROOT_INODE).nlink == 3
    ns.link(f.ino, ROOT_INODE, b"g")
    assert ns.get(f.ino).nlink == 2
    with pytest.raises(FsError) as info:
        ns.create(d.ino, b"f", FILE, 0, 0)
    assert _errno(info) == errno.EEXIST
    with pytest.raises(FsError) as info:
        ns.remove(ROOT_INODE, b"d", directory=True, in_use=False)
    assert _errno(info) == errno.ENOTEMPTY
    with pytest.raises(FsError) as info:
        ns.create(ROOT_INODE, b"x" * 256, FILE, 0, 0)
    assert _errno(info) == errno.ENAMETOOLONG


def test_rename_rules(store: Store) -> None:
    ns = Namespace(store)
    a = ns.create(ROOT_INODE, b"a", DIR, 0, 0)
    b = ns.create(a.ino, b"b", DIR, 0, 0)
    with pytest.raises(FsError) as info:
        ns.rename(ROOT_INODE, b"a", b.ino, b"inside", 0)
    assert _errno(info) == errno.EINVAL
    f = ns.create(ROOT_INODE, b"f", FILE, 0, 0)
    with pytest.raises(FsError) as info:
        ns.rename(ROOT_INODE, b"f", ROOT_INODE, b"a", 0)
    assert _errno(info) == errno.EISDIR
    ns.rename(ROOT_INODE, b"f", a.ino, b"b", 2)  # exchange a file and a directory
    assert ns.lookup(a.ino, b"b") == f.ino and ns.lookup(ROOT_INODE, b"f") == b.ino
    with pytest.raises(FsError) as info:
        ns.rename(ROOT_INODE, b"f", a.ino, b"b", 3)
    assert _errno(info) == errno.EINVAL


def test_set_gid_directory_passes_its_group(store: Store) -> None:
    ns = Namespace(store)
    d = ns.create(ROOT_INODE, b"d", DIR | stat.S_ISGID, 0, 77)
    f = ns.create(d.ino, b"f", FILE, 5, 5)
    sub = ns.create(d.ino, b"sub", DIR, 5, 5)
    assert f.gid == 77 and sub.gid == 77 and sub.mode & stat.S_ISGID


def test_unlinked_file_in_use_is_an_orphan_until_released(store: Store) -> None:
    ns = Namespace(store)
    f = ns.create(ROOT_INODE, b"f", FILE, 0, 0)
    store.put(b"content", on_publish=lambda txn, d: ns.set_content(txn, f.ino, d, 1, 1))
    assert store.stats().files == 1
    ns.remove(ROOT_INODE, b"f", directory=False, in_use=True)
    assert ns.orphan_inodes() == [f.ino]
    assert store.stats().files == 1  # still readable by whoever holds it
    assert ns.purge_orphans() == 1
    assert store.stats().files == 0 and ns.orphan_inodes() == []


async def test_orphans_released_together_are_deleted_in_one_transaction(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rm`` of many files the kernel knows: the unlinks answered within
    ``RELEASE_DELAY`` are committed in one transaction, each file an orphan
    if the kernel still knows it or it is open; those released by then are
    deleted in one more.  A sync deletes them at once; one that is open again
    is kept until it is closed."""
    fs = Filesystem(store)
    releases: list[tuple[int, ...]] = []
    removals: list[int] = []
    release, remove_entries = fs.namespace.release, fs.namespace.remove_entries

    def counted(*inos: int) -> list[int]:
        releases.append(inos)
        return release(*inos)

    def removing(
        entries: list[tuple[int, bytes, int, int]], in_use: set[int], **options: Any
    ) -> list[tuple[int, bytes, Inode]]:
        removals.append(len(entries))
        return remove_entries(entries, in_use, **options)

    monkeypatch.setattr(fs.namespace, "release", counted)
    monkeypatch.setattr(fs.namespace, "remove_entries", removing)
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        inos = []
        for n in range(20):
            inode = fs.create(ROOT_INODE, f"f{n}".encode(), FILE, 0, 0)
            fh, _ = await fs.open(inode.ino, os.O_WRONLY)
            await fs.write(fh, 0, f"content {n}".encode())
            await fs.release(fh)
            inos.append(inode.ino)
        await fs.flush_all()
        reopened, _ = await fs.open(inos[0], os.O_RDONLY)
        for n, ino in enumerate(inos):
            fs.unlink(ROOT_INODE, f"f{n}".encode())
            fs.forget([(ino, 1)])
        assert releases == [] and removals == [] and fs.namespace.orphan_inodes() == []
        with trio.fail_after(60):
            while not releases:
                await trio.sleep(0.01)
        assert removals == [20] and releases == [tuple(inos[1:])]
        assert fs.namespace.orphan_inodes() == [inos[0]]
        assert bytes(await fs.read(reopened, 0, 100)) == b"content 0"
        await fs.release(reopened)
        await fs.flush_all()  # a sync: at once
        assert releases[1:] == [(inos[0],)] and fs.namespace.orphan_inodes() == []
        nursery.cancel_scope.cancel()
    fs.close()
    assert store.stats().files == 0 and check_store(store).clean


async def test_an_orphan_goes_when_the_kernel_forgets_its_last_lookup(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel may forget an inode's lookups a few at a time: an orphan it
    still knows by one is kept.  Released orphans wait ``RELEASE_DELAY`` for
    others, unless as many as ``_RELEASE_BATCH`` wait already: those go at once."""
    monkeypatch.setattr(_lookups, "_RELEASE_BATCH", 3)
    monkeypatch.setattr(_lookups, "RELEASE_DELAY", 3600.0)  # only a full batch goes
    fs = Filesystem(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        inodes = [fs.create(ROOT_INODE, f"f{n}".encode(), FILE, 0, 0) for n in range(4)]
        kept = inodes[0].ino
        assert fs.lookup(ROOT_INODE, b"f0").ino == kept  # the kernel knows it twice now
        for n in range(4):
            fs.unlink(ROOT_INODE, f"f{n}".encode())  # the first three committed at once
        assert len(fs.namespace.orphan_inodes()) == 3
        fs.lookups.commit_unlinks()  # (as a sync would)
        fs.forget([(kept, 1)])
        await trio.sleep(0.05)
        assert kept in fs.namespace.orphan_inodes()  # known once more
        fs.forget([(inodes[1].ino, 1), (inodes[2].ino, 1)])
        assert len(fs.namespace.orphan_inodes()) == 4  # two released: they wait
        fs.forget([(kept, 1)])  # the third released: the batch goes now
        assert fs.namespace.orphan_inodes() == [inodes[3].ino]
        fs.forget([(inodes[3].ino, 1)])
        await fs.flush_all()
        assert fs.namespace.orphan_inodes() == []
        nursery.cancel_scope.cancel()
    fs.close()
    assert store.stats().files == 0 and check_store(store).clean


@pytest.mark.parametrize("how", ["unlink", "rename over it"])
async def test_an_orphan_the_kernel_knows_keeps_its_unpublished_writes(
    store: Store, how: str
) -> None:
    """A file closed and not yet published (waiting for the others of the
    moment) loses its last name while the kernel still knows it: a process
    that found the name before may open it yet (seen in a stress run: a
    reader racing ``rename(tmp, name)`` read the file it replaced as empty).
    Its writes stay readable until the kernel forgets it; then it goes."""
    fs = Filesystem(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        inode = fs.create(ROOT_INODE, b"name", FILE, 0, 0)
        fh, _ = await fs.open(inode.ino, os.O_WRONLY)
        await fs.write(fh, 0, b"the old content")
        await fs.release(fh)  # published with the others of the next moment
        if how == "unlink":
            fs.unlink(ROOT_INODE, b"name")
        else:
            new = fs.create(ROOT_INODE, b"name.tmp", FILE, 0, 0)
            fs.rename(ROOT_INODE, b"name.tmp", ROOT_INODE, b"name", 0)

        def published() -> bool:  # the batch's publication ran (and left this file out)
            state = fs.files.get(inode.ino)
            return state is None or not (state.waiting or state.publishing)

        with trio.fail_after(60):
            while not published():
                await trio.sleep(0.01)
        fs.lookups.commit_unlinks()  # (an unlink is committed a moment later)
        assert fs.namespace.orphan_inodes() == [inode.ino]
        reader, _ = await fs.open(inode.ino, os.O_RDONLY)
        assert bytes(await fs.read(reader, 0, 100)) == b"the old content"
        await fs.release(reader)
        fs.forget([(inode.ino, 1)])
        with trio.fail_after(60):
            while fs.namespace.orphan_inodes():
                await trio.sleep(0.01)
        assert fs.files.get(inode.ino) is None
        if how != "unlink":
            assert fs.lookup(ROOT_INODE, b"name").ino == new.ino
        await fs.flush_all()
        nursery.cancel_scope.cancel()
    fs.close()
    assert check_store(store).clean


def test_fsck_finds_and_repairs_namespace_damage(store: Store) -> None:
    ns = Namespace(store)
    d = ns.create(ROOT_INODE, b"d", DIR, 0, 0)
    f = ns.create(d.ino, b"f", FILE, 0, 0)
    digest = store.put(b"x" * 5000, on_publish=lambda txn, dg: ns.set_content(txn, f.ino, dg, 1, 1))
    assert check_store(store).clean
    with store.transaction("damaging") as txn:
        ns.dirents.put(txn, dirent_key(d.ino, b"ghost"), INO_VALUE.pack(999))
        inode = ns.get(f.ino, txn)
        inode.nlink = 3
        ns.inodes.put(txn, INO_KEY.pack(f.ino), inode.pack())
        store.index.objects.delete(txn, digest.hash)  # the file's content is lost
    report = check_store(store)
    kinds = " ".join(p.message for p in report.problems)
    assert "no inode 999" in kinds and "link count 3" in kinds and "not stored" in kinds
    check_store(store, repair=True)
    assert check_store(store).clean, check_store(store).problems
    assert ns.get(f.ino).size == 0
    assert ExtendedAttributes(ns).get(f.ino, b"user.cachefs.lost") == str(digest).encode()


# --- OpenFile: where each byte of a changed file comes from ----------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 5000), st.binary(min_size=1, max_size=800)),
        st.tuples(st.just("truncate"), st.integers(0, 6000), st.just(b"")),
    ),
    max_size=25,
)


@given(base=st.binary(max_size=4000), operations=ops)
def test_open_file_extents_match_a_bytearray(base: bytes, operations: list) -> None:  # type: ignore[type-arg]
    """Composing base + spool through ``ranges`` equals applying the same
    writes and truncations to a bytearray."""
    state = OpenFile(1, None, len(base), len(base))
    spool = bytearray(len(base))  # a sparse file: zeros until written
    model = bytearray(base)
    for op, offset, data in operations:
        if op == "write":
            end = offset + len(data)
            spool.extend(bytes(max(0, end - len(spool))))
            spool[offset:end] = data
            state.mark_dirty(offset, end)
            state.size = max(state.size, end)
            model.extend(bytes(max(0, end - len(model))))
            model[offset:end] = data
        else:
            state.cut(offset)
            del spool[offset:]
            spool.extend(bytes(max(0, offset - len(spool))))
            state.size = offset
            del model[offset:]
            model.extend(bytes(max(0, offset - len(model))))
    composed = bytearray()
    for from_spool, start, stop in state.ranges(0, state.size):
        composed += spool[start:stop] if from_spool else base[start:stop]
    assert composed == model
    extents = state.dirty
    assert all(s < e <= state.base_limit for s, e in extents)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(extents))


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "without"])
def test_a_spool_has_no_name_with_or_without_o_tmpfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmpfile: bool
) -> None:
    """A spool is a file with no name: made with O_TMPFILE, or, on a file
    system without it (tried once), made and unlinked at once."""
    real_open = os.open

    def opening(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if not tmpfile and flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(_files, "_tmpfile", {"usable": True})
    monkeypatch.setattr(os, "open", opening)
    states = [OpenFile(n, None, 0, 0, spool_dir=tmp_path) for n in (1, 2)]
    for n, state in enumerate(states):
        assert state.apply_write(0, b"spooled %d" % n) == 9
    assert [os.pread(state.spool_fd(), 100, 0) for state in states] == [b"spooled 0", b"spooled 1"]
    assert os.listdir(tmp_path) == []
    assert _files._tmpfile == {"usable": tmpfile}
    for state in states:
        state.close()


async def test_filesystem_write_publish_and_read(store_path: Path) -> None:
    with Store.open(store_path, create=True) as store:
        fs = Filesystem(store)
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            inode = fs.create(ROOT_INODE, b"f", FILE, 0, 0)
            fh, _ = await fs.open(inode.ino, 0o2)  # O_RDWR
            await fs.write(fh, 0, b"hello world")
            await fs.write(fh, 6, b"there")
            assert bytes(await fs.read(fh, 0, 100)) == b"hello there"
            await fs.fsync(fh)
            assert str(fs.digest_of(inode.ino)).endswith("/11")
            await fs.write(fh, 20, b"!")
            assert bytes(await fs.read(fh, 0, 100)) == b"hello there" + bytes(9) + b"!"
            await fs.release(fh)
            assert fs.getattr(inode.ino).size == 21 and not fs.files
            nursery.cancel_scope.cancel()
        fs.close()


async def test_a_trace_that_cannot_be_written_stops_and_the_filesystem_goes_on(
    store_path: Path,
) -> None:
    with Store.open(store_path, create=True) as store:
        fs = Filesystem(store)
        try:
            fs.start_trace(Path("/dev/full"))  # every write fails with ENOSPC
            assert fs.figures()["tracing"] == "/dev/full"
            inode = fs.create(ROOT_INODE, b"f", FILE, 0, 0)  # traced: the write fails
            assert fs.tracer is None and fs.figures()["tracing"] is None
            assert fs.stop_trace() == 0
            assert fs.lookup(ROOT_INODE, b"f").ino == inode.ino
        finally:
            fs.close()


def test_every_namespace_error_is_its_errno(store: Store) -> None:
    """The errors of link, unlink, rmdir, rename and setattr, one by one."""
    ns = Namespace(store)
    d = ns.create(ROOT_INODE, b"d", DIR, 0, 0)
    full = ns.create(ROOT_INODE, b"full", DIR, 0, 0)
    ns.create(full.ino, b"x", FILE, 0, 0)
    f = ns.create(ROOT_INODE, b"f", FILE, 0, 0)
    g = ns.create(ROOT_INODE, b"g", FILE, 0, 0)
    gone = ns.create(ROOT_INODE, b"gone", DIR, 0, 0)
    ns.remove(ROOT_INODE, b"gone", directory=True, in_use=True)
    cases: list[tuple[Callable[[], object], int]] = [
        (lambda: ns.create(ROOT_INODE, b"a/b", FILE, 0, 0), errno.EINVAL),
        (lambda: ns.create(ROOT_INODE, b"..", FILE, 0, 0), errno.EINVAL),
        (lambda: ns.create(f.ino, b"in-a-file", FILE, 0, 0), errno.ENOTDIR),
        (lambda: ns.create(gone.ino, b"in-a-removed-dir", FILE, 0, 0), errno.ENOENT),
        (lambda: ns.link(d.ino, ROOT_INODE, b"dirlink"), errno.EPERM),
        (lambda: ns.remove(ROOT_INODE, b"nothing", directory=False, in_use=False), errno.ENOENT),
        (lambda: ns.remove(ROOT_INODE, b"f", directory=True, in_use=False), errno.ENOTDIR),
        (lambda: ns.remove(ROOT_INODE, b"d", directory=False, in_use=False), errno.EISDIR),
        (lambda: ns.rename(ROOT_INODE, b"nothing", ROOT_INODE, b"y", 0), errno.ENOENT),
        (lambda: ns.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", 1), errno.EEXIST),
        (lambda: ns.rename(ROOT_INODE, b"f", ROOT_INODE, b"new", 2), errno.ENOENT),
        (lambda: ns.rename(ROOT_INODE, b"d", ROOT_INODE, b"f", 0), errno.ENOTDIR),
        (lambda: ns.rename(ROOT_INODE, b"d", ROOT_INODE, b"full", 0), errno.ENOTEMPTY),
        (lambda: ns.setattr(f.ino, size=10), errno.EINVAL),
        (lambda: ns.path_of(gone.ino), errno.ENOENT),
    ]
    for call, code in cases:
        with pytest.raises(FsError) as info:
            call()
        assert _errno(info) == code, call
    # What must do nothing, or just work:
    ns.link(f.ino, ROOT_INODE, b"f2")
    assert ns.rename(ROOT_INODE, b"f", ROOT_INODE, b"f2", 0) is None  # same inode
    assert ns.lookup(ROOT_INODE, b"f") == f.ino
    empty = ns.create(ROOT_INODE, b"empty", DIR, 0, 0)
    ns.rename(ROOT_INODE, b"d", ROOT_INODE, b"empty", 0)  # replaces an empty directory
    assert ns.lookup(ROOT_INODE, b"empty") == d.ino
    with pytest.raises(FsError):
        ns.get(empty.ino)  # the replaced directory is gone
    assert ns.path_of(d.ino) == b"/empty" and ns.path_of(ROOT_INODE) == b"/"
    assert ns.get(ROOT_INODE).nlink == 2 + 2  # full and empty
    ns.setattr(g.ino, mode=0o600, uid=1, gid=2, atime_ns=5, mtime_ns=6, size=0)
    assert (ns.get(g.ino).mode & 0o7777, ns.get(g.ino).mtime_ns) == (0o600, 6)
    assert ns.release(g.ino, 999_999) == []  # still linked; unknown
    assert check_store(store).clean


def _damage(store: Store, ns: Namespace, kind: str, d: int, f: int, digest_hash: bytes) -> str:
    """Damage the namespace one way; the words fsck must report it with."""
    with store.transaction("damaging") as txn:
        if kind == "entry in a file":
            ns.dirents.put(txn, dirent_key(f, b"inside"), INO_VALUE.pack(d))
            return "not a directory"
        if kind == "directory linked twice":
            ns.dirents.put(txn, dirent_key(ROOT_INODE, b"again"), INO_VALUE.pack(d))
            return f"directory inode {d} has 2 entries"
        if kind == "too few references":
            entry = store.index.get_object(txn, digest_hash)
            assert entry is not None
            entry.refcount = 0
            store.index.put_object(txn, digest_hash, entry)
            return "0 references, but 1 files hold it"
        if kind == "inode counter":
            store.index.set_counter(txn, "inodes", 99)
            return "inode counter says 99"
        assert ns.caches is not None
        if kind == "store settings":
            ns.caches.put(txn, INO_KEY.pack(0), b"{not json")
            return "store-wide cache settings are damaged"
        if kind == "settings of a file":
            ns.caches.put(txn, INO_KEY.pack(f), b'{"max_size": 5}')
            return "not a directory"
        if kind == "settings without a size":
            ns.caches.put(txn, INO_KEY.pack(d), b'{"max_size": "big"}')
            return f"the cache settings of directory {d} are damaged"
        if kind == "lost+found is a file":
            ns.dirents.delete(txn, dirent_key(d, b"f"))  # f leaks ...
            lost = ns.create(
                ROOT_INODE, b"lost+found", FILE, 0, 0, txn=txn
            )  # ... and the name is taken
            assert lost
            return "in no directory"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "entry in a file",
        "directory linked twice",
        "too few references",
        "inode counter",
        "store settings",
        "settings of a file",
        "settings without a size",
        "lost+found is a file",
    ],
)
def test_fsck_repairs_each_kind_of_namespace_damage(store: Store, kind: str) -> None:
    ns = Namespace(store)
    d = ns.create(ROOT_INODE, b"d", DIR, 0, 0)
    f = ns.create(d.ino, b"f", FILE, 0, 0)
    digest = store.put(b"y" * 5000, on_publish=lambda txn, dg: ns.set_content(txn, f.ino, dg, 1, 1))
    assert check_store(store).clean
    words = _damage(store, ns, kind, d.ino, f.ino, digest.hash)
    report = check_store(store)
    assert any(words in p.message for p in report.problems), report.problems
    check_store(store, repair=True)
    assert check_store(store).clean, check_store(store).problems
    if kind == "lost+found is a file":
        folder = ns.lookup(ROOT_INODE, b"lost+found.cachefs")
        assert ns.lookup(folder, str(f.ino).encode()) == f.ino


async def test_a_trace_follows_renamed_directories(store_path: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    with Store.open(store_path, create=True) as store:
        fs = Filesystem(store)
        try:
            with pytest.raises(CachefsError, match="opening the trace file"):
                fs.start_trace(tmp_path / "no such dir" / "trace.jsonl")
            fs.start_trace(trace)
            d = fs.create(ROOT_INODE, b"d", DIR, 0, 0)
            fs.create(d.ino, b"f", FILE, 0, 0)
            fs.rename(ROOT_INODE, b"d", ROOT_INODE, b"e", 0)
            fs.create(d.ino, b"g", FILE, 0, 0)
            assert fs.stop_trace() >= 3
        finally:
            fs.close()
    paths = [json.loads(line)["path"] for line in trace.read_text().splitlines()]
    assert "d/f" in paths and "e/g" in paths and "d/g" not in paths


def test_extended_attribute_errors(store: Store) -> None:
    ns = Namespace(store)
    f = ns.create(ROOT_INODE, b"f", FILE, 0, 0)
    xattrs = ExtendedAttributes(ns)
    cases: list[tuple[Callable[[], object], int]] = [
        (lambda: xattrs.set(f.ino, b"user." + b"n" * 300, b"v"), errno.ERANGE),
        (lambda: xattrs.set(f.ino, b"user.big", b"v" * (64 * 1024 + 1)), errno.E2BIG),
        (lambda: xattrs.set(f.ino, b"system.posix_acl_access", b"v"), errno.EOPNOTSUPP),
        (lambda: xattrs.set(f.ino, b"user.new", b"v", os.XATTR_REPLACE), errno.ENODATA),
        (lambda: xattrs.remove(f.ino, b"user.none"), errno.ENODATA),
    ]
    for call, code in cases:
        with pytest.raises(FsError) as info:
            call()
        assert _errno(info) == code
    xattrs.set(f.ino, b"user.a", b"1", os.XATTR_CREATE)
    with pytest.raises(FsError) as info:
        xattrs.set(f.ino, b"user.a", b"2", os.XATTR_CREATE)
    assert _errno(info) == errno.EEXIST
    xattrs.set(f.ino, b"user.a", b"2", os.XATTR_REPLACE)
    assert xattrs.get(f.ino, b"user.a") == b"2"
    xattrs.remove(f.ino, b"user.a")
