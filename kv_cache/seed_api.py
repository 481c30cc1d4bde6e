"""The seed's public names, as thin faces over the concept modules.

`BaseKVCache`, `AdaptiveKVCache`, `PagedKVCache`, `BatchCacheOperations`, the eviction strategies
(`LRUEvictionStrategy`, `LFUEvictionStrategy`, `AdaptiveEvictionStrategy`: the `kv_cache.policies` classes) and
their factory `create_eviction_strategy`.

    cache = BaseKVCache(KVCacheConfig(max_tokens=4096))
    key, value, info = cache.forward(key, value, cache_position=0)   # one layer; [batch, kv_heads, tokens, head_dim]
    stats = cache.get_stats(include_history=True)

Each method translates its arguments and delegates to `KVStore` (storage), `CacheStatsTracker` (stats) and
`Profiler` (timing); no cache logic lives here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from kv_cache.config import CacheStrategy, KVCacheConfig
from kv_cache.errors import CacheDeviceError, CacheError, CacheMemoryError, CacheValidationError
from kv_cache.kv_store import KVStore
from kv_cache.low_rank import Compressor, LowRankProjection
from kv_cache.memory_manager import MemoryManager
from kv_cache.policies import AdaptivePolicy, LFUPolicy, LRUPolicy, Policy, make_policy
from kv_cache.profiler import Profiler
from kv_cache.quantizer import Quantizer
from kv_cache.stats import CacheStatsTracker, build_stats, store_gauges
from kv_cache.token_eviction import TokenEvictor

T = TypeVar("T")


class BaseKVCache:
    """The key/value cache of one attention layer for a batch of sequences.

    Args:
        config: cache configuration; `KVCacheConfig()` if omitted.
        quantizer: the sealed blocks' quantizer (overrides the config's quantization settings); see `quantizer`.
        compressor: a low-rank `Compressor` (overrides `low_rank_ratio`/`low_rank_method`); see `compressor`.
        memory_manager: a `MemoryManager(config, device)`: store operations that run out of device memory are
            retried after it frees memory (`oom_retries` times), then fail with `CacheMemoryError`.
    """

    def __init__(
        self,
        config: KVCacheConfig | None = None,
        quantizer: Quantizer | None = None,
        memory_manager: MemoryManager | None = None,
        compressor: Compressor | None = None,
    ) -> None:
        self.config = config or KVCacheConfig()
        self.tracker = CacheStatsTracker(self.config.history_size, self.config.snapshot_interval_s)
        self.profiler = Profiler(self.config.enable_profiling)
        self.seq_ids: list[int] = []
        self._build_store()
        if quantizer is not None:
            self.quantizer = quantizer
        if compressor is not None:
            self.compressor = compressor
        self.memory_manager = memory_manager

    def _build_store(self) -> None:
        self.store = KVStore(self.config, num_layers=1)
        compressor = self.config.compressor
        self.low_rank = LowRankProjection(compressor, num_layers=1) if compressor is not None else None
        self.evictor = TokenEvictor(self.config, self.store, self.tracker) if self.config.evicts_tokens else None

    @property
    def quantizer(self) -> Quantizer | None:
        """The quantizer sealed blocks use (None: full precision). Settable only while the cache is empty."""
        config = self.config
        return Quantizer(config.quantization_bits, config.quantization_group_size) if config.use_quantization else None

    @quantizer.setter
    def quantizer(self, quantizer: Quantizer | None) -> None:
        if quantizer is not None and not isinstance(quantizer, Quantizer):
            raise CacheValidationError(
                f"quantizer must be a kv_cache.Quantizer or None; got {type(quantizer).__name__}"
            )
        changes: dict[str, Any] = {"use_quantization": quantizer is not None}
        if quantizer is not None:
            changes |= {"quantization_bits": quantizer.bits, "quantization_group_size": quantizer.group_size}
        self._swap_component("quantizer", changes)

    @property
    def compressor(self) -> Compressor | None:
        """The low-rank compressor: tokens are stored as coefficients on a basis fitted on the first call's states
        (None: full head_dim). Settable only while the cache is empty."""
        return self.config.compressor

    @compressor.setter
    def compressor(self, compressor: Compressor | None) -> None:
        if compressor is not None and not isinstance(compressor, Compressor):
            raise CacheValidationError(
                f"compressor must be a kv_cache.Compressor or None; got {type(compressor).__name__}"
            )
        ratio, method = (None, "low_rank") if compressor is None else (compressor.ratio, compressor.method)
        self._swap_component("compressor", {"low_rank_ratio": ratio, "low_rank_method": method})

    def _swap_component(self, name: str, changes: dict[str, Any]) -> None:
        """Rebuild the (empty) store with the config `changes` a component brings."""
        if self.store.pool is not None:
            raise CacheValidationError(
                f"the {name} cannot change once tokens are stored (blocks of two formats would mix); "
                "set it before the first forward, or reset() and build a new cache"
            )
        self.config = KVCacheConfig.from_dict({**self.config.to_dict(), **changes})
        self._build_store()

    @property
    def memory_manager(self) -> MemoryManager | None:
        """The OOM guard of store operations (None: none). It changes no stored data, so it may be set any time."""
        return self._memory_manager

    @memory_manager.setter
    def memory_manager(self, manager: MemoryManager | None) -> None:
        if manager is not None and not isinstance(manager, MemoryManager):
            raise CacheValidationError(
                f"memory_manager must be a kv_cache.MemoryManager or None; got {type(manager).__name__}"
            )
        self._memory_manager = manager

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
        with self.profiler.record("forward", key.device if isinstance(key, torch.Tensor) else None):
            if self.low_rank is not None:
                key, value = self.low_rank.compress(0, key, value)  # the store holds coefficients
            self.store.validate_inputs(self.seq_ids or None, 0, key, value)
            self._check_manager_device(key.device)
            seen = self.seq_length
            position = self._start_position(cache_position, key.shape[2], seen)
            if position + key.shape[2] > self.config.max_tokens and self.evictor is None:  # before any rewind
                raise CacheMemoryError(
                    f"a sequence would hold {position + key.shape[2]} tokens but max_tokens={self.config.max_tokens}; "
                    "raise max_tokens"
                )
            first_call = not self.seq_ids
            if first_call:
                self.seq_ids = [self.store.add_sequence() for _ in range(key.shape[0])]
            try:
                keys, values, cached = self._store_step(key, value, position, seen)
            except CacheError:
                if first_call:  # a failed first call fixes nothing, not even the batch size
                    self.reset()
                raise
        self.tracker.record_read(cached * len(self.seq_ids), key.shape[2] * len(self.seq_ids))
        self.tracker.snapshot(functools.partial(store_gauges, self.store))
        info = {
            "cache_position": position,
            "seq_length": position + key.shape[2],
            "cached_tokens": cached,
            "new_tokens": key.shape[2],
            "evicted_tokens": position - cached,
        }
        return keys, values, info

    def _store_step(
        self, key: torch.Tensor, value: torch.Tensor, position: int, seen: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Rewind to `position` if before the end, evict if over budget, append, read: (keys, values, cached)."""
        if position < seen:
            self._rewind(position)
        evictor, store, seq_ids = self.evictor, self.store, self.seq_ids
        if evictor is not None:
            self._guarded(lambda: evictor.evict(seq_ids, 0, incoming=key.shape[2]))
        cached = store.num_tokens(seq_ids[0])
        self._guarded(lambda: store.append(seq_ids, 0, key, value))
        keys, values = self._guarded(lambda: store.read(seq_ids, 0))
        if self.low_rank is not None:
            keys, values = self.low_rank.expand(0, keys, values, key.dtype)
        return keys, values, cached

    def _guarded(self, operation: Callable[[], T]) -> T:
        """`operation()` (one store operation) under the memory manager's OOM retry, if there is one. Store
        operations are atomic under a failing allocation, so a failed attempt leaves nothing to roll back."""
        manager = self._memory_manager
        return operation() if manager is None else manager.run_with_oom_retry(operation, rollback=lambda: None)

    def _check_manager_device(self, device: torch.device) -> None:
        manager = self._memory_manager
        if manager is None:
            return
        managed = manager.device
        if managed.type != device.type or (managed.index is not None and device.index not in (None, managed.index)):
            raise CacheDeviceError(
                f"memory_manager manages {managed} but key/value are on {device}; build it as "
                f"MemoryManager(config, device={str(device)!r})"
            )

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
        """Tokens, blocks used/free, `storage_memory_mb`, `hit_rate`, `profiling` and optionally `history`; with a
        memory manager also `memory_manager` (its OOM counters and `memory_info`)."""
        stats = build_stats(self.store, self.tracker, self.profiler, include_history, include_quantization_error)
        if self.low_rank is not None:
            stats["low_rank"] = self.low_rank.stats()
        if self._memory_manager is not None:
            stats["memory_manager"] = self._memory_manager.stats() | self._memory_manager.memory_info(self.store)
        return stats

    def reset(self) -> None:
        """Drop every cached token; the pool stays allocated."""
        self.store.reset()
        self.seq_ids = []

    @staticmethod
    def _start_position(cache_position: int | torch.Tensor | None, new_tokens: int, length: int) -> int:
        if cache_position is None:
            return length
        if isinstance(cache_position, torch.Tensor):
            if cache_position.dtype.is_floating_point or cache_position.dtype == torch.bool:
                raise CacheValidationError(f"cache_position must hold integer positions, not {cache_position.dtype}")
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
    """`BaseKVCache` with the adaptive strategy (`cache_strategy` is forced to `ADAPTIVE`) and `adapt(metrics)`."""

    def __init__(
        self,
        config: KVCacheConfig | None = None,
        quantizer: Quantizer | None = None,
        memory_manager: MemoryManager | None = None,
        compressor: Compressor | None = None,
    ) -> None:
        config = config or KVCacheConfig()
        if config.cache_strategy is not CacheStrategy.ADAPTIVE:
            config = KVCacheConfig.from_dict({**config.to_dict(), "cache_strategy": CacheStrategy.ADAPTIVE})
        super().__init__(config, quantizer, memory_manager, compressor)

    def adapt(self, metrics: dict[str, float] | None = None) -> dict[str, Any]:
        """Adjust the token budget and the recency/frequency mix to what was observed; returns the decision.

        metrics: `memory_pressure` in [0, 1] (blocks used / total if omitted) and optionally `hit_rate`. Over 0.9
        pressure the token budget shrinks by a quarter (eviction starts if it was off); under 0.5 a budget grows
        by a quarter (up to `max_tokens`). With heavy-hitter data, the share of attention that went to the newest
        quarter of the tokens becomes the policy's recent fraction (within [0.2, 0.8]). Every decision is
        recorded in the stats history under `adapt`. Bit widths are fixed once tokens are stored.
        """
        metrics = dict(metrics or {})
        stats = self.get_stats()
        pressure = metrics.get("memory_pressure", stats["blocks_used"] / max(1, stats["blocks_total"]))
        if not 0.0 <= pressure <= 1.0:
            raise CacheValidationError(f"memory_pressure={pressure!r} must be a fraction in [0, 1]")
        decision: dict[str, Any] = {"memory_pressure": pressure, "hit_rate": metrics.get("hit_rate", stats["hit_rate"])}
        held = self.store.num_tokens(self.seq_ids[0]) if self.seq_ids else 0
        budget = self.config.token_budget
        if pressure > 0.9 and held > self.config.tokens_per_block:
            decision["token_budget"] = max(self.config.sink_tokens + 1, (budget or held) * 3 // 4)
        elif pressure < 0.5 and budget is not None:
            decision["token_budget"] = min(self.config.max_tokens, budget * 5 // 4)
        if "token_budget" in decision and decision["token_budget"] != budget:
            self._set_budget(decision["token_budget"])
        share = self._recent_attention_share()
        if share is not None and self.evictor is not None and isinstance(self.evictor.policy, AdaptivePolicy):
            decision["recent_fraction"] = min(0.8, max(0.2, share))
            self.evictor.policy.recent_fraction = decision["recent_fraction"]
        self.tracker.snapshot({"adapt": decision}, force=True)
        return decision

    def _set_budget(self, budget: int) -> None:
        """Switch to a new token budget, keeping the stored tokens and the policy's state."""
        self.config = KVCacheConfig.from_dict(
            {**self.config.to_dict(), "token_budget": budget, "compression_ratio": None}
        )
        self.store.config = self.config
        policy = self.evictor.policy if self.evictor is not None else None
        self.evictor = TokenEvictor(self.config, self.store, self.tracker)
        if policy is not None:
            self.evictor.policy = policy

    def _recent_attention_share(self) -> float | None:
        """Share of the accumulated attention that the newest quarter of the held tokens received (or None)."""
        if not self.seq_ids or self.evictor is None or not self.evictor.needs_attention_mass:
            return None
        mass = self.store.attention_mass(self.seq_ids[0], 0)
        total = float(mass.sum())
        if total <= 0 or mass.shape[-1] < 4:
            return None
        return float(mass[:, -(mass.shape[-1] // 4) :].sum()) / total


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
            logical = next(x for x, block in self.store.dense_blocks(seq_id).items() if block == page_id)
            filled = max(filled, min(block_size, self.store.num_tokens(seq_id) - logical * block_size))
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


class BatchCacheOperations:
    """Batch-wide operations on a `BaseKVCache`'s rows: beam reordering, selection, repetition.

    Rows that continue the same row share its blocks (copy-on-write); nothing is copied until a row writes.
    """

    def __init__(self, cache: BaseKVCache) -> None:
        self.cache = cache

    def reorder(self, beam_idx: torch.Tensor | list[int]) -> None:
        """Row `i` continues old row `beam_idx[i]` (beam search)."""
        self._replace(_row_indices("beam_idx", beam_idx))

    def select(self, indices: torch.Tensor | list[int]) -> None:
        """Keep only the rows `indices`, in that order (finished rows leave the batch)."""
        self._replace(_row_indices("indices", indices))

    def repeat_interleave(self, repeats: int) -> None:
        """Each row becomes `repeats` consecutive rows (e.g. several samples per prompt)."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise CacheValidationError(f"repeats={repeats!r} must be an int >= 1")
        self._replace([row for row in range(len(self.cache.seq_ids)) for _ in range(repeats)])

    def _replace(self, sources: list[int]) -> None:
        self.cache.seq_ids = self.cache.store.replace_rows(self.cache.seq_ids, sources)


def _row_indices(name: str, indices: torch.Tensor | list[int]) -> list[int]:
    """Batch row indices as ints; floats, bools and non-numbers raise `CacheValidationError` naming `name`."""
    try:
        tensor = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError):
        raise CacheValidationError(f"{name}={indices!r} must be integer batch indices") from None
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.is_complex():
        raise CacheValidationError(f"{name} must hold integer batch indices, not {tensor.dtype}")
    return [int(i) for i in tensor.flatten().tolist()]


LRUEvictionStrategy = LRUPolicy
LFUEvictionStrategy = LFUPolicy
AdaptiveEvictionStrategy = AdaptivePolicy


def create_eviction_strategy(strategy: CacheStrategy | str, **kwargs: Any) -> Policy[Any]:
    """The seed's factory: a new `Policy` for `strategy` ("lru", "lfu", "adaptive" or a `CacheStrategy`)."""
    try:
        parsed = CacheStrategy(strategy.lower() if isinstance(strategy, str) else strategy)
    except ValueError:
        raise CacheValidationError(f"strategy={strategy!r} is not supported; use 'lru', 'lfu' or 'adaptive'") from None
    return make_policy(parsed, **kwargs)
