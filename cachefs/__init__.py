"""cachefs: a content-addressed build cache you mount as a filesystem.

Layers, each depending only on those before it:

* on-disk formats: ``header`` (store header), ``segment`` (chunk records),
  ``wal`` (write-ahead log), ``index`` (the LMDB schema), ``digest``;
* the storage engine: ``store`` (:class:`Store`), ``gc``, ``fsck``, and
  ``aio`` (the trio facade);
* the command line: ``cli``.
"""

__version__ = "0.1.0"
