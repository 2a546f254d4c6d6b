"""Eviction policies (``cachefs.policy``): orders of victims on small hand-made
sequences, ARC's adaptation, persistence, and invariants under random events."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs.fs import ARC, LFU, POLICIES, Policy, make_policy

#: An event as a tuple: ("admit", key, size), ("hit", key), ("miss", key),
#: ("resize", key, size), ("discard", key), ("evict", key).
Op = tuple[Any, ...]
P = TypeVar("P", bound=Policy)


def apply(policy: P, ops: Sequence[Op]) -> P:
    for op, key, *args in ops:
        if op == "admit":
            policy.admit(key, args[0] if args else 1)
        elif op == "resize":
            policy.resize(key, args[0])
        else:
            getattr(policy, op)(key)
    return policy


def victims(policy: Policy) -> str:
    return "".join(policy.victims())


def simulate(policy: Policy, requests: Sequence[tuple[str, int]]) -> list[bool]:
    """Serve ``requests`` (key, size) as a cache directory would, through the
    public interface only; returns whether each request was a hit."""
    served = []
    for key, size in requests:
        if key in policy:
            policy.hit(key)
            served.append(True)
            continue
        served.append(False)
        policy.miss(key)
        policy.admit(key, size)
        while policy.bytes > policy.capacity:
            victim = next((k for k in policy.victims() if k != key), None)
            if victim is None:
                break
            policy.evict(victim)
    return served


def admits(keys: str, size: int = 1) -> list[Op]:
    return [("admit", key, size) for key in keys]


def hits(keys: str) -> list[Op]:
    return [("hit", key) for key in keys]


# --- the order of victims -----------------------------------------------------------------

ORDERS: list[tuple[str, list[Op], dict[str, str]]] = [
    ("admission order", admits("abc"), {"lru": "abc", "lfu": "abc", "arc": "abc"}),
    ("a hit refreshes", admits("abc") + hits("a"), {"lru": "bca", "lfu": "bca", "arc": "bca"}),
    (
        "frequency against recency",
        admits("abc") + hits("aab"),
        {"lru": "cab", "lfu": "cba", "arc": "cab"},
    ),
    (
        "equal frequency: least recent first",
        admits("abc") + hits("ca"),
        {"lru": "bca", "lfu": "bca", "arc": "bca"},
    ),
    (
        "a file seen twice outlives newer ones seen once",
        admits("a") + hits("a") + admits("bcd"),
        {"lru": "abcd", "lfu": "bcda", "arc": "bcda"},
    ),
    (
        "discard forgets",
        admits("abc") + hits("b") + [("discard", "b"), ("discard", "zz")],
        {"lru": "ac", "lfu": "ac", "arc": "ac"},
    ),
    (
        "admitting a resident file counts as a hit",
        admits("abca"),
        {"lru": "bca", "lfu": "bca", "arc": "bca"},
    ),
    (
        "events about unknown keys are ignored",
        [*admits("ab"), ("hit", "x"), ("resize", "x", 5), ("evict", "x"), ("miss", "x")],
        {"lru": "ab", "lfu": "ab", "arc": "ab"},
    ),
]


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize(("ops", "expected"), [c[1:] for c in ORDERS], ids=[c[0] for c in ORDERS])
def test_order_of_victims(name: str, ops: list[Op], expected: dict[str, str]) -> None:
    policy = apply(make_policy(name, 100), ops)
    assert victims(policy) == expected[name]
    assert len(policy) == len(expected[name])
    assert policy.bytes == len(expected[name])


def test_make_policy() -> None:
    assert sorted(POLICIES) == ["arc", "lfu", "lru"]
    for name, cls in POLICIES.items():
        policy = make_policy(name, 10)
        assert type(policy) is cls
        assert policy.name == name
        assert policy.capacity == 10
    with pytest.raises(ValueError, match="lru, lfu, arc"):
        make_policy("fifo", 10)
    with pytest.raises(ValueError, match="negative"):
        make_policy("lru", -1)
    with pytest.raises(ValueError, match="negative"):
        make_policy("lru", 10).admit("a", -1)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_bytes_follow_sizes(name: str) -> None:
    policy = make_policy(name, 1000)
    apply(policy, [("admit", "a", 10), ("admit", "b", 20), ("resize", "a", 15)])
    assert policy.bytes == 35
    policy.admit("b", 5)  # resident: resize + hit
    assert policy.bytes == 20
    policy.evict("a")
    assert policy.bytes == 5
    assert "a" not in policy
    assert "b" in policy
    policy.discard("b")
    assert policy.bytes == 0
    assert len(policy) == 0
    assert list(policy.victims()) == []


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_victims_may_be_skipped(name: str) -> None:
    """A caller skips files it cannot evict (open) and takes the next ones."""
    policy = apply(make_policy(name, 100), admits("abcd"))
    taken = [k for k in policy.victims() if k not in {"a", "c"}][:1]
    assert taken == ["b"]
    policy.evict("b")
    assert victims(policy) == "acd"


def test_arc_victims_continue_in_t2_when_t1_is_skipped() -> None:
    arc = apply(ARC(100), admits("ab") + hits("ab") + admits("cd"))
    assert (arc.list_of("a"), arc.list_of("c")) == ("T2", "T1")
    # T1 first (p = 0); when its files are all skipped, T2 goes on.
    assert [k for k in arc.victims() if k not in "cd"] == ["a", "b"]


# --- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_one_big_file_pushes_out_many_small_ones(name: str) -> None:
    policy = make_policy(name, 100)
    simulate(policy, [(f"s{i}", 10) for i in range(10)])
    assert policy.bytes == 100
    simulate(policy, [("big", 45)])
    # The five oldest small files made room, no more.
    assert sorted(policy.victims()) == sorted(["big"] + [f"s{i}" for i in range(5, 10)])
    assert policy.bytes == 95


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_one_eviction_of_a_big_file_makes_room_for_many(name: str) -> None:
    policy = make_policy(name, 100)
    simulate(policy, [("big", 60), ("s0", 10), ("s1", 10), ("s2", 10), ("s3", 10), ("s4", 10)])
    assert "big" not in policy
    assert sorted(policy.victims()) == [f"s{i}" for i in range(5)]
    assert policy.bytes == 50


# --- LFU with dynamic aging -------------------------------------------------------------


def test_lfu_ages_out_a_once_hot_file() -> None:
    lfu = LFU(4)
    simulate(lfu, [("hot", 1)] * 20 + [("x", 1), ("y", 1), ("z", 1)])
    assert lfu.age == 0
    # A new workload: each file requested 3 times, then never again.
    new = [(f"n{i}", 1) for i in range(40) for _ in range(3)]
    simulate(lfu, new[:9])
    assert "hot" in lfu  # its frequency protects it for a while...
    simulate(lfu, new[9:])
    assert "hot" not in lfu  # ...but the age passes it: it does not stay forever
    assert lfu.age > 20


def test_lfu_evicting_a_skipped_over_file_raises_the_age() -> None:
    lfu = apply(LFU(100), admits("abc") + hits("bbc"))  # a:1, c:2, b:3
    lfu.evict("c")  # "a" was skipped
    assert lfu.age == 2
    lfu.admit("d", 1)  # priority 3, newer than b's 3
    assert victims(lfu) == "abd"


def test_lfu_matches_a_reference_model() -> None:
    """Many keys and events (the heap of priorities is rebuilt on the way):
    the order is priority = age + frequency, then least recent access."""
    rng = random.Random(7)
    lfu = LFU(0)
    age = 0
    model: dict[int, list[int]] = {}  # key -> [frequency, priority, last access]
    for clock in range(20_000):
        key = int(rng.paretovariate(1.2)) % 200
        action = rng.random()
        if key in model and action < 0.97:
            lfu.hit(key)
            entry = model[key]
            entry[0] += 1
            entry[1:] = [age + entry[0], clock]
        elif key not in model:
            lfu.admit(key, 1)
            model[key] = [1, age + 1, clock]
        elif action < 0.98:
            lfu.discard(key)
            del model[key]
        if len(model) > 50:  # evict the first victim, or (sometimes) the second
            order = list(itertools.islice(lfu.victims(), 2))
            victim = order[clock % 3 == 0]
            lfu.evict(victim)
            age = max(age, model.pop(victim)[1])
        if clock % 10 == 0:
            expected = sorted(model, key=lambda k: (model[k][1], model[k][2]))
            assert list(lfu.victims()) == expected
    assert lfu.age == age > 0


# --- ARC --------------------------------------------------------------------------------


def test_arc_lists() -> None:
    arc = apply(ARC(100), admits("ab"))
    assert [arc.list_of(k) for k in "ab"] == ["T1", "T1"]
    arc.hit("a")
    assert arc.list_of("a") == "T2"
    arc.evict("b", ghost="ghost-b")
    arc.evict("a")
    assert (arc.list_of("b"), arc.list_of("ghost-b"), arc.list_of("a")) == (None, "B1", "B2")
    # A file remembered as a ghost comes back into T2, under another key too.
    arc.admit("b2", 1, ghost="ghost-b")
    arc.admit("c", 1)
    assert (arc.list_of("b2"), arc.list_of("ghost-b"), arc.list_of("c")) == ("T2", None, "T1")
    # A discarded file leaves no ghost: it comes back as new.
    arc.discard("c")
    arc.admit("c", 1)
    assert arc.list_of("c") == "T1"


def ghosts(arc: ARC) -> ARC:
    """B1 = {a: 10, b: 20}, B2 = {c: 30}; T2 = {d: 5}; p = 0."""
    apply(arc, [("admit", "a", 10), ("admit", "b", 20), ("admit", "c", 30), ("hit", "c")])
    apply(arc, [("admit", "d", 5), ("hit", "d"), ("evict", "a"), ("evict", "b"), ("evict", "c")])
    assert arc.list_bytes() == {"T1": 0, "T2": 5, "B1": 30, "B2": 30}
    return arc


@pytest.mark.parametrize(
    ("ops", "p", "lists"),
    [
        # A B1 ghost hit: p grows by the ghost's size (B2/B1 = 1).
        ([("miss", "a")], 10, {"T1": 0, "T2": 5, "B1": 20, "B2": 30}),
        # ... and the file, admitted under that ghost, goes to T2 without a second step.
        ([("miss", "a"), ("admit", "a", 10)], 10, {"T1": 0, "T2": 15, "B1": 20, "B2": 30}),
        # Without the miss, admit() adapts by itself.
        ([("admit", "a", 10)], 10, {"T1": 0, "T2": 15, "B1": 20, "B2": 30}),
        # A second lookup of the same name does not adapt twice.
        ([("miss", "a"), ("miss", "a")], 10, {"T1": 0, "T2": 5, "B1": 20, "B2": 30}),
        # Up then down: B2 hit of 30 bytes, |B1| / |B2| = 20 / 30 < 1.
        ([("miss", "a"), ("miss", "c")], 0, {"T1": 0, "T2": 5, "B1": 20, "B2": 0}),
        # B1 hit of 20 bytes with |B2| / |B1| = 30 / 30, then of 10 with 30 / 10 = 3.
        ([("miss", "b"), ("miss", "a")], 20 + 30, {"T1": 0, "T2": 5, "B1": 0, "B2": 30}),
        # Unknown names do nothing.
        ([("miss", "zz"), ("admit", "zz", 7)], 0, {"T1": 7, "T2": 5, "B1": 30, "B2": 30}),
    ],
)
def test_arc_ghost_hits_adapt_p(ops: list[Op], p: int, lists: dict[str, int]) -> None:
    arc = apply(ghosts(ARC(100)), ops)
    assert arc.p == p
    assert arc.list_bytes() == lists


def test_arc_p_stays_within_the_budget() -> None:
    arc = ghosts(ARC(100))
    arc.p = 95
    arc.miss("b")  # 20 * max(1, 30 / 30)
    assert arc.p == 100
    arc.capacity = 20  # ghosts past 2c = 40 bytes go, B2's first
    assert arc.p == 20
    assert arc.list_bytes() == {"T1": 0, "T2": 5, "B1": 10, "B2": 0}


def test_arc_ghost_lists_are_bounded() -> None:
    arc = apply(ARC(10), admits("abcdefghij") + hits("abcde"))  # T1 f-j, T2 a-e
    apply(arc, [("evict", "f"), ("evict", "g"), ("evict", "a"), ("evict", "b"), ("evict", "c")])
    assert arc.list_bytes() == {"T1": 3, "T2": 2, "B1": 2, "B2": 3}
    apply(arc, admits("klmnop"))  # |T1| + |B1| <= c: the oldest ghost of B1 goes
    assert (arc.list_of("f"), arc.list_of("g")) == (None, "B1")
    assert arc.list_bytes() == {"T1": 9, "T2": 2, "B1": 1, "B2": 3}
    # The caller has not evicted yet: T1 alone reaches c, B1 empties, and
    # all four lists stay within 2c, the oldest ghost of B2 going.
    apply(arc, admits("qrstuvw"))
    assert arc.list_bytes() == {"T1": 16, "T2": 2, "B1": 0, "B2": 2}
    assert [arc.list_of(k) for k in "abc"] == [None, "B2", "B2"]


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0, "abxy"),  # T1 above p: T1 first
        (15, "axyb"),  # T1 (20) > 15: one from T1, then T1 (10) <= 15: T2, then what is left
        (20, "xyab"),  # T1 == p without a B2 hit: T2
        (100, "xyab"),
    ],
)
def test_arc_victims_follow_replace(p: int, expected: str) -> None:
    arc = apply(ARC(100), [("admit", "x", 10), ("admit", "y", 10), *hits("xy")])
    apply(arc, [("admit", "a", 10), ("admit", "b", 10)])
    arc.p = p
    assert victims(arc) == expected


def test_arc_replace_prefers_t1_at_p_after_a_b2_hit() -> None:
    arc = apply(ARC(1000), [("admit", "z", 10), ("hit", "z"), ("evict", "z")])
    apply(arc, [("admit", "a", 10), ("admit", "b", 10), ("miss", "z"), ("admit", "z", 10)])
    assert arc.list_of("z") == "T2"
    arc.p = 20  # == |T1|
    assert victims(arc) == "azb"
    arc.admit("c", 0)  # not a ghost: the tie goes to T2 again
    assert victims(arc) == "zabc"


def loop_and_scan(loop: int, rounds: int) -> list[tuple[str, int]]:
    """A loop over ``loop`` files, seen twice, then repeated with each of its
    requests followed by a file of a long scan that is never used again."""
    requests = [(f"loop{j}", 1) for _ in range(2) for j in range(loop)]
    for r in range(rounds):
        for j in range(loop):
            requests += [(f"loop{j}", 1), (f"scan{r}-{j}", 1)]
    return requests


def test_arc_keeps_a_loop_through_a_scan_that_flushes_lru() -> None:
    requests = loop_and_scan(loop=10, rounds=40)
    ratios = {}
    for name in ("lru", "arc"):
        policy = make_policy(name, 12)  # holds the loop, not the loop and the scan
        served = simulate(policy, requests)
        late = [hit for (key, _), hit in zip(requests, served, strict=True) if "loop" in key]
        late = late[len(late) // 2 :]
        ratios[name] = sum(late) / len(late)
    assert ratios["lru"] == 0.0
    assert ratios["arc"] >= 0.95


def test_arc_learns_recency_from_b1_ghosts() -> None:
    """The other direction: files evicted from T1 that come back soon are B1
    ghost hits; p grows and T1 takes room from T2."""
    arc = ARC(10)
    frequent = [(f"f{i}", 1) for i in range(8)]
    simulate(arc, frequent + frequent)  # eight files in T2
    assert arc.p == 0
    served = simulate(arc, [(f"r{i}", 1) for i in range(4)] * 10)
    assert arc.p >= 2
    assert arc.list_bytes()["B2"] > 0  # T2 gave room
    assert served[-8:] == [True] * 8  # ...and the cycle of four now fits: all hits


# --- persistence ----------------------------------------------------------------------------


STATES: list[tuple[str, list[Op]]] = [
    ("admissions", admits("abcdef")),
    ("hits", admits("abcdef") + hits("dbbfa")),
    (
        "evictions",
        admits("abcdef") + hits("fffeed") + [("evict", "a"), ("evict", "e"), ("admit", "g", 3)],
    ),
    ("sizes", [("admit", k, s) for k, s in zip("abcde", [5, 1, 40, 0, 7], strict=True)]),
]


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("ops", [s[1] for s in STATES], ids=[s[0] for s in STATES])
def test_entries_restore_keep_the_order(name: str, ops: list[Op]) -> None:
    policy = apply(make_policy(name, 100), ops)
    assert getattr(policy, "p", 0) == 0  # ARC keeps its order for the same p
    saved = list(policy.entries())
    assert all(count >= 0 for _, _, count in saved)
    fresh = make_policy(name, 100)
    for key, size, count in saved:
        fresh.restore(key, size, count)
    assert list(fresh.victims()) == list(policy.victims())
    assert fresh.bytes == policy.bytes
    assert len(fresh) == len(policy)
    assert sorted(fresh.entries()) == sorted(saved)


def test_lfu_restore_keeps_files_below_the_age_in_order() -> None:
    lfu = apply(LFU(100), admits("abc") + hits("cc"))  # a:1, b:1, c:3
    lfu.evict("c")  # a and b skipped: the age (3) passes them
    lfu.admit("d", 1)
    saved = list(lfu.entries())
    assert saved == [("a", 1, 0), ("b", 1, 0), ("d", 1, 1)]
    fresh = LFU(100)
    for entry in saved:
        fresh.restore(*entry)
    assert victims(fresh) == "abd"


def test_arc_restore_keeps_each_list() -> None:
    arc = ghosts(ARC(100))
    apply(arc, [("admit", "a", 10), ("admit", "x", 3), ("admit", "y", 4), ("hit", "y")])
    fresh = ARC(100)
    for entry in arc.entries():
        fresh.restore(*entry)
    assert [fresh.list_of(k) for k in "xyda"] == ["T1", "T2", "T2", "T2"]
    assert [k for k in fresh.victims() if fresh.list_of(k) == "T2"] == ["d", "a", "y"]


# --- invariants under random events ----------------------------------------------------

KEYS = st.sampled_from("abcdefg")
SIZES = st.integers(0, 60)
EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), KEYS, SIZES, st.one_of(st.none(), KEYS)),
        st.tuples(st.just("hit"), KEYS),
        st.tuples(st.just("miss"), KEYS),
        st.tuples(st.just("resize"), KEYS, SIZES),
        st.tuples(st.just("discard"), KEYS),
        st.tuples(st.just("evict"), st.integers(0, 3), st.one_of(st.none(), KEYS)),
        st.tuples(st.just("restore"), KEYS, SIZES, st.integers(0, 4)),
        st.tuples(st.just("capacity"), st.integers(0, 200)),
    ),
    max_size=60,
)


def check_invariants(policy: Policy, model: dict[str, int]) -> None:
    assert policy.bytes == sum(model.values())
    assert len(policy) == len(model)
    order = list(policy.victims())
    assert sorted(order) == sorted(model)  # each resident key exactly once
    assert all(key in policy for key in model)
    assert sorted((k, s) for k, s, _ in policy.entries()) == sorted(model.items())
    if isinstance(policy, ARC):
        lists = policy.list_bytes()
        c = policy.capacity
        assert 0 <= policy.p <= c
        assert lists["T1"] + lists["T2"] == policy.bytes
        # The byte counts are the lists' contents (white box).
        assert lists["B1"] == sum(policy._b1.values())
        assert lists["B2"] == sum(policy._b2.values())
        assert lists["T1"] == sum(policy._t1.values())
        assert lists["B1"] == 0 or lists["T1"] + lists["B1"] <= c
        assert lists["B1"] + lists["B2"] == 0 or sum(lists.values()) <= 2 * c
        assert not set(policy._b1) & set(policy._b2)
        assert len(policy._recalled) <= ARC.RECALLED


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=300)
@given(events=EVENTS)
def test_invariants_under_random_events(name: str, events: list[Op]) -> None:
    policy = make_policy(name, 100)
    model: dict[str, int] = {}
    for op, *args in events:
        if op == "admit":
            key, size, ghost = args
            policy.admit(key, size, ghost=ghost)
            model[key] = size
        elif op == "resize":
            key, size = args
            policy.resize(key, size)
            if key in model:
                model[key] = size
        elif op == "evict":
            skip, ghost = args
            candidates = list(policy.victims())
            if candidates:
                key = candidates[skip % len(candidates)]
                policy.evict(key, ghost=ghost)
                del model[key]
        elif op == "restore":
            key, size, count = args
            policy.restore(key, size, count)
            model[key] = size
        elif op == "capacity":
            policy.capacity = args[0]
        else:
            getattr(policy, op)(args[0])
            if op == "discard":
                model.pop(args[0], None)
        check_invariants(policy, model)
    if not isinstance(policy, ARC):  # ARC's order also depends on p, which is not saved
        fresh = make_policy(name, policy.capacity)
        for entry in policy.entries():
            fresh.restore(*entry)
        assert list(fresh.victims()) == list(policy.victims())


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_victims_are_lazy(name: str) -> None:
    """Victims come from an iterator (nothing is sorted up front), in order,
    on 100k files; how cheap that is is for benchmarks, not tests."""
    policy = make_policy(name, 1 << 40)
    for i in range(100_000):
        policy.admit(i, 1)
    for i in range(1, 100_000, 2):
        policy.hit(i)
    victims = policy.victims()
    assert iter(victims) is victims  # an iterator, not a list made up front
    assert list(itertools.islice(victims, 3)) == [0, 2, 4]
    everything = list(policy.victims())
    assert len(everything) == 100_000 and len(set(everything)) == 100_000


def test_arc_rename_onto_a_recalled_name_goes_to_t2() -> None:
    """A tool that writes a temporary file and renames it onto the name it
    missed (ccache) gets the placement ARC gives a ghost hit."""
    arc = ARC(300)
    arc.admit("a", 100)
    arc.evict("a")
    assert arc.list_of("a") == "B1"
    arc.miss("a")  # looked up again: p adapts now
    assert arc.p == 100
    arc.admit(7, 100, ghost="tmp.123")  # the temporary file: T1
    assert arc.list_of(7) == "T1"
    arc.renamed(7, "a")
    assert arc.list_of(7) == "T2" and arc.p == 100
    arc.renamed(7, "a")  # once only
    other = make_policy("lru", 300)
    other.admit(1, 10)
    other.renamed(1, "x")  # a no-op for the others
    assert list(other.victims()) == [1]


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=50, deadline=None)
@given(keys=st.lists(st.sampled_from("abcdefz"), max_size=30))
def test_hits_of_a_batch_are_each_hit(name: str, keys: list[str]) -> None:
    """``hits`` (a server's batch) leaves a policy as ``hit`` of each key does,
    resident or not ("z" never is)."""
    one, batch = (apply(make_policy(name, 1000), admits("abcdef")) for _ in range(2))
    for key in keys:
        one.hit(key)
    batch.hits(keys)
    assert list(one.entries()) == list(batch.entries())
    assert victims(one) == victims(batch)
