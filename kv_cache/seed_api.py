"""The seed's public names, as thin faces over the concept modules.

    cache = BaseKVCache(KVCacheConfig(max_tokens=4096))
    key, value, info = cache.forward(key, value, cache_position=0)   # one layer; [batch, kv_heads, tokens, head_dim]
    stats = cache.get_stats(include_history=True)

Each method translates its arguments and delegates to `KVStore` (storage), `CacheStatsTracker` (stats) and
`Profiler` (timing); no cache logic lives here.
"""

from __future__ import annotations

from typing import Any

import torch

from kv_cache.config import CacheStrategy, KVCacheConfig
from kv_cache.errors import CacheValidationError
from kv_cache.kv_store import KVStore
from kv_cache.profiler import Profiler
from kv_cache.stats import CacheStatsTracker, build_stats, store_gauges
from kv_cache.token_eviction import TokenEvictor


class BaseKVCache:
    """The key/value cache of one attention layer for a batch of sequences.

    Args:
        config: cache configuration; `KVCacheConfig()` if omitted.
    """

    def __init__(self, config: KVCacheConfig | None = None) -> None:
        self.config = config or KVCacheConfig()
        self.store = KVStore(self.config, num_layers=1)
        self.evictor = TokenEvictor(self.config, self.store) if self.config.evicts_tokens else None
        self.tracker = CacheStatsTracker(self.config.history_size)
        self.profiler = Profiler(self.config.enable_profiling)
        self.seq_ids: list[int] = []

    def forward(
        self, key: torch.Tensor, value: torch.Tensor, cache_position: int | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Cache new tokens and return every cached token for attention.

        Args:
            key, value: `[batch, kv_heads, tokens, head_dim]` new states (float32/float16/bfloat16).
            cache_position: position of the first new token (an int, or a 1-D tensor of consecutive positions as
                Hugging Face passes it). None appends at the end. A position before the end rewrites the cache
                from there on (the tokens after it are dropped first).

        Returns:
            `(keys, values, info)`: `[batch, kv_heads, cached + tokens, head_dim]` each, and a dict with
            `cache_position`, `seq_length` (tokens seen), `cached_tokens` (held before this call), `new_tokens`
            and `evicted_tokens` (seen but no longer held, with `token_budget`/`compression_ratio`).
        """
        with self.profiler.record("forward"):
            self.store.validate_inputs(self.seq_ids or None, 0, key, value)
            if not self.seq_ids:
                self.seq_ids = [self.store.add_sequence() for _ in range(key.shape[0])]
            seen = self.seq_length
            position = self._start_position(cache_position, key.shape[2], seen)
            if position < seen:
                self._rewind(position)
            if self.evictor is not None:
                self.evictor.evict(self.seq_ids, 0, incoming=key.shape[2])
            cached = self.store.num_tokens(self.seq_ids[0])
            self.store.append(self.seq_ids, 0, key, value)
            keys, values = self.store.read(self.seq_ids, 0)
        self.tracker.record_read(cached * len(self.seq_ids), key.shape[2] * len(self.seq_ids))
        self.tracker.snapshot(store_gauges(self.store))
        info = {
            "cache_position": position,
            "seq_length": position + key.shape[2],
            "cached_tokens": cached,
            "new_tokens": key.shape[2],
            "evicted_tokens": position - cached,
        }
        return keys, values, info

    def record_attention(self, weights: torch.Tensor) -> None:
        """Feed the attention weights of the last `forward` to LFU/ADAPTIVE token eviction (heavy hitters).

        weights: `[batch, q_heads, q_len, tokens]` softmax weights over the tokens `forward` returned.
        """
        if self.evictor is None or not self.evictor.needs_attention_mass:
            raise CacheValidationError("record_attention needs token eviction with cache_strategy LFU or ADAPTIVE")
        if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
            raise CacheValidationError("weights must be a tensor [batch, q_heads, q_len, tokens]")
        self.evictor.observe(self.seq_ids, 0, weights.float().mean(2), weights.shape[2])

    def _rewind(self, position: int) -> None:
        """Drop every token from `position` on (only possible while nothing was evicted before it)."""
        held = self.store.num_tokens(self.seq_ids[0])
        if held != self.seq_length:
            raise CacheValidationError(
                f"cache_position={position} rewrites tokens, but {self.seq_length - held} tokens were evicted "
                "already; only appending at the end is possible with token eviction"
            )
        for seq_id in self.seq_ids:
            self.store.truncate(seq_id, position)

    __call__ = forward

    @property
    def seq_length(self) -> int:
        """Tokens seen per sequence (evicted ones included): the next token's position."""
        return self.store.num_seen(self.seq_ids[0], 0) if self.seq_ids else 0

    def get_stats(self, include_history: bool = False, include_quantization_error: bool = False) -> dict[str, Any]:
        """Tokens, blocks used/free, `storage_memory_mb`, `hit_rate`, `profiling` and optionally `history`."""
        return build_stats(self.store, self.tracker, self.profiler, include_history, include_quantization_error)

    def reset(self) -> None:
        """Drop every cached token; the pool stays allocated."""
        self.store.reset()
        self.seq_ids = []

    @staticmethod
    def _start_position(cache_position: int | torch.Tensor | None, new_tokens: int, length: int) -> int:
        if cache_position is None:
            return length
        if isinstance(cache_position, torch.Tensor):
            if cache_position.dim() > 1 or cache_position.numel() not in (1, new_tokens):
                raise CacheValidationError(
                    f"cache_position has shape {tuple(cache_position.shape)}; expected an int or a 1-D tensor of "
                    f"{new_tokens} consecutive positions"
                )
            positions = cache_position.flatten().tolist()
            if positions != list(range(positions[0], positions[0] + len(positions))):
                raise CacheValidationError(f"cache_position {positions} must be consecutive and increasing")
            cache_position = int(positions[0])
        if isinstance(cache_position, bool) or not isinstance(cache_position, int):
            raise CacheValidationError(f"cache_position={cache_position!r} must be an int, a tensor or None")
        if not 0 <= cache_position <= length:
            raise CacheValidationError(
                f"cache_position={cache_position} is out of range; this cache holds {length} tokens, so use a "
                f"position between 0 and {length}"
            )
        return cache_position


class AdaptiveKVCache(BaseKVCache):
    """`BaseKVCache` with the adaptive (ARC-like) strategy: `cache_strategy` is forced to `ADAPTIVE`."""

    def __init__(self, config: KVCacheConfig | None = None) -> None:
        config = config or KVCacheConfig()
        if config.cache_strategy is not CacheStrategy.ADAPTIVE:
            config = KVCacheConfig.from_dict({**config.to_dict(), "cache_strategy": CacheStrategy.ADAPTIVE})
        super().__init__(config)


class PagedKVCache(BaseKVCache):
    """`BaseKVCache` that exposes its pages (blocks): `get_page(page_id)` and `get_page_stats()`."""

    def get_page(self, page_id: int) -> dict[str, Any]:
        """One block: its reference count, the sequences holding it, tokens filled, and its keys/values.

        Returns `keys`/`values` as `[block_size, kv_heads, head_dim]` copies (None for a free block).
        """
        pool = self.store.pool
        if pool is None or isinstance(page_id, bool) or not isinstance(page_id, int):
            raise CacheValidationError(f"page_id={page_id!r} must be an int of an allocated pool (none yet)")
        if not 0 <= page_id < pool.num_blocks:
            raise CacheValidationError(f"page_id={page_id} is out of range; the pool has {pool.num_blocks} pages")
        holders = [s for s in self.store.sequence_ids if page_id in self.store.block_ids(s)]
        block_size = self.config.tokens_per_block
        filled = 0
        for seq_id in holders:
            start = self.store.block_ids(seq_id).index(page_id) * block_size
            filled = max(filled, min(block_size, self.store.num_tokens(seq_id) - start))
        free = pool.ref_count(page_id) == 0
        return {
            "page_id": page_id,
            "ref_count": pool.ref_count(page_id),
            "sequences": holders,
            "tokens": filled,
            "keys": None if free else pool.dense(0).keys[page_id].clone(),
            "values": None if free else pool.dense(0).values[page_id].clone(),
        }

    def get_page_stats(self) -> dict[str, Any]:
        """Pages total/used/free/shared, token slots used, and internal fragmentation (unused slots in used pages)."""
        pool = self.store.pool
        if pool is None:
            return {"pages_total": 0, "pages_used": 0, "pages_free": 0, "pages_shared": 0, "fragmentation": 0.0}
        block_ids = {b for s in self.store.sequence_ids for b in self.store.block_ids(s)}
        tokens = sum(self.store.num_tokens(s) for s in self.store.sequence_ids)
        slots = sum(len(self.store.block_ids(s)) for s in self.store.sequence_ids) * self.config.tokens_per_block
        return {
            "pages_total": pool.num_blocks,
            "pages_used": pool.num_used,
            "pages_free": pool.num_free,
            "pages_shared": sum(1 for b in block_ids if pool.ref_count(b) > 1),
            "page_size": self.config.tokens_per_block,
            "token_slots_used": tokens,
            "fragmentation": 1.0 - tokens / slots if slots else 0.0,
        }
