"""Store.put_revision: re-chunking only around the changes gives exactly the
object (digest and chunk list) that storing the whole new content gives."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachefs.engine import Store
from tests.conftest import compressible


def _apply(base: bytes, edits: list[tuple[int, bytes]], size: int) -> tuple[bytes, list]:  # type: ignore[type-arg]
    content = bytearray(base[:size]) + bytes(max(0, size - len(base)))
    changed = []
    for offset, data in edits:
        if offset >= len(content):
            content.extend(bytes(offset + len(data) - len(content)))
        content[offset : offset + len(data)] = data
        changed.append((offset, offset + len(data)))
    if size > len(base):
        changed.append((len(base), size))
    changed.sort()
    merged: list[tuple[int, int]] = []
    for start, end in changed:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return bytes(content), merged


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 1000),
    base_size=st.integers(1, 300_000),
    edits=st.lists(
        st.tuples(st.integers(0, 320_000), st.binary(min_size=1, max_size=3000)), max_size=4
    ),
    resize=st.integers(-100_000, 50_000),
)
def test_revision_equals_a_full_put(
    store: Store, seed: int, base_size: int, edits: list[tuple[int, bytes]], resize: int
) -> None:
    # The shared store only gains objects: each example stands on its own digests.
    rng = random.Random(seed)
    base_bytes = compressible(base_size, seed) if seed % 2 else rng.randbytes(base_size)
    base = store.put(base_bytes)
    size = max(1, base_size + resize)
    new, changed = _apply(base_bytes, [e for e in edits if e[0] < size], size)
    new = new[:size]
    changed = [(s, min(e, size)) for s, e in changed if s < size]
    digest = store.put_revision(
        base, size, changed, lambda start, stop: [new[start:stop]], durable=False
    )
    full = store.put(new, durable=False)
    assert digest == full
    assert store.read(digest) == new
    assert store.recipe(digest) == store.recipe(full)


def test_one_byte_change_reuses_all_but_a_few_chunks(store: Store) -> None:
    data = bytearray(random.Random(1).randbytes(2 << 20))
    base = store.put(bytes(data))
    before = store.stats()
    data[1 << 20] ^= 0xFF
    digest = store.put_revision(
        base, len(data), [(1 << 20, (1 << 20) + 1)], lambda s, e: [bytes(data[s:e])]
    )
    assert store.read(digest) == data
    old, new = store.recipe(base), store.recipe(digest)
    assert len(set(new) - set(old)) <= 3  # the chunks around the change, nothing else
    assert store.stats().chunk_bytes - before.chunk_bytes <= 3 * 16384
