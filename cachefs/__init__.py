"""cachefs: a content-addressed build cache you mount as a filesystem.

One package per layer; each imports only the layers before it:

1. ``cachefs.format``  every on-disk format, written down once (no I/O policy);
   ``cachefs.protocol`` beside it: the wire formats (REAPI v2, ByteStream and
   google.rpc messages, generated from our ``.proto`` files);
2. ``cachefs.engine``  the storage engine, a library (no trio, no FUSE): the
   public API is ``cachefs.engine`` (``Store``, ``StoreOptions``, ``Digest``, ...);
3. ``cachefs.aio``     the engine's trio facade;
   ``cachefs.remote``  beside it: remote tiers (S3, Bazel HTTP caches, REAPI
   servers, shard groups), blobs by digest, every answer verified;
4. ``cachefs.fs``      filesystem semantics over the engine (trio, no pyfuse3);
5. ``cachefs.fuse``    the pyfuse3 adapter: translation only;
   ``cachefs.server``  beside it: the store served over REAPI v2 (gRPC) and the
   Bazel HTTP cache protocol, what clients store kept in the filesystem;
6. ``cachefs.daemon``  mounting, serving, detaching, systemd, the mount table;
7. ``cachefs.cli``     the command line, one module per subcommand (imported
   when it runs: ``cachefs stats`` imports neither the servers nor FUSE).

``cachefs.errors`` (the one error hierarchy), ``cachefs.fsutil`` (durable
file writes), ``cachefs.metrics`` (Prometheus instruments, handed down by the
daemon when ``--metrics`` is on) and ``cachefs.tracing`` (OpenTelemetry spans,
off unless ``--otlp-endpoint``) are used by every layer.  Only ``fuse`` and
``daemon`` import pyfuse3, only ``protocol``, ``remote`` and ``server``
grpcio, only ``server`` hypercorn, only ``remote`` obstore, only ``metrics``
prometheus_client, only ``tracing`` opentelemetry;
``tests/test_layers.py`` holds the tree to these rules.
"""

__version__ = "0.1.0"
