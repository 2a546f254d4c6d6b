"""The engine's activity counters (storage engine layer).

What a store did since it was opened, counted as it happens, so that a
collector (the mount's Prometheus metrics) reads them at scrape time for the
price of a few attribute reads: ``Store.activity()`` returns
:meth:`Activity.snapshot`, which reads no index and makes no system call.
Every counter only grows, but ``journal_bytes``, a level.  The keys, stable:

``publications``
    Group commits that published at least one object (``Publisher.publish``);
    a sync with nothing new to publish (``Store.sync``, closing) is none.
``published_objects``, ``published_bytes``
    Objects made visible by them (each ``put`` of an object counts, stored
    before or not) and their logical sizes.
``publish_seconds``
    Time spent in those commits: segments synced, the index transaction, the
    index synced.  ``Store.on_publish`` sees each of them as it ends.
``ingested_bytes``
    The logical size of every object ingested (``_ingest.py``), published or
    not (a digest that was not the expected one): holes of sparse objects and
    the chunks a revision took over from its base included.
``ingested_unique_bytes``
    Uncompressed bytes of the chunks ingest found missing and appended to a
    segment: the dedup ratio is ``ingested_bytes / ingested_unique_bytes``.
``ingested_stored_bytes``
    The bytes of their records as appended, compressed payload and record
    header included (as the index's ``stored_bytes`` counts them): the
    compression ratio is ``ingested_unique_bytes / ingested_stored_bytes``.
    Chunks stored again from elsewhere (``_heal.py``) and records moved by gc
    are neither unique nor stored bytes of ingest.
``chunk_cache_hits``, ``chunk_cache_misses``
    Lookups of the in-memory cache of decompressed chunks (``ChunkCache``):
    compressed chunks and chunks held remotely; raw chunks are read straight
    from the segment mappings and never looked up.
``journal_checkpoints``
    Checkpoints of the store's journal (``Journal.checkpoint``).
``journal_bytes``
    The journal file's size, as the journal knows it: its header and the
    records since the last checkpoint (0 for a store open read-only).
``gc_runs``, ``gc_bytes_reclaimed``, ``gc_seconds``
    Garbage collections (``collect_garbage``, run on its own or by
    ``drop_held``), failed ones included; the segment file bytes they freed
    (segments deleted or compacted, orphans removed: ``GcReport.bytes_reclaimed``);
    the time they held the store exclusively.

Concurrency: counters that change together (a publication, an ingest task,
a gc run) change under :class:`Activity`'s lock, once per publication, task or
run, never per chunk; the chunk cache counts under its own lock, which every
lookup takes anyway; the journal counts under its append lock.  A snapshot
takes the activity lock, so that the fields of one publication are seen
together.
"""

from __future__ import annotations

import threading

from cachefs.engine._journal import Journal


class Activity:
    """The counters of one open store (see the module doc for each)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.publications = 0
        self.published_objects = 0
        self.published_bytes = 0
        self.publish_seconds = 0.0
        self.ingested_bytes = 0
        self.ingested_unique_bytes = 0
        self.ingested_stored_bytes = 0
        #: Counted by ``ChunkCache`` under its own lock.
        self.chunk_cache_hits = 0
        self.chunk_cache_misses = 0
        self.gc_runs = 0
        self.gc_bytes_reclaimed = 0
        self.gc_seconds = 0.0
        #: The store's journal (writers only), whose own counts are read at each snapshot.
        self.journal: Journal | None = None

    def published(self, seconds: float, objects: int, size: int) -> None:
        """A publication of ``objects`` objects of ``size`` logical bytes took ``seconds``."""
        with self._lock:
            self.publications += 1
            self.published_objects += objects
            self.published_bytes += size
            self.publish_seconds += seconds

    def ingested(self, size: int) -> None:
        """An object of ``size`` logical bytes was ingested."""
        with self._lock:
            self.ingested_bytes += size

    def appended(self, raw: int, stored: int) -> None:
        """Ingest appended new chunks: ``raw`` bytes, as ``stored`` bytes of records."""
        with self._lock:
            self.ingested_unique_bytes += raw
            self.ingested_stored_bytes += stored

    def collected(self, seconds: float, reclaimed: int) -> None:
        """A gc run freed ``reclaimed`` bytes of segment files in ``seconds``."""
        with self._lock:
            self.gc_runs += 1
            self.gc_bytes_reclaimed += reclaimed
            self.gc_seconds += seconds

    def snapshot(self) -> dict[str, float]:
        """Every counter by its key (see the module doc); plain attribute reads."""
        journal = self.journal
        with self._lock:
            return {
                "publications": self.publications,
                "published_objects": self.published_objects,
                "published_bytes": self.published_bytes,
                "publish_seconds": self.publish_seconds,
                "ingested_bytes": self.ingested_bytes,
                "ingested_unique_bytes": self.ingested_unique_bytes,
                "ingested_stored_bytes": self.ingested_stored_bytes,
                "chunk_cache_hits": self.chunk_cache_hits,
                "chunk_cache_misses": self.chunk_cache_misses,
                "journal_checkpoints": 0 if journal is None else journal.checkpoints,
                "journal_bytes": 0 if journal is None else journal.size,
                "gc_runs": self.gc_runs,
                "gc_bytes_reclaimed": self.gc_bytes_reclaimed,
                "gc_seconds": self.gc_seconds,
            }
