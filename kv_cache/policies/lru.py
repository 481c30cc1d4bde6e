"""`LRUPolicy`: evict the least recently used entry; on tokens, keep the newest (a sliding window).

Entries live in one `OrderedDict` in access order, least recent first, so insert, touch, remove and each victim
cost O(1) (vLLM's free-block queue keeps the same order in a linked list). Weights are accepted and ignored:
recency is all LRU knows.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from itertools import islice

import torch

from kv_cache.config import CacheStrategy
from kv_cache.policies.base import K, Policy, check_weight, missing, present


def take_oldest(order: OrderedDict[K, None], count: int, evictable: Callable[[K], bool] | None) -> list[K]:
    """Pop up to `count` keys from the old end of `order`, skipping (and keeping) those `evictable` rejects."""
    if evictable is None:
        return [order.popitem(last=False)[0] for _ in range(min(count, len(order)))]
    chosen = list(islice(filter(evictable, order), count))
    for key in chosen:
        del order[key]
    return chosen


class LRUPolicy(Policy[K]):
    """Least recently used first. On tokens: keep the `budget` newest positions (sliding window)."""

    strategy = CacheStrategy.LRU

    def __init__(self) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()  # least recently used first

    def insert(self, key: K, weight: float = 1.0) -> None:
        check_weight(weight)
        if key in self._order:
            raise present(key)
        self._order[key] = None

    def touch(self, key: K, weight: float = 1.0) -> None:
        check_weight(weight)
        try:
            self._order.move_to_end(key)
        except KeyError:
            raise missing(key, "touch") from None

    def remove(self, key: K) -> None:
        try:
            del self._order[key]
        except KeyError:
            raise missing(key, "remove") from None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def _victims(self, count: int, evictable: Callable[[K], bool] | None) -> list[K]:
        return take_oldest(self._order, count, evictable)

    def _keep_tokens(self, positions: torch.Tensor, attention_mass: torch.Tensor, budget: int) -> torch.Tensor:
        return positions.topk(budget, dim=-1).indices
