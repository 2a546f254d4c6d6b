"""Object-store remotes: S3-compatible stores and Bazel HTTP caches (remote layer).

Both are stores of objects by key, which obstore (the Rust ``object_store``
crate) speaks: a blob is the object ``PREFIX/cas/<hex>`` -- for an HTTP cache
that is the Bazel HTTP cache protocol's own ``/cas/<hex>``, for a bucket the
same layout under its prefix; action cache entries (serialized
``ActionResult`` messages) are ``PREFIX/ac/<hex>``, as the HTTP cache keeps
them.  The size is not in the key: the object's length must match the
digest's size (``verified``).  ``find_missing`` asks with HEAD requests, many
at once (``_PARALLEL`` in flight); reads and writes are single GET and PUT
requests (obstore uploads large objects in parts).  A bucket also keeps
documents (``Documents``: shared directories' entries, see ``_lists.py``)
under ``PREFIX/shares/``, listed by prefix; an HTTP cache keeps only ``cas/``
and ``ac/``.  Timeouts and retries are obstore's,
set from the tier's timeout.

A bucket also keeps chunks in packs (``_packs.py``): a push of many chunks
sends them as a few large objects and an index.  ``find_missing`` asks the
index first (only what no pack holds is asked for by HEAD), and ``read``
takes a chunk from its pack where the index places it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import obstore
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import HTTPStore, S3Store

from cachefs.errors import ConfigError, ObjectNotFoundError, RemoteError, RemoteRecordError
from cachefs.format.digest import Digest, DigestFunction
from cachefs.protocol import re_pb2
from cachefs.remote._blobs import action_result, verified
from cachefs.remote._packs import SYNC_READ, Packs
from cachefs.remote._urls import RemoteUrl

#: HEAD requests in flight at once for ``find_missing``.
_PARALLEL = 16
#: Keys handed over per batch of a listing (obstore asks S3 for pages of its own).
_PAGE = 1000
#: The largest record (action cache entry, document) read: ours are a few KiB, an
#: entry with a file inside it 64 KiB and some.
RECORD_MAX = 4 << 20


def _options(url: RemoteUrl, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """obstore's client and retry options for a tier with this timeout."""
    client: dict[str, Any] = {
        "allow_http": not url.tls,
        "connect_timeout": timedelta(seconds=min(timeout, 5.0)),
        "timeout": timedelta(seconds=timeout),
    }
    retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=timeout)}
    token, ca, _, _ = url.credentials()
    if token is not None:
        client["default_headers"] = {"authorization": f"Bearer {token}"}
    if ca is not None:
        client["root_certificate"] = ca
    return client, retry


def _s3_store(url: RemoteUrl, timeout: float) -> S3Store:
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise ConfigError(
            f"remote {url.text}: no S3 credentials",
            hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment",
        )
    client, retry = _options(url, timeout)
    extra: dict[str, Any] = {"endpoint": url.address} if url.address else {}
    return S3Store(
        url.bucket,
        prefix=url.prefix.rstrip("/") or None,
        client_options=client,  # type: ignore[arg-type]
        retry_config=retry,  # type: ignore[arg-type]
        access_key_id=key,
        secret_access_key=secret,
        region=url.region,
        virtual_hosted_style_request=False,
        unsigned_payload=not url.sign_payload,  # see _urls.py
        **extra,
    )


def _http_store(url: RemoteUrl, timeout: float) -> HTTPStore:
    client, retry = _options(url, timeout)
    base = f"{url.address}/{url.prefix}".rstrip("/")  # obstore puts a "/" before each key
    return HTTPStore.from_url(
        base,
        client_options=client,  # type: ignore[arg-type]
        retry_config=retry,  # type: ignore[arg-type]
    )


class ObjectRemote:
    """A remote of objects by key: an S3 bucket or a Bazel HTTP cache."""

    def __init__(
        self, url: RemoteUrl, function: DigestFunction, timeout: float = 30.0, packs: bool = True
    ) -> None:
        self.name = url.text
        self.key = f"{url.kind}:{url.address}/{url.bucket}/{url.prefix}"
        self.function = function
        try:
            self.store = _s3_store(url, timeout) if url.kind == "s3" else _http_store(url, timeout)
        except (BaseError, ValueError) as exc:
            raise ConfigError(f"remote {url.text}: {exc}") from None
        self._pool = ThreadPoolExecutor(_PARALLEL, thread_name_prefix="cachefs-remote")
        #: Large blobs go up in parts, never whole in memory (buckets; not HTTP caches).
        self.streams = url.kind == "s3"
        #: Documents, listable (buckets; an HTTP cache has only ``ac/`` and ``cas/``).
        self.documents: ObjectRemote | None = self if url.kind == "s3" else None
        #: Chunks in packs (buckets, unless a shard group's member: a chunk's
        #: place is its endpoints there; an HTTP cache is Bazel's, blob by blob).
        self.packs: Packs | None = None
        if packs and isinstance(self.store, S3Store):
            self.packs = Packs(self.store, self.name, function, self._pool)

    def _failed(self, what: str, exc: BaseException) -> RemoteError:
        return RemoteError(f"{self.name}: {what}: {exc}")

    @staticmethod
    def _key(digest: Digest) -> str:
        return f"cas/{digest.hex}"

    def _present(self, digest: Digest) -> bool:
        try:
            meta = obstore.head(self.store, self._key(digest))
        except (NotFoundError, FileNotFoundError):
            return False
        except (BaseError, OSError, ValueError, RuntimeError) as exc:
            raise self._failed(f"asking for blob {digest}", exc) from None
        return bool(meta["size"] == digest.size)

    def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        if self.packs is not None:
            digests = self.packs.missing(digests)
        try:
            present = list(self._pool.map(self._present, digests))
        except RuntimeError as exc:  # the pool is shut down: closed
            raise self._failed("asking for blobs", exc) from None
        return [d for d, there in zip(digests, present, strict=True) if not there]

    def read(self, digest: Digest) -> bytes:
        """The blob: from its pack, where one holds it, else its own object
        (and if there is none, from a pack the index did not know of yet)."""
        packs = self.packs
        if packs is not None and packs.placed(digest):
            with contextlib.suppress(ObjectNotFoundError):  # the pack is gone: its own object?
                return bytes(packs.read_run([digest])[0])
        try:
            data = bytes(obstore.get(self.store, self._key(digest)).bytes())
        except (NotFoundError, FileNotFoundError):
            if packs is not None and packs.placed(digest, SYNC_READ):
                return bytes(packs.read_run([digest])[0])
            raise ObjectNotFoundError(f"blob {digest} is not in {self.name}") from None
        except (BaseError, OSError, ValueError, RuntimeError) as exc:
            raise self._failed(f"reading blob {digest}", exc) from None
        return verified(self.name, self.function, digest, data)

    def write(self, digest: Digest, data: bytes) -> None:
        try:
            obstore.put(self.store, self._key(digest), data)
        except (BaseError, OSError, ValueError, RuntimeError) as exc:
            raise self._failed(f"writing blob {digest}", exc) from None

    def write_stream(
        self, digest: Digest, pieces: Callable[[], Iterable[bytes | memoryview]]
    ) -> None:
        """A large blob from its pieces: a multipart upload to a bucket (an
        HTTP cache takes single PUTs: the pieces are joined first)."""
        try:
            obstore.put(self.store, self._key(digest), iter(pieces()), use_multipart=self.streams)
        except (BaseError, OSError, ValueError, RuntimeError) as exc:
            raise self._failed(f"writing blob {digest}", exc) from None

    @property
    def splices(self) -> bool:
        return False  # neither S3 nor the HTTP cache protocol can

    def splice(self, digest: Digest, chunks: Sequence[Digest]) -> None:
        raise RemoteError(f"{self.name}: an object store cannot splice blobs")

    def get_action(self, key: Digest) -> re_pb2.ActionResult | None:
        what = f"action cache entry {key}"
        data = self._record(f"ac/{key.hex}", what)
        return None if data is None else action_result(data, self.name, what)

    def update_action(self, key: Digest, result: re_pb2.ActionResult) -> None:
        try:
            obstore.put(self.store, f"ac/{key.hex}", result.SerializeToString())
        except (BaseError, OSError, ValueError, RuntimeError) as exc:
            raise self._failed(f"writing action cache entry {key}", exc) from None

    def get_document(self, key: str) -> bytes | None:
        return self._record(key, key)

    def _record(self, key: str, what: str) -> bytes | None:
        """The bytes under ``key``, a record of ours (an entry, a document;
        None if there is none).  One larger than ``RECORD_MAX`` is no record
        of ours: RemoteRecordError, once that many bytes came (whoever can
        write the bucket must not make a lookup take all memory)."""
        data = bytearray()
        try:
            for part in obstore.get(self.store, key).stream(min_chunk_size=64 << 10):
                data += part
                if len(data) > RECORD_MAX:
                    raise RemoteRecordError(
                        f"{self.name}: {what} is larger than {RECORD_MAX >> 20} MiB: no record "
                        "of cachefs's"
                    )
        except (NotFoundError, FileNotFoundError):
            return None
        except (BaseError, OSError, ValueError, RuntimeError) as exc:
            raise self._failed(f"reading {what}", exc) from None
        return bytes(data)

    def put_document(self, key: str, data: bytes) -> None:
        try:
            obstore.put(self.store, key, data)
        except (BaseError, OSError, ValueError, RuntimeError) as exc:
            raise self._failed(f"writing {key}", exc) from None

    def delete_document(self, key: str) -> None:
        try:
            obstore.delete(self.store, key)
        except (NotFoundError, FileNotFoundError):
            pass
        except (BaseError, OSError, ValueError, RuntimeError) as exc:
            raise self._failed(f"removing {key}", exc) from None

    def list_documents(self, prefix: str, limit: int) -> dict[str, float] | None:
        keys: dict[str, float] = {}
        start = len(prefix) + 1
        try:
            for page in obstore.list(self.store, prefix, chunk_size=_PAGE):
                keys.update(
                    (meta["path"][start:], meta["last_modified"].timestamp()) for meta in page
                )
                if len(keys) > limit:
                    return None
        except (BaseError, OSError, ValueError, RuntimeError) as exc:
            raise self._failed(f"listing {prefix}/", exc) from None
        return keys

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["ObjectRemote"]
