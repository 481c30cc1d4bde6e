"""`TokenEvictor`: keep a sequence's tokens within a budget, per layer and KV head, by a `Policy`.

The policy comes from `cache_strategy` (the same classes that rank prefix-cache blocks):

    LRU       a sliding window: the newest tokens stay (StreamingLLM, arXiv 2309.17453, with `sink_tokens`)
    LFU       heavy hitters: the tokens that received the most attention stay (H2O, arXiv 2306.14048); a prompt
              is scored by its last `observation_window` queries (SnapKV, arXiv 2404.14469), each decoded token
              then adds its own attention
    ADAPTIVE  a recent window plus heavy hitters (the policy's `recent_fraction`)

What one layer keeps, per KV head (each head its own tokens, all heads the same count):

    | sinks | ............ the policy's pick among the middle ............ | recent window |
      sink_tokens                                                         min(observation_window, half the rest)

The recent window (LFU and ADAPTIVE) is SnapKV's observation window, kept whole as in the paper, and H2O's recent
tokens: their accumulated attention is incomplete (fewer queries have seen them), so ranking them with older
tokens would evict exactly the context the next token needs. It takes at most half of what the sinks leave, as
H2O splits its budget evenly between recent tokens and heavy hitters.

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

POOL_KERNEL = 15
"""SnapKV's pooling window, in tokens: a token scores the best of its +-7 neighbours, so a selected feature keeps
its whole phrase (SnapKV section 4.3, "clustering"). The paper pools 5-7 BPE tokens, ~3-4 bytes of code each; on
the byte vocabulary of our reference model 7 tokens is less than an identifier, and a retrieved value lost its
last characters (needles at 4x: 33% exact on tuning probes with 7). Kernels 11 to 31 all restore 100% there
(seeds >= 100, disjoint from the reported ones); 15 is ~4-5 BPE tokens of code. For a BPE model, 7 is right."""


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
        """`[batch, kv_heads, budget]` ascending indices to keep: the sinks, the policy's pick of the middle, and
        the recent window (see the module docstring)."""
        pool = self.store.pool
        if pool is None:
            raise CacheValidationError("nothing to evict: the store holds no tokens")
        sinks = min(self.config.sink_tokens, budget, length)
        recent = min(self.config.observation_window, (budget - sinks) // 2) if self.needs_attention_mass else 0
        middle = (sinks, length - recent)
        shape = (len(seq_ids), pool.block_format.kv_heads)
        if self.needs_attention_mass:
            mass = torch.stack([self.store.attention_mass(s, layer) for s in seq_ids])[:, :, middle[0] : middle[1]]
            mass = pooled(mass)
        else:
            mass = torch.zeros(*shape, middle[1] - middle[0], device=pool.device)
        positions = torch.arange(*middle, device=pool.device)
        chosen = self.policy.select_tokens(positions, mass, budget - sinks - recent) + sinks
        ends = [
            torch.arange(*span, device=pool.device).expand(*shape, span[1] - span[0])
            for span in ((0, sinks), (middle[1], length))
        ]
        return torch.cat([ends[0], chosen, ends[1]], dim=-1)

    def _group(self, q_heads: int) -> int:
        pool = self.store.pool
        kv_heads = pool.block_format.kv_heads if pool is not None else q_heads
        return q_heads // kv_heads


def pooled(mass: torch.Tensor) -> torch.Tensor:
    """SnapKV's clustering: each token's score becomes the largest within `POOL_KERNEL` tokens around it.

    mass: `[batch, kv_heads, tokens]` fp32 accumulated attention; returns the same shape.
    """
    if mass.shape[-1] == 0:
        return mass
    return F.max_pool1d(mass, POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2)
