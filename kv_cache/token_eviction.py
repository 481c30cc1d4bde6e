"""`TokenEvictor`: keep a sequence's tokens within a budget, per layer and KV head, by a `Policy`.

The policy comes from `cache_strategy` (the same classes that rank prefix-cache blocks):

    LRU       a sliding window: the newest tokens stay (StreamingLLM with `sink_tokens`)
    LFU       heavy hitters: the tokens that received the most attention stay (H2O, arXiv 2306.14048); a prompt
              is scored by its last `observation_window` queries (SnapKV, arXiv 2404.14469), each decoded token
              then adds its own attention
    ADAPTIVE  a recent window plus heavy hitters (the policy's `recent_fraction`)

Eviction waits until a layer holds a whole block more than its budget, then compacts it back to the budget in one
gather, so its cost is amortised over a block of tokens and freed blocks return to the pool. Positions stay right:
rotary embeddings were applied before caching, and the cache keeps counting evicted tokens as seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kv_cache.config import CacheStrategy, KVCacheConfig
from kv_cache.errors import CacheValidationError
from kv_cache.kv_store import KVStore
from kv_cache.policies import Policy, make_policy
from kv_cache.stats import CacheStatsTracker

POOL_KERNEL = 7  # SnapKV's pooling window (tokens)


class TokenEvictor:
    """Decides when and which tokens of a store's sequences to evict (the store does the compaction)."""

    def __init__(self, config: KVCacheConfig, store: KVStore, tracker: CacheStatsTracker | None = None) -> None:
        if not config.evicts_tokens:
            raise CacheValidationError("TokenEvictor needs token_budget or compression_ratio in the config")
        self.config = config
        self.store = store
        self.tracker = tracker
        self.policy: Policy[int] = make_policy(config.cache_strategy)
        self.needs_attention_mass = config.cache_strategy is not CacheStrategy.LRU

    def budget(self, seen: int) -> int:
        """Tokens to keep of a layer that has seen `seen` tokens."""
        if self.config.token_budget is not None:
            return self.config.token_budget
        ratio = self.config.compression_ratio or 0.0
        return max(self.config.sink_tokens + 1, math.ceil(seen * (1 - ratio)))

    def observe(self, seq_ids: Sequence[int], layer: int, mass: torch.Tensor, queries: int) -> None:
        """Add attention mass `[batch, q_heads, tokens]` (each row averaged over `queries` queries) to the held
        tokens, summed over the query heads of each KV head."""
        batch, q_heads, tokens = mass.shape
        kv_heads = q_heads // self._group(q_heads)
        per_kv_head = mass.reshape(batch, kv_heads, q_heads // kv_heads, tokens).sum(2) * queries
        self.store.add_attention_mass(seq_ids, layer, per_kv_head)

    def evict(self, seq_ids: Sequence[int], layer: int, incoming: int = 0) -> None:
        """Compact `layer` of the sequences that would hold more than a block over budget with `incoming` more
        tokens, down to `budget - incoming` (all rows of a call must hold the same number of tokens)."""
        held = {self.store.num_tokens(s, layer) for s in seq_ids}
        if len(held) != 1:
            for seq_id in seq_ids:  # rows of different lengths: one at a time
                self.evict([seq_id], layer, incoming)
            return
        length = held.pop()
        seen = self.store.num_seen(seq_ids[0], layer) + incoming
        budget = self.budget(seen)
        if length == 0 or length + incoming <= budget + self.store.block_size:
            return
        target = min(length, max(self.config.sink_tokens, budget - incoming))
        keep = self._select(seq_ids, layer, length, target)
        self.store.keep_tokens(seq_ids, layer, keep)
        if self.tracker is not None and layer == 0:  # tokens leave every layer alike: count them once
            self.tracker.record_eviction(self.config.cache_strategy.value, (length - target) * len(seq_ids))

    def _select(self, seq_ids: Sequence[int], layer: int, length: int, budget: int) -> torch.Tensor:
        """`[batch, kv_heads, budget]` ascending indices to keep: the sinks, then the policy's pick of the rest."""
        sinks = min(self.config.sink_tokens, budget, length)
        pool = self.store.pool
        if pool is None:
            raise CacheValidationError("nothing to evict: the store holds no tokens")
        kv_heads, device = pool.block_format.kv_heads, pool.device
        if self.needs_attention_mass:
            mass = torch.stack([self.store.attention_mass(s, layer) for s in seq_ids])[:, :, sinks:]
            # SnapKV's clustering: a token's score is the best of its neighbours', so phrases survive whole.
            mass = F.max_pool1d(mass, POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2)
        else:
            mass = torch.zeros(len(seq_ids), kv_heads, length - sinks, device=device)
        positions = torch.arange(sinks, length, device=device)
        chosen = self.policy.select_tokens(positions, mass, budget - sinks) + sinks
        head_sinks = torch.arange(sinks, device=device).expand(len(seq_ids), kv_heads, sinks)
        return torch.cat([head_sinks, chosen], dim=-1)

    def _group(self, q_heads: int) -> int:
        pool = self.store.pool
        kv_heads = pool.block_format.kv_heads if pool is not None else q_heads
        return q_heads // kv_heads
