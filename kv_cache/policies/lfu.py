"""`LFUPolicy`: evict the entry with the least accumulated weight; on tokens, keep the heavy hitters (H2O).

An entry's frequency is the sum of the weights of its accesses (`insert` counts as the first). Ties go to
recency: among equal frequencies the entry accessed longest ago is evicted first. Entries sit in a binary heap of
`(frequency, last access tick, key)` with lazy invalidation: an access pushes a fresh item and leaves the old one
stale, recognised on pop because `_live[key]` no longer *is* it. The heap is rebuilt when stale items outnumber
live ones, so memory stays O(n) and every operation costs O(log n) amortised. The unique tick also means keys
themselves are never compared (they need not be orderable).

Tokens follow H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", arXiv 2306.14048) without its recent window: keep the tokens with the most accumulated attention.
`AdaptivePolicy` adds the window back.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import torch

from kv_cache.config import CacheStrategy
from kv_cache.policies.base import K, Policy, check_weight, keep_heaviest, missing, present

_SLACK = 64  # stale heap items tolerated beyond the live count before a rebuild


class LFUPolicy(Policy[K]):
    """Least (weighted) frequently used first, older first on ties. On tokens: keep the largest attention mass."""

    strategy = CacheStrategy.LFU

    def __init__(self) -> None:
        self._live: dict[K, tuple[float, int, K]] = {}  # key -> its one valid heap item
        self._heap: list[tuple[float, int, K]] = []
        self._tick = 0

    def insert(self, key: K, weight: float = 1.0) -> None:
        check_weight(weight)
        if key in self._live:
            raise present(key)
        self._push(key, weight)

    def touch(self, key: K, weight: float = 1.0) -> None:
        check_weight(weight)
        item = self._live.get(key)
        if item is None:
            raise missing(key, "touch")
        self._push(key, item[0] + weight)

    def remove(self, key: K) -> None:
        if self._live.pop(key, None) is None:
            raise missing(key, "remove")
        self._compact()

    def frequency(self, key: K) -> float:
        """Accumulated weight of `key`; `CacheValidationError` if it is absent."""
        item = self._live.get(key)
        if item is None:
            raise missing(key, "read the frequency of")
        return item[0]

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def _victims(self, count: int, evictable: Callable[[K], bool] | None) -> list[K]:
        chosen: list[K] = []
        skipped: list[tuple[float, int, K]] = []
        while len(chosen) < count and self._heap:
            item = heapq.heappop(self._heap)
            key = item[2]
            if self._live.get(key) is not item:
                continue  # stale: the key was touched or removed since this item was pushed
            if evictable is not None and not evictable(key):
                skipped.append(item)
                continue
            del self._live[key]
            chosen.append(key)
        for item in skipped:
            heapq.heappush(self._heap, item)
        return chosen

    def _keep_tokens(self, positions: torch.Tensor, attention_mass: torch.Tensor, budget: int) -> torch.Tensor:
        return keep_heaviest(attention_mass, positions, budget)

    def _push(self, key: K, frequency: float) -> None:
        self._tick += 1
        item = (frequency, self._tick, key)
        self._live[key] = item
        heapq.heappush(self._heap, item)
        self._compact()

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._live) + _SLACK:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)
