"""Cache directory settings called directly (no mount): what ``setxattr`` of
``user.cachefs.cache`` refuses, settings damaged in the store (ignored with
a message, the rest of the mount works), and a save the disk fails."""

from __future__ import annotations

import errno
import json
import logging
import stat

import pytest

from cachefs import faults
from cachefs.engine import ROOT_INODE, FsError, Store
from cachefs.format.schema import INO_KEY, STORE_SETTINGS
from cachefs.fs import Filesystem
from cachefs.fs._settings import CACHE_XATTR, parse_setting

DIR = stat.S_IFDIR | 0o755


@pytest.mark.parametrize(
    "value, message",
    [
        (b"max_size", "not KEY=VALUE"),
        (b"max_size=10 colour=blue", "max_size=BYTES"),
        (b"policy=lru", "max_size=BYTES"),
        (b"max_size=-5", "positive"),
        (b"max_size=10k", "positive"),
        (b"max_size=0", "positive"),
        (b"max_size=10 policy=fifo", "unknown policy"),
        (b"max_size=10 shared=/abs", "share name"),
        (b"max_size=10 shared=a//b", "share name"),
        (b"max_size=10 shared=", "share name"),
        (b"max_size=10 shared=" + b"x" * 201, "share name"),
    ],
)
def test_a_bad_cache_setting_is_einval(value: bytes, message: str) -> None:
    with pytest.raises(FsError, match=message) as raised:
        parse_setting(value)
    assert raised.value.errno == errno.EINVAL


def test_settings_in_either_spelling() -> None:
    assert parse_setting(b"max-size=100,policy=arc") == (100, "arc", None)
    assert parse_setting(b"max_size=7") == (7, "lru", None)
    assert parse_setting(b"max_size=7 shared=team/ccache") == (7, "lru", "team/ccache")


def test_damaged_settings_are_ignored_with_a_message(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    fs = Filesystem(store)
    cache = fs.create(ROOT_INODE, b"cache", DIR, 0, 0)
    other = fs.create(ROOT_INODE, b"other", DIR, 0, 0)
    fs.setxattr(cache.ino, CACHE_XATTR, b"max_size=1000000")
    fs.close()
    namespace_caches = fs.namespace.caches
    assert namespace_caches is not None
    with store.transaction("damaging") as txn:
        namespace_caches.put(txn, INO_KEY.pack(STORE_SETTINGS), b"[1, 2]")
        namespace_caches.put(txn, INO_KEY.pack(other.ino), json.dumps({"max_size": -1}).encode())
    caplog.set_level(logging.ERROR)
    fs = Filesystem(store)
    try:
        assert "damaged store-wide cache settings" in caplog.text
        assert f"damaged settings of cache directory {other.ino}" in caplog.text
        assert [c["path"] for c in fs.figures()["caches"]] == ["/cache"]
        assert fs.caches.max_store_size is None
    finally:
        fs.close()


def test_a_save_the_disk_fails_is_a_warning(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    fs = Filesystem(store)
    cache = fs.create(ROOT_INODE, b"cache", DIR, 0, 0)
    fs.setxattr(cache.ino, CACHE_XATTR, b"max_size=1000000")
    faults.arm("index.commit", "eio", repeat=True)
    try:
        fs.caches.save()
    finally:
        faults.disarm()
        fs.close()
    assert "could not save the state of the cache directories" in caplog.text
