"""Tests of kv_cache.policies: hand-built victim orders, one contract for every policy, property tests against
reference models, and token selection."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_cache.config import CacheStrategy
from kv_cache.errors import CacheValidationError
from kv_cache.policies import AdaptivePolicy, LFUPolicy, LRUPolicy, Policy, make_policy
from kv_cache.policies.adaptive import _Experts

FACTORIES: dict[str, Callable[[], Policy[Any]]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "arc": lambda: AdaptivePolicy(shadow_window=None),
    "adaptive": AdaptivePolicy,
    "adaptive-capacity-4": lambda: AdaptivePolicy(capacity=4, shadow_window=2.0),
}
policies = pytest.mark.parametrize("factory", FACTORIES.values(), ids=FACTORIES.keys())


def filled(policy: Policy[Any], keys: list[Any]) -> Policy[Any]:
    for key in keys:
        policy.insert(key)
    return policy


def replay(policy: Policy[Any], trace: list[Any], size: int) -> int:
    """Hits of `policy` driving a cache of `size` entries (victims before insert, as a cache does)."""
    hits = 0
    for key in trace:
        if key in policy:
            hits += 1
            policy.touch(key)
        else:
            if len(policy) >= size:
                policy.victims(1)
            policy.insert(key)
    return hits


# --- hand-built victim orders ---------------------------------------------------------------------------------


def test_lru_evicts_least_recently_used_first() -> None:
    policy = filled(LRUPolicy(), ["a", "b", "c", "d"])
    policy.touch("a")
    assert policy.victims(2) == ["b", "c"]
    assert policy.victims(5) == ["d", "a"]
    assert len(policy) == 0


def test_lfu_evicts_least_weight_first_and_older_on_ties() -> None:
    policy = filled(LFUPolicy(), ["a", "b", "c"])
    policy.touch("a")
    policy.touch("a")
    policy.touch("c")
    assert policy.victims(3) == ["b", "c", "a"]
    policy = filled(LFUPolicy(), ["a", "b", "c"])
    policy.touch("a", weight=0.0)  # same frequency, but now the most recent: evicted last among equals
    assert policy.victims(3) == ["b", "c", "a"]


def test_lfu_accumulates_float_weights() -> None:
    policy: LFUPolicy[str] = LFUPolicy()
    policy.insert("a", weight=0.5)
    policy.insert("b", weight=2.0)
    policy.insert("c")
    policy.touch("a", weight=0.25)
    assert policy.frequency("a") == 0.75
    assert policy.victims(3) == ["a", "c", "b"]


def test_lfu_heap_stays_bounded_under_many_touches() -> None:
    policy: LFUPolicy[int] = LFUPolicy()
    filled(policy, list(range(10)))
    for step in range(10_000):
        policy.touch(step % 10)
    assert len(policy._heap) <= 2 * len(policy) + 64
    assert policy.victims(10) == list(range(10))  # all touched 1000 times; key 0 touched longest ago


def test_arc_keeps_frequent_entries_through_a_scan() -> None:
    policy: AdaptivePolicy[str] = AdaptivePolicy(capacity=4, shadow_window=None)
    for key in ("a", "b"):
        policy.insert(key)
        policy.touch(key)  # seen twice: T2
    scan = [f"scan{i}" for i in range(20)]
    replay(policy, ["a", "b", *scan], size=4)
    assert "a" in policy and "b" in policy


def test_arc_ghost_hits_move_the_target() -> None:
    policy: AdaptivePolicy[str] = AdaptivePolicy(capacity=2, shadow_window=None)
    filled(policy, ["x", "y"])
    assert policy.victims(1) == ["x"]  # T1's LRU end, into ghost B1
    policy.insert("x")  # B1 hit: recency deserved more room
    assert policy.target == 1.0 and "x" in policy
    policy.touch("y")  # T1 -> T2; T1 is empty, so the next victim comes from T2's LRU end
    assert policy.victims(1) == ["x"]  # |T1| = 0 <= p: T2's LRU end, into B2
    policy.insert("x")  # B2 hit: frequency deserved more room
    assert policy.target == 0.0


def test_arc_prefers_t1_over_target_and_t2_otherwise() -> None:
    policy: AdaptivePolicy[str] = AdaptivePolicy(capacity=4, shadow_window=None)
    filled(policy, ["f", "g", "n1", "n2"])
    policy.touch("f")
    policy.touch("g")  # T2 = [f, g], T1 = [n1, n2], p = 0
    assert policy.victims(3) == ["n1", "n2", "f"]


def test_arc_remove_leaves_no_ghost() -> None:
    policy: AdaptivePolicy[str] = AdaptivePolicy(capacity=2, shadow_window=None)
    filled(policy, ["x", "y"])
    policy.remove("x")
    policy.insert("x")  # no ghost hit: lands in T1 again, target unchanged
    assert policy.target == 0.0
    assert policy.victims(2) == ["y", "x"]


def test_arc_learns_capacity_as_high_water() -> None:
    policy: AdaptivePolicy[int] = AdaptivePolicy(shadow_window=None)
    filled(policy, list(range(5)))
    policy.victims(3)
    assert policy.capacity == 5


def stack_trace(length: int, mean_depth: float, seed: int) -> list[int]:
    """LRU stack model: 90% re-read a key at an exponential stack depth, 10% read a new key."""
    rng = random.Random(seed)
    stack: list[int] = []
    trace = []
    for index in range(length):
        depth = int(rng.expovariate(1 / mean_depth))
        key = stack.pop(depth) if rng.random() < 0.9 and depth < len(stack) else length + index
        stack.insert(0, key)
        trace.append(key)
    return trace


def test_adaptive_follows_lru_where_lru_beats_arc() -> None:
    trace = stack_trace(4000, mean_depth=10, seed=0)
    plain = replay(AdaptivePolicy(shadow_window=None), trace, size=20)
    lru = replay(LRUPolicy(), trace, size=20)
    adaptive: AdaptivePolicy[int] = AdaptivePolicy(shadow_window=4.0)
    hits = replay(adaptive, trace, size=20)
    assert adaptive.following is CacheStrategy.LRU
    assert plain < lru and hits > plain


def test_adaptive_beats_plain_arc_on_zipf() -> None:
    trace = random.Random(1).choices(range(200), weights=[1 / (i + 1) for i in range(200)], k=4000)
    plain = replay(AdaptivePolicy(shadow_window=None), trace, size=20)
    assert replay(AdaptivePolicy(shadow_window=4.0), trace, size=20) > plain
    assert AdaptivePolicy(shadow_window=None).following is CacheStrategy.ADAPTIVE


# --- one contract for every policy ----------------------------------------------------------------------------


@policies
def test_contract_rejects_misuse(factory: Callable[[], Policy[Any]]) -> None:
    policy = filled(factory(), ["a"])
    with pytest.raises(CacheValidationError, match="key='a' is already"):
        policy.insert("a")
    for call in (policy.touch, policy.remove):
        with pytest.raises(CacheValidationError, match="key='z' is not in the policy"):
            call("z")
    weights: list[Any] = [-1.0, math.nan, math.inf, "1"]
    for weight in weights:
        with pytest.raises(CacheValidationError, match="weight="):
            policy.touch("a", weight=weight)
        with pytest.raises(CacheValidationError, match="weight="):
            policy.insert("b", weight=weight)
    for count in (-1, 1.5, True):
        with pytest.raises(CacheValidationError, match="count="):
            policy.victims(count)  # type: ignore[arg-type]
    assert len(policy) == 1 and "a" in policy and "b" not in policy


@policies
def test_contract_victims_are_distinct_and_forgotten(factory: Callable[[], Policy[Any]]) -> None:
    policy = filled(factory(), list(range(6)))
    policy.touch(3)
    assert policy.victims(0) == []
    first = policy.victims(4)
    assert len(first) == 4 and len(set(first)) == 4 and set(first) <= set(range(6))
    assert all(key not in policy for key in first) and len(policy) == 2
    rest = policy.victims(10)
    assert sorted(first + rest) == list(range(6))
    assert policy.victims(1) == [] and len(policy) == 0


@policies
def test_contract_evictable_skips_and_keeps(factory: Callable[[], Policy[Any]]) -> None:
    policy = filled(factory(), list(range(8)))
    pinned = {0, 2, 4}
    chosen = policy.victims(10, evictable=lambda key: key not in pinned)
    assert sorted(chosen) == [1, 3, 5, 6, 7]
    assert all(key in policy for key in pinned) and len(policy) == 3
    assert sorted(policy.victims(3)) == [0, 2, 4]


@policies
def test_contract_accepts_any_hashable_key(factory: Callable[[], Policy[Any]]) -> None:
    keys: list[Any] = [b"\x00digest", ("tuple", 1), object(), 7, frozenset({1})]  # mutually unorderable
    policy = filled(factory(), keys)
    for key in keys:
        policy.touch(key, weight=2.0)
    assert set(map(id, policy.victims(len(keys)))) == set(map(id, keys))


def test_make_policy_maps_every_strategy() -> None:
    for strategy, cls in [
        (CacheStrategy.LRU, LRUPolicy),
        (CacheStrategy.LFU, LFUPolicy),
        (CacheStrategy.ADAPTIVE, AdaptivePolicy),
    ]:
        policy = make_policy(strategy)
        assert type(policy) is cls and policy.strategy is strategy
    adaptive = make_policy(CacheStrategy.ADAPTIVE, capacity=8, recent_fraction=0.25)
    assert isinstance(adaptive, AdaptivePolicy) and adaptive.capacity == 8 and adaptive.recent_fraction == 0.25


def test_make_policy_rejects_bad_arguments() -> None:
    with pytest.raises(CacheValidationError, match="strategy='lru' is not a CacheStrategy"):
        make_policy("lru")  # type: ignore[arg-type]
    with pytest.raises(CacheValidationError, match="LRUPolicy does not take"):
        make_policy(CacheStrategy.LRU, capacity=4)
    with pytest.raises(CacheValidationError, match="capacity=0"):
        make_policy(CacheStrategy.ADAPTIVE, capacity=0)
    with pytest.raises(CacheValidationError, match="shadow_window=0"):
        make_policy(CacheStrategy.ADAPTIVE, shadow_window=0)
    with pytest.raises(CacheValidationError, match=r"recent_fraction=1\.5"):
        make_policy(CacheStrategy.ADAPTIVE, recent_fraction=1.5)


# --- properties against reference models ----------------------------------------------------------------------

OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["insert", "touch", "remove", "victims", "victims-odd"]),
        st.integers(0, 9),
        st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    ),
    max_size=60,
)


class Reference:
    """Brute-force LRU and LFU: the victim is the minimum of (frequency or 0, last access tick)."""

    def __init__(self, by_frequency: bool) -> None:
        self.by_frequency = by_frequency
        self.entries: dict[int, tuple[float, int]] = {}
        self.tick = 0

    def access(self, key: int, weight: float) -> None:
        self.tick += 1
        frequency = self.entries.get(key, (0.0, 0))[0] + weight if self.by_frequency else 0.0
        self.entries[key] = (frequency, self.tick)

    def victims(self, count: int, evictable: Callable[[int], bool]) -> list[int]:
        ranked = sorted((rank, key) for key, rank in self.entries.items() if evictable(key))
        chosen = [key for _, key in ranked[:count]]
        for key in chosen:
            del self.entries[key]
        return chosen


def run_operations(policy: Policy[int], operations: list[tuple[str, int, float]], reference: Reference | None) -> None:
    """Apply `operations`, checking the contract (and `reference`'s exact order when given) after each."""
    present: set[int] = set()
    for name, key, weight in operations:
        if name.startswith("victims"):
            evictable = (lambda k: k % 2 == 1) if name == "victims-odd" else (lambda k: True)
            chosen = policy.victims(key % 4, evictable=None if name == "victims" else evictable)
            assert len(chosen) == len(set(chosen)) <= key % 4
            assert set(chosen) <= present and all(evictable(k) for k in chosen)
            assert len(chosen) == min(key % 4, sum(map(evictable, present)))
            present -= set(chosen)
            if reference is not None:
                assert chosen == reference.victims(key % 4, evictable)
        elif (key in present) == (name == "insert"):
            with pytest.raises(CacheValidationError):
                getattr(policy, name)(key)
        else:
            if name == "remove":
                policy.remove(key)
                present.discard(key)
                if reference is not None:
                    del reference.entries[key]
            else:
                getattr(policy, name)(key, weight)
                present.add(key)
                if reference is not None:
                    reference.access(key, weight)
        assert len(policy) == len(present)
        assert all((k in policy) == (k in present) for k in range(10))


@settings(max_examples=150, deadline=None)
@given(OPERATIONS)
def test_lru_matches_reference(operations: list[tuple[str, int, float]]) -> None:
    run_operations(LRUPolicy(), operations, Reference(by_frequency=False))


@settings(max_examples=150, deadline=None)
@given(OPERATIONS)
def test_lfu_matches_reference(operations: list[tuple[str, int, float]]) -> None:
    run_operations(LFUPolicy(), operations, Reference(by_frequency=True))


@settings(max_examples=80, deadline=None)
@given(OPERATIONS, st.sampled_from([None, 3]), st.sampled_from([None, 1.0]))
def test_adaptive_keeps_the_contract_and_arc_invariants(
    operations: list[tuple[str, int, float]], capacity: int | None, shadow_window: float | None
) -> None:
    policy: AdaptivePolicy[int] = AdaptivePolicy(capacity=capacity, shadow_window=shadow_window)
    run_operations(policy, operations, None)
    t1, t2, b1, b2 = (set(part) for part in (policy._t1, policy._t2, policy._b1, policy._b2))
    assert not (t1 | t2) & (b1 | b2) and not t1 & t2 and not b1 & b2
    assert len(b1) == 0 or len(t1) + len(b1) <= policy.capacity
    assert len(b1) + len(b2) == 0 or len(t1 | t2 | b1 | b2) <= 2 * policy.capacity
    assert 0.0 <= policy.target <= policy.capacity


# --- token selection ------------------------------------------------------------------------------------------

TOKEN_POLICIES = pytest.mark.parametrize("strategy", list(CacheStrategy), ids=[s.value for s in CacheStrategy])


def reference_keep(strategy: CacheStrategy, positions: list[int], mass: list[float], budget: int) -> list[int]:
    """One row, brute force: the kept indices, ascending."""
    newest = sorted(range(len(positions)), key=lambda i: -positions[i])
    if strategy is CacheStrategy.LRU:
        return sorted(newest[:budget])
    window = newest[: math.ceil(0.5 * budget)] if strategy is CacheStrategy.ADAPTIVE else []
    rest = sorted((i for i in newest if i not in window), key=lambda i: (-mass[i], -positions[i]))
    return sorted(window + rest[: budget - len(window)])


def test_window_keeps_the_newest_tokens() -> None:
    keep = LRUPolicy().select_tokens(torch.arange(10), torch.rand(10), budget=4)
    assert keep.tolist() == [6, 7, 8, 9] and keep.dtype == torch.int64


def test_heavy_hitters_keep_the_top_mass_and_break_ties_by_recency() -> None:
    mass = torch.tensor([5.0, 0.0, 1.0, 9.0, 1.0, 0.0, 1.0])
    assert LFUPolicy().select_tokens(torch.arange(7), mass, budget=3).tolist() == [0, 3, 6]
    assert LFUPolicy().select_tokens(torch.arange(7), mass, budget=4).tolist() == [0, 3, 4, 6]


def test_adaptive_keeps_a_window_plus_heavy_hitters() -> None:
    mass = torch.tensor([9.0, 0.1, 8.0, 0.2, 7.0, 0.3, 0.0, 0.0])
    policy: AdaptivePolicy[int] = AdaptivePolicy()
    assert policy.select_tokens(torch.arange(8), mass, budget=4).tolist() == [0, 2, 6, 7]
    policy.recent_fraction = 0.25
    assert policy.select_tokens(torch.arange(8), mass, budget=4).tolist() == [0, 2, 4, 7]
    policy.recent_fraction = 1.0
    assert policy.select_tokens(torch.arange(8), mass, budget=4).tolist() == [4, 5, 6, 7]
    with pytest.raises(CacheValidationError, match=r"recent_fraction=-0\.1"):
        policy.recent_fraction = -0.1


@TOKEN_POLICIES
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_budget_shapes_and_sorted_output(strategy: CacheStrategy, dtype: torch.dtype) -> None:
    policy = make_policy(strategy)
    mass = torch.rand(2, 3, 9).to(dtype)
    positions = torch.arange(100, 109, dtype=torch.int32)  # [tokens], broadcast over [batch, kv_heads]
    keep = policy.select_tokens(positions, mass, budget=5)
    assert keep.shape == (2, 3, 5) and keep.dtype == torch.int64
    assert torch.all(keep[..., 1:] > keep[..., :-1])
    assert policy.select_tokens(positions, mass, budget=0).shape == (2, 3, 0)
    assert policy.select_tokens(positions, mass, budget=20).tolist() == torch.arange(9).expand(2, 3, 9).tolist()


@TOKEN_POLICIES
def test_selection_uses_positions_not_index_order(strategy: CacheStrategy) -> None:
    positions = torch.tensor([7, 3, 9, 1, 5])  # e.g. a ring buffer: index order is not age order
    mass = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1])
    assert make_policy(strategy).select_tokens(positions, mass, budget=2).tolist() == [0, 2]


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(list(CacheStrategy)),
    st.integers(1, 12),
    st.integers(0, 13),
    st.lists(st.sampled_from([0.0, 0.25, 1.0, 2.5]), min_size=24, max_size=24),
)
def test_selection_matches_brute_force(strategy: CacheStrategy, tokens: int, budget: int, values: list[float]) -> None:
    mass = torch.tensor(values[: 2 * tokens]).view(2, tokens)
    positions = torch.stack([torch.arange(tokens), torch.randperm(tokens, generator=torch.Generator().manual_seed(0))])
    keep = make_policy(strategy).select_tokens(positions, mass, budget)
    for row in range(2):
        expected = reference_keep(strategy, positions[row].tolist(), mass[row].tolist(), min(budget, tokens))
        assert keep[row].tolist() == expected


def test_selection_rejects_bad_inputs() -> None:
    policy: LFUPolicy[int] = LFUPolicy()
    mass = torch.rand(2, 5)
    cases: list[tuple[Any, Any, Any, str]] = [
        (torch.arange(5.0), mass, 2, "positions must be an integer tensor"),
        (torch.ones(5, dtype=torch.bool), mass, 2, "positions must be an integer tensor"),
        ([0, 1, 2, 3, 4], mass, 2, "positions must be an integer tensor"),
        (torch.arange(5), torch.ones(2, 5, dtype=torch.int64), 2, "attention_mass must be a floating tensor"),
        (torch.tensor(1), torch.tensor(1.0), 2, "tokens axis"),
        (torch.arange(4), mass, 2, r"positions \(4,\) does not broadcast to attention_mass \(2, 5\)"),
        (torch.arange(5, device="meta"), mass, 2, "positions is on meta but attention_mass on cpu"),
        (torch.arange(5), mass, -1, "budget=-1"),
        (torch.arange(5), mass, 2.0, "budget=2.0"),
    ]
    for positions, attention_mass, budget, message in cases:
        with pytest.raises(CacheValidationError, match=message):
            policy.select_tokens(positions, attention_mass, budget)


def test_a_following_expert_first_evicts_what_its_shadow_dropped() -> None:
    """Shadows of 2 entries under a larger real cache: LFU's shadow dropped "b" (2 uses) for "c", so "b" is a
    stray (the real cache holds it only because another rule chose so) and goes before "c" (1 use)."""
    experts: _Experts[str] = _Experts(4.0, capacity=2)
    for key, hit in [("b", False), ("b", True), ("a", False), ("a", True), ("a", True), ("c", False)]:
        experts.record(key, 1.0, hit, capacity=2)
    assert experts.evict(CacheStrategy.LFU, None) == ["b"]
    assert experts.evict(CacheStrategy.LFU, None) == ["c"]  # no stray left: LFU's own order
    assert experts.evict(CacheStrategy.LRU, None) == ["a"]
