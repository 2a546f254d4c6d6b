"""``cachefs init``: create a store with chosen parameters."""

from __future__ import annotations

from pathlib import Path

import click

from cachefs.engine import ChunkingParams, CompressionParams, SegmentParams, Store, StoreConfig
from cachefs.errors import ConfigError
from cachefs.format.digest import DIGEST_FUNCTIONS
from cachefs.format.header import HEADER_NAME

from .common import store_argument

_defaults = StoreConfig()


@click.command("init")
@store_argument
@click.option(
    "--digest-function",
    type=click.Choice(sorted(DIGEST_FUNCTIONS)),
    default=_defaults.digest_function,
    show_default=True,
    help="Hash naming chunks and files (REAPI digest function).",
)
@click.option(
    "--level",
    type=int,
    default=_defaults.compression.level,
    show_default=True,
    help="zstd compression level.",
)
@click.option(
    "--min-chunk",
    type=int,
    default=_defaults.chunking.min_size,
    show_default=True,
    help="Smallest chunk in bytes.",
)
@click.option(
    "--avg-chunk",
    type=int,
    default=_defaults.chunking.avg_size,
    show_default=True,
    help="Target mean chunk size in bytes.",
)
@click.option(
    "--max-chunk",
    type=int,
    default=_defaults.chunking.max_size,
    show_default=True,
    help="Largest chunk in bytes.",
)
@click.option(
    "--segment-size",
    type=int,
    default=_defaults.segments.max_size,
    show_default=True,
    help="Largest segment file in bytes.",
)
@click.option(
    "--shard-levels",
    type=int,
    default=_defaults.segments.shard_levels,
    show_default=True,
    help="Levels of shard directories (0-2; at most 2 hex digits in all).",
)
@click.option(
    "--shard-width",
    type=int,
    default=_defaults.segments.shard_width,
    show_default=True,
    help="Hex digits of the digest per shard level (1-2).",
)
def command(
    store: Path,
    digest_function: str,
    level: int,
    min_chunk: int,
    avg_chunk: int,
    max_chunk: int,
    segment_size: int,
    shard_levels: int,
    shard_width: int,
) -> None:
    """Create an empty STORE.

    These parameters are fixed for the life of the store (changing them would
    stop deduplication against what is stored).  `cachefs put` creates a store
    with the defaults when it is missing, so `init` is needed only to choose.
    """
    if (store / HEADER_NAME).exists():
        raise ConfigError(f"{store} is already a cachefs store", hint="choose another directory")
    config = StoreConfig(
        digest_function=digest_function,
        chunking=ChunkingParams(min_size=min_chunk, avg_size=avg_chunk, max_size=max_chunk),
        compression=CompressionParams(level=level),
        segments=SegmentParams(
            max_size=segment_size, shard_levels=shard_levels, shard_width=shard_width
        ),
    )
    config.validate()
    Store.open(store, create=True, config=config).close()
    click.echo(f"created store {store.absolute()} ({digest_function}, zstd level {level})")
