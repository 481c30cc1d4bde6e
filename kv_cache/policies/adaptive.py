"""`AdaptivePolicy`: ARC on entries, with shadow caches that hand eviction to LRU or LFU while they would hit
more; on tokens, a recent window plus heavy hitters.

Entries follow ARC (Megiddo & Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache", FAST 2003):

    resident:  T1 (seen once lately, LRU order)      T2 (seen twice or more, LRU order)
    ghosts:    B1 (keys evicted from T1, no data)    B2 (keys evicted from T2, no data)

    REPLACE evicts the LRU end of T1 while |T1| > p, else of T2. A miss that hits ghost B1 means T1 was too
    small: p grows by max(1, |B2|/|B1|); a hit in B2 shrinks it by max(1, |B1|/|B2|). p stays in [0, c].

How our interface maps onto the paper, and where it departs:

* The cache, not the policy, decides when to evict: `victims(n)` runs REPLACE n times, `insert` handles the
  paper's miss cases (a ghost hit adapts p and enters T2, a new key enters T1) and never evicts a resident key.
  So the paper's case IV branch that discards T1's LRU page directly (no ghost) does not exist: the ghost
  lists are instead trimmed after each step to |T1| + |B1| <= c and |T1| + |T2| + |B1| + |B2| <= 2c.
* Capacity c: given at construction, or else learned as the most entries ever resident at once (the cache
  size, once the cache has filled; ghosts only appear after the first eviction, so nothing is lost before).
* REPLACE's tie rule ("or x in B2 and |T1| = p") needs the key about to be inserted; a cache asks for victims
  before it inserts, so we drop the tie rule and evict from T1 iff |T1| > p (or T2 is empty). For the same
  reason p adapts on the insert after the eviction it would have steered, one step late. Measured once against
  a textbook ARC on the seed-0 traces of `benchmarks/policy_traces.py`: within 0.2 points of hit rate.
* `remove` (the cache dropped an entry itself) forgets the key without a ghost: it was not a policy decision.
* Weights are ignored by ARC (it counts "seen once" vs "seen again", not how much); the LFU expert uses them.
* Shadow experts (our addition, after the virtual caches of ACME: Ari et al., "ACME: Adaptive Caching Using
  Multiple Experts", WDAS 2002). Plain ARC trails LRU by 4 points of hit rate on an LRU-stack trace and LFU by
  1 point on stationary Zipf, the traces where those two are the best online policies. So three key-only
  caches of c entries, run by plain ARC, LRU and LFU, replay every access; the one with the best moving-average
  hit rate (over ~`shadow_window` x c accesses; ties go to LRU, then ARC: before the shadows differ, the real
  cache behaves as the simplest rule) picks the victims among the real residents: ARC by REPLACE on the real
  lists, LRU or LFU by their order of the residents, taking first the residents their own shadow has already
  dropped (after a switch those are the previous leader's choices; evicting them first brings the real cache to
  the new leader's content soonest). Victims enter B1/B2 whoever picks them, so p keeps learning. The price:
  ~8c keys of metadata and 3-30x plain ARC's time per operation (a few microseconds in CPython; the benchmark
  prints it). The default window, 256 x c, was the best of 32/64/128/256/512 on those traces (46/46/47/48/47
  of 54 rows at or above max(LRU, LFU)): a long average switches only on steady evidence. `shadow_window=None`
  turns the experts off: plain ARC.

Tokens: `recent_fraction` of the budget goes to the newest tokens, the rest to the largest accumulated attention
among the older ones (H2O, arXiv 2306.14048, keeps half and half, our default). 1.0 is `LRUPolicy`'s window and
0.0 `LFUPolicy`'s heavy hitters; the fraction may be changed between calls.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic

import torch

from kv_cache.config import CacheStrategy
from kv_cache.errors import CacheValidationError
from kv_cache.policies.base import K, Policy, check_weight, keep_heaviest, missing, present
from kv_cache.policies.lfu import LFUPolicy
from kv_cache.policies.lru import LRUPolicy, take_oldest

ARC = CacheStrategy.ADAPTIVE  # names the ARC rule among the experts


class AdaptivePolicy(Policy[K]):
    """ARC over entries (with ARC/LRU/LFU shadow experts); recent window + heavy hitters over tokens.

    Args:
        capacity: entries the cache holds when full (ARC's c), or None to learn it as the most entries ever
            resident at once.
        recent_fraction: share of a token budget kept as the newest tokens, in [0, 1].
        shadow_window: the shadow caches' hit rates are averaged over about `shadow_window * capacity` accesses
            (> 0); None runs plain ARC, without shadows.
    """

    strategy = CacheStrategy.ADAPTIVE

    def __init__(
        self, capacity: int | None = None, recent_fraction: float = 0.5, shadow_window: float | None = 256.0
    ) -> None:
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise CacheValidationError(f"capacity={capacity!r} must be an int >= 1, or None to learn it")
        self._capacity = capacity
        self._high_water = 0
        self.recent_fraction = recent_fraction
        self._experts: _Experts[K] | None = None if shadow_window is None else _Experts(shadow_window, capacity)
        self._target = 0.0  # ARC's p: how many of the c resident entries T1 should hold
        self._t1: OrderedDict[K, None] = OrderedDict()
        self._t2: OrderedDict[K, None] = OrderedDict()
        self._b1: OrderedDict[K, None] = OrderedDict()
        self._b2: OrderedDict[K, None] = OrderedDict()

    @property
    def recent_fraction(self) -> float:
        """Share of a token budget kept as the newest tokens, in [0, 1]."""
        return self._recent_fraction

    @recent_fraction.setter
    def recent_fraction(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise CacheValidationError(f"recent_fraction={value!r} must be a number in [0, 1] (0.5 is H2O's split)")
        self._recent_fraction = float(value)

    @property
    def capacity(self) -> int:
        """ARC's c: the given capacity, or the most entries resident at once so far."""
        return self._high_water if self._capacity is None else self._capacity

    @property
    def target(self) -> float:
        """ARC's p, in [0, capacity]: the size T1 (recency) aims at; T2 (frequency) gets the rest."""
        return self._target

    @property
    def following(self) -> CacheStrategy:
        """Who picks the next victim: `ADAPTIVE` (ARC's REPLACE), or `LRU`/`LFU` while its shadow hits most."""
        return ARC if self._experts is None else self._experts.leader()

    def insert(self, key: K, weight: float = 1.0) -> None:
        check_weight(weight)
        if key in self._t1 or key in self._t2:
            raise present(key)
        if key in self._b1:  # evicted from T1 too early: give recency more room
            self._adapt(max(1.0, len(self._b2) / len(self._b1)))
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:  # evicted from T2 too early: give frequency more room
            self._adapt(-max(1.0, len(self._b1) / len(self._b2)))
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
        self._high_water = max(self._high_water, len(self))
        self._trim_ghosts()
        if self._experts is not None:
            self._experts.record(key, weight, False, self.capacity)

    def touch(self, key: K, weight: float = 1.0) -> None:
        check_weight(weight)
        if key in self._t2:
            self._t2.move_to_end(key)
        elif key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        else:
            raise missing(key, "touch")
        if self._experts is not None:
            self._experts.record(key, weight, True, self.capacity)

    def remove(self, key: K) -> None:
        if self._t1.pop(key, self) is self and self._t2.pop(key, self) is self:
            raise missing(key, "remove")
        if self._experts is not None:
            self._experts.forget(key)

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2

    def _victims(self, count: int, evictable: Callable[[K], bool] | None) -> list[K]:
        chosen: list[K] = []
        experts = self._experts
        while len(chosen) < count:
            if experts is None or (rule := experts.leader()) is ARC:
                taken = self._replace(evictable)
            else:
                taken = experts.evict(rule, evictable)
                self._to_ghosts(taken)
            if not taken:
                break
            chosen.extend(taken)
        return chosen

    def _replace(self, evictable: Callable[[K], bool] | None) -> list[K]:
        """ARC's REPLACE: move one evictable key from T1 (if over target) or T2 to its ghost list."""
        lists = ((self._t1, self._b1), (self._t2, self._b2))
        prefer_t1 = bool(self._t1) and (len(self._t1) > self._target or not self._t2)
        for resident, ghost in lists if prefer_t1 else lists[::-1]:
            taken = take_oldest(resident, 1, evictable)
            if taken:
                ghost[taken[0]] = None
                self._trim_ghosts()
                if self._experts is not None:
                    self._experts.forget(taken[0])
                return taken
        return []

    def _to_ghosts(self, keys: list[K]) -> None:
        """Move keys an expert evicted from T1/T2 to B1/B2, so that p keeps learning from them."""
        for key in keys:
            if self._t1.pop(key, self) is self:
                del self._t2[key]
                self._b2[key] = None
            else:
                self._b1[key] = None
        self._trim_ghosts()

    def _adapt(self, delta: float) -> None:
        self._target = min(float(self.capacity), max(0.0, self._target + delta))

    def _trim_ghosts(self) -> None:
        capacity = self.capacity
        while self._b1 and len(self._t1) + len(self._b1) > capacity:
            self._b1.popitem(last=False)
        while (self._b1 or self._b2) and len(self) + len(self._b1) + len(self._b2) > 2 * capacity:
            (self._b2 or self._b1).popitem(last=False)

    def _keep_tokens(self, positions: torch.Tensor, attention_mass: torch.Tensor, budget: int) -> torch.Tensor:
        window = math.ceil(self._recent_fraction * budget)
        score = attention_mass
        if window:
            newest = positions.topk(window, dim=-1).indices
            recent = torch.zeros_like(attention_mass, dtype=torch.bool).scatter_(-1, newest, True)
            score = attention_mass.masked_fill(recent, math.inf)
        return keep_heaviest(score, positions, budget)


class _Experts(Generic[K]):
    """Three key-only shadow caches (plain ARC, LRU, LFU) and the real residents in LRU and in LFU order.

    `record` replays each access of the real cache on every shadow, at the real cache's capacity, and updates an
    exponential moving average of each shadow's hit rate; `leader` names the best, LRU then ARC on ties.
    """

    def __init__(self, window: float, capacity: int | None) -> None:
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 < window < math.inf:
            raise CacheValidationError(f"shadow_window={window!r} must be a number > 0, or None for plain ARC")
        self._window = float(window)
        self._shadows: dict[CacheStrategy, Policy[K]] = {
            CacheStrategy.LRU: LRUPolicy(),
            ARC: AdaptivePolicy(capacity, shadow_window=None),
            CacheStrategy.LFU: LFUPolicy(),
        }
        self._hit_rates = dict.fromkeys(self._shadows, 0.0)
        self._residents: dict[CacheStrategy, Policy[K]] = {
            CacheStrategy.LRU: LRUPolicy(),
            CacheStrategy.LFU: LFUPolicy(),
        }
        # Per rule, the real residents its shadow has evicted, in that order.
        self._strays: dict[CacheStrategy, OrderedDict[K, None]] = {rule: OrderedDict() for rule in self._residents}

    def record(self, key: K, weight: float, hit: bool, capacity: int) -> None:
        """One access of the real cache (`hit`: it held `key`), replayed on the shadows."""
        rate = 1.0 / (self._window * capacity)
        for rule, shadow in self._shadows.items():
            shadow_hit, evicted = _access(shadow, key, weight, capacity)
            self._hit_rates[rule] += rate * (shadow_hit - self._hit_rates[rule])
            strays = self._strays.get(rule)
            if strays is not None:
                residents = self._residents[rule]
                strays.update((gone, None) for gone in evicted if gone in residents)
                strays.pop(key, None)  # every shadow holds the key just accessed
        for order in self._residents.values():
            (order.touch if hit else order.insert)(key, weight)

    def leader(self) -> CacheStrategy:
        return max(self._hit_rates, key=self._hit_rates.__getitem__)  # the first maximum: LRU wins ties, then ARC

    def evict(self, rule: CacheStrategy, evictable: Callable[[K], bool] | None) -> list[K]:
        """Name and forget the resident that `rule` (LRU or LFU) evicts next among those `evictable` accepts.

        Residents that `rule`'s shadow no longer holds go first (in `rule`'s order): after a switch they are the
        other rules' choices, and evicting them first brings the real cache to the leader's content soonest."""
        strays, order = self._strays[rule], self._residents[rule]
        taken: list[K] = []
        if strays:
            taken = order.victims(1, lambda key: key in strays and (evictable is None or evictable(key)))
        if not taken:
            taken = order.victims(1, evictable)
        for other, order in self._residents.items():
            if other is not rule:
                for key in taken:
                    order.remove(key)
        for strays in self._strays.values():
            for key in taken:
                strays.pop(key, None)
        return taken

    def forget(self, key: K) -> None:
        """The real cache no longer holds `key` (the shadows keep their own copies)."""
        for order in self._residents.values():
            order.remove(key)
        for strays in self._strays.values():
            strays.pop(key, None)


def _access(shadow: Policy[K], key: K, weight: float, capacity: int) -> tuple[bool, list[K]]:
    """Replay one access on a key-only cache of `capacity` entries run by `shadow`: (hit, the keys it evicted)."""
    if key in shadow:
        shadow.touch(key, weight)
        return True, []
    excess = len(shadow) + 1 - capacity
    evicted = shadow.victims(excess) if excess > 0 else []
    shadow.insert(key, weight)
    return False, evicted
