"""On-disk formats (the lowest layer): every byte cachefs writes, written down once.

Each module's docstring is the specification of its format:

* ``digest``   content digests and digest functions (SHA-256, BLAKE3), REAPI form;
* ``header``   the store directory, its header file and the store format version;
* ``segment``  segment files and chunk records, their checksums, reading them back;
* ``codec``    how a chunk becomes a record's payload (raw or zstd);
* ``journal``  the journal file and the record kind of every writer;
* ``schema``   the LMDB schema: every named database, its keys, values and invariants.

These modules import nothing of cachefs but ``errors``, ``fsutil`` and the
package's ``__version__`` (written into a new store's header).
"""

from cachefs.format.digest import BLAKE3, DIGEST_FUNCTIONS, SHA256, Digest, DigestFunction
from cachefs.format.header import (
    STORE_FORMAT_VERSION,
    ChunkingParams,
    CompressionParams,
    SegmentParams,
    StoreConfig,
)
from cachefs.format.schema import SCHEMA_VERSION

__all__ = [
    "BLAKE3",
    "DIGEST_FUNCTIONS",
    "SCHEMA_VERSION",
    "SHA256",
    "STORE_FORMAT_VERSION",
    "ChunkingParams",
    "CompressionParams",
    "Digest",
    "DigestFunction",
    "SegmentParams",
    "StoreConfig",
]
