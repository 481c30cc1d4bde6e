"""Eviction policies: one `Policy` interface for prefix-cache blocks and for tokens inside a sequence.

| policy | entries (blocks), first evicted | tokens kept |
| --- | --- | --- |
| `LRUPolicy` | least recently used | the newest (sliding window) |
| `LFUPolicy` | least accumulated weight, older first on ties | the largest accumulated attention (H2O) |
| `AdaptivePolicy` | ARC (FAST 2003), or LRU/LFU while their shadow caches hit more | newest share + heavy hitters |

`make_policy(config.cache_strategy)` builds the one a config names. `base.py` states the contract; hit rates
against Belady's optimum are in `benchmarks/results/policy_traces.txt`.
"""

from __future__ import annotations

import inspect
from typing import Any

from kv_cache.config import CacheStrategy
from kv_cache.errors import CacheValidationError
from kv_cache.policies.adaptive import AdaptivePolicy
from kv_cache.policies.base import Policy
from kv_cache.policies.lfu import LFUPolicy
from kv_cache.policies.lru import LRUPolicy

POLICIES: dict[CacheStrategy, type[Policy[Any]]] = {
    CacheStrategy.LRU: LRUPolicy,
    CacheStrategy.LFU: LFUPolicy,
    CacheStrategy.ADAPTIVE: AdaptivePolicy,
}


def make_policy(strategy: CacheStrategy, **kwargs: Any) -> Policy[Any]:
    """A new, empty policy for `strategy`; `kwargs` go to its constructor (`AdaptivePolicy`: `capacity`,
    `recent_fraction`, `shadow_window`; the others take none)."""
    if not isinstance(strategy, CacheStrategy):
        allowed = ", ".join(f"CacheStrategy.{member.name}" for member in CacheStrategy)
        raise CacheValidationError(f"strategy={strategy!r} is not a CacheStrategy; use one of {allowed}")
    policy_class = POLICIES[strategy]
    try:
        inspect.signature(policy_class).bind(**kwargs)
    except TypeError as error:
        raise CacheValidationError(f"{policy_class.__name__} does not take {sorted(kwargs)}: {error}") from None
    return policy_class(**kwargs)


__all__ = ["POLICIES", "AdaptivePolicy", "LFUPolicy", "LRUPolicy", "Policy", "make_policy"]
